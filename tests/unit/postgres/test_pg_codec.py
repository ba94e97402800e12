"""Decoder tests on real captured PostgreSQL traffic (tests/data/postgres, see capture.py).

Every capture is decoded whole, one byte at a time and with trailing bytes
(which must stay buffered); the concatenated ``raw`` of the messages must be
the input.  Framing errors, size limits and the start-up phase are tested on
literal bytes, and hypothesis checks that random input raises nothing but
ProtocolError subclasses.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dbproxy.errors import FrameTooLarge, ProtocolError, RemoteProtocolError
from dbproxy.sansio import NEED_DATA
from dbproxy.engines.postgres import messages as m
from dbproxy.engines.postgres.codec import MAX_STARTUP_PACKET_LENGTH, BackendDecoder, FrontendDecoder

DATA = Path(__file__).resolve().parents[2] / "data" / "postgres"

CAPTURES = [
    "psql_simple",
    "psql_sslprefer",
    "psql_badpw",
    "psycopg_extended",
    "psycopg_copy",
    "psycopg_md5",
    "psycopg_proto32",
    "psycopg_cancel0",
    "psycopg_cancel1",
]

# Type sequences of the frontend streams ('0' = untyped start-up packet).
FRONTEND_TYPES = {
    "psql_simple": "0ppQQQQQQQQQQX",
    "psql_sslprefer": "00ppQX",
    "psql_badpw": "0pp",
    "psycopg_extended": "0ppQPBDESPSBDESPBDESBDEBDESHPBDESX",
    "psycopg_copy": "0ppQQdcQX",
    "psycopg_md5": "0pQQQX",
    "psycopg_proto32": "0ppQQQX",
    "psycopg_cancel0": "0ppQX",
    "psycopg_cancel1": "0",
}


def load(name: str, side: str) -> bytes:
    return (DATA / f"{name}.{side}.bin").read_bytes()


def drain(dec) -> list:
    out = []
    while (msg := dec.next_message()) is not NEED_DATA:
        out.append(msg)
    return out


def decode_frontend(data: bytes, step: int | None = None, tail: bytes = b""):
    dec = FrontendDecoder()
    msgs = []
    data = data + tail
    step = step or len(data) or 1
    for i in range(0, len(data), step):
        dec.feed(data[i:i + step])
        msgs += drain(dec)
    return dec, msgs


def decode_backend(data: bytes, step: int | None = None, tail: bytes = b"", ssl_answer: bool = False):
    dec = BackendDecoder()
    msgs: list = []
    answer = None
    data = data + tail
    step = step or len(data) or 1
    for i in range(0, len(data), step):
        dec.feed(data[i:i + step])
        if ssl_answer and answer is None:
            got = dec.read_ssl_answer()
            if got is NEED_DATA:
                continue
            answer = got
        msgs += drain(dec)
    return dec, answer, msgs


# Partial messages that must stay buffered without error.
FRONTEND_TAIL = b"Q\x00\x00\x00\x20sel"
STARTUP_TAIL = b"\x00\x00\x00\x10\x04\xd2"
BACKEND_TAIL = b"D\x00\x00"


@pytest.mark.parametrize("name", CAPTURES)
@pytest.mark.parametrize("step", [None, 1, 7])
@pytest.mark.parametrize("tail", [False, True])
def test_frontend_capture_roundtrip(name: str, step: int | None, tail: bool) -> None:
    data = load(name, "fe")
    # A lone CancelRequest leaves the decoder in start-up mode: its tail is a partial start-up packet.
    trailing = (STARTUP_TAIL if name == "psycopg_cancel1" else FRONTEND_TAIL) if tail else b""
    dec, msgs = decode_frontend(data, step, trailing)
    assert b"".join(x.raw for x in msgs) == data
    assert "".join(chr(x.type) if x.type else "0" for x in msgs) == FRONTEND_TYPES[name]
    assert dec.next_message() is NEED_DATA
    assert len(dec.buffer) == len(trailing)


@pytest.mark.parametrize("name", CAPTURES)
@pytest.mark.parametrize("step", [None, 1, 5])
@pytest.mark.parametrize("tail", [False, True])
def test_backend_capture_roundtrip(name: str, step: int | None, tail: bool) -> None:
    data = load(name, "be")
    ssl = name == "psql_sslprefer"
    dec, answer, msgs = decode_backend(data, step, BACKEND_TAIL if tail else b"", ssl_answer=ssl)
    if ssl:
        assert answer == b"N"
        data = data[1:]
    assert b"".join(x.raw for x in msgs) == data
    assert all(isinstance(x, m.Message) and x.type for x in msgs)
    assert len(dec.buffer) == (len(BACKEND_TAIL) if tail else 0)


def test_consumed_span_equals_raw_per_chunk() -> None:
    """The pipeline forwards buffer.consumed_since_mark(): it must equal the decoded messages."""
    data = load("psycopg_copy", "be")
    dec = BackendDecoder()
    forwarded = []
    for i in range(0, len(data), 37):
        dec.feed(data[i:i + 37])
        dec.buffer.mark()
        msgs = drain(dec)
        assert dec.buffer.consumed_since_mark() == b"".join(x.raw for x in msgs)
        forwarded.append(dec.buffer.consumed_since_mark())
        dec.buffer.compact()
    assert b"".join(forwarded) == data


def test_backend_type_sequence_simple_query() -> None:
    _, _, msgs = decode_backend(load("psql_simple", "be"))
    types = "".join(chr(x.type) for x in msgs)
    # auth (SASL, continue, final, ok), ParameterStatus*, BackendKeyData, ReadyForQuery, then the first query.
    assert types.startswith("RRRR")
    first_z = types.index("Z")
    assert set(types[4:first_z]) == {"S", "K"}
    assert types[first_z:first_z + 5] == "ZTDCZ"
    assert "N" in types and "E" in types and "A" in types and "I" in types


def test_copy_capture_types() -> None:
    _, _, msgs = decode_backend(load("psycopg_copy", "be"))
    types = "".join(chr(x.type) for x in msgs)
    assert "GCZ" in types
    assert "H" + "d" * 10 + "cCZ" in types


def test_negotiate_protocol_version_capture() -> None:
    _, msgs = decode_frontend(load("psycopg_proto32", "fe"))
    startup = msgs[0]
    assert isinstance(startup, m.StartupMessage)
    assert (startup.major, startup.minor) == (3, 2)
    _, _, bmsgs = decode_backend(load("psycopg_proto32", "be"))
    assert bmsgs[0].type == m.BE.NEGOTIATE_PROTOCOL_VERSION
    npv = m.parse_negotiate_protocol_version(bmsgs[0])
    assert npv == m.NegotiateProtocolVersion(m.PROTOCOL_3_0, ())


def test_cancel_request_capture_matches_backend_key() -> None:
    _, _, session = decode_backend(load("psycopg_cancel0", "be"))
    key = m.parse_backend_key_data(next(x for x in session if x.type == m.BE.BACKEND_KEY_DATA))
    _, msgs = decode_frontend(load("psycopg_cancel1", "fe"))
    (cancel,) = msgs
    assert isinstance(cancel, m.CancelRequest)
    assert (cancel.pid, cancel.secret) == (key.pid, key.secret)
    assert len(cancel.secret) == 4
    assert m.encode_cancel_request(key.pid, key.secret) == cancel.raw


# --------------------------------------------------------------------------
# Start-up phase.


def test_ssl_request_keeps_startup_mode() -> None:
    dec = FrontendDecoder()
    dec.feed(m.encode_ssl_request() + m.encode_gssenc_request())
    assert isinstance(dec.next_message(), m.SSLRequest)
    assert dec.in_startup
    assert isinstance(dec.next_message(), m.GSSENCRequest)
    assert dec.in_startup
    dec.feed(m.encode_startup({"user": "u"}) + m.encode_query("select 1"))
    st_msg = dec.next_message()
    assert isinstance(st_msg, m.StartupMessage) and st_msg.params == {"user": "u"}
    assert not dec.in_startup
    q = dec.next_message()
    assert q.type == m.FE.QUERY and m.parse_query(q) == "select 1"


def test_set_startup_done_and_typed_mode() -> None:
    dec = FrontendDecoder()
    dec.set_startup_done()
    dec.feed(m.encode_terminate())
    assert dec.next_message().type == m.FE.TERMINATE
    dec2 = FrontendDecoder(startup=False)
    dec2.feed(m.encode_sync())
    assert dec2.next_message().type == m.FE.SYNC


def test_startup_minor_version_and_protocol_options() -> None:
    raw = m.encode_startup({"user": "u", "_pq_.foo": "bar"}, protocol=(3 << 16) | 5)
    dec = FrontendDecoder()
    dec.feed(raw)
    msg = dec.next_message()
    assert isinstance(msg, m.StartupMessage)
    assert (msg.major, msg.minor) == (3, 5)
    assert msg.params["_pq_.foo"] == "bar"
    assert msg.raw == raw


@pytest.mark.parametrize("code", [(2 << 16), (4 << 16) | 1, 1234 << 16 | 9999, 0])
def test_unsupported_protocol_major(code: int) -> None:
    dec = FrontendDecoder()
    dec.feed(struct.pack(">ii", 9, code) + b"\0")
    with pytest.raises(RemoteProtocolError, match="unsupported") as ei:
        dec.next_message()
    assert "3.x" in ei.value.client_hint


@pytest.mark.parametrize("length", [-1, 0, 3, 7, -(2**31)])
def test_startup_garbage_length(length: int) -> None:
    dec = FrontendDecoder()
    dec.feed(struct.pack(">i", length))
    with pytest.raises(RemoteProtocolError) as ei:
        dec.next_message()
    assert not isinstance(ei.value, FrameTooLarge)


def test_startup_too_large_before_body() -> None:
    dec = FrontendDecoder(max_message_size=1 << 20)
    dec.feed(struct.pack(">i", MAX_STARTUP_PACKET_LENGTH + 1))
    with pytest.raises(FrameTooLarge) as ei:
        dec.next_message()
    assert ei.value.limit == MAX_STARTUP_PACKET_LENGTH
    # exactly the limit is fine (and needs its body)
    dec = FrontendDecoder()
    dec.feed(struct.pack(">ii", MAX_STARTUP_PACKET_LENGTH, m.PROTOCOL_3_0))
    assert dec.next_message() is NEED_DATA


@pytest.mark.parametrize("raw", [
    struct.pack(">ii", 9, m.PROTOCOL_3_0) + b"x",                   # no terminator
    struct.pack(">ii", 11, m.PROTOCOL_3_0) + b"ab\0",              # name without value
    struct.pack(">ii", 12, m.PROTOCOL_3_0) + b"\0v\0\0",           # empty name
    struct.pack(">ii", 12, m.SSL_REQUEST_CODE) + b"\0\0\0\0",      # SSLRequest of wrong size
    struct.pack(">ii", 12, m.CANCEL_REQUEST_CODE) + b"\0\0\0\1",   # CancelRequest too short
])
def test_malformed_startup_packets(raw: bytes) -> None:
    dec = FrontendDecoder()
    dec.feed(raw)
    with pytest.raises(RemoteProtocolError):
        dec.next_message()


def test_startup_without_params() -> None:
    dec = FrontendDecoder()
    dec.feed(struct.pack(">ii", 9, m.PROTOCOL_3_0) + b"\0")
    msg = dec.next_message()
    assert msg.params == {}


def test_protocol_32_cancel_request_long_secret() -> None:
    secret = bytes(range(32))
    raw = m.encode_cancel_request(77, secret)
    dec = FrontendDecoder()
    dec.feed(raw)
    msg = dec.next_message()
    assert (msg.pid, msg.secret, msg.raw) == (77, secret, raw)


# --------------------------------------------------------------------------
# Typed framing.


@pytest.mark.parametrize("length", [-1, 0, 3, -(2**31)])
@pytest.mark.parametrize("make", [BackendDecoder, lambda: FrontendDecoder(startup=False)])
def test_typed_garbage_length(make, length: int) -> None:
    dec = make()
    dec.feed(b"D" + struct.pack(">i", length))
    with pytest.raises(RemoteProtocolError) as ei:
        dec.next_message()
    assert not isinstance(ei.value, FrameTooLarge)
    assert ei.value.client_hint


@pytest.mark.parametrize("make", [BackendDecoder, lambda **kw: FrontendDecoder(startup=False, **kw)])
def test_frame_too_large_before_body(make) -> None:
    dec = make(max_message_size=1000)
    dec.feed(b"D" + struct.pack(">i", 1001))  # header only: no body buffered yet
    with pytest.raises(FrameTooLarge) as ei:
        dec.next_message()
    assert (ei.value.size, ei.value.limit) == (1001, 1000)
    dec = make(max_message_size=1000)
    dec.feed(b"D" + struct.pack(">i", 1000))
    assert dec.next_message() is NEED_DATA
    dec.feed(b"x" * 996)
    assert len(dec.next_message().raw) == 1001


def test_unknown_type_is_forwarded() -> None:
    for dec in (BackendDecoder(), FrontendDecoder(startup=False)):
        dec.feed(b"\xfe\x00\x00\x00\x06hi" + b"~\x00\x00\x00\x04")
        a, b = dec.next_message(), dec.next_message()
        assert (a.type, a.raw, b.type) == (0xFE, b"\xfe\x00\x00\x00\x06hi", ord("~"))


def test_empty_input_needs_data() -> None:
    assert BackendDecoder().next_message() is NEED_DATA
    assert FrontendDecoder().next_message() is NEED_DATA
    assert BackendDecoder().read_ssl_answer() is NEED_DATA


def test_shared_buffer_handover() -> None:
    """A decoder can take over a buffer (and its unread bytes) from another."""
    first = FrontendDecoder()
    first.feed(m.encode_startup({"user": "u"}) + m.encode_query("x"))
    assert isinstance(first.next_message(), m.StartupMessage)
    second = FrontendDecoder(startup=False, buffer=first.buffer)
    assert m.parse_query(second.next_message()) == "x"


# --------------------------------------------------------------------------
# SSL / GSS answers.


def test_ssl_answers() -> None:
    for answer in (b"S", b"N"):
        dec = BackendDecoder()
        dec.feed(answer)
        assert dec.read_ssl_answer() == answer
        assert len(dec.buffer) == 0
    dec = BackendDecoder()
    dec.feed(b"G")
    assert dec.read_gssenc_answer() == b"G"


def test_ssl_answer_error_response_left_for_next_message() -> None:
    err = m.encode_error("FATAL", "08P01", "unsupported frontend protocol")
    dec = BackendDecoder()
    dec.feed(err)
    assert dec.read_ssl_answer() == b"E"
    msg = dec.next_message()
    assert msg.raw == err and m.parse_error_fields(msg)["C"] == "08P01"


def test_ssl_answer_invalid_and_injected_bytes() -> None:
    dec = BackendDecoder()
    dec.feed(b"X")
    with pytest.raises(RemoteProtocolError):
        dec.read_ssl_answer()
    dec = BackendDecoder()
    dec.feed(b"G")
    with pytest.raises(RemoteProtocolError):
        dec.read_ssl_answer()  # 'G' answers GSSENCRequest, not SSLRequest
    dec = BackendDecoder()
    dec.feed(b"S" + m.encode_auth_ok())  # plaintext after 'S' could be a MITM injection
    with pytest.raises(RemoteProtocolError):
        dec.read_ssl_answer()
    dec = BackendDecoder()
    dec.feed(b"N" + m.encode_auth_ok())  # after 'N' the session continues in plaintext
    assert dec.read_ssl_answer() == b"N"
    assert dec.next_message().raw == m.encode_auth_ok()


# --------------------------------------------------------------------------
# Fuzzing.


def _check_stream(dec, data: bytes, chunk: int) -> None:
    got = []
    try:
        for i in range(0, len(data), chunk):
            dec.feed(data[i:i + chunk])
            got += drain(dec)
    except ProtocolError:
        return
    consumed = b"".join(x.raw for x in got)
    assert data.startswith(consumed)
    assert len(consumed) + len(dec.buffer) == len(data)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300), chunk=st.integers(1, 50), limit=st.integers(4, 200))
def test_fuzz_backend(data: bytes, chunk: int, limit: int) -> None:
    _check_stream(BackendDecoder(max_message_size=limit), data, chunk)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300), chunk=st.integers(1, 50), startup=st.booleans())
def test_fuzz_frontend(data: bytes, chunk: int, startup: bool) -> None:
    _check_stream(FrontendDecoder(max_message_size=100, startup=startup), data, chunk)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=60))
def test_fuzz_ssl_answer(data: bytes) -> None:
    dec = BackendDecoder(max_message_size=100)
    dec.feed(data)
    try:
        dec.read_ssl_answer()
        drain(dec)
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(
    bodies=st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=20),
    cuts=st.lists(st.integers(0, 2000), max_size=10),
)
def test_fuzz_valid_streams_any_split(bodies, cuts) -> None:
    stream = b"".join(m.encode_message(t, b) for t, b in bodies)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    dec = BackendDecoder()
    got = []
    for a, b in zip(points, points[1:], strict=False):
        dec.feed(stream[a:b])
        got += drain(dec)
    assert [(x.type, x.body) for x in got] == [(t, b) for t, b in bodies]
    assert len(dec.buffer) == 0


PARSERS = [
    m.parse_query, m.parse_parse, m.parse_bind, m.parse_execute, m.parse_describe,
    m.parse_password, m.parse_sasl_initial_response, m.parse_sasl_response,
    m.parse_command_complete, m.parse_error_fields, m.parse_parameter_status,
    m.parse_backend_key_data, m.parse_authentication, m.parse_ready_for_query,
    m.parse_notification, m.parse_negotiate_protocol_version,
]


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=80), which=st.integers(0, len(PARSERS) - 1))
def test_fuzz_parsers_raise_only_protocol_errors(body: bytes, which: int) -> None:
    msg = m.Message(ord("x"), m.encode_message("x", body))
    try:
        PARSERS[which](msg)
    except ProtocolError:
        pass
