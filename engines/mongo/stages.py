"""Pipeline stages of the Mongo engine: command audit, handshake rewriting, client auth.

Client → backend (``ClientCommands``), per request:
  * OP_COMPRESSED is decompressed to look inside; the backend link never
    negotiates compression, so the decompressed message is what is sent on
    (a rewrite: header rebuilt by ``wire.decompress``, identical to the
    client's pre-compression message, so an OP_MSG checksum stays valid).
  * ``saslStart`` / ``saslContinue`` / ``authenticate`` / ``logout`` /
    ``getnonce`` are answered by the session's ``ClientAuthenticator`` and
    never forwarded.
  * ``hello`` / ``isMaster`` is forwarded without ``client`` (the backend
    already got it in the proxy's handshake), ``compression``,
    ``saslSupportedMechs`` and ``speculativeAuthenticate`` — the proxy
    answers those itself in the rewritten reply.
  * Every command gets one ``db.session.query``: command name, ``$db``,
    collection, and the command document as JSON text (extended-JSON style
    for BSON types, bounded while rendering, then ``truncate``d, credentials
    redacted).  An OP_MSG document sequence (``insert`` with
    ``documents``…) is recorded as its document count, never rendered.
  * ``getMore`` / ``killCursors`` name the query that opened their cursor.
  * With identity and access configured (``state.gate``, a
    ``policy.MongoAccess``): before the connection is established only the
    handshake commands run (forwarded unaudited, counted), the
    authentication commands establish it, anything else is refused (code
    13); afterwards every command is checked against the session's grant
    (``policy.check_command``, per database) before it is audited and forwarded, and
    ``connectionStatus`` is answered by the proxy with the client's identity.
    Legacy opcodes (OP_INSERT, OP_GET_MORE … — gone since MongoDB 5.1) cannot
    be policed by command and end such a session.

Malformed requests (the rule of every engine, ARCHITECTURE.md "Audit"): a
request whose header is right but whose body the audit cannot read is never
forwarded — ``ClientCommands`` raises ``MalformedMessage``, the pipeline
audits it as ``audit.malformed`` (its first 64 bytes, cut before the value of
any key the renderer would redact) and the engine answers that request
``ok: 0`` (code 17 ProtocolError; OP_REPLY for OP_QUERY) and closes.  That
covers: an OP_MSG section or document sequence whose sizes lie, a bad
checksum or flag, an OP_QUERY whose collection name is not NUL-terminated
UTF-8, an OP_COMPRESSED that does not decompress, an empty command document,
BSON that breaks its spec anywhere the renderer reads (a nested size or
string length that lies, an unknown element type, a string that is not
UTF-8), and a command whose fields the audit and policy cannot read as the
protocol defines them (e.g. a ``speculativeAuthenticate`` that is not a
document).  Not malformed: valid BSON whose value Python cannot hold as is —
a date out of ``datetime``'s range is decoded as ``DatetimeMS`` and rendered
as its milliseconds; a document sequence's documents are counted by their
size prefixes, not decoded (the record says how many were sent); a body
larger than the rendering budget is rendered up to it and marked truncated.

Backend → client (``BackendReplies``), per reply: the request is found by
``responseTo`` (a reply with moreToCome re-keys it under its own requestID,
which the next exhaust reply answers).  A ``db.session.result`` carries
``ok``, ``n``/``nModified``, ``errmsg``/``code``/``codeName``, write errors,
cursor id and batch size, linked by ``query_uid``.  Hello replies are
rewritten to present a standalone server that keeps drivers on the proxy
(``hosts``/``me``/``setName``/``primary``… removed), with the proxy's
``saslSupportedMechs``, chosen ``compression``, ``speculativeAuthenticate``
answer and ``maxMessageSizeBytes`` capped at the proxy's limit.  Every other
reply is forwarded as received: replies to a client that negotiated
compression may be uncompressed (OP_COMPRESSED.md), so the hot path never
re-encodes.

Replies are read only as far as the audit needs: the top level of the body
as a ``RawBSONDocument`` (nested documents stay raw bytes), and a cursor's
batch is *counted* by walking its documents' int32 size prefixes instead of
decoding them, so a 16 MB ``getMore`` batch costs a few microseconds per
document, not a full decode.
"""

from __future__ import annotations

import datetime as _dt
import re
import struct
import uuid
from typing import Any, Mapping

import attrs
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

from audit import events as ev
from dbproxy.access import audit_denial
from dbproxy.errors import FrameTooLarge, MalformedMessage, ProtocolError
from dbproxy.sansio import Verdict, replace, reply

from . import protocol as wire
from .clientauth import AUTH_COMMANDS
from .policy import HANDSHAKE_COMMANDS, UNAUTHORIZED, denial_message

HELLO_COMMANDS = frozenset({"hello", "isMaster", "ismaster"})
SUPPORTED_COMPRESSORS = ("snappy", "zlib", "zstd")
REQUEST_OPCODES = frozenset({wire.OP_MSG, wire.OP_QUERY, wire.OP_COMPRESSED})

#: Hello reply fields that would make a driver discover and connect to other
#: hosts (SDAM: replica set members, mongos lists).  The proxy presents a standalone.
TOPOLOGY_FIELDS = (
    "hosts", "passives", "arbiters", "setName", "setVersion", "primary", "me", "secondary",
    "arbiterOnly", "passive", "hidden", "tags", "electionId", "isreplicaset", "lastWrite",
)
#: Fields of a client hello the proxy answers itself (never forwarded).
HELLO_PROXY_FIELDS = ("client", "compression", "saslSupportedMechs", "speculativeAuthenticate")

REDACTED = "<redacted>"
#: Keys whose values never reach the audit, at any depth of any command.
REDACT_ALWAYS = frozenset({"pwd", "password", "passwd", "speculativeAuthenticate"})
#: …plus these in authentication commands (SASL payloads carry proofs / PLAIN passwords).
REDACT_AUTH = REDACT_ALWAYS | {"payload", "key", "nonce", "digest"}

MAX_CURSORS = 10_000  # cursor-origin entries kept per session (oldest dropped first)

_I32 = struct.Struct("<i")
PROTOCOL_ERROR = 17
BSON_TOO_LARGE = 10334
HOST_UNREACHABLE = 6


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
_REDACT_MARKERS = re.compile(b"|".join(re.escape(k.encode("utf-8") + b"\x00") for k in sorted(REDACT_ALWAYS)))
FAST_RENDER_MAX = ev.MAX_QUERY_CHARS


def _json_default(value: Any) -> Any:
    return _render(value, _Budget(MAX_STRING_CHARS * 4), REDACT_ALWAYS)


def render_command(body: Mapping[str, Any], name: str, sequences: dict[str, int] | None = None) -> str:
    """The command document as audit text: JSON, bounded, credentials redacted.

    Fast path (nearly every command): a small body whose bytes contain no
    redactable key is decoded by ``bson`` and dumped by ``orjson`` in C, with
    only the BSON-specific types (ObjectId, Binary, dates…) passed back to
    ``_render``.  Large bodies, authentication commands and bodies that may
    hold a password take the bounded, redacting walk.
    """
    raw = body.raw if isinstance(body, RawBSONDocument) else None
    if (
        raw is not None
        and len(raw) <= FAST_RENDER_MAX
        and name not in AUTH_COMMANDS
        and _REDACT_MARKERS.search(raw) is None
    ):
        try:
            doc = bson.decode(raw)
            if sequences:
                for ident, count in sequences.items():
                    doc[ident] = f"<{count} documents in a document sequence>"
            return ev.truncate(
                orjson.dumps(doc, default=_json_default, option=orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_NON_STR_KEYS).decode("utf-8")
            )
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
    if isinstance(cursor, RawBSONDocument):
        cid, ns, batch = cursor_summary(cursor)
        out["cursor_id"] = int(cid) if isinstance(cid, int) else cid
        out["batch_size"] = batch
        if isinstance(ns, str):
            out["ns"] = ns
    for key in ("cursorsKilled", "cursorsNotFound"):
        value = doc.get(key)
        if isinstance(value, list):
            out[key] = [int(c) for c in value if isinstance(c, int)]
    return out


# --------------------------------------------------------------------------- session state


@attrs.define(eq=False)
class CursorOrigin:
    uid: str
    command: str
    collection: str | None
    db: str | None


@attrs.define(eq=False)
class HelloPlan:
    """What the proxy puts into the reply of one client hello."""

    sasl_mechs: list | None = None  # set when the client asked (saslSupportedMechs)
    compression: list | None = None  # [chosen] or [] when the client offered compression
    speculative: dict | None = None  # the proxy's speculativeAuthenticate answer


@attrs.define(eq=False)
class Pending:
    uid: str
    command: str
    collection: str | None
    db: str | None
    op_query: bool  # the request was OP_QUERY: errors are answered in OP_REPLY
    hello: HelloPlan | None = None
    cursor_id: int | None = None  # getMore's cursor
    cursor_origin: CursorOrigin | None = None
    kill: tuple = ()
    audited: bool = True  # False: a handshake command of a connection not yet established


@attrs.define(eq=False)
class MongoSessionState:
    auth: Any  # clientauth.ClientAuthenticator (listener policies) or IdentityAuthenticator (identity mode)
    max_message_size: int
    compressors: tuple[str, ...] = SUPPORTED_COMPRESSORS
    pending: dict = attrs.field(factory=dict)  # requestID (or exhaust reply's requestID) → Pending
    cursors: dict = attrs.field(factory=dict)  # cursor id → CursorOrigin
    compressor: str | None = None
    compressed_requests: int = 0
    commands: int = 0
    errors: int = 0
    details: dict = attrs.field(factory=dict)
    gate: Any = None  # policy.MongoAccess when identity/access is configured
    denied: int = 0

    def remember_cursor(self, cursor_id: int, origin: CursorOrigin) -> None:
        cursors = self.cursors
        if cursor_id not in cursors and len(cursors) >= MAX_CURSORS:
            cursors.pop(next(iter(cursors)))
        cursors[cursor_id] = origin


def _names(body: RawBSONDocument) -> tuple[str, str | None, str | None]:
    """(command name, ``$db``, collection) in one pass over the top level (as wire.command_name & co.)."""
    try:
        items = iter(body.items())
        name, first = next(items)
        db = coll = None
        for key, value in items:
            if key == "$db":
                db = value
            elif key == "collection" and name == "getMore":
                coll = value
    except StopIteration:
        raise wire.RemoteProtocolError("empty command document", client_hint="empty command document") from None
    except BSONError as exc:
        raise wire.RemoteProtocolError(f"invalid BSON document: {exc}", client_hint="malformed command document") from None
    if name != "getMore" and isinstance(first, str):
        coll = first
    return name, db if isinstance(db, str) else None, coll if isinstance(coll, str) else None


def _sequence_counts(op: wire.OpMsg) -> dict[str, int]:
    return {ident: count_documents(data) for ident, data in op.sequences_raw}


def _error_code(exc: ProtocolError) -> int:
    too_large = isinstance(exc, FrameTooLarge) or isinstance(exc.__cause__, FrameTooLarge)
    return BSON_TOO_LARGE if too_large else PROTOCOL_ERROR


#: Where a secret's value would start in a malformed request's bytes (a BSON key is its name + NUL).
_SECRET_KEYS = re.compile(b"|".join(re.escape(k.encode("utf-8") + b"\x00") for k in sorted(REDACT_AUTH)))


_REQUEST_NAMES = {wire.OP_MSG: "OP_MSG", wire.OP_QUERY: "OP_QUERY", wire.OP_COMPRESSED: "OP_COMPRESSED"}


@attrs.frozen
class RequestHeader:
    """What the engine's error reply needs of a refused request (``engine.client_protocol_error_reply``)."""

    request_id: int
    op_code: int  # the opcode the reply style follows (OP_QUERY → OP_REPLY, else OP_MSG)


def malformed_request(msg: wire.WireMessage, exc: Exception) -> MalformedMessage:
    """A request whose body the audit cannot read, as the pipeline audits and answers it.

    The audit keeps its first 64 bytes, cut before any value of a key that may hold a secret
    (``pwd``, SASL ``payload``… — the same keys the command renderer redacts), marked
    ``redacted``.
    """
    name = _REQUEST_NAMES.get(msg.op_code, f"opcode {msg.op_code}")
    hint = getattr(exc, "client_hint", None) or "malformed command document"
    bad = MalformedMessage(f"malformed {name} request {msg.request_id}: {exc}", client_hint=hint,
                           type_name=name, type_code=msg.op_code, raw=msg.raw)
    secret = _SECRET_KEYS.search(bad.prefix)
    if secret is not None:
        bad.prefix = bad.prefix[:secret.end()]
        bad.redacted = True
    style = msg.op_code
    if style == wire.OP_COMPRESSED:
        try:
            style = wire.compressed_header(msg).original_op_code
        except (ProtocolError, struct.error, ValueError):
            style = wire.OP_MSG
    bad.mongo_side = "client"  # type: ignore[attr-defined]
    bad.mongo_header = RequestHeader(msg.request_id, style)  # type: ignore[attr-defined]
    return bad


def protocol_error_reply(request: wire.WireMessage, exc: ProtocolError) -> bytes:
    code = _error_code(exc)
    name = "BSONObjectTooLarge" if code == BSON_TOO_LARGE else "ProtocolError"
    return wire.error_reply_for(request, code, f"dbproxy: {exc.client_hint}", code_name=name)


def rebuild_request(msg: wire.WireMessage, body: dict) -> bytes:
    """``msg`` (uncompressed OP_MSG / OP_QUERY) with another command document; checksum recomputed."""
    if msg.op_code == wire.OP_MSG:
        op = wire.parse_op_msg(msg)
        sequences = {ident: docs for ident, docs in op.sequences.items()} if op.sequences_raw else None
        return wire.encode_op_msg(
            body, request_id=msg.request_id, response_to=msg.response_to, flags=op.flags, sequences=sequences
        )
    q = wire.parse_op_query(msg)
    outer = wire.decode_document(q.query_raw)
    first = next(iter(outer), None)
    if first in ("$query", "query") and isinstance(outer[first], dict):
        outer[first] = body
        query: Any = outer
    else:
        query = body
    return wire.encode_op_query(
        q.full_collection_name, query, request_id=msg.request_id, response_to=msg.response_to, flags=q.flags,
        number_to_skip=q.number_to_skip, number_to_return=q.number_to_return, fields=q.fields_raw,
    )


# --------------------------------------------------------------------------- client → backend


class ClientCommands:
    name = "mongo-client-commands"

    def __init__(self, state: MongoSessionState, audit: Any) -> None:
        self.state = state
        self.audit = audit

    def handle(self, msg: wire.WireMessage, ctx: Any) -> Verdict | None:
        if msg.op_code not in REQUEST_OPCODES:
            return self._legacy(msg)
        try:
            return self._command(msg)
        except (ProtocolError, BSONError, ValueError, TypeError, IndexError, struct.error) as exc:
            # The frame is intact (the decoder found the length) but its body is not what the
            # audit can read: refused, never forwarded; the pipeline audits it (audit.malformed)
            # and ends the session after answering ok:0 (the rule of every engine).
            self.state.errors += 1
            raise malformed_request(msg, exc) from exc

    def _command(self, msg: wire.WireMessage) -> Verdict | None:
        st = self.state
        plain = msg
        if msg.op_code == wire.OP_COMPRESSED:
            plain = wire.decompress(msg, max_message_size=st.max_message_size)
            st.compressed_requests += 1
        if plain.op_code == wire.OP_MSG:
            op = wire.parse_op_msg(plain)
            body = op.body
            name, db, coll = _names(body)
            sequences = _sequence_counts(op) if op.sequences_raw else None
            more_to_come = op.more_to_come
        elif plain.op_code == wire.OP_QUERY:
            cmd = wire.inspect_command(plain)
            if cmd is None:
                return self._legacy(plain)
            body, name, db, coll = cmd.body, cmd.name, cmd.database, cmd.collection
            sequences, more_to_come = None, False
        else:
            return self._legacy(plain, replace(plain.raw))
        st.commands += 1
        compressor = None
        if plain is not msg:
            compressor = wire.COMPRESSOR_NAMES.get(wire.compressed_header(msg).compressor_id, "unknown")
        gate = st.gate
        if gate is not None and not gate.established:
            if name in AUTH_COMMANDS:
                return self._establishing_auth(plain, name, body)
            if name in HANDSHAKE_COMMANDS:
                return self._handshake(plain, msg, name, db, coll, body, more_to_come)
            refusal = gate.establish_implicit(name, db)
            if refusal is not None:
                st.errors += 1
                st.denied += 1
                return _refuse(plain, refusal.code, refusal.message, more_to_come=more_to_come, close=refusal.close)
        if name in AUTH_COMMANDS:
            return self._auth(plain, name, db, body)
        op_query = plain.op_code == wire.OP_QUERY
        fields: dict[str, Any] = {"command": name, "db_name": db, "collection": coll, "request_id": plain.request_id}
        if compressor:
            fields["compressor"] = compressor
        if sequences:
            fields["document_count"] = sum(sequences.values())
        if gate is not None:
            if name == "connectionStatus":
                return self._answer(plain, body, name, gate.connection_status(), fields)
            denial = gate.check(name, db, body)
            if denial is not None:
                return self._deny(plain, body, name, db, sequences, denial, fields, more_to_come)
        pending = Pending("", name, coll, db, op_query)
        new_body = None
        if name in HELLO_COMMANDS:
            new_body = self._plan_hello(body, pending)
        elif name == "getMore":
            self._tie_get_more(body, pending, fields)
        elif name == "killCursors":
            self._tie_kill(body, pending, fields)
        event = self.audit.on_query(render_command(body, name, sequences), **fields)
        pending.uid = event["uid"]
        if more_to_come:
            self.audit.on_result(success=True, query_uid=pending.uid, command=name, acknowledged=False)
        else:
            st.pending[plain.request_id] = pending
        if new_body is not None:
            return replace(rebuild_request(plain, new_body))
        if plain is not msg:
            return replace(plain.raw)
        return None

    def _legacy(self, msg: wire.WireMessage, verdict: Verdict | None = None) -> Verdict | None:
        """Opcodes removed from MongoDB 5.1+ (OP_INSERT, OP_GET_MORE…): forwarded, audited by opcode only.

        Under access control they end the session: they carry no command the policy could check."""
        name = f"legacy opcode {msg.op_code}"
        self.state.commands += 1
        if self.state.gate is not None:
            self.state.denied += 1
            audit_denial(self.state.gate.session, "legacy_opcode", stage="command", command=name,
                         error=f"{name} is not supported under access control (MongoDB removed it in 5.1)")
            return Verdict(replace=(), close=True)
        event = self.audit.on_query(f"<{name}, {msg.length} bytes>", command=name, request_id=msg.request_id)
        if msg.op_code == wire.OP_GET_MORE:  # answered with OP_REPLY
            self.state.pending[msg.request_id] = Pending(event["uid"], name, None, None, True)
        else:  # fire-and-forget opcodes: no reply will come
            self.audit.on_result(success=True, query_uid=event["uid"], command=name, acknowledged=False)
        return verdict

    def _auth(self, plain: wire.WireMessage, name: str, db: str | None, body: Any) -> Verdict:
        st = self.state
        event = self.audit.on_query(
            render_command(body, name), command=name, db_name=db, collection=None, request_id=plain.request_id,
            answered_by="proxy",
        )
        outcome = st.auth.handle(name, body)
        fields: dict[str, Any] = {"ok": outcome.reply.get("ok", 0), "answered_by": "proxy"}
        if outcome.mechanism:
            fields["mechanism"] = outcome.mechanism
        if outcome.user is not None:
            fields["client_user"] = outcome.user
        if outcome.done:
            fields["client_authenticated"] = True
        if not outcome.ok:
            st.errors += 1
            fields.update(errmsg=outcome.reply.get("errmsg"), code=outcome.reply.get("code"), error=outcome.reply.get("errmsg"))
        self.audit.on_result(success=outcome.ok, query_uid=event["uid"], command=name, **fields)
        return reply(wire.reply_to(plain, outcome.reply))

    # -- access control (state.gate) ---------------------------------------------
    def _handshake(self, plain: wire.WireMessage, msg: wire.WireMessage, name: str, db: str | None, coll: str | None,
                   body: RawBSONDocument, more_to_come: bool) -> Verdict | None:
        """A handshake command before establishment: forwarded (hello still rewritten), counted, not audited."""
        st = self.state
        st.gate.note_handshake(name)
        if name in ("connectionStatus", "endSessions"):
            if more_to_come:
                return Verdict(replace=())
            # endSessions: nothing this connection ran could have used a session.
            doc = st.gate.connection_status() if name == "connectionStatus" else {"ok": 1.0}
            return reply(wire.reply_to(plain, doc))
        pending = Pending("", name, coll, db, plain.op_code == wire.OP_QUERY, audited=False)
        new_body = self._plan_hello(body, pending) if name in HELLO_COMMANDS else None
        if not more_to_come:
            st.pending[plain.request_id] = pending
        if new_body is not None:
            return replace(rebuild_request(plain, new_body))
        if plain is not msg:
            return replace(plain.raw)
        return None

    def _establishing_auth(self, plain: wire.WireMessage, name: str, body: Any) -> Verdict:
        """An authentication command before establishment; an identity it proves establishes the session."""
        st = self.state
        gate = st.gate
        gate.note_handshake(name)
        outcome = st.auth.handle(name, body)
        doc, close = outcome.reply, False
        if outcome.identity is not None:
            refusal = gate.establish(outcome.identity, client_auth=outcome.mechanism,
                                     client_auth_speculative=bool(getattr(st.auth, "speculative_conversation", False)))
            if refusal is not None:
                st.auth.revoke()
                st.errors += 1
                st.denied += 1
                doc, close = wire.error_document(refusal.code, refusal.message), refusal.close
        elif not outcome.ok:
            st.errors += 1
            gate.audit_auth_failure(name, outcome)
        elif outcome.done and outcome.user is not None:
            gate.claimed_user, gate.claimed_mechanism = outcome.user, outcome.mechanism
        return reply(wire.reply_to(plain, doc), close=close)

    def _answer(self, plain: wire.WireMessage, body: Any, name: str, doc: dict, fields: dict) -> Verdict:
        event = self.audit.on_query(render_command(body, name), answered_by="proxy", **fields)
        self.audit.on_result(success=True, query_uid=event["uid"], command=name, db_name=fields.get("db_name"), ok=1,
                             answered_by="proxy")
        return reply(wire.reply_to(plain, doc))

    def _deny(self, plain: wire.WireMessage, body: Any, name: str, db: str | None, sequences: dict | None,
              denial: Any, fields: dict, more_to_come: bool) -> Verdict:
        """A command the session's grant refuses: audited (query, access_denied, result), answered code 13."""
        st = self.state
        st.errors += 1
        st.denied += 1
        message = denial_message(denial, name, db)
        event = self.audit.on_query(render_command(body, name, sequences), **fields)
        audit_denial(st.gate.session, denial.reason, stage="command", error=message, command=denial.command,
                     db_name=db, collection=fields.get("collection"), query_uid=event["uid"])
        self.audit.on_result(success=False, query_uid=event["uid"], command=name, collection=fields.get("collection"),
                             db_name=db, ok=0, code=UNAUTHORIZED, errmsg=message, error=message, answered_by="proxy")
        return _refuse(plain, UNAUTHORIZED, message, more_to_come=more_to_come)

    def _plan_hello(self, body: RawBSONDocument, pending: Pending) -> dict | None:
        st = self.state
        plan = HelloPlan()
        pending.hello = plan
        present = [k for k in HELLO_PROXY_FIELDS if k in body]
        if not present:
            return None
        doc = wire.decode_document(body)
        client = doc.pop("client", None)
        if isinstance(client, Mapping) and "application_name" not in st.details:
            app = client.get("application")
            driver = client.get("driver")
            if isinstance(app, Mapping) and isinstance(app.get("name"), str):
                st.details["application_name"] = app["name"]
            if isinstance(driver, Mapping):
                st.details["driver"] = f"{driver.get('name', '')} {driver.get('version', '')}".strip()
        offered = doc.pop("compression", None)
        if offered is not None:
            names = [c for c in offered if isinstance(c, str)] if isinstance(offered, list) else []
            chosen = next((c for c in names if c in st.compressors), None)
            plan.compression = [chosen] if chosen else []
            st.compressor = chosen
        if doc.pop("saslSupportedMechs", None) is not None:
            plan.sasl_mechs = st.auth.mechanisms()
        spec = doc.pop("speculativeAuthenticate", None)
        if spec is not None:
            outcome = st.auth.speculative(spec)
            gate = st.gate
            if outcome is not None and gate is not None and not gate.established:
                if outcome.identity is not None:  # MONGODB-X509: the certificate is the proof
                    refusal = gate.establish(outcome.identity, client_auth=outcome.mechanism, client_auth_speculative=True)
                    if refusal is not None:
                        # No speculative answer: the driver authenticates explicitly and gets the refusal.
                        st.auth.revoke()
                        outcome = None
                elif outcome.done and outcome.user is not None:
                    gate.claimed_user, gate.claimed_mechanism = outcome.user, outcome.mechanism
            elif outcome is not None and gate is None:
                self.audit.emit(
                    "db.session.mongo.client_auth", mechanism=outcome.mechanism, client_user=outcome.user,
                    speculative=True, success=True, done=outcome.done,
                )
            if outcome is not None:
                plan.speculative = outcome.reply
        return doc

    def _tie_get_more(self, body: RawBSONDocument, pending: Pending, fields: dict) -> None:
        cid = body.get("getMore")
        if isinstance(cid, int):
            cid = int(cid)
            origin = self.state.cursors.get(cid)
            pending.cursor_id = cid
            pending.cursor_origin = origin
            fields["cursor_id"] = cid
            if origin is not None:
                fields["cursor_query_uid"] = origin.uid
                fields["cursor_command"] = origin.command

    def _tie_kill(self, body: RawBSONDocument, pending: Pending, fields: dict) -> None:
        ids = body.get("cursors")
        if isinstance(ids, list):
            kill = tuple(int(c) for c in ids if isinstance(c, int))
            pending.kill = kill
            fields["cursor_ids"] = list(kill)
            fields["cursor_query_uids"] = [o.uid if (o := self.state.cursors.get(c)) else None for c in kill]


# --------------------------------------------------------------------------- backend → client


class BackendReplies:
    name = "mongo-backend-replies"

    def __init__(self, state: MongoSessionState, audit: Any) -> None:
        self.state = state
        self.audit = audit

    def handle(self, msg: wire.WireMessage, ctx: Any) -> Verdict | None:
        st = self.state
        pending = st.pending.pop(msg.response_to, None)
        plain = msg
        if msg.op_code == wire.OP_COMPRESSED:
            # The proxy never offers compression to the backend; a server that compresses anyway is unwrapped.
            plain = wire.decompress(msg, max_message_size=max(st.max_message_size, wire.DEFAULT_MAX_MESSAGE_SIZE))
        verdict = replace(plain.raw) if plain is not msg else None
        if pending is None:
            return verdict
        if plain.more_to_come:
            st.pending[plain.request_id] = pending
        if not pending.audited:
            if pending.hello is not None:
                try:
                    doc, op_reply = reply_document(plain)
                    rewritten = self._rewrite_hello(plain, doc, op_reply, pending.hello)
                except (ProtocolError, BSONError, ValueError, TypeError, IndexError, struct.error):
                    rewritten = None  # forwarded as received; the driver judges it
                if rewritten is not None:
                    verdict = replace(rewritten)
            return verdict
        try:
            doc, op_reply = reply_document(plain)
            if pending.hello is not None:
                rewritten = self._rewrite_hello(plain, doc, op_reply, pending.hello)
                if rewritten is not None:
                    verdict = replace(rewritten)
            summary = summarize_reply(doc, op_reply)
        except (ProtocolError, BSONError, ValueError, TypeError, IndexError, struct.error) as exc:
            # Forwarded all the same: the client's driver judges the reply; the audit says it was unreadable.
            summary = {"ok": 0, "errmsg": f"unreadable reply: {exc}"}
        ok = bool(summary.get("ok")) and "write_errors" not in summary and "write_concern_error" not in summary
        if not ok:
            st.errors += 1
            if summary.get("errmsg"):
                summary["error"] = summary["errmsg"]
        self._cursors(pending, summary)
        fields = {"command": pending.command, "collection": pending.collection, "db_name": pending.db}
        if pending.cursor_origin is not None:
            fields["cursor_query_uid"] = pending.cursor_origin.uid
        if "n" in summary:
            fields["affected_records"] = summary.get("nModified", summary["n"])
        fields.update(summary)
        self.audit.on_result(success=ok, query_uid=pending.uid, **fields)
        return verdict

    def _cursors(self, pending: Pending, summary: dict) -> None:
        st = self.state
        cid = summary.get("cursor_id")
        if pending.command == "getMore":
            if cid == 0 and pending.cursor_id is not None:
                st.cursors.pop(pending.cursor_id, None)
        elif pending.kill:
            for c in pending.kill:
                st.cursors.pop(c, None)
        elif isinstance(cid, int) and cid != 0:
            st.remember_cursor(cid, CursorOrigin(pending.uid, pending.command, pending.collection, pending.db))

    def _rewrite_hello(
        self, plain: wire.WireMessage, doc: RawBSONDocument, op_reply: wire.OpReply | None, plan: HelloPlan
    ) -> bytes | None:
        """The hello reply as the proxy presents it, or None when it is already that (heartbeats)."""
        if not doc.get("ok"):
            return None
        st = self.state
        size = doc.get("maxMessageSizeBytes")
        cap = not isinstance(size, int) or size > st.max_message_size
        drop = [k for k in (*TOPOLOGY_FIELDS, "compression", "saslSupportedMechs", "speculativeAuthenticate") if k in doc]
        if not (cap or drop or plan.sasl_mechs is not None or plan.compression or plan.speculative is not None):
            return None
        out = wire.decode_document(doc)
        for key in drop:
            del out[key]
        if cap:
            out["maxMessageSizeBytes"] = st.max_message_size
        if plan.sasl_mechs is not None:
            out["saslSupportedMechs"] = plan.sasl_mechs
        if plan.compression:
            out["compression"] = plan.compression
        if plan.speculative is not None:
            out["speculativeAuthenticate"] = plan.speculative
        if op_reply is not None:
            return wire.encode_op_reply(
                [out], plain.request_id, plain.response_to,
                response_flags=op_reply.response_flags, cursor_id=op_reply.cursor_id,
                starting_from=op_reply.starting_from,
            )
        # Same flags (moreToCome for a streaming hello); a checksum, if present, is recomputed.
        return wire.encode_op_msg(out, request_id=plain.request_id, response_to=plain.response_to,
                                  flags=plain.op_msg_flags)


def lost_backend_replies(state: MongoSessionState, audit: Any, errmsg: str, *, code: int = HOST_UNREACHABLE) -> bytes:
    """ok:0 (HostUnreachable by default) for every request still waiting for the backend; each audited."""
    out = []
    for request_id, p in list(state.pending.items()):
        doc = wire.error_document(code, errmsg)
        if p.op_query:
            out.append(wire.encode_op_reply([doc], None, request_id))
        else:
            out.append(wire.encode_op_msg(doc, response_to=request_id))
        if p.audited:
            audit.on_result(success=False, query_uid=p.uid, command=p.command, ok=0, errmsg=errmsg, code=code, error=errmsg)
    state.errors += len(state.pending)
    state.pending.clear()
    return b"".join(out)


def abandon_pending(state: MongoSessionState, audit: Any, reason: str) -> None:
    """Audit requests that will never get a reply (the session ended first), so no query lacks a result."""
    for p in state.pending.values():
        if p.audited:
            audit.on_result(success=False, query_uid=p.uid, command=p.command, ok=None, error=reason, answered=False)
    state.pending.clear()


def _refuse(request: wire.WireMessage, code: int, errmsg: str, *, more_to_come: bool = False, close: bool = False) -> Verdict:
    """Answer ``request`` with ``ok: 0`` instead of forwarding it (a moreToCome request gets no answer)."""
    if more_to_come:
        return Verdict(replace=(), close=close)
    return reply(wire.error_reply_for(request, code, errmsg), close=close)
