"""The Mongo session's shared state, and each message read once for every stage.

Strategy.  The client stages (``client_stages()``) and the backend stages
(``backend_stages()``) each own one concern; they share the session's
``MongoSessionState`` and, for the message in hand, one parsed view of it:
``state.request(msg)`` reads a request at most once (decompressed, command
name, ``$db``, collection, lazy body, sequence counts) and
``state.reply(msg)`` matches a reply to its request by ``responseTo`` (a
reply with moreToCome re-keys the request under its own requestID, which
the next exhaust reply answers).  Stages run in the pipeline's order and the
first verdict ends the walk, so what one stage learns for a later one (the
audit's query uid, the handshake flag, the in-flight record) is written on
that view.

Malformed requests (the rule of every engine, ARCHITECTURE.md "Audit"): a
request whose header is right but whose body the audit cannot read is never
forwarded — the stage that finds it raises ``MalformedMessage``
(``malformed_request``), the pipeline audits it as ``audit.malformed`` (its
first 64 bytes, cut before the value of any key the renderer would redact)
and the engine answers that request ``ok: 0`` (code 17 ProtocolError;
OP_REPLY for OP_QUERY) and closes.  That covers: an OP_MSG section or
document sequence whose sizes lie, a bad checksum or flag, an OP_QUERY whose
collection name is not NUL-terminated UTF-8, an OP_COMPRESSED that does not
decompress, an empty command document, BSON that breaks its spec anywhere
the renderer reads (a nested size or string length that lies, an unknown
element type, a string that is not UTF-8), and a command whose fields the
audit and policy cannot read as the protocol defines them (e.g. a
``speculativeAuthenticate`` that is not a document).  Not malformed: valid
BSON whose value Python cannot hold as is — a date out of ``datetime``'s
range is decoded as ``DatetimeMS`` and rendered as its milliseconds; a
document sequence's documents are counted by their size prefixes, not
decoded (the record says how many were sent); a body larger than the
rendering budget is rendered up to it and marked truncated.
"""

from __future__ import annotations

import re
import struct
from typing import Any

import attrs
from bson.errors import BSONError
from bson.raw_bson import RawBSONDocument

from dbproxy.errors import FrameTooLarge, MalformedMessage, ProtocolError
from dbproxy.sansio import Verdict, reply

from .. import protocol as wire
from .render import REDACT_AUTH, count_documents, reply_document

SUPPORTED_COMPRESSORS = ("snappy", "zlib", "zstd")
REQUEST_OPCODES = frozenset({wire.OP_MSG, wire.OP_QUERY, wire.OP_COMPRESSED})

MAX_CURSORS = 10_000  # cursor-origin entries kept per session (oldest dropped first)

PROTOCOL_ERROR = 17
BSON_TOO_LARGE = 10334
HOST_UNREACHABLE = 6

#: What a stage may meet reading a body; the client stages turn it into ``malformed_request``.
PARSE_ERRORS = (ProtocolError, BSONError, ValueError, TypeError, IndexError, struct.error)


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
    # The message the stages are looking at, read once (see ``request`` / ``reply``).
    _request: Request | None = attrs.field(default=None, init=False, repr=False)
    _reply: Reply | None = attrs.field(default=None, init=False, repr=False)

    def remember_cursor(self, cursor_id: int, origin: CursorOrigin) -> None:
        cursors = self.cursors
        if cursor_id not in cursors and len(cursors) >= MAX_CURSORS:
            cursors.pop(next(iter(cursors)))
        cursors[cursor_id] = origin

    def request(self, msg: wire.WireMessage) -> Request:
        """The client request ``msg``, read by the first stage that asks (raises ``MalformedMessage``)."""
        r = self._request
        if r is None or r.msg is not msg:
            r = self._request = read_request(self, msg)
        return r

    def request_done(self, verdict: Verdict | None = None) -> Verdict | None:
        """A client stage ends the walk (a verdict, or the last stage): drop the read-once view, so the
        session holds no message between messages (the buffer budget only sees the decoders' bytes)."""
        self._request = None
        return verdict

    def reply_done(self, verdict: Verdict | None = None) -> Verdict | None:
        """``request_done`` for the backend stages."""
        self._reply = None
        return verdict

    def reply(self, msg: wire.WireMessage) -> Reply:
        """The backend reply ``msg`` with the request it answers, matched by the first stage that asks."""
        r = self._reply
        if r is None or r.msg is not msg:
            r = self._reply = read_reply(self, msg)
        return r


# --------------------------------------------------------------------------- one request, read once


@attrs.define(eq=False)
class Request:
    """A client request as every client stage sees it.

    ``plain`` is the request decompressed (``msg`` itself when it was not
    compressed).  ``name`` is None for a legacy opcode (OP_INSERT,
    OP_GET_MORE… — no command).  The stages fill in the rest as they go.
    """

    msg: wire.WireMessage
    plain: wire.WireMessage
    name: str | None = None
    db: str | None = None
    collection: str | None = None
    body: Any = None
    sequences: dict[str, int] | None = None  # OP_MSG document sequences: identifier → document count
    more_to_come: bool = False
    compressor: str | None = None  # the client's compressor, when it came in OP_COMPRESSED
    handshake: bool = False  # SessionGate: a handshake command before the session is established (not audited)
    uid: str = ""  # CommandAudit: the uid of its db.session.query
    cursor_id: int | None = None  # CommandAudit: getMore's cursor
    cursor_origin: CursorOrigin | None = None
    kill: tuple = ()  # CommandAudit: killCursors' cursor ids
    pending: Pending | None = None  # InFlight: what the reply will be matched with

    @property
    def legacy_name(self) -> str:
        return f"legacy opcode {self.plain.op_code}"


def read_request(state: MongoSessionState, msg: wire.WireMessage) -> Request:
    st = state
    if msg.op_code not in REQUEST_OPCODES:
        st.commands += 1
        return Request(msg, msg)
    try:
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
                st.commands += 1
                return Request(msg, plain)
            body, name, db, coll = cmd.body, cmd.name, cmd.database, cmd.collection
            sequences, more_to_come = None, False
        else:  # OP_COMPRESSED around a legacy opcode
            st.commands += 1
            return Request(msg, plain)
        st.commands += 1
        compressor = None
        if plain is not msg:
            compressor = wire.COMPRESSOR_NAMES.get(wire.compressed_header(msg).compressor_id, "unknown")
    except PARSE_ERRORS as exc:
        # The frame is intact (the decoder found the length) but its body is not what the
        # audit can read: refused, never forwarded; the pipeline audits it (audit.malformed)
        # and ends the session after answering ok:0 (the rule of every engine).
        raise malformed(st, msg, exc) from exc
    return Request(msg, plain, name, db, coll, body, sequences, more_to_come, compressor)


def malformed(state: MongoSessionState, msg: wire.WireMessage, exc: Exception) -> MalformedMessage:
    """``malformed_request``, counted as a session error (what a client stage raises)."""
    state.errors += 1
    return malformed_request(msg, exc)


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


# --------------------------------------------------------------------------- one reply, read once


@attrs.define(eq=False)
class Reply:
    """A backend reply as every backend stage sees it: decompressed, with the request it answers."""

    msg: wire.WireMessage
    plain: wire.WireMessage
    pending: Pending | None
    _document: tuple | None = attrs.field(default=None, init=False, repr=False)

    def document(self) -> tuple[RawBSONDocument, wire.OpReply | None]:
        """``render.reply_document`` of the reply, read once (raises what it raises)."""
        if self._document is None:
            self._document = reply_document(self.plain)
        return self._document


def read_reply(state: MongoSessionState, msg: wire.WireMessage) -> Reply:
    st = state
    pending = st.pending.pop(msg.response_to, None)
    plain = msg
    if msg.op_code == wire.OP_COMPRESSED:
        # The proxy never offers compression to the backend; a server that compresses anyway is unwrapped.
        plain = wire.decompress(msg, max_message_size=max(st.max_message_size, wire.DEFAULT_MAX_MESSAGE_SIZE))
    if pending is not None and plain.more_to_come:
        st.pending[plain.request_id] = pending
    return Reply(msg, plain, pending)


# --------------------------------------------------------------------------- answers the proxy gives


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



def refuse(request: wire.WireMessage, code: int, errmsg: str, *, more_to_come: bool = False, close: bool = False) -> Verdict:
    """Answer ``request`` with ``ok: 0`` instead of forwarding it (a moreToCome request gets no answer)."""
    if more_to_come:
        return Verdict(replace=(), close=close)
    return reply(wire.error_reply_for(request, code, errmsg), close=close)
