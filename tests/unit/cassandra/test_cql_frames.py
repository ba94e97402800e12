"""CQL frames: the decoder in 'frames' framing and the lazy body parsers.

Request bytes come from the official cassandra-driver's serializers; the
responses the proxy originates are checked by decoding them with the driver.
"""

from __future__ import annotations

import struct
import uuid

import lz4.block
import pytest
from cassandra import ConsistencyLevel
from cassandra.protocol import (
    _UNSET_VALUE,
    AuthResponseMessage,
    BatchMessage,
    ExecuteMessage,
    OptionsMessage,
    PrepareMessage,
    ProtocolException,
    QueryMessage,
    RegisterMessage,
    StartupMessage,
)
from cassandra.query import BatchType
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.cassandra.cql_testutil import (
    CUSTOM,
    INT,
    MAP_TEXT_LIST_INT,
    TEXT,
    TUPLE,
    UDT,
    decode_all,
    driver_decode,
    driver_frame,
    event_body_status,
    prepared_body,
    response_prefix,
    rows_body,
    schema_change_body,
    set_keyspace_body,
    vector,
)
from dbproxy.errors import FrameTooLarge, ProtocolError
from dbproxy.sansio import NEED_DATA
from dbproxy.engines.cassandra import protocol as F
from dbproxy.engines.cassandra.codec import CqlDecoder, peek_version

SELECT = "SELECT release_version FROM system.local WHERE key = 'local'"


def one(decoder: CqlDecoder, data: bytes) -> F.Frame:
    msgs = decode_all(decoder, data)
    assert len(msgs) == 1
    return msgs[0]


def check_delivery(data: bytes, direction: str = "client", **kwargs) -> F.Frame:
    """Whole, byte by byte, and followed by the start of another frame: same frame, exact bytes."""
    whole = one(CqlDecoder(direction, **kwargs), data)
    assert whole.raw == data
    d = CqlDecoder(direction, **kwargs)
    bytewise = decode_all(d, data, chunk=1)
    assert bytewise == [whole]
    assert d.buffer.position == len(data)
    d = CqlDecoder(direction, **kwargs)
    d.buffer.mark()
    trailing = data[:5]
    d.feed(data + trailing)
    assert d.next_message() == whole
    assert d.next_message() is NEED_DATA
    assert d.buffer.consumed_since_mark() == data
    assert len(d.buffer) == len(trailing)
    return whole


# --- requests from the driver --------------------------------------------------------


@pytest.mark.parametrize("version", [3, 4, 5, 6])
def test_query_from_driver(version):
    beta = version == 6
    keyspace = "system" if version >= 5 else None
    msg = QueryMessage(
        SELECT,
        ConsistencyLevel.LOCAL_QUORUM,
        serial_consistency_level=ConsistencyLevel.LOCAL_SERIAL,
        fetch_size=100,
        paging_state=b"\x00\x01state",
        timestamp=1700000000000001,
        keyspace=keyspace,
    )
    frame = check_delivery(driver_frame(msg, version, stream=17, beta=beta))
    assert (frame.version, frame.stream, frame.opcode) == (version, 17, F.Opcode.QUERY)
    assert not frame.is_response
    assert bool(frame.flags & F.FLAG_BETA) == beta
    assert F.beta_flag_missing(frame) is False
    q = F.parse_query(frame)
    assert q.query == SELECT
    p = q.params
    assert p.consistency == F.Consistency.LOCAL_QUORUM
    assert p.serial_consistency == F.Consistency.LOCAL_SERIAL
    assert p.page_size == 100
    assert p.paging_state == b"\x00\x01state"
    assert p.timestamp == 1700000000000001
    assert p.keyspace == keyspace
    assert p.values == ()


@pytest.mark.parametrize("version", [4, 5])
def test_execute_from_driver_with_null_and_unset(version):
    msg = ExecuteMessage(
        b"\x01\x02\x03\x04",
        [b"abc", None, _UNSET_VALUE, b""],
        ConsistencyLevel.ALL,
        fetch_size=100,
        skip_meta=True,
        result_metadata_id=b"\xee\xff",
    )
    e = F.parse_execute(check_delivery(driver_frame(msg, version, stream=300)))
    assert e.query_id == b"\x01\x02\x03\x04"
    assert e.result_metadata_id == (b"\xee\xff" if version >= 5 else None)
    assert e.params.values == (b"abc", None, F.UNSET, b"")
    assert e.params.consistency == F.Consistency.ALL
    assert e.params.page_size == 100


def test_execute_v3_treats_negative_lengths_as_null():
    msg = ExecuteMessage(b"\xab", [b"x", None], ConsistencyLevel.ONE)
    e = F.parse_execute(check_delivery(driver_frame(msg, 3)))
    assert e.params.values == (b"x", None)


@pytest.mark.parametrize("version", [3, 4, 5])
def test_batch_from_driver(version):
    keyspace = "ks" if version >= 5 else None
    msg = BatchMessage(
        BatchType.COUNTER,
        [(False, "UPDATE ks.c SET n = n + 1 WHERE k = ?", [b"\x00\x00\x00\x01"]), (True, b"\xca\xfe", [None, b"v"])],
        ConsistencyLevel.QUORUM,
        serial_consistency_level=ConsistencyLevel.SERIAL,
        timestamp=42,
        keyspace=keyspace,
    )
    b = F.parse_batch(check_delivery(driver_frame(msg, version, stream=2)))
    assert b.batch_type == 2
    assert b.statements == (
        F.BatchStatement(0, "UPDATE ks.c SET n = n + 1 WHERE k = ?", None, (b"\x00\x00\x00\x01",)),
        F.BatchStatement(1, None, b"\xca\xfe", (None, b"v")),
    )
    assert (b.consistency, b.serial_consistency, b.timestamp, b.keyspace) == (
        F.Consistency.QUORUM,
        F.Consistency.SERIAL,
        42,
        keyspace,
    )


@pytest.mark.parametrize("version", [3, 4, 5])
def test_prepare_register_startup_auth_options(version):
    keyspace = "ks" if version >= 5 else None
    p = F.parse_prepare(check_delivery(driver_frame(PrepareMessage("SELECT * FROM t WHERE k = ?", keyspace=keyspace), version)))
    assert p == F.Prepare("SELECT * FROM t WHERE k = ?", keyspace)
    reg = F.parse_register(check_delivery(driver_frame(RegisterMessage(["SCHEMA_CHANGE", "STATUS_CHANGE"]), version)))
    assert reg == ("SCHEMA_CHANGE", "STATUS_CHANGE")
    s = F.parse_startup(check_delivery(driver_frame(StartupMessage("3.0.0", {"COMPRESSION": "lz4"}), version)))
    assert s == {"COMPRESSION": "lz4", "CQL_VERSION": "3.0.0"}
    token = F.sasl_plain_token("alice", "s3cret")
    assert token == b"\x00alice\x00s3cret"
    a = check_delivery(driver_frame(AuthResponseMessage(token), version, stream=4))
    assert F.parse_auth_response(a) == token == F.parse_auth_token(a)
    o = check_delivery(driver_frame(OptionsMessage(), version))
    assert (o.opcode, o.body_length) == (F.Opcode.OPTIONS, 0)


def test_our_request_encoders_match_the_driver():
    opts = {"COMPRESSION": "lz4", "CQL_VERSION": "3.0.0"}
    assert F.encode_startup(4, 0, opts) == driver_frame(StartupMessage("3.0.0", {"COMPRESSION": "lz4"}), 4)
    assert F.encode_options(5, 3) == driver_frame(OptionsMessage(), 5, stream=3)
    token = F.sasl_plain_token("u", "p")
    for comp in (None, "lz4", "snappy"):
        assert F.encode_auth_response(4, 9, token, compressor=comp) == driver_frame(AuthResponseMessage(token), 4, 9, comp)
    for version in (3, 4, 5):
        ours = F.encode_frame(version, 0, 1, F.Opcode.QUERY, F.query_body(version, SELECT, F.Consistency.ONE, page_size=10), response=False)
        assert ours == driver_frame(QueryMessage(SELECT, ConsistencyLevel.ONE, fetch_size=10), version, 1)


@pytest.mark.parametrize("compression", ["lz4", "snappy"])
def test_compressed_v4_frames_from_driver(compression):
    msg = QueryMessage(SELECT, ConsistencyLevel.ONE, fetch_size=5000)
    data = driver_frame(msg, 4, stream=7, compression=compression)
    frame = check_delivery(data)
    assert frame.raw == data  # raw keeps the compressed wire bytes
    # Without the negotiated compression the decoder cannot read the body.
    with pytest.raises(F.CqlProtocolError) as info:
        F.parse_query(frame)
    assert info.value.stream == 7
    d = CqlDecoder("client")
    d.set_framing("frames", compression)
    frame = one(d, data)
    assert frame.compressed and frame.compression == compression
    assert F.parse_query(frame).query == SELECT
    assert F.parse_query(frame).params.page_size == 5000


@pytest.mark.parametrize("compression", ["lz4", "snappy"])
def test_compression_round_trip_and_driver_agreement(compression):
    body = F.query_body(4, SELECT * 20)
    packed = F.compress_body(body, compression)
    assert F.decompress_body(packed, compression) == body
    assert F.decompress_body(packed, compression) == _driver_decompress(compression, packed)


def _driver_decompress(compression, data):
    from cassandra.connection import locally_supported_compressions

    return locally_supported_compressions[compression][1](data)


def test_lz4_bomb_is_refused_before_allocating():
    packed = struct.pack(">I", 1 << 30) + lz4.block.compress(b"x" * 100, store_size=False)
    frame = F.Frame(4, F.FLAG_COMPRESSION, 1, F.Opcode.QUERY, F.HEADER.pack(4, 1, 1, 7, len(packed)) + packed, compression="lz4")
    with pytest.raises(FrameTooLarge):
        frame.body()
    with pytest.raises(FrameTooLarge):
        F.parse_query(frame)


def test_corrupt_compressed_bodies():
    for comp, junk in (("lz4", b"\x00\x00\x00\x10\xff\xff\xff"), ("lz4", b"\x01"), ("snappy", b"\xff\xff\xff\xff\xff\xff")):
        with pytest.raises(F.CqlProtocolError):
            F.decompress_body(junk, comp)


# --- responses the proxy originates, read back by the driver --------------------------


@pytest.mark.parametrize("version,compression", [(3, None), (4, None), (4, "lz4"), (4, "snappy"), (5, None), (6, None)])
def test_our_responses_decode_in_the_driver(version, compression):
    from cassandra.protocol import (
        AuthChallengeMessage,
        AuthenticateMessage,
        AuthSuccessMessage,
        BadCredentials,
        OverloadedErrorMessage,
        ReadyMessage,
        ServerError,
        SupportedMessage,
        UnauthorizedErrorMessage,
    )

    kw = {"compressor": compression}
    m = driver_decode(F.encode_ready(version, 5, **kw), compression)
    assert isinstance(m, ReadyMessage) and m.stream_id == 5
    m = driver_decode(F.encode_authenticate(version, 0, "org.apache.cassandra.auth.PasswordAuthenticator", **kw), compression)
    assert isinstance(m, AuthenticateMessage) and m.authenticator == "org.apache.cassandra.auth.PasswordAuthenticator"
    m = driver_decode(F.encode_auth_challenge(version, 1, b"challenge", **kw), compression)
    assert isinstance(m, AuthChallengeMessage) and m.challenge == b"challenge"
    m = driver_decode(F.encode_auth_success(version, 1, b"final", **kw), compression)
    assert isinstance(m, AuthSuccessMessage) and m.token == "final"
    m = driver_decode(F.encode_supported(version, 2, {"CQL_VERSION": ["3.4.7"], "COMPRESSION": ["lz4", "snappy"]}, **kw), compression)
    assert isinstance(m, SupportedMessage) and m.cql_versions == ["3.4.7"] and m.options["COMPRESSION"] == ["lz4", "snappy"]
    cases = [
        (F.ErrorCode.PROTOCOL_ERROR, ProtocolException),
        (F.ErrorCode.AUTH_ERROR, BadCredentials),
        (F.ErrorCode.UNAUTHORIZED, UnauthorizedErrorMessage),
        (F.ErrorCode.SERVER_ERROR, ServerError),
        (F.ErrorCode.OVERLOADED, OverloadedErrorMessage),
    ]
    for code, cls in cases:
        data = F.encode_error(version, 11, code, f"denied by proxy ({code.name})", **kw)
        m = driver_decode(data, compression)
        assert isinstance(m, cls) and m.code == code and m.message == f"denied by proxy ({code.name})"
        assert m.stream_id == 11
        # and our own parser reads back what we wrote
        d = CqlDecoder("server")
        d.set_framing("frames", compression)
        frame = one(d, data)
        assert frame.is_response and frame.compressed == bool(compression)
        assert F.parse_error(frame) == F.CqlError(code, f"denied by proxy ({code.name})")


def test_round_trip_parse_of_our_responses():
    d = CqlDecoder("server")
    assert F.parse_authenticate(one(d, F.encode_authenticate(4, 0, "X"))) == "X"
    assert F.parse_auth_token(one(d, F.encode_auth_success(4, 0, b"tok"))) == b"tok"
    assert F.parse_auth_token(one(d, F.encode_auth_success(4, 0, None))) is None
    assert F.parse_auth_token(one(d, F.encode_auth_challenge(4, 0, b""))) == b""
    assert F.parse_supported(one(d, F.encode_supported(4, 0, {"A": ["1", "2"], "B": []}))) == {"A": ["1", "2"], "B": []}
    ready = one(d, F.encode_ready(6, 0))
    assert ready.flags & F.FLAG_BETA and ready.body_length == 0


def test_encode_frame_round_trip_and_with_stream():
    for data in (
        driver_frame(QueryMessage(SELECT, ConsistencyLevel.ONE), 4, stream=3),
        driver_frame(ExecuteMessage(b"\x01", [b"a"], ConsistencyLevel.ONE, result_metadata_id=b"\x02"), 5, stream=32000),
    ):
        f = one(CqlDecoder("client"), data)
        assert F.encode_frame(f.version, f.flags, f.stream, f.opcode, f.body(), response=f.is_response) == data
        moved = f.with_stream(1234)
        assert moved.stream == 1234 and moved.raw[9:] == data[9:]
        assert one(CqlDecoder("client"), moved.raw) == moved


# --- results, events, body prefixes ---------------------------------------------------


@pytest.mark.parametrize("version", [3, 4, 5])
def test_rows_result_against_driver(version):
    cols = [("id", INT), ("name", TEXT), ("m", MAP_TEXT_LIST_INT), ("addr", UDT), ("pair", TUPLE), ("blob", CUSTOM)]
    row = [b"\x00\x00\x00\x07", b"bob", None, None, None, b"\x01"]
    body = rows_body(version, cols, [row, row, row], paging_state=b"\x09page")
    data = F.encode_frame(version, 0, 4, F.Opcode.RESULT, body, response=True)
    res = F.parse_result(check_delivery(data, "server"))
    assert res.kind == F.ResultKind.ROWS
    rows = res.rows
    assert rows.row_count == 3 and rows.columns_count == 6
    assert rows.has_more_pages and rows.paging_state == b"\x09page"
    assert [c.name for c in rows.columns] == ["id", "name", "m", "addr", "pair", "blob"]
    assert [c.type_id for c in rows.columns] == [0x09, 0x0D, 0x21, 0x30, 0x31, 0x00]
    assert {(c.keyspace, c.table) for c in rows.columns} == {("ks", "tbl")}
    m = driver_decode(data)
    assert len(m.parsed_rows) == 3 and m.paging_state == b"\x09page"
    assert m.column_names == [c.name for c in rows.columns]


def test_rows_variants():
    body = rows_body(4, [("a", INT)], [[b"\x00\x00\x00\x01"]], global_spec=False)
    res = F.parse_result(one(CqlDecoder("server"), F.encode_frame(4, 0, 1, F.Opcode.RESULT, body, response=True)))
    assert res.rows.columns == (F.ColumnSpec("ks", "tbl", "a", 0x09),) and not res.rows.has_more_pages
    body = rows_body(5, [("a", INT), ("b", INT)], [[None, None]] * 4, no_metadata=True)
    res = F.parse_result(one(CqlDecoder("server"), F.encode_frame(5, 0, 1, F.Opcode.RESULT, body, response=True)))
    assert res.rows.columns == () and res.rows.row_count == 4 and res.rows.columns_count == 2
    body = rows_body(5, [("a", INT)], [], new_metadata_id=b"\x77\x88")
    res = F.parse_result(one(CqlDecoder("server"), F.encode_frame(5, 0, 1, F.Opcode.RESULT, body, response=True)))
    assert res.rows.new_metadata_id == b"\x77\x88" and res.rows.row_count == 0


@pytest.mark.parametrize("version", [3, 4, 5])
def test_prepared_result_against_driver(version):
    body = prepared_body(version, b"\xde\xad\xbe\xef", b"\x01\x02" if version >= 5 else None, [("k", INT), ("v", TEXT)])
    data = F.encode_frame(version, 0, 2, F.Opcode.RESULT, body, response=True)
    res = F.parse_result(one(CqlDecoder("server"), data))
    assert res.prepared_id == b"\xde\xad\xbe\xef"
    assert res.result_metadata_id == (b"\x01\x02" if version >= 5 else None)
    assert res.bind_count == 2
    m = driver_decode(data)
    assert m.query_id == res.prepared_id


def test_other_results_and_events():
    d = CqlDecoder("server")
    r = F.parse_result(one(d, F.encode_frame(4, 0, 1, F.Opcode.RESULT, set_keyspace_body("ks1"), response=True)))
    assert r == F.Result(F.ResultKind.SET_KEYSPACE, keyspace="ks1")
    r = F.parse_result(one(d, F.encode_frame(4, 0, 1, F.Opcode.RESULT, schema_change_body("CREATED", "TABLE", "ks", "t"), response=True)))
    assert r.schema_change == F.SchemaChange("CREATED", "TABLE", ("ks", "t"))
    r = F.parse_result(one(d, F.encode_frame(4, 0, 1, F.Opcode.RESULT, struct.pack(">i", 1), response=True)))
    assert r == F.Result(F.ResultKind.VOID)
    with pytest.raises(F.CqlProtocolError):
        F.parse_result(one(d, F.encode_frame(4, 0, 1, F.Opcode.RESULT, struct.pack(">i", 99), response=True)))
    ev = F.parse_event(one(d, F.encode_frame(4, 0, -1, F.Opcode.EVENT, event_body_status("UP"), response=True)))
    assert ev == F.Event("STATUS_CHANGE", "UP")
    body = b"\x00\x0dSCHEMA_CHANGE" + schema_change_body("DROPPED", "KEYSPACE", "ks")[4:]
    ev = F.parse_event(one(d, F.encode_frame(4, 0, -1, F.Opcode.EVENT, body, response=True)))
    assert ev.schema_change == F.SchemaChange("DROPPED", "KEYSPACE", ("ks",))
    err = F.error_body(F.ErrorCode.UNPREPARED, "unknown id", b"\x00\x02\xab\xcd")
    assert F.parse_error(one(d, F.encode_frame(4, 0, 1, F.Opcode.ERROR, err, response=True))).unprepared_id == b"\xab\xcd"


@pytest.mark.parametrize("version", [4, 5])
def test_tracing_warnings_and_custom_payload_prefix(version):
    trace = uuid.uuid4().bytes
    flags, prefix = response_prefix(trace, ["too many tombstones"], {"k": b"v"})
    body = prefix + rows_body(version, [("a", INT)], [[b"\x00\x00\x00\x01"]])
    data = F.encode_frame(version, flags, 1, F.Opcode.RESULT, body, response=True)
    frame = one(CqlDecoder("server"), data)
    pre = F.body_prefix(frame)
    assert pre.tracing_id == trace and pre.warnings == ("too many tombstones",) and pre.custom_payload == {"k": b"v"}
    assert F.parse_result(frame).rows.row_count == 1
    m = driver_decode(data)
    assert m.trace_id == uuid.UUID(bytes=trace) and m.warnings == ["too many tombstones"] and m.custom_payload == {"k": b"v"}
    # a request with the tracing flag has no tracing id in its body, only the custom payload
    msg = QueryMessage(SELECT, ConsistencyLevel.ONE)
    msg.tracing = True
    msg.custom_payload = {"x": b"y"}
    req = driver_frame(msg, version)
    frame = one(CqlDecoder("client"), req)
    assert frame.flags & (F.FLAG_TRACING | F.FLAG_CUSTOM_PAYLOAD) == F.FLAG_TRACING | F.FLAG_CUSTOM_PAYLOAD
    assert F.body_prefix(frame).custom_payload == {"x": b"y"} and F.body_prefix(frame).tracing_id is None
    assert F.parse_query(frame).query == SELECT


# --- versions, direction, size --------------------------------------------------------


def refused(data: bytes, direction: str = "client") -> F.CqlProtocolError:
    """Whole and byte by byte: the refusal comes from the header alone, before any body byte."""
    with pytest.raises(F.CqlProtocolError) as whole:
        one(CqlDecoder(direction), data)
    d = CqlDecoder(direction)
    header = F.header_size_for(data[0])
    for i in range(header - 1):
        d.feed(data[i:i + 1])
        assert d.next_message() is NEED_DATA
    d.feed(data[header - 1:header])
    with pytest.raises(F.CqlProtocolError) as bytewise:
        d.next_message()
    assert str(bytewise.value) == str(whole.value)
    assert (bytewise.value.stream, bytewise.value.version) == (whole.value.stream, whole.value.version)
    return whole.value


def test_v2_client_is_refused_in_its_own_version():
    exc = refused(vector("v2_options.bin"))
    assert isinstance(exc, F.UnsupportedProtocolVersion)
    assert (exc.version, exc.stream) == (2, 3)
    reply = F.protocol_error_reply(exc)
    assert reply == F.encode_unsupported_version_error(2, 3)
    # v1/v2 header: 8 bytes, one-byte stream id, as a v2 driver reads it
    assert reply[0] == 0x82 and len(reply) == 8 + struct.unpack(">I", reply[4:8])[0]
    m = driver_decode(reply)
    assert isinstance(m, ProtocolException) and "unsupported protocol version" in m.message
    assert m.stream_id == 3


def test_dse_and_future_versions_get_the_current_version():
    exc = refused(vector("dse_v2_options.bin"))
    assert isinstance(exc, F.UnsupportedProtocolVersion) and exc.version == 0x42
    reply = F.protocol_error_reply(exc)
    assert reply[0] == 0x80 | F.CURRENT_VERSION
    m = driver_decode(reply)
    assert isinstance(m, ProtocolException)
    assert m.message == (
        "Invalid or unsupported protocol version (66); supported versions are (3/v3, 4/v4, 5/v5, 6/v6-beta)"
    )
    v7 = F.encode_frame(7, 0, 12, F.Opcode.STARTUP, F.startup_body({"CQL_VERSION": "3.0.0"}), response=False)
    exc = refused(v7)
    assert (exc.version, exc.stream) == (7, 12)
    assert F.reply_version_for(7) == 5 and F.reply_version_for(4) == 4 and F.reply_version_for(1) == 1
    # the body of an unsupported frame is never waited for (Cassandra answers from the header)
    d = CqlDecoder("client")
    d.feed(v7[:9])
    with pytest.raises(F.UnsupportedProtocolVersion):
        d.next_message()


def test_beta_version_without_flag():
    exc = refused(driver_frame(OptionsMessage(), 6, stream=1, beta=False))
    assert "USE_BETA flag is unset" in exc.client_hint and exc.version == 6
    m = driver_decode(F.protocol_error_reply(exc))
    assert isinstance(m, ProtocolException) and "USE_BETA flag is unset" in m.message
    # responses in v6 need no flag from the server side
    assert one(CqlDecoder("server"), F.HEADER.pack(0x86, 0, 1, F.Opcode.READY, 0)).version == 6
    assert F.beta_flag_missing(F.Frame(6, 0, 1, 5, F.HEADER.pack(6, 0, 1, 5, 0)))


def test_peek_version():
    d = CqlDecoder("client")
    assert peek_version(d.buffer) is None
    d.feed(b"\x05")
    assert peek_version(d.buffer) == 5
    d = CqlDecoder("server")
    d.feed(b"\x84")
    assert peek_version(d.buffer) == 4


def test_wrong_direction_is_a_protocol_error_with_stream():
    exc = refused(F.encode_ready(4, 77))
    assert exc.stream == 77 and exc.version == 4
    assert str(exc) == "Wrong protocol direction (expected REQUEST, got RESPONSE) for opcode 2 (READY)"
    exc = refused(driver_frame(OptionsMessage(), 4, stream=3), "server")
    assert str(exc) == "Wrong protocol direction (expected RESPONSE, got REQUEST) for opcode 5 (OPTIONS)"
    m = driver_decode(F.protocol_error_reply(exc))
    assert isinstance(m, ProtocolException) and m.stream_id == 3 and "Wrong protocol direction" in m.message
    # a request bit on a response opcode (Cassandra's Message.Type.fromOpcode check)
    exc = refused(F.HEADER.pack(4, 0, 6, F.Opcode.RESULT, 0))
    assert str(exc) == "Wrong protocol direction (expected RESPONSE, got REQUEST) for opcode 8 (RESULT)"
    for opcode in (0x04, 0x11, 0xFF):
        assert str(refused(F.HEADER.pack(4, 0, 6, opcode, 0))) == f"Unknown opcode {opcode}"


def test_oversize_frame_is_refused_from_its_header():
    d = CqlDecoder("client", max_message_size=1000)
    header = F.HEADER.pack(4, 0, 9, F.Opcode.QUERY, 1001)
    d.feed(header)  # the body is never buffered
    with pytest.raises(FrameTooLarge) as info:
        d.next_message()
    assert info.value.size == 1001 and info.value.limit == 1000 and info.value.stream == 9
    d = CqlDecoder("client", max_message_size=1000)
    d.feed(F.HEADER.pack(4, 0, 9, F.Opcode.QUERY, 0xFFFFFFFF))
    with pytest.raises(FrameTooLarge):
        d.next_message()
    ok = F.encode_frame(4, 0, 1, F.Opcode.QUERY, F.query_body(4, "x" * 900), response=False)
    assert one(CqlDecoder("client", max_message_size=1000), ok).raw == ok


def test_saved_vectors():
    s = F.parse_startup(one(CqlDecoder("client"), vector("v4_startup_lz4.bin")))
    assert s == {"COMPRESSION": "lz4", "DRIVER_NAME": "x", "CQL_VERSION": "3.0.0"}
    d = CqlDecoder("client")
    d.set_framing("frames", "lz4")
    q = F.parse_query(one(d, vector("v4_query_lz4.bin")))
    assert (q.query, q.params.consistency, q.params.page_size, q.params.timestamp) == (SELECT, 6, 5000, 1700000000000001)
    d.set_framing("frames", "snappy")
    q = F.parse_query(one(d, vector("v4_query_snappy.bin")))
    assert q.params.paging_state == b"\x00\x01page"
    b = F.parse_batch(one(CqlDecoder("client"), vector("v3_batch.bin")))
    assert b.batch_type == 1 and b.statements[1].query_id == b"\xca\xfe" and b.timestamp == 42
    assert b.serial_consistency == F.Consistency.LOCAL_SERIAL
    e = F.parse_execute(one(CqlDecoder("client"), vector("v5_execute.bin")))
    assert e.params.values == (b"abc", None, F.UNSET) and e.result_metadata_id == b"\xee\xff"
    assert e.params.flags == F.QF_VALUES | F.QF_PAGE_SIZE and not e.params.skip_metadata


# --- fuzzing ------------------------------------------------------------------------------

PARSERS = [
    F.parse_startup, F.parse_auth_response, F.parse_query, F.parse_prepare, F.parse_execute, F.parse_batch,
    F.parse_register, F.parse_authenticate, F.parse_auth_token, F.parse_supported, F.parse_error,
    F.parse_result, F.parse_event, F.body_prefix,
]


def _parse_everything(frame: F.Frame) -> None:
    for parse in PARSERS:
        try:
            parse(frame)
        except ProtocolError:
            pass


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=300), direction=st.sampled_from(["client", "server"]), comp=st.sampled_from([None, "lz4", "snappy"]))
def test_fuzz_frames_decoder(data, direction, comp):
    d = CqlDecoder(direction, max_message_size=4096)
    d.set_framing("frames", comp)
    d.feed(data)
    try:
        while (msg := d.next_message()) is not NEED_DATA:
            _parse_everything(msg)
    except ProtocolError:
        pass


@settings(max_examples=600, deadline=None)
@given(
    version=st.sampled_from([3, 4, 5]),
    flags=st.integers(0, 0x1F),
    opcode=st.sampled_from(list(F.Opcode)),
    body=st.binary(max_size=200),
    comp=st.sampled_from([None, "lz4", "snappy"]),
)
def test_fuzz_bodies(version, flags, opcode, body, comp):
    response = opcode in F.RESPONSE_OPCODES
    raw = F.HEADER.pack(version | (0x80 if response else 0), flags, 1, opcode, len(body)) + body
    _parse_everything(F.Frame(version, flags, 1, opcode, raw, compression=comp))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fuzz_mutated_driver_frames(data):
    base = driver_frame(
        BatchMessage(BatchType.LOGGED, [(False, "INSERT", [b"a", None]), (True, b"\x01", [b"b"])], ConsistencyLevel.ONE, timestamp=1),
        data.draw(st.sampled_from([3, 4, 5])),
    )
    raw = bytearray(base)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(9, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    frame = one(CqlDecoder("client"), bytes(raw))
    _parse_everything(frame)
