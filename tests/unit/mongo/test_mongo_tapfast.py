"""The worker's fast path for plain OP_MSG commands and replies (``engines.mongo.tapfast``) writes the observers' trail.

Two ``MongoTap``s are fed the same frames — one as the worker runs it
(``fast`` set), one with the fast path off (every frame through
``CommandAudit`` / ``InFlight`` / ``ReplyAudit``) — and their events and
counts must be equal, event for event (uid and time aside, ``query_uid`` as
the index of the event it names).  The frames are generated: finds, inserts
with zero to two document sequences (a duplicate name, a document whose size
lies), getMore / killCursors and the replies that open and close cursors,
authentication commands, a command holding a password, a large body,
checksums and moreToCome, bodies that do not decode, trailing sections of an
unknown kind; replies with cursors, counts, write errors, errors, a
moreToCome flag, or BSON that does not decode.  A test also checks that
plain frames do take the fast path, so the comparison is not one of the
slow path with itself.
"""

from __future__ import annotations

import struct

import bson
from bson.int64 import Int64
from hypothesis import given, settings
from hypothesis import strategies as st

from dbproxy.engines.mongo import protocol as wire
from dbproxy.engines.mongo.tap import MongoTap
from tests.unit.audit.fastpath import same_trail as compare, trail

TEMPLATE = {"sid": "s-1", "user": "alice", "db_protocol": "mongodb", "db_name": "d", "db_uri": "127.0.0.1:9"}
CLIENT, BACKEND = 0, 1


def run(steps: list[tuple[int, bytes]], *, fast: bool) -> tuple[list[dict], dict, int]:
    return trail(MongoTap, TEMPLATE, steps, fast=fast)


def same_trail(steps: list[tuple[int, bytes]]) -> int:
    """Both taps' trails, compared with their key order; returns the fast path's hits."""
    return compare(MongoTap, TEMPLATE, steps)


def op_msg(doc: dict | bytes, request_id: int, *, response_to: int = 0, flags: int = 0, sequences: dict | None = None,
           tail: bytes = b"") -> bytes:
    raw = wire.encode_op_msg(doc, request_id=request_id, response_to=response_to, flags=flags, sequences=sequences)
    if tail:  # extra section bytes (before a checksum there is none: flags 0 only)
        raw = struct.pack("<i", len(raw) + len(tail)) + raw[4:] + tail
    return raw


LSID = {"id": bson.Binary(bytes(range(16)), 4)}
CLUSTER_TIME = {"clusterTime": bson.Timestamp(1_700_000_000, 1), "signature": {"hash": b"\0" * 20, "keyId": Int64(0)}}


@st.composite
def commands(draw, request_id: int) -> tuple[bytes, str]:
    kind = draw(st.sampled_from(["find", "find", "insert", "insert", "getMore", "killCursors", "saslStart", "pwd",
                                 "big", "flags", "undecodable", "tail", "count"]))
    common = {"lsid": LSID, "$clusterTime": CLUSTER_TIME, "$db": draw(st.sampled_from(["d", "e"]))}
    if kind == "find":
        doc = {"find": "c", "filter": {"_id": draw(st.integers(0, 5))}, "limit": 1, "singleBatch": True, **common}
        return op_msg(doc, request_id), kind
    if kind == "insert":
        count = draw(st.integers(0, 2))
        names = draw(st.lists(st.sampled_from(["documents", "updates", "documents"]), min_size=count, max_size=count))
        sequences = {}
        raw = op_msg({"insert": "c", "ordered": True, **common}, request_id)
        for name in names:
            docs = b"".join(bson.encode({"_id": bson.ObjectId(), "k": i, "w": "x" * 20}) for i in range(draw(st.integers(0, 3))))
            if draw(st.integers(0, 7)) == 0:
                docs += struct.pack("<i", 90) + b"\x00"  # a document whose size lies
            ident = name.encode() + b"\x00"
            sequences[name] = True
            raw += b"\x01" + struct.pack("<i", 4 + len(ident) + len(docs)) + ident + docs
        return struct.pack("<i", len(raw)) + raw[4:], kind
    if kind == "getMore":
        return op_msg({"getMore": Int64(draw(st.sampled_from([77, 78]))), "collection": "c", **common}, request_id), kind
    if kind == "killCursors":
        return op_msg({"killCursors": "c", "cursors": [Int64(77)], **common}, request_id), kind
    if kind == "saslStart":
        return op_msg({"saslStart": 1, "mechanism": "SCRAM-SHA-256", "payload": b"n,,n=u,r=abc", **common}, request_id), kind
    if kind == "pwd":
        return op_msg({"createUser": "u", "pwd": "secret", "roles": [], **common}, request_id), kind
    if kind == "big":
        return op_msg({"find": "c", "filter": {"s": "y" * 20_000}, **common}, request_id), kind
    if kind == "flags":
        flags = draw(st.sampled_from([wire.CHECKSUM_PRESENT, wire.MORE_TO_COME]))
        return op_msg({"insert": "c", **common}, request_id, flags=flags, sequences={"documents": [{"a": 1}]}), kind
    if kind == "undecodable":
        body = bytearray(bson.encode({"find": "c", "filter": {"a": "bcd"}, "$db": "d"}))
        body[body.index(b"bcd")] = 0xFF  # not UTF-8
        return op_msg(bytes(body), request_id), kind
    if kind == "tail":
        return op_msg({"find": "c", **common}, request_id, tail=draw(st.sampled_from([b"\x02abc", b"\x00", b"\x01\x03\x00\x00\x00"]))), kind
    return op_msg({"count": draw(st.sampled_from(["c", 5])), "query": {}, **common}, request_id), kind


@st.composite
def replies(draw, response_to: int, request_id: int) -> bytes:
    kind = draw(st.sampled_from(["cursor", "cursor", "n", "error", "write_errors", "more", "undecodable", "big"]))
    if kind == "cursor":
        cursor_id = draw(st.sampled_from([Int64(0), Int64(77), Int64(78)]))
        batch = [{"_id": i, "v": "x" * 10} for i in range(draw(st.integers(0, 3)))]
        key = draw(st.sampled_from(["firstBatch", "nextBatch"]))
        doc = {"cursor": {key: batch, "id": cursor_id, "ns": "d.c"}, "ok": 1.0}
    elif kind == "n":
        doc = {"n": draw(st.integers(0, 3)), "nModified": 1, "ok": 1.0}
    elif kind == "error":
        doc = {"ok": 0.0, "errmsg": "no such command", "code": 59, "codeName": "CommandNotFound"}
    elif kind == "write_errors":
        doc = {"n": 0, "writeErrors": [{"index": 0, "code": 11000, "errmsg": "E11000 duplicate key"}], "ok": 1.0}
    elif kind == "more":
        return op_msg({"n": 1, "ok": 1.0}, request_id, response_to=response_to, flags=wire.MORE_TO_COME)
    elif kind == "undecodable":
        body = bytearray(bson.encode({"cursor": {"firstBatch": [{"s": "bcd"}], "id": Int64(0), "ns": "d.c"}, "ok": 1.0}))
        body[body.index(b"bcd")] = 0xFF
        return op_msg(bytes(body), request_id, response_to=response_to)
    else:
        doc = {"cursor": {"firstBatch": [{"_id": i, "v": "x" * 100} for i in range(300)], "id": Int64(77), "ns": "d.c"},
               "ok": 1.0}
    return op_msg(doc, request_id, response_to=response_to)


@st.composite
def sessions(draw) -> list[tuple[int, bytes]]:
    steps = []
    for n in range(draw(st.integers(1, 8))):
        request_id = 10 + n
        raw, _kind = draw(commands(request_id))
        steps.append((CLIENT, raw))
        if draw(st.integers(0, 4)):
            answered = draw(st.sampled_from([request_id, request_id, 999]))
            steps.append((BACKEND, draw(replies(answered, 5000 + n))))
            if draw(st.integers(0, 5)) == 0:  # a second answer to it: no longer pending, not audited again
                steps.append((BACKEND, draw(replies(answered, 6000 + n))))
    return steps


@settings(max_examples=300, deadline=None)
@given(sessions())
def test_fast_path_writes_the_observers_trail(steps):
    same_trail(steps)


def test_plain_commands_and_replies_take_the_fast_path():
    """A driver's find_one and insert_one (a document sequence) and their replies are audited in place, and equally."""
    common = {"lsid": LSID, "$clusterTime": CLUSTER_TIME, "$db": "bench"}
    steps = [
        (CLIENT, op_msg({"find": "kv", "filter": {"_id": 3}, "limit": 1, "singleBatch": True, **common}, 1)),
        (BACKEND, op_msg({"cursor": {"firstBatch": [{"_id": 3, "v": "x"}], "id": Int64(0), "ns": "bench.kv"}, "ok": 1.0},
                         101, response_to=1)),
        (CLIENT, op_msg({"insert": "kv", "ordered": True, **common}, 2, sequences={"documents": [{"_id": 4}, {"_id": 5}]})),
        (BACKEND, op_msg({"n": 2, "ok": 1.0}, 102, response_to=2)),
    ]
    assert same_trail(steps) == 4
    events, counts, _ = run(steps, fast=True)
    assert [e["event"] for e in events] == ["db.session.query", "db.session.result"] * 2
    assert events[0]["collection"] == "kv" and events[0]["db_name"] == "bench" and '"$uuid"' in events[0]["db_query"]
    assert events[1]["batch_size"] == 1 and events[1]["query_uid"] == 0
    assert events[2]["document_count"] == 2 and events[3]["affected_records"] == 2
    assert counts["commands"] == 2
