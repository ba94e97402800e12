"""The proxy is invisible to clients that use the protocol fully (issue 13 §4).

Real PostgreSQL 15, real psql and psycopg, the real ``dbproxy serve``: what a
client sees through the proxy must be what it sees directly — the backend's
pid, its settings from PGOPTIONS / PGDATESTYLE / PGTZ, PostgreSQL's own FATAL
when its backend is terminated — and what the proxy refuses (identity changes
at connection start) is refused in PostgreSQL's words and audited.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import threading
import time

import psycopg
import pytest

from tests.integration.test_postgres_proxy import build_config
from tests.support import pg_session, pg_startup, read_audit, read_until_close, wait_until

pytestmark = pytest.mark.integration

USER = "scram-sha-256"  # route → backend role u_scram


@pytest.fixture(scope="module")
def proxy(pg, tmp_path_factory):
    from tests.support import ProxyProcess

    workdir = tmp_path_factory.mktemp("pgtransparent")
    proc = ProxyProcess(workdir, build_config(pg, workdir)).start()
    proc.audit_path = workdir / "audit.jsonl"
    proc.pg = pg
    yield proc
    proc.stop()


def connect(proxy, user=USER, **kw):
    kw.setdefault("sslmode", "disable")
    kw.setdefault("connect_timeout", 10)
    return psycopg.connect(host="127.0.0.1", port=proxy.port(), user=user, dbname="app", password="unused", **kw)


def psql(proxy, *args, user=USER, env=None, timeout=60):
    dsn = f"host=127.0.0.1 port={proxy.port()} user={user} dbname=app sslmode=disable connect_timeout=10"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    full_env.update(PGPASSWORD="unused", **(env or {}))
    return subprocess.run(["psql", dsn, "-X", "-At", *args], capture_output=True, text=True, timeout=timeout, env=full_env)


def frames(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, body) of each whole backend message in ``data``."""
    out, pos = [], 0
    while len(data) - pos >= 5:
        (length,) = struct.unpack_from(">i", data, pos + 1)
        if len(data) - pos < length + 1:
            break
        out.append((data[pos:pos + 1], data[pos + 5:pos + 1 + length]))
        pos += length + 1
    return out


def error_fields(body: bytes) -> dict[str, str]:
    return {f[:1].decode(): f[1:].decode() for f in body.split(b"\0") if f}


def raw_session(proxy, **params) -> tuple[socket.socket, bytes]:
    return pg_session(proxy.port(), user="trust", database="app", **params)


def simple_query(s: socket.socket, sql: str) -> list[tuple[bytes, bytes]]:
    q = sql.encode() + b"\0"
    s.sendall(b"Q" + struct.pack(">i", 4 + len(q)) + q)
    buf = b""
    while not buf.endswith(b"Z\x00\x00\x00\x05I"):
        chunk = s.recv(65536)
        assert chunk
        buf += chunk
    return frames(buf)


def audit_events(proxy, predicate, timeout=10.0) -> list[dict]:
    box: list[dict] = []

    def check():
        box[:] = [e for e in read_audit(proxy.audit_path) if predicate(e)]
        return box

    wait_until(check, timeout=timeout, what="audit events")
    return box


# --------------------------------------------------------------------------- the backend's pid


def test_backend_pid_is_the_backends(proxy):
    with connect(proxy) as conn:
        (server_pid,) = conn.execute("select pg_backend_pid()").fetchone()
        assert conn.info.backend_pid == server_pid
    s, hello = raw_session(proxy)
    try:
        (key,) = [body for t, body in frames(hello) if t == b"K"]
        rows = [body for t, body in simple_query(s, "select pg_backend_pid()") if t == b"D"]
        (value,) = rows
        assert struct.unpack(">i", key[:4])[0] == int(value[6:])
    finally:
        s.close()


def test_notification_pid_is_the_notifiers_backend_pid(proxy):
    with connect(proxy, autocommit=True) as listener, connect(proxy, autocommit=True) as notifier:
        listener.execute("listen chan_pid")
        notifier.execute("notify chan_pid, 'x'")
        (note,) = list(listener.notifies(timeout=5, stop_after=1))
        assert note.pid == notifier.info.backend_pid
        assert note.pid == notifier.execute("select pg_backend_pid()").fetchone()[0]


def test_pg_terminate_backend_of_the_clients_pid(proxy):
    victim = connect(proxy, autocommit=True)
    with connect(proxy, autocommit=True) as admin:  # same backend role: may signal it
        assert admin.execute("select pg_terminate_backend(%s)", (victim.info.backend_pid,)).fetchone() == (True,)
    with pytest.raises(psycopg.OperationalError) as info:
        victim.execute("select 1")
    assert "terminating connection due to administrator command" in str(info.value)
    victim.close()


def test_cancel_request_with_the_right_pid_but_a_wrong_secret_cancels_nothing(proxy):
    with connect(proxy) as conn:
        pid = conn.info.backend_pid
        result: list = []

        def run():
            try:
                result.append(conn.execute("select pg_sleep(1.5), 'finished'").fetchone()[1])
            except BaseException as exc:  # reported below
                result.append(exc)

        t = threading.Thread(target=run)
        t.start()
        time.sleep(0.4)
        for secret in (b"\x00\x00\x00\x00", b"\xff\xff\xff\xff", os.urandom(4)):
            with socket.create_connection(("127.0.0.1", proxy.port()), timeout=5) as s:
                s.sendall(struct.pack(">iii", 16, 80877102, pid) + secret)
                read_until_close(s, timeout=5)
        t.join(10)
        assert result == ["finished"]
        # the proxy's own cancel key still works (psycopg sends the secret it was given)
        timer = threading.Timer(0.3, conn.cancel)
        timer.start()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("select pg_sleep(10)")
    assert "cancel request for an unknown key" in proxy.log_text()


# --------------------------------------------------------------------------- startup settings


def test_pgdatestyle_and_pgtz_reach_the_backend(proxy):
    out = psql(proxy, "-c", "show datestyle", "-c", "show timezone", env={"PGDATESTYLE": "SQL, DMY", "PGTZ": "Asia/Tokyo"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["SQL, DMY", "Asia/Tokyo"]


def test_pgoptions_settings_reach_the_backend(proxy):
    out = psql(proxy, "-c", "show work_mem", "-c", "show search_path",
               env={"PGOPTIONS": r"-c work_mem=7MB --search-path=\"my\ schema\",public"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["7MB", '"my schema",public']
    with connect(proxy, options="-c work_mem=7MB -c statement_timeout=1234") as conn:
        assert conn.execute("show work_mem").fetchone() == ("7MB",)
        assert conn.execute("show statement_timeout").fetchone() == ("1234ms",)
    start = audit_events(proxy, lambda e: e["event"] == "db.session.start" and e.get("client_settings", {}).get("options", "").endswith("statement_timeout=1234"))
    assert start[-1]["success"] is True


@pytest.fixture(scope="module")
def member_role(pg):
    """A role the backend user may SET ROLE to: PostgreSQL itself would allow ``-c role=`` to it."""
    role = "t_transparency_other"
    pg.psql("-c", f"drop role if exists {role}", "-c", f"create role {role}", "-c", f"grant {role} to {pg.users['scram-sha-256'][0]}")
    return role


@pytest.mark.parametrize("how", ["psql", "psycopg"])
def test_role_in_options_refused_natively_and_audited(proxy, member_role, how):
    since = len(read_audit(proxy.audit_path))
    if how == "psql":
        out = psql(proxy, "-c", "select current_user", env={"PGOPTIONS": f"-c role={member_role}"})
        assert out.returncode != 0
        text = out.stderr
    else:
        with pytest.raises(psycopg.OperationalError) as info:
            connect(proxy, options=f"-c role={member_role}")
        text = str(info.value)
    assert 'FATAL:  permission denied to set parameter "role"' in text

    def refused():
        evs = read_audit(proxy.audit_path)[since:]
        starts = [e for e in evs if e["event"] == "db.session.start"]
        denials = [e for e in evs if e["event"] == "db.session.access_denied"]
        return (starts, denials) if starts and denials else None

    starts, denials = wait_until(refused, what="the refusal's audit events")
    assert [(e["success"], e["sqlstate"], e["error"]) for e in starts] == [(False, "42501", 'permission denied to set parameter "role"')]
    assert [(e["stage"], e["reason"]) for e in denials] == [("startup", "setting_refused")]


@pytest.mark.parametrize("params", [
    {"options": "-c session_authorization=postgres"},
    {"options": "--session-authorization=postgres"},
    {"options": r"-c work_mem=1MB -c ROLE=postgres"},
    {"role": "postgres"},
    {"Session_Authorization": "postgres"},
    {"options": "-c log_statement=none"},
    {"options": "-c session_replication_role=replica"},
])
def test_identity_settings_refused_with_sqlstate_42501(proxy, params):
    with socket.create_connection(("127.0.0.1", proxy.port()), timeout=10) as s:
        s.sendall(pg_startup(user=USER, database="app", **params))
        data = read_until_close(s, timeout=15)
    (err,) = [error_fields(body) for t, body in frames(data) if t == b"E"]
    assert err["S"] == "FATAL" and err["C"] == "42501" and err["M"].startswith("permission denied to set parameter")
    assert not [t for t, _ in frames(data) if t == b"R"]  # never authenticated: no session


def test_read_only_setting_passes_when_no_grant_forbids_it(proxy):
    # Not an escalation: a client may make its own session read-only.
    with connect(proxy, options="-c default_transaction_read_only=on") as conn:
        assert conn.execute("show default_transaction_read_only").fetchone() == ("on",)


# --------------------------------------------------------------------------- startup robustness


def test_reset_during_startup_logs_one_line_no_traceback(proxy):
    before = proxy.log_text()
    s = socket.create_connection(("127.0.0.1", proxy.port()), timeout=10)
    packet = pg_startup(user=USER, database="app")
    s.sendall(packet[:10])  # a partial StartupMessage: the proxy is waiting for the rest
    time.sleep(0.3)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()  # RST
    # Whatever the proxy makes of it is logged at once: one line, or (the bug) a traceback.
    def logged():
        text = proxy.log_text()[len(before):]
        return "connection lost during startup" in text or "Traceback" in text

    wait_until(logged, what="the proxy's log of the reset")
    time.sleep(0.2)
    new = proxy.log_text()[len(before):]
    assert "Traceback" not in new, new
    assert len([line for line in new.splitlines() if "connection lost during startup" in line]) == 1
    with connect(proxy) as conn:  # everyone else keeps being served
        assert conn.execute("select 1").fetchone() == (1,)


def test_handshake_timeout_logged_and_audited(pg, tmp_path, proxy_factory):
    config = build_config(pg, tmp_path)
    config["listeners"][0]["handshake_timeout_seconds"] = 1
    proxy2 = proxy_factory(config)
    s = socket.create_connection(("127.0.0.1", proxy2.port()), timeout=10)
    s.sendall(pg_startup(user=USER, database="app")[:6])  # and then nothing
    t0 = time.monotonic()
    read_until_close(s, timeout=15)
    assert time.monotonic() - t0 < 5
    s.close()
    evs = wait_until(lambda: [e for e in read_audit(tmp_path / "audit.jsonl") if e["event"] == "db.session.start"], what="audit")
    assert evs[-1]["success"] is False and evs[-1]["error"] == "client handshake timed out"
    assert evs[-1]["timeout_seconds"] == 1
    lines = [line for line in proxy2.log_text().splitlines() if "client handshake timed out" in line]
    assert len(lines) == 1 and "after 1s" in lines[0]


# --------------------------------------------------------------------------- backend loss


@pytest.fixture(params=["tap", "in-process"])
def any_mode_proxy(request, pg, proxy, tmp_path, proxy_factory):
    """The shared proxy audits through the audit worker (tapped sessions); the other
    audits in-process (the pipeline runs the audit stages itself)."""
    if request.param == "tap":
        return proxy
    config = build_config(pg, tmp_path)
    config["audit"]["worker"] = False
    p = proxy_factory(config)
    p.audit_path = tmp_path / "audit.jsonl"
    p.pg = pg
    return p


def test_pg_terminate_backend_gives_exactly_one_fatal(any_mode_proxy):
    proxy = any_mode_proxy
    s, _ = raw_session(proxy)
    try:
        (row,) = [body for t, body in simple_query(s, "select pg_backend_pid()") if t == b"D"]
        pid = int(row[6:])
        assert proxy.pg.psql("-c", f"select pg_terminate_backend({pid})").strip() == "t"
        data = read_until_close(s, timeout=15)
    finally:
        s.close()
    errors = [error_fields(body) for t, body in frames(data) if t == b"E"]
    assert [(e["S"], e["C"]) for e in errors] == [("FATAL", "57P01")], errors
    assert errors[0]["M"] == "terminating connection due to administrator command"


def test_psycopg_and_psql_see_postgresqls_message_only(any_mode_proxy):
    proxy = any_mode_proxy
    conn = connect(proxy, autocommit=True)
    proxy.pg.psql("-c", f"select pg_terminate_backend({conn.info.backend_pid})")
    with pytest.raises(psycopg.OperationalError) as info:
        conn.execute("select 1")
    conn.close()
    assert "terminating connection due to administrator command" in str(info.value)
    assert "backend database was lost" not in str(info.value)

    dsn = f"host=127.0.0.1 port={proxy.port()} user={USER} dbname=app sslmode=disable"
    env = dict(os.environ, PGPASSWORD="unused")
    p = subprocess.Popen(["psql", dsn, "-X", "-Atc", "select pg_backend_pid(), pg_sleep(30)"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    try:
        pid = wait_until(lambda: proxy.pg.psql("-c", "select pid from pg_stat_activity where query like 'select pg_backend_pid(), pg_sleep%'").strip(), what="psql's backend")
        proxy.pg.psql("-c", f"select pg_terminate_backend({pid})")
        _, err = p.communicate(timeout=20)
    finally:
        p.kill()
    assert "terminating connection due to administrator command" in err
    assert "backend database was lost" not in err


# --------------------------------------------------------------------------- settings under a read-only grant

from tests.integration.test_postgres_identity import env  # noqa: E402,F401 - the identity proxy fixture (tokens, roles)


@pytest.mark.parametrize("options", ["-c default_transaction_read_only=off", "--default-transaction-read-only=off"])
def test_read_only_grant_cannot_be_undone_at_connection_start(env, options):  # noqa: F811
    token, _ = env.issue("alice", "analyst")  # analyst: read-only
    with pytest.raises(psycopg.OperationalError) as info:
        env.connect("tok", "alice", token, options=options)
    assert 'permission denied to set parameter "default_transaction_read_only"' in str(info.value)
    # other settings still pass for the same grant
    with env.connect("tok", "alice", token, options="-c work_mem=7MB") as conn:
        assert conn.execute("show work_mem").fetchone() == ("7MB",)
        assert conn.execute("show default_transaction_read_only").fetchone() == ("on",)
