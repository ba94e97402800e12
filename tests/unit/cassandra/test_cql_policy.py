"""The Cassandra statement policy (engines/cassandra/policy.py) without a server.

Classification and rules on CQL text; the stage on frames built with the
codec's encoders, behind the real audit stages, as the engine wires them.
tests/integration/test_cassandra_identity.py proves the same against a
real node with the real driver and cqlsh.
"""

from __future__ import annotations

import hashlib
import json
import struct

import pytest

from dbproxy.roles import Grant
from dbproxy.session import Identity
from dbproxy.engines.cassandra import protocol as F
from dbproxy.engines.cassandra.cql import split_statements
from dbproxy.engines.cassandra.policy import (
    CqlPolicy,
    CqlRules,
    classify_cql,
    needs_policy,
    prepared_id_for,
    vouched,
)
from dbproxy.engines.cassandra.observers import CqlSessionState, RequestAudit, ResponseAudit
from dbproxy.engines.cassandra.prepared import PreparedCache, PreparedInfo
from dbproxy.engines.cassandra.stages import SessionGuard
from tests.unit.cassandra.cql_testutil import vector
from tests.unit.cassandra.test_cql_stages import FakeAudit, _short_bytes, _string, execute_body, request, response

READ_ONLY = Grant(roles=("ro",), read_only=True, restricted=True)
NO_DROP = Grant(roles=("dev",), deny_commands=("DROP*", "TRUNCATE"), restricted=True)
APP_ONLY = Grant(roles=("app",), databases=("app", "app_*"), restricted=True)


def kinds(text: str) -> list[tuple[str, ...]]:
    return [s.commands for s in classify_cql(text)]


def refs(text: str) -> list[list[str | None]]:
    return [[r.keyspace for r in s.refs] for s in classify_cql(text)]


def denial(grant: Grant, text: str, keyspace: str | None = None):
    return CqlRules(grant, "alice").check_cql(text, keyspace)


# --------------------------------------------------------------------------- classification


@pytest.mark.parametrize(
    "text,expected",
    [
        ("SELECT * FROM t", ("SELECT",)),
        ("insert into t (a) values (1)", ("INSERT",)),
        ("DROP TABLE IF EXISTS ks.t", ("DROP TABLE",)),
        ("drop columnfamily t", ("DROP TABLE",)),
        ("CREATE SCHEMA s WITH replication = {}", ("CREATE KEYSPACE",)),
        ("CREATE CUSTOM INDEX i ON t (a) USING 'c'", ("CREATE INDEX",)),
        ("CREATE OR REPLACE FUNCTION ks.f (a int) CALLED ON NULL INPUT RETURNS int LANGUAGE java AS 'return a;'", ("CREATE FUNCTION",)),
        ("CREATE MATERIALIZED VIEW v AS SELECT * FROM t WHERE a IS NOT NULL PRIMARY KEY (a)", ("CREATE MATERIALIZED VIEW",)),
        ("DESC KEYSPACES", ("DESCRIBE",)),
        ("CREATE USER alice WITH PASSWORD 'x' SUPERUSER", ("CREATE USER",)),  # not "CREATE USER ALICE"
        ("ALTER USER alice WITH PASSWORD 'y'", ("ALTER USER",)),
        ("CREATE ROLE IF NOT EXISTS r WITH LOGIN = true", ("CREATE ROLE",)),
        ("TRUNCATE TABLE ks.t", ("TRUNCATE",)),
        ("BEGIN BATCH INSERT INTO t (a) VALUES ('x;y'); UPDATE t SET b = $$;$$ WHERE a = 1; APPLY BATCH", ("BATCH", "INSERT", "UPDATE")),
        ("BEGIN UNLOGGED BATCH DELETE FROM t WHERE a = 1 INSERT INTO t (a) VALUES (2) APPLY BATCH;", ("BATCH", "DELETE", "INSERT")),
        ("-- just a comment", None),
    ],
)
def test_statement_kinds(text, expected):
    assert kinds(text) == ([expected] if expected else [])


def test_cql_lexer():
    def commands(text: str) -> list[str]:
        return [s.command for s in split_statements(text)]

    assert commands("SELECT * FROM ks.t WHERE a = 'x;y' // drop table t;\n; TRUNCATE ks.t; DROP KEYSPACE ks") == ["SELECT", "TRUNCATE", "DROP KEYSPACE"]
    assert commands("BEGIN BATCH INSERT INTO t (a) VALUES ($$;$$); APPLY BATCH")[0] == "BEGIN"
    # CQL names are ASCII letters, digits and "_" (Lexer.g IDENT): "x$$" is x then a $$ literal,
    # as Cassandra lexes it; a SQL-style word rule read "X$$" and then swallowed the DROP.
    assert commands("SELECT x$$;$$ FROM t; DROP KEYSPACE ks") == ["SELECT", "DROP KEYSPACE"]


def test_batch_is_one_statement_in_the_lexer():
    # the known bug this fixes: the children used to vanish into ['BEGIN', 'APPLY']
    text = "BEGIN BATCH INSERT INTO ks.a (k) VALUES (1); INSERT INTO ks.b (k) VALUES (2); APPLY BATCH; SELECT * FROM ks.c"
    assert kinds(text) == [("BATCH", "INSERT"), ("SELECT",)]
    assert refs(text) == [["ks", "ks"], ["ks"]]


@pytest.mark.parametrize(
    "text,expected",
    [
        ("SELECT * FROM ks.t WHERE k = 1.5", ["ks"]),
        ('SELECT * FROM "Mixed".t', ["Mixed"]),
        ("SELECT * FROM ks /* gap */ . t", ["ks"]),
        ("SELECT addr.city FROM users", [None]),  # a UDT field, not a keyspace
        ("UPDATE t SET addr.city = 'x' WHERE k = 1", [None]),
        ("SELECT * FROM type WHERE k = 1", [None]),  # non-reserved keyword as a table name
        ("SELECT * FROM check.t", ["check"]),
        ("INSERT INTO ks.t JSON '{\"a\": 1}'", ["ks"]),
        ("DELETE FROM ks.t WHERE k = 1", ["ks"]),
        ("USE app", ["app"]),
        ('USE "App"', ["App"]),
        ("CREATE KEYSPACE IF NOT EXISTS secret WITH replication = {}", ["secret"]),
        ("DROP KEYSPACE IF EXISTS secret", ["secret"]),
        ("CREATE TABLE IF NOT EXISTS secret.t (a int PRIMARY KEY)", ["secret"]),
        ("CREATE INDEX IF NOT EXISTS ON secret.t (a)", ["secret"]),
        ("CREATE TRIGGER trg ON secret.t USING 'c'", [None, "secret"]),
        ("DROP FUNCTION IF EXISTS secret.f", ["secret"]),
        ("GRANT EXECUTE ON FUNCTION secret.f(int) TO r", ["secret"]),
        ("GRANT SELECT ON KEYSPACE secret TO r", ["secret"]),
        ("GRANT SELECT ON ALL KEYSPACES TO r", ["*"]),
        ("GRANT EXECUTE ON ALL FUNCTIONS IN KEYSPACE secret TO r", ["secret"]),
        ("GRANT r1 TO r2", []),
        ("LIST ALL PERMISSIONS ON secret.t", ["secret"]),
        ("SELECT secret.f(a) FROM app.t", ["app"]),  # function calls are not table references
    ],
)
def test_keyspace_references(text, expected):
    assert refs(text) == [expected]


# --------------------------------------------------------------------------- rules


def test_needs_policy():
    assert not needs_policy(None)
    assert not needs_policy(Grant())  # unrestricted (no identity layer)
    assert not needs_policy(Grant(roles=("all",), restricted=True))
    assert needs_policy(READ_ONLY) and needs_policy(NO_DROP) and needs_policy(APP_ONLY)


@pytest.mark.parametrize("text", [
    "SELECT * FROM ks.t", "USE ks", "DESCRIBE TABLES", "LIST ROLES",
    "SELECT * FROM system.local WHERE key = 'local'", "SELECT * FROM system_schema.keyspaces",
])
def test_read_only_allows_reads(text):
    assert denial(READ_ONLY, text) is None


@pytest.mark.parametrize("text,command", [
    ("INSERT INTO ks.t (a) VALUES (1)", "INSERT"),
    ("UPDATE ks.t SET b = 1 WHERE a = 1", "UPDATE"),
    ("DELETE FROM ks.t WHERE a = 1", "DELETE"),
    ("TRUNCATE ks.t", "TRUNCATE"),
    ("CREATE TABLE ks.t (a int PRIMARY KEY)", "CREATE TABLE"),
    ("ALTER TABLE ks.t ADD b int", "ALTER TABLE"),
    ("DROP KEYSPACE ks", "DROP KEYSPACE"),
    ("GRANT SELECT ON KEYSPACE ks TO r", "GRANT"),
    ("REVOKE SELECT ON KEYSPACE ks FROM r", "REVOKE"),
    ("BEGIN BATCH INSERT INTO ks.t (a) VALUES (1) APPLY BATCH", "BATCH"),
    ("SELECT * FROM ks.t; DELETE FROM ks.t WHERE a = 1", "DELETE"),
    ("FROBNICATE ks", "FROBNICATE"),  # unknown kinds fail closed
])
def test_read_only_refuses_writes(text, command):
    d = denial(READ_ONLY, text)
    assert d is not None and d.reason == "read_only" and d.command == command
    assert d.message == f"User alice has read-only access through this proxy: {command} is not allowed"


def test_deny_patterns():
    d = denial(NO_DROP, "DROP TABLE ks.t")
    assert d.reason == "command_denied" and d.command == "DROP TABLE" and '"DROP*"' in d.message
    assert denial(NO_DROP, "truncate table ks.t").command == "TRUNCATE"
    no_users = Grant(roles=("dev",), deny_commands=("CREATE USER", "ALTER USER"), restricted=True)
    assert denial(no_users, "CREATE USER alice WITH PASSWORD 'x' SUPERUSER").command == "CREATE USER"
    assert denial(no_users, "alter user alice with password 'y'").command == "ALTER USER"
    assert denial(NO_DROP, "INSERT INTO ks.t (a) VALUES (1)") is None
    assert denial(NO_DROP, "CREATE TABLE ks.t (a int PRIMARY KEY)") is None
    # patterns reach into batches, and BATCH itself is a kind
    assert denial(Grant(deny_commands=("DELETE",), restricted=True), "BEGIN BATCH INSERT INTO t (a) VALUES (1); DELETE FROM t WHERE a = 2; APPLY BATCH").command == "DELETE"
    assert denial(Grant(deny_commands=("BATCH",), restricted=True), "BEGIN BATCH INSERT INTO t (a) VALUES (1) APPLY BATCH").command == "BATCH"


def test_keyspace_rules():
    assert denial(APP_ONLY, "SELECT * FROM app.t") is None
    assert denial(APP_ONLY, "INSERT INTO app_logs.t (a) VALUES (1)") is None
    d = denial(APP_ONLY, "SELECT * FROM secret.t")
    assert d.reason == "keyspace_denied" and d.keyspace == "secret" and d.message == "User alice has no access to keyspace secret through this proxy"
    assert denial(APP_ONLY, "USE secret").keyspace == "secret"
    assert denial(APP_ONLY, "USE app") is None
    # unqualified names resolve against the session's (or the request's) keyspace
    assert denial(APP_ONLY, "SELECT * FROM t", keyspace="app") is None
    assert denial(APP_ONLY, "SELECT * FROM t", keyspace="secret").keyspace == "secret"
    assert denial(APP_ONLY, "SELECT * FROM t", keyspace=None) is None  # Cassandra refuses it: no keyspace
    # the system keyspaces drivers read are readable, not writable, and not USE-able
    assert denial(APP_ONLY, "SELECT * FROM system.peers_v2") is None
    assert denial(APP_ONLY, "SELECT * FROM system_virtual_schema.tables") is None
    assert denial(APP_ONLY, "SELECT * FROM local", keyspace="system") is None
    assert denial(APP_ONLY, "INSERT INTO system.local (key) VALUES ('x')").keyspace == "system"
    assert denial(APP_ONLY, "SELECT * FROM system_auth.roles").keyspace == "system_auth"
    assert denial(APP_ONLY, "USE system").keyspace == "system"
    assert denial(APP_ONLY, "GRANT SELECT ON ALL KEYSPACES TO r").message.endswith("no access to all keyspaces through this proxy")
    assert denial(APP_ONLY, "BEGIN BATCH INSERT INTO app.t (a) VALUES (1); INSERT INTO secret.t (a) VALUES (1); APPLY BATCH").keyspace == "secret"
    assert denial(APP_ONLY, "DESCRIBE KEYSPACE secret") is None  # schema is readable through system_schema anyway
    assert denial(Grant(roles=("x",), databases=("*",), restricted=True), "SELECT * FROM secret.t") is None


def test_prepared_ids_are_cassandras():
    # Cassandra 5.0.9 (tests/data/cassandra/real_facts.json) prepared this qualified
    # statement, on a connection without a keyspace, under this id.
    facts = json.loads(vector("real_facts.json"))
    query = "SELECT * FROM system.local WHERE key = ?"
    assert prepared_id_for(query, None).hex() == facts["real_v5_lz4"]["prepared_id"]
    assert prepared_id_for("SELECT * FROM t", "app") == hashlib.md5(b"appSELECT * FROM t").digest()
    info = PreparedInfo("SELECT * FROM t", "app")
    assert vouched(info, prepared_id_for("SELECT * FROM t", "app")) is info
    assert vouched(info, prepared_id_for("SELECT * FROM t", None)) is info
    # the cache says "app" but the id says another keyspace (a USE raced the PREPARE): not trusted
    assert vouched(info, prepared_id_for("SELECT * FROM t", "secret")) is None
    assert vouched(None, b"x" * 16) is None


# --------------------------------------------------------------------------- the stage


class Sess:
    def __init__(self, audit) -> None:
        self.audit = audit
        self.identity = Identity(user="alice", roles=("ro",), method="token")
        self.db_name = None


def pipeline(grant: Grant, version: int = 4, compressor: str | None = None, cache: PreparedCache | None = None):
    audit = FakeAudit()
    session = Sess(audit)
    state = CqlSessionState(backend="127.0.0.1:9042", prepared=cache if cache is not None else PreparedCache(), session=session, version=version)
    stages = [SessionGuard(audit, compressor=compressor), RequestAudit(state, audit),
              CqlPolicy(state, grant, session, audit, compressor=compressor)]
    return state, audit, stages, ResponseAudit(state, audit)


def run(stages, frame):
    for stage in stages:
        verdict = stage.handle(frame, None)
        if verdict is not None:
            return verdict
    return None


def query_frame(version: int, stream: int, cql: str, compressor: str | None = None, keyspace: str | None = None) -> F.Frame:
    body = F.query_body(version, cql)
    if keyspace is not None:  # v5: <consistency><flags:int> … <keyspace>
        assert version >= 5 and body.endswith(struct.pack(">HI", F.Consistency.ONE, 0))
        body = body[:-4] + struct.pack(">I", F.QF_KEYSPACE) + _string(keyspace)
    raw = F.encode_frame(version, 0, stream, F.Opcode.QUERY, body, response=False, compressor=compressor)
    return F.Frame(version, raw[1], stream, F.Opcode.QUERY, raw, compression=compressor)


def prepare_frame(version: int, stream: int, cql: str) -> F.Frame:
    return request(version, stream, F.Opcode.PREPARE, F.pack_long_string(cql) + (b"\x00\x00\x00\x00" if version >= 5 else b""))


def batch_frame(version: int, stream: int, children: list[str | bytes]) -> F.Frame:
    body = bytes([1]) + struct.pack(">H", len(children))
    for child in children:
        if isinstance(child, bytes):
            body += b"\x01" + _short_bytes(child) + struct.pack(">H", 0)
        else:
            body += b"\x00" + F.pack_long_string(child) + struct.pack(">H", 0)
    body += struct.pack(">H", F.Consistency.ONE) + (struct.pack(">I", 0) if version >= 5 else b"\x00")
    return request(version, stream, F.Opcode.BATCH, body)


def error_of(verdict, version: int, compressor: str | None = None) -> tuple[F.Frame, F.CqlError]:
    """The ERROR frame a refusal answers with (never forwarded), decoded as a client would."""
    assert verdict is not None and verdict.replace == () and verdict.reply, "refused requests are answered, not forwarded"
    raw = verdict.reply
    _, flags, stream, opcode, length, size = F.parse_header(raw)
    assert raw[0] & F.RESPONSE_BIT and opcode == F.Opcode.ERROR and len(raw) == size + length
    assert bool(flags & F.FLAG_COMPRESSION) == bool(compressor)
    frame = F.Frame(version, flags, stream, opcode, raw, compression=compressor)
    return frame, F.parse_error(frame)


@pytest.mark.parametrize("version,compressor", [(3, None), (4, "lz4"), (4, "snappy"), (5, None)])
def test_refused_query_answered_unauthorized_on_its_stream_and_audited(version, compressor):
    state, audit, stages, _ = pipeline(READ_ONLY, version, compressor)
    frame = query_frame(version, 17, "INSERT INTO app.t (a) VALUES (1)", compressor)
    reply_frame, err = error_of(run(stages, frame), version, compressor)
    assert reply_frame.stream == 17 and err.code == F.ErrorCode.UNAUTHORIZED
    assert err.message == "User alice has read-only access through this proxy: INSERT is not allowed"
    q, result, denied = audit.events[-3:]
    assert q["event"] == "db.session.query" and q["db_query"] == "INSERT INTO app.t (a) VALUES (1)"
    assert result["event"] == "db.session.result" and result["query_uid"] == q["uid"] and result["success"] is False
    assert result["error_code"] == 0x2100 and result["error_name"] == "UNAUTHORIZED"
    assert denied["event"] == "db.session.access_denied" and denied["success"] is False and denied["stage"] == "statement"
    assert denied["reason"] == "read_only" and denied["command"] == "INSERT" and denied["query_uid"] == q["uid"]
    assert state.pending == {} and state.errors == 1  # nothing left for SERVER_ERROR at backend loss
    # the next statement goes through
    assert run(stages, query_frame(version, 18, "SELECT * FROM app.t", compressor)) is None
    assert 18 in state.pending


def test_v5_request_keyspace_is_where_unqualified_names_resolve():
    state, audit, stages, _ = pipeline(APP_ONLY, 5)
    state.keyspace = "app"
    assert run(stages, query_frame(5, 1, "SELECT * FROM t")) is None
    _, err = error_of(run(stages, query_frame(5, 2, "SELECT * FROM t", keyspace="secret")), 5)
    assert "keyspace secret" in err.message


def test_session_keyspace_follows_set_keyspace_results():
    state, audit, stages, responses = pipeline(APP_ONLY, 4)
    assert run(stages, query_frame(4, 1, "USE app")) is None
    responses.handle(response(4, 1, F.Opcode.RESULT, struct.pack(">i", F.ResultKind.SET_KEYSPACE) + _string("app")), None)
    assert run(stages, query_frame(4, 2, "DELETE FROM t WHERE k = 1")) is None
    _, err = error_of(run(stages, query_frame(4, 3, 'USE "secret"')), 4)
    assert err.code == F.ErrorCode.UNAUTHORIZED and "keyspace secret" in err.message
    assert state.keyspace == "app"


def _prepared_result(version: int, qid: bytes) -> bytes:
    body = struct.pack(">i", F.ResultKind.PREPARED) + _short_bytes(qid)
    if version >= 5:
        body += _short_bytes(b"m" * 16)
    body += struct.pack(">ii", 0, 0)
    if version >= 4:
        body += struct.pack(">i", 0)
    return body + struct.pack(">ii", F.RF_NO_METADATA, 0)


@pytest.mark.parametrize("version", [4, 5])
def test_prepare_of_a_write_refused_and_execute_checked_against_the_remembered_cql(version):
    cache = PreparedCache()
    # another session (unrestricted) prepared an INSERT and a SELECT through the proxy
    _, _, other, other_res = pipeline(Grant(), version, cache=cache)
    ids = {}
    for stream, cql in ((1, "INSERT INTO app.t (a) VALUES (?)"), (2, "SELECT * FROM app.t")):
        assert run(other, prepare_frame(version, stream, cql)) is None
        ids[cql] = prepared_id_for(cql, None)
        other_res.handle(response(version, stream, F.Opcode.RESULT, _prepared_result(version, ids[cql])), None)

    state, audit, stages, _ = pipeline(READ_ONLY, version, cache=cache)
    _, err = error_of(run(stages, prepare_frame(version, 5, "INSERT INTO app.t (a) VALUES (?)")), version)
    assert err.code == F.ErrorCode.UNAUTHORIZED and "INSERT is not allowed" in err.message
    assert audit.events[-1]["cql_opcode"] == "PREPARE"
    _, err = error_of(run(stages, request(version, 6, F.Opcode.EXECUTE, execute_body(version, ids["INSERT INTO app.t (a) VALUES (?)"], [b"x"]))), version)
    assert err.code == F.ErrorCode.UNAUTHORIZED and "INSERT is not allowed" in err.message
    assert audit.events[-1]["cql_opcode"] == "EXECUTE" and audit.events[-1]["db_query"] == "INSERT INTO app.t (a) VALUES (?)"
    assert run(stages, request(version, 7, F.Opcode.EXECUTE, execute_body(version, ids["SELECT * FROM app.t"], []))) is None

    # an id the proxy never saw prepared: UNPREPARED with the id, so the driver prepares it here
    unknown = hashlib.md5(b"DELETE FROM app.t WHERE a = 1").digest()
    frame, err = error_of(run(stages, request(version, 8, F.Opcode.EXECUTE, execute_body(version, unknown, []))), version)
    assert err.code == F.ErrorCode.UNPREPARED and err.unprepared_id == unknown and frame.stream == 8
    denied = audit.events[-1]
    assert denied["reason"] == "prepared_id_unknown" and denied["prepared_id"] == unknown.hex()
    assert list(state.pending) == [7]  # only the forwarded SELECT waits for the node


def test_batch_messages():
    cache = PreparedCache()
    insert = "INSERT INTO app.t (a) VALUES (?)"
    cache.put("127.0.0.1:9042", prepared_id_for(insert, None), PreparedInfo(insert, None))
    state, audit, stages, _ = pipeline(READ_ONLY, 4, cache=cache)
    _, err = error_of(run(stages, batch_frame(4, 3, ["INSERT INTO app.t (a) VALUES (1)"])), 4)
    assert err.code == F.ErrorCode.UNAUTHORIZED and "BATCH is not allowed" in err.message

    state, audit, stages, _ = pipeline(APP_ONLY, 4, cache=cache)
    assert run(stages, batch_frame(4, 4, ["INSERT INTO app.t (a) VALUES (1)", prepared_id_for(insert, None)])) is None
    _, err = error_of(run(stages, batch_frame(4, 5, [prepared_id_for(insert, None), "DELETE FROM secret.t WHERE a = 1"])), 4)
    assert "keyspace secret" in err.message and audit.events[-1]["cql_opcode"] == "BATCH"
    unknown = b"\x01" * 16
    _, err = error_of(run(stages, batch_frame(4, 6, ["INSERT INTO app.t (a) VALUES (1)", unknown])), 4)
    assert err.code == F.ErrorCode.UNPREPARED and err.unprepared_id == unknown

    state, audit, stages, _ = pipeline(NO_DROP, 4, cache=cache)
    assert run(stages, batch_frame(4, 7, ["DELETE FROM secret.t WHERE a = 1"])) is None


def test_other_messages_pass():
    state, audit, stages, _ = pipeline(READ_ONLY, 4)
    register = request(4, 9, F.Opcode.REGISTER, struct.pack(">H", 1) + _string("SCHEMA_CHANGE"))
    assert run(stages, register) is None
    options = request(4, 10, F.Opcode.OPTIONS, b"")
    assert run(stages, options) is None
