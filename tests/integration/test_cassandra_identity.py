"""Identity and access through the Cassandra engine: a real Apache Cassandra 5.0,
the real cassandra-driver and cqlsh, the real ``dbproxy serve`` CLI.

Listeners of the proxy (one ``dbproxy serve`` for the module):
  tok        TLS; auth token (the CQL password is a dbproxy token)
  plaintok   no TLS; auth token (refused: a token never crosses a plaintext link)
  mtls       TLS with a client CA; auth mtls (identity = certificate CN)
  anon       no TLS; auth anonymous, anonymous_roles [cql-readonly]

Roles (route "cass" → the node as cassandra/cassandra):
  cql            everything
  cql-readonly   read_only
  cql-nodrop     deny_commands DROP*, TRUNCATE
  cql-app        databases (keyspaces) ["app"]
  elsewhere      another route only

Keyspaces on the node: ``app`` and ``secret``, each with a table ``kv``.
Tokens come from ``dbproxy token issue`` run as a subprocess, like an
operator would; every one handed out is grepped for in the logs and audit.
"""

from __future__ import annotations

import os
import shutil
import ssl
import struct
import subprocess
import uuid

import pytest
from cassandra import Unauthorized
from cassandra.cluster import NoHostAvailable
from cassandra.query import BatchStatement, SimpleStatement

from dbproxy.engines.cassandra import protocol as F
from tests.integration.test_cassandra_proxy import RawCql, _backend, cluster, node, refusal  # noqa: F401  (node: the module's own Cassandra)
from tests.support import (
    ProxyProcess,
    cassandra_direct,
    cql_keyspace,
    dbproxy_cli,
    peer_missing,
    read_audit,
    token_keygen,
    wait_audit,
)

pytestmark = pytest.mark.integration

# Protocol versions × compression the statement policy is proven on (v5: the
# refusal travels in segments; v4 lz4/snappy: in a compressed frame).
VERSIONS = [(4, None), (4, "lz4"), (5, "lz4"), (5, None), (3, "snappy")]
VERSION_IDS = [f"v{v}-{c or 'none'}" for v, c in VERSIONS]
CORE_VERSIONS = [(4, "lz4"), (5, "lz4")]
CORE_IDS = [f"v{v}-{c}" for v, c in CORE_VERSIONS]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def direct(node):
    """A session straight to the node: set-up and checks of what really happened."""
    c, session = cassandra_direct(node, *(
        statement
        for ks in ("app", "secret")
        for statement in (cql_keyspace(ks), f"CREATE TABLE IF NOT EXISTS {ks}.kv (k text PRIMARY KEY, v int)",
                          f"INSERT INTO {ks}.kv (k, v) VALUES ('seed', 1)")
    ))
    yield session
    c.shutdown()


@pytest.fixture(scope="module")
def idproxy(node, direct, tmp_path_factory):
    from scripts.peers.certs import make_ca, make_cert

    workdir = tmp_path_factory.mktemp("cqlident")
    ca = make_ca(workdir)
    cert, key = make_cert(workdir, ca, "proxy", sans=["localhost", "127.0.0.1"])
    token_keygen(workdir)
    secret = workdir / "cassandra.secret"
    secret.write_text(node.password)
    routes = [{"name": "cass", "backend": _backend(node, secret)}]
    every = {"routes": ["cass"], "databases": ["*"], "db_users": ["*"]}
    config = {
        "identity": {"token": {"algorithm": "EdDSA", "key_file": "token.key", "public_key_file": "token.pub"},
                     "mtls": {"subject": "cn", "users": {"erin": ["cql"]}}},
        "roles": {
            "cql": every,
            "cql-readonly": {**every, "read_only": True},
            "cql-nodrop": {**every, "deny_commands": ["DROP*", "TRUNCATE"]},
            "cql-app": {**every, "databases": ["app"]},
            "elsewhere": {"routes": ["other"], "databases": ["*"], "db_users": ["*"]},
        },
        "listeners": [
            {"name": "tok", "protocol": "cassandra", "listen": "127.0.0.1:0", "tls": {"cert_file": str(cert), "key_file": str(key)},
             "auth": {"methods": ["token"]}, "routes": routes},
            {"name": "plaintok", "protocol": "cassandra", "listen": "127.0.0.1:0", "auth": {"methods": ["token"]}, "routes": routes},
            {"name": "mtls", "protocol": "cassandra", "listen": "127.0.0.1:0",
             "tls": {"cert_file": str(cert), "key_file": str(key), "client_ca_file": str(ca[0])},
             "auth": {"methods": ["mtls"]}, "routes": routes},
            {"name": "anon", "protocol": "cassandra", "listen": "127.0.0.1:0",
             "auth": {"methods": ["anonymous"], "anonymous_roles": ["cql-readonly"]}, "routes": routes},
        ],
        "audit": {"sinks": [{"type": "jsonl", "path": "audit.jsonl"}]},
    }
    proc = ProxyProcess(workdir, config, name="proxy").start()
    proc.audit_path = workdir / "audit.jsonl"
    proc.ca_file = ca[0]
    proc.client_cert = make_cert(workdir / "clients", ca, "erin", client=True)
    proc.tokens = []

    def issue(user: str, roles: str) -> str:
        token = dbproxy_cli("token", "issue", "--config", str(proc.config_path), "--user", user, "--roles", roles, "--ttl", "1h",
                            check=True).stdout.strip()
        proc.tokens.append(token)
        return token

    proc.issue = issue
    yield proc
    proc.stop()


def tls_context(idproxy) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(idproxy.ca_file))


def connect(idproxy, user: str, roles: str, *, version: int = 5, compression: str | None = "lz4", keyspace: str | None = None):
    """(cluster, session) for ``user`` with a fresh token for ``roles`` on the TLS token listener."""
    token = idproxy.issue(user, roles)
    c = cluster(idproxy.port("tok"), user=user, password=token, version=version, compression=compression, ssl_context=tls_context(idproxy))
    return c, c.connect(keyspace)


def events(idproxy, condition, timeout: float = 20.0) -> list[dict]:
    return wait_audit(idproxy.audit_path, condition, timeout=timeout)


def denials(evs: list[dict], user: str) -> list[dict]:
    return [e for e in evs if e["event"] == "db.session.access_denied" and e.get("user") == user and e["stage"] == "statement"]


def refused(session, statement, *params) -> str:
    """The statement is refused with the driver's Unauthorized; returns the message."""
    with pytest.raises(Unauthorized) as info:
        session.execute(statement, *params)
    return str(info.value)


def count(direct, table: str) -> int:
    return direct.execute(f"SELECT count(*) FROM {table}").one().count


# --------------------------------------------------------------------------- who connects


def test_token_identity_and_roles(idproxy):
    ctx = tls_context(idproxy)
    token = idproxy.issue("alice", "cql")
    c = cluster(idproxy.port("tok"), user="alice", password=token, ssl_context=ctx)
    try:
        assert c.connect().execute("SELECT release_version FROM system.local").one().release_version.startswith("5.0.")
    finally:
        c.shutdown()
    start = events(idproxy, lambda evs: any(e["event"] == "db.session.start" and e.get("user") == "alice" for e in evs))
    start = [e for e in start if e["event"] == "db.session.start" and e.get("user") == "alice"][-1]
    assert start["success"] and start["auth_method"] == "token" and start["client_auth"] == "token"
    assert start["roles"] == ["cql"] and start["granted_roles"] == ["cql"] and start["token_id"]

    # a wrong token: Cassandra's own words, the reason in the audit trail only
    text = refusal(idproxy.port("tok"), user="alice", password=token[:-4] + "AAAA", ssl_context=ctx)
    assert "Provided username alice and/or password are incorrect" in text
    # a token for bob used as alice
    text = refusal(idproxy.port("tok"), user="alice", password=idproxy.issue("bob", "cql"), ssl_context=ctx)
    assert "Provided username alice and/or password are incorrect" in text
    # roles that do not allow the route
    assert "has no role allowing route cass" in refusal(idproxy.port("tok"), user="carol", password=idproxy.issue("carol", "elsewhere"), ssl_context=ctx)
    # a token never travels over a plaintext listener
    assert "needs an encrypted connection" in refusal(idproxy.port("plaintok"), user="alice", password=token)

    # mTLS: the certificate is the identity; no credentials needed (the client gets READY)
    mctx = ssl.create_default_context(cafile=str(idproxy.ca_file))
    mctx.load_cert_chain(*map(str, idproxy.client_cert))
    c = cluster(idproxy.port("mtls"), user=None, ssl_context=mctx)
    try:
        c.connect().execute("SELECT now() FROM system.local")
    finally:
        c.shutdown()
    assert "requires a valid client certificate" in refusal(idproxy.port("mtls"), user="erin", password="x", ssl_context=ctx)

    evs = events(idproxy, lambda evs: sum(1 for e in evs if e["event"] == "db.session.access_denied" and e["stage"] != "statement") >= 5)
    erin = [e for e in evs if e["event"] == "db.session.start" and e.get("user") == "erin"][-1]
    assert erin["success"] and erin["auth_method"] == "mtls" and erin["client_auth"] == "mtls" and erin["requested_user"] is None
    denied = [e for e in evs if e["event"] == "db.session.access_denied" and e["stage"] != "statement"]
    assert {e["stage"] for e in denied} == {"authenticate", "connect"}
    assert {"no_role_allows", "method_unavailable", "certificate_missing"} <= {e["reason"] for e in denied}


# --------------------------------------------------------------------------- read-only


@pytest.mark.parametrize(("version", "compression"), VERSIONS, ids=VERSION_IDS)
def test_read_only_role_reads_and_is_refused_every_write(idproxy, direct, version, compression):
    user = f"dave{version}{compression or ''}"
    before = count(direct, "app.kv")
    c, session = connect(idproxy, user, "cql-readonly", version=version, compression=compression)
    try:
        # reads work, and the driver's own metadata reads worked at connect
        assert session.execute("SELECT v FROM app.kv WHERE k = 'seed'").one().v == 1
        assert "kv" in c.metadata.keyspaces["app"].tables
        writes = [
            "INSERT INTO app.kv (k, v) VALUES ('ro', 1)",
            "UPDATE app.kv SET v = 2 WHERE k = 'seed'",
            "DELETE FROM app.kv WHERE k = 'seed'",
            "TRUNCATE app.kv",
            "CREATE TABLE app.ro_made (k int PRIMARY KEY)",
            "ALTER TABLE app.kv ADD extra text",
            "DROP TABLE app.kv",
            "CREATE KEYSPACE ro_ks WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1}",
            "GRANT SELECT ON KEYSPACE app TO cassandra",
            "BEGIN BATCH INSERT INTO app.kv (k, v) VALUES ('b1', 1); INSERT INTO app.kv (k, v) VALUES ('b2', 2); APPLY BATCH",
        ]
        for statement in writes:
            message = refused(session, statement)
            assert "read-only access through this proxy" in message, message
            # the session goes on: the next statement works
            assert session.execute("SELECT count(*) FROM app.kv").one().count == before
        # a BATCH message (not CQL text) from the driver
        batch = BatchStatement()
        batch.add(SimpleStatement("INSERT INTO app.kv (k, v) VALUES ('b3', 3)"))
        assert "BATCH is not allowed" in refused(session, batch)
        # PREPARE of a write is refused, so there is never an id to EXECUTE
        with pytest.raises(Unauthorized, match="INSERT is not allowed"):
            session.prepare("INSERT INTO app.kv (k, v) VALUES (?, ?)")
        select = session.prepare("SELECT v FROM app.kv WHERE k = ?")
        assert session.execute(select, ["seed"]).one().v == 1
    finally:
        c.shutdown()
    assert count(direct, "app.kv") == before and direct.execute("SELECT v FROM app.kv WHERE k = 'seed'").one().v == 1
    assert "ro_made" not in direct.cluster.metadata.keyspaces["app"].tables and "ro_ks" not in direct.cluster.metadata.keyspaces

    def ended(evs):
        return any(e["event"] == "db.session.end" and e.get("user") == user and e.get("refused") for e in evs)

    evs = events(idproxy, lambda evs: len(denials(evs, user)) >= len(writes) + 2 and ended(evs))
    mine = denials(evs, user)
    assert [e["refused"] for e in evs if e["event"] == "db.session.end" and e.get("user") == user and e.get("refused")] == [len(mine)]
    assert {e["reason"] for e in mine} == {"read_only"}
    assert [e["command"] for e in mine] == [
        "INSERT", "UPDATE", "DELETE", "TRUNCATE", "CREATE TABLE", "ALTER TABLE", "DROP TABLE", "CREATE KEYSPACE", "GRANT", "BATCH", "BATCH", "INSERT",
    ]
    assert [e["cql_opcode"] for e in mine][-3:] == ["QUERY", "BATCH", "PREPARE"]
    for e in mine:
        assert e["success"] is False and e["user"] == user and e["roles"] == ["cql-readonly"]
        assert e["auth_method"] == "token" and e["token_id"]
    results = {e["query_uid"]: e for e in evs if e["event"] == "db.session.result" and e.get("query_uid")}
    for e in mine:
        r = results[e["query_uid"]]
        assert r["success"] is False and r["error_code"] == 0x2100 and r["error_name"] == "UNAUTHORIZED" and r["user"] == user


def test_execute_of_a_write_prepared_elsewhere_is_refused(idproxy, direct):
    """EXECUTE is checked against the CQL the id stands for, wherever it was prepared."""
    writer_c, writer = connect(idproxy, "wanda", "cql")
    reader_c, reader = connect(idproxy, "rita", "cql-readonly")
    try:
        tag = uuid.uuid4().hex[:8]
        insert = writer.prepare(f"INSERT INTO app.kv (k, v) VALUES (?, ?) USING TTL 600 /* {tag} */")
        writer.execute(insert, ["via-writer", 1])
        assert "INSERT is not allowed" in refused(reader, insert.bind(["via-reader", 2]))
        assert direct.execute("SELECT k FROM app.kv WHERE k = 'via-reader'").one() is None

        # prepared on the node itself, never seen by the proxy: the proxy answers
        # UNPREPARED, the driver prepares it again through the proxy ...
        select = direct.prepare(f"SELECT v FROM app.kv WHERE k = ? /* {tag} */")
        assert reader.execute(select, ["seed"]).one().v == 1  # ... a read then just works
        delete = direct.prepare(f"DELETE FROM app.kv WHERE k = ? /* {tag} */")
        with pytest.raises(Unauthorized, match="DELETE is not allowed"):  # ... a write is refused at that PREPARE
            reader.execute(delete, ["seed"])
        assert direct.execute("SELECT v FROM app.kv WHERE k = 'seed'").one().v == 1
    finally:
        writer_c.shutdown()
        reader_c.shutdown()
    evs = events(idproxy, lambda evs: len(denials(evs, "rita")) >= 4)
    mine = denials(evs, "rita")
    assert [(e["reason"], e["cql_opcode"]) for e in mine] == [
        ("read_only", "EXECUTE"), ("prepared_id_unknown", "EXECUTE"), ("prepared_id_unknown", "EXECUTE"), ("read_only", "PREPARE"),
    ]
    assert mine[0]["db_query"] == insert.query_string and mine[1]["prepared_id"] == select.query_id.hex()


def test_raw_execute_of_unknown_id_gets_unprepared_on_its_stream(idproxy, direct):
    """The anonymous listener's read-only grant, with frames written by hand (no driver re-prepare)."""
    prepared = direct.prepare(f"SELECT v FROM app.kv WHERE k = 'seed' /* {uuid.uuid4().hex[:8]} */")
    raw = RawCql(idproxy.port("anon"), version=4)
    try:
        raw.login(user="anyone")
        body = struct.pack(">H", len(prepared.query_id)) + prepared.query_id + struct.pack(">HB", F.Consistency.ONE, 0)
        raw.send(F.encode_frame(4, 0, 21, F.Opcode.EXECUTE, body, response=False))
        answer = raw.recv()
        err = F.parse_error(answer)
        assert answer.stream == 21 and err.code == F.ErrorCode.UNPREPARED and err.unprepared_id == prepared.query_id
        err = F.parse_error(raw.query("DELETE FROM app.kv WHERE k = 'seed'", stream=22))
        assert err.code == F.ErrorCode.UNAUTHORIZED and "DELETE is not allowed" in err.message
        rows = raw.query("SELECT v FROM app.kv WHERE k = 'seed'", stream=23)
        assert rows.opcode == F.Opcode.RESULT and F.parse_result(rows).rows.row_count == 1
    finally:
        raw.close()


# --------------------------------------------------------------------------- denied command patterns


@pytest.mark.parametrize(("version", "compression"), CORE_VERSIONS, ids=CORE_IDS)
def test_denied_command_mid_session_then_the_next_statement_works(idproxy, direct, version, compression):
    user = f"nick{version}"
    table = f"app.scratch_v{version}"
    c, session = connect(idproxy, user, "cql-nodrop", version=version, compression=compression)
    try:
        session.execute(f"CREATE TABLE IF NOT EXISTS {table} (k int PRIMARY KEY, v int)")
        session.execute(f"INSERT INTO {table} (k, v) VALUES (1, 1)")
        assert 'role policy "DROP*"' in refused(session, f"DROP TABLE {table}")
        session.execute(f"INSERT INTO {table} (k, v) VALUES (2, 2)")  # the next statement works
        assert 'role policy "TRUNCATE"' in refused(session, f"TRUNCATE {table}")
        assert 'role policy "DROP*"' in refused(session, "DROP KEYSPACE secret")
        with pytest.raises(Unauthorized, match="DROP TABLE"):
            session.prepare(f"DROP TABLE {table}")
        assert session.execute(f"SELECT count(*) FROM {table}").one().count == 2
    finally:
        c.shutdown()
    assert count(direct, table) == 2 and "secret" in direct.cluster.metadata.keyspaces
    evs = events(idproxy, lambda evs: len(denials(evs, user)) >= 4)
    assert [(e["reason"], e["command"]) for e in denials(evs, user)] == [
        ("command_denied", "DROP TABLE"), ("command_denied", "TRUNCATE"), ("command_denied", "DROP KEYSPACE"), ("command_denied", "DROP TABLE"),
    ]


# --------------------------------------------------------------------------- keyspaces


@pytest.mark.parametrize(("version", "compression"), CORE_VERSIONS, ids=CORE_IDS)
def test_keyspace_not_allowed_is_refused(idproxy, direct, version, compression):
    user = f"kate{version}"
    c, session = connect(idproxy, user, "cql-app", version=version, compression=compression)
    try:
        assert session.execute("SELECT v FROM app.kv WHERE k = 'seed'").one().v == 1
        session.execute("INSERT INTO app.kv (k, v) VALUES (%s, 7)", [user])
        assert "no access to keyspace secret" in refused(session, "SELECT * FROM secret.kv")
        assert "no access to keyspace secret" in refused(session, "INSERT INTO secret.kv (k, v) VALUES ('x', 1)")
        assert "no access to keyspace secret" in refused(session, "USE secret")
        with pytest.raises(Unauthorized):
            session.prepare("SELECT * FROM secret.kv")
        # the driver's metadata reads of the system keyspaces are allowed; their writes are not
        assert session.execute("SELECT count(*) FROM system_schema.tables WHERE keyspace_name = 'app'").one().count >= 1
        assert "no access to keyspace system_auth" in refused(session, "SELECT * FROM system_auth.roles")
        # USE of the allowed keyspace: unqualified names resolve there
        session.set_keyspace("app")
        assert session.execute("SELECT v FROM kv WHERE k = 'seed'").one().v == 1
        select = session.prepare("SELECT v FROM kv WHERE k = ?")
        assert session.execute(select, [user]).one().v == 7
        if version >= 5:
            # v5's per-request keyspace is where unqualified names resolve
            assert "no access to keyspace secret" in refused(session, SimpleStatement("SELECT * FROM kv", keyspace="secret"))
    finally:
        c.shutdown()

    c, session = connect(idproxy, f"{user}-use", "cql-app", version=version, compression=compression, keyspace="app")
    try:
        assert session.execute("SELECT v FROM kv WHERE k = 'seed'").one().v == 1
    finally:
        c.shutdown()
    # the driver's USE on connect is refused: the pool cannot be opened
    bad = f"{user}-bad"
    c = cluster(idproxy.port("tok"), user=bad, password=idproxy.issue(bad, "cql-app"), version=version, compression=compression,
                ssl_context=tls_context(idproxy))
    try:
        with pytest.raises(NoHostAvailable, match="using keyspace 'secret'"):
            c.connect("secret")
    finally:
        c.shutdown()

    assert direct.execute("SELECT count(*) FROM secret.kv").one().count == 1
    evs = events(idproxy, lambda evs: len(denials(evs, user)) >= 5 and denials(evs, bad))
    mine = denials(evs, user)
    assert {e["reason"] for e in mine} == {"keyspace_denied"} and {e["keyspace"] for e in mine} >= {"secret", "system_auth"}
    assert [e["command"] for e in mine][:4] == ["SELECT", "INSERT", "USE", "SELECT"]
    assert [(e["command"], e["keyspace"], e["db_query"]) for e in denials(evs, bad)][0] == ("USE", "secret", 'USE "secret"')


# --------------------------------------------------------------------------- cqlsh


def cqlsh(idproxy, user: str, token: str, *args: str) -> subprocess.CompletedProcess:
    if shutil.which("cqlsh") is None:
        peer_missing("cqlsh not on PATH (pip install cqlsh)")
    env = dict(os.environ, SSL_CERTFILE=str(idproxy.ca_file), SSL_VALIDATE="true")
    cmd = ["cqlsh", "127.0.0.1", str(idproxy.port("tok")), "--ssl", "--connect-timeout", "20", "--request-timeout", "60",
           "-u", user, "-p", token, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)


def test_cqlsh_with_a_read_only_token(idproxy, direct, tmp_path):
    token = idproxy.issue("olga", "cql-readonly")
    out = cqlsh(idproxy, "olga", token, "-e", "SELECT v FROM app.kv WHERE k = 'seed'")
    assert out.returncode == 0, out.stderr
    assert "(1 rows)" in out.stdout

    out = cqlsh(idproxy, "olga", token, "-e", "INSERT INTO app.kv (k, v) VALUES ('cqlsh', 1)")
    assert out.returncode != 0 and "Unauthorized" in out.stderr and "read-only access through this proxy" in out.stderr, out.stderr

    # a script: the refused statement fails, the session goes on with the next
    script = tmp_path / "ro.cql"
    script.write_text("SELECT k FROM app.kv WHERE k = 'seed';\nDELETE FROM app.kv WHERE k = 'seed';\nUSE app;\nSELECT v FROM kv WHERE k = 'seed';\n")
    out = cqlsh(idproxy, "olga", token, "-f", str(script))
    assert "Unauthorized" in out.stderr and "DELETE is not allowed" in out.stderr, out.stderr
    assert out.stdout.count("(1 rows)") == 2, out.stdout
    assert direct.execute("SELECT v FROM app.kv WHERE k = 'seed'").one().v == 1
    assert direct.execute("SELECT k FROM app.kv WHERE k = 'cqlsh'").one() is None

    evs = events(idproxy, lambda evs: len(denials(evs, "olga")) >= 2)
    assert [e["command"] for e in denials(evs, "olga")] == ["INSERT", "DELETE"]


# --------------------------------------------------------------------------- audit and secrets (last)


def test_every_event_carries_identity_and_no_token_leaks(idproxy):
    evs = read_audit(idproxy.audit_path)
    sessions = {e["sid"]: e for e in evs if e["event"] == "db.session.start" and e["success"] and e.get("auth_method") == "token"}
    assert len(sessions) >= 5
    for e in evs:
        if e.get("sid") in sessions:
            assert e["user"] == sessions[e["sid"]]["user"] and e["roles"] and e["token_id"] == sessions[e["sid"]]["token_id"], e
    statement_denials = [e for e in evs if e["event"] == "db.session.access_denied" and e["stage"] == "statement"]
    assert len(statement_denials) >= 20 and all(e["user"] and e["roles"] for e in statement_denials)
    blob = idproxy.audit_path.read_text() + idproxy.log_text()
    assert idproxy.tokens and not [t for t in idproxy.tokens if t in blob or t.split(".")[2] in blob]
