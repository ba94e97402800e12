"""The audit recorder: one per proxy process, shared by every engine.

Strategy: sessions never wait on a sink.  ``SessionAudit.emit`` serialises
the event once — its own fields with orjson, then the session's common
fields, serialised when the session learnt them — and appends the bytes to
the recorder's bounded queue.  If the queue is full the event is kept in the
session's small pending list and the session's pump awaits ``flush()`` after
its next send — backpressure on that one session, never loss.  One drain
task (owned by the server's nursery) takes events in batches, stamps each
line with a sequence number and a hash chain link (``seq``, ``prev_hash``,
then ``hash`` = SHA-256 over the line as written up to that member, see
``line_hash``), and hands the batch to every sink, which writes or sends
those very bytes.  A sink failure is logged and counted; it never crashes a
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
    """The legacy link: SHA-256 over the canonical (sorted-key) JSON of ``event`` minus ``hash``.

    Trails written before links were taken over the line itself; ``verify``
    still accepts it, and so may a consumer that only kept parsed events.
    """
    if "hash" in event:
        event = {k: v for k, v in event.items() if k != "hash"}
    return hashlib.sha256(orjson.dumps(event, option=orjson.OPT_SORT_KEYS)).hexdigest()


# A stamped line ends with exactly this member: ``,"hash":"<64 hex digits>"}``.
_HASH_SUFFIX_LEN = len(b',"hash":""}') + 64


def line_hash(line: bytes) -> str | None:
    """The link of one stamped line: SHA-256 over the line as written, minus its
    trailing ``"hash"`` member (and newline).  None if the line does not end
    with that member."""
    line = line.rstrip(b"\r\n")
    cut = len(line) - _HASH_SUFFIX_LEN
    if cut < 1 or not line.endswith(b'"}') or line[cut:cut + 9] != b',"hash":"':
        return None
    return hashlib.sha256(line[:cut] + b"}").hexdigest()


class StampedBatch:
    """A batch of stamped events: ``lines[i]`` is one event's JSON line, as every sink
    should store or send it (its ``hash`` is over these bytes, see ``line_hash``).

    Iterating (or indexing) gives the events as dicts, parsed on first use:
    only sinks that need fields (syslog headers, spool keys) pay for it.
    """

    __slots__ = ("lines", "_events")

    def __init__(self, lines: list[bytes]) -> None:
        self.lines = lines
        self._events: list[dict] | None = None

    def events(self) -> list[dict]:
        if self._events is None:
            self._events = [orjson.loads(line) for line in self.lines]
        return self._events

    def __len__(self) -> int:
        return len(self.lines)

    def __iter__(self):
        return iter(self.events())

    def __getitem__(self, index):
        return self.events()[index]


def serialize(event: dict) -> bytes:
    """An event dict as the body the recorder stamps (the JSON object, no chain fields)."""
    return orjson.dumps(event)


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
    # Called with the new value when ``accepting`` changes (the audit worker reports it).
    on_accepting_change: Any = None
    # On close, give network sinks their grace time to deliver (False: their spools keep it).
    flush_on_close: bool = True
    _queue: list = attrs.field(factory=list)  # event bodies (bytes) waiting for the drain task
    _closed: bool = False
    _drain_waiting: Any = None  # a trio.Event while the drain task waits for the first event
    _room: Any = None
    _done: Any = None
    _live: Any = None
    _was_accepting: bool = True
    durable_sessions: bool = False  # durability "ack": sessions wait for their events to be written
    # Seconds events gather before a batch is written.  Durability "ack" sets 0: sessions wait
    # for the write, so the batch gathers while the previous one is being written and synced.
    batch_delay: float = BATCH_DELAY
    # Submitted events every sink has written (``written`` also counts the recorder's own loss events).
    durable: int = 0
    # ``session_seq``: events stamped so far per session id (bytes), dropped at the session's end event.
    session_seq: dict = attrs.field(factory=dict)
    # Called with the ``Checkpoint``s a written batch passed (the audit worker acks its input with them).
    on_checkpoint: Any = None
    # sid -> session_seq (0: ended) changed since the last checkpoint; None unless the audit
    # worker asks for it (``track_changes``): the in-process recorder keeps no such history.
    _touched: dict | None = None
    _marks: list = attrs.field(factory=list)
    _durable_lot: Any = None

    def __attrs_post_init__(self) -> None:
        self._room = trio.lowlevel.ParkingLot()  # producers waiting for room in the queue
        self._durable_lot = trio.lowlevel.ParkingLot()  # sessions waiting for ``durable`` (durability "ack")
        self._done = trio.Event()
        self._live = weakref.WeakSet()  # every SessionAudit, to tell them when fail-closed engages

    # -- producers ---------------------------------------------------------
    # The queue is a plain list owned by this thread's event loop: appending is
    # the whole cost of an event on the query path; the drain task is woken
    # only when it sleeps on an empty queue.
    def submit_nowait(self, body: bytes) -> bool:
        """Queue one event body (``serialize(event)``); False when the queue is full."""
        if self._closed:
            log.error("audit event after recorder close: %.120s", body)
            return True
        queue = self._queue
        if len(queue) >= self.capacity:
            return False
        queue.append(body)
        self.submitted += 1
        waiting = self._drain_waiting
        if waiting is not None:
            self._drain_waiting = None
            waiting.set()
        return True

    async def submit(self, body: bytes) -> None:
        while not self.submit_nowait(body):
            await self._room.park()

    def track_changes(self) -> None:
        """Note which ``session_seq`` counters change between checkpoints (the worker's acks carry them)."""
        if self._touched is None:
            self._touched = {}

    def forget_session(self, sid: str) -> None:
        """A session ended without an end event (it never started: failed login, refused):
        drop its ``session_seq`` counter once its events are stamped."""
        self._queue.append(Forget(sid.encode()))

    def checkpoint(self, frames: int, owner: Any = None) -> None:
        """Queue a marker behind every event submitted so far (the audit worker's input position
        ``frames`` on ``owner``'s link); once the batch that carries it is written, ``on_checkpoint`` gets it."""
        self._queue.append(Checkpoint(frames, owner))
        waiting = self._drain_waiting
        if waiting is not None:
            self._drain_waiting = None
            waiting.set()

    @property
    def queued_mark(self) -> int:
        """Position of the newest event handed over (compare with ``durable_mark``)."""
        return self.submitted

    @property
    def durable_mark(self) -> int:
        return self.durable

    async def wait_durable(self, mark: int) -> None:
        """Wait until every sink has written the events up to ``queued_mark`` == ``mark``."""
        while self.durable < mark and not self._done.is_set():
            await self._durable_lot.park()

    def session(self, session: Any, *, durable: bool | None = None) -> "SessionAudit":
        return open_session_audit(self, session, durable)

    @property
    def accepting(self) -> bool:
        """False while a fail-closed sink cannot take events: no new sessions, running ones end."""
        return not any(getattr(sink, "blocked", False) for sink in self.sinks)

    def statistics(self) -> RecorderStatistics:
        return RecorderStatistics(
            submitted=self.submitted,
            written=self.written,
            sink_failures=self.sink_failures,
            queued=len(self._queue),
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
                if self.flush_on_close:
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
        queue = self._queue
        while True:
            if not queue:
                if self._closed:
                    return
                self._drain_waiting = trio.Event()
                await self._drain_waiting.wait()
                continue
            if self.batch_delay and len(queue) < MAX_BATCH and not self._closed:
                # Let a batch gather: one wake-up and one sink write per few
                # milliseconds instead of one per event.  While the drain task
                # sleeps, emitting an event wakes nobody.
                await trio.sleep(self.batch_delay)
            batch = queue[:MAX_BATCH]
            del queue[:MAX_BATCH]
            if self._room:
                self._room.unpark_all()
            stamped = self._stamp(batch)
            marks, self._marks = self._marks, []
            if stamped.lines:
                await self._write(stamped)
                self.durable += len(stamped.lines)
                if self._durable_lot:
                    self._durable_lot.unpark_all()
            if marks and self.on_checkpoint is not None:
                self.on_checkpoint(marks)
            self._check_accepting()
            losses = [loss for sink in self.sinks if hasattr(sink, "take_losses") for loss in sink.take_losses()]
            if losses:
                await self._write_losses(losses)

    def _check_accepting(self) -> None:
        accepting = self.accepting
        if accepting != self._was_accepting:
            if not accepting:
                tell_running_sessions(self._live, "a fail_closed sink can take no more events")
            else:
                log.warning("audit available again: accepting sessions")
            if self.on_accepting_change is not None:
                self.on_accepting_change(accepting)
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
        await self._write(self._stamp([serialize(e) for e in events]))

    def _stamp(self, batch: list) -> StampedBatch:
        """Give each body its ``session_seq`` (when it names a session), ``seq`` and
        ``prev_hash`` and its ``hash`` over the line so far.

        ``session_seq`` is counted here, the one place both audit modes pass: the
        session id is the template's ``"sid":"…"`` member, which ``SessionAudit.emit``
        serialises last (so ``rfind``; an escaped string value cannot contain an
        unescaped ``"sid":"``).  A ``db.session.end`` event (``emit`` puts ``event``
        first) drops the session's counter: its ``session_seq`` is the session's total.
        """
        seq = self.last_seq
        prev = self.last_hash.encode()
        sha256 = hashlib.sha256
        counts = self.session_seq
        touched = self._touched
        lines = []
        for body in batch:
            if type(body) is not bytes:
                if type(body) is Checkpoint:
                    body.seqs = touched or {}
                    touched = self._touched = {}
                    self._marks.append(body)
                elif counts.pop(body.sid, None) is not None and touched is not None:  # Forget
                    touched[body.sid] = 0
                continue
            seq += 1
            at = body.rfind(b'"sid":"')
            if at >= 0:
                at += 7
                sid = body[at:body.index(b'"', at)]
                n = counts.get(sid, 0) + 1
                # ``_is_end(body)`` inline (one call less per event)
                close = body.find(b'"', 10)
                if close > 0 and body[close - 12:close + 1] == _END_NAME and body.startswith(b'{"event":"'):
                    counts.pop(sid, None)
                    if touched is not None:
                        touched[sid] = 0
                else:
                    counts[sid] = n
                    if touched is not None:
                        touched[sid] = n
                head = b'%b,"session_seq":%d,"seq":%d,"prev_hash":"%b"' % (body[:-1], n, seq, prev)
            else:
                head = b'%b,"seq":%d,"prev_hash":"%b"' % (body[:-1], seq, prev)
            link = sha256(head)
            link.update(b"}")  # the hash covers the line without its hash member: ``head}``
            prev = link.hexdigest().encode()
            lines.append(b'%b,"hash":"%b"}\n' % (head, prev))
        self.last_seq = seq
        self.last_hash = prev.decode()
        return StampedBatch(lines)

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
        self._closed = True
        waiting = self._drain_waiting
        if waiting is not None:
            self._drain_waiting = None
            waiting.set()
        await self._done.wait()


class Checkpoint:
    """A marker in the recorder's queue (not an event): the audit worker's input position
    ``frames``; ``seqs`` gets the ``session_seq`` counters changed since the previous one."""

    __slots__ = ("frames", "seqs", "owner")

    def __init__(self, frames: int, owner: Any = None) -> None:
        self.frames = frames
        self.seqs: dict = {}
        self.owner = owner  # the link whose input position this is (the audit worker serves several)


class Forget:
    """A marker in the recorder's queue: drop session ``sid``'s counter (it ended without an end event)."""

    __slots__ = ("sid",)

    def __init__(self, sid: bytes) -> None:
        self.sid = sid


_END_NAME = b'.session.end"'


def _is_end(body: bytes) -> bool:
    """Is this body a session end event (``<family>.session.end``)?  ``emit`` puts
    ``event`` first, so its name is the first string of the body."""
    if not body.startswith(b'{"event":"'):
        return False
    close = body.find(b'"', 10)
    return close > 0 and body[close - 12:close + 1] == _END_NAME


def open_session_audit(owner: Any, session: Any, durable: bool | None) -> "SessionAudit":
    """A session's audit on ``owner`` (an ``AuditRecorder`` or an ``AuditLink``: the same
    ``durable_sessions`` default and the same ``_live`` set that ``tell_running_sessions`` reads)."""
    durable = owner.durable_sessions if durable is None else durable
    audit = (DurableSessionAudit if durable else SessionAudit)(owner, session)
    owner._live.add(audit)
    return audit


def tell_running_sessions(live: Any, why: str) -> None:
    """Fail closed: every running session ends at its next ``flush`` with ``AuditUnavailable``."""
    running = [a for a in list(live) if a.session.started and not a._ended]
    log.error("audit unavailable (%s): ending %d running sessions, refusing new ones", why, len(running))
    for audit in running:
        audit.tell_unavailable()


_code_of = ev.CODES.get
_new_event_id = ev.new_event_id
_now_iso = ev.now_iso
_dumps = orjson.dumps
# ``emit`` formats event ids inline (``ev.new_event_id``'s very format, on the same shared
# counter): one Python call less per event on the audit worker's hot path.
_ID_PREFIX = ev._ID_PREFIX
_id_counter = ev._id_counter


# Put in a session's pending list to make its pipeline call ``flush`` (it only does when
# something is pending), which then raises AuditUnavailable.
_UNAVAILABLE = b'{"event":"<audit unavailable marker>"}'
# Put there by ``tap`` when the audit worker link is over its budget: ``flush`` waits for room.
_CONGESTED = b'{"event":"<audit link congested marker>"}'


# The index of this proxy process under a supervisor (``"workers": N``, dbproxy.workers), named in
# every session's events; None with one process.
PROXY_WORKER: int | None = None


class SessionAudit:
    """One session's view of the recorder: binds the common fields at emit time."""

    __slots__ = ("recorder", "session", "_pending", "_ended", "_told", "_template", "_template_json",
                 "_overridden", "_key", "halted", "_end_slot", "__weakref__")

    # An event's ``time``: None is now (TemplateAudit: when the proxy saw the bytes, an attribute
    # rather than a method so ``emit`` makes one call less per event).
    when = None
    # The common fields follow a live session (False: given once, ``TemplateAudit``).
    _live_template = True

    def __init__(self, recorder: AuditRecorder, session: Any) -> None:
        self.recorder = recorder
        self.session = session
        self._pending: list = []  # event bodies held back while the recorder's queue is full
        self._ended = False
        self._told = False
        # Set when the session must end for lack of audit: its pumps forward nothing more.
        self.halted = False
        self._template: dict = {}
        self._template_json = b""
        # ``emit`` with fields that override common ones: the common fields' JSON without them,
        # by the event's field names (one call site, one entry); emptied when the template changes.
        self._overridden: dict[tuple, bytes] = {}
        self._key: tuple | None = None
        self._end_slot = 0  # a closed tap: the end event goes to it (the worker adds the tap's counts)

    def _refresh_template(self) -> None:
        s = self.session
        # The session-constant fields are built and serialised once; they are
        # rebuilt when the session learns who it is or where it goes.
        key = (s.identity, s.db_name, s.db_user, s.backend_addr, s.route_name)
        if key == self._key:
            return
        ident = s.identity
        template = {
            "sid": s.id,
            "user": ident.user,
            "roles": list(ident.roles),
            "auth_method": ident.method,
        }
        family = getattr(s, "event_family", "db")
        if family == "db":
            # Teleport's database field names (a SIEM parsing db.* events needs no new mapping).
            template.update({"db_protocol": s.protocol, "listener": s.listener, "db_name": s.db_name,
                             "db_user": s.db_user, "db_uri": s.backend_addr})
        else:
            # Other families (ssh.*) carry no database fields: the same facts under neutral names.
            template.update({"protocol": s.protocol, "listener": s.listener, "target": s.target,
                             "login": s.login, "target_addr": s.backend_addr})
        template["addr.remote"] = s.client_addr
        if PROXY_WORKER is not None:  # ``"workers": N``: which proxy process holds the session
            template["proxy_worker"] = PROXY_WORKER
        balancer = getattr(s, "balancer_addr", None)
        if balancer is not None:
            template["addr.load_balancer"] = balancer
        if ident.token_id:
            template["token_id"] = ident.token_id
        if s.route_name:
            template["route"] = s.route_name
        self._template = template
        self._template_json = orjson.dumps(template)[1:-1]  # the members, without braces
        self._overridden = {}
        self._key = key

    def emit(self, kind: str, **fields: Any) -> dict:
        """Record one event; returns its own fields (``event``, ``code``, ``uid``, ``time`` and
        ``fields``) — the session's common fields are in the trail, not in the dict."""
        if self._live_template:
            self._refresh_template()
        event = {"event": kind, "code": _code_of(kind, ""), "uid": f"{_ID_PREFIX}{next(_id_counter):016x}",
                 "time": _now_iso(self.when)}
        if fields:
            event.update(fields)
            if not fields.keys().isdisjoint(self._template):
                # An engine overrides a common field (a Mongo command's own database): the event's
                # value wins, and the common fields follow without it (their JSON kept per field set).
                names = tuple(fields)
                rest = self._overridden.get(names)
                if rest is None:
                    rest = self._overridden[names] = self._template_without(names)
                self._submit(b"%b,%b}" % (_dumps(event)[:-1], rest) if rest else _dumps(event))
                return event
        self._submit(b"%b,%b}" % (_dumps(event)[:-1], self._template_json))
        return event

    def _template_without(self, names: tuple) -> bytes:
        if len(self._overridden) >= 32:  # field sets are per call site: a few; never unbounded
            self._overridden.clear()
        return _dumps({k: v for k, v in self._template.items() if k not in names})[1:-1]

    def _submit(self, body: bytes) -> None:
        if self._pending or not self.recorder.submit_nowait(body):
            self._pending.append(body)

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
                if event is _CONGESTED:
                    await self.recorder.wait_room()
                    continue
                if type(event) is tuple:
                    if len(event) == 2:  # the end event, addressed to the session's tap
                        await self.recorder.submit(event[1], event[0])
                        continue
                    # tapped bytes held behind events
                    await self.recorder.wait_room()
                    self.recorder.tap(*event)
                    continue
                await self.recorder.submit(event)
        if (told or not self.recorder.accepting) and self.session.started and not self._ended and not self._told:
            self._told = True
            raise AuditUnavailable()

    def forget(self) -> None:
        """The session ends without an end event (it never started): its ``session_seq``
        counter is dropped behind its last event."""
        self.recorder.forget_session(self.session.id)

    def tell_unavailable(self) -> None:
        """Called by the recorder: make the session's next ``flush`` raise ``AuditUnavailable``."""
        if not self._told:
            self._pending.append(_UNAVAILABLE)
            self.halted = True

    # -- taps: a session's bytes audited by the audit worker (``audit.link``) ---------
    @property
    def can_tap(self) -> bool:
        return hasattr(self.recorder, "tap_open")

    def tap_open(self, tap: type, params: dict | None = None) -> int:
        """Start auditing this session's protocol frames in the audit worker with the engine's
        ``tap`` class (``tap(audit, **params)``, ``feed(direction, data)``, ``counts()``), registered
        with the worker by its import path; ``params``: what the session learnt before its
        pipeline that the tap needs (JSON values: a negotiated version…).  Returns the tap's slot."""
        self._refresh_template()
        return self.recorder.tap_open(f"{tap.__module__}:{tap.__qualname__}", self._template, params)

    def tap(self, slot: int, direction: int, data: bytes) -> None:
        """Forwarded bytes (direction 0: client→backend, 1: backend→client), in forwarding order."""
        pending = self._pending
        if not pending:
            if self.recorder.tap(slot, direction, data):
                pending.append(_CONGESTED)
            return
        if any(type(p) is bytes and p is not _CONGESTED for p in pending):
            # Events of this session are held back: the bytes wait behind them (session order).
            pending.append((slot, direction, data))
        elif self.recorder.tap(slot, direction, data) and _CONGESTED not in pending:
            pending.append(_CONGESTED)

    def tap_close(self, slot: int) -> None:
        """The session forwards nothing more; the tap closes with the session's end event
        (``on_session_end``), which the worker completes with the tap's counts."""
        self._end_slot = slot

    # -- the four hooks every engine uses -----------------------------------
    def on_session_start(self, *, success: bool, error: str | None = None, **fields: Any) -> dict:
        if success:
            self.session.started = True
        return self.emit(ev.session_start_event(self._event_family()), success=success, error=error, **fields)

    def on_query(self, query: str, *, parameters: list | None = None, **fields: Any) -> dict:
        if parameters is not None:
            fields["db_query_parameters"] = parameters
        return self.emit(ev.QUERY, db_query=ev.truncate(query), **fields)

    def on_result(self, *, success: bool, **fields: Any) -> dict:
        return self.emit(ev.RESULT, success=success, **fields)

    def _event_family(self) -> str:
        return getattr(self.session, "event_family", "db")

    def on_session_end(self, **fields: Any) -> dict:
        self._ended = True
        slot = self._end_slot
        kind = ev.session_end_event(self._event_family())
        if not slot:
            return self.emit(kind, **fields)
        # Sent in the tap's own slot: the worker closes the tap and adds its counts
        # (queries, errors) to this event without searching its bytes.
        self._end_slot = 0
        self._refresh_template()
        event = {"event": kind, "code": _code_of(kind, ""), "uid": _new_event_id(),
                 "time": _now_iso(self.when), **fields}
        body = b"%b,%b}" % (_dumps(event)[:-1], self._template_json)
        if self._pending or not self.recorder.submit_nowait(body, slot):
            self._pending.append((slot, body))
        return event


class DurableSessionAudit(SessionAudit):
    """A session's audit under ``"durability": "ack"``: it notes the position of the
    newest event or tapped bytes it handed over (``queued_mark`` of the recorder or
    link), so its backend→client pump can wait, before sending a completion, until
    the audit trail holds them durably (``wait_durable``).  Only this class pays
    for the bookkeeping: the default ("async") session has none of it."""

    __slots__ = ("_mark",)

    def __init__(self, recorder: Any, session: Any) -> None:
        super().__init__(recorder, session)
        self._mark = 0

    def _submit(self, body: bytes) -> None:
        SessionAudit._submit(self, body)
        self._mark = self.recorder.queued_mark

    def tap(self, slot: int, direction: int, data: bytes) -> None:
        SessionAudit.tap(self, slot, direction, data)
        self._mark = self.recorder.queued_mark

    async def wait_durable(self) -> None:
        """Wait until everything this session handed over is durable (group commit:
        one write + fsync in the audit worker or the recorder covers every session
        waiting on it).  Held events are handed over first."""
        if self._pending:
            await self.flush()
            self._mark = self.recorder.queued_mark
        if self._mark > self.recorder.durable_mark:
            await self.recorder.wait_durable(self._mark)


class TemplateAudit(SessionAudit):
    """A session's audit in the audit worker: common fields given (``template``), not
    looked up on a live session; held events are handed over by ``flush``, which never
    ends anything (the proxy's own sessions are told by the proxy)."""

    __slots__ = ("when",)
    _live_template = False

    def __init__(self, recorder: AuditRecorder, template: dict) -> None:
        super().__init__(recorder, None)
        self._template = template
        self._template_json = orjson.dumps(template)[1:-1]
        self.when: float | None = None  # the proxy's time for the bytes being fed (``audit.link`` T frames)

    def _refresh_template(self) -> None:
        pass

    @property
    def template(self) -> dict:
        """The session's common fields, as the proxy sent them (and ``update_template`` changed them)."""
        return self._template

    def update_template(self, **fields: Any) -> None:
        """A common field the session changed mid-way (a CQL USE's keyspace is ``db_name``): the
        events after this carry it, as the proxy's own events do."""
        self._template = {**self._template, **fields}
        self._template_json = orjson.dumps(self._template)[1:-1]
        self._overridden = {}

    async def flush(self) -> None:
        pending, self._pending = self._pending, []
        for body in pending:
            await self.recorder.submit(body)
