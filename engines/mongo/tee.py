"""Mongo sessions audited through a tap (``audit.link``): the proxy's side.

When nothing in a session acts on commands (no identity/access gate, so no
policy), the audit observers (``stages.audit.CommandAudit`` / ``ReplyAudit``)
run in the audit worker (``tap.MongoTap``) over the frames this tee hands it;
the proxy only frames, checks and forwards.  Unlike PostgreSQL, a Mongo
session keeps *active* messages after its handshake — the proxy answers the
authentication commands, rewrites every hello (and its reply) and sends an
OP_COMPRESSED request on decompressed (the backend link never negotiates
compression) — so the tee splits the stream:

* **passive** (almost every message): an uncompressed OP_MSG request whose
  command is neither a hello nor an authentication command, and a reply to
  one.  Checked, tapped as received, consumed without a message object; the
  pump forwards the chunk as it came (the hot path).
* **active**: everything else (hello, SASL, OP_QUERY, legacy opcodes,
  OP_COMPRESSED, replies to those).  Returned as a ``WireMessage`` to the
  session's full inline stages, audit included, as in an untapped session.
  An OP_COMPRESSED request whose inner message is passive is decompressed by
  ``TapCompressed``, tapped *as received* (the worker decompresses it again
  with the same libraries, so the trail names the compressor) and sent on
  decompressed; a compressed reply to a passive request likewise.

Which replies are passive: the tee keeps the request IDs of the passive
requests waiting for a reply (``TeeState.pending``, re-keyed on an exhaust
reply's moreToCome as ``session.read_reply`` does); the engine answers them
``ok: 0`` when the backend goes away.

Nothing unaudited (issue 13): a passive request is tapped only if the
worker's stages will read it — ``check_request`` accepts exactly what
``session.read_request`` + ``CommandAudit`` accept: its fast path (flags 0,
one body section) is one lenient C decode of the body, which succeeding
means the renderer succeeds; anything else is judged by the worker's own
functions.  A request it refuses raises ``MalformedMessage`` before it is
consumed: the frames before it are tapped and forwarded, it is not, and the
pipeline audits it and the engine answers ``ok: 0`` as inline.

The worker's events and the proxy's inline ones go down the one ordered
link; notes on direction 2 (``NOTE``) tell the worker what only the proxy
knows: its own command counts (added to the worker's in the end event), and
that the requests it waits on were lost or abandoned (the worker audits
their results, as ``session.lost_backend_replies`` / ``abandon_pending``).
"""

from __future__ import annotations

from typing import Any, Callable

import attrs
import bson
import orjson
from bson.codec_options import CodecOptions, DatetimeConversion
from bson.errors import BSONError

from dbproxy.buffer import ReceiveBuffer
from dbproxy.errors import MalformedMessage, RemoteProtocolError
from dbproxy.sansio import NEED_DATA, Verdict, replace

from . import protocol as wire
from .clientauth import AUTH_COMMANDS
from .codec import FRAMING, check_opcode
from .opmsg import verify_op_msg_checksum_raw
from .stages.handshake import HELLO_COMMANDS
from .stages.render import render_command
from .stages.session import PARSE_ERRORS, MongoSessionState, _names, _sequence_counts, malformed, malformed_request

#: Commands the proxy acts on: never passive.
ACTIVE_COMMANDS = HELLO_COMMANDS | AUTH_COMMANDS
#: The tap's third direction: a JSON note from the proxy (``tap.MongoTap.note``).
NOTE = 2

_LENIENT = CodecOptions(datetime_conversion=DatetimeConversion.DATETIME_AUTO)
_HEADER = wire.HEADER.unpack_from
_U32 = wire.U32.unpack_from
_I32 = wire.I32.unpack_from
_OP_MSG = wire.OP_MSG
_MORE_TO_COME = wire.MORE_TO_COME


def check_request(raw: bytes) -> str:
    """The command name of an uncompressed OP_MSG request, once its body is known to be what the
    audit reads (raises what ``read_request`` / ``render_command`` raise on it, else returns)."""
    end = len(raw)
    if end > 25 and _U32(raw, 16)[0] == 0 and raw[20] == 0 and _I32(raw, 21)[0] == end - 21:
        # Flags 0 and one kind-0 section filling the message: parse_op_msg accepts it when the
        # body is a document; a lenient decode accepts exactly the valid BSON the renderer renders.
        try:
            doc = bson.decode(memoryview(raw)[21:], codec_options=_LENIENT)
        except (BSONError, ValueError, TypeError, OverflowError):
            doc = None
        if doc:
            return next(iter(doc))
    op = wire.parse_op_msg(raw)
    name, _db, _coll = _names(op.body)
    if name in ACTIVE_COMMANDS:
        return name
    sequences = _sequence_counts(op) if op.sequences_raw else None
    render_command(op.body, name, sequences)
    return name


@attrs.define(eq=False)
class TeeState:
    """What the two tees of a session share: passive requests waiting for a reply, and the tap."""

    tap: Callable[[int, bytes], Any]  # (direction, bytes): the session's audit tap
    pending: dict = attrs.field(factory=dict)  # requestID (or exhaust reply's requestID) → True

    def note(self, **fields: Any) -> None:
        self.tap(NOTE, orjson.dumps(fields))


@attrs.frozen
class PassedRun:
    """Passive frames the tee consumed before an active message in the same batch: if a stage
    rewrites that batch, the pump rebuilds it from the messages' ``raw`` — these are in it."""

    raw: bytes


#: A verdict that forwards the message as is (and marks the batch as rebuilt).
KEEP = Verdict()


class MongoTee:
    """The decoder of one direction of a tapped session (``client`` or ``backend``).

    Frames with the codec's checks (``FRAMING``, opcode, OP_MSG checksum: the same
    errors at the same byte as ``MongoDecoder``), taps and consumes passive frames,
    and returns the first active one as a ``WireMessage`` (after a ``PassedRun`` of
    the passive frames before it, if any).
    """

    __slots__ = ("buffer", "max_message_size", "side", "tee", "state", "_active")

    def __init__(self, buffer: ReceiveBuffer, *, max_message_size: int, side: str, tee: TeeState,
                 state: MongoSessionState) -> None:
        self.buffer = buffer
        self.max_message_size = max_message_size
        self.side = side
        self.tee = tee
        self.state = state
        self._active = 0  # size of an active frame at the read position, found by the last call

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self.buffer.feed(data)

    def announced_length(self) -> int | None:
        buf = self.buffer
        return buf.i32_le() if len(buf) >= 4 else None

    def next_message(self) -> Any:
        buf = self.buffer
        size = self._active
        if size:
            self._active = 0
            return self._message(buf.take(size))
        data, start, end = buf.span()
        pos = start
        limit = self.max_message_size
        client = self.side == "client"
        pending = self.tee.pending
        active = 0
        try:
            while True:
                if end - pos < 16:
                    if end - pos >= 4 and _I32(data, pos)[0] < 16:
                        FRAMING.size_at(data, pos, end, limit)
                    break
                length, request_id, response_to, op_code = _HEADER(data, pos)
                if length >= 16:
                    check_opcode(op_code, length)
                size = FRAMING.size_at(data, pos, end, limit)
                if end - pos < size:
                    break
                if op_code == _OP_MSG:
                    flags = _U32(data, pos + 16)[0] if size >= 20 else 0
                    if flags & wire.CHECKSUM_PRESENT:
                        self._checksum(data, pos, size)
                    if client:
                        raw = bytes(data[pos:pos + size])
                        try:
                            name = check_request(raw)
                        except PARSE_ERRORS as exc:
                            raise malformed(self.state, wire.WireMessage(length, request_id, response_to, op_code, raw), exc) from exc
                        if name in ACTIVE_COMMANDS:
                            active = size
                            break
                        if not flags & _MORE_TO_COME:
                            pending[request_id] = True
                        self.tee.tap(0, raw)
                        pos += size
                        continue
                    if pending.pop(response_to, None):
                        if flags & _MORE_TO_COME:
                            pending[request_id] = True  # the next exhaust reply answers this one
                        self.tee.tap(1, bytes(data[pos:pos + size]))
                        pos += size
                        continue
                elif not client and op_code == wire.OP_REPLY and pending.pop(response_to, None):
                    self.tee.tap(1, bytes(data[pos:pos + size]))
                    pos += size
                    continue
                active = size
                break
        finally:
            # Also on a refused frame: the frames before it were tapped and are forwarded.
            if pos != start:
                buf.skip(pos - start)
        if not active:
            return NEED_DATA
        if pos != start:
            # Passive frames were consumed in this batch: they go first, as a message of their own.
            self._active = active
            return PassedRun(bytes(data[start:pos]))
        return self._message(buf.take(active))

    @staticmethod
    def _message(raw: bytes) -> wire.WireMessage:
        length, request_id, response_to, op_code = _HEADER(raw)
        return wire.WireMessage(length, request_id, response_to, op_code, raw)

    @staticmethod
    def _checksum(data: Any, pos: int, size: int) -> None:
        view = memoryview(data)[pos:pos + size]
        try:
            verify_op_msg_checksum_raw(view)
        except RemoteProtocolError as exc:
            raise MalformedMessage(str(exc), client_hint=exc.client_hint, type_name="OP_MSG",
                                   type_code=_OP_MSG, raw=view, length=size) from None
        finally:
            view.release()


class RunGuard:
    """First stage of each direction: a ``PassedRun`` is forwarded as is, seen by no stage."""

    name = "mongo-tee-run"

    def handle(self, msg: Any, ctx: Any) -> Verdict | None:
        return KEEP if type(msg) is PassedRun else None


class TapCompressed:
    """An OP_COMPRESSED request whose inner message is passive: tapped as received, sent on
    decompressed; any other goes on to the inline stages (which decompress it themselves)."""

    name = "mongo-tee-compressed-request"

    def __init__(self, state: MongoSessionState, tee: TeeState) -> None:
        self.state = state
        self.tee = tee

    def handle(self, msg: Any, ctx: Any) -> Verdict | None:
        if msg.op_code != wire.OP_COMPRESSED:
            return None
        st = self.state
        try:
            plain = wire.decompress(msg, max_message_size=st.max_message_size)
            if plain.op_code != _OP_MSG or check_request(plain.raw) in ACTIVE_COMMANDS:
                return None
        except PARSE_ERRORS as exc:
            raise malformed(st, msg, exc) from exc
        if not plain.more_to_come:
            self.tee.pending[msg.request_id] = True
        self.tee.tap(0, msg.raw)
        return replace(plain.raw)


class TapCompressedReply:
    """A compressed reply to a passive request (a backend that compresses anyway): tapped as
    received, unwrapped for the client as inline (``flow.DecompressedReply``)."""

    name = "mongo-tee-compressed-reply"

    def __init__(self, state: MongoSessionState, tee: TeeState) -> None:
        self.state = state
        self.tee = tee

    def handle(self, msg: Any, ctx: Any) -> Verdict | None:
        pending = self.tee.pending
        if msg.op_code != wire.OP_COMPRESSED or msg.response_to not in pending:
            return None
        plain = wire.decompress(msg, max_message_size=max(self.state.max_message_size, wire.DEFAULT_MAX_MESSAGE_SIZE))
        del pending[msg.response_to]
        if plain.more_to_come:
            pending[plain.request_id] = True
        self.tee.tap(1, msg.raw)
        return replace(plain.raw)


def lost_passive_replies(tee: TeeState, errmsg: str, code: int) -> bytes:
    """``ok: 0`` to every passive request still waiting; the worker audits them (a ``lost`` note)."""
    if not tee.pending:
        return b""
    out = b"".join(wire.encode_op_msg(wire.error_document(code, errmsg), response_to=rid) for rid in tee.pending)
    tee.pending.clear()
    tee.note(lost=errmsg, code=code)
    return out


def abandon_passive(tee: TeeState, reason: str) -> None:
    if tee.pending:
        tee.pending.clear()
        tee.note(abandon=reason)
