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

The chain survives restarts: before draining, ``run`` asks every durable
sink for the last link it holds (``recover_tail``: the JSONL file's last
line, a spool's newest record) and continues from the highest ``seq``, so
a trail spanning restarts verifies end to end.

Network sinks run a sender task each (``sink.run``) in the recorder's own
nursery; ``write_batch`` only appends to their disk spool.  When a
fail-closed sink's spool is full it reports ``blocked``: the recorder is then
not ``accepting`` — the server refuses new sessions, and running ones are
told: the recorder puts a marker in their pending lists (pipelines only
call ``flush`` when something is pending), and ``flush`` ends the session
with ``AuditUnavailable`` once its events are handed over — nothing is lost,
the trail just stops growing.  A drop-oldest sink reports its
losses instead; the recorder writes an ``audit.loss`` event for each.
"""

from __future__ import annotations

import hashlib
import logging
import weakref
from typing import Any, Protocol

import attrs
import orjson
import trio

from dbproxy.errors import ProtocolError

from . import events as ev

log = logging.getLogger("dbproxy.audit")

GENESIS_HASH = "0" * 64
MAX_BATCH = 1024
# How long the drain task lets events gather before writing a batch (seconds).
BATCH_DELAY = 0.005
LOSS_EVENT_ROOM = 2048  # bytes a spool keeps free for one audit.loss event


AUDIT_UNAVAILABLE = "audit unavailable: the audit trail cannot be written, so the proxy accepts no sessions"


class AuditUnavailable(ProtocolError):
    """Fail-closed: a sink can take no more events, so sessions must end.

    A ``ProtocolError`` so the session pipeline renders ``client_hint`` in
    the client's own wire format; ``sqlstate`` is for engines that map it
    (PostgreSQL class 53, insufficient resources).
    """

    sqlstate = "53000"

    def __init__(self, message: str = AUDIT_UNAVAILABLE) -> None:
        super().__init__(message, client_hint=message)


class Sink(Protocol):
    """What the recorder needs of a sink; the rest is optional (looked up with getattr):
    ``run(task_status=...)`` a background task, ``wait_idle()`` delivery of what is written,
    ``recover_tail() -> (seq, hash) | None``, ``blocked``, ``take_losses()``, ``statistics()``."""

    name: str

    async def write_batch(self, batch: list[dict]) -> None: ...

    async def aclose(self) -> None: ...


def chain_hash(event: dict) -> str:
    """SHA-256 over the canonical JSON of ``event`` minus its ``hash`` field."""
    if "hash" in event:
        event = {k: v for k, v in event.items() if k != "hash"}
    return hashlib.sha256(orjson.dumps(event, option=orjson.OPT_SORT_KEYS)).hexdigest()


class StampedBatch(list):
    """A batch of stamped events plus each event's JSON line, serialised once.

    ``lines[i]`` is the canonical (sorted-key) JSON of ``self[i]`` with its
    ``hash`` appended as the last member: exactly what ``chain_hash``
    recomputes from the parsed line, so a sink may write it as is.
    """

    __slots__ = ("lines",)


@attrs.frozen
class RecorderStatistics:
    submitted: int
    written: int
    sink_failures: int
    queued: int
    last_seq: int
    dropped: int = 0
    accepting: bool = True
    sinks: tuple = ()


@attrs.define(eq=False)
class AuditRecorder:
    sinks: list
    capacity: int = 10_000
    last_seq: int = 0
    last_hash: str = GENESIS_HASH
    submitted: int = 0
    written: int = 0
    sink_failures: int = 0
    dropped: int = 0
    _send: Any = None
    _receive: Any = None
    _done: Any = None
    _live: Any = None
    _was_accepting: bool = True

    def __attrs_post_init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel(self.capacity)
        self._done = trio.Event()
        self._live = weakref.WeakSet()  # every SessionAudit, to tell them when fail-closed engages

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
        audit = SessionAudit(self, session)
        self._live.add(audit)
        return audit

    @property
    def accepting(self) -> bool:
        """False while a fail-closed sink cannot take events: no new sessions, running ones end."""
        return not any(getattr(sink, "blocked", False) for sink in self.sinks)

    def statistics(self) -> RecorderStatistics:
        return RecorderStatistics(
            submitted=self.submitted,
            written=self.written,
            sink_failures=self.sink_failures,
            queued=self._receive.statistics().current_buffer_used,
            last_seq=self.last_seq,
            dropped=self.dropped,
            accepting=self.accepting,
            sinks=tuple(s.statistics() for s in self.sinks if hasattr(s, "statistics")),
        )

    # -- the drain task ----------------------------------------------------
    def recover_chain(self) -> None:
        """Continue the chain from the newest link any sink holds on disk."""
        best: tuple[int, str] | None = None
        for sink in self.sinks:
            recover = getattr(sink, "recover_tail", None)
            if recover is None:
                continue
            try:
                tail = recover()
            except Exception:
                log.exception("audit sink %s: cannot read its last event; ignoring it for chain recovery", sink.name)
                continue
            if tail is not None and (best is None or tail[0] > best[0]):
                best = tail
        if best is not None and best[0] > self.last_seq:
            self.last_seq, self.last_hash = best
            log.info("audit chain continues after seq %d", self.last_seq)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await trio.to_thread.run_sync(self.recover_chain)
            async with trio.open_nursery() as nursery:
                for sink in self.sinks:
                    if hasattr(sink, "run"):
                        await nursery.start(sink.run)
                task_status.started()
                await self._drain()
                await self._flush_sinks()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                for sink in self.sinks:
                    try:
                        await sink.aclose()
                    except Exception:
                        log.exception("audit sink %s failed to close", getattr(sink, "name", sink))
            self._done.set()

    async def _drain(self) -> None:
        async with self._receive:
            while True:
                try:
                    first = await self._receive.receive()
                except trio.EndOfChannel:
                    return
                if BATCH_DELAY and self._receive.statistics().current_buffer_used < MAX_BATCH:
                    # Let a batch gather: one wake-up and one sink write per few
                    # milliseconds instead of one per event.  While the drain task
                    # sleeps, emitting an event wakes nobody.
                    await trio.sleep(BATCH_DELAY)
                batch = [first]
                while len(batch) < MAX_BATCH:
                    try:
                        batch.append(self._receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                await self._write(self._stamp(batch))
                self._check_accepting()
                losses = [loss for sink in self.sinks if hasattr(sink, "take_losses") for loss in sink.take_losses()]
                if losses:
                    await self._write_losses(losses)

    def _check_accepting(self) -> None:
        accepting = self.accepting
        if self._was_accepting and not accepting:
            running = [a for a in list(self._live) if a.session.started and not a._ended]
            log.error("audit unavailable (fail_closed): ending %d running sessions, refusing new ones", len(running))
            for audit in running:
                audit.tell_unavailable()
        elif accepting and not self._was_accepting:
            log.warning("audit available again: accepting sessions")
        self._was_accepting = accepting

    async def _flush_sinks(self) -> None:
        """On shutdown, give each network sink its grace time to deliver its spool (it stays on disk anyway)."""
        async with trio.open_nursery() as nursery:
            for sink in self.sinks:
                if hasattr(sink, "wait_idle"):

                    async def flush(sink: Any = sink) -> None:
                        with trio.move_on_after(getattr(sink, "shutdown_flush_seconds", 5.0)) as scope:
                            await sink.wait_idle()
                        if scope.cancelled_caught:
                            log.warning("audit sink %s: undelivered events stay in the spool for the next start", sink.name)

                    nursery.start_soon(flush)

    async def _write_losses(self, losses: list) -> None:
        # Make room first: a drop caused by writing a loss event would need a loss event of its own.
        for sink in self.sinks:
            if hasattr(sink, "reserve"):
                await sink.reserve(LOSS_EVENT_ROOM * len(self.sinks))
        losses = losses + [loss for sink in self.sinks if hasattr(sink, "take_losses") for loss in sink.take_losses()]
        merged: dict[str, list] = {}
        for loss in losses:
            m = merged.setdefault(loss.sink, [0, loss.first_seq, loss.last_seq, 0])
            m[0] += loss.dropped
            m[1] = min(m[1], loss.first_seq)
            m[2] = max(m[2], loss.last_seq)
            m[3] = max(m[3], loss.dropped_total)
        events = []
        for sink_name, (dropped, first, last, total) in merged.items():
            self.dropped += dropped
            events.append(
                {
                    "event": ev.AUDIT_LOSS,
                    "code": ev.CODES[ev.AUDIT_LOSS],
                    "uid": ev.new_event_id(),
                    "time": ev.now_iso(),
                    "sink": sink_name,
                    "reason": "spool full (drop_oldest)",
                    "dropped": dropped,
                    "dropped_first_seq": first,
                    "dropped_last_seq": last,
                    "dropped_total": total,
                }
            )
        await self._write(self._stamp(events))

    def _stamp(self, batch: list[dict]) -> StampedBatch:
        seq = self.last_seq
        prev = self.last_hash
        dumps = orjson.dumps
        sort = orjson.OPT_SORT_KEYS
        sha256 = hashlib.sha256
        lines = []
        for event in batch:
            seq += 1
            event["seq"] = seq
            event["prev_hash"] = prev
            event.pop("hash", None)
            body = dumps(event, option=sort)
            prev = event["hash"] = sha256(body).hexdigest()
            # Valid JSON whose canonical form minus "hash" is ``body`` again.
            lines.append(body[:-1] + b',"hash":"' + prev.encode() + b'"}\n')
        self.last_seq = seq
        self.last_hash = prev
        stamped = StampedBatch(batch)
        stamped.lines = lines
        return stamped

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


# Put in a session's pending list to make its pipeline call ``flush`` (it only does when
# something is pending), which then raises AuditUnavailable.
_UNAVAILABLE = {"event": "<audit unavailable marker>"}


class SessionAudit:
    """One session's view of the recorder: binds the common fields at emit time."""

    __slots__ = ("recorder", "session", "_pending", "_ended", "_told", "_template", "_key", "__weakref__")

    def __init__(self, recorder: AuditRecorder, session: Any) -> None:
        self.recorder = recorder
        self.session = session
        self._pending: list[dict] = []
        self._ended = False
        self._told = False
        self._template: dict = {}
        self._key: tuple | None = None

    def base(self, kind: str) -> dict:
        s = self.session
        # The session-constant fields are built once and copied per event; they
        # are rebuilt when the session learns who it is or where it goes.
        key = (s.identity, s.db_name, s.db_user, s.backend_addr, s.route_name)
        if key != self._key:
            ident = s.identity
            template = {
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
                template["token_id"] = ident.token_id
            if s.route_name:
                template["route"] = s.route_name
            self._template = template
            self._key = key
        event = {"event": kind, "code": ev.CODES.get(kind, ""), "uid": ev.new_event_id(), "time": ev.now_iso()}
        event.update(self._template)
        return event

    def emit(self, kind: str, **fields: Any) -> dict:
        event = self.base(kind)
        event.update(fields)
        if self._pending or not self.recorder.submit_nowait(event):
            self._pending.append(event)
        return event

    async def flush(self) -> None:
        """Hand over held events (waiting for room); then, if the audit trail is
        unavailable (fail-closed), end the running session with ``AuditUnavailable``."""
        told = False
        if self._pending:
            pending, self._pending = self._pending, []
            for event in pending:
                if event is _UNAVAILABLE:
                    told = True
                    continue
                await self.recorder.submit(event)
        if (told or not self.recorder.accepting) and self.session.started and not self._ended and not self._told:
            self._told = True
            raise AuditUnavailable()

    def tell_unavailable(self) -> None:
        """Called by the recorder: make the session's next ``flush`` raise ``AuditUnavailable``."""
        if not self._told:
            self._pending.append(_UNAVAILABLE)

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
        self._ended = True
        return self.emit(ev.SESSION_END, **fields)
