"""The recorder with spooled sinks: order, retries, chain across restarts, fail-closed and drop-oldest.

``ListSink`` is a spooled sink whose "SIEM" is a Python list and whose
outage is a flag — the network itself is covered by the integration tests
(real rsyslog, a real HTTP receiver); here the spool/recorder logic is.
"""

from __future__ import annotations

import logging

import orjson
import pytest
import trio

from dbproxy.audit import events as ev
from dbproxy.audit.recorder import AuditRecorder, AuditUnavailable
from dbproxy.audit.sinks.jsonl import JsonlSink
from dbproxy.audit.sinks.spooled import DeliveryFailed, SpooledSink
from dbproxy.audit.chain import verify_files
from dbproxy.session import Session


class ListSink(SpooledSink):
    def __init__(self, **kw):
        kw.setdefault("name", "list")
        kw.setdefault("retry_initial_seconds", 0.01)
        kw.setdefault("retry_max_seconds", 0.05)
        kw.setdefault("shutdown_flush_seconds", 0.5)
        super().__init__(**kw)
        self.got: list[dict] = []
        self.down = False
        self.attempts = 0

    async def deliver(self, payloads):
        self.attempts += 1
        if self.down:
            raise DeliveryFailed("receiver down")
        self.got.extend(orjson.loads(p) for p in payloads)


def session(started=True) -> Session:
    s = Session(listener="l", protocol="postgres", client_addr="127.0.0.1:1")
    s.started = started
    return s


async def wait_for(predicate, timeout=5.0):
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.005)


async def run_recorder(sinks, body, capacity=10_000):
    recorder = AuditRecorder(sinks, capacity=capacity)
    async with trio.open_nursery() as nursery:
        await nursery.start(recorder.run)
        try:
            await body(recorder)
        finally:
            with trio.fail_after(10):
                await recorder.aclose()
    return recorder


def emit_queries(recorder, n, start=0):
    audit = recorder.session(session())
    for i in range(start, start + n):
        audit.on_query(f"SELECT {i}")
    return audit


async def test_chain_continues_across_restarts_jsonl(tmp_path):
    path = str(tmp_path / "a.jsonl")

    async def body(recorder):
        emit_queries(recorder, 5)

    await run_recorder([JsonlSink(path=path)], body)
    r2 = await run_recorder([JsonlSink(path=path)], body)
    assert r2.last_seq == 10
    result = verify_files([path])
    assert result.ok and (result.first_seq, result.last_seq, result.events) == (1, 10, 10)


async def test_chain_recovered_from_spool_when_the_file_is_gone(tmp_path):
    path = tmp_path / "a.jsonl"

    async def body(recorder):
        emit_queries(recorder, 4)

    await run_recorder([JsonlSink(path=str(path)), ListSink(spool_dir=str(tmp_path / "spool"))], body)
    last = orjson.loads(path.read_bytes().splitlines()[-1])
    path.unlink()
    sink = ListSink(spool_dir=str(tmp_path / "spool"))
    r2 = await run_recorder([sink], body)
    assert [e["seq"] for e in sink.got] == [5, 6, 7, 8]
    assert sink.got[0]["prev_hash"] == last["hash"]
    assert r2.last_seq == 8


async def test_outage_then_delivery_in_order_exactly_once(tmp_path):
    sink = ListSink(spool_dir=str(tmp_path / "spool"), batch_max_events=7)

    async def body(recorder):
        emit_queries(recorder, 20)
        await wait_for(lambda: len(sink.got) == 20)
        sink.down = True
        emit_queries(recorder, 30, 20)
        await wait_for(lambda: sink.attempts > 3 and sink.statistics().pending_events == 30)
        assert sink.failing
        sink.down = False
        emit_queries(recorder, 10, 50)
        await wait_for(lambda: len(sink.got) == 60)

    await run_recorder([sink], body)
    assert [e["seq"] for e in sink.got] == list(range(1, 61))
    assert [e["db_query"] for e in sink.got] == [f"SELECT {i}" for i in range(60)]
    assert len({e["uid"] for e in sink.got}) == 60


async def test_undelivered_events_survive_a_restart_and_go_first(tmp_path):
    spool = str(tmp_path / "spool")
    first = ListSink(spool_dir=spool)
    first.down = True

    async def body1(recorder):
        emit_queries(recorder, 12)
        await wait_for(lambda: first.statistics().pending_events == 12)

    await run_recorder([first], body1)  # shutdown gives up after shutdown_flush_seconds; the spool keeps them
    assert first.got == []
    second = ListSink(spool_dir=spool)

    async def body2(recorder):
        emit_queries(recorder, 3, 12)
        await wait_for(lambda: len(second.got) == 15)

    await run_recorder([second], body2)
    assert [e["seq"] for e in second.got] == list(range(1, 16))
    assert [e["db_query"] for e in second.got] == [f"SELECT {i}" for i in range(15)]


async def test_fail_closed_blocks_sessions_until_the_siem_returns(tmp_path):
    sink = ListSink(spool_dir=str(tmp_path / "spool"), spool_max_bytes=16 * 1024, on_full="fail_closed")
    sink.down = True

    async def body(recorder):
        audit = recorder.session(session())
        idle = recorder.session(session(started=False))
        quiet = recorder.session(session())  # a running session with nothing to say
        n = 0
        while recorder.accepting:
            audit.on_query(f"SELECT {n}")
            n += 1
            await trio.sleep(0.001)
            assert n < 5000
        await wait_for(lambda: bool(quiet._pending))  # pipelines flush only sessions with something pending
        with pytest.raises(AuditUnavailable):
            await quiet.flush()
        with pytest.raises(AuditUnavailable) as info:
            await audit.flush()
        assert info.value.sqlstate == "53000" and "audit unavailable" in info.value.client_hint
        await audit.flush()  # told once; the session's own shutdown path must not raise again
        await idle.flush()  # a session that has not started is refused by the server instead
        audit.on_session_end(reason="audit unavailable")
        n += 1
        held = sink.statistics()
        assert held.overflow > 0 and held.blocked and held.dropped == 0
        sink.down = False
        await wait_for(lambda: len(sink.got) == n)
        assert recorder.accepting

    recorder = await run_recorder([sink], body)
    assert [e["seq"] for e in sink.got] == list(range(1, recorder.last_seq + 1))
    assert sink.got[-1]["event"] == ev.SESSION_END


async def test_drop_oldest_counts_logs_and_records_the_loss(tmp_path, caplog):
    caplog.set_level(logging.ERROR, logger="dbproxy.audit.sink")
    path = str(tmp_path / "a.jsonl")
    sink = ListSink(spool_dir=str(tmp_path / "spool"), spool_max_bytes=16 * 1024, on_full="drop_oldest")
    sink.down = True

    async def body(recorder):
        emit_queries(recorder, 200)
        await wait_for(lambda: recorder.dropped > 0 and recorder.statistics().queued == 0)
        assert recorder.accepting  # drop_oldest never refuses sessions
        await trio.sleep(0.05)
        sink.down = False
        await wait_for(lambda: sink.statistics().pending_events == 0 and sink.got)

    recorder = await run_recorder([JsonlSink(path=path), sink], body)
    trail = [orjson.loads(line) for line in open(path, "rb")]
    losses = [e for e in trail if e["event"] == ev.AUDIT_LOSS]
    assert losses and sum(e["dropped"] for e in losses) == recorder.dropped == sink.statistics().dropped
    assert losses[0]["code"] == "TAU00W" and losses[0]["sink"] == "list"
    assert verify_files([path]).ok  # the local trail is whole; only the SIEM's copy has a gap
    got = [e["seq"] for e in sink.got]
    assert got == sorted(got) and len(got) + recorder.dropped == recorder.last_seq
    dropped = {s for e in losses for s in range(e["dropped_first_seq"], e["dropped_last_seq"] + 1)}
    assert dropped.isdisjoint(got) and len(dropped) == recorder.dropped
    assert any("dropped" in r.getMessage() and "oldest" in r.getMessage() for r in caplog.records)


async def test_statistics_snapshot(tmp_path):
    sink = ListSink(spool_dir=str(tmp_path / "spool"))

    async def body(recorder):
        emit_queries(recorder, 3)
        # A batch counts as delivered before the spool's cursor commit ends (so /metrics never
        # lags the SIEM): wait for the commit too, then the snapshot must show all of it.
        await wait_for(lambda: sink.statistics().delivered == 3 and sink.statistics().pending_events == 0)
        stats = recorder.statistics()
        assert stats.last_seq == 3 and stats.accepting and stats.dropped == 0
        assert stats.sinks[0].delivered == 3 and stats.sinks[0].pending_events == 0

    await run_recorder([sink], body)
