"""What the Mongo audit reads: commands rendered as text, replies summarized.

Strategy.  A command becomes one ``db.session.query``'s text: the command
document as JSON (extended-JSON style for BSON types), bounded while
rendering, then ``truncate``d, credentials redacted at any depth
(``REDACT_ALWAYS``; SASL payloads too in authentication commands).  Fast
path: a small body whose bytes hold no redactable key is decoded by
``bson`` and dumped by ``orjson`` in C.  An OP_MSG document sequence
(``insert`` with ``documents``…) is recorded as its document count, counted
by size prefixes, never rendered.

Replies are read only as far as the audit needs: the top level of the body
as a ``RawBSONDocument`` (nested documents stay raw bytes), and a cursor's
batch is *counted* by walking its documents' int32 size prefixes instead of
decoding them, so a 16 MB ``getMore`` batch costs a few microseconds per
document, not a full decode.  BSON layout: bsonspec.org.
"""

from __future__ import annotations

import datetime as _dt
import re
import struct
import uuid
from collections.abc import Mapping  # not typing's alias: its isinstance check costs ~10x as much
from typing import Any

import bson
import orjson
from bson.binary import Binary
from bson.code import Code
from bson.codec_options import CodecOptions, DatetimeConversion
from bson.dbref import DBRef
from bson.decimal128 import Decimal128
from bson.errors import BSONError
from bson.max_key import MaxKey
from bson.min_key import MinKey
from bson.objectid import ObjectId
from bson.raw_bson import RawBSONDocument
from bson.regex import Regex
from bson.timestamp import Timestamp

from dbproxy.audit import events as ev

from .. import protocol as wire
from ..clientauth import AUTH_COMMANDS

REDACTED = "<redacted>"
#: Keys whose values never reach the audit, at any depth of any command.
REDACT_ALWAYS = frozenset({"pwd", "password", "passwd", "speculativeAuthenticate"})
#: …plus these in authentication commands (SASL payloads carry proofs / PLAIN passwords).
REDACT_AUTH = REDACT_ALWAYS | {"payload", "key", "nonce", "digest"}

_I32 = struct.Struct("<i")


# --------------------------------------------------------------------------- rendering


class _Budget:
    __slots__ = ("left",)

    def __init__(self, chars: int) -> None:
        self.left = chars


MAX_RENDER_CHARS = ev.MAX_QUERY_CHARS + 1024
MAX_STRING_CHARS = 1024
MAX_DEPTH = 24


def _render(value: Any, budget: _Budget, redact: frozenset, depth: int = 0) -> Any:
    """A JSON-safe copy of a BSON value, bounded by ``budget`` (approximate output characters)."""
    if budget.left <= 0:
        return "…"
    t = type(value)
    if t is str:
        return _render_str(value, budget)
    if t is int or t is float or t is bool or value is None:
        budget.left -= 20
        return value
    if t is RawBSONDocument or t is dict:
        pass
    elif isinstance(value, bool):
        budget.left -= 5
        return bool(value)
    elif isinstance(value, int):  # Int64
        budget.left -= 20
        return int(value)
    elif isinstance(value, float):
        budget.left -= 24
        return float(value)
    elif isinstance(value, str):
        return _render_str(str(value), budget)
    if t is RawBSONDocument or t is dict or isinstance(value, Mapping):
        if depth >= MAX_DEPTH:
            return "{…}"
        out: dict[str, Any] = {}
        for key, item in value.items():
            if budget.left <= 0:
                out["…"] = "truncated"
                break
            key = key if len(key) <= 128 else key[:128] + "…"
            budget.left -= len(key) + 4
            out[key] = REDACTED if key in redact else _render(item, budget, redact, depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        if depth >= MAX_DEPTH:
            return "[…]"
        items = []
        for i, item in enumerate(value):
            if budget.left <= 0:
                items.append(f"…{len(value) - i} more")
                break
            items.append(_render(item, budget, redact, depth + 1))
        return items
    budget.left -= 40
    if isinstance(value, ObjectId):
        return {"$oid": str(value)}
    if isinstance(value, (bytes, Binary)):
        subtype = value.subtype if isinstance(value, Binary) else 0
        if subtype in (3, 4) and len(value) == 16:
            h = bytes(value).hex()
            return {"$uuid": f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"}
        return {"$binary": {"subType": f"{subtype:02x}", "length": len(value)}}
    if isinstance(value, uuid.UUID):
        return {"$uuid": str(value)}
    if isinstance(value, _dt.datetime):
        return {"$date": value.isoformat()}
    if isinstance(value, Decimal128):
        return {"$numberDecimal": str(value)}
    if isinstance(value, Timestamp):
        return {"$timestamp": {"t": value.time, "i": value.inc}}
    if isinstance(value, (Regex, re.Pattern)):
        return {"$regex": _render_str(str(value.pattern), budget), "$options": str(value.flags)}
    if isinstance(value, MinKey):
        return {"$minKey": 1}
    if isinstance(value, MaxKey):
        return {"$maxKey": 1}
    if isinstance(value, Code):
        return {"$code": _render_str(str(value), budget)}
    if isinstance(value, DBRef):
        return {"$ref": value.collection, "$id": _render(value.id, budget, redact, depth + 1)}
    return _render_str(str(value), budget)


#: Decodes every valid BSON value: dates out of Python's range stay ``DatetimeMS``.  What still
#: fails breaks the BSON spec (bsonspec.org): a size or length that lies, an unknown element
#: type, a string that is not UTF-8 — the same test ``wire.raw_document`` applies to the top level.
_LENIENT = CodecOptions(datetime_conversion=DatetimeConversion.DATETIME_AUTO)


def _render_lenient(body: Mapping[str, Any], name: str, redact: frozenset) -> Any:
    """The walk over the raw document failed.  Either the BSON is broken somewhere inside (a nested
    document's size or a string's length lies): the command is malformed — raised, so it is refused
    and audited as ``audit.malformed``, never forwarded with a partial record; or a valid value would
    not render (a date out of Python's range): the document is decoded leniently and rendered from
    that, so the record still says what was sent."""
    raw = body.raw if isinstance(body, RawBSONDocument) else None
    if raw is None:
        return {name: "<unrenderable command>"}
    try:
        decoded = bson.decode(raw, codec_options=_LENIENT)
    except (BSONError, ValueError, TypeError, OverflowError) as exc:
        raise wire.RemoteProtocolError(f"invalid BSON in the command document: {exc}",
                                       client_hint="malformed command document") from None
    try:
        return _render(decoded, _Budget(MAX_RENDER_CHARS), redact)
    except Exception as exc:  # no known value gets here; still, never fail the audit for rendering
        return {name: f"<unrenderable command: {exc.__class__.__name__}>"}


def _render_str(value: str, budget: _Budget) -> str:
    limit = min(MAX_STRING_CHARS, max(budget.left, 16))
    if len(value) > limit:
        value = value[:limit] + f"…[{len(value) - limit} more chars]"
    budget.left -= len(value) + 2
    return value


#: Small commands with none of these byte strings anywhere (a BSON key is its
#: name + NUL) need no redaction: they take the fast path.
#: (Substring tests, in C: a few times faster than one regex alternation over the same bytes.)
_REDACT_MARKERS = tuple(sorted(k.encode("utf-8") + b"\x00" for k in REDACT_ALWAYS))
FAST_RENDER_MAX = ev.MAX_QUERY_CHARS


def _json_default(value: Any) -> Any:
    # The BSON types every driver's command carries (``lsid``'s UUID, ``$clusterTime``'s
    # Timestamp and signature hash) by exact type, as ``_render`` renders them; others walk it.
    t = type(value)
    if t is Binary:
        subtype = value.subtype
        if (subtype == 4 or subtype == 3) and len(value) == 16:
            h = value.hex()
            return {"$uuid": f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"}
        return {"$binary": {"subType": f"{subtype:02x}", "length": len(value)}}
    if t is bytes:  # bson decodes binary subtype 0 as bytes
        return {"$binary": {"subType": "00", "length": len(value)}}
    if t is Timestamp:
        return {"$timestamp": {"t": value.time, "i": value.inc}}
    if t is ObjectId:
        return {"$oid": str(value)}
    return _render(value, _Budget(MAX_STRING_CHARS * 4), REDACT_ALWAYS)


def fast_renderable(raw: bytes, name: str) -> bool:
    """Does ``render_command`` take its fast path for this body (``raw``: its bytes)?"""
    if len(raw) > FAST_RENDER_MAX or name in AUTH_COMMANDS:
        return False
    for marker in _REDACT_MARKERS:
        if marker in raw:
            return False
    return True


def render_decoded(doc: dict, sequences: dict[str, int] | None = None) -> str:
    """The fast path's text of a command ``bson.decode``d whole (raises ``TypeError`` / ``ValueError``
    / ``orjson.JSONEncodeError`` where the careful walk must decide)."""
    if sequences:
        for ident, count in sequences.items():
            doc[ident] = f"<{count} documents in a document sequence>"
    return ev.truncate(
        orjson.dumps(doc, default=_json_default, option=orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_NON_STR_KEYS).decode("utf-8")
    )


def render_command(body: Mapping[str, Any], name: str, sequences: dict[str, int] | None = None) -> str:
    """The command document as audit text: JSON, bounded, credentials redacted.

    Fast path (nearly every command): a small body whose bytes contain no
    redactable key is decoded by ``bson`` and dumped by ``orjson`` in C, with
    only the BSON-specific types (ObjectId, Binary, dates…) passed back to
    ``_render``.  Large bodies, authentication commands and bodies that may
    hold a password take the bounded, redacting walk.
    """
    raw = body.raw if isinstance(body, RawBSONDocument) else None
    if raw is not None and fast_renderable(raw, name):
        try:
            return render_decoded(bson.decode(raw), sequences)
        except (BSONError, TypeError, ValueError, orjson.JSONEncodeError):
            pass  # the careful walk below says what it can
    redact = REDACT_AUTH if name in AUTH_COMMANDS else REDACT_ALWAYS
    budget = _Budget(MAX_RENDER_CHARS)
    try:
        doc = _render(body, budget, redact)
    except Exception:
        doc = _render_lenient(body, name, redact)
    if sequences:
        for ident, count in sequences.items():
            doc[ident] = f"<{count} documents in a document sequence>"
    return ev.truncate(orjson.dumps(doc, option=orjson.OPT_NON_STR_KEYS).decode("utf-8"))


# --------------------------------------------------------------------------- reply reading


def count_documents(data: bytes | memoryview, start: int = 0, end: int | None = None) -> int:
    """Number of concatenated BSON documents (an OP_MSG document sequence), by size prefixes only."""
    end = len(data) if end is None else end
    pos, n = start, 0
    unpack = _I32.unpack_from
    while pos < end:
        if pos + 4 > end:
            raise wire.RemoteProtocolError("document sequence ends inside a document size",
                                           client_hint="malformed document sequence")
        size = unpack(data, pos)[0]
        if size < 5:
            raise wire.RemoteProtocolError("document sequence holds a document smaller than 5 bytes",
                                           client_hint="malformed document sequence")
        pos += size
        n += 1
    if pos != end:
        raise wire.RemoteProtocolError("document sequence overruns its section", client_hint="malformed document sequence")
    return n


def plain_sequences(d: Any, pos: int, end: int) -> dict[str, int] | None:
    """The document sequences (kind-1 sections) of ``d[pos:end]``, the rest of an OP_MSG after its
    body: identifier → document count (empty: none), as ``parse_op_msg`` +
    ``session._sequence_counts`` read them — or None for anything else (another section kind, a
    size or identifier that does not fit, a repeated identifier, a bad count), which those two then
    judge.  The hot path of the proxy's tee and of the worker's fast tap: no message objects."""
    sequences: dict[str, int] = {}
    while pos < end:
        if d[pos] != 1 or pos + 5 > end:
            return None
        seq_end = pos + 1 + _I32.unpack_from(d, pos + 1)[0]
        if seq_end < pos + 6 or seq_end > end:
            return None
        nul = d.find(b"\x00", pos + 5, seq_end)
        if nul < 0:
            return None
        try:
            ident = bytes(d[pos + 5:nul]).decode("utf-8")
            count = count_documents(d, nul + 1, seq_end)
        except (UnicodeDecodeError, wire.RemoteProtocolError):
            return None
        if ident in sequences:
            return None
        sequences[ident] = count
        pos = seq_end
    return sequences


def _count_array_documents(raw: bytes | memoryview, pos: int) -> int | None:
    """Element count of the BSON array at ``pos`` whose elements are all documents, else None.

    Array keys are "0", "1", … (bsonspec.org: arrays are documents with
    decimal index keys), so each element is ``\\x03 <digits> \\x00 <doc>`` and
    the next one starts ``2 + len(key) + doc_size`` bytes later.
    """
    size = _I32.unpack_from(raw, pos)[0]
    end = pos + size - 1
    if size < 5 or end >= len(raw):
        return None
    p = pos + 4
    n = 0
    next_width_at = 10
    width = 1
    unpack = _I32.unpack_from
    while p < end:
        if n == next_width_at:
            width += 1
            next_width_at *= 10
        if p + 6 + width > end or raw[p] != 3 or raw[p + 1 + width] != 0:
            return None
        p += 2 + width + unpack(raw, p + 2 + width)[0]
        n += 1
    return n if p == end else None


_BATCH_KEYS = (b"\x04firstBatch\x00", b"\x04nextBatch\x00")


def cursor_summary(cursor: RawBSONDocument) -> tuple[Any, Any, int | None]:
    """(id, ns, batch size) of a reply's ``cursor`` without decoding the batch's documents."""
    raw = cursor.raw
    for key in _BATCH_KEYS:
        klen = len(key)
        if bytes(raw[4:4 + klen]) == key:
            arr = 4 + klen
            count = _count_array_documents(raw, arr)
            if count is None:
                break
            rest = bytes(raw[arr + _I32.unpack_from(raw, arr)[0]:len(raw) - 1])
            tail = wire.raw_document(_I32.pack(len(rest) + 5) + rest + b"\x00")
            return tail.get("id"), tail.get("ns"), count
    # Batch not first (listCollections, listIndexes): small results, decode the top level.
    batch = cursor.get("firstBatch", cursor.get("nextBatch"))
    return cursor.get("id"), cursor.get("ns"), len(batch) if isinstance(batch, list) else None


def _decoded_cursor_summary(cursor: dict) -> tuple[Any, Any, int | None]:
    """``cursor_summary`` of a cursor decoded whole (``summarize_small_reply``): the same three values."""
    batch = cursor.get("firstBatch", cursor.get("nextBatch"))
    return cursor.get("id"), cursor.get("ns"), len(batch) if isinstance(batch, list) else None


#: An OP_MSG reply up to this size is decoded whole, in C, for its summary (``summarize_small_reply``).
SMALL_REPLY = 16 * 1024
_U32 = struct.Struct("<I")


def summarize_small_reply(msg: wire.WireMessage) -> dict[str, Any] | None:
    """``summarize_reply(*reply_document(msg))`` of a small OP_MSG reply whose body comes first, from
    one ``bson.decode`` of the body instead of a raw top level, its inflation and the cursor's raw
    walk (a driver's everyday reply: a few hundred bytes).  A full decode that succeeds reads every
    value the raw path reads, with the same types; None — a larger reply, another layout, or a body
    the full decode refuses (the raw path may still read its top level) — means: take the general
    path, which decides."""
    raw = msg.raw
    end = len(raw)
    if msg.op_code != wire.OP_MSG or end > SMALL_REPLY or end < 26 or raw[20] != 0:
        return None
    if _U32.unpack_from(raw, 16)[0] & wire.CHECKSUM_PRESENT:
        end -= 4
    size = _I32.unpack_from(raw, 21)[0]
    if size < 5 or 21 + size > end:
        return None
    try:
        doc = bson.decode(memoryview(raw)[21:21 + size])
    except Exception:
        return None
    return summarize_reply(doc)


def reply_document(msg: wire.WireMessage) -> tuple[RawBSONDocument, wire.OpReply | None]:
    """The body of a reply (OP_MSG kind-0, or OP_REPLY's first document)."""
    if msg.op_code == wire.OP_MSG:
        return wire.raw_document(wire.op_msg_body_raw(msg)), None
    if msg.op_code == wire.OP_REPLY:
        r = wire.parse_op_reply(msg)
        data = r.documents_raw
        if len(data) < 5:
            return wire.raw_document(b"\x05\x00\x00\x00\x00"), r
        return wire.raw_document(data[:_I32.unpack_from(data, 0)[0]]), r
    raise wire.RemoteProtocolError(f"reply with opcode {msg.op_code}", client_hint="unexpected reply opcode")


def summarize_reply(doc: Mapping[str, Any], op_reply: wire.OpReply | None = None) -> dict[str, Any]:
    """Audit fields of a command reply: ok, n/nModified, errors, cursor id and batch size."""
    out: dict[str, Any] = {}
    if type(doc) is not dict:
        doc = dict(doc.items())  # one inflation of the top level; nested documents stay raw
    ok = doc.get("ok")
    if op_reply is not None and op_reply.response_flags & wire.REPLY_FLAG_QUERY_FAILURE:
        ok = 0
    if ok is None and op_reply is not None:  # a legacy OP_QUERY find: documents, not a command reply
        out["ok"] = 1.0
        out["cursor_id"] = op_reply.cursor_id
        out["batch_size"] = op_reply.number_returned
        return out
    out["ok"] = ok if isinstance(ok, (int, float)) else 0
    if not ok:
        errmsg = doc.get("errmsg", doc.get("$err"))
        out["errmsg"] = ev.truncate(str(errmsg), 2048) if errmsg is not None else None
        out["code"] = doc.get("code")
        if doc.get("codeName") is not None:
            out["codeName"] = doc.get("codeName")
    n = doc.get("n")
    if isinstance(n, (int, float)):
        out["n"] = int(n)
    n_modified = doc.get("nModified")
    if isinstance(n_modified, (int, float)):
        out["nModified"] = int(n_modified)
    upserted = doc.get("upserted")
    if isinstance(upserted, list):
        out["upserted"] = len(upserted)
    write_errors = doc.get("writeErrors")
    if isinstance(write_errors, list) and write_errors:
        out["write_errors"] = len(write_errors)
        first = write_errors[0]
        if isinstance(first, Mapping):
            out["errmsg"] = ev.truncate(str(first.get("errmsg", "")), 2048)
            out["code"] = first.get("code")
    wce = doc.get("writeConcernError")
    if isinstance(wce, Mapping):
        out["write_concern_error"] = ev.truncate(str(wce.get("errmsg", "")), 2048)
    cursor = doc.get("cursor")
    if isinstance(cursor, RawBSONDocument) or type(cursor) is dict:
        cid, ns, batch = cursor_summary(cursor) if type(cursor) is not dict else _decoded_cursor_summary(cursor)
        out["cursor_id"] = int(cid) if isinstance(cid, int) else cid
        out["batch_size"] = batch
        if isinstance(ns, str):
            out["ns"] = ns
    for key in ("cursorsKilled", "cursorsNotFound"):
        value = doc.get(key)
        if isinstance(value, list):
            out[key] = [int(c) for c in value if isinstance(c, int)]
    return out
