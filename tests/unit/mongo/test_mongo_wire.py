"""Message parsing and encoding on captured driver bytes, cross-checked against pymongo.

Captures (tests/data/mongo, see capture.py): pymongo's OP_MSG requests
(hello, an insert with a kind-1 document sequence, a find), mockupdb's OP_MSG
and OP_REPLY answers, the Node.js driver's legacy isMaster over OP_QUERY, and
pymongo's OP_COMPRESSED inserts for snappy, zlib and zstd.  Each is parsed
field by field and re-encoded byte for byte; pymongo's own encoder/decoder
and ``compression_support.decompress`` serve as independent references.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import bson
import crc32c
import pytest
import snappy
import zstandard
from bson.codec_options import DEFAULT_CODEC_OPTIONS
from pymongo import compression_support, message as pymongo_message

from dbproxy.errors import FrameTooLarge, LocalProtocolError, RemoteProtocolError
from dbproxy.engines.mongo import protocol as wire

DATA = Path(__file__).resolve().parents[2] / "data" / "mongo"


def load(name: str) -> wire.WireMessage:
    return wire.WireMessage.from_bytes((DATA / name).read_bytes())


def rebuild(msg: wire.WireMessage, payload: bytes) -> wire.WireMessage:
    """Same header fields, new body (length fixed up)."""
    raw = struct.pack("<iiii", 16 + len(payload), msg.request_id, msg.response_to, msg.op_code) + payload
    return wire.WireMessage.from_bytes(raw)


# --- OP_MSG --------------------------------------------------------------------


def test_op_msg_insert_with_document_sequence():
    msg = load("op_msg_insert_docseq_pymongo.bin")
    op = wire.parse_op_msg(msg)
    assert op.flags == 0 and op.checksum is None
    assert not op.more_to_come and not op.exhaust_allowed
    assert dict(op.body) == {"insert": "orders", "ordered": True, "$db": "shop"}
    assert [ident for ident, _ in op.sequences_raw] == ["documents"]
    docs = op.sequences["documents"]
    assert [bson.decode(d.raw) for d in docs] == [
        {"_id": 1, "item": "pen", "qty": 3},
        {"_id": 2, "item": "ink", "qty": 1},
    ]
    assert wire.op_msg_body_raw(msg) == op.body_raw
    assert wire.command_name(op.body) == op.command_name() == "insert"
    assert wire.database_name(op.body) == op.database() == "shop"
    assert wire.collection_name(op.body) == op.collection() == "orders"


def test_op_msg_hello_and_find():
    hello = wire.parse_op_msg(load("op_msg_hello_pymongo.bin"))
    assert hello.command_name().lower() in ("hello", "ismaster")
    assert hello.database() == "admin"
    assert hello.collection() is None  # the value of "ismaster" is 1, not a name
    assert hello.body["client"]["driver"]["name"].startswith("PyMongo")
    assert hello.sequences == {}

    find = load("op_msg_find_pymongo.bin")
    body = wire.op_msg_body_raw(find)
    assert wire.command_name(body) == "find"
    assert wire.collection_name(body) == "orders"
    assert wire.database_name(body) == "shop"
    assert wire.decode_document(body)["filter"] == {"item": "pen"}


def test_op_msg_reply_from_mockupdb():
    find = load("op_msg_find_pymongo.bin")
    reply = load("op_msg_reply_find_mockupdb.bin")
    assert reply.response_to == find.request_id
    doc = wire.decode_document(wire.parse_op_msg(reply).body)
    assert doc["ok"] == 1
    assert doc["cursor"]["firstBatch"] == [{"_id": 1, "item": "pen", "qty": 3}]


@pytest.mark.parametrize(
    "name",
    [
        "op_msg_insert_docseq_pymongo.bin",
        "op_msg_hello_pymongo.bin",
        "op_msg_find_pymongo.bin",
        "op_msg_reply_insert_mockupdb.bin",
        "op_msg_reply_find_mockupdb.bin",
    ],
)
def test_op_msg_encode_round_trip(name):
    msg = load(name)
    op = wire.parse_op_msg(msg)
    again = wire.encode_op_msg(
        op.body_raw,
        request_id=msg.request_id,
        response_to=msg.response_to,
        flags=op.flags,
        sequences={ident: [d.raw for d in docs] for ident, docs in op.sequences.items()},
    )
    assert again == msg.raw


def test_encode_op_msg_matches_pymongo_builder():
    cmd = {"insert": "orders", "ordered": True, "$db": "shop"}
    docs = [{"_id": 1, "a": "x"}, {"_id": 2, "b": [1, 2]}]
    ours = wire.encode_op_msg(cmd, request_id=9, sequences={"documents": docs})
    theirs, _, _ = pymongo_message._op_msg_no_header(0, cmd, "documents", docs, DEFAULT_CODEC_OPTIONS)
    assert ours[16:] == theirs
    assert struct.unpack_from("<iiii", ours) == (16 + len(theirs), 9, 0, wire.OP_MSG)


def test_pymongo_reads_our_reply():
    data = wire.encode_op_msg({"ok": 1.0, "n": 3}, request_id=7, response_to=42)
    msg = wire.WireMessage.from_bytes(data)
    assert (msg.request_id, msg.response_to) == (7, 42)
    reply = pymongo_message._OpMsg.unpack(msg.body)
    assert reply.command_response(DEFAULT_CODEC_OPTIONS) == {"ok": 1.0, "n": 3}


def test_sequence_before_body_is_accepted():
    body = bson.encode({"insert": "c", "$db": "d"})
    doc = bson.encode({"_id": 1})
    seq = b"\x01" + struct.pack("<i", 4 + len(b"documents\x00") + len(doc)) + b"documents\x00" + doc
    msg = wire.WireMessage.from_bytes(
        struct.pack("<iiii", 16 + 4 + len(seq) + 1 + len(body), 1, 0, wire.OP_MSG)
        + struct.pack("<I", 0) + seq + b"\x00" + body
    )
    assert wire.op_msg_body_raw(msg) == body
    op = wire.parse_op_msg(msg)
    assert op.body_raw == body
    assert [d.raw for d in op.sequences["documents"]] == [doc]


def test_empty_document_sequence():
    data = wire.encode_op_msg({"insert": "c", "$db": "d"}, request_id=1, sequences={"documents": []})
    assert wire.parse_op_msg(data).sequences == {"documents": []}


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda flags, body, seq: (flags, body + body, b""), "more than one kind-0"),
        (lambda flags, body, seq: (flags, b"", seq), "no kind-0"),
        (lambda flags, body, seq: (flags, body + b"\x02" + body[1:], b""), "unknown payload type"),
        (lambda flags, body, seq: (flags, body, seq + seq), "two document sequences"),
        (lambda flags, body, seq: (flags | (1 << 2), body, b""), "required flag"),
        (lambda flags, body, seq: (flags, body[:-3], b""), "does not fit"),
        (lambda flags, body, seq: (flags, body, seq[:-2]), "document sequence"),
    ],
)
def test_malformed_op_msg(mutate, fragment):
    body = b"\x00" + bson.encode({"insert": "c", "$db": "d"})
    doc = bson.encode({"_id": 1})
    seq = b"\x01" + struct.pack("<i", 4 + 10 + len(doc)) + b"documents\x00" + doc
    flags, b, s = mutate(0, body, seq)
    payload = struct.pack("<I", flags) + b + s
    msg = wire.WireMessage.from_bytes(struct.pack("<iiii", 16 + len(payload), 1, 0, wire.OP_MSG) + payload)
    with pytest.raises(RemoteProtocolError) as exc:
        op = wire.parse_op_msg(msg)
        op.sequences  # a short sequence is found when its documents are split
    assert fragment in str(exc.value)


def test_optional_flag_bits_are_ignored_and_known_ones_reported():
    flags = wire.MORE_TO_COME | wire.EXHAUST_ALLOWED | (1 << 20)
    op = wire.parse_op_msg(wire.encode_op_msg({"getMore": 1, "$db": "d"}, request_id=1, flags=flags))
    assert op.more_to_come and op.exhaust_allowed
    msg = wire.WireMessage.from_bytes(wire.encode_op_msg({"ping": 1}, flags=wire.MORE_TO_COME))
    assert msg.more_to_come


def test_encoder_refuses_undefined_required_bit():
    with pytest.raises(LocalProtocolError):
        wire.encode_op_msg({"ping": 1}, flags=1 << 5)


# --- checksum -------------------------------------------------------------------


def test_crc32c_library_vector():
    assert crc32c.crc32c(b"123456789") == 0xE3069283  # RFC 3720 B.4 check value


def test_checksum_computed_and_verified():
    data = wire.encode_op_msg({"ping": 1, "$db": "admin"}, request_id=3, response_to=0, checksum=True)
    flags = struct.unpack_from("<I", data, 16)[0]
    assert flags & wire.CHECKSUM_PRESENT
    assert struct.unpack_from("<I", data, len(data) - 4)[0] == crc32c.crc32c(data[:-4])
    op = wire.parse_op_msg(data)
    assert op.checksum == crc32c.crc32c(data[:-4])
    assert dict(op.body) == {"ping": 1, "$db": "admin"}
    assert wire.op_msg_body_raw(data) == op.body_raw
    # flags with the bit set imply checksum=True
    assert wire.encode_op_msg({"ping": 1, "$db": "admin"}, request_id=3, flags=wire.CHECKSUM_PRESENT) == data


@pytest.mark.parametrize("offset", [20, 25, -4, -1])
def test_flipped_byte_fails_the_checksum(offset):
    data = bytearray(wire.encode_op_msg({"ping": 1, "$db": "admin"}, request_id=3, checksum=True))
    data[offset] ^= 0x40
    with pytest.raises(RemoteProtocolError) as exc:
        wire.parse_op_msg(bytes(data))
    assert "checksum" in exc.value.client_hint


def test_checksum_after_document_sequence():
    data = wire.encode_op_msg(
        {"insert": "c", "$db": "d"}, request_id=1, sequences={"documents": [{"_id": 1}, {"_id": 2}]}, checksum=True
    )
    op = wire.parse_op_msg(data)
    assert [bson.decode(d.raw) for d in op.sequences["documents"]] == [{"_id": 1}, {"_id": 2}]


# --- OP_QUERY / OP_REPLY -------------------------------------------------------


def test_op_query_ismaster_from_node_driver():
    msg = load("op_query_ismaster_node.bin")
    q = wire.parse_op_query(msg)
    assert q.full_collection_name == "admin.$cmd"
    assert q.is_command and q.database == "admin"
    assert q.number_to_skip == 0 and q.number_to_return == -1
    assert q.fields_raw is None
    cmd = q.command()
    assert wire.command_name(cmd).lower() in ("ismaster", "hello")
    assert cmd["client"]["driver"]["name"].startswith("nodejs")
    again = wire.encode_op_query(
        q.full_collection_name,
        q.query_raw,
        request_id=msg.request_id,
        flags=q.flags,
        number_to_skip=q.number_to_skip,
        number_to_return=q.number_to_return,
    )
    assert again == msg.raw


def test_op_query_wrapped_command_and_fields():
    inner = {"isMaster": 1}
    data = wire.encode_op_query(
        "admin.$cmd", {"$query": inner, "$readPreference": {"mode": "primary"}}, request_id=1, fields={"a": 1}
    )
    q = wire.parse_op_query(data)
    assert dict(q.command()) == inner
    assert dict(q.fields) == {"a": 1}
    cmd = wire.inspect_command(wire.WireMessage.from_bytes(data))
    assert (cmd.name, cmd.database, cmd.op_code) == ("isMaster", "admin", wire.OP_QUERY)


def test_op_query_legacy_find_is_reported_as_find():
    data = wire.encode_op_query("shop.orders", {"item": "pen"}, request_id=1, number_to_return=0)
    cmd = wire.inspect_command(wire.WireMessage.from_bytes(data))
    assert (cmd.name, cmd.database, cmd.collection) == ("find", "shop", "orders")


def test_op_reply_from_mockupdb():
    req = load("op_query_ismaster_node.bin")
    msg = load("op_reply_ismaster_mockupdb.bin")
    assert msg.response_to == req.request_id
    r = wire.parse_op_reply(msg)
    assert (r.response_flags, r.cursor_id, r.starting_from, r.number_returned) == (0, 0, 0, 1)
    (doc,) = r.documents
    assert doc["maxWireVersion"] == 21 and doc["ok"] == 1
    again = wire.encode_op_reply(
        [d.raw for d in r.documents], msg.request_id, msg.response_to,
        response_flags=r.response_flags, cursor_id=r.cursor_id, starting_from=r.starting_from,
    )
    assert again == msg.raw


def test_malformed_legacy_messages():
    q = load("op_query_ismaster_node.bin")
    with pytest.raises(RemoteProtocolError):
        wire.parse_op_query(rebuild(q, bytes(q.body)[:-1]))  # truncated query doc
    with pytest.raises(RemoteProtocolError):
        wire.parse_op_query(rebuild(q, bytes(q.body) + b"\x01"))  # trailing junk
    with pytest.raises(RemoteProtocolError):
        wire.parse_op_query(rebuild(q, b"\x00\x00\x00\x00admin.$cmd"))  # no NUL
    r = load("op_reply_ismaster_mockupdb.bin")
    with pytest.raises(RemoteProtocolError):
        wire.parse_op_reply(rebuild(r, bytes(r.body)[:-1])).documents
    with pytest.raises(RemoteProtocolError):
        wire.parse_op_reply(rebuild(r, b"\x00" * 10))
    with pytest.raises(RemoteProtocolError):
        wire.parse_op_query(load("op_msg_find_pymongo.bin"))


# --- commands --------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [
        ("op_msg_insert_docseq_pymongo.bin", ("insert", "shop", "orders", wire.OP_MSG, False)),
        ("op_msg_find_pymongo.bin", ("find", "shop", "orders", wire.OP_MSG, False)),
        ("op_query_ismaster_node.bin", ("ismaster", "admin", None, wire.OP_QUERY, False)),
        ("op_compressed_snappy_pymongo.bin", ("insert", "shop", "orders", wire.OP_MSG, True)),
        ("op_compressed_zlib_pymongo.bin", ("insert", "shop", "orders", wire.OP_MSG, True)),
        ("op_compressed_zstd_pymongo.bin", ("insert", "shop", "orders", wire.OP_MSG, True)),
    ],
)
def test_inspect_command(name, expected):
    msg = load(name)
    cmd = wire.inspect_command(msg)
    assert (cmd.name.lower() if cmd.name.lower() == "ismaster" else cmd.name, cmd.database, cmd.collection,
            cmd.op_code, cmd.compressed) == expected
    assert cmd.request_id == msg.request_id


def test_inspect_command_sequences_and_non_commands():
    cmd = wire.inspect_command(load("op_compressed_zlib_pymongo.bin"))
    assert [bson.decode(d.raw)["_id"] for d in cmd.sequences["documents"]] == [7]
    assert wire.inspect_command(load("op_reply_ismaster_mockupdb.bin")) is None


def test_get_more_collection():
    body = {"getMore": bson.Int64(12345), "collection": "orders", "$db": "shop"}
    assert wire.collection_name(body) == "orders"
    assert wire.collection_name({"aggregate": 1, "$db": "shop"}) is None
    assert wire.command_name(bson.encode({"listDatabases": 1})) == "listDatabases"


def test_invalid_bson_is_a_protocol_error():
    good = bson.encode({"find": "c", "$db": "d"})
    bad = good[:4] + b"\x42" + good[5:]  # undefined element type 0x42
    with pytest.raises(RemoteProtocolError):
        wire.command_name(bad)
    with pytest.raises(RemoteProtocolError):
        wire.decode_document(bad)
    with pytest.raises(RemoteProtocolError):
        wire.command_name({})
    op = wire.parse_op_msg(wire.encode_op_msg(bad, request_id=1))
    with pytest.raises(RemoteProtocolError):
        op.body


# --- error replies ---------------------------------------------------------------


def test_error_reply_op_msg():
    data = wire.error_reply(77, 13, "not authorized on shop to execute command", request_id=5)
    msg = wire.WireMessage.from_bytes(data)
    assert (msg.op_code, msg.request_id, msg.response_to) == (wire.OP_MSG, 5, 77)
    doc = pymongo_message._OpMsg.unpack(msg.body).command_response(DEFAULT_CODEC_OPTIONS)
    assert doc == {"ok": 0.0, "errmsg": "not authorized on shop to execute command", "code": 13,
                   "codeName": "Unauthorized"}
    assert isinstance(doc["ok"], float)


def test_error_reply_op_reply_and_custom_code_name():
    data = wire.error_reply(3, 18, "auth failed", op_msg=False, code_name="AuthenticationFailed")
    msg = wire.WireMessage.from_bytes(data)
    assert (msg.op_code, msg.response_to) == (wire.OP_REPLY, 3)
    r = wire.parse_op_reply(msg)
    assert r.number_returned == 1
    assert bson.decode(r.documents[0].raw) == {"ok": 0.0, "errmsg": "auth failed", "code": 18,
                                               "codeName": "AuthenticationFailed"}


@pytest.mark.parametrize(
    "name, op_code",
    [
        ("op_query_ismaster_node.bin", wire.OP_REPLY),
        ("op_msg_find_pymongo.bin", wire.OP_MSG),
        ("op_compressed_snappy_pymongo.bin", wire.OP_MSG),
    ],
)
def test_error_reply_for_matches_request_style(name, op_code):
    req = load(name)
    msg = wire.WireMessage.from_bytes(wire.error_reply_for(req, 2, "bad value"))
    assert msg.op_code == op_code and msg.response_to == req.request_id


def test_request_ids_are_fresh_positive_int32():
    ids = {wire.next_request_id() for _ in range(100)}
    assert len(ids) == 100 and all(0 <= i < 2**31 for i in ids)


# --- OP_COMPRESSED --------------------------------------------------------------

COMPRESSED = {
    "snappy": "op_compressed_snappy_pymongo.bin",
    "zlib": "op_compressed_zlib_pymongo.bin",
    "zstd": "op_compressed_zstd_pymongo.bin",
}


@pytest.mark.parametrize("name", sorted(COMPRESSED))
def test_decompress_capture(name):
    msg = load(COMPRESSED[name])
    hdr = wire.compressed_header(msg)
    assert hdr.compressor_id == wire.COMPRESSOR_IDS[name]
    assert hdr.original_op_code == wire.OP_MSG
    inner = wire.decompress(msg)
    assert inner.op_code == wire.OP_MSG
    assert inner.length == len(inner.raw) == hdr.uncompressed_size + 16
    assert (inner.request_id, inner.response_to) == (msg.request_id, msg.response_to)
    assert struct.unpack_from("<iiii", inner.raw) == (inner.length, msg.request_id, msg.response_to, wire.OP_MSG)
    # pymongo's own decompressor agrees.
    data = memoryview(msg.raw)[25:]
    assert bytes(inner.body) == compression_support.decompress(data, hdr.compressor_id, 48_000_000)
    op = wire.parse_op_msg(inner)
    assert op.command_name() == "insert"
    assert bson.decode(op.sequences["documents"][0].raw) == {"_id": 7, "item": "pen", "note": "x" * 200}


@pytest.mark.parametrize("name", sorted(COMPRESSED))
def test_recompress_round_trip(name):
    msg = load(COMPRESSED[name])
    inner = wire.decompress(msg)
    again = wire.compress(inner, wire.COMPRESSOR_IDS[name])
    assert wire.decompress(wire.WireMessage.from_bytes(again)) == inner
    assert again[:16 + 9][4:12] == msg.raw[4:12]  # requestID / responseTo kept
    if name in ("snappy", "zlib"):  # same library, same default level as pymongo: same bytes
        assert again == msg.raw


@pytest.mark.parametrize("cid", [0, 1, 2, 3])
def test_compress_is_read_by_pymongo(cid):
    raw = wire.encode_op_msg({"find": "orders", "filter": {"a": 1}, "$db": "shop"}, request_id=11)
    out = wire.WireMessage.from_bytes(wire.compress(raw, cid))
    hdr = wire.compressed_header(out)
    assert (hdr.original_op_code, hdr.uncompressed_size, hdr.compressor_id) == (wire.OP_MSG, len(raw) - 16, cid)
    assert out.effective_op_code == wire.OP_MSG and out.is_compressed
    if cid:
        assert compression_support.decompress(memoryview(out.raw)[25:], cid, 48_000_000) == raw[16:]
    assert wire.decompress(out).raw == raw


def compressed(payload: bytes, size: int, cid: int, original: int = wire.OP_MSG) -> wire.WireMessage:
    raw = struct.pack("<iiiiiiB", 25 + len(payload), 1, 0, wire.OP_COMPRESSED, original, size, cid) + payload
    return wire.WireMessage.from_bytes(raw)


def test_announced_size_checked_before_decompressing():
    # Garbage data: a FrameTooLarge (not a decompression error) proves no decompressor ran.
    with pytest.raises(FrameTooLarge):
        wire.decompress(compressed(b"garbage", 2000, 2), max_message_size=1000)
    with pytest.raises(RemoteProtocolError):
        wire.decompress(compressed(b"", -5, 0))


@pytest.mark.parametrize(
    "payload, size, cid",
    [
        (zlib.compress(b"\x00" * 1_000_000), 1000, 2),  # zlib bomb: longer than announced
        (zlib.compress(b"\x00" * 100), 1000, 2),  # shorter than announced
        (zlib.compress(b"\x00" * 100)[:-3], 100, 2),  # truncated
        (b"not zlib", 10, 2),
        (snappy.compress(b"\x00" * 100_000), 1000, 1),  # snappy declares more than announced
        (b"\xff\xff\xff\xff\x0f", 1000, 1),
        (zstandard.ZstdCompressor().compress(b"\x00" * 100_000), 1000, 3),  # frame content size differs
        (zstandard.ZstdCompressor(write_content_size=False).compress(b"\x00" * 100_000), 1000, 3),
        (b"not zstd", 10, 3),
        (b"abc", 3, 9),  # unknown compressor
        (b"abc", 4, 0),  # noop with the wrong size
    ],
)
def test_bad_compressed_payloads(payload, size, cid):
    with pytest.raises(RemoteProtocolError):
        wire.decompress(compressed(payload, size, cid))


def test_nested_and_uncompressed():
    with pytest.raises(RemoteProtocolError):
        wire.decompress(compressed(b"abc", 3, 0, original=wire.OP_COMPRESSED))
    plain = load("op_msg_find_pymongo.bin")
    assert wire.decompress(plain) is plain
    with pytest.raises(LocalProtocolError):
        wire.compress(load("op_compressed_zlib_pymongo.bin"), 2)
    with pytest.raises(LocalProtocolError):
        wire.compress(plain, 42)


def test_uncompressible_commands_listed():
    assert {"hello", "isMaster", "saslStart", "saslContinue", "authenticate"} <= wire.UNCOMPRESSIBLE_COMMANDS


def test_wire_message_from_bytes_checks_length():
    with pytest.raises(RemoteProtocolError):
        wire.WireMessage.from_bytes(b"\x00" * 10)
    data = load("op_msg_find_pymongo.bin").raw
    with pytest.raises(RemoteProtocolError):
        wire.WireMessage.from_bytes(data + b"\x00")
