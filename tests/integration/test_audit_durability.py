"""No acknowledged statement is lost when the audit worker dies: PostgreSQL 15, psycopg, ``dbproxy serve``.

Ten psycopg clients run statements through the proxy as fast as they can; each records every statement
it received a result for.  The audit worker is SIGKILLed under that load: the sessions end with SQLSTATE
53000 (their audit worker is gone), the proxy starts a new worker and hands it every frame the dead one
had not acked.  The trail must then hold every statement a client got a result for — 0 missing — and
``dbproxy audit verify`` must find neither a broken chain nor a session with missing events.

With ``"durability": "ack"`` the stronger promise holds at every moment: a client never has a result
whose statement is not yet in the JSONL file.  Shown by stopping the worker (SIGSTOP: it can neither
write nor ack) under a running client: the client's next statement gets no answer until the worker
goes on; and by reading the trail right after the kill, before any new worker ran.

Tapped events carry the time the proxy saw the bytes: with the worker stopped while a client runs
statements, the events written after it resumes are still in time order, the end event last.
"""

from __future__ import annotations

import datetime
import os
import signal
import threading
import time
from pathlib import Path

import psycopg
import pytest

from dbproxy.audit.chain import verify_files
from tests.support import (
    ProxyProcess, audit_worker_pids, jsonl_audit, pg_connect, pg_scram_config, read_audit, wait_until,
)

pytestmark = pytest.mark.integration

CLIENTS = 10


def config(pg, workdir: Path, **audit_options) -> dict:
    return pg_scram_config(pg, workdir, jsonl_audit(workdir, **audit_options))



def worker_pids(proxy: ProxyProcess) -> list[int]:
    return audit_worker_pids(proxy.proc.pid)


class Client(threading.Thread):
    """Runs distinct statements until the proxy ends its session; keeps those it got results for."""

    def __init__(self, proxy: ProxyProcess, n: int, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.proxy, self.n, self.stop = proxy, n, stop
        self.answered: list[str] = []
        self.error: BaseException | None = None
        self.running = threading.Event()

    def run(self) -> None:
        try:
            with pg_connect(self.proxy) as conn:
                i = 0
                while not self.stop.is_set():
                    sql = f"SELECT {self.n} AS client, {i} AS statement"
                    assert conn.execute(sql).fetchone() == (self.n, i)
                    self.answered.append(sql)  # the client has this statement's result
                    self.running.set()
                    i += 1
        except psycopg.OperationalError as exc:
            self.error = exc
        finally:
            self.running.set()


def audited_queries(path: Path) -> set[str]:
    return {e["db_query"] for e in read_audit(path) if e["event"] == "db.session.query"}


def test_a_worker_killed_under_load_loses_no_answered_statement(pg, tmp_path):
    proxy = ProxyProcess(tmp_path, config(pg, tmp_path)).start()
    trail = tmp_path / "audit.jsonl"
    try:
        [first] = worker_pids(proxy)
        stop = threading.Event()
        clients = [Client(proxy, n, stop) for n in range(CLIENTS)]
        for c in clients:
            c.start()
        for c in clients:
            assert c.running.wait(20)
        # Under load: frames in the link, in the pipe, in the worker's queue.  Kill once the
        # clients have a real load behind them (counted, not timed: a busy machine is slower).
        deadline = time.monotonic() + 60
        while sum(len(c.answered) for c in clients) <= 100 * CLIENTS and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(first, signal.SIGKILL)
        for c in clients:
            c.join(30)
        stop.set()
        assert all(not c.is_alive() for c in clients)
        # Ended by the proxy as designed: their audit worker is gone.
        assert all(c.error is not None and c.error.sqlstate == "53000" for c in clients), \
            [repr(c.error) for c in clients]
        wait_until(lambda: worker_pids(proxy) and worker_pids(proxy) != [first], timeout=20, what="a new worker")
        answered = [sql for c in clients for sql in c.answered]
        assert len(answered) > 100 * CLIENTS  # a real load, not a trickle
        # Everything the dead worker had not acked goes to the new one, which writes it.
        deadline = time.monotonic() + 30
        while not set(answered) <= audited_queries(trail) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        assert proxy.stop() == 0
    missing = set(answered) - audited_queries(trail)
    assert len(missing) == 0, f"{len(missing)} of {len(answered)} answered statements are not in the trail"
    result = verify_files([str(trail)])
    assert result.ok, (result.error, result.gaps[:5])
    assert result.counted_sessions == CLIENTS and result.runs == 1
    events = read_audit(trail)
    assert events[0]["event"] == "proxy.start" and events[-1]["event"] == "proxy.stop"
    assert "previous_stopped_cleanly" not in events[0]  # a new trail: unknown


def test_verify_finds_the_unclean_restart_of_a_killed_proxy(pg, tmp_path):
    first = ProxyProcess(tmp_path, config(pg, tmp_path), name="first").start()
    try:
        conn = pg_connect(first)
        conn.execute("SELECT 'open when the proxy died'")
        wait_until(lambda: "SELECT 'open when the proxy died'" in audited_queries(tmp_path / "audit.jsonl"),
                   timeout=10, what="the query")
    finally:
        first.kill()  # SIGKILL: no proxy.stop, no end event for the open session
    second = ProxyProcess(tmp_path, config(pg, tmp_path), name="second").start()
    try:
        with pg_connect(second) as c:
            c.execute("SELECT 'after'")
        wait_until(lambda: "SELECT 'after'" in audited_queries(tmp_path / "audit.jsonl"), timeout=10, what="after")
    finally:
        assert second.stop() == 0
    starts = [e for e in read_audit(tmp_path / "audit.jsonl") if e["event"] == "proxy.start"]
    assert [s.get("previous_stopped_cleanly") for s in starts] == [None, False]
    result = verify_files([str(tmp_path / "audit.jsonl")])
    assert result.chain_ok and not result.ok
    assert len(result.gaps) == 2, result.gaps
    assert result.gaps[0].startswith("unclean restart") and "no end event" in result.gaps[1]


def test_with_durability_ack_no_result_reaches_a_client_before_its_audit_record(pg, tmp_path):
    proxy = ProxyProcess(tmp_path, config(pg, tmp_path, durability="ack")).start()
    trail = tmp_path / "audit.jsonl"
    try:
        [worker] = worker_pids(proxy)
        with pg_connect(proxy) as conn:
            assert conn.execute("SELECT 'before'").fetchone() == ("before",)
            assert "SELECT 'before'" in audited_queries(trail)  # durable before the client had it
            # A worker that cannot write: the completion is held, the client waits for it.
            os.kill(worker, signal.SIGSTOP)
            try:
                answered = threading.Event()

                def held() -> None:
                    conn.execute("SELECT 'held'").fetchone()
                    answered.set()

                t = threading.Thread(target=held, daemon=True)
                t.start()
                assert not answered.wait(1.5), "the client got a result whose audit record was not written"
                assert "SELECT 'held'" not in audited_queries(trail)
            finally:
                os.kill(worker, signal.SIGCONT)
            assert answered.wait(20)
            t.join(5)
            assert "SELECT 'held'" in audited_queries(trail)
        # Under load, killed: at that moment every answered statement is in the file already.
        stop = threading.Event()
        clients = [Client(proxy, n, stop) for n in range(8)]
        for c in clients:
            c.start()
        for c in clients:
            assert c.running.wait(20)
        deadline = time.monotonic() + 60
        while sum(len(c.answered) for c in clients) <= 50 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        os.kill(worker, signal.SIGKILL)
        for c in clients:
            c.join(30)
        written = audited_queries(trail)  # no new worker has run yet (it starts a second after the death)
        answered = [sql for c in clients for sql in c.answered]
        assert len(answered) > 50
        missing = set(answered) - written
        assert len(missing) == 0, f"{len(missing)} of {len(answered)} answered statements were not yet durable"
    finally:
        proxy.stop()


def test_tapped_events_carry_the_time_the_proxy_saw_them(pg, tmp_path):
    proxy = ProxyProcess(tmp_path, config(pg, tmp_path)).start()
    trail = tmp_path / "audit.jsonl"
    try:
        [worker] = worker_pids(proxy)
        conn = pg_connect(proxy)
        conn.execute("SELECT 'first'")
        wait_until(lambda: "SELECT 'first'" in audited_queries(trail), timeout=10, what="the first query")
        # The worker parses late (stopped), the proxy sees queries, then the session's end.
        os.kill(worker, signal.SIGSTOP)
        try:
            for i in range(5):
                conn.execute(f"SELECT {i}")
                time.sleep(0.2)
            conn.close()
            time.sleep(0.5)
        finally:
            os.kill(worker, signal.SIGCONT)
        wait_until(lambda: any(e["event"] == "db.session.end" for e in read_audit(trail)), timeout=20,
                   what="the session's end")
    finally:
        proxy.stop()
    events = [e for e in read_audit(trail) if e.get("sid")]
    times = [e["time"] for e in events]
    assert [e["event"] for e in events][-1] == "db.session.end"
    assert times == sorted(times), [(e["event"], e.get("db_query"), e["time"]) for e in events]
    queries = [e for e in events if e["event"] == "db.session.query"]
    assert len(queries) == 6
    # Stamped when the proxy saw them, 0.2 s apart — not all at once when the worker resumed.
    seen = [datetime.datetime.fromisoformat(q["time"].replace("Z", "+00:00")).timestamp() for q in queries[1:]]
    assert all(b - a >= 0.15 for a, b in zip(seen, seen[1:])), [q["time"] for q in queries]
