"""The Cassandra engine's audit stages, client authenticator and config rules, without a server.

Requests are built with the codec's encoders; the Prepared results come from
real Cassandra 5.0.9 captures (tests/data/cassandra/real_*) where the shape
matters, so bind-type parsing is checked against the server's own bytes.
"""

from __future__ import annotations

import json
import struct
import uuid

import pytest

from dbproxy.config import load_config
from dbproxy.errors import ConfigErrors, MalformedMessage
from dbproxy.engines import default_registry
from dbproxy.engines.cassandra import protocol as F
from dbproxy.engines.cassandra.auth import ClientAuthFailed, PlainClientAuthenticator
from dbproxy.engines.cassandra.observers import CqlSessionState, RequestAudit, ResponseAudit
from dbproxy.engines.cassandra.prepared import PreparedCache, PreparedInfo, parse_prepared_bind_metadata
from dbproxy.engines.cassandra.stages import SessionGuard
from dbproxy.engines.cassandra.values import render_value
from tests.unit.cassandra.cql_testutil import vector
from tests.unit.cassandra.test_cql_real import read_side


class FakeAudit:
    """Captures events like SessionAudit does (uid, the fields), no recorder."""

    def __init__(self) -> None:
        self.events: list[dict] = []

    def emit(self, kind: str, **fields) -> dict:
        event = {"event": kind, "uid": uuid.uuid4().hex, **fields}
        self.events.append(event)
        return event

    def on_query(self, query: str, *, parameters=None, **fields) -> dict:
        if parameters is not None:
            fields["db_query_parameters"] = parameters
        return self.emit("db.session.query", db_query=query, **fields)

    def on_result(self, *, success: bool, **fields) -> dict:
        return self.emit("db.session.result", success=success, **fields)


class FakeSession:
    db_name = None


def stages(version: int = 5):
    audit = FakeAudit()
    state = CqlSessionState(backend="127.0.0.1:9042", prepared=PreparedCache(capacity=3), session=FakeSession(), version=version)
    return state, audit, RequestAudit(state, audit), ResponseAudit(state, audit)


def request(version: int, stream: int, opcode: int, body: bytes) -> F.Frame:
    return F.Frame(version, 0, stream, opcode, F.encode_frame(version, 0, stream, opcode, body, response=False))


def response(version: int, stream: int, opcode: int, body: bytes, flags: int = 0) -> F.Frame:
    raw = F.encode_frame(version, flags, stream, opcode, body, response=True)
    return F.Frame(version, raw[1], stream, opcode, raw)


def _short_bytes(b: bytes) -> bytes:
    return struct.pack(">H", len(b)) + b


def _string(s: str) -> bytes:
    return _short_bytes(s.encode())


def _value(b: bytes | None) -> bytes:
    return struct.pack(">i", -1) if b is None else struct.pack(">i", len(b)) + b


def prepared_result(version: int, qid: bytes, columns: list[tuple[str, int]]) -> bytes:
    body = struct.pack(">i", F.ResultKind.PREPARED) + _short_bytes(qid)
    if version >= 5:
        body += _short_bytes(b"m" * 16)
    body += struct.pack(">ii", F.RF_GLOBAL_TABLES_SPEC, len(columns))
    if version >= 4:
        body += struct.pack(">iH", 1, 0)
    body += _string("ks") + _string("t")
    for name, type_id in columns:
        body += _string(name) + struct.pack(">H", type_id)
    return body + struct.pack(">ii", F.RF_NO_METADATA, 0)


def execute_body(version: int, qid: bytes, values: list[bytes | None]) -> bytes:
    body = _short_bytes(qid)
    if version >= 5:
        body += _short_bytes(b"m" * 16)
    flags = struct.pack(">I", F.QF_VALUES) if version >= 5 else bytes([F.QF_VALUES])
    return body + struct.pack(">H", F.Consistency.QUORUM) + flags + struct.pack(">H", len(values)) + b"".join(_value(v) for v in values)


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize(
    "type_id,raw,text",
    [
        (0x0009, struct.pack(">i", -42), "-42"),
        (0x0002, struct.pack(">q", 2**40), str(2**40)),
        (0x000D, "héllo".encode(), "héllo"),
        (0x0004, b"\x01", "true"),
        (0x0007, struct.pack(">d", 1.5), "1.5"),
        (0x000C, uuid.UUID(int=1).bytes, "00000000-0000-0000-0000-000000000001"),
        (0x000B, struct.pack(">q", 86_400_000), "1970-01-02T00:00:00.000Z"),
        (0x0011, struct.pack(">I", 2**31 + 1), "1970-01-02"),
        (0x0010, bytes([10, 0, 0, 1]), "10.0.0.1"),
        (0x000E, (-129).to_bytes(2, "big", signed=True), "-129"),
        (0x0003, b"\x00\x01", "base64:AAE="),  # blob
        (0x0009, b"\x01", "base64:AQ=="),  # wrong length for an int: shown raw, never an exception
        (None, b"abc", "base64:YWJj"),
    ],
)
def test_render_value(type_id, raw, text):
    assert render_value(raw, type_id) == text


def test_render_value_null_unset_and_truncation():
    assert render_value(None, 0x0009) is None
    assert render_value(F.UNSET, 0x0009) == "<unset>"
    big = render_value(b"x" * 100_000, 0x0003)
    assert big.startswith("base64:") and "…[truncated" in big and len(big) < 4000
    assert "…[truncated" in render_value(b"y" * 100_000, 0x000D)


# --------------------------------------------------------------------------- requests and results


@pytest.mark.parametrize("version", [3, 4, 5])
def test_prepare_execute_resolved_with_typed_values(version):
    state, audit, req, res = stages(version)
    qid = b"\xab" * 16
    cql = "INSERT INTO ks.t (id, name, at) VALUES (?, ?, ?)"
    prepare_body = F.pack_long_string(cql) + (b"\x00\x00\x00\x00" if version >= 5 else b"")
    assert req.handle(request(version, 3, F.Opcode.PREPARE, prepare_body), None) is None
    assert res.handle(response(version, 3, F.Opcode.RESULT, prepared_result(version, qid, [("id", 9), ("name", 13), ("at", 11)])), None) is None
    prepared_result_event = audit.events[-1]
    assert prepared_result_event["result_kind"] == "prepared" and prepared_result_event["prepared_id"] == qid.hex()
    assert state.prepared.get(state.backend, qid) == PreparedInfo(cql, None, (9, 13, 11), ("id", "name", "at"))

    frame = request(version, 7, F.Opcode.EXECUTE, execute_body(version, qid, [struct.pack(">i", 5), b"bob", None]))
    assert req.handle(frame, None) is None
    ex = audit.events[-1]
    assert ex["event"] == "db.session.cassandra.execute" and ex["code"] == "TCA03I"
    assert ex["db_query"] == cql and ex["prepared_known"] is True
    assert ex["db_query_parameters"] == ["5", "bob", None]
    assert ex["consistency"] == "QUORUM" and ex["cql_stream"] == 7
    res.handle(response(version, 7, F.Opcode.RESULT, struct.pack(">i", F.ResultKind.VOID)), None)
    assert audit.events[-1]["query_uid"] == ex["uid"] and audit.events[-1]["result_kind"] == "void"
    assert state.pending == {}


def test_prepared_bind_types_from_real_cassandra_bytes():
    for name, version, compression in (("real_v4_lz4", 4, "lz4"), ("real_v5_lz4", 5, "lz4"), ("real_v4_snappy", 4, "snappy")):
        prepared = read_side(vector(f"{name}.server.bin"), "server", version, compression)[8]
        assert parse_prepared_bind_metadata(prepared) == ((0x000D,), ("key",))


def test_unknown_prepared_id_and_cache_eviction():
    state, audit, req, res = stages(4)
    for i in range(4):
        state.prepared.put(state.backend, bytes([i]), PreparedInfo(f"q{i}", None))
    assert len(state.prepared) == 3 and state.prepared.get(state.backend, b"\x00") is None
    assert state.prepared.get("other:9042", b"\x03") is None  # keyed by backend too
    req.handle(request(4, 1, F.Opcode.EXECUTE, execute_body(4, b"\x00\xff", [b"v"])), None)
    ex = audit.events[-1]
    assert ex["prepared_known"] is False and ex["db_query"] == "<unknown prepared id 0x00ff>"
    assert ex["db_query_parameters"] == ["base64:dg=="]


def test_query_keyspace_tracking_rows_and_errors():
    state, audit, req, res = stages(5)
    req.handle(request(5, 1, F.Opcode.QUERY, F.query_body(5, "USE app")), None)
    res.handle(response(5, 1, F.Opcode.RESULT, struct.pack(">i", F.ResultKind.SET_KEYSPACE) + _string("app")), None)
    assert state.keyspace == "app" and state.session.db_name == "app"
    req.handle(request(5, 2, F.Opcode.QUERY, F.query_body(5, "SELECT * FROM t", page_size=100)), None)
    q = audit.events[-1]
    assert q["keyspace"] == "app" and q["page_size"] == 100 and q["consistency"] == "ONE"
    rows = struct.pack(">iii", F.ResultKind.ROWS, F.RF_NO_METADATA | F.RF_HAS_MORE_PAGES, 1) + _value(b"state") + struct.pack(">i", 100)
    res.handle(response(5, 2, F.Opcode.RESULT, rows + b"\x00" * 50), None)
    r = audit.events[-1]
    assert r["query_uid"] == q["uid"] and r["affected_records"] == 100 and r["has_more_pages"] is True
    req.handle(request(5, 3, F.Opcode.QUERY, F.query_body(5, "SELEKT")), None)
    err = F.error_body(F.ErrorCode.SYNTAX_ERROR, "line 1:0 no viable alternative")
    res.handle(response(5, 3, F.Opcode.ERROR, err), None)
    e = audit.events[-1]
    assert e["success"] is False and e["error_code"] == 0x2000 and e["error_name"] == "SYNTAX_ERROR"
    assert state.errors == 1 and state.pending == {}


def test_result_warnings_recorded():
    state, audit, req, res = stages(4)
    req.handle(request(4, 1, F.Opcode.QUERY, F.query_body(4, "SELECT count(*) FROM t")), None)
    body = struct.pack(">H", 1) + _string("Aggregation query used without partition key") + struct.pack(">i", F.ResultKind.VOID)
    res.handle(response(4, 1, F.Opcode.RESULT, body, flags=F.FLAG_WARNING), None)
    assert audit.events[-1]["warnings"] == ["Aggregation query used without partition key"]


def test_batch_children_and_register():
    state, audit, req, res = stages(4)
    state.prepared.put(state.backend, b"\x01\x02", PreparedInfo("INSERT INTO t (k, v) VALUES (?, ?)", "ks", (9, 13), ("k", "v")))
    body = bytes([1]) + struct.pack(">H", 2)  # UNLOGGED, two statements
    body += bytes([1]) + _short_bytes(b"\x01\x02") + struct.pack(">H", 2) + _value(struct.pack(">i", 1)) + _value(b"one")
    body += bytes([0]) + F.pack_long_string("DELETE FROM t WHERE k = 9") + struct.pack(">H", 0)
    body += struct.pack(">H", F.Consistency.LOCAL_QUORUM) + bytes([0])
    req.handle(request(4, 5, F.Opcode.BATCH, body), None)
    b = audit.events[-1]
    assert b["event"] == "db.session.cassandra.batch" and b["code"] == "TCA01I" and b["batch_type"] == "UNLOGGED"
    assert b["children"] == [
        {"db_query": "INSERT INTO t (k, v) VALUES (?, ?)", "db_query_parameters": ["1", "one"], "prepared_id": "0102", "prepared_known": True},
        {"db_query": "DELETE FROM t WHERE k = 9", "db_query_parameters": []},
    ]
    assert b["db_query"] == "BEGIN UNLOGGED BATCH INSERT INTO t (k, v) VALUES (?, ?); DELETE FROM t WHERE k = 9; APPLY BATCH"
    assert b["consistency"] == "LOCAL_QUORUM"
    req.handle(request(4, 6, F.Opcode.REGISTER, F.register_body(["SCHEMA_CHANGE", "STATUS_CHANGE"])), None)
    assert audit.events[-1]["event_types"] == ["SCHEMA_CHANGE", "STATUS_CHANGE"]
    # EVENT frames (stream -1) pass without touching pending requests
    event = _string("STATUS_CHANGE") + _string("UP") + bytes([4, 127, 0, 0, 1]) + struct.pack(">i", 9042)
    assert res.handle(response(4, -1, F.Opcode.EVENT, event), None) is None
    assert state.events == 1 and set(state.pending) == {5, 6}


@pytest.mark.parametrize("opcode", [F.Opcode.STARTUP, F.Opcode.AUTH_RESPONSE])
def test_handshake_messages_after_login_are_refused_not_forwarded(opcode):
    state, audit, req, res = stages(4)
    body = F.startup_body({"CQL_VERSION": "3.0.0"}) if opcode == F.Opcode.STARTUP else F.auth_token_body(b"\x00u\x00secret")
    frame = request(4, 9, opcode, body)
    assert req.handle(frame, None) is None  # the audit observer only looks; the guard refuses
    verdict = SessionGuard(audit).handle(frame, None)
    assert verdict is not None and verdict.replace == () and not verdict.close
    reply = F.Frame(4, 0, 9, F.Opcode.ERROR, verdict.reply)
    assert F.parse_error(reply).code == F.ErrorCode.PROTOCOL_ERROR
    assert "secret" not in json.dumps(audit.events)


def _insert_query(version: int) -> bytes:
    return F.query_body(version, "INSERT INTO ks.t (k) VALUES (1)")


def _flags(version: int, flags: int) -> bytes:
    return struct.pack(">I", flags) if version >= 5 else bytes((flags,))


# Bodies whose frame header is right but which do not parse (CQL native protocol v4 §4.1, v5 §4.1).
MALFORMED_REQUESTS = {
    "query-long-string-overruns": (F.Opcode.QUERY, lambda v: b"\x00\x00\x00\x50abc"),
    "query-no-consistency": (F.Opcode.QUERY, lambda v: _insert_query(v)[:-3]),
    "query-invalid-utf8": (F.Opcode.QUERY, lambda v: b"\x00\x00\x00\x02\xff\xfe" + b"\x00\x01" + _flags(v, 0)),
    "query-value-length-below-minus-2": (
        F.Opcode.QUERY,
        lambda v: b"\x00\x00\x00\x01x\x00\x01" + _flags(v, F.QF_VALUES) + struct.pack(">hi", 1, -7)),
    "query-values-count-overruns": (
        F.Opcode.QUERY, lambda v: b"\x00\x00\x00\x01x\x00\x01" + _flags(v, F.QF_VALUES) + struct.pack(">h", 3) + _value(b"1")),
    "execute-id-length-overruns": (F.Opcode.EXECUTE, lambda v: struct.pack(">H", 200) + b"short-id"),
    "execute-values-truncated": (F.Opcode.EXECUTE, lambda v: execute_body(v, b"q" * 16, [b"abc"])[:-2]),
    "batch-child-count-overruns": (
        F.Opcode.BATCH,
        lambda v: bytes([0]) + struct.pack(">H", 3) + bytes([0]) + struct.pack(">i", 5) + b"x = 1" + struct.pack(">H", 0)),
    "batch-child-kind-invalid": (F.Opcode.BATCH, lambda v: bytes([0]) + struct.pack(">H", 1) + bytes([7]) + b"\x00" * 12),
    "prepare-garbage": (F.Opcode.PREPARE, lambda v: b"\x7f\xff\xff\xff garbage"),
    "register-garbage": (F.Opcode.REGISTER, lambda v: struct.pack(">H", 2) + _string("TOPOLOGY_CHANGE")),
}


@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize("case", sorted(MALFORMED_REQUESTS))
def test_malformed_request_is_refused_for_the_pipeline_to_audit(case, version):
    """The stage raises MalformedMessage (the pipeline audits it as audit.malformed and ends the
    session with PROTOCOL_ERROR on the request's stream); nothing is forwarded or left pending."""
    state, audit, req, res = stages(version)
    opcode, body = MALFORMED_REQUESTS[case]
    frame = request(version, 4, opcode, body(version))
    with pytest.raises(MalformedMessage) as info:
        req.handle(frame, None)
    exc = info.value
    assert (exc.stream, exc.version) == (4, version)
    assert exc.type_name == F.Opcode(opcode).name and exc.type_code == opcode
    assert exc.length == len(frame.raw) and exc.prefix == bytes(frame.raw[:64])
    assert exc.audit_fields()["prefix_hex"] == bytes(frame.raw[:64]).hex()
    assert state.pending == {} and state.last_request is None and audit.events == []
    reply = F.protocol_error_reply(exc, version=version)
    error = F.parse_error(F.Frame(version, 0, 4, F.Opcode.ERROR, reply))
    assert error.code == F.ErrorCode.PROTOCOL_ERROR and struct.unpack_from(">h", reply, 2)[0] == 4


# --------------------------------------------------------------------------- client auth


def test_plain_client_authenticator():
    auth = PlainClientAuthenticator()
    step = auth.step(b"\x00alice\x00s3cret")
    assert step.done and step.user == "alice"
    assert "s3cret" not in repr(step) and not any("s3cret" in repr(v) for v in vars(auth).values())
    assert auth.step(b"admin\x00bob\x00pw").user == "bob"  # authzid ignored
    for token, message in ((None, "required"), (b"\x00alice", "malformed"), (b"\x00\x00pw", "Authentication ID"), (b"\x00bob\x00", "Password")):
        with pytest.raises(ClientAuthFailed, match=message):
            auth.step(token)


# --------------------------------------------------------------------------- config rules


def _load(tmp_path, listener_extra=None, route_extra=None, backend_extra=None, auth=None):
    secret = tmp_path / "pw"
    secret.write_text("x")
    backend = {"address": "127.0.0.1:9042", "user": "cassandra", "auth": auth or {"method": "password", "password_file": str(secret)}}
    backend.update(backend_extra or {})
    route = {"name": "r", "match": {"user": "app"}, "backend": backend, **(route_extra or {})}
    listener = {"name": "c", "protocol": "cassandra", "listen": "127.0.0.1:0", "routes": [route], **(listener_extra or {})}
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"listeners": [listener]}))
    return load_config(str(path), default_registry())


def _errors(tmp_path, **kw) -> str:
    with pytest.raises(ConfigErrors) as info:
        _load(tmp_path, **kw)
    return str(info.value)


def test_good_config_loads(tmp_path):
    config = _load(tmp_path, listener_extra={"options": {"expected_user": "app*"}}, route_extra={"options": {"expected_user": "app"}},
                   backend_extra={"tls": {"mode": "verify-full", "ca_file": str(tmp_path / "pw")}})
    route = config.listeners[0].routes[0]
    assert route.backend.auth.method == "password" and route.backend.tls.mode == "verify-full"


def test_config_mistakes_are_named(tmp_path):
    assert "keytab_file: expected a readable file" in _errors(tmp_path, auth={"method": "gssapi", "principal": "p@R", "keytab_file": "k"})
    assert "tls: expected a \"mode\"" in _errors(tmp_path, backend_extra={"tls": {"ca_file": str(tmp_path / "pw")}})
    assert "backend.database: expected no \"database\"" in _errors(tmp_path, backend_extra={"database": "ks"})
    text = _errors(tmp_path, listener_extra={"options": {"client_auth": "none"}})
    assert "client_auth: expected \"password\"" in text
    assert "a cassandra listener option" in _errors(tmp_path, listener_extra={"options": {"nope": 1}})
    assert "one of password, none" in _errors(tmp_path, listener_extra={"options": {"client_auth": "maybe"}})
    assert "a cassandra route option" in _errors(tmp_path, route_extra={"options": {"other": 1}})
    assert "a match key of this protocol" in _errors(tmp_path, route_extra={"match": {"database": "x"}})
    assert "no password for method none" in _errors(tmp_path, auth={"method": "none", "password_file": str(tmp_path / "pw")})


def test_password_route_needs_a_backend_user(tmp_path):
    secret = tmp_path / "pw"
    secret.write_text("x")
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"listeners": [{"name": "c", "protocol": "cassandra", "listen": "127.0.0.1:0", "routes": [
        {"backend": {"address": "127.0.0.1:9042", "auth": {"method": "password", "password_file": str(secret)}}}]}]}))
    with pytest.raises(ConfigErrors) as info:
        load_config(str(path), default_registry())
    assert "a \"user\" for auth method password" in str(info.value)


# --------------------------------------------------------------------------- the engine's own answers (in memory)


async def _read_frame(stream, decoder) -> F.Frame:
    import trio

    from dbproxy.sansio import NEED_DATA

    with trio.fail_after(5):
        while (msg := decoder.next_message()) is NEED_DATA:
            data = await stream.receive_some(65536)
            assert data, "engine closed the connection"
            decoder.feed(data)
    return msg


def _engine(**options):
    from dbproxy.config import ListenerConfig
    from dbproxy.engine import Services
    from dbproxy.engines.cassandra.engine import CassandraEngine

    listener = ListenerConfig(name="c", protocol="cassandra", host="127.0.0.1", port=0, tls=None, routes=(), options=options)
    return CassandraEngine(listener, Services(recorder=None))


async def test_refuse_answers_options_then_server_error():
    import trio
    from trio.testing import memory_stream_pair

    from dbproxy.session import Session
    from dbproxy.engines.cassandra.codec import CqlDecoder

    engine = _engine()
    client, server = memory_stream_pair()
    decoder = CqlDecoder("server")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(engine.refuse, Session("c", "cassandra", "test"), server, "audit unavailable")
        await client.send_all(F.encode_options(5, 1))
        supported = await _read_frame(client, decoder)
        assert supported.opcode == F.Opcode.SUPPORTED and supported.stream == 1
        await client.send_all(F.encode_startup(5, 2, {"CQL_VERSION": "3.0.0"}))
        refused = await _read_frame(client, decoder)
        assert refused.stream == 2 and F.parse_error(refused) == F.CqlError(F.ErrorCode.SERVER_ERROR, "audit unavailable")


async def test_handshake_refusals_in_cassandras_words():
    """Before any backend is involved: missing CQL_VERSION, unknown compression, snappy on v5,
    a request before STARTUP, a version change mid-connection."""
    import trio
    from trio.testing import memory_stream_pair

    from dbproxy.session import Session
    from dbproxy.engines.cassandra.codec import CqlDecoder

    cases = [
        ([F.encode_startup(4, 3, {"DRIVER_NAME": "x"})], "Missing value CQL_VERSION in STARTUP message"),
        ([F.encode_startup(4, 3, {"CQL_VERSION": "3.0.0", "COMPRESSION": "zstd"})], "Unknown compression algorithm: zstd"),
        ([F.encode_startup(5, 3, {"CQL_VERSION": "3.0.0", "COMPRESSION": "snappy"})], "Snappy compression is not supported in protocol V5"),
        ([F.encode_frame(4, 0, 3, F.Opcode.QUERY, F.query_body(4, "SELECT 1"), response=False)], "Unexpected message QUERY, expecting STARTUP or OPTIONS"),
        ([F.encode_options(4, 1), F.encode_options(5, 3)], "Invalid message version. Got 5 but previous messages on this connection had version 4"),
    ]
    for frames, message in cases:
        engine = _engine()
        client, server = memory_stream_pair()
        decoder = CqlDecoder("server")
        session = Session("c", "cassandra", "test")
        got = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(engine.handle_connection, session, server)
            for frame in frames:
                await client.send_all(frame)
            while True:
                answer = await _read_frame(client, decoder)
                got.append(answer)
                if answer.opcode == F.Opcode.ERROR:
                    break
        err = F.parse_error(got[-1])
        assert (err.code, err.message, got[-1].stream) == (F.ErrorCode.PROTOCOL_ERROR, message, 3), message
