"""Identity and access through the Postgres engine: real PostgreSQL 15, real psql/psycopg, the real CLI.

Listeners of the proxy (one ``dbproxy serve`` for the module):
  tok      TLS available; auth token  (cleartext over TLS, SCRAM-SHA-256 without)
  mtls     TLS with client CA; auth mtls (identity = certificate CN)
  limited  auth token; at most 2 connections on the listener
  anon     auth anonymous on loopback, anonymous_roles [analyst]

Routes (each listener): database "app" → backend app as u_trust; database
"otherdb" → backend database postgres (no role below allows it).

Roles: analyst (read-only, database app), writer (deny DROP/TRUNCATE/DO).
Tokens come from ``dbproxy token issue`` run as a subprocess, like an operator would.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path

import psycopg
import pytest

from tests.support import (
    BAD_TOKEN_CASES, TOKEN_IDENTITY, ProxyProcess, TokenEnv, assert_no_token_secrets, dbproxy_cli,
    issue_bad_tokens, token_keygen, wait_until,
)

pytestmark = pytest.mark.integration


def _routes(pg) -> list[dict]:
    user = pg.users["trust"][0]
    return [
        {"name": "app", "match": {"database": "app"}, "backend": {"address": f"127.0.0.1:{pg.port}", "database": "app", "user": user, "auth": {"method": "trust"}}},
        {"name": "other", "match": {"database": "otherdb"}, "backend": {"address": f"127.0.0.1:{pg.port}", "database": "postgres", "user": user, "auth": {"method": "trust"}}},
    ]


class Env(TokenEnv):
    """The running proxy plus what tests need to talk to it."""

    def __init__(self, proc: ProxyProcess, workdir: Path, ca: Path, certs: dict, pg) -> None:
        super().__init__(proc, workdir)
        self.ca = ca
        self.certs = certs
        self.pg = pg

    def connect(self, listener: str, user: str, password: str | None, *, dbname: str = "app", sslmode: str = "disable", **kw) -> psycopg.Connection:
        kw.setdefault("connect_timeout", 10)
        if password is not None:
            kw["password"] = password
        return psycopg.connect(host="127.0.0.1", port=self.port(listener), user=user, dbname=dbname, sslmode=sslmode, **kw)

    def psql(self, listener: str, user: str, password: str | None, *args: str, dbname: str = "app", sslmode: str = "require",
             input: str | None = None, extra: str = "") -> subprocess.CompletedProcess:
        dsn = f"host=127.0.0.1 port={self.port(listener)} user={user} dbname={dbname} sslmode={sslmode} connect_timeout=10 {extra}"
        env = dict(os.environ)
        env.pop("PGPASSWORD", None)
        if password is not None:
            env["PGPASSWORD"] = password
        return subprocess.run(["psql", dsn, "-X", "-w", *args], input=input, capture_output=True, text=True, timeout=60, env=env)


@pytest.fixture(scope="module")
def env(pg, tmp_path_factory):
    from scripts.peers.certs import make_ca, make_cert

    workdir = tmp_path_factory.mktemp("pgident")
    ca = make_ca(workdir / "ca")
    cert, key = make_cert(workdir / "ca", ca, "proxy", sans=["localhost", "127.0.0.1"])
    certs = {name: make_cert(workdir / "clients", ca, name, client=True) for name in ("alice", "mallory")}
    other_ca = make_ca(workdir / "other-ca", name="untrusted CA")
    certs["stranger"] = make_cert(workdir / "other-ca", other_ca, "alice", client=True)
    token_keygen(workdir)

    tls = {"cert_file": str(cert), "key_file": str(key)}
    config = {
        "identity": {
            "token": TOKEN_IDENTITY,
            "mtls": {"subject": "cn", "users": {"alice": ["writer"], "mallory": []}},
        },
        "roles": {
            "analyst": {"routes": ["*"], "databases": ["app"], "db_users": ["u_*"], "read_only": True},
            "writer": {"routes": ["app"], "databases": ["app"], "db_users": ["u_*"], "deny_commands": ["DROP", "TRUNCATE", "DO"]},
        },
        "limits": {"identities": {"carol": 1}, "listeners": {"limited": 2}},
        "listeners": [
            {"name": "tok", "protocol": "postgres", "listen": "127.0.0.1:0", "tls": tls, "auth": {"methods": ["token"]}, "routes": _routes(pg)},
            {"name": "mtls", "protocol": "postgres", "listen": "127.0.0.1:0", "tls": dict(tls, client_ca_file=str(ca[0])), "auth": {"methods": ["mtls"]}, "routes": _routes(pg)},
            {"name": "limited", "protocol": "postgres", "listen": "127.0.0.1:0", "auth": {"methods": ["token"]}, "routes": _routes(pg)},
            {"name": "anon", "protocol": "postgres", "listen": "127.0.0.1:0", "auth": {"methods": ["anonymous"], "anonymous_roles": ["analyst"]}, "routes": _routes(pg)},
        ],
        "audit": {"sinks": [{"type": "jsonl", "path": "audit.jsonl"}]},
    }
    config_path = workdir / "proxy.json"
    # The proxy writes its config itself (ProxyProcess); the CLI reads the same file.
    proc = ProxyProcess(workdir, config, name="proxy")
    assert proc.config_path == config_path
    proc.start()
    e = Env(proc, workdir, ca[0], certs, pg)
    yield e
    proc.stop()


def _session_events(evs: list[dict], sid: str) -> list[dict]:
    return [e for e in evs if e.get("sid") == sid]


def _start_for(evs: list[dict], **match) -> dict:
    found = [e for e in evs if e["event"] == "db.session.start" and all(e.get(k) == v for k, v in match.items())]
    assert found, f"no session.start with {match}"
    return found[-1]


# --------------------------------------------------------------------------- valid tokens


def test_token_over_tls_is_asked_in_cleartext_psql(env):
    token, jti = env.issue("alice", "analyst")
    out = env.psql("tok", "alice", token, "-Atc", "select current_user, ssl from pg_stat_ssl where pid = pg_backend_pid()")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "u_trust|f"
    evs = env.wait_events(lambda evs: any(e.get("token_id") == jti and e["event"] == "db.session.end" for e in evs))
    start = _start_for(evs, token_id=jti)
    assert start["success"] is True
    assert (start["user"], start["roles"], start["auth_method"], start["client_auth"]) == ("alice", ["analyst"], "token", "cleartext")
    assert start["client_tls"] is True and start["read_only"] is True and start["granted_roles"] == ["analyst"]


def test_token_without_tls_uses_scram_psycopg(env):
    token, jti = env.issue("alice", "writer")
    with env.connect("tok", "alice", token, sslmode="disable") as conn:
        assert conn.execute("select current_user").fetchone() == ("u_trust",)
        assert conn.info.pgconn.ssl_in_use is False
    # The same token, again, and through the system libpq's psql too.
    out = env.psql("tok", "alice", token, "-Atc", "select 'scram-ok'", sslmode="disable")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "scram-ok"
    evs = env.wait_events(lambda evs: sum(1 for e in evs if e.get("token_id") == jti and e["event"] == "db.session.start") >= 2)
    starts = [e for e in evs if e["event"] == "db.session.start" and e.get("token_id") == jti]
    assert all(s["client_auth"] == "SCRAM-SHA-256" and s["success"] and s["client_tls"] is False for s in starts)


def test_scram_picks_the_right_one_of_several_tokens(env):
    first, jti1 = env.issue("frank", "analyst")
    second, jti2 = env.issue("frank", "writer")
    # Both share frank's SCRAM salt; each proof must select its own token (and its roles).
    with env.connect("tok", "frank", first) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("create table t_frank_ro (a int)")
    with env.connect("tok", "frank", second, autocommit=True) as conn:
        conn.execute("create table if not exists t_frank_rw (a int)")
    evs = env.wait_events(lambda evs: sum(1 for e in evs if e["event"] == "db.session.start" and e.get("user") == "frank") >= 2)
    starts = [e for e in evs if e["event"] == "db.session.start" and e.get("user") == "frank"]
    assert {(s["token_id"], tuple(s["roles"])) for s in starts} == {(jti1, ("analyst",)), (jti2, ("writer",))}


# --------------------------------------------------------------------------- refused tokens


@pytest.fixture(scope="module")
def bad_tokens(env):
    return issue_bad_tokens(env, "analyst")


CASES = BAD_TOKEN_CASES


@pytest.mark.parametrize("case", CASES)
def test_bad_token_refused_cleartext_psql(env, bad_tokens, case):
    token, reason, token_id = bad_tokens[case]
    mark = env.mark()
    out = env.psql("tok", "alice", token, "-Atc", "select 1")
    assert out.returncode != 0
    assert 'password authentication failed for user "alice"' in out.stderr
    evs = env.wait_events(lambda evs: any(e["event"] == "db.session.access_denied" and e.get("reason") == reason for e in evs), since=mark)
    denial = [e for e in evs if e["event"] == "db.session.access_denied" and e.get("reason") == reason][-1]
    assert denial["success"] is False and denial["stage"] == "authenticate" and denial["requested_user"] == "alice"
    assert (denial["user"], denial["auth_method"], denial["roles"]) == ("unauthenticated", "token", [])
    assert "token_id" not in denial  # only a proven identity has a token id; the refused one is attempted_token_id
    if token_id:
        assert denial["attempted_token_id"] == token_id
    start = [e for e in _session_events(evs, denial["sid"]) if e["event"] == "db.session.start"]
    assert start and start[0]["success"] is False and start[0]["sqlstate"] == "28P01"


@pytest.mark.parametrize("case", CASES)
def test_bad_token_refused_scram_psycopg(env, bad_tokens, case):
    token, _, _ = bad_tokens[case]
    mark = env.mark()
    with pytest.raises(psycopg.OperationalError) as info:
        env.connect("tok", "alice", token, sslmode="disable")
    assert 'password authentication failed for user "alice"' in str(info.value)
    # SCRAM cannot tell why no verifier matched (the token never crosses the wire): the audit says so.
    evs = env.wait_events(lambda evs: any(e["event"] == "db.session.access_denied" for e in evs), since=mark)
    denial = [e for e in evs if e["event"] == "db.session.access_denied"][0]
    assert denial["reason"] == "scram_no_match" and denial["client_auth"] == "SCRAM-SHA-256" and denial["success"] is False


def test_revocation_file_is_reread_by_the_running_proxy(env):
    token, jti = env.issue("alice", "analyst")
    with env.connect("tok", "alice", token, sslmode="require") as conn:
        conn.execute("select 1")
    env.revoke(jti)
    for sslmode in ("require", "disable"):  # cleartext and SCRAM
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            env.connect("tok", "alice", token, sslmode=sslmode)
    listed = dbproxy_cli("token", "list", "--config", str(env.config_path), "--all", check=True).stdout
    assert jti not in listed  # its verifiers left the registry too


# --------------------------------------------------------------------------- mTLS


def _cert_args(env, name: str) -> str:
    cert, key = env.certs[name]
    return f"sslcert={cert} sslkey={key} sslrootcert={env.ca}"


def test_mtls_identity_from_certificate(env):
    mark = env.mark()
    out = env.psql("mtls", "alice", None, "-Atc", "select 'mtls-ok'", sslmode="verify-ca", extra=_cert_args(env, "alice"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "mtls-ok"
    evs = env.wait_events(lambda evs: any(e["event"] == "db.session.start" and e.get("auth_method") == "mtls" and e["success"] for e in evs), since=mark)
    start = _start_for(evs, auth_method="mtls", success=True)
    assert start["user"] == "alice" and start["roles"] == ["writer"] and "token_id" not in start


def test_mtls_missing_certificate_refused(env):
    mark = env.mark()
    out = env.psql("mtls", "alice", None, "-Atc", "select 1", sslmode="require")
    assert out.returncode != 0
    assert "connection requires a valid client certificate" in out.stderr
    out = env.psql("mtls", "alice", None, "-Atc", "select 1", sslmode="disable")
    assert "connection requires a valid client certificate" in out.stderr
    evs = env.wait_events(lambda evs: sum(1 for e in evs if e.get("reason") == "certificate_missing") >= 2, since=mark)
    assert all(e["success"] is False for e in evs if e.get("reason") == "certificate_missing")


def test_mtls_certificate_for_another_user_or_ca_refused(env):
    out = env.psql("mtls", "mallory", None, "-Atc", "select 1", sslmode="verify-ca", extra=_cert_args(env, "alice"))
    assert out.returncode != 0 and 'certificate authentication failed for user "mallory"' in out.stderr
    # A certificate from a CA the listener does not trust fails the TLS handshake itself.
    out = env.psql("mtls", "alice", None, "-Atc", "select 1", sslmode="verify-ca", extra=_cert_args(env, "stranger"))
    assert out.returncode != 0
    # mallory's own certificate is valid, but maps to no role: deny by default.
    out = env.psql("mtls", "mallory", None, "-Atc", "select 1", sslmode="verify-ca", extra=_cert_args(env, "mallory"))
    assert out.returncode != 0 and 'permission denied for database "app"' in out.stderr


# --------------------------------------------------------------------------- RBAC at connect


def test_role_without_access_to_database_refused(env):
    token, jti = env.issue("alice", "analyst")
    with pytest.raises(psycopg.OperationalError) as info:
        env.connect("tok", "alice", token, dbname="otherdb")
    assert 'permission denied for database "postgres"' in str(info.value)
    out = env.psql("tok", "alice", token, "-Atc", "select 1", dbname="otherdb")
    assert out.returncode != 0 and "permission denied for database" in out.stderr
    evs = env.wait_events(lambda evs: any(e.get("attempted_token_id") is None and e.get("token_id") == jti and e["event"] == "db.session.access_denied" for e in evs))
    denial = [e for e in evs if e["event"] == "db.session.access_denied" and e.get("token_id") == jti][-1]
    assert denial["stage"] == "connect" and denial["reason"] == "no_role_allows" and denial["success"] is False
    assert denial["user"] == "alice" and denial["db_name"] == "postgres"


def test_token_without_roles_is_denied_by_default(env):
    token, _ = env.issue("nobody")
    with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
        env.connect("tok", "nobody", token)


# --------------------------------------------------------------------------- read-only


BYPASSES = [
    "SET transaction_read_only = off",
    "SET default_transaction_read_only = off",
    "set \"Default_Transaction_Read_Only\" to off",
    "SET LOCAL transaction_read_only TO off",
    "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
    "SET TRANSACTION READ WRITE",
    "BEGIN READ WRITE",
    "START TRANSACTION READ WRITE",
    "BEGIN ISOLATION LEVEL SERIALIZABLE, READ WRITE",
    "RESET default_transaction_read_only",
    "RESET ALL",
    "DISCARD ALL",
    "SELECT set_config('default_transaction_read_only', 'off', false)",
    "SELECT pg_catalog.set_config('transaction_read_only', 'off', true)",
    "select 1; set default_transaction_read_only = off",
]


@pytest.fixture(scope="module")
def ro_table(env):
    token, _ = env.issue("alice", "writer")
    with env.connect("tok", "alice", token, autocommit=True) as conn:
        # writer may not DROP or TRUNCATE: create-if-absent and DELETE instead
        conn.execute("create table if not exists t_ro (id int, v text)")
        conn.execute("delete from t_ro")
        conn.execute("insert into t_ro values (1, 'one')")
        conn.execute(
            "create or replace function f_sneaky_write() returns int language sql as $$ insert into t_ro values (99, 'sneaky') returning 1 $$"
        )
    return "t_ro"


def test_read_only_role_refuses_writes(env, ro_table):
    token, _ = env.issue("alice", "analyst")
    with env.connect("tok", "alice", token, autocommit=True) as conn:
        assert conn.execute("select v from t_ro where id = 1").fetchone() == ("one",)
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="INSERT is not allowed in a read-only session"):
            conn.execute("insert into t_ro values (2, 'two')")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="UPDATE"):
            conn.execute("update t_ro set v = 'x' where id = %s", (1,))
        # The session continues; the backend session itself is read-only too:
        assert conn.execute("show default_transaction_read_only").fetchone() == ("on",)
        # a write hidden in a function passes the proxy's statement check but not PostgreSQL.
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("select f_sneaky_write()")
        assert conn.execute("select count(*) from t_ro").fetchone() == (1,)
    out = env.psql("tok", "alice", token, "-c", "insert into t_ro values (3, 'three')", "-c", "select 'still here'", "-At")
    assert "permission denied: INSERT is not allowed" in out.stderr
    assert "still here" in out.stdout


@pytest.mark.parametrize("sql", BYPASSES)
def test_read_only_bypass_attempts_refused(env, ro_table, sql):
    token, _ = env.issue("alice", "analyst")
    with env.connect("tok", "alice", token, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(sql)
        assert conn.execute("show default_transaction_read_only").fetchone() == ("on",)
        conn.execute("begin")
        assert conn.execute("show transaction_read_only").fetchone() == ("on",)
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("select f_sneaky_write()")
        conn.execute("rollback")
    # psql: simple protocol, same answer, and the next statement runs.
    out = env.psql("tok", "alice", token, "-At", input=f"{sql};\nshow default_transaction_read_only;\n")
    assert "permission denied" in out.stderr
    assert out.stdout.strip().splitlines()[-1] == "on"


def test_anonymous_listener_gets_its_roles(env, ro_table):
    mark = env.mark()
    with psycopg.connect(host="127.0.0.1", port=env.port("anon"), user="whoever", dbname="app", sslmode="disable", autocommit=True) as conn:
        assert conn.execute("select count(*) from t_ro").fetchone()[0] >= 1
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("delete from t_ro")
    evs = env.wait_events(lambda evs: any(e["event"] == "db.session.start" and e.get("listener") == "anon" for e in evs), since=mark)
    start = _start_for(evs, listener="anon")
    assert start["auth_method"] == "anonymous" and start["user"] == "anonymous" and start["roles"] == ["analyst"]


# --------------------------------------------------------------------------- denied commands mid-session


def test_denied_command_simple_protocol_psql(env):
    token, jti = env.issue("alice", "writer")
    script = "create table if not exists t_deny_s (a int);\ndrop table t_deny_s;\nselect 'after drop';\ntruncate t_deny_s;\nselect count(*) from t_deny_s;\n"
    out = env.psql("tok", "alice", token, "-At", input=script)
    assert out.stderr.count("permission denied") == 2, out.stderr
    assert "DROP TABLE is not allowed" in out.stderr and "TRUNCATE is not allowed" in out.stderr
    assert [line for line in out.stdout.splitlines() if line and line != "CREATE TABLE"] == ["after drop", "0"]
    # Wait for both refusals' denial and result events (the trail is written a few ms after psql got its errors).
    evs = env.wait_events(lambda evs: sum(1 for e in evs if e.get("token_id") == jti and e["event"] == "db.session.access_denied") >= 2
                          and sum(1 for e in evs if e.get("token_id") == jti and e["event"] == "db.session.result"
                                  and e.get("sqlstate") == "42501") >= 2)
    denials = [e for e in evs if e.get("token_id") == jti and e["event"] == "db.session.access_denied"]
    assert [d["command"] for d in denials] == ["DROP TABLE", "TRUNCATE"]
    assert all(d["stage"] == "statement" and d["success"] is False and d["postgres_protocol"] == "simple" for d in denials)
    results = [e for e in evs if e.get("token_id") == jti and e["event"] == "db.session.result" and e.get("sqlstate") == "42501"]
    assert len(results) == 2 and all(r["success"] is False for r in results)


def test_denied_command_extended_protocol_psycopg(env):
    token, jti = env.issue("alice", "writer")
    with env.connect("tok", "alice", token, autocommit=True) as conn:
        conn.execute("create table if not exists t_deny_e (a int)")
        # binary results make psycopg use Parse/Bind/Describe/Execute/Sync (unnamed statement)
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="DROP TABLE is not allowed"):
            conn.execute("drop table t_deny_e", binary=True)
        assert conn.execute("select %s::int + 1", (41,)).fetchone() == (42,)
        # a named prepared statement
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="TRUNCATE is not allowed"):
            conn.execute("truncate t_deny_e", prepare=True)
        assert conn.execute("select 'ok'", prepare=True).fetchone() == ("ok",)
        assert conn.execute("select %s::text", ("again",), prepare=True).fetchone() == ("again",)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("select 1; drop table t_deny_e")  # several statements (simple protocol): all refused
        assert conn.execute("select count(*) from t_deny_e").fetchone() == (0,)
    evs = env.wait_events(lambda evs: sum(1 for e in evs if e.get("token_id") == jti and e["event"] == "db.session.access_denied") >= 3)
    denials = [e for e in evs if e.get("token_id") == jti and e["event"] == "db.session.access_denied"]
    assert [(d["command"], d["postgres_protocol"]) for d in denials] == [("DROP TABLE", "extended"), ("TRUNCATE", "extended"), ("DROP TABLE", "simple")]
    # In a transaction the refusal aborts it, as a native error would.
    with env.connect("tok", "alice", token) as conn:
        conn.execute("insert into t_deny_e values (1)")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("drop table t_deny_e")
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("select 1")
        conn.rollback()
        assert conn.execute("select count(*) from t_deny_e").fetchone() == (0,)


def test_denied_command_in_pipeline_behaves_like_a_native_error(env):
    token, _ = env.issue("alice", "writer")
    with env.connect("tok", "alice", token, autocommit=True) as conn:
        conn.execute("create table if not exists t_deny_p (a int)")

        def run(bad_sql: str):
            conn.execute("delete from t_deny_p")
            cursors = []
            with pytest.raises(psycopg.Error) as info:
                with conn.pipeline():
                    for sql in ("insert into t_deny_p values (1)", "insert into t_deny_p values (2)", bad_sql, "insert into t_deny_p values (3)"):
                        cursors.append(conn.execute(sql))
            rows = conn.execute("select array_agg(a order by a) from t_deny_p").fetchone()
            return type(info.value), rows, [c.statusmessage for c in cursors[:2]], conn.info.transaction_status

        denied = run("truncate t_deny_p")
        native = run("select 1/0")  # an error PostgreSQL itself raises at the same point
        assert denied[0] is psycopg.errors.InsufficientPrivilege and native[0] is psycopg.errors.DivisionByZero
        assert denied[1:] == native[1:]  # same rows committed, same results before the error, same state after
        with conn.pipeline():
            cur = conn.execute("select 'pipeline ok'")
        assert cur.fetchone() == ("pipeline ok",)


# --------------------------------------------------------------------------- limits


def test_connection_limit_per_identity(env):
    token, _ = env.issue("carol", "analyst")
    mark = env.mark()
    first = env.connect("tok", "carol", token)
    try:
        with pytest.raises(psycopg.OperationalError, match='too many connections for role "carol"'):
            env.connect("tok", "carol", token)
        out = env.psql("tok", "carol", token, "-Atc", "select 1")
        assert "too many connections" in out.stderr
    finally:
        first.close()
    # The slot is released when the session ends.
    wait_until(lambda: _can_connect(env, "tok", "carol", token), timeout=10, what="carol's slot to free")
    evs = env.wait_events(lambda evs: any(e.get("reason") == "too_many_connections_identity" for e in evs), since=mark)
    assert all(e["success"] is False for e in evs if e.get("reason") == "too_many_connections_identity")


def _can_connect(env, listener, user, token) -> bool:
    try:
        with env.connect(listener, user, token) as conn:
            conn.execute("select 1")
        return True
    except psycopg.OperationalError:
        return False


def test_connection_limit_per_listener(env):
    tokens = {u: env.issue(u, "analyst")[0] for u in ("dave", "erin", "gina")}
    held = [env.connect("limited", "dave", tokens["dave"]), env.connect("limited", "erin", tokens["erin"])]
    try:
        with pytest.raises(psycopg.OperationalError, match="sorry, too many clients already"):
            env.connect("limited", "gina", tokens["gina"])
        with env.connect("tok", "gina", tokens["gina"]) as other:  # other listeners are not affected
            other.execute("select 1")
    finally:
        for c in held:
            c.close()
    wait_until(lambda: _can_connect(env, "limited", "gina", tokens["gina"]), timeout=10, what="the listener slot to free")


def test_concurrent_token_sessions(env):
    token, _ = env.issue("hank", "analyst")
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            with env.connect("tok", "hank", token) as conn:
                conn.execute("select pg_sleep(0.2)")
        except BaseException as exc:  # collected below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:2]


# --------------------------------------------------------------------------- audit and secrets


def test_audit_carries_identity_on_every_event(env):
    token, jti = env.issue("ivan", "writer")
    with env.connect("tok", "ivan", token, autocommit=True) as conn:
        conn.execute("select 1")
        conn.execute("select %s::text", ("p",))
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("drop table if exists t_nothing")
    evs = env.wait_events(lambda evs: any(e.get("token_id") == jti and e["event"] == "db.session.end" for e in evs))
    sid = _start_for(evs, token_id=jti)["sid"]
    mine = _session_events(evs, sid)
    kinds = {e["event"] for e in mine}
    assert {"db.session.start", "db.session.query", "db.session.postgres.statements.execute", "db.session.result",
            "db.session.access_denied", "db.session.end"} <= kinds
    for e in mine:
        assert (e["user"], e["roles"], e["auth_method"], e["token_id"]) == ("ivan", ["writer"], "token", jti), e


def test_no_token_or_password_in_logs_or_audit(env, bad_tokens):
    # Runs after the other tests of the module have used many tokens.
    env.wait_events(lambda evs: len(evs) > 10)
    blob = env.audit_path.read_text() + env.proc.log_text()
    assert env.tokens
    assert_no_token_secrets(blob, env, bad_tokens)
    assert "hunter2-plain-password" not in blob


def test_anonymous_listener_on_public_address_refuses_to_start(env, pg, tmp_path):
    doc = {
        "listeners": [{"name": "open", "protocol": "postgres", "listen": "0.0.0.0:0", "routes": _routes(pg)}],
        "audit": {"sinks": [{"type": "jsonl", "path": str(tmp_path / "a.jsonl")}]},
    }
    path = tmp_path / "open.json"
    path.write_text(json.dumps(doc))
    p = dbproxy_cli("serve", "--config", str(path))
    assert p.returncode == 2
    assert "listeners[0].listen" in p.stderr and "i_know_this_is_open" in p.stderr
    doc["listeners"][0]["auth"] = {"methods": ["anonymous"], "i_know_this_is_open": True}
    path.write_text(json.dumps(doc))
    assert dbproxy_cli("check-config", str(path)).returncode == 0
