"""The audit worker process: ``python -m audit.worker CONFIG_FILE [LOG_LEVEL]``.

Started by ``audit.link.AuditLink`` (see there for the design): reads
frames from stdin in order, hands event bodies to its ``AuditRecorder``
(the stamping, the hash chain, every sink of the config's ``audit``
section), and runs taps — the engine's decoders and audit stages over a
session's tapped frames (the ``Tap`` class each O frame names).  Says ``{"ready": true, ...}`` on
stdout once the sinks run and the chain is recovered, and
``{"accepting": ...}`` whenever a fail_closed sink blocks or recovers, and
``{"stats": ...}`` (``worker_statistics``: its queue, its sinks' spools and
delivery lag) once a second when they changed, for the proxy's /metrics.

A tap's counts (queries, errors) are added to that session's
``db.session.end`` event, which the proxy sends in the tap's slot: it closes
the tap.  Events of a tap's bytes carry the time the proxy saw them (the T
frame's time), not the time this process parsed them.

Acks (``{"ack": K, "seqs": {...}}`` on stdout): after each chunk read from
stdin the worker puts a checkpoint (frames read so far) in the recorder's
queue, behind the events those frames produced; when the recorder has
written the batch holding it to every sink (a JSONL ``write``, a spool's
committed append; with ``"durability": "ack"`` also fdatasync'd), the frames
are acked with the ``session_seq`` counters as of that point.  The proxy
keeps unacked frames and hands them to the next worker if this one dies.

Wake-ups, not frames, are what the worker costs at a few thousand operations
a second on a VM (scripts/bench/README.md, "cql"), so under durability
"async" it takes as few as it can: a batch is what one read brought (no
gathering timer of the recorder's own), reads are ``READ_DELAY`` apart (the
link's writes wait in the pipe meanwhile, the kernel's already), and an ack
goes out with a written batch once ``ACK_DELAY`` has passed, on a timer only
when the link went quiet.  Under durability "ack" the proxy's sessions wait
for the acks: none of these delays apply.

Several proxy processes, one chain (``"workers": N``, ``dbproxy.workers``):
with ``--listen PATH`` the worker also accepts links on a Unix socket, each
speaking exactly what stdin speaks (its own frame count, taps and acks; the
``ready`` line first).  Every link's events go into the one recorder, so
they are stamped into one chain in the order they arrive; ``session_seq``
stays per session (session ids are random, unique across processes).  A
checkpoint names its link (``Checkpoint.owner``); the ``session_seq``
counters changed before it are handed to every link (``Hub``) and each
proxy keeps those of its own sessions.  ``accepting`` and ``stats`` go to
every link.  A socket link that ends without ``Q`` is a proxy process that
died: its taps are closed, the others go on.  Stdin stays the supervisor's
link: its end ends the worker.

The worker ignores SIGINT/SIGTERM (a terminal's Ctrl-C reaches the whole
process group): the proxy stops it by closing its stdin, after which it
writes everything queued, closes its sinks and exits 0.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import signal
import sys
from typing import Any

import attrs
import orjson
import trio

from .link import CLOSE, COUNTERS, EVENT, FORGET, FRAME, OPEN, QUIT, TAP
from .recorder import AuditRecorder, TemplateAudit

log = logging.getLogger("dbproxy.audit.worker")

def tap_factory(path: str) -> Any:
    """The tap class an O frame names (``module:Class``, given by the engine's ``TapPlan``:
    ``SessionAudit.tap_open(Tap, params)``): ``Tap(audit, **params)`` with ``feed(direction, data)``
    and ``counts() -> dict`` (``audit.frametap.FrameTap``).  The worker learns its taps this way —
    it imports no engine by name."""
    factory = _TAP_FACTORIES.get(path)
    if factory is None:
        module, _, name = path.partition(":")
        factory = _TAP_FACTORIES[path] = getattr(importlib.import_module(module), name)
    return factory


_TAP_FACTORIES: dict[str, Any] = {}

class Hub:
    """The links of one audit worker (stdin, and with ``--listen`` the proxy processes' sockets):
    routes each written checkpoint to its link, and what concerns every link to each."""

    def __init__(self, recorder: AuditRecorder) -> None:
        self.recorder = recorder
        self.links: list[Worker] = []
        recorder.on_checkpoint = self.on_checkpoint
        recorder.track_changes()

    def add(self, out: Any) -> "Worker":
        worker = Worker(self.recorder, out, hub=self)
        self.links.append(worker)
        return worker

    def remove(self, worker: "Worker") -> None:
        if worker in self.links:
            self.links.remove(worker)

    def on_checkpoint(self, marks: list) -> None:
        links = self.links
        for mark in marks:
            owner = mark.owner
            if len(links) > 1:
                # Counters changed before this mark may be another link's sessions: every link
                # gets them with its own next ack (never ahead of that ack's input position).
                for other in links:
                    if other is not owner:
                        other._pending.update(mark.seqs)
            if owner is not None:
                owner.take_mark(mark)

    async def say_all(self, message: dict) -> None:
        for worker in list(self.links):
            await worker.say(message)


class Worker:
    def __init__(self, recorder: AuditRecorder, out: Any, hub: Hub | None = None) -> None:
        self.recorder = recorder
        self.out = out
        self.taps: dict[int, tuple[Any, TemplateAudit, str]] = {}
        self.frames = 0
        self.quit = False  # the proxy said it stops (else end of input means it died)
        # Acks: the input position every sink has written the events of, and the
        # session counters changed up to there (see ``on_checkpoint``).
        self.acked = 0
        self._seqs: dict = {}
        self._ack_wake = trio.Event()
        self._say_lock = trio.Lock()
        self.ack_delay = ACK_DELAY  # 0 under durability "ack": sessions wait for each ack
        self.read_delay = READ_DELAY  # 0 under durability "ack" (see ``read``)
        self._pending: dict = {}  # counters changed before other links' checkpoints, since our last
        if hub is None:
            recorder.on_checkpoint = self.on_checkpoint
            recorder.track_changes()

    def take_mark(self, mark: Any) -> None:
        """One of this link's checkpoints is written (``Hub``): what changed before it goes with the ack."""
        if self._pending:
            self._seqs.update(self._pending)
            self._pending = {}
        self._seqs.update(mark.seqs)
        self.acked = mark.frames
        self._ack_wake.set()

    def on_checkpoint(self, marks: list) -> None:
        """The recorder wrote a batch: the checkpoints it passed are durable input positions."""
        seqs = self._seqs
        for mark in marks:
            seqs.update(mark.seqs)
            self.acked = mark.frames
        self._ack_wake.set()

    async def send_acks(self) -> None:
        """``{"ack": K, "seqs": {sid: n}}``: every event the first K input frames produced is
        written by every sink; ``seqs`` the sessions' ``session_seq`` counters at that point
        that changed since the last ack (0: the session's end event is written), so the
        proxy can hand them to a new worker if this one dies."""
        said = 0
        last = -float("inf")  # when the last ack went out
        while True:
            await self._ack_wake.wait()
            self._ack_wake = trio.Event()
            if self.ack_delay:
                # Durability "async": an ack only frees the proxy's copy of the frames, so acks
                # are gathered (fewer lines to write and parse on both sides): at most one per
                # ``ack_delay``.  One that is not due yet waits for a later written batch, which
                # comes within a few ms while the link is busy, when this process is awake anyway;
                # a timer of its own would wake the process (and the proxy's loop) once more per
                # ack — on a VM, a process wake-up costs more CPU than writing a batch.  Only an
                # ack whose link went quiet waits for the timer (``ACK_LINGER`` past due).
                due = last + self.ack_delay
                if trio.current_time() < due:
                    with trio.move_on_at(due + ACK_LINGER):
                        while trio.current_time() < due:
                            await self._ack_wake.wait()
                            self._ack_wake = trio.Event()
            if self.acked > said:
                if self.ack_delay:
                    last = trio.current_time()
                said = self.acked
                seqs, self._seqs = self._seqs, {}
                await self.say({"ack": said, "seqs": {k.decode(): v for k, v in seqs.items()}})

    async def say(self, message: dict) -> None:
        # Acks and accepting reports come from different tasks: one line at a time.
        async with self._say_lock:
            try:
                await self.out.send_all(orjson.dumps(message) + b"\n")
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass  # the proxy is gone; what it sent is still written

    async def handle(self, kind: int, slot: int, direction: int, payload: bytes) -> None:
        """Every frame but a known tap's bytes (``read`` feeds those itself, on its hot path)."""
        self.frames += 1
        if kind == TAP:
            return  # ``read`` feeds known taps; this one's worker died before, its session is being ended
        elif kind == EVENT:
            if slot:
                payload = await self._close_tap(slot, payload)
            if not self.recorder.submit_nowait(payload):
                await self.recorder.submit(payload)
        elif kind == OPEN:
            spec = orjson.loads(payload)
            template = spec["template"]
            audit = TemplateAudit(self.recorder, template)
            self.taps[slot] = (tap_factory(spec["tap"])(audit, **spec.get("params", {})), audit, template.get("sid", ""))
        elif kind == QUIT:
            self.quit = True
        elif kind == CLOSE:
            await self._close_tap(slot, None)
        elif kind == FORGET:
            self.recorder.forget_session(payload.decode())
        elif kind == COUNTERS:
            # A new worker after one died: the sessions' counts at its last ack go on from there.
            self.recorder.session_seq.update({sid.encode(): n for sid, n in orjson.loads(payload).items()})
        else:
            log.error("unknown frame kind %r from the proxy", kind)

    async def _close_tap(self, slot: int, end: bytes | None) -> bytes | None:
        """Close tap ``slot``; ``end``: the session's end event, returned with the tap's counts."""
        entry = self.taps.pop(slot, None)
        if entry is None:
            return end  # the tap failed (or its worker died before it was opened again)
        tap, audit, _ = entry
        if audit._pending:
            await audit.flush()
        if end is None:
            return None
        counts = tap.counts()
        return b"%b,%b}" % (end[:-1], orjson.dumps(counts)[1:-1]) if counts else end

    async def handle_tap_failure(self, slot: int) -> None:
        # The proxy framed these bytes already, so this is a bug in a decoder or stage:
        # drop this session's tap, keep every other session's audit going.
        _, audit, sid = self.taps.pop(slot)
        log.exception("audit tap of session %s failed; its queries are no longer audited", sid)
        audit.emit("audit.tap_failed", reason="the audit worker could not parse the session's traffic")
        await audit.flush()

    async def read(self, stdin: trio.abc.ReceiveStream) -> None:
        buf = bytearray()
        header = FRAME.size
        unpack = FRAME.unpack_from
        taps = self.taps
        recorder = self.recorder
        while True:
            data = await stdin.receive_some(1 << 20)
            if not data:
                if buf:
                    log.error("the proxy's audit stream ended inside a frame (%d bytes)", len(buf))
                return
            buf += data
            pos = 0
            end = len(buf)
            with memoryview(buf) as view:
                while end - pos >= header:
                    kind, length, slot, direction, when = unpack(buf, pos)
                    if end - pos - header < length:
                        break
                    start = pos + header
                    pos = start + length
                    payload = bytes(view[start:pos])
                    entry = taps.get(slot) if kind == TAP else None
                    if entry is not None:
                        # The hot path (a tap's bytes), without a coroutine per frame.
                        self.frames += 1
                        entry[1].when = when  # its events carry the time the proxy saw the bytes
                        try:
                            entry[0].feed(direction, payload)
                        except Exception:
                            await self.handle_tap_failure(slot)
                            continue
                        if entry[1]._pending:
                            await entry[1].flush()
                    else:
                        await self.handle(kind, slot, direction, payload)
            del buf[:pos]
            # Every event these frames produced is queued: once written, they are acked.
            recorder.checkpoint(self.frames, self)
            if self.read_delay and len(data) < READ_SMALL:
                # Durability "async": let the link's writes (one per ``LINK_DELAY`` while sessions
                # are busy) gather in the pipe and take them in one wake-up.  Written, they are
                # the kernel's: a proxy that dies now loses none of them (end of input comes after
                # them); a full pipe holds the proxy's link back, never drops.  A large read
                # (a bulk reply) reads on at once.
                await trio.sleep(self.read_delay)


async def close_taps(worker: Worker) -> None:
    """A link ended: flush what its open taps parsed (their sessions end without an end event)."""
    for slot in list(worker.taps):
        await worker._close_tap(slot, None)


async def serve_links(hub: Hub, path: str, hello: Any, ack_delay: float, *,
                      task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Accept proxy processes' links on the Unix socket ``path`` (``"workers": N``)."""
    import socket as socket_module

    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = trio.socket.socket(socket_module.AF_UNIX, socket_module.SOCK_STREAM)
    await sock.bind(path)
    os.chmod(path, 0o600)  # only the proxy's own user may feed its audit trail
    sock.listen(64)
    listener = trio.SocketListener(sock)

    async def serve_one(stream: trio.SocketStream) -> None:
        worker = hub.add(stream)
        worker.ack_delay = ack_delay
        if not ack_delay:
            worker.read_delay = 0.0
        try:
            async with trio.open_nursery() as nursery:
                await worker.say(hello())
                nursery.start_soon(worker.send_acks)
                try:
                    await worker.read(stream)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
                if not worker.quit:
                    log.warning("audit worker: a proxy process's link ended without a goodbye (the process died); "
                                "its open taps are closed, the other links go on")
                await close_taps(worker)
                if worker.quit:
                    # A clean goodbye: the proxy process waits until what it sent is written.
                    with trio.move_on_after(30):
                        while worker.acked < worker.frames:
                            await trio.sleep(0.005)
                        await worker.say({"ack": worker.acked, "seqs": {}})
                nursery.cancel_scope.cancel()
        finally:
            hub.remove(worker)
            await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        task_status.started()
        await trio.serve_listeners(serve_one, [listener], handler_nursery=nursery)


async def serve(config_file: str, listen: str | None = None) -> None:
    from dbproxy.config import load_audit_config

    os.environ.setdefault("DBPROXY_PID", str(os.getppid()))  # sinks name the proxy, not the worker
    audit_config = load_audit_config(config_file)
    if audit_config.worker_nice:
        # Under durability "async" no session waits for this process: the session loops
        # (and the backends beside them) get the CPU first when they want it.
        os.nice(audit_config.worker_nice)
    stdout = trio.lowlevel.FdStream(os.dup(1))
    stdin = trio.lowlevel.FdStream(os.dup(0))
    changes: list[bool] = []
    wake = trio.Event()

    def on_change(accepting: bool) -> None:
        changes.append(accepting)
        wake.set()

    sinks = await _build_sinks(audit_config.sinks)
    if audit_config.durability == "ack":
        # Acks promise durable events: a file sink syncs each batch before it is acked (group commit:
        # one fdatasync per batch, for every session waiting).  Spooled sinks fsync each batch already.
        for sink in sinks:
            if getattr(sink, "fsync", None) in ("interval", "never"):
                sink.fsync = "always"
    # No gathering delay of its own: a batch is what one read of the link brought (the proxy's
    # link gathers its frames for ``LINK_DELAY`` before a write; under durability "ack" sessions
    # wait for the acks, and a batch gathers during the previous fsync).  A second wait here
    # would only add a timer and a wake-up per batch.
    recorder = AuditRecorder(sinks, capacity=audit_config.queue_size, on_accepting_change=on_change, batch_delay=0.0)
    hub = Hub(recorder)
    worker = hub.add(stdout)
    if audit_config.durability == "ack":
        worker.ack_delay = worker.read_delay = 0.0

    def hello() -> dict:
        return {"ready": True, "last_seq": recorder.last_seq, "accepting": recorder.accepting, "pid": os.getpid()}

    async with trio.open_nursery() as nursery:
        await nursery.start(recorder.run)
        if listen:
            await nursery.start(serve_links, hub, listen, hello, worker.ack_delay)
        await worker.say(hello())

        async def report() -> None:
            # Changes seen by the drain task come at once; a blocked sink that recovers
            # while no events flow is noticed by looking again every REPORT_POLL seconds.
            nonlocal wake
            said = recorder.accepting
            stats_said: dict = {}
            stats_due = 0.0
            while True:
                if trio.current_time() >= stats_due:
                    # What the proxy's /metrics shows of this process: its queue, its sinks'
                    # spools and delivery lag (one short line a second, only when it changed).
                    stats_due = trio.current_time() + STATS_INTERVAL
                    stats = worker_statistics(recorder)
                    if stats != stats_said:
                        stats_said = stats
                        await hub.say_all({"stats": stats})
                with trio.move_on_after(REPORT_POLL):
                    await wake.wait()
                wake = trio.Event()
                changes.clear()
                now = recorder.accepting
                if now != said:
                    said = now
                    # With the statistics that say why (which sink is blocked), for /readyz.
                    stats_said = worker_statistics(recorder)
                    await hub.say_all({"accepting": now, "stats": stats_said})

        nursery.start_soon(report)
        nursery.start_soon(worker.send_acks)
        await worker.read(stdin)
        if not worker.quit:
            # The proxy died (SIGKILL, crash): write what it sent and leave the rest of
            # the delivery to the spools, so a restarted proxy's worker can take over now.
            log.warning("audit worker: the proxy went away; writing what it sent and exiting")
            recorder.flush_on_close = False
        await recorder.aclose()
        nursery.cancel_scope.cancel()
    log.info("audit worker: %d frames, last seq %d", worker.frames, recorder.last_seq)


REPORT_POLL = 0.25
STATS_INTERVAL = 1.0  # seconds between the worker's statistics reports to the proxy (dbproxy.metrics)
ACK_DELAY = 0.02  # seconds acks gather under durability "async"
READ_DELAY = 0.1  # seconds between reads of a link under durability "async" (``Worker.read``)
READ_SMALL = 64 * 1024  # a read this large or larger: read on at once
ACK_LINGER = 0.03  # seconds past due an ack waits for a written batch to go with (``send_acks``)
SPOOL_BUSY_WAIT = 20.0  # seconds to wait for a spool still held by the worker of a proxy that died


def worker_statistics(recorder: AuditRecorder) -> dict:
    """The worker's recorder and sinks, as JSON for the link (``AuditLink.worker_stats``)."""
    s = recorder.statistics()
    return {"queued": s.queued, "written": s.written, "sink_failures": s.sink_failures, "last_seq": s.last_seq,
            "accepting": s.accepting, "sinks": [attrs.asdict(sink) for sink in s.sinks]}


async def _build_sinks(configs: Any) -> list:
    """Build every sink; a spool still locked by a previous worker (finishing the writes of a
    proxy that died) is retried for ``SPOOL_BUSY_WAIT`` seconds before giving up."""
    from .sinks import build_sink
    from .sinks.spool import SpoolError

    deadline = trio.current_time() + SPOOL_BUSY_WAIT
    while True:
        sinks: list = []
        try:
            for cfg in configs:
                sinks.append(build_sink(cfg))
            for sink in sinks:
                if hasattr(sink, "write_in_thread"):
                    sink.write_in_thread = False
            return sinks
        except SpoolError as exc:
            for sink in sinks:
                await sink.aclose()
            if "in use" not in str(exc) or trio.current_time() > deadline:
                raise
            log.info("audit worker: %s; waiting for it", exc)
            await trio.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("usage: python -m audit.worker CONFIG_FILE [LOG_LEVEL]", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    listen = None
    if "--listen" in argv:  # ``"workers": N``: the proxy processes link in on this Unix socket
        i = argv.index("--listen")
        listen = argv[i + 1]
        del argv[i:i + 2]
    level = argv[1] if len(argv) > 1 else "INFO"
    from dbproxy.logs import configure_from_env

    configure_from_env(level=level, process="audit-worker")  # the proxy's format and module levels
    trio.run(serve, argv[0], listen)
    return 0


if __name__ == "__main__":
    sys.exit(main())
