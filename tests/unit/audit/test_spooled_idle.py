"""``SpooledSink.wait_idle`` (the graceful shutdown's flush) returns once the spool is delivered, also
when it began while one batch was in flight and another queued behind it.

Found with the Kafka sink's integration test: the proxy's last event was delivered and committed, but
the shutdown still waited its whole ``shutdown_flush_seconds`` and logged "undelivered events stay in
the spool", because the sender replaced the ``_idle`` event that ``wait_idle`` was waiting on.  The
"SIEM" here is a list behind a gate (the delivery timing is the point, not the network)."""

from __future__ import annotations

import trio

from dbproxy.audit.sinks.spooled import SpooledSink


class GatedSink(SpooledSink):
    def __init__(self, **kw):
        super().__init__(name="gated", **kw)
        self.gate = trio.Event()
        self.in_flight = trio.Event()
        self.got: list[bytes] = []

    async def deliver(self, payloads):
        self.in_flight.set()
        await self.gate.wait()
        self.got.extend(payloads)


def _event(seq: int) -> dict:
    return {"seq": seq, "hash": f"{seq:064x}", "event": "e"}


async def test_wait_idle_returns_after_a_batch_queued_behind_one_in_flight(tmp_path):
    sink = GatedSink(spool_dir=str(tmp_path / "spool"))
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        await sink.write_batch([_event(1)])
        await sink.in_flight.wait()  # batch 1 is being delivered
        done = trio.Event()

        async def flush():
            await sink.wait_idle()
            done.set()

        nursery.start_soon(flush)
        await trio.sleep(0.01)  # wait_idle is waiting now
        await sink.write_batch([_event(2)])  # queued behind the batch in flight
        sink.gate.set()
        with trio.fail_after(2):
            await done.wait()
        assert len(sink.got) == 2 and sink.spool.pending_events == 0
        nursery.cancel_scope.cancel()
    await sink.aclose()
