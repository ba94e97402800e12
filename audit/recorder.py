"""The audit recorder: one per proxy process, shared by every engine.

Strategy: sessions never wait on a sink.  ``SessionAudit.emit`` builds the
event dict and hands it to a bounded trio memory channel with
``send_nowait``.  If the channel is full the event is kept in the session's
small pending list and the session's pump awaits ``flush()`` after its next
send — backpressure on that one session, never loss.  One drain task (owned
by the server's nursery) takes events in batches, stamps each with a
sequence number and a hash chain link (``prev_hash``/``hash``, SHA-256 over
the canonical JSON of the event without its own hash), and hands the batch
to every sink.  A sink failure is logged and counted; it never crashes a
session or the drain task.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any, Protocol

import attrs
import orjson
import trio

from . import events as ev

log = logging.getLogger("dbproxy.audit")

GENESIS_HASH = "0" * 64
MAX_BATCH = 1024


class Sink(Protocol):
    name: str

    async def write_batch(self, batch: list[dict]) -> None: ...

    async def aclose(self) -> None: ...


def chain_hash(event: dict) -> str:
    """SHA-256 over the canonical JSON of ``event`` minus its ``hash`` field."""
    body = {k: v for k, v in event.items() if k != "hash"}
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


@attrs.frozen
class RecorderStatistics:
    submitted: int
    written: int
    sink_failures: int
    queued: int
    last_seq: int


@attrs.define(eq=False)
class AuditRecorder:
    sinks: list
    capacity: int = 10_000
    last_seq: int = 0
    last_hash: str = GENESIS_HASH
    submitted: int = 0
    written: int = 0
    sink_failures: int = 0
    _send: Any = None
    _receive: Any = None
    _done: Any = None

    def __attrs_post_init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel(self.capacity)
        self._done = trio.Event()

    # -- producers ---------------------------------------------------------
    def submit_nowait(self, event: dict) -> bool:
        try:
            self._send.send_nowait(event)
        except trio.WouldBlock:
            return False
        except trio.ClosedResourceError:
            log.error("audit event after recorder close: %s", event.get("event"))
            return True
        self.submitted += 1
        return True

    async def submit(self, event: dict) -> None:
        await self._send.send(event)
        self.submitted += 1

    def session(self, session: Any) -> "SessionAudit":
        return SessionAudit(self, session)

    def statistics(self) -> RecorderStatistics:
        return RecorderStatistics(
            submitted=self.submitted,
            written=self.written,
            sink_failures=self.sink_failures,
            queued=self._receive.statistics().current_buffer_used,
            last_seq=self.last_seq,
        )

    # -- the drain task ----------------------------------------------------
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            async with self._receive:
                while True:
                    try:
                        first = await self._receive.receive()
                    except trio.EndOfChannel:
                        break
                    batch = [first]
                    while len(batch) < MAX_BATCH:
                        try:
                            batch.append(self._receive.receive_nowait())
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                    self._stamp(batch)
                    await self._write(batch)
        finally:
            with trio.CancelScope(shield=True):
                for sink in self.sinks:
                    try:
                        await sink.aclose()
                    except Exception:
                        log.exception("audit sink %s failed to close", getattr(sink, "name", sink))
            self._done.set()

    def _stamp(self, batch: list[dict]) -> None:
        seq = self.last_seq
        prev = self.last_hash
        for event in batch:
            seq += 1
            event["seq"] = seq
            event["prev_hash"] = prev
            prev = event["hash"] = chain_hash(event)
        self.last_seq = seq
        self.last_hash = prev

    async def _write(self, batch: list[dict]) -> None:
        for sink in self.sinks:
            try:
                await sink.write_batch(batch)
            except trio.Cancelled:
                raise
            except Exception:
                self.sink_failures += 1
                log.exception("audit sink %s failed to write %d events", getattr(sink, "name", sink), len(batch))
        self.written += len(batch)

    async def aclose(self) -> None:
        """Stop accepting events, let the drain task write what is queued, close sinks."""
        await self._send.aclose()
        await self._done.wait()


class SessionAudit:
    """One session's view of the recorder: binds the common fields at emit time."""

    __slots__ = ("recorder", "session", "_pending")

    def __init__(self, recorder: AuditRecorder, session: Any) -> None:
        self.recorder = recorder
        self.session = session
        self._pending: list[dict] = []

    def base(self, kind: str) -> dict:
        s = self.session
        ident = s.identity
        event = {
            "event": kind,
            "code": ev.CODES.get(kind, ""),
            "uid": ev.new_event_id(),
            "time": ev.now_iso(),
            "sid": s.id,
            "user": ident.user,
            "roles": list(ident.roles),
            "auth_method": ident.method,
            "db_protocol": s.protocol,
            "listener": s.listener,
            "db_name": s.db_name,
            "db_user": s.db_user,
            "db_uri": s.backend_addr,
            "addr.remote": s.client_addr,
        }
        if ident.token_id:
            event["token_id"] = ident.token_id
        if s.route_name:
            event["route"] = s.route_name
        return event

    def emit(self, kind: str, **fields: Any) -> dict:
        event = self.base(kind)
        event.update(fields)
        if self._pending or not self.recorder.submit_nowait(event):
            self._pending.append(event)
        return event

    async def flush(self) -> None:
        if self._pending:
            pending, self._pending = self._pending, []
            for event in pending:
                await self.recorder.submit(event)

    # -- the four hooks every engine uses -----------------------------------
    def on_session_start(self, *, success: bool, error: str | None = None, **fields: Any) -> dict:
        if success:
            self.session.started = True
        return self.emit(ev.SESSION_START, success=success, error=error, **fields)

    def on_query(self, query: str, *, parameters: list | None = None, **fields: Any) -> dict:
        event_fields: dict[str, Any] = {"db_query": ev.truncate(query)}
        if parameters is not None:
            event_fields["db_query_parameters"] = parameters
        event_fields.update(fields)
        return self.emit(ev.QUERY, **event_fields)

    def on_result(self, *, success: bool, **fields: Any) -> dict:
        return self.emit(ev.RESULT, success=success, **fields)

    def on_session_end(self, **fields: Any) -> dict:
        return self.emit(ev.SESSION_END, **fields)
