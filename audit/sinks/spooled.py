"""The base of every network sink: write-ahead to the disk spool, deliver from it in order.

Strategy: the drain task never talks to the network.  ``write_batch``
encodes each event into the exact bytes the wire will carry and appends them
to the sink's spool (one fsync per batch), then wakes the sender.  The
sender task (``run``, owned by the recorder's nursery) loops: read the
oldest undelivered records, ``deliver`` them, ``commit`` the spool cursor.
A failed delivery leaves the cursor where it was and retries the same
records after an exponential backoff with jitter — so events reach the SIEM
in ``seq`` order, after a SIEM outage and after a proxy restart alike (the
spool on disk is replayed first, because it *is* the queue).

Pipelined sinks (``pipelined = True``: RELP, syslog with ``confirm: "none"``,
HTTP) keep several batches in flight instead: a reader task reads past the
batches not yet confirmed and ``submit``s them in order, a committer task
``confirm``s them in the same order, and a cursor task commits the newest
confirmed batch — coalesced, when nothing more awaits confirmation or every
``COMMIT_EVERY`` seconds, because a commit is two fsyncs and one per batch
fell behind the acknowledgements; and in its own task, because a committer
that waited for the disk stopped confirming, the reader then stopped
sending, and delivery fell behind the proxy.
A failure ends the attempt; after the backoff everything unconfirmed is read
again from the cursor and re-sent (at-least-once; repeats carry their ``seq``).

When the spool is full the sink follows its ``on_full`` policy:

* ``fail_closed`` — append the prefix that fits and keep the rest in memory
  (``_overflow``, never dropped); while anything is held there the sink is
  ``blocked``, which makes the recorder refuse new sessions and end running
  ones.  As deliveries free room the overflow moves to disk and the sink
  unblocks.
* ``drop_oldest`` — the spool drops its oldest undelivered records to make
  room; the loss is logged at once and reported to the recorder
  (``take_losses``), which writes an ``audit.loss`` event into the trail.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import attrs
import orjson
import trio

from .spool import Dropped, Spool

log = logging.getLogger("dbproxy.audit.sink")

ON_FULL = ("fail_closed", "drop_oldest")
COMMIT_EVERY = 0.2  # seconds: pipelined sinks commit confirmed batches together at least this often


class DeliveryFailed(Exception):
    """The SIEM did not take the batch; it stays in the spool and is retried.

    ``retry_after`` (seconds) is the receiver's own hint (HTTP Retry-After);
    ``delivered`` how many leading records of the batch did get through.
    """

    def __init__(self, message: str, *, retry_after: float | None = None, delivered: int = 0) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.delivered = delivered


def reason(exc: BaseException) -> str:
    """The useful part of a connection error (trio wraps the OS error of each attempt)."""
    cause = exc.__cause__ or exc
    while isinstance(cause, BaseExceptionGroup) and cause.exceptions:
        cause = cause.exceptions[0]
    return str(cause) or cause.__class__.__name__


@attrs.frozen
class Loss:
    sink: str
    dropped: int
    first_seq: int
    last_seq: int
    dropped_total: int


@attrs.frozen
class SinkStatistics:
    name: str
    delivered: int
    pending_events: int
    pending_bytes: int
    overflow: int
    dropped: int
    blocked: bool
    failing: bool
    spool_max_bytes: int = 0
    # Seconds the sink has had undelivered events without catching up (0: nothing pending):
    # an upper bound of the oldest pending event's age (the delivery lag).
    behind_seconds: float = 0.0
    in_flight: int = 0  # batches sent and not yet confirmed (pipelined sinks)


class SpooledSink:
    """Subclasses set ``kind`` and implement ``encode(event) -> bytes`` and either
    ``deliver(payloads)`` (one batch at a time) or, with ``pipelined`` true,
    ``submit``/``confirm`` (several batches in flight, see ``_run_pipelined``)."""

    kind = "network"
    pipelined = False

    def __init__(
        self,
        *,
        name: str,
        spool_dir: str,
        spool_max_bytes: int = 256 * 1024 * 1024,
        on_full: str = "fail_closed",
        batch_max_events: int = 500,
        batch_max_bytes: int = 1024 * 1024,
        retry_initial_seconds: float = 0.5,
        retry_max_seconds: float = 30.0,
        shutdown_flush_seconds: float = 5.0,
        batch_linger_seconds: float = 0.0,
    ) -> None:
        if on_full not in ON_FULL:
            raise ValueError(f"on_full must be one of {ON_FULL}")
        self.name = name
        self.spool = Spool(spool_dir, max_bytes=spool_max_bytes)
        self.on_full = on_full
        self.batch_max_events = batch_max_events
        self.batch_max_bytes = batch_max_bytes
        self.retry_initial = retry_initial_seconds
        self.retry_max = retry_max_seconds
        self.shutdown_flush_seconds = shutdown_flush_seconds
        self.batch_linger = batch_linger_seconds
        self.blocked = False
        self.delivered = 0
        self.failing = False
        self._overflow: list[tuple[int, str, bytes]] = []
        self._losses: list[Loss] = []
        self._wakeup = trio.Event()
        self._idle = trio.Event()
        self._overflow_lock = trio.Lock()  # the drain task and the sender both move overflow to disk
        self._behind_since: float | None = None  # trio time the sender last went from caught up to behind
        self.max_in_flight = 1  # pipelined sinks: batches submitted and not yet confirmed
        self._in_flight = 0
        self._to_commit: tuple[list, int] | None = None  # pipelined: confirmed, cursor not yet past it (records, count)
        self._committing = False
        self._confirmed = trio.Event()  # pipelined: set when _to_commit gets a batch
        self._caught_up = trio.Event()  # pipelined: set when nothing sent awaits confirmation
        self._backoff = retry_initial_seconds

    # -- subclass interface ------------------------------------------------------
    def encode(self, event: dict, line: bytes | None = None) -> bytes:
        """One event's payload.  ``line`` is its stamped JSON line as the recorder wrote it
        (the bytes its ``hash`` covers); sinks send it unchanged where the format allows."""
        return line.rstrip(b"\n") if line is not None else orjson.dumps(event)

    async def deliver(self, payloads: list[bytes]) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    async def submit(self, payloads: list[bytes], nursery: trio.Nursery) -> Any:  # pragma: no cover - interface
        """Pipelined sinks: put the batch on its way, in spool order, and return a ticket for
        ``confirm``; may wait for room in the sink's window.  Tasks it starts go in *nursery*
        (cancelled when a delivery fails)."""
        raise NotImplementedError

    async def confirm(self, ticket: Any) -> None:  # pragma: no cover - interface
        """Pipelined sinks: return once the receiver has taken the batch; else raise
        ``DeliveryFailed`` (``delivered`` = its leading records that did get through)."""
        raise NotImplementedError

    async def disconnect(self) -> None:
        """Drop any open connection (called on shutdown and after a failed delivery)."""

    # -- the drain task's side ---------------------------------------------------
    async def write_batch(self, batch: list[dict]) -> None:
        lines = getattr(batch, "lines", None)
        if lines is not None:
            records = [(e["seq"], e["hash"], self.encode(e, line)) for e, line in zip(batch.events(), lines)]
        else:
            records = [(e["seq"], e["hash"], self.encode(e)) for e in batch]
        if self.on_full == "drop_oldest":
            dropped = await trio.to_thread.run_sync(self.spool.append_dropping, records)
            if dropped is not None:
                self._record_loss(dropped)
        else:
            self._overflow.extend(records)
            await self._move_overflow()
        if self._behind_since is None:
            self._behind_since = trio.current_time()
        self._wakeup.set()

    async def _move_overflow(self) -> None:
        async with self._overflow_lock:
            if self._overflow:
                n = await trio.to_thread.run_sync(self.spool.append_fitting, list(self._overflow))
                del self._overflow[:n]
        blocked = bool(self._overflow)
        if blocked and not self.blocked:
            log.error(
                "audit sink %s: spool full (%d bytes undelivered); fail_closed: refusing new sessions until the SIEM takes events again",
                self.name,
                self.spool.pending_bytes,
            )
        elif self.blocked and not blocked:
            log.warning("audit sink %s: spool has room again; accepting sessions", self.name)
        self.blocked = blocked

    async def reserve(self, nbytes: int) -> None:
        """Drop-oldest: make room for *nbytes* now (the recorder's loss events must not drop more)."""
        if self.on_full == "drop_oldest":
            dropped = await trio.to_thread.run_sync(self.spool.make_room, nbytes)
            if dropped is not None:
                self._record_loss(dropped)

    def _record_loss(self, d: Dropped) -> None:
        total = self.spool.dropped
        log.error(
            "audit sink %s: spool full, dropped %d oldest undelivered events (seq %d-%d); %d dropped since start",
            self.name,
            d.count,
            d.first_seq,
            d.last_seq,
            total,
        )
        self._losses.append(Loss(self.name, d.count, d.first_seq, d.last_seq, total))

    def take_losses(self) -> list[Loss]:
        losses, self._losses = self._losses, []
        return losses

    def recover_tail(self) -> tuple[int, str] | None:
        return self.spool.tail()

    def statistics(self) -> SinkStatistics:
        s = self.spool.statistics()
        since = self._behind_since
        behind = 0.0 if since is None or not (s.pending_events or self._overflow) else trio.current_time() - since
        return SinkStatistics(
            self.name, self.delivered, s.pending_events, s.pending_bytes, len(self._overflow), s.dropped, self.blocked,
            self.failing, s.max_bytes, round(behind, 3), self._in_flight,
        )

    # -- the sender task -----------------------------------------------------------
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        self._backoff = self.retry_initial
        try:
            if self.pipelined:
                await self._run_pipelined()
            while True:
                self._wakeup = trio.Event()
                records = await trio.to_thread.run_sync(self.spool.read, self.batch_max_events, self.batch_max_bytes)
                if not records:
                    if self._overflow:
                        await self._move_overflow()
                        continue
                    self._behind_since = None  # caught up
                    self._idle.set()
                    await self._wakeup.wait()
                    if self.batch_linger:
                        await trio.sleep(self.batch_linger)  # let a batch gather behind the first event
                    continue
                if self._idle.is_set():
                    # Replace only a set event: a wait_idle() that began during the previous batch is
                    # waiting on the unset one, which must be the one set when the spool runs dry.
                    self._idle = trio.Event()
                try:
                    await self.deliver([payload for _, payload, _ in records])
                except Exception as exc:  # noqa: BLE001 - a sender bug must not take the recorder down
                    await self._failed(exc, records)
                    continue
                await self._committed(records)
        finally:
            with trio.CancelScope(shield=True):
                await self.disconnect()

    async def _committed(self, records: list, count: int | None = None) -> None:
        """*records* (the last batch of *count* events) are delivered: move the cursor past them."""
        if self.failing:
            log.warning("audit sink %s: delivering again; replaying %d spooled events", self.name, self.spool.pending_events)
            self.failing = False
        self._backoff = self.retry_initial
        # Counted before the cursor moves: once the spool shows nothing pending, the count
        # (and /metrics' delivered total) already includes this batch.
        self.delivered += len(records) if count is None else count
        await trio.to_thread.run_sync(self.spool.commit, records[-1][2])
        if self._overflow:
            await self._move_overflow()

    async def _failed(self, exc: Exception, records: list | None) -> None:
        """After a failed delivery: commit what did get through, log, back off (exponential, jittered)."""
        if not isinstance(exc, DeliveryFailed):
            log.exception("audit sink %s: unexpected error while delivering", self.name, exc_info=exc)
            exc = DeliveryFailed(f"internal error: {exc.__class__.__name__}")
        await self.disconnect()
        if exc.delivered and records:
            await trio.to_thread.run_sync(self.spool.commit, records[exc.delivered - 1][2])
            self.delivered += exc.delivered
        if not self.failing:
            log.warning(
                "audit sink %s: delivery failed (%s); %d events kept in the spool, retrying",
                self.name,
                exc,
                self.spool.pending_events,
            )
        else:
            log.debug("audit sink %s: still failing: %s", self.name, exc)
        self.failing = True
        delay = self._backoff if exc.retry_after is None else min(max(exc.retry_after, self._backoff), self.retry_max)
        await trio.sleep(delay * random.uniform(0.8, 1.2))
        self._backoff = min(self._backoff * 2, self.retry_max)

    # -- the pipelined sender -------------------------------------------------------
    async def _run_pipelined(self) -> None:
        """Several batches in flight: a reader submits batches in spool order (``submit``, which
        waits for room in the sink's window), a committer confirms them in the same order, and a
        cursor task moves the spool cursor past what is confirmed.  A failure anywhere ends the
        attempt: everything unconfirmed is read again from the cursor and re-sent after the
        backoff (at-least-once)."""
        while True:
            failure: list[tuple[Exception, list | None]] = []
            self._in_flight = 0
            self._to_commit = None
            self._confirmed = trio.Event()
            self._caught_up = trio.Event()
            reader_failure: list[tuple[Exception, list | None]] = []
            send, receive = trio.open_memory_channel(max(0, self.max_in_flight - 1))
            try:
                async with trio.open_nursery() as nursery:
                    committer_done = trio.Event()
                    nursery.start_soon(self._pipeline_committer, receive, failure, nursery.cancel_scope, committer_done)
                    nursery.start_soon(self._pipeline_cursor)
                    await self._pipeline_reader(send, nursery, reader_failure)
                    # The reader failed (it closed the channel): the batches already submitted are
                    # confirmed first, in order, so what did get through is committed and not sent
                    # again.  A broken connection fails them fast; the first failure counts.
                    await committer_done.wait()
                    nursery.cancel_scope.cancel()
            finally:
                # Confirmed batches the cursor task had not committed yet (a failure, a shutdown):
                # commit them now, so the retry re-sends only what was never confirmed.
                with trio.CancelScope(shield=True):
                    await self._commit_confirmed()
            if failure or reader_failure:
                await self._failed(*(failure or reader_failure)[0])

    async def _pipeline_reader(self, send: Any, nursery: trio.Nursery, failure: list) -> None:
        """Submits batches in spool order.  A failure goes in *failure* with the batch being
        submitted (its leading ``DeliveryFailed.delivered`` records got through), and the channel
        is closed, so the committer still confirms what was submitted before."""
        after = None
        async with send:
            while True:
                self._wakeup = trio.Event()
                records = None
                try:
                    records = await trio.to_thread.run_sync(self.spool.read, self.batch_max_events, self.batch_max_bytes, after)
                    if not records:
                        if self._overflow:
                            await self._move_overflow()
                            continue
                        # Idle only once everything sent is confirmed *and* committed (wait_idle looks
                        # at the spool); the cursor task wakes us when its commit is done.
                        if self._in_flight == 0 and self._to_commit is None and not self._committing:
                            self._behind_since = None  # caught up
                            self._idle.set()
                        await self._wakeup.wait()
                        if self.batch_linger:
                            await trio.sleep(self.batch_linger)
                        continue
                    if self._idle.is_set():  # not a fresh one wait_idle may be waiting on
                        self._idle = trio.Event()
                    ticket = await self.submit([payload for _, payload, _ in records], nursery)
                except Exception as exc:  # noqa: BLE001 - reported like a failed delivery
                    failure.append((exc, records))
                    return
                self._in_flight += 1
                after = records[-1][2]
                await send.send((ticket, records))

    async def _pipeline_committer(self, receive: Any, failure: list, scope: trio.CancelScope, done: trio.Event) -> None:
        """Confirms batches in order and hands the newest confirmed one to the cursor task.

        It never waits for the disk itself: a commit is a cursor write with two fsyncs, which on a
        busy disk takes from milliseconds to seconds, and a committer that waited for it stopped
        taking batches off the channel — the reader, finding the channel full, stopped sending,
        and delivery fell behind the proxy (scripts/bench/pg --sink relp, 2026-12-06)."""
        try:
            async with receive:
                async for ticket, records in receive:
                    try:
                        await self.confirm(ticket)
                    except Exception as exc:  # noqa: BLE001 - reported like a failed delivery
                        failure.append((exc, records))
                        scope.cancel()
                        return
                    self._in_flight -= 1
                    pending = self._to_commit
                    self._to_commit = (records, len(records) + (pending[1] if pending is not None else 0))
                    self._confirmed.set()
                    if self._in_flight == 0:
                        self._caught_up.set()
        finally:
            done.set()

    async def _pipeline_cursor(self) -> None:
        """Commits the newest confirmed batch, coalescing: while more batches are in flight, at
        most every ``COMMIT_EVERY`` seconds (one commit per batch fell behind the acknowledgements);
        at once when everything sent is confirmed.  Confirmations go on during a commit and join
        the next one, so a slow disk delays only the cursor, never the delivery."""
        last = trio.current_time() - COMMIT_EVERY
        while True:
            await self._confirmed.wait()
            delay = last + COMMIT_EVERY - trio.current_time()
            if delay > 0 and self._in_flight:
                with trio.move_on_after(delay):
                    await self._caught_up.wait()
            # Fresh events before taking the batch (no checkpoint in between): a confirmation from
            # now on sets the new ones.
            self._confirmed = trio.Event()
            self._caught_up = trio.Event()
            last = trio.current_time()
            await self._commit_confirmed()
            if self._in_flight == 0:
                self._wakeup.set()  # the reader may be waiting with nothing left to confirm: idle now

    async def _commit_confirmed(self) -> None:
        pending, self._to_commit = self._to_commit, None
        if pending is None:
            return
        self._committing = True
        try:
            await self._committed(*pending)
        finally:
            self._committing = False

    async def wait_idle(self) -> None:
        """Until everything written so far is delivered (used for a graceful shutdown)."""
        while True:
            await self._idle.wait()
            if not self._overflow and self.spool.pending_events == 0:
                return
            self._idle = trio.Event()
            self._wakeup.set()

    async def aclose(self) -> None:
        await self.disconnect()
        await trio.to_thread.run_sync(self.spool.close)
