"""``render.summarize_small_reply``: a small reply's summary from one full decode equals the raw path's.

The audit's reply fields (``ReplyAudit``) come from ``summarize_reply`` over
the reply's raw top level (``reply_document``); small OP_MSG replies take one
``bson.decode`` instead.  For generated replies — cursors with the batch
first or not, documents or scalars in it, Int64 ids, write errors, write
concern errors, killed cursors, errors, a checksum, a nested document whose
size lies — the two must agree exactly (values and types), or the small path
must decline (None) and leave the reply to the raw path.
"""

from __future__ import annotations

import struct

import bson
import crc32c
from bson.int64 import Int64
from hypothesis import given, settings
from hypothesis import strategies as st

from dbproxy.engines.mongo import protocol as wire
from dbproxy.engines.mongo.legacy import encode_op_reply
from dbproxy.engines.mongo.stages.render import reply_document, summarize_reply, summarize_small_reply


def op_msg_reply(body: bytes, *, checksum: bool = False, response_to: int = 7) -> wire.WireMessage:
    flags = wire.CHECKSUM_PRESENT if checksum else 0
    payload = struct.pack("<I", flags) + b"\x00" + body
    length = 16 + len(payload) + (4 if checksum else 0)
    raw = struct.pack("<iiii", length, 99, response_to, wire.OP_MSG) + payload
    if checksum:
        raw += struct.pack("<I", crc32c.crc32c(raw))
    return wire.WireMessage(length, 99, response_to, wire.OP_MSG, raw)


def both(msg: wire.WireMessage) -> tuple[dict | None, dict]:
    small = summarize_small_reply(msg)
    return small, summarize_reply(*reply_document(msg))


def typed(summary: dict) -> list:
    return [(k, v, type(v)) for k, v in summary.items()]


SCALAR = st.one_of(st.integers(-(2**31), 2**31 - 1), st.integers(2**31, 2**62).map(Int64), st.floats(allow_nan=False),
                   st.text(max_size=8), st.booleans(), st.none())
DOC = st.dictionaries(st.sampled_from(["_id", "v", "k"]), SCALAR, max_size=3)


@st.composite
def replies(draw) -> dict:
    doc: dict = {}
    if draw(st.booleans()):
        batch = draw(st.lists(st.one_of(DOC, SCALAR) if draw(st.booleans()) else DOC, max_size=5))
        key = draw(st.sampled_from(["firstBatch", "nextBatch"]))
        cursor_items = [(key, batch), ("id", draw(st.sampled_from([Int64(0), Int64(2**40), 5]))), ("ns", "db.c")]
        if draw(st.booleans()):
            cursor_items.reverse()  # batch not first: the raw path decodes the top level
        doc["cursor"] = dict(cursor_items)
    if draw(st.booleans()):
        doc["n"] = draw(st.sampled_from([1, Int64(3), 2.0, "x"]))
    if draw(st.booleans()):
        doc["nModified"] = draw(st.sampled_from([0, 1]))
    if draw(st.booleans()):
        doc["writeErrors"] = [{"index": 0, "code": 11000, "errmsg": "E11000 duplicate key"}]
    if draw(st.booleans()):
        doc["writeConcernError"] = {"code": 64, "errmsg": "waiting for replication timed out"}
    if draw(st.booleans()):
        doc["cursorsKilled"] = [Int64(5), 6, "x"]
    if draw(st.booleans()):
        doc["upserted"] = [{"index": 0, "_id": 1}]
    ok = draw(st.sampled_from([1.0, 0.0, 1, None]))
    if ok is not None:
        doc["ok"] = ok
    if not ok:
        doc.update({"errmsg": "bad thing", "code": 2, "codeName": "BadValue"})
    return doc


@settings(max_examples=300, deadline=None)
@given(replies(), st.booleans())
def test_small_summary_is_the_raw_paths(doc, checksum):
    small, general = both(op_msg_reply(bson.encode(doc), checksum=checksum))
    assert small is not None
    assert typed(small) == typed(general)


def test_everyday_replies_take_the_small_path():
    find = {"cursor": {"firstBatch": [{"_id": 1, "v": "x" * 40}], "id": Int64(0), "ns": "bench.kv"}, "ok": 1.0}
    small, general = both(op_msg_reply(bson.encode(find)))
    assert small == general == {"ok": 1.0, "cursor_id": 0, "batch_size": 1, "ns": "bench.kv"}
    small, general = both(op_msg_reply(bson.encode({"n": 1, "ok": 1.0})))
    assert small == general == {"ok": 1.0, "n": 1}


def test_what_the_full_decode_refuses_is_left_to_the_raw_path():
    """A nested document whose size lies: the small path declines; the raw path decides, as before
    (``ReplyAudit`` records what it makes of it, or "unreadable reply")."""
    good = bson.encode({"cursor": {"firstBatch": [{"_id": 1}], "id": Int64(0), "ns": "db.c"}, "ok": 1.0})
    inner = good.index(b"_id") - 5  # the batch's first document: its int32 size
    broken = good[:inner] + struct.pack("<i", 200) + good[inner + 4:]
    msg = op_msg_reply(broken)
    assert summarize_small_reply(msg) is None


def test_large_and_other_replies_are_left_to_the_raw_path():
    big = {"cursor": {"firstBatch": [{"_id": i, "v": "x" * 100} for i in range(400)], "id": Int64(0), "ns": "db.c"},
           "ok": 1.0}
    assert summarize_small_reply(op_msg_reply(bson.encode(big))) is None
    reply = encode_op_reply([{"ok": 1.0}], 5, 3)
    assert summarize_small_reply(wire.WireMessage(*wire.HEADER.unpack_from(reply), reply)) is None
