"""The PostgreSQL table audit sink: the trail as rows in a real PostgreSQL (its own server here, as
an audit database would be), batched with COPY behind the disk spool; the chain fields and each
event's exact line are kept, so the table verifies like the JSONL file; an outage of the audit
database loses nothing and duplicates nothing."""

from __future__ import annotations

import pytest

from dbproxy.audit.chain import verify_files
from tests.support import (
    ProxyProcess,
    chained_events,
    deliver_all,
    note_calls,
    pg_connect,
    pg_scram_config,
    read_audit,
    sink_from_config,
    wait_until,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def auditdb(tmp_path):
    from scripts.peers.postgres import start_postgres

    server = start_postgres(tmp_path / "auditdb", ssl=False)
    # The test peer runs with synchronous_commit off (speed): a crash would lose commits the sink
    # was told were durable.  An audit database keeps PostgreSQL's default, on.
    server.psql("-c", "ALTER SYSTEM SET synchronous_commit = on")
    server.psql("-c", "SELECT pg_reload_conf()")
    yield server
    server.stop()


def _rows(auditdb) -> list[tuple[int, str, str]]:
    out = auditdb.psql("-c", "select seq, event, line from dbproxy_audit where chain = 'test-chain' order by seq",
                       "-F", "\x1f")
    rows = []
    for line in out.splitlines():
        seq, event, text = line.split("\x1f", 2)
        rows.append((int(seq), event, text))
    return rows


def _table_exists(auditdb) -> bool:
    return auditdb.psql("-c", "select to_regclass('dbproxy_audit') is not null").strip() == "t"


def test_trail_lands_in_a_table_and_verifies(pg, auditdb, tmp_path):
    user, password = auditdb.users["scram-sha-256"]
    dsn = tmp_path / "audit.dsn"
    dsn.write_text(auditdb.dsn(user, password) + "\n")
    config = pg_scram_config(pg, tmp_path, {"sinks": [
        {"type": "jsonl", "path": str(tmp_path / "audit.jsonl")},
        {"type": "pg_table", "dsn_file": str(dsn), "chain": "test-chain", "spool_dir": str(tmp_path / "spool"),
         "retry_initial_seconds": 0.1, "retry_max_seconds": 0.5},
    ]})
    proxy = ProxyProcess(tmp_path, config).start()
    try:
        with pg_connect(proxy) as conn:
            for i in range(20):
                conn.execute("select %s::int", (i,))
        wait_until(lambda: _table_exists(auditdb), what="the table")
        # The audit database goes down: events keep coming, they wait in the spool.
        auditdb.kill()
        with pg_connect(proxy) as conn:
            for i in range(20, 30):
                conn.execute("select %s::int", (i,))
        n_outage = len(read_audit(tmp_path / "audit.jsonl"))
        auditdb.start()
        with pg_connect(proxy) as conn:
            conn.execute("select 'after'")
        trail = wait_until(lambda: (lambda t: t if t[-1]["event"] == "db.session.end" and len(t) > n_outage else None)(
            read_audit(tmp_path / "audit.jsonl")), what="the last session's end")
        rows = wait_until(lambda: (lambda r: r if len(r) >= len(trail) else None)(_rows(auditdb)), timeout=30,
                          what="every event in the table")
    finally:
        proxy.stop()
    # Every event once, in order, with the exact line the JSONL file has (the bytes its hash covers).
    jsonl_lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    assert [r[0] for r in rows] == list(range(1, len(rows) + 1)), (rows[:2], jsonl_lines[:2])
    assert [r[2] for r in rows[:len(trail)]] == jsonl_lines[:len(trail)]
    # psycopg's parameterised statements (extended protocol): an execute event each, 30 of them.
    executes = [r for r in rows if r[1] == "db.session.postgres.statements.execute"]
    assert len(executes) >= 30, sorted({r[1] for r in rows})
    # The table's lines verify as a trail of their own.
    exported = tmp_path / "from-table.jsonl"
    exported.write_text("".join(r[2] + "\n" for r in rows))
    result = verify_files([str(exported)])
    assert result.chain_ok and result.events == len(rows), result
    # The DSN's password is nowhere in the trail or the log.
    assert password not in (tmp_path / "audit.jsonl").read_text() and password not in proxy.log_text()
    body = auditdb.psql("-c", "select body->>'db_query' from dbproxy_audit where event = 'db.session.query' "
                              "order by seq desc limit 1").strip()
    assert body == "select 'after'"


def test_config_errors_name_the_path(tmp_path):
    import json

    from dbproxy.config import load_audit_config
    from dbproxy.errors import ConfigErrors

    path = tmp_path / "c.json"
    path.write_text(json.dumps({"audit": {"sinks": [
        {"type": "pg_table", "table": "x; drop table y", "spool_dir": str(tmp_path / "s")}]}}))
    with pytest.raises(ConfigErrors) as info:
        load_audit_config(str(path))
    got = [f"{e.path}: {e.expected}" for e in info.value.errors]
    assert any(g.startswith("audit.sinks[0]: one of \"dsn_file\" or \"dsn_env\"") for g in got), got
    assert any(g.startswith("audit.sinks[0].table: a table name") for g in got), got


def test_a_backlog_goes_in_one_transaction(auditdb, tmp_path):
    """A backlog of 3000 events (an outage's, or a busy proxy's) goes in one COPY and one commit
    with the sink's default batch size: each transaction waits for a WAL flush, and batches of
    500 stored 1189 events/s against 5394/s recorded (scripts/bench/pg --sink pg_table)."""
    import json

    user, password = auditdb.users["scram-sha-256"]
    dsn = tmp_path / "audit.dsn"
    dsn.write_text(auditdb.dsn(user, password) + "\n")
    sink = sink_from_config(tmp_path, {"type": "pg_table", "dsn_file": str(dsn), "chain": "test-chain",
                                       "spool_dir": str(tmp_path / "spool")})
    transactions = note_calls(sink, "_store_sync")  # the real delivery, counted
    events = chained_events(3000)
    deliver_all(sink, events)
    assert transactions == [3000]
    rows = _rows(auditdb)
    assert [r[0] for r in rows] == list(range(1, 3001))
    assert [json.loads(r[2]) for r in rows] == events


def test_batches_are_pipelined_and_land_in_order(auditdb, tmp_path):
    """While one batch's transaction runs, the next ones are already read from the spool and
    submitted (several in flight; the cursor moves in its own task): one at a time, the spool
    read and the cursor's fsyncs added to every transaction's time, and the sink stored 4397
    events/s against 6801/s recorded even in 5000-event batches (scripts/bench/pg --sink
    pg_table).  The transactions still run one after another, so rows land in ``seq`` order."""
    import json

    user, password = auditdb.users["scram-sha-256"]
    dsn = tmp_path / "audit.dsn"
    dsn.write_text(auditdb.dsn(user, password) + "\n")
    sink = sink_from_config(tmp_path, {"type": "pg_table", "dsn_file": str(dsn), "chain": "test-chain",
                                       "spool_dir": str(tmp_path / "spool"), "batch_max_events": 100})
    # The real delivery; the first seq of each batch, and how many batches were submitted and not yet confirmed.
    calls = note_calls(sink, "_store_sync", lambda payloads: (json.loads(payloads[0])["seq"], sink._in_flight))
    events = chained_events(1000)
    deliver_all(sink, events)
    seen, in_flight = [c[0] for c in calls], [c[1] for c in calls]
    assert seen == list(range(1, 1001, 100))  # ten transactions, in order
    assert max(in_flight) > 1, in_flight
    rows = _rows(auditdb)
    assert [r[0] for r in rows] == list(range(1, 1001))


def test_lines_are_stored_byte_for_byte_and_their_columns_read_by_the_server(auditdb, tmp_path):
    """The batch goes as COPY text of the lines alone and the server reads the columns out of each
    (``line::jsonb``): backslashes, escaped tabs, newlines and quotes, non-ASCII text and a
    literal ``\\.`` (COPY's end-of-data mark) survive exactly, and the columns are the event's."""
    import json

    import orjson

    user, password = auditdb.users["scram-sha-256"]
    dsn = tmp_path / "audit.dsn"
    dsn.write_text(auditdb.dsn(user, password) + "\n")
    sink = sink_from_config(tmp_path, {"type": "pg_table", "dsn_file": str(dsn), "chain": "test-chain",
                                       "spool_dir": str(tmp_path / "spool")})
    awkward = ["C:\\temp\\x", "tab\there", "two\nlines\r\n", 'say "hi"', "\\.", "naïve — ünïcode ✓", "\\N"]
    events = chained_events(len(awkward))
    for event, value in zip(events, awkward):
        event.update(db_query=value, sid=f"s-{event['seq']}", user="alice")
    deliver_all(sink, events)
    rows = _rows(auditdb)
    assert [r[2] for r in rows] == [orjson.dumps(e).decode() for e in events]
    out = auditdb.psql("-c", "select json_build_array(seq, time = '2026-12-06T21:00:00Z', event, sid, "
                       "usr, prev_hash, hash, body->>'db_query') from dbproxy_audit order by seq")
    got = [json.loads(line) for line in out.splitlines()]
    assert got == [[e["seq"], True, "test.bulk", e["sid"], "alice", e["prev_hash"], e["hash"], e["db_query"]]
                   for e in events]
