"""The audit worker behind the real proxy: PostgreSQL 15, psycopg, ``dbproxy serve``.

``dbproxy serve`` writes its trail from a child process (``audit.worker``); a PostgreSQL session
with no statement rules is audited there through a tap of the bytes the proxy forwarded.  Shown
here: the worker is a child of the proxy and the trail it writes for tapped sessions carries every
query, result and the session's counts; ``"worker": false`` keeps the trail in the proxy's own
loop with the same events; killing the worker under a running session ends that session with
SQLSTATE 53000 (its audit is gone), while the proxy starts a new worker and later sessions are
audited on the same chain.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import psycopg
import pytest

from dbproxy.audit.chain import verify_files
from tests.support import (
    ProxyProcess, audit_worker_pids, jsonl_audit, pg_connect, pg_scram_config, read_audit, wait_until,
)

pytestmark = pytest.mark.integration


def config(pg, workdir: Path, *, worker: bool | None = None) -> dict:
    return pg_scram_config(pg, workdir, jsonl_audit(workdir, worker=worker))



def workload(proxy: ProxyProcess) -> None:
    with pg_connect(proxy) as conn:
        conn.execute("CREATE TEMP TABLE t (id int primary key, v text)")
        conn.execute("INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 25) g")
        assert conn.execute("SELECT count(*) FROM t WHERE id > %s", (5,)).fetchone() == (20,)
        with pytest.raises(psycopg.errors.UndefinedColumn):
            conn.execute("SELECT nope FROM t")


def session_events(events: list[dict]) -> list[tuple]:
    """The audit of the workload, without ids and times."""
    out = []
    for e in events:
        if e["event"] in ("db.session.query", "db.session.result", "db.session.postgres.statements.execute"):
            out.append((e["event"], e.get("db_query"), e.get("affected_records"), e.get("sqlstate"), e.get("success")))
        elif e["event"] == "db.session.end":
            out.append((e["event"], e.get("queries"), e.get("errors"), e.get("reason")))
    return out


@pytest.mark.parametrize("worker", [True, False])
def test_the_trail_is_the_same_with_and_without_the_worker(pg, tmp_path, worker):
    proxy = ProxyProcess(tmp_path, config(pg, tmp_path, worker=None if worker else False)).start()
    try:
        kids = audit_worker_pids(proxy.proc.pid)
        assert len(kids) == (1 if worker else 0)
        workload(proxy)
        events = read_audit(tmp_path / "audit.jsonl", wait_for=1)
        wait_until(lambda: any(e["event"] == "db.session.end" for e in read_audit(tmp_path / "audit.jsonl")),
                   timeout=10, what="the session end event")
    finally:
        proxy.stop()
    events = read_audit(tmp_path / "audit.jsonl")
    got = session_events(events)
    # psycopg: simple Query for parameterless statements, extended protocol with parameters.
    assert ("db.session.result", None, 25, None, True) in got
    assert ("db.session.result", None, None, "42703", False) in got
    assert got[-1][0] == "db.session.end" and got[-1][1] == 4 and got[-1][2] == 1
    # psycopg's close sends Terminate: noted inline by the audit stage, tapped by the client Tee's watch.
    assert got[-1][3] == "client terminated"
    queries = [g[1] for g in got if g[0] != "db.session.result" and g[0] != "db.session.end"]
    assert queries == [
        "CREATE TEMP TABLE t (id int primary key, v text)",
        "INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 25) g",
        "SELECT count(*) FROM t WHERE id > $1",
        "SELECT nope FROM t",
    ]
    assert verify_files([str(tmp_path / "audit.jsonl")]).ok


def test_a_killed_worker_ends_the_running_session_and_a_new_one_takes_over(pg, tmp_path):
    proxy = ProxyProcess(tmp_path, config(pg, tmp_path)).start()
    try:
        [first] = audit_worker_pids(proxy.proc.pid)
        with pg_connect(proxy) as conn:
            conn.execute("SELECT 1")
            wait_until(lambda: len(read_audit(tmp_path / "audit.jsonl")) >= 4, timeout=10, what="the first events")  # proxy.start, then the session
            os.kill(first, signal.SIGKILL)
            with pytest.raises(psycopg.OperationalError) as told:
                for _ in range(200):
                    conn.execute("SELECT 2")
                    __import__("time").sleep(0.02)
            assert "audit unavailable" in str(told.value)
            assert told.value.sqlstate == "53000"

        def new_worker():
            kids = audit_worker_pids(proxy.proc.pid)
            return kids and kids != [first]

        wait_until(new_worker, timeout=20, what="a new audit worker")

        def audited_again():
            try:
                with pg_connect(proxy) as conn:
                    conn.execute("SELECT 'after'")
                return True
            except psycopg.OperationalError:
                return False

        wait_until(audited_again, timeout=20, what="sessions accepted again")
        assert "audit worker" in proxy.log_text() and "died" in proxy.log_text()
    finally:
        proxy.stop()
    events = read_audit(tmp_path / "audit.jsonl")
    assert "SELECT 'after'" in [e.get("db_query") for e in events]
    result = verify_files([str(tmp_path / "audit.jsonl")])
    assert result.ok, result.error
