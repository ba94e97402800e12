"""Mongo requests that frame correctly but whose body the audit cannot read (issue 13 §1).

The rule of every engine: refused before forwarding — the client stage that reads the request
raises ``MalformedMessage`` (the pipeline audits it as ``audit.malformed`` and ends the session after the engine's ``ok: 0``
reply to that request: code 17 ProtocolError, in OP_REPLY for an OP_QUERY).  Its first 64 bytes are
kept for the audit, cut before the value of a key that may hold a secret.

The cases: BSON whose structure lies at the top level or inside a nested document (a size, a
string length, an unknown element type, a string that is not UTF-8), a document sequence that
overruns its section, an empty command document, an OP_QUERY whose collection name is not UTF-8 or
which is cut short, an OP_COMPRESSED that does not decompress.  Not malformed: a valid value the
renderer cannot show as is (a date out of Python's range) is audited from a lenient decode and
forwarded.
"""

from __future__ import annotations

import struct

import bson
import pytest
from bson.datetime_ms import DatetimeMS

from dbproxy.errors import MalformedMessage
from dbproxy.engines.mongo import protocol as wire
from dbproxy.engines.mongo.codec import MongoDecoder
from dbproxy.engines.mongo.errors import AttributingDecoder, client_protocol_error_reply
from tests.unit.mongo.test_mongo_stages import msg, reply_doc, session


def op_msg(body: bytes, request_id: int = 7, tail: bytes = b"") -> bytes:
    payload = b"\x00\x00\x00\x00" + b"\x00" + body + tail
    return wire.HEADER.pack(16 + len(payload), request_id, 0, wire.OP_MSG) + payload


def patched(doc: dict, old: bytes, new: bytes) -> bytes:
    raw = bson.encode(doc)
    assert raw.count(old) == 1
    return raw.replace(old, new)


def op_query(name: bytes, query: bytes, request_id: int = 7) -> bytes:
    payload = b"\x00\x00\x00\x00" + name + struct.pack("<ii", 0, -1) + query
    return wire.HEADER.pack(16 + len(payload), request_id, 0, wire.OP_QUERY) + payload


def op_compressed(request_id: int = 7) -> bytes:
    payload = struct.pack("<iiB", wire.OP_MSG, 100, 1) + b"\xff" * 20  # snappy, garbage
    return wire.HEADER.pack(16 + len(payload), request_id, 0, wire.OP_COMPRESSED) + payload


SEQ_DOC = bson.encode({"a": 1})
CASES = {
    "body-size-lies": op_msg(b"\xff\x00\x00\x00" + bson.encode({"ping": 1})[4:]),
    "nested-string-length-lies": op_msg(patched({"find": "c", "filter": {"a": "xy"}, "$db": "d"},
                                                b"\x02a\x00\x03\x00\x00\x00xy", b"\x02a\x00\x64\x00\x00\x00xy")),
    "nested-unknown-element-type": op_msg(patched({"find": "c", "filter": {"zz": 1}, "$db": "d"}, b"\x10zz\x00", b"\x99zz\x00")),
    "nested-string-not-utf8": op_msg(patched({"find": "c", "filter": {"a": "QQ"}, "$db": "d"}, b"QQ", b"\xff\xfe")),
    "top-level-string-not-utf8": op_msg(patched({"find": "QQ", "$db": "d"}, b"QQ", b"\xff\xfe")),
    "sequence-overruns": op_msg(bson.encode({"insert": "c", "$db": "d"}),
                                tail=b"\x01" + (4 + 10 + len(SEQ_DOC)).to_bytes(4, "little") + b"documents\x00"
                                + b"\xff\x00\x00\x00" + SEQ_DOC[4:]),
    "empty-command": op_msg(bson.encode({})),
    "op-query-name-not-utf8": op_query(b"ad\xffmin.$cmd\x00", bson.encode({"ping": 1})),
    "op-query-cut-short": op_query(b"admin.$cmd\x00", bson.encode({"ping": 1})[:-3]),
    "op-compressed-garbage": op_compressed(),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_request_is_refused_for_the_pipeline(case: str) -> None:
    state, audit, client, _ = session()
    raw = CASES[case]
    request = msg(raw)
    with pytest.raises(MalformedMessage) as info:
        client.handle(request, None)
    exc = info.value
    assert exc.type_code == request.op_code and exc.type_name.startswith("OP_")
    assert exc.length == len(raw) and exc.prefix == raw[:64] and not exc.redacted
    assert exc.audit_fields()["prefix_hex"] == raw[:64].hex() and exc.audit_fields()["truncated"] == (len(raw) > 64)
    assert audit.events == [] and state.pending == {}  # nothing recorded as if it had been sent
    out = client_protocol_error_reply(exc)  # what the engine answers before closing
    answer = msg(out)
    assert answer.response_to == 7 and reply_doc(out)["ok"] == 0 and reply_doc(out)["code"] == 17
    assert answer.op_code == (wire.OP_REPLY if request.op_code == wire.OP_QUERY else wire.OP_MSG)


def test_the_audited_prefix_stops_before_a_secret() -> None:
    body = bson.encode({"createUser": "u", "pwd": "hunter2-never-audited", "roles": []})
    raw = op_msg(b"\xff\x00\x00\x00" + body[4:])  # size lies: malformed
    assert b"hunter2" in raw[:64]
    state, audit, client, _ = session()
    with pytest.raises(MalformedMessage) as info:
        client.handle(msg(raw), None)
    exc = info.value
    assert exc.redacted and exc.audit_fields()["redacted"] is True
    assert exc.prefix.endswith(b"pwd\x00") and b"hunter2" not in exc.prefix
    assert exc.audit_fields()["truncated"] is True


def test_a_date_out_of_range_is_audited_and_forwarded() -> None:
    """Valid BSON the renderer cannot decode as a datetime: not malformed; the record shows it."""
    state, audit, client, _ = session()
    doc = {"insert": "c", "documents": [{"when": DatetimeMS(2**62)}], "$db": "d"}
    assert client.handle(msg(wire.encode_op_msg(doc, request_id=9)), None) is None
    [q] = audit.of("db.session.query")
    assert q["command"] == "insert" and str(2**62) in q["db_query"] and "unrenderable" not in q["db_query"]


def test_a_bad_checksum_is_refused_by_the_decoder_as_malformed() -> None:
    """The decoder verifies an OP_MSG's CRC-32C before the message is consumed: a mismatch is a
    MalformedMessage (the pipeline audits it), answered on the request's id by the engine."""
    good = wire.encode_op_msg({"insert": "c", "documents": [{"a": 1}], "$db": "d"}, request_id=7, checksum=True)
    bad = good[:-4] + bytes(b ^ 0xFF for b in good[-4:])
    decoder = AttributingDecoder(MongoDecoder(), "client")
    decoder.feed(bad)
    with pytest.raises(MalformedMessage) as info:
        decoder.next_message()
    exc = info.value
    assert (exc.type_name, exc.type_code, exc.length, exc.prefix) == ("OP_MSG", wire.OP_MSG, len(bad), bad[:64])
    assert len(decoder.buffer) == len(bad)  # not consumed: never forwarded
    out = client_protocol_error_reply(exc)
    assert msg(out).response_to == 7 and reply_doc(out)["code"] == 17
