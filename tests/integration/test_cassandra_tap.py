"""Tapped Cassandra sessions: a real Cassandra 5.0, the python driver and cqlsh, ``dbproxy serve``
with and without the audit worker.

A CQL session without a statement policy is audited by the audit worker over the frames the
proxy tapped (``engines/cassandra/tap.py``: the proxy frames, checks and tees; the worker's
``CqlTap`` runs the audit observers).  Shown here: the same driver workload — USE, PREPARE,
EXECUTEs, a BATCH, a paged SELECT, a 300 KiB value (split over v5 segments), a syntax error —
and the same cqlsh script give the same trail, event for event, through the worker as with
``"worker": false`` (everything inline in the proxy), on protocol v4 with LZ4 and Snappy and v5
with and without LZ4; and the statements' events were made in the worker: an event id starts
with its process's random prefix (``audit.events.new_event_id``), and the query/result events
of a tapped session do not share the prefix of its ``db.session.start``, which the proxy writes.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
from pathlib import Path

import pytest
from cassandra.auth import PlainTextAuthProvider
from cassandra.cluster import Cluster
from cassandra.query import BatchStatement, SimpleStatement

from dbproxy.audit.chain import verify_files
from scripts.peers.cassandra_server import lib_dir, start_cassandra
from tests.support import ProxyProcess, peer_missing, read_audit, wait_until

pytestmark = pytest.mark.integration

BIG = 300 * 1024


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    if not any(lib_dir().glob("cassandra-all-*.jar")):
        peer_missing(f"no Cassandra jars in {lib_dir()}: run scripts/install/cassandra.sh")
    server = start_cassandra(tmp_path_factory.mktemp("cassandra"))
    yield server
    server.stop()


def config(node, workdir: Path, *, worker: bool) -> dict:
    secret = workdir / "backend.secret"
    secret.write_text(node.password + "\n")
    backend = {"address": f"{node.host}:{node.port}", "user": node.user,
               "auth": {"method": "password", "password_file": str(secret)}}
    audit: dict = {"sinks": [{"type": "jsonl", "path": str(workdir / "audit.jsonl")}]}
    if not worker:
        audit["worker"] = False
    return {"listeners": [{"name": "cql", "protocol": "cassandra", "listen": "127.0.0.1:0",
                           "routes": [{"name": "node", "backend": backend}]}],
            "audit": audit, "shutdown_grace_seconds": 2}


def driver_workload(port: int, ks: str, version: int, compression: str | None) -> None:
    cluster = Cluster(["127.0.0.1"], port=port, auth_provider=PlainTextAuthProvider("app", "unused"),
                      protocol_version=version, compression=compression or False, connect_timeout=15)
    try:
        session = cluster.connect()
        session.set_keyspace(ks)  # USE: later events carry the keyspace as db_name
        insert = session.prepare("INSERT INTO t (k, v) VALUES (?, ?)")
        for i in range(12):
            session.execute(insert, (i, f"v{i}"))
        batch = BatchStatement()
        batch.add(insert, (100, "batched"))
        batch.add(SimpleStatement("UPDATE t SET v = 'renamed' WHERE k = 0"))
        session.execute(batch)
        session.execute(insert, (-1, "x" * BIG))
        rows = list(session.execute(SimpleStatement("SELECT k, v FROM t", fetch_size=5)))
        assert len(rows) == 14
        with pytest.raises(Exception, match="no viable alternative|line 1:0"):
            session.execute("SELEKT nonsense")
    finally:
        cluster.shutdown()


def cqlsh_workload(port: int, ks: str) -> None:
    if shutil.which("cqlsh") is None:
        peer_missing("cqlsh not on PATH (pip install cqlsh)")
    script = (f"USE {ks}; INSERT INTO t (k, v) VALUES (500, 'from cqlsh'); "
              "SELECT v FROM t WHERE k = 500; SELECT count(*) FROM t;")
    out = subprocess.run(["cqlsh", "127.0.0.1", str(port), "-u", "app", "-p", "unused", "--connect-timeout", "20",
                          "--request-timeout", "60", "-e", script], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    assert "from cqlsh" in out.stdout


def run(node, workdir: Path, *, worker: bool, workload, marker: str) -> tuple[list[dict], list[dict]]:
    """(the events of the session that ran ``marker``, the whole trail)."""
    workdir.mkdir()
    proxy = ProxyProcess(workdir, config(node, workdir, worker=worker)).start()
    path = workdir / "audit.jsonl"
    try:
        workload(proxy.port("cql"))

        def ended() -> list[dict] | None:
            events = read_audit(path)
            sids = {e["sid"] for e in events if (e.get("db_query") or "").strip() == marker}
            ends = [e for e in events if e["event"] == "db.session.end" and e.get("sid") in sids]
            return events if len(sids) == 1 and ends else None

        events = wait_until(ended, timeout=30, what="the workload session's end event")
    finally:
        proxy.stop()
    [sid] = {e["sid"] for e in events if (e.get("db_query") or "").strip() == marker}
    assert verify_files([str(path)]).ok
    return [e for e in events if e.get("sid") == sid], events


def comparable(events: list[dict]) -> list[tuple]:
    """The session's events without ids, times, ports, byte counts and the driver's random
    client id; a result names its query by position."""
    index: dict[str, int] = {}
    out = []
    skip = {"uid", "time", "sid", "query_uid", "seq", "session_seq", "hash", "prev_hash", "client_id",
            "bytes_from_client", "bytes_to_client", "duration_ms", "cql_stream"}
    for i, e in enumerate(events):
        index[e["uid"]] = i
        fields = {k: v for k, v in e.items() if k not in skip and not k.startswith("addr.")}
        if "query_uid" in e:
            fields["query"] = index.get(e["query_uid"])
        out.append(tuple(sorted((k, repr(v)) for k, v in fields.items())))
    return out


def prefix(event: dict) -> str:
    return event["uid"][:16]  # the writing process's random prefix (audit.events.new_event_id)


def assert_same_trail_from_the_worker(tapped: list[dict], inline: list[dict]) -> None:
    got, want = comparable(tapped), comparable(inline)
    diff = [(i, sorted(set(a) ^ set(b))) for i, (a, b) in enumerate(zip(got, want)) if a != b]
    assert got == want, (len(got), len(want), diff[:5])
    # Who wrote what: the proxy starts and ends the session; the statements' events come from
    # the audit worker's tap.  Inline, one process.
    start, end = tapped[0], tapped[-1]
    assert start["event"] == "db.session.start" and end["event"] == "db.session.end"
    statements = [e for e in tapped if e["event"] not in ("db.session.start", "db.session.end")]
    assert len(statements) >= 6
    assert prefix(end) == prefix(start)
    assert {prefix(e) for e in statements} == {prefix(statements[0])} != {prefix(start)}
    assert {prefix(e) for e in inline} == {prefix(inline[0])}


@pytest.fixture(scope="module")
def keyspace(node) -> str:
    ks = f"tap_{secrets.token_hex(3)}"
    cluster = Cluster([node.host], port=node.port, auth_provider=PlainTextAuthProvider(node.user, node.password),
                      protocol_version=5, connect_timeout=15)
    try:
        session = cluster.connect()
        session.execute(f"CREATE KEYSPACE {ks} WITH replication = {{'class': 'SimpleStrategy', 'replication_factor': 1}}")
        session.execute(f"CREATE TABLE {ks}.t (k int PRIMARY KEY, v text)")
        # Cassandra warns about USE + an unqualified prepared statement the first time it is
        # prepared only: prepared once here, both runs see the node in the same state.
        session.set_keyspace(ks)
        session.prepare("INSERT INTO t (k, v) VALUES (?, ?)")
    finally:
        cluster.shutdown()
    return ks


MODES = [(4, "lz4"), (4, "snappy"), (5, None), (5, "lz4")]


@pytest.mark.parametrize(("version", "compression"), MODES, ids=[f"v{v}-{c or 'none'}" for v, c in MODES])
def test_a_tapped_driver_session_writes_the_inline_trail_from_the_worker(node, keyspace, tmp_path, version, compression):
    def workload(port: int) -> None:
        driver_workload(port, keyspace, version, compression)

    marker = "SELEKT nonsense"
    tapped, _ = run(node, tmp_path / "worker", worker=True, workload=workload, marker=marker)
    inline, _ = run(node, tmp_path / "inline", worker=False, workload=workload, marker=marker)
    assert_same_trail_from_the_worker(tapped, inline)
    kinds = [e["event"] for e in tapped]
    for kind in ("db.session.cassandra.prepare", "db.session.cassandra.execute", "db.session.cassandra.batch",
                 "db.session.query", "db.session.result"):
        assert kind in kinds, kind
    start, end = tapped[0], tapped[-1]
    assert start["protocol_version"] == version and start["compression"] == compression
    executes = [e for e in tapped if e["event"] == "db.session.cassandra.execute"]
    assert len(executes) == 13 and all(e["prepared_known"] and e["db_name"] == keyspace for e in executes)
    assert "truncated" in executes[-1]["db_query_parameters"][1]  # the 300 KiB value, with its marker
    results = {e["query_uid"]: e for e in tapped if e["event"] == "db.session.result"}
    pages = [e for e in tapped if e["event"] == "db.session.query" and e["db_query"] == "SELECT k, v FROM t"]
    assert sum(results[p["uid"]]["affected_records"] for p in pages) == 14 and len(pages) == 3
    bad = next(e for e in tapped if e.get("db_query") == marker)
    assert results[bad["uid"]]["error_name"] == "SYNTAX_ERROR"
    assert end["requests"] == len(results) and end["errors"] == 1 and end["db_name"] == keyspace


def test_a_tapped_cqlsh_session_writes_the_inline_trail_from_the_worker(node, keyspace, tmp_path):
    def workload(port: int) -> None:
        cqlsh_workload(port, keyspace)

    marker = "INSERT INTO t (k, v) VALUES (500, 'from cqlsh');"
    tapped, _ = run(node, tmp_path / "worker", worker=True, workload=workload, marker=marker)
    inline, _ = run(node, tmp_path / "inline", worker=False, workload=workload, marker=marker)
    assert_same_trail_from_the_worker(tapped, inline)
    queries = [e["db_query"].strip() for e in tapped if e["event"] == "db.session.query"]
    assert f"USE {keyspace};" in queries and marker in queries
    results = {e["query_uid"]: e for e in tapped if e["event"] == "db.session.result"}
    count = next(e for e in tapped if (e.get("db_query") or "").strip().startswith("SELECT count(*)"))
    assert results[count["uid"]]["affected_records"] == 1 and count["db_name"] == keyspace
