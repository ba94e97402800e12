"""The proxy's side of the audit worker: events and tapped session bytes go to another process.

Strategy: the event loop that moves the sessions' bytes should do as little
audit work as it can, because every microsecond it spends is a microsecond
of latency for every session.  So the audit trail is written by a separate
process, ``python -m audit.worker`` (one per proxy, started and watched by
``AuditLink.run``), which owns the ``AuditRecorder`` and the sinks: the
stamping, the hash chain, the files and the SIEM connections.  What crosses
over, through the worker's stdin, in order:

    E  one event body (``SessionAudit.emit`` serialised it: JSON, no chain fields)
    O  a tap opens: slot, protocol, the session's common fields
    T  a tap's bytes: slot, direction (0 client→backend, 1 backend→client)
    C  a tap closes: slot
    Q  the proxy stops: deliver what you can, then exit (end of input without
       it means the proxy died: the worker writes what it got to the sinks and
       their spools and exits at once)

A *tap* is how an engine whose pipeline only observes (PostgreSQL without
statement rules) has its protocol parsed and audited: the session's pumps
only frame the bytes (size limits, the client's Terminate) and hand the
frames the audit reads to the tap, *before* sending them, so the worker sees
a query before its answer.  The worker runs the engine's own decoders and audit
stages on them (``engines.<name>.tap``).  One stream keeps everything in
the order the proxy saw it: a session's start event, its queries and
results, its end.

Framing (``FRAME``): kind byte, payload length, slot, direction; then the
payload.  Frames gather in a list for up to ``LINK_DELAY`` and go out in one
write.  Backpressure, never loss: past ``capacity_bytes`` queued,
``submit_nowait`` refuses (the session holds the event and its pump waits in
``flush``) and ``tap`` reports congestion (the pump waits after its send).
When the worker cannot write (fail_closed sink full) it says so on its
stdout (``{"accepting": false}``); the link then refuses new sessions and
ends running ones, like the in-process recorder.  If the worker dies, the
link logs it, ends running sessions (their audit is gone with the worker),
and starts a new worker, which continues the chain from the sinks' tails;
frames not yet written to the dead worker go to the new one.
"""

from __future__ import annotations

import itertools
import logging
import os
import struct
import subprocess
import sys
import weakref
from typing import Any

import attrs
import orjson
import trio

from .recorder import RecorderStatistics, SessionAudit, tell_running_sessions

log = logging.getLogger("dbproxy.audit.link")

FRAME = struct.Struct(">BIIB")  # kind, payload length, slot, direction
_pack = FRAME.pack
EVENT, OPEN, TAP, CLOSE, QUIT = b"E"[0], b"O"[0], b"T"[0], b"C"[0], b"Q"[0]
LINK_DELAY = 0.005  # seconds frames may gather before one write to the worker
DEFAULT_CAPACITY_BYTES = 64 * 1024 * 1024
RESTART_DELAY = 1.0
READY_TIMEOUT = 60.0


@attrs.define(eq=False)
class AuditLink:
    """Implements what sessions and the server use of an ``AuditRecorder``
    (``session``, ``accepting``, ``submit_nowait``/``submit``, ``run``,
    ``aclose``, ``statistics``) plus taps, with the recorder in the worker."""

    config_file: str
    capacity_bytes: int = DEFAULT_CAPACITY_BYTES
    python: str = sys.executable
    submitted: int = 0
    worker_starts: int = 0
    last_seq: int = 0
    _out: list = attrs.field(factory=list)
    _out_bytes: int = 0
    _wake: Any = None
    _room: Any = None
    _live: Any = None
    _slots: Any = None
    _closed: bool = False
    _accepting: bool = False
    _done: Any = None
    pid: int | None = None

    def __attrs_post_init__(self) -> None:
        self._room = trio.lowlevel.ParkingLot()
        self._live = weakref.WeakSet()
        self._slots = itertools.count(1)
        self._done = trio.Event()

    # -- what sessions use ------------------------------------------------------------
    def session(self, session: Any) -> SessionAudit:
        audit = SessionAudit(self, session)
        self._live.add(audit)
        return audit

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def congested(self) -> bool:
        return self._out_bytes >= self.capacity_bytes

    def _put(self, kind: int, slot: int, direction: int, payload: bytes) -> None:
        out = self._out
        out.append(_pack(kind, len(payload), slot, direction))
        out.append(payload)
        self._out_bytes += len(payload) + 10
        wake = self._wake
        if wake is not None:
            self._wake = None
            wake.set()

    def submit_nowait(self, body: bytes) -> bool:
        if self._closed:
            log.error("audit event after the audit link closed: %.120s", body)
            return True
        if self._out_bytes >= self.capacity_bytes:
            return False
        self._put(EVENT, 0, 0, body)
        self.submitted += 1
        return True

    async def submit(self, body: bytes) -> None:
        while not self.submit_nowait(body):
            await self._room.park()

    async def wait_room(self) -> None:
        while self._out_bytes >= self.capacity_bytes and not self._closed:
            await self._room.park()

    def tap_open(self, protocol: str, template: dict) -> int:
        slot = next(self._slots)
        self._put(OPEN, slot, 0, orjson.dumps({"protocol": protocol, "template": template}))
        return slot

    def tap(self, slot: int, direction: int, data: bytes) -> bool:
        """Queue a tap's bytes; True when the link is over budget (the caller should wait for room)."""
        self._put(TAP, slot, direction, data)
        return self._out_bytes >= self.capacity_bytes

    def tap_close(self, slot: int) -> None:
        self._put(CLOSE, slot, 0, b"")

    def statistics(self) -> RecorderStatistics:
        return RecorderStatistics(
            submitted=self.submitted, written=0, sink_failures=0, queued=len(self._out) // 2,
            last_seq=self.last_seq, accepting=self._accepting,
        )

    # -- the worker ---------------------------------------------------------------------
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        failures_while_closing = 0
        try:
            while True:
                proc = await trio.lowlevel.open_process(
                    [self.python, "-m", "audit.worker", os.path.abspath(self.config_file),
                     logging.getLevelName(logging.getLogger().getEffectiveLevel())],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                )
                self.pid = proc.pid
                self.worker_starts += 1
                clean = await self._serve_worker(proc, task_status)
                task_status = trio.TASK_STATUS_IGNORED
                if clean:
                    return
                if self._closed:
                    failures_while_closing += 1
                    if failures_while_closing > 2:
                        log.error("audit worker keeps failing while the proxy stops: %d frames not written", len(self._out) // 2)
                        return
                log.error("audit worker (pid %s) died with status %s; starting a new one", proc.pid, proc.returncode)
                self._set_accepting(False, "the audit worker died")
                await trio.sleep(RESTART_DELAY)
        finally:
            self._closed = True
            self._room.unpark_all()
            self._done.set()

    async def _serve_worker(self, proc: trio.Process, task_status: Any) -> bool:
        """Run one worker until it exits; True when it exited because the link closed."""
        lines = _LineReader(proc.stdout)
        try:
            with trio.fail_after(READY_TIMEOUT):
                hello = await lines.next()
        except trio.TooSlowError:
            proc.kill()
            await proc.wait()
            raise RuntimeError("the audit worker did not start") from None
        if hello is None or not hello.get("ready"):
            await proc.wait()
            raise RuntimeError(f"the audit worker failed to start (status {proc.returncode}); see its log above")
        self.last_seq = hello.get("last_seq", 0)
        self._set_accepting(bool(hello.get("accepting", True)), "")
        task_status.started()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._send_frames, proc.stdin)
            while True:
                message = await lines.next()
                if message is None:
                    break
                if "accepting" in message:
                    self._set_accepting(bool(message["accepting"]), "a fail_closed sink can take no more events")
            nursery.cancel_scope.cancel()
        with trio.CancelScope(shield=True):
            await proc.wait()
        return self._closed and not self._out and proc.returncode == 0

    def _set_accepting(self, accepting: bool, why: str) -> None:
        if accepting == self._accepting:
            return
        self._accepting = accepting
        if not accepting and why:
            tell_running_sessions(self._live, why)
        elif accepting and self.worker_starts > 0 and why:
            log.warning("audit available again: accepting sessions")

    async def _send_frames(self, stdin: trio.abc.SendStream) -> None:
        try:
            while True:
                if not self._out:
                    if self._closed:
                        await stdin.send_all(FRAME.pack(QUIT, 0, 0, 0))
                        break
                    self._wake = trio.Event()
                    await self._wake.wait()
                    continue
                if LINK_DELAY and not self._closed:
                    await trio.sleep(LINK_DELAY)
                data = b"".join(self._out)
                self._out.clear()
                self._out_bytes = 0
                if self._room:
                    self._room.unpark_all()
                try:
                    await stdin.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    # The worker is gone; what it did not take goes to the next one.
                    self._out.insert(0, data)
                    self._out_bytes += len(data)
                    return
        finally:
            with trio.CancelScope(shield=True):
                await stdin.aclose()

    async def aclose(self) -> None:
        """No more events: the worker writes what it has, closes its sinks and exits."""
        self._closed = True
        wake = self._wake
        if wake is not None:
            self._wake = None
            wake.set()
        self._room.unpark_all()
        await self._done.wait()


class _LineReader:
    """JSON lines from the worker's stdout; None at end of stream."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def next(self) -> dict | None:
        while b"\n" not in self.buffer:
            try:
                data = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                data = b""
            if not data:
                return None
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        try:
            message = orjson.loads(line)
        except orjson.JSONDecodeError:
            log.warning("audit worker said something unexpected: %.200r", line)
            return {}
        return message if isinstance(message, dict) else {}
