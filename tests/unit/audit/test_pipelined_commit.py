"""A pipelined sink (RELP, syslog ``confirm: none``, HTTP) keeps delivering while a spool commit waits for the disk.

Found with ``scripts/bench/pg --sink relp``: the committer confirmed batches *and* committed the
cursor (two fsyncs) in one task; on a busy disk a commit took long enough for the batches behind it
to fill the channel, the reader then stopped submitting, and delivery fell behind the proxy (0.77
delivered/recorded over 60 s, the spool growing 2.9 MB/s).  Now a cursor task commits on its own
and confirmations go on meanwhile.

The slow disk is a fake: ``Spool.commit`` is held on a gate (a real disk does not stall on demand);
the "SIEM" is a list that takes every batch at once (the scheduling is the point, not the network).
"""

from __future__ import annotations

import threading

import trio

from dbproxy.audit.sinks.spooled import SpooledSink


class InstantSink(SpooledSink):
    """Takes every batch the moment it is submitted; one event per batch, at most 4 batches in flight."""

    pipelined = True

    def __init__(self, **kw):
        super().__init__(name="instant", batch_max_events=1, **kw)
        self.max_in_flight = 4
        self.got: list[bytes] = []

    async def submit(self, payloads, nursery):
        self.got.extend(payloads)
        return len(self.got)

    async def confirm(self, ticket):
        await trio.lowlevel.checkpoint()


def _event(seq: int) -> dict:
    return {"seq": seq, "hash": f"{seq:064x}", "event": "e"}


async def test_delivery_goes_on_while_a_commit_waits_for_the_disk(tmp_path):
    sink = InstantSink(spool_dir=str(tmp_path / "spool"))
    disk = threading.Event()  # the stalled disk: commits wait here until it is set
    stalled = threading.Event()
    commit = sink.spool.commit

    def slow_commit(pos):
        stalled.set()
        disk.wait(30)
        commit(pos)

    sink.spool.commit = slow_commit
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(sink.run)
            await sink.write_batch([_event(1)])
            with trio.fail_after(5):
                while not stalled.is_set():  # the first batch's commit is waiting for the disk
                    await trio.sleep(0.01)
            await sink.write_batch([_event(seq) for seq in range(2, 51)])
            # 49 more batches, far more than the 4 in flight: all delivered while the commit waits.
            with trio.move_on_after(5):
                while len(sink.got) < 50:
                    await trio.sleep(0.01)
            assert len(sink.got) == 50, f"{len(sink.got)} of 50 events delivered while a commit waited for the disk"
            assert not disk.is_set() and sink.spool.pending_events == 50  # nothing committed yet: the disk is stalled
            disk.set()
            with trio.fail_after(5):
                await sink.wait_idle()
            # Every confirmed batch committed, none re-sent.
            assert sink.spool.pending_events == 0 and sink.delivered == 50 and len(sink.got) == 50
            nursery.cancel_scope.cancel()
    finally:
        disk.set()
    await sink.aclose()
