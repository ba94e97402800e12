"""The audit link and the audit worker process, for real: ``python -m audit.worker`` is started by
``AuditLink.run`` from a config file, exactly as ``dbproxy serve`` does.

Proven here: events and a PostgreSQL tap (protocol bytes the proxy forwarded) come out of the worker as
one ordered, chained trail with the session's counts merged into its end event; the link's budget gives
backpressure, never loss; a worker killed under a live session ends that session (``AuditUnavailable``),
a new worker continues the chain; the worker ignores a terminal's SIGINT; and when the proxy itself dies
(no ``Q`` frame, just end of input) the worker writes what it got and exits at once instead of spending
a network sink's shutdown grace.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time

import orjson
import pytest
import trio
import trio.testing

from dbproxy.audit.link import EVENT, FRAME, AuditLink
from dbproxy.audit.recorder import AuditUnavailable
from dbproxy.audit.chain import verify_files
from dbproxy.session import Session
from dbproxy.engines.postgres.tap import Tap as PgTap
from tests.support import read_audit


def write_config(tmp_path, sinks=None) -> str:
    secret = tmp_path / "backend.secret"
    secret.write_text("unused\n")
    backend = {"address": "127.0.0.1:1", "database": "app", "user": "app",
               "auth": {"method": "scram-sha-256", "password_file": str(secret)}}
    config = {
        "listeners": [{"name": "pg", "protocol": "postgres", "listen": "127.0.0.1:0",
                       "routes": [{"name": "r", "backend": backend}]}],
        "audit": {"sinks": sinks or [{"type": "jsonl", "path": str(tmp_path / "audit.jsonl")}]},
    }
    path = tmp_path / "dbproxy.json"
    path.write_text(json.dumps(config))
    return str(path)


def pg(t: str, body: bytes) -> bytes:
    return t.encode() + struct.pack(">i", len(body) + 4) + body


QUERY = pg("Q", b"SELECT abalance FROM pgbench_accounts WHERE aid = 7;\0")
ANSWER = (pg("T", b"\0\x01abalance\0" + struct.pack(">ihihih", 16400, 3, 23, 4, -1, 0))
          + pg("D", struct.pack(">hi", 1, 1) + b"0") + pg("C", b"SELECT 1\0") + pg("Z", b"I"))
BAD = pg("Q", b"SELECT nope;\0")
BAD_ANSWER = pg("E", b"SERROR\0C42703\0Mcolumn \"nope\" does not exist\0\0") + pg("Z", b"I")


def new_session() -> Session:
    return Session(listener="pg", protocol="postgres", client_addr="127.0.0.1:5555",
                   db_name="app", db_user="app", backend_addr="127.0.0.1:1", route_name="r")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return stat_fields(pid)[0] != "Z"


def stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the command name: field 3 (state) first."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


async def test_events_and_a_tap_become_one_ordered_chained_trail(tmp_path):
    link = AuditLink(write_config(tmp_path))
    async with trio.open_nursery() as nursery:
        await nursery.start(link.run)
        worker = link.pid
        assert worker is not None and worker != os.getpid() and alive(worker)
        session = new_session()
        audit = link.session(session)
        audit.on_session_start(success=True)
        slot = audit.tap_open(PgTap)
        # Forwarded in arbitrary chunkings, in forwarding order: a query, its answer, a failing one.
        audit.tap(slot, 0, QUERY[:7])
        audit.tap(slot, 0, QUERY[7:])
        audit.tap(slot, 1, ANSWER)
        audit.tap(slot, 0, BAD)
        for i in range(0, len(BAD_ANSWER), 5):
            audit.tap(slot, 1, BAD_ANSWER[i:i + 5])
        audit.tap_close(slot)
        audit.on_session_end(reason="client terminated")
        await link.aclose()
    with trio.fail_after(10):
        while alive(worker):
            await trio.sleep(0.02)
    events = read_audit(tmp_path / "audit.jsonl")
    assert [e["event"] for e in events] == [
        "db.session.start", "db.session.query", "db.session.result", "db.session.query", "db.session.result",
        "db.session.end",
    ]
    start, q1, r1, q2, r2, end = events
    assert q1["db_query"] == "SELECT abalance FROM pgbench_accounts WHERE aid = 7;"
    assert r1["query_uid"] == q1["uid"] and r1["affected_records"] == 1 and r1["success"] is True
    assert r2["query_uid"] == q2["uid"] and r2["success"] is False and r2["sqlstate"] == "42703"
    # The session's common fields ride on the tap's events too.
    for e in events:
        assert e["sid"] == session.id and e["db_name"] == "app" and e["route"] == "r"
    # Counts the worker's tap kept, merged into the end event the proxy sent.
    assert end["queries"] == 2 and end["errors"] == 1 and end["reason"] == "client terminated"
    assert [e["seq"] for e in events] == [1, 2, 3, 4, 5, 6]
    assert verify_files([str(tmp_path / "audit.jsonl")]).ok


async def test_budget_gives_backpressure_never_loss(tmp_path):
    link = AuditLink(write_config(tmp_path), capacity_bytes=4096)
    async with trio.open_nursery() as nursery:
        await nursery.start(link.run)
        audit = link.session(new_session())
        audit.on_session_start(success=True)
        slot = audit.tap_open(PgTap)
        # Without yielding, the budget fills: events are held by the session, taps report congestion.
        n = 0
        while link.submit_nowait(b'{"event":"filler","n":%d}' % n):
            n += 1
        assert link.congested and 0 < n < 200
        held_before = len(audit._pending)
        audit.on_query("SELECT 'held'")
        assert len(audit._pending) == held_before + 1  # kept by the session, not dropped
        audit.tap(slot, 0, QUERY)
        audit.tap(slot, 1, ANSWER)
        # The pipeline calls flush when anything is pending: it waits for room, then hands over.
        with trio.fail_after(10):
            await audit.flush()
        assert audit._pending == []
        audit.tap_close(slot)
        audit.on_session_end(reason="done")
        await link.aclose()
    events = read_audit(tmp_path / "audit.jsonl")
    assert [e["n"] for e in events if e["event"] == "filler"] == list(range(n))
    kinds = [e["event"] for e in events if e["event"] != "filler"]
    assert kinds == ["db.session.start", "db.session.query", "db.session.query", "db.session.result",
                     "db.session.end"]
    assert verify_files([str(tmp_path / "audit.jsonl")]).ok


async def test_a_killed_worker_ends_live_sessions_and_a_new_one_continues_the_chain(tmp_path):
    link = AuditLink(write_config(tmp_path))
    async with trio.open_nursery() as nursery:
        await nursery.start(link.run)
        first = link.pid
        audit = link.session(new_session())
        audit.on_session_start(success=True)
        audit.on_query("SELECT 1")
        await trio.sleep(0.3)  # handed over and written
        before = len(read_audit(tmp_path / "audit.jsonl", wait_for=2))
        os.kill(first, signal.SIGKILL)
        with trio.fail_after(10):
            while not audit._pending:  # told: the pipeline will call flush
                await trio.sleep(0.01)
        with pytest.raises(AuditUnavailable):
            await audit.flush()
        with trio.fail_after(20):
            while not (link.accepting and link.pid != first):
                await trio.sleep(0.05)
        assert link.worker_starts == 2 and alive(link.pid)
        later = link.session(new_session())
        later.on_session_start(success=True)
        later.on_query("SELECT 2")
        await link.aclose()
    events = read_audit(tmp_path / "audit.jsonl")
    assert before == 2 and [e["db_query"] for e in events if e["event"] == "db.session.query"][-1] == "SELECT 2"
    result = verify_files([str(tmp_path / "audit.jsonl")])
    assert result.ok, result.error
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))


async def test_the_worker_ignores_sigint(tmp_path):
    link = AuditLink(write_config(tmp_path))
    async with trio.open_nursery() as nursery:
        await nursery.start(link.run)
        worker = link.pid
        os.kill(worker, signal.SIGINT)  # what a terminal's Ctrl-C sends the whole process group
        await trio.sleep(0.5)
        assert alive(worker) and link.accepting
        audit = link.session(new_session())
        audit.on_session_start(success=True)
        await link.aclose()
    assert link.worker_starts == 1
    assert [e["event"] for e in read_audit(tmp_path / "audit.jsonl")] == ["db.session.start"]


def nice_of(pid: int) -> int:
    """The nice level of ``pid`` (field 19 of /proc/PID/stat)."""
    return int(stat_fields(pid)[16])


@pytest.mark.parametrize(("audit", "expected"), [
    ({}, 15),  # durability "async": no session waits for the worker, it yields the CPU to them
    ({"durability": "ack"}, 0),  # every answer waits for it: no lower priority
    ({"worker_nice": 3}, 3),
    ({"durability": "ack", "worker_nice": 5}, 5),
])
async def test_the_worker_runs_at_the_configured_nice_level(tmp_path, audit, expected):
    path = write_config(tmp_path)
    config = json.loads(open(path).read())
    config["audit"].update(audit)
    with open(path, "w") as f:
        json.dump(config, f)
    mine = os.nice(0)
    link = AuditLink(path)
    async with trio.open_nursery() as nursery:
        await nursery.start(link.run)
        assert nice_of(link.pid) == min(19, mine + expected)  # the kernel caps it at 19
        assert nice_of(os.getpid()) == mine  # the proxy's own loop keeps its priority
        link.session(new_session()).on_session_start(success=True)
        await link.aclose()
    assert [e["event"] for e in read_audit(tmp_path / "audit.jsonl")] == ["db.session.start"]


def test_worker_nice_is_validated(tmp_path):
    from dbproxy.config import load_audit_config
    from dbproxy.errors import ConfigErrors

    path = write_config(tmp_path)
    config = json.loads(open(path).read())
    for bad, expectation in ((20, "at most 19 (a nice level)"), (-1, "an integer >= 0"), ("high", "an integer >= 0")):
        config["audit"]["worker_nice"] = bad
        with open(path, "w") as f:
            json.dump(config, f)
        with pytest.raises(ConfigErrors) as err:
            load_audit_config(path)
        text = str(err.value)
        assert "dbproxy.json" in text and "audit.worker_nice" in text and expectation in text, text


def test_when_the_proxy_dies_the_worker_writes_what_it_got_and_exits_at_once(tmp_path):
    # An HTTP sink whose receiver is gone, with a long shutdown grace: a clean stop would wait for it.
    closed = __import__("socket").socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    sinks = [
        {"type": "http", "url": f"http://127.0.0.1:{port}/ingest", "format": "ndjson",
         "spool_dir": str(tmp_path / "spool"), "shutdown_flush_seconds": 60, "retry_initial_seconds": 0.05},
        {"type": "jsonl", "path": str(tmp_path / "audit.jsonl")},
    ]
    worker = subprocess.Popen([sys.executable, "-m", "dbproxy.audit.worker", write_config(tmp_path, sinks)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        hello = orjson.loads(worker.stdout.readline())
        assert hello["ready"] is True and hello["last_seq"] == 0
        for i in range(3):
            body = b'{"event":"db.session.query","db_query":"SELECT %d"}' % i
            worker.stdin.write(FRAME.pack(EVENT, len(body), 0, 0, 0.0) + body)
        worker.stdin.close()  # end of input without a Q frame: the proxy is gone
        t0 = time.monotonic()
        assert worker.wait(timeout=15) == 0
        assert time.monotonic() - t0 < 10
    finally:
        if worker.poll() is None:
            worker.kill()
    assert [e["db_query"] for e in read_audit(tmp_path / "audit.jsonl")] == ["SELECT 0", "SELECT 1", "SELECT 2"]
    assert b"the proxy went away" in worker.stderr.read()
    # Undelivered to the SIEM, the events stay in the spool for the next worker.
    assert any((tmp_path / "spool").iterdir())


async def test_a_tap_that_cannot_be_parsed_is_dropped_and_recorded_others_go_on(tmp_path, caplog):
    # The proxy's Tee never forwards such bytes; a direct tap stands in for a decoder bug.
    link = AuditLink(write_config(tmp_path))
    async with trio.open_nursery() as nursery:
        await nursery.start(link.run)
        broken, fine = link.session(new_session()), link.session(new_session())
        for audit in (broken, fine):
            audit.on_session_start(success=True)
        bad_slot, good_slot = broken.tap_open(PgTap), fine.tap_open(PgTap)
        broken.tap(bad_slot, 1, b"C\x00\x00\x00\x02")  # length 2: not a PostgreSQL frame
        broken.tap(bad_slot, 0, QUERY)  # after the failure: ignored, the tap is gone
        fine.tap(good_slot, 0, QUERY)
        fine.tap(good_slot, 1, ANSWER)
        for audit, slot in ((broken, bad_slot), (fine, good_slot)):
            audit.tap_close(slot)
            audit.on_session_end(reason="done")
        await link.aclose()
    events = read_audit(tmp_path / "audit.jsonl")
    by_session = {}
    for e in events:
        by_session.setdefault(e["sid"], []).append(e["event"])
    assert by_session[broken.session.id] == ["db.session.start", "audit.tap_failed", "db.session.end"]
    assert by_session[fine.session.id] == ["db.session.start", "db.session.query", "db.session.result",
                                          "db.session.end"]
    assert verify_files([str(tmp_path / "audit.jsonl")]).ok


def numbered_query(i: int) -> bytes:
    return pg("Q", b"SELECT %d;\0" % i)


async def test_a_worker_killed_under_load_loses_nothing_the_link_handed_it(tmp_path):
    """What the link handed a worker stays with the link until the worker acks it written; a worker
    SIGKILLed mid-stream (frames in its pipe, events in its queue, taps open) costs no event: the next
    worker gets the open taps again (their O frames), then everything not acked.  Each session's
    ``session_seq`` runs on without a hole (counters from the acks), and the trail verifies."""
    link = AuditLink(write_config(tmp_path))
    expected: dict[str, set] = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(link.run)
        first = link.pid
        audits = [link.session(new_session()) for _ in range(4)]
        slots = []
        for audit in audits:
            audit.on_session_start(success=True)
            slots.append(audit.tap_open(PgTap))
            expected[audit.session.id] = set()
        killed_at = None
        for i in range(600):
            for audit, slot in zip(audits, slots):
                audit.on_query(f"E {i}")  # an event the proxy serialised
                audit.tap(slot, 0, numbered_query(i))  # bytes the worker parses
                audit.tap(slot, 1, ANSWER)
                expected[audit.session.id] |= {f"E {i}", f"SELECT {i};"}
            if i % 10 == 9:
                await trio.sleep(0.003)  # the link writes to the worker while the emitting goes on
            if i == 300:
                with trio.fail_after(20):
                    while link.durable_mark == 0:  # acks come: some frames are forgotten, others not yet
                        await trio.sleep(0.01)
            if i == 320:
                os.kill(first, signal.SIGKILL)
                killed_at = link.durable_mark
        assert killed_at < link.queued_mark
        with trio.fail_after(30):
            while not (link.accepting and link.pid != first):
                await trio.sleep(0.02)
        for audit, slot in zip(audits, slots):
            audit.tap_close(slot)
            audit.on_session_end(reason="audit unavailable")  # as the server ends a told session
            with trio.fail_after(30):
                await audit.flush()
        assert link.worker_starts == 2
        await link.aclose()
    events = read_audit(tmp_path / "audit.jsonl")
    for sid, queries in expected.items():
        mine = [e for e in events if e.get("sid") == sid]
        got = {e.get("db_query") for e in mine if e["event"] == "db.session.query"}
        lost = len(queries - got)
        assert lost == 0, f"{lost} of {len(queries)} queries of session {sid} lost"
        [end] = [e for e in mine if e["event"] == "db.session.end"]
        assert {e["session_seq"] for e in mine} == set(range(1, end["session_seq"] + 1))
    result = verify_files([str(tmp_path / "audit.jsonl")])
    assert result.ok, (result.error, result.gaps)


class _Writes:
    """The worker's stdin as the link's sender sees it: records each write and its (trio) time."""

    def __init__(self) -> None:
        self.writes: list[tuple[float, bytes]] = []

    async def send_all(self, data: bytes) -> None:
        self.writes.append((trio.current_time(), bytes(data)))

    async def aclose(self) -> None:
        pass


async def test_the_link_writes_with_the_first_frame_after_its_delay_not_on_a_timer(autojump_clock):
    # While sessions are busy the write goes out with a frame queued after ``link_delay`` (the
    # loop is awake then anyway); a timer per write would cost a wake-up per write.  A frame with
    # none after it still goes out, after at most twice the delay.
    link = AuditLink("unused.json", link_delay=1.0)
    out = _Writes()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(link._send_frames, out, [])
        await trio.sleep(0.1)
        t0 = trio.current_time()
        link.submit_nowait(b'{"n":1}')
        await trio.sleep(1.5)  # past link_delay: the next frame takes both out
        link.submit_nowait(b'{"n":2}')
        await trio.sleep(0.01)
        assert len(out.writes) == 1, out.writes
        when, data = out.writes[0]
        assert when - t0 == pytest.approx(1.5, abs=0.02)
        assert b'{"n":1}' in data and b'{"n":2}' in data
        t1 = trio.current_time()
        link.submit_nowait(b'{"n":3}')  # and then nothing
        await trio.sleep(5)
        assert len(out.writes) == 2
        assert out.writes[1][0] - t1 <= 2.0 + 0.02 and b'{"n":3}' in out.writes[1][1]
        nursery.cancel_scope.cancel()


async def test_the_worker_takes_the_link_writes_of_its_read_delay_in_one_read(autojump_clock):
    # Durability "async": the link's writes (one per few ms under load) gather in the pipe and the
    # worker takes them in one wake-up (one checkpoint), not one wake-up each.
    from dbproxy.audit.recorder import AuditRecorder
    from dbproxy.audit.worker import READ_DELAY, Worker

    checkpoints: list[int] = []

    class Recorder(AuditRecorder):
        def checkpoint(self, frames: int, owner=None) -> None:
            checkpoints.append(frames)
            super().checkpoint(frames, owner)

    recorder = Recorder([])
    worker = Worker(recorder, _Writes())
    send, receive = trio.testing.memory_stream_one_way_pair()

    def event(n: int) -> bytes:
        body = b'{"n":%d}' % n
        return FRAME.pack(EVENT, len(body), 0, 0, 0.0) + body

    async def proxy() -> None:
        for n in range(3):
            await send.send_all(event(n))
            await trio.sleep(READ_DELAY / 4)
        await trio.sleep(READ_DELAY * 2)
        await send.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(proxy)
        await worker.read(receive)
    assert worker.frames == 3
    assert checkpoints == [1, 3]
    assert [b for b in recorder._queue if type(b) is bytes] == [b'{"n":0}', b'{"n":1}', b'{"n":2}']
