"""MongoDecoder on captured driver traffic (tests/data/mongo, see capture.py) and literal bytes.

Every capture is framed whole, one byte at a time and followed by trailing
bytes (which must stay buffered); the concatenated ``raw`` of the messages
must equal the input and ``consumed_since_mark`` must cover exactly the
framed messages.  Size limits are enforced on the header alone, garbage is
refused with a client hint, and hypothesis checks that arbitrary input raises
nothing but ProtocolError subclasses.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dbproxy.errors import FrameTooLarge, ProtocolError, RemoteProtocolError
from dbproxy.sansio import NEED_DATA
from dbproxy.engines.mongo import protocol as wire
from dbproxy.engines.mongo.codec import MongoDecoder

DATA = Path(__file__).resolve().parents[2] / "data" / "mongo"
CAPTURES = sorted(p.name for p in DATA.glob("*.bin"))


def load(name: str) -> bytes:
    return (DATA / name).read_bytes()


def drain(dec: MongoDecoder) -> list[wire.WireMessage]:
    out = []
    while (msg := dec.next_message()) is not NEED_DATA:
        out.append(msg)
    return out


def test_captures_present():
    # One of each kind the brief asks for; a missing capture must fail, not skip.
    assert {
        "op_query_ismaster_node.bin",
        "op_reply_ismaster_mockupdb.bin",
        "op_msg_hello_pymongo.bin",
        "op_msg_insert_docseq_pymongo.bin",
        "op_msg_reply_insert_mockupdb.bin",
        "op_compressed_snappy_pymongo.bin",
        "op_compressed_zlib_pymongo.bin",
        "op_compressed_zstd_pymongo.bin",
    } <= set(CAPTURES)


@pytest.mark.parametrize("name", CAPTURES)
def test_whole(name):
    data = load(name)
    dec = MongoDecoder()
    dec.feed(data)
    dec.buffer.mark()
    msgs = drain(dec)
    assert len(msgs) == 1
    msg = msgs[0]
    assert msg.raw == data
    assert msg.length == len(data)
    assert (msg.length, msg.request_id, msg.response_to, msg.op_code) == struct.unpack_from("<iiii", data)
    assert dec.buffer.consumed_since_mark() == data
    assert len(dec.buffer) == 0


@pytest.mark.parametrize("name", CAPTURES)
def test_byte_by_byte(name):
    data = load(name)
    dec = MongoDecoder()
    msgs = []
    for i in range(len(data)):
        dec.feed(data[i:i + 1])
        got = drain(dec)
        if i < len(data) - 1:
            assert got == [], f"message complete after {i + 1} of {len(data)} bytes"
        msgs += got
    assert [m.raw for m in msgs] == [data]


@pytest.mark.parametrize("name", CAPTURES)
def test_trailing_bytes_stay_buffered(name):
    data = load(name)
    trailing = data[:11]  # a partial header of the next message
    dec = MongoDecoder()
    dec.feed(data + trailing)
    dec.buffer.mark()
    assert [m.raw for m in drain(dec)] == [data]
    assert dec.buffer.consumed_since_mark() == data
    assert len(dec.buffer) == len(trailing)
    dec.feed(data[11:])
    assert [m.raw for m in drain(dec)] == [data]


def test_stream_of_all_captures_in_odd_chunks():
    stream = b"".join(load(n) for n in CAPTURES)
    dec = MongoDecoder()
    msgs = []
    for start in range(0, len(stream), 7):
        dec.feed(stream[start:start + 7])
        dec.buffer.mark()
        msgs += drain(dec)
        dec.buffer.compact()
    assert b"".join(m.raw for m in msgs) == stream
    assert [m.op_code for m in msgs] == [wire.WireMessage.from_bytes(load(n)).op_code for n in CAPTURES]


def test_compressed_is_not_decompressed_by_the_decoder():
    data = load("op_compressed_zstd_pymongo.bin")
    dec = MongoDecoder()
    dec.feed(data)
    (msg,) = drain(dec)
    assert msg.op_code == wire.OP_COMPRESSED
    assert msg.effective_op_code == wire.OP_MSG
    assert msg.raw == data


def header(length: int, op_code: int = wire.OP_MSG, request_id: int = 1, response_to: int = 0) -> bytes:
    return struct.pack("<iiii", length, request_id, response_to, op_code)


def test_oversize_refused_on_the_header_alone():
    dec = MongoDecoder(max_message_size=1000)
    dec.feed(header(1001))
    with pytest.raises(FrameTooLarge) as exc:
        dec.next_message()
    assert exc.value.size == 1001 and exc.value.limit == 1000
    assert "1001" in exc.value.client_hint


def test_default_limit_is_48mb():
    dec = MongoDecoder()
    dec.feed(header(48_000_000, wire.OP_MSG))
    assert dec.next_message() is NEED_DATA  # exactly the limit is allowed
    dec = MongoDecoder()
    dec.feed(header(48_000_001, wire.OP_MSG))
    with pytest.raises(FrameTooLarge):
        dec.next_message()


def test_exact_limit_message_is_framed():
    body = b"\x00\x00\x00\x00\x00" + b"\x05\x00\x00\x00\x00"
    data = header(16 + len(body)) + body
    dec = MongoDecoder(max_message_size=len(data))
    dec.feed(data)
    assert drain(dec)[0].raw == data


@pytest.mark.parametrize("length", [0, 15, -1, -2**31])
def test_length_below_header_is_garbage_after_four_bytes(length):
    dec = MongoDecoder()
    dec.feed(struct.pack("<i", length))
    with pytest.raises(RemoteProtocolError) as exc:
        dec.next_message()
    assert not isinstance(exc.value, FrameTooLarge)
    assert "MongoDB" in exc.value.client_hint


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        bytes.fromhex("160301020001000200030323") + b"\x00" * 8,  # TLS ClientHello
        b"\x00\x00\x00\x08\x04\xd2\x16\x2f" + b"\x00" * 8,  # Postgres SSLRequest
    ],
)
def test_other_protocols_are_refused_with_a_hint(garbage):
    dec = MongoDecoder()
    dec.feed(garbage)
    with pytest.raises(RemoteProtocolError) as exc:
        dec.next_message()
    assert "MongoDB" in exc.value.client_hint


def test_unknown_opcode_can_be_forwarded_opaque():
    data = header(20, op_code=4242) + b"abcd"
    dec = MongoDecoder(allow_unknown_opcodes=True)
    dec.feed(data)
    (msg,) = drain(dec)
    assert msg.op_code == 4242 and msg.raw == data


def test_legacy_opcodes_are_framed_opaque():
    data = header(24, op_code=wire.OP_GET_MORE) + b"\x00" * 8
    dec = MongoDecoder()
    dec.feed(data)
    (msg,) = drain(dec)
    assert msg.op_code == wire.OP_GET_MORE and msg.raw == data


def test_checksum_verified_by_the_decoder():
    data = wire.encode_op_msg({"ping": 1, "$db": "admin"}, request_id=5, checksum=True)
    dec = MongoDecoder()
    dec.feed(data)
    assert drain(dec)[0].raw == data

    bad = bytearray(data)
    bad[30] ^= 0x01
    dec = MongoDecoder()
    dec.feed(bytes(bad))
    with pytest.raises(RemoteProtocolError) as exc:
        dec.next_message()
    assert "checksum" in exc.value.client_hint

    assert dec.buffer.position == 0  # the refused message was not consumed

    dec = MongoDecoder(verify_checksums=False)
    dec.feed(bytes(bad))
    assert drain(dec)[0].raw == bytes(bad)


def test_checksummed_messages_in_pieces_keep_the_buffer_growable():
    data = wire.encode_op_msg({"insert": "c", "$db": "d"}, sequences={"documents": [{"_id": 1}]}, checksum=True)
    dec = MongoDecoder()
    out = []
    for piece in (data + data[:10], data[10:], data):
        dec.feed(piece)
        out += drain(dec)
    assert [m.raw for m in out] == [data, data, data]


def test_buffer_is_not_pinned_between_feeds():
    # peek() views must be released so a later feed can grow the bytearray.
    data = load("op_msg_find_pymongo.bin")
    dec = MongoDecoder()
    dec.feed(data[:20])
    assert dec.next_message() is NEED_DATA
    dec.feed(data[20:])
    assert drain(dec)[0].raw == data


# --- fuzzing ------------------------------------------------------------------


def _exercise(msg: wire.WireMessage) -> None:
    """Everything a stage might call on a framed message."""
    wire.inspect_command(msg, max_message_size=1_000_000)
    inner = wire.decompress(msg, max_message_size=1_000_000)
    if inner.op_code == wire.OP_MSG:
        op = wire.parse_op_msg(inner)
        op.sequences
        wire.op_msg_body_raw(inner)
    elif inner.op_code == wire.OP_QUERY:
        wire.parse_op_query(inner).command()
    elif inner.op_code == wire.OP_REPLY:
        wire.parse_op_reply(inner).documents


def _feed_all(data: bytes) -> None:
    dec = MongoDecoder(max_message_size=1_000_000)
    dec.feed(data)
    try:
        while (msg := dec.next_message()) is not NEED_DATA:
            try:
                _exercise(msg)
            except ProtocolError:
                pass
    except ProtocolError:
        pass


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data):
    _feed_all(data)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    op_code=st.sampled_from([wire.OP_MSG, wire.OP_QUERY, wire.OP_REPLY, wire.OP_COMPRESSED]),
    body=st.binary(max_size=200),
    extra=st.binary(max_size=20),
)
def test_fuzz_valid_header_random_body(op_code, body, extra):
    _feed_all(header(16 + len(body), op_code) + body + extra)


@settings(max_examples=400, deadline=None)
@given(
    name=st.sampled_from(CAPTURES),
    data=st.data(),
)
def test_fuzz_mutated_captures(name, data):
    raw = bytearray(load(name))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(4, len(raw) - 1))  # keep the length so the body is reached
        raw[i] = data.draw(st.integers(0, 255))
    _feed_all(bytes(raw))
