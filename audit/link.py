"""The proxy's side of the audit worker: events and tapped session bytes go to another process.

Strategy: the event loop that moves the sessions' bytes should do as little
audit work as it can, because every microsecond it spends is a microsecond
of latency for every session.  So the audit trail is written by a separate
process, ``python -m audit.worker`` (one per proxy, started and watched by
``AuditLink.run``), which owns the ``AuditRecorder`` and the sinks: the
stamping, the hash chain, the files and the SIEM connections.  What crosses
over, through the worker's stdin, in order:

    E  one event body (``SessionAudit.emit`` serialised it: JSON, no chain fields);
       with a slot: the session's end event, which closes that tap (the worker
       adds the tap's counts)
    O  a tap opens: slot, protocol, the session's common fields
    T  a tap's bytes: slot, direction (0 client→backend, 1 backend→client), and
       the proxy's time (its events are stamped with it, not the worker's time)
    C  a tap closes without an end event: slot
    R  (first, to a new worker) the sessions' ``session_seq`` counters at the last ack
    F  a session ended without an end event (never started): drop its counter
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

Framing (``FRAME``): kind byte, payload length, slot, direction, time; then
the payload.  Frames gather in a list for ``link_delay`` and go out in one
write with the first frame queued after that (at most ``2 * link_delay``
when none comes: a timer of its own would cost a wake-up per write).
Backpressure, never loss: past ``capacity_bytes`` queued or not yet acked,
``submit_nowait`` refuses (the session holds the event and its pump waits in
``flush``) and ``tap`` reports congestion (the pump waits after its send).
When the worker cannot write (fail_closed sink full) it says so on its
stdout (``{"accepting": false}``); the link then refuses new sessions and
ends running ones, like the in-process recorder.  The worker also
reports its statistics (``{"stats": ...}``: its queue, its sinks' spools and
delivery lag) once a second when they changed; the link keeps the last
(``worker_stats``) for the proxy's metrics (``dbproxy.metrics``).

Acks and replay: every frame queued gets a number (``queued_mark``).  The
worker says ``{"ack": K, "seqs": {...}}`` once every event its first K input
frames produced is written by every sink (see ``audit.worker``); the link
forgets frames up to there (``durable_mark``) and keeps the sessions'
``session_seq`` counters the ack carries.  Written but not acked frames stay.
If the worker dies, the link logs it, ends running sessions (53000 on
PostgreSQL: their audit worker is gone) and starts a new worker, which
continues the chain from the sinks' tails and gets, before anything else:
the counters (``R``), the ``O`` frame of every tap still open whose ``O`` the
dead worker had acked (kept until the tap's end event is acked), then every
frame not acked, in order.  Nothing acknowledged to a client is lost; what
the dead worker wrote after its last ack is written again (at least once;
``audit verify`` counts the repeats).  Limits of a replayed tap: it starts
with fresh parser state, so a prepared statement parsed before the ack point
is unknown to the new worker (an Execute of it is audited as ``<unknown
portal …>``), and the end event's ``queries``/``errors`` count only the
frames the new worker parsed.

Several proxy processes (``"workers": N``, ``dbproxy.workers``): the
supervisor's link starts the one worker with ``listen`` (a Unix socket path,
``--listen``), and each proxy process's link has ``connect`` (that path)
instead of a process of its own: the same frames, acks and replay over the
socket.  When the connection ends the worker died (the supervisor's link
starts a new one): the link connects again and replays what was not acked,
as above.  Acks then carry every link's changed counters: a link keeps those
of its own sessions (``_own``).

Durability "ack": sessions are ``DurableSessionAudit``s, which note the
number of the newest frame they queued; a backend→client pump waits
(``wait_durable``) until ``durable_mark`` passes it before sending.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import struct
import subprocess
import sys
import time
import weakref
from typing import Any

import attrs
import orjson
import trio

from .recorder import RecorderStatistics, SessionAudit, open_session_audit, tell_running_sessions

log = logging.getLogger("dbproxy.audit.link")

FRAME = struct.Struct(">BIIBd")  # kind, payload length, slot, direction, the proxy's time (seconds, 0: none)
_pack = FRAME.pack
EVENT, OPEN, TAP, CLOSE, QUIT, COUNTERS, FORGET = b"E"[0], b"O"[0], b"T"[0], b"C"[0], b"Q"[0], b"R"[0], b"F"[0]
LINK_DELAY = 0.005  # seconds frames may gather before one write to the worker
DEFAULT_CAPACITY_BYTES = 64 * 1024 * 1024
RESTART_DELAY = 1.0
READY_TIMEOUT = 60.0
_HEADER = FRAME.size
_time = time.time


@attrs.frozen
class LinkStatistics:
    """The link's side of the audit, for the proxy's metrics: frames kept for the worker."""

    worker_up: bool
    worker_starts: int
    queued_frames: int  # not yet written to the worker
    unacked_frames: int  # queued or written, not yet acked (written by every sink)
    queued_bytes: int  # what the capacity counts: queued or not acked
    lag_seconds: float  # age of the oldest write the worker has not acked (0: all acked)
    replayed: int


@attrs.define(eq=False)
class AuditLink:
    """Implements what sessions and the server use of an ``AuditRecorder``
    (``session``, ``accepting``, ``submit_nowait``/``submit``, ``run``,
    ``aclose``, ``statistics``, ``wait_durable``) plus taps, with the recorder in the worker."""

    config_file: str
    capacity_bytes: int = DEFAULT_CAPACITY_BYTES
    python: str = sys.executable
    durable_sessions: bool = False  # durability "ack": sessions wait for acks before completions
    # Seconds frames gather before a write to the worker; 0 under durability "ack" (sessions wait
    # for acks: frames gather while the worker writes and syncs the previous batch).
    link_delay: float = LINK_DELAY
    # ``"workers": N``: the supervisor's link starts the worker listening on this Unix socket ...
    listen: str | None = None
    # ... and each proxy process's link connects to it instead of starting a worker.
    connect: str | None = None
    submitted: int = 0
    worker_starts: int = 0
    last_seq: int = 0
    replayed: int = 0  # frames handed again to a new worker (their first worker died before acking them)
    # Frame positions, counted over the link's life: every frame queued gets the next number;
    # frames before ``durable_mark`` are acked (written by the worker's sinks).
    queued_mark: int = 0
    durable_mark: int = 0
    _out: list = attrs.field(factory=list)  # header, payload, header, payload… not yet written
    _out_bytes: int = 0  # bytes queued or written and not acked: the budget
    _next_send: int = 0  # the number of _out's first frame
    _unacked: Any = None  # deque of [first frame number, parts, bytes]: written, not acked
    _opens: dict = attrs.field(factory=dict)  # slot -> (frame number, O payload) of taps not closed
    _closes: Any = None  # deque of (frame number, slot): end events that close a tap
    _counters: dict = attrs.field(factory=dict)  # sid -> session_seq at the ack point
    _base: int = 0  # the frame number of this worker's first frame after its replay prefix
    _prefix: int = 0  # frames of that prefix (R, O) the worker counts too
    _wake: Any = None
    # While the sender gathers (``_send_frames``): the trio time after which a queued
    # frame wakes it to write (0: any frame wakes it).
    _gather_until: float = 0.0
    _room: Any = None
    _acked: Any = None
    _live: Any = None
    _slots: Any = None
    _closed: bool = False
    _accepting: bool = False
    _done: Any = None
    _connect_tries: int = 0
    pid: int | None = None
    worker_up: bool = False  # a worker said ready and has not exited (dbproxy.metrics, /readyz)
    # The worker's own statistics (its recorder's queue, its sinks' spools and lag), as it last
    # reported them ({"stats": ...} every STATS_INTERVAL seconds).
    worker_stats: dict = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        self._room = trio.lowlevel.ParkingLot()
        self._acked = trio.lowlevel.ParkingLot()
        self._live = weakref.WeakSet()
        self._slots = itertools.count(1)
        self._done = trio.Event()
        self._unacked = collections.deque()
        self._closes = collections.deque()

    # -- what sessions use ------------------------------------------------------------
    def session(self, session: Any, *, durable: bool | None = None) -> SessionAudit:
        return open_session_audit(self, session, durable)

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def congested(self) -> bool:
        return self._out_bytes >= self.capacity_bytes

    def _put(self, kind: int, slot: int, direction: int, payload: bytes, when: float = 0.0) -> None:
        out = self._out
        out.append(_pack(kind, len(payload), slot, direction, when))
        out.append(payload)
        self._out_bytes += len(payload) + _HEADER
        self.queued_mark += 1
        wake = self._wake
        if wake is not None and (not self._gather_until or trio.current_time() >= self._gather_until):
            self._wake = None
            wake.set()

    def submit_nowait(self, body: bytes, slot: int = 0) -> bool:
        """Queue an event body; ``slot``: the session's end event, closing its tap."""
        if self._closed:
            log.error("audit event after the audit link closed: %.120s", body)
            return True
        if self._out_bytes >= self.capacity_bytes:
            return False
        if slot:
            self._closes.append((self.queued_mark, slot))
        self._put(EVENT, slot, 0, body)
        self.submitted += 1
        return True

    async def submit(self, body: bytes, slot: int = 0) -> None:
        while not self.submit_nowait(body, slot):
            await self._room.park()

    async def wait_room(self) -> None:
        while self._out_bytes >= self.capacity_bytes and not self._closed:
            await self._room.park()

    async def wait_durable(self, mark: int) -> None:
        """Wait until the worker acked every frame before ``mark`` (a ``queued_mark``)."""
        while self.durable_mark < mark and not self._done.is_set():
            await self._acked.park()

    def forget_session(self, sid: str) -> None:
        self._put(FORGET, 0, 0, sid.encode())

    def tap_open(self, tap: str, template: dict, params: dict | None = None) -> int:
        """A tap opens: ``tap`` names its worker-side class (``module:Class``), built there as
        ``Class(audit, **params)``."""
        slot = next(self._slots)
        spec = {"tap": tap, "template": template}
        if params:
            spec["params"] = params
        payload = orjson.dumps(spec)
        # Kept until the tap closes: a new worker needs it if the old one acked it and died.
        self._opens[slot] = (self.queued_mark, payload)
        self._put(OPEN, slot, 0, payload)
        return slot

    def tap(self, slot: int, direction: int, data: bytes) -> bool:
        """Queue a tap's bytes; True when the link is over budget (the caller should wait for room)."""
        self._put(TAP, slot, direction, data, _time())
        return self._out_bytes >= self.capacity_bytes

    def tap_close(self, slot: int) -> None:
        """Close a tap with no end event to come (``SessionAudit`` closes it with its end event)."""
        self._closes.append((self.queued_mark, slot))
        self._put(CLOSE, slot, 0, b"")

    def statistics(self) -> RecorderStatistics:
        """The worker's recorder as it last reported (``worker_stats``; sinks as dicts), with this side's queue."""
        worker = self.worker_stats
        return RecorderStatistics(
            submitted=self.submitted, written=worker.get("written", 0), sink_failures=worker.get("sink_failures", 0),
            queued=len(self._out) // 2, last_seq=self.last_seq, accepting=self._accepting,
            sinks=tuple(worker.get("sinks", ())),
        )

    def link_statistics(self) -> LinkStatistics:
        unacked = self._unacked
        return LinkStatistics(
            worker_up=self.worker_up, worker_starts=self.worker_starts, queued_frames=len(self._out) // 2,
            unacked_frames=self.queued_mark - self.durable_mark, queued_bytes=self._out_bytes,
            lag_seconds=max(0.0, trio.current_time() - unacked[0][3]) if unacked else 0.0, replayed=self.replayed,
        )

    # -- acks ---------------------------------------------------------------------------
    def _on_ack(self, message: dict) -> None:
        """The worker wrote everything its first ``ack`` frames produced: forget those frames."""
        seqs = message.get("seqs")
        if seqs:
            counters = self._counters
            if self.connect is not None:
                seqs = self._own(seqs)
            for sid, n in seqs.items():
                if n:
                    counters[sid] = n
                else:
                    counters.pop(sid, None)  # the session's end event is written
        acked = self._base + int(message["ack"]) - self._prefix
        if acked <= self.durable_mark:
            return
        self.durable_mark = acked
        unacked = self._unacked
        while unacked:
            chunk = unacked[0]
            first, parts = chunk[0], chunk[1]
            n = len(parts) // 2
            if first + n <= acked:
                unacked.popleft()
                self._out_bytes -= chunk[2]
                continue
            if first < acked:
                drop = 2 * (acked - first)
                size = sum(len(p) for p in parts[1:drop:2]) + _HEADER * (drop // 2)
                del parts[:drop]
                chunk[0] = acked
                chunk[2] -= size
                self._out_bytes -= size
            break
        closes = self._closes
        while closes and closes[0][0] < acked:
            self._opens.pop(closes.popleft()[1], None)
        if self._room:
            self._room.unpark_all()
        if self._acked:
            self._acked.unpark_all()

    def _own(self, seqs: dict) -> dict:
        """The counters of this process's sessions (a shared worker's acks carry every link's)."""
        mine = {audit.session.id for audit in list(self._live)}
        return {sid: n for sid, n in seqs.items() if sid in mine or sid in self._counters}

    def _replay_prefix(self) -> list:
        """For a new worker: the session counters, the O frames of open taps it has not
        seen again (acked by a dead worker), then every frame not acked goes again."""
        parts: list = []
        if self._counters:
            payload = orjson.dumps(self._counters)
            parts += [_pack(COUNTERS, len(payload), 0, 0, 0.0), payload]
        for slot, (number, payload) in self._opens.items():
            if number < self.durable_mark:
                parts += [_pack(OPEN, len(payload), slot, 0, 0.0), payload]
        if self._unacked:
            again = [p for chunk in self._unacked for p in chunk[1]]
            self.replayed += len(again) // 2
            self._out[0:0] = again
            self._unacked.clear()
            self._next_send = self.durable_mark
        return parts

    # -- the worker ---------------------------------------------------------------------
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        failures_while_closing = 0
        try:
            while True:
                if self.connect is not None:
                    proc = await self._connect(task_status)
                    if proc is None:
                        continue
                    if proc is False:
                        return
                else:
                    proc = await trio.lowlevel.open_process(
                        [self.python, "-m", "dbproxy.audit.worker", os.path.abspath(self.config_file),
                         logging.getLevelName(logging.getLogger().getEffectiveLevel()),
                         *(("--listen", self.listen) if self.listen else ())],
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
                        log.error("audit worker keeps failing while the proxy stops: %d frames not written",
                                  len(self._out) // 2 + sum(len(c[1]) // 2 for c in self._unacked))
                        return
                if self.connect is not None:
                    log.error("the shared audit worker's link ended; connecting again")
                else:
                    log.error("audit worker (pid %s) died with status %s; starting a new one", proc.pid, proc.returncode)
                self._set_accepting(False, "the audit worker died")
                await trio.sleep(RESTART_DELAY)
        finally:
            self._closed = True
            self._room.unpark_all()
            self._done.set()
            self._acked.unpark_all()

    async def _connect(self, task_status: Any) -> Any:
        """The shared audit worker's socket (``connect``); None after a failed try (retried).  The
        first connection may wait for the supervisor's worker to start."""
        try:
            stream = await trio.open_unix_socket(self.connect)
        except OSError as exc:
            if task_status is not trio.TASK_STATUS_IGNORED and self.worker_starts == 0:
                self._connect_tries += 1
                if self._connect_tries * 0.1 > READY_TIMEOUT:
                    raise RuntimeError(f"the audit worker's socket {self.connect}: {exc}") from None
                await trio.sleep(0.1)
                return None
            log.warning("audit worker socket %s: %s; trying again", self.connect, exc.strerror or exc)
            if self._closed:
                log.error("the audit worker is gone while the proxy stops: %d frames not written", len(self._out) // 2)
                return False
            await trio.sleep(RESTART_DELAY / 4)
            return None
        return _Connection(stream)

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
        prefix = self._replay_prefix()
        self._prefix = len(prefix) // 2
        self._base = self._next_send
        if self.replayed:
            log.warning("audit worker (pid %s): handing it %d frames its predecessor had not acked",
                        proc.pid, len(self._out) // 2)
        self._set_accepting(bool(hello.get("accepting", True)), "")
        self.worker_up = True
        task_status.started()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._send_frames, proc.stdin, prefix)
            while True:
                message = await lines.next()
                if message is None:
                    break
                if "ack" in message:
                    self._on_ack(message)
                if "accepting" in message:
                    self._set_accepting(bool(message["accepting"]), "a fail_closed sink can take no more events")
                if "stats" in message:
                    self.worker_stats = message["stats"]
            nursery.cancel_scope.cancel()
        self.worker_up = False
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

    async def _send_frames(self, stdin: trio.abc.SendStream, prefix: list) -> None:
        try:
            if prefix:
                await stdin.send_all(b"".join(prefix))
            while True:
                if not self._out:
                    if self._closed:
                        await stdin.send_all(_pack(QUIT, 0, 0, 0, 0.0))
                        break
                    self._wake = trio.Event()
                    await self._wake.wait()
                    continue
                if self.link_delay and not self._closed:
                    # Gather for ``link_delay``: the write goes out with the first frame queued
                    # after that (while sessions are busy, the loop is awake anyway), or after
                    # twice that when no frame comes.  Not a plain sleep: its timer would wake
                    # the loop ``1 / link_delay`` times a second under load, and on a VM a
                    # wake-up costs more CPU than the write (scripts/bench/README.md, "cql").
                    self._gather_until = trio.current_time() + self.link_delay
                    self._wake = trio.Event()
                    with trio.move_on_after(2 * self.link_delay):
                        await self._wake.wait()
                    self._wake = None
                    self._gather_until = 0.0
                parts = self._out
                self._out = []
                size = sum(len(p) for p in parts[1::2]) + _HEADER * (len(parts) // 2)
                # Kept until acked: if this worker dies first, the next one gets them again.
                # (The write's time: the audit lag is the age of the oldest unacked write.)
                self._unacked.append([self._next_send, parts, size, trio.current_time()])
                self._next_send += len(parts) // 2
                await stdin.send_all(b"".join(parts))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the worker is gone; what it did not ack goes to the next one
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


class _SendSide:
    """A socket link's sending half: ``aclose`` half-closes, so the worker's answers still come."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream

    async def send_all(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def aclose(self) -> None:
        try:
            await self.stream.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass


class _Connection:
    """A connection to the shared audit worker, shaped like the worker process ``run`` starts."""

    pid = None
    returncode = 0

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stdout = stream
        self.stdin = _SendSide(stream)

    async def wait(self) -> None:
        await trio.aclose_forcefully(self.stdout)

    def kill(self) -> None:
        self.stdout.socket.close()


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
