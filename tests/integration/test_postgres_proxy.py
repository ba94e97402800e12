"""The Postgres engine end to end: real PostgreSQL 15, real psql and psycopg, the real proxy CLI.

Routes of the shared proxy (listener "pg"):
  user <method>        → backend user for that auth method, plain backend link
  user <method>-tls    → the same over TLS verified against the test CA (verify-full)
  database downdb      → a backend address nothing listens on (08001)
  user wrongpw         → u_scram with a wrong password file (28P01)
"""

from __future__ import annotations

import io
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import psycopg
import pytest

from scripts.peers import refused_port
from tests.support import pg_session, read_audit, read_until_close, wait_audit, wait_until

pytestmark = pytest.mark.integration

METHODS = ("trust", "password", "md5", "scram-sha-256")


def _auth(method: str, secret_file: Path | None) -> dict:
    auth = {"method": method}
    if method != "trust":
        auth["password_file"] = str(secret_file)
    return auth


def build_config(pg, workdir: Path, *, extra_routes=(), listener_tls=None, max_message_size=None, grace=None) -> dict:
    routes = []
    for method in METHODS:
        user, password = pg.users[method]
        secret = workdir / f"{user}.secret"
        secret.write_text(password + "\n")
        backend = {"address": f"127.0.0.1:{pg.port}", "database": "app", "user": user, "auth": _auth(method, secret)}
        routes.append({"name": method, "match": {"user": method}, "backend": backend})
        tls_backend = dict(backend, address=f"localhost:{pg.port}", tls={"mode": "verify-full", "ca_file": str(pg.ca_file), "server_name": "localhost"})
        routes.append({"name": f"{method}-tls", "match": {"user": f"{method}-tls"}, "backend": tls_backend})
    wrong = workdir / "wrong.secret"
    wrong.write_text("definitely-not-the-password\n")
    routes.append(
        {
            "name": "wrongpw",
            "match": {"user": "wrongpw"},
            "backend": {"address": f"127.0.0.1:{pg.port}", "database": "app", "user": pg.users["scram-sha-256"][0], "auth": _auth("scram-sha-256", wrong)},
        }
    )
    # First match wins: the specific route goes first.
    routes.insert(
        0,
        {
            "name": "down",
            "match": {"database": "downdb"},
            "backend": {"address": f"127.0.0.1:{refused_port()}", "database": "app", "user": "x", "auth": {"method": "trust"}},
        },
    )
    routes.extend(extra_routes)
    listener = {"name": "pg", "protocol": "postgres", "listen": "127.0.0.1:0", "routes": routes}
    if listener_tls:
        listener["tls"] = listener_tls
    if max_message_size:
        listener["max_message_size"] = max_message_size
    config = {"listeners": [listener], "audit": {"sinks": [{"type": "jsonl", "path": str(workdir / "audit.jsonl")}]}}
    if grace is not None:
        config["shutdown_grace_seconds"] = grace
    return config


@pytest.fixture(scope="module")
def proxy(pg, tmp_path_factory):
    from scripts.peers.certs import make_ca, make_cert
    from tests.support import ProxyProcess

    workdir = tmp_path_factory.mktemp("pgproxy")
    ca = make_ca(workdir)
    cert, key = make_cert(workdir, ca, "proxy", sans=["localhost", "127.0.0.1"])
    config = build_config(pg, workdir, listener_tls={"cert_file": str(cert), "key_file": str(key)}, max_message_size=8 * 1024 * 1024)
    proc = ProxyProcess(workdir, config).start()
    proc.audit_path = workdir / "audit.jsonl"
    proc.ca_file = ca[0]
    proc.pg = pg
    yield proc
    proc.stop()


def connect(proxy, user="scram-sha-256", dbname="app", **kw):
    kw.setdefault("sslmode", "disable")
    kw.setdefault("connect_timeout", 10)
    return psycopg.connect(host="127.0.0.1", port=proxy.port(), user=user, dbname=dbname, password="client-password-not-used", **kw)


def events(proxy, **match):
    """Events matching ``match``; waits (up to 10 s) until at least one is written."""
    found = []

    def check():
        found[:] = [e for e in read_audit(proxy.audit_path) if all(e.get(k) == v for k, v in match.items())]
        return found

    try:
        wait_until(check, timeout=10, what=f"audit event {match}")
    except AssertionError:
        pass
    return found


def audit_when(proxy, condition, timeout=15.0):
    """All events, once ``condition(events)`` holds (the drain task writes asynchronously)."""
    return wait_audit(proxy.audit_path, condition, timeout=timeout)


def has_result_tag(tag, count=1):
    return lambda evs: sum(1 for e in evs if e.get("command_tag") == tag) >= count


def psql(proxy, *args, user="scram-sha-256", dbname="app", sslmode="disable", input=None, timeout=60, env=None):
    dsn = f"host=127.0.0.1 port={proxy.port()} user={user} dbname={dbname} sslmode={sslmode} connect_timeout=10"
    full_env = dict(os.environ, PGPASSWORD="client-password-not-used", **(env or {}))
    return subprocess.run(["psql", dsn, "-X", "-v", "ON_ERROR_STOP=1", *args], input=input, capture_output=True, text=True, timeout=timeout, env=full_env)


# --------------------------------------------------------------------------- auth and TLS


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "backend-tls"])
@pytest.mark.parametrize("method", METHODS)
def test_each_backend_auth_method(proxy, method, tls):
    user = f"{method}-tls" if tls else method
    with connect(proxy, user=user) as conn:
        row = conn.execute("select current_user, ssl from pg_stat_ssl where pid = pg_backend_pid()").fetchone()
    assert row == (proxy.pg.users[method][0], tls)
    starts = [e for e in events(proxy, event="db.session.start", requested_user=user) if e["success"]]
    assert starts and starts[-1]["backend_tls"] is tls and starts[-1]["backend_auth"] == method
    assert starts[-1]["db_user"] == proxy.pg.users[method][0]


def test_scram_uses_channel_binding_over_tls(proxy):
    with connect(proxy, user="scram-sha-256-tls") as conn:
        assert conn.execute("select ssl from pg_stat_ssl where pid = pg_backend_pid()").fetchone() == (True,)
    with connect(proxy, user="scram-sha-256") as conn:
        conn.execute("select 1")
    starts = events(proxy, event="db.session.start", success=True)
    tls_start = [e for e in starts if e["requested_user"] == "scram-sha-256-tls"][-1]
    plain_start = [e for e in starts if e["requested_user"] == "scram-sha-256"][-1]
    assert tls_start["backend_auth_mechanism"] == "SCRAM-SHA-256-PLUS"
    assert plain_start["backend_auth_mechanism"] == "SCRAM-SHA-256"


def test_psql_tls_to_proxy(proxy):
    out = psql(proxy, "-Atc", "select 'tls-ok'", sslmode="require")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "tls-ok"
    audit_when(proxy, lambda evs: any(e["event"] == "db.session.start" and e.get("client_tls") for e in evs))


def test_psql_verify_full_against_proxy_cert(proxy):
    out = psql(proxy, "-Atc", "select 1", sslmode="verify-full", env={"PGSSLROOTCERT": str(proxy.ca_file)})
    # host is 127.0.0.1, which is in the proxy certificate's SANs
    assert out.returncode == 0, out.stderr


def test_client_password_never_reaches_audit_or_logs(proxy):
    with connect(proxy, user="md5") as conn:
        conn.execute("select 1")
    blob = proxy.audit_path.read_text() + proxy.log_text()
    for method in METHODS:
        password = proxy.pg.users[method][1]
        if password:
            assert password not in blob
    assert "client-password-not-used" not in blob
    assert "definitely-not-the-password" not in blob


# --------------------------------------------------------------------------- queries


def test_simple_and_extended_queries_audited(proxy):
    with connect(proxy) as conn:
        conn.autocommit = True
        conn.execute("drop table if exists t_ext")
        conn.execute("create table t_ext (id int primary key, name text, data bytea)")
        conn.execute("insert into t_ext values (%s, %s, %s)", (1, "alice", b"\x00\x01"))
        conn.execute("insert into t_ext values (%s, %s, %s)", (2, "bob", None), prepare=True)
        cur = conn.execute("update t_ext set name = upper(name) where id > %s", (0,))
        assert cur.rowcount == 2
        with conn.cursor(binary=True) as bc:
            bc.execute("select id from t_ext where name = %s", ("ALICE",))
            assert bc.fetchall() == [(1,)]
    def last_select_answered(evs):
        # This test's own last statement (earlier tests in the module also leave "SELECT 1" results).
        sels = [e["uid"] for e in evs if e["event"] == "db.session.postgres.statements.execute"
                and e.get("db_query", "").startswith("select id from t_ext")]
        return bool(sels) and any(e["event"] == "db.session.result" and e.get("query_uid") == sels[-1] for e in evs)

    evs = audit_when(proxy, lambda evs: last_select_answered(evs) and any(e.get("command_tag") == "UPDATE 2" for e in evs))
    executes = [e for e in evs if e["event"] == "db.session.postgres.statements.execute" and "t_ext" in e.get("db_query", "")]
    by_query = {e["db_query"]: e for e in executes}
    ins = [e for e in executes if e["db_query"].startswith("insert into t_ext")]
    assert [e["db_query_parameters"][:2] for e in ins] == [["1", "alice"], ["2", "bob"]]
    assert ins[0]["db_query_parameters"][2] == "base64:AAE="  # bytea, binary format
    assert ins[1]["db_query_parameters"][2] is None
    upd = by_query["update t_ext set name = upper(name) where id > $1"]
    results = {e["query_uid"]: e for e in evs if e["event"] == "db.session.result"}
    assert results[upd["uid"]]["affected_records"] == 2
    assert results[upd["uid"]]["command_tag"] == "UPDATE 2"
    sel = [e for e in executes if e["db_query"].startswith("select id from t_ext")][-1]
    assert sel["db_query_parameters"] == ["ALICE"]  # binary-format text parameter, decoded
    parses = [e for e in evs if e["event"] == "db.session.postgres.statements.parse" and "t_ext" in e["db_query"]]
    binds = [e for e in evs if e["event"] == "db.session.postgres.statements.bind"]
    assert parses and binds
    simple = [e for e in evs if e["event"] == "db.session.query" and e["db_query"].startswith("create table t_ext")]
    assert simple and results[simple[-1]["uid"]]["command_tag"] == "CREATE TABLE"


def test_error_response_audited_with_sqlstate(proxy):
    with connect(proxy) as conn:
        with pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute("select * from no_such_table_xyz")
        conn.rollback()
        assert conn.execute("select 42").fetchone() == (42,)
    evs = audit_when(proxy, lambda evs: any(e.get("sqlstate") == "42P01" for e in evs))
    q = [e for e in evs if e.get("db_query") == "select * from no_such_table_xyz"][-1]
    res = [e for e in evs if e["event"] == "db.session.result" and e.get("query_uid") == q["uid"]]
    assert res and res[0]["success"] is False and res[0]["sqlstate"] == "42P01"
    assert "no_such_table_xyz" in res[0]["error"]


def test_psycopg_pipeline_mode(proxy):
    with connect(proxy) as conn:
        conn.autocommit = True
        conn.execute("drop table if exists t_pipe")
        conn.execute("create table t_pipe (n int)")
        with conn.pipeline():
            for i in range(200):
                conn.execute("insert into t_pipe values (%s)", (i,))
        assert conn.execute("select count(*), sum(n) from t_pipe").fetchone() == (200, sum(range(200)))
    evs = audit_when(proxy, has_result_tag("INSERT 0 1", 200))
    ins = [e for e in evs if e["event"] == "db.session.postgres.statements.execute" and e.get("db_query") == "insert into t_pipe values ($1)"]
    assert sorted(int(e["db_query_parameters"][0]) for e in ins) == list(range(200))
    uids = {e["uid"] for e in ins}
    done = [e for e in evs if e["event"] == "db.session.result" and e.get("query_uid") in uids]
    assert len(done) == 200 and all(e["affected_records"] == 1 for e in done)


def test_psql_script_and_prepared_statements(proxy):
    script = """
    drop table if exists t_psql;
    create table t_psql (k text, v int);
    insert into t_psql select 'k' || g, g from generate_series(1, 25) g;
    prepare p1(int) as select count(*) from t_psql where v <= $1;
    execute p1(10);
    delete from t_psql where v > 20;
    """
    out = psql(proxy, "-At", input=script)
    assert out.returncode == 0, out.stderr
    assert "10" in out.stdout.split()
    evs = audit_when(proxy, has_result_tag("DELETE 5"))
    results = {e["query_uid"]: e for e in evs if e["event"] == "db.session.result"}
    queries = {e["db_query"].strip(): e for e in evs if e["event"] == "db.session.query"}
    assert results[queries["insert into t_psql select 'k' || g, g from generate_series(1, 25) g;"]["uid"]]["affected_records"] == 25
    assert results[queries["delete from t_psql where v > 20;"]["uid"]]["affected_records"] == 5


def test_listen_notify(proxy):
    with connect(proxy, autocommit=True) as listener, connect(proxy, autocommit=True) as notifier:
        listener.execute("listen chan_x")
        notifier.execute("notify chan_x, 'hello through the proxy'")
        gen = listener.notifies(timeout=5, stop_after=1)
        got = [(n.channel, n.payload) for n in gen]
    assert got == [("chan_x", "hello through the proxy")]


def test_copy_in_and_out_50mb(proxy):
    row = ("x" * 1000) + "\n"
    rows = 52_000  # ~52 MB
    with connect(proxy) as conn:
        conn.autocommit = True
        conn.execute("drop table if exists t_copy")
        conn.execute("create unlogged table t_copy (line text)")
        with conn.cursor().copy("copy t_copy (line) from stdin") as copy:
            chunk = row * 1000
            for _ in range(rows // 1000):
                copy.write(chunk)
        assert conn.execute("select count(*) from t_copy").fetchone() == (rows,)
        total = 0
        with conn.cursor().copy("copy t_copy to stdout") as copy:
            for data in copy:
                total += len(data)
        assert total == rows * len(row)
    evs = audit_when(proxy, has_result_tag(f"COPY {rows}", 2))
    copies = [e for e in evs if e.get("command_tag") == f"COPY {rows}"]
    assert all(e["affected_records"] == rows for e in copies)


def test_large_result_100mb(proxy):
    with connect(proxy) as conn:
        cur = conn.cursor()
        cur.execute("select g, repeat('y', 1000) from generate_series(1, 105000) g")
        n = 0
        size = 0
        while batch := cur.fetchmany(5000):
            n += len(batch)
            size += sum(len(r[1]) for r in batch)
    assert n == 105000 and size >= 100 * 1000 * 1000
    evs = audit_when(proxy, has_result_tag("SELECT 105000"))
    res = [e for e in evs if e.get("command_tag") == "SELECT 105000"]
    assert res[-1]["affected_records"] == 105000


def test_fifty_concurrent_sessions(proxy):
    errors: list[BaseException] = []
    results: list[tuple] = []
    barrier = threading.Barrier(50)

    def worker(i: int) -> None:
        try:
            with connect(proxy, user=METHODS[i % 4]) as conn:
                barrier.wait(timeout=30)
                for _ in range(5):
                    results.append(conn.execute("select %s::int, pg_backend_pid()", (i,)).fetchone())
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]
    assert len(results) == 250
    assert len({pid for _, pid in results}) == 50  # 50 distinct backend sessions at once


# --------------------------------------------------------------------------- cancel


def test_psycopg_cancel_pg_sleep(proxy):
    with connect(proxy) as conn:
        timer = threading.Timer(0.5, conn.cancel)
        timer.start()
        t0 = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("select pg_sleep(30)")
        elapsed = time.monotonic() - t0
        conn.rollback()
        assert conn.execute("select 'still usable'").fetchone() == ("still usable",)
    assert elapsed < 2.5, f"cancel took {elapsed:.2f}s"


def test_psql_ctrl_c_cancels(proxy):
    dsn = f"host=127.0.0.1 port={proxy.port()} user=md5 dbname=app sslmode=disable"
    proc = subprocess.Popen(["psql", dsn, "-X", "-c", "select pg_sleep(30)"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=10)
    elapsed = time.monotonic() - t0
    assert "canceling statement due to user request" in err
    assert elapsed < 2.0, f"psql cancel took {elapsed:.2f}s"


# --------------------------------------------------------------------------- faults


def test_unknown_route_gets_28000(proxy):
    with pytest.raises(psycopg.OperationalError) as info:
        connect(proxy, user="nobody", dbname="nowhere")
    text = str(info.value)
    assert 'no route for database "nowhere" and user "nobody"' in text
    fail = [e for e in events(proxy, event="db.session.start", requested_user="nobody")]
    assert fail and fail[-1]["success"] is False


def test_unknown_route_sqlstate_via_psql(proxy):
    out = psql(proxy, "-c", "select 1", user="nobody", dbname="nowhere", env={"PGAPPNAME": "x"})
    assert out.returncode != 0
    assert "no route for database" in out.stderr


def test_backend_down_gets_08001(proxy):
    with pytest.raises(psycopg.OperationalError) as info:
        connect(proxy, user="trust", dbname="downdb")
    assert "could not connect to the backend database" in str(info.value)
    ev = events(proxy, event="db.session.start", requested_database="downdb")[-1]
    assert ev["success"] is False and ev["sqlstate"] == "08001" and "could not connect" in ev["error"]


def test_wrong_backend_password_gets_28p01(proxy):
    with pytest.raises(psycopg.OperationalError) as info:
        connect(proxy, user="wrongpw")
    assert "password authentication failed" in str(info.value)
    ev = events(proxy, event="db.session.start", requested_user="wrongpw")[-1]
    assert ev["success"] is False and ev["sqlstate"] == "28P01"
    assert "definitely-not-the-password" not in proxy.audit_path.read_text()


def _raw_session(proxy) -> socket.socket:
    """A hand-rolled client: startup for user 'trust', read until ReadyForQuery."""
    return pg_session(proxy.port(), user="trust", database="app")[0]


def test_garbage_frame_from_client(proxy):
    s = _raw_session(proxy)
    s.sendall(b"Q\x00\x00\x00\x02garbage")  # length 2 < 4: invalid
    data = read_until_close(s)
    assert data[:1] == b"E" and b"08P01" in data and b"invalid message length" in data
    with connect(proxy) as conn:  # everyone else keeps working
        assert conn.execute("select 'ok'").fetchone() == ("ok",)


def test_oversized_frame_from_client(proxy):
    s = _raw_session(proxy)
    s.sendall(b"Q" + struct.pack(">i", 64 * 1024 * 1024) + b"select ")  # listener max is 8 MiB
    data = read_until_close(s)
    assert data[:1] == b"E" and b"54000" in data and b"too large" in data
    with connect(proxy) as conn:
        assert conn.execute("select 'ok'").fetchone() == ("ok",)


def test_garbage_startup_packet(proxy):
    s = socket.create_connection(("127.0.0.1", proxy.port()), timeout=10)
    s.sendall(b"\x00\x00\x00\x10\x00\x07\x00\x00garbage!")  # protocol 7.0
    data = read_until_close(s)
    assert data[:1] == b"E" and b"unsupported frontend protocol" in data


def test_backend_killed_mid_query(tmp_path, proxy_factory):
    from scripts.peers.postgres import start_postgres

    pg2 = start_postgres(tmp_path / "pg2")
    try:
        proxy2 = proxy_factory(build_config(pg2, tmp_path))
        conn = psycopg.connect(host="127.0.0.1", port=proxy2.port(), user="trust", dbname="app", sslmode="disable", connect_timeout=10)
        killer = threading.Timer(0.7, pg2.kill)
        killer.start()
        t0 = time.monotonic()
        with pytest.raises(psycopg.OperationalError):
            conn.execute("select pg_sleep(20)")
        assert time.monotonic() - t0 < 10
        conn.close()
        pg2.start()
        with psycopg.connect(host="127.0.0.1", port=proxy2.port(), user="trust", dbname="app", sslmode="disable", connect_timeout=10) as again:
            assert again.execute("select 'back'").fetchone() == ("back",)
        wait_until(lambda: any(e["event"] == "db.session.end" and "backend" in e["reason"] for e in read_audit(tmp_path / "audit.jsonl")), what="session end")
    finally:
        pg2.stop()


def test_negotiate_protocol_version_for_newer_minor(proxy):
    s = socket.create_connection(("127.0.0.1", proxy.port()), timeout=10)
    params = b"user\0trust\0database\0app\0_pq_.some_option\0x\0\0"
    s.sendall(struct.pack(">ii", 8 + len(params), (3 << 16) | 2) + params)
    buf = b""
    while b"Z\x00\x00\x00\x05I" not in buf:
        chunk = s.recv(65536)
        assert chunk
        buf += chunk
    assert buf[:1] == b"v"  # NegotiateProtocolVersion first
    assert b"_pq_.some_option" in buf[: struct.unpack(">i", buf[1:5])[0] + 1]
    s.close()


def test_graceful_shutdown_lets_sessions_finish(pg, tmp_path, proxy_factory):
    proxy2 = proxy_factory(build_config(pg, tmp_path, grace=3))
    conn = psycopg.connect(host="127.0.0.1", port=proxy2.port(), user="trust", dbname="app", sslmode="disable", connect_timeout=10)
    proxy2.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    # The running session still works during the grace period...
    assert conn.execute("select 'in grace'").fetchone() == ("in grace",)
    # ...but no new connection is accepted.
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(host="127.0.0.1", port=proxy2.port(), user="trust", dbname="app", sslmode="disable", connect_timeout=3)
    assert proxy2.proc.wait(15) == 0
    with pytest.raises(psycopg.OperationalError):
        conn.execute("select 1")
    evs = read_audit(tmp_path / "audit.jsonl")
    sid = next(e["sid"] for e in evs if "sid" in e)  # after the proxy.start marker
    assert [e["event"] for e in evs if e.get("sid") == sid][-1] == "db.session.end"


def test_oversized_query_and_parameter_truncated_with_marker(proxy):
    big_comment = "x" * 40_000
    sql = f"select 'trunc-marker-test' /* {big_comment} */"
    big_param = "p" * 10_000
    with connect(proxy) as conn:
        assert conn.execute(sql).fetchone() == ("trunc-marker-test",)
        assert conn.execute("select length(%s::text)", (big_param,)).fetchone() == (10_000,)
    evs = audit_when(
        proxy,
        lambda evs: any("trunc-marker-test" in e.get("db_query", "") for e in evs)
        and any(e.get("db_query") == "select length($1::text)" and e["event"].endswith("execute") for e in evs),
    )
    q = [e for e in evs if "trunc-marker-test" in e.get("db_query", "")][-1]
    assert len(q["db_query"]) < 20_000 and "[truncated" in q["db_query"] and q["db_query"].startswith("select 'trunc-marker-test'")
    ex = [e for e in evs if e.get("db_query") == "select length($1::text)" and e["event"].endswith("execute")][-1]
    (param,) = ex["db_query_parameters"]
    assert param.startswith("ppp") and "[truncated" in param and len(param) < 3_000
    # the statement itself was executed and audited with its result, not dropped
    assert any(r.get("query_uid") == q["uid"] and r["success"] for r in evs if r["event"] == "db.session.result")
