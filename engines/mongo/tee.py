"""Mongo sessions audited through a tap (``audit.link``): the proxy's side.

When nothing in a session polices commands (no identity/access gate), the
engine's wiring offers the core a ``TapPlan`` with ``active_frames``; if the
core taps (``dbproxy.flow.assemble``), the audit observers
(``stages.audit.CommandAudit`` / ``ReplyAudit``) run in the audit worker
(``tap.MongoTap``) over the frames these tees hand it.  Unlike PostgreSQL, a
Mongo session keeps *active* messages after its handshake — the proxy
answers the authentication commands, rewrites every hello (and its reply)
and sends an OP_COMPRESSED request on decompressed (the backend link never
negotiates compression) — so the tee splits the stream:

* **passive** (almost every message): an uncompressed OP_MSG request whose
  command is neither a hello nor an authentication command, and a reply to
  one.  Checked, tapped as received, consumed without a message object; the
  pump forwards the chunk as it came (the hot path).
* **active**: everything else (hello, SASL, OP_QUERY, legacy opcodes,
  OP_COMPRESSED, replies to those).  Returned as a ``WireMessage`` to the
  session's stages, audit included, as in an untapped session.  An
  OP_COMPRESSED request whose inner message is passive is decompressed by
  ``TapCompressed``, tapped *as received* (the worker decompresses it again
  with the same libraries, so the trail names the compressor) and sent on
  decompressed; a compressed reply to a passive request likewise.

``MongoTee`` is the core ``Tee`` (the one frame loop, over the codec's
``FRAMING``): the sides' checks accept a passive frame and raise
``ActiveFrame`` at an active one.  Which replies are passive: the tees keep
the request IDs of the passive requests waiting for a reply
(``TeeState.pending``, re-keyed on an exhaust reply's moreToCome as
``session.read_reply`` does); the engine answers them ``ok: 0`` when the
backend goes away.

Nothing unaudited (issue 13): a passive request is tapped only if the
worker's stages will read it — ``check_request`` accepts exactly what
``session.read_request`` + ``render_command`` accept (a hypothesis test
holds them together).  A request it refuses raises ``MalformedMessage``
before it is consumed: the frames before it are tapped and forwarded, it is
not, and the pipeline audits it and the engine answers ``ok: 0``, as inline.

The worker's events and the proxy's inline ones go down the one ordered
link.  Notes (``TeeState.note``: a frame of the private opcode
``NOTE_OPCODE`` in the client direction's tap) tell the worker what only the
proxy knows: its own counts (added to the worker's in the end event), and
that the passive requests still waiting were answered ``ok: 0`` or will get
no reply (the worker audits their results, as
``session.lost_backend_replies`` / ``abandon_pending``).
"""

from __future__ import annotations

from typing import Any, Callable

import attrs
import bson
import orjson
from bson.errors import BSONError

from dbproxy.sansio import NEED_DATA, Verdict, replace
from dbproxy.tee import Check, FrameSide, Tee

from . import protocol as wire
from .clientauth import AUTH_COMMANDS
from .codec import FRAMING, check_checksum, check_partial, opcode_at
from .errors import AttributingDecoder
from .stages.handshake import HELLO_COMMANDS
from .stages.render import plain_sequences, render_command
from .stages.session import PARSE_ERRORS, MongoSessionState, _names, _sequence_counts, malformed

#: Commands the proxy acts on: never passive.
ACTIVE_COMMANDS = HELLO_COMMANDS | AUTH_COMMANDS
#: A note from the proxy to the worker's tap (``tap.MongoTap.note``), in the client direction's
#: stream: a frame of this opCode (0: no MongoDB opcode, so a client's is refused as garbage).
NOTE_OPCODE = 0

_HEADER = wire.HEADER.unpack_from
_U32 = wire.U32.unpack_from
_I32 = wire.I32.unpack_from
_OP_MSG = wire.OP_MSG
_MORE_TO_COME = wire.MORE_TO_COME


def check_request(raw: bytes) -> str:
    """The command name of an uncompressed OP_MSG request, once its body is known to be what the
    audit reads (raises what ``read_request`` / ``render_command`` raise on it, else returns).

    Fast path (drivers put the body first): one C decode of the body with the default codec
    options.  Its success means the top level inflates as ``wire.raw_document`` inflates it and
    the renderer renders it (its own fast path decodes the same way; failing that, its lenient
    decode succeeds); with flags 0, a body alone or followed by well-formed document sequences
    (``render.plain_sequences``: ``insert``'s ``documents``) needs nothing more, else
    ``parse_op_msg`` judges the flags and the other sections and the sequences are counted as
    ``read_request`` counts them.  Anything else is judged by the worker's own functions.
    """
    end = len(raw)
    if end > 25 and raw[20] == 0:
        size = _I32(raw, 21)[0]
        doc = None
        if 5 <= size <= end - 21:
            try:
                doc = bson.decode(memoryview(raw)[21:21 + size])
            except (BSONError, ValueError, TypeError, OverflowError):
                pass
        if doc:
            if _U32(raw, 16)[0] or (size != end - 21 and plain_sequences(raw, 21 + size, end) is None):
                op = wire.parse_op_msg(raw)
                if op.sequences_raw:
                    _sequence_counts(op)
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
    """One tapped session's proxy side: its two ``FrameSide``s, the passive requests waiting
    for a reply, and the taps (set when the core builds the tees with ``over``)."""

    state: MongoSessionState
    pending: dict = attrs.field(factory=dict)  # requestID (or exhaust reply's requestID) → True
    sides: tuple = attrs.field(init=False)
    taps: list = attrs.field(init=False, factory=lambda: [None, None])

    def __attrs_post_init__(self) -> None:
        self.sides = _sides(self)

    def over(self, decoder: Any, side: FrameSide, tap: Callable[[bytes], Any]) -> AttributingDecoder:
        """``TapPlan.tee``: the core builds this session's two tees with it (``dbproxy.flow.assemble``)."""
        inner = decoder.inner
        self.taps[0 if side is self.sides[0] else 1] = tap
        return AttributingDecoder(MongoTee(inner.buffer, side, limit=inner.max_message_size, tap=tap), decoder.side)

    @property
    def tapping(self) -> bool:
        return self.taps[0] is not None

    def note(self, **fields: Any) -> None:
        """Tell the worker's tap what only the proxy knows, in session order."""
        tap = self.taps[0]
        if tap is not None:
            body = orjson.dumps(fields)
            tap(wire.HEADER.pack(wire.HEADER_SIZE + len(body), 0, 0, NOTE_OPCODE) + body)


class ActiveFrame(Exception):
    """Raised by a side's check at a frame the proxy's stages act on: the tee stops there."""

    def __init__(self, size: int) -> None:
        self.size = size


@attrs.frozen
class PassedRun:
    """Passive frames the tee consumed before an active message in the same batch: if a stage
    rewrites that batch, the pump rebuilds it from the messages' ``raw`` — these are in it."""

    raw: bytes


#: A verdict that forwards the message as is (and marks the batch as rebuilt).
KEEP = Verdict()


class MongoTee(Tee):
    """The core ``Tee`` over the codec's ``FRAMING``, returning the active frames as messages.

    The side's checks accept a passive frame (it is tapped and consumed) and raise
    ``ActiveFrame`` at an active one; the core loop then stops with the frames
    before it consumed and tapped, and this returns a ``PassedRun`` of those (if
    any), then the active frame as a ``WireMessage``.  The header checks are the
    codec's: length (``FRAMING``), opcode (``frame_type``; also at a partly
    received frame's header, as ``MongoDecoder`` refuses garbage before its body
    arrives) and an OP_MSG checksum.
    """

    __slots__ = ("_active",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._active = 0

    def next_message(self) -> Any:
        buffer = self.buffer
        size = self._active
        if size:
            self._active = 0
            return _message(buffer.take(size))
        data, start, end = buffer.span()
        try:
            Tee.next_message(self)
        except ActiveFrame as active:
            consumed = buffer.position - start
            if consumed:
                # Passive frames were consumed in this batch: they go first, as a message of their own.
                self._active = active.size
                return PassedRun(bytes(data[start:start + consumed]))
            return _message(buffer.take(active.size))
        # A partly received frame: judged as the decoder judges it (garbage now, not after its body).
        check_partial(*buffer.span())
        return NEED_DATA


def _message(raw: bytes) -> wire.WireMessage:
    length, request_id, response_to, op_code = _HEADER(raw)
    return wire.WireMessage(length, request_id, response_to, op_code, raw)


def _active(data: Any, pos: int, size: int) -> None:
    raise ActiveFrame(size)


def _client_frame(tees: TeeState) -> Check:
    pending = tees.pending

    def check(data: Any, pos: int, size: int) -> None:
        flags = _U32(data, pos + 16)[0] if size >= 20 else 0
        if flags & wire.CHECKSUM_PRESENT:
            check_checksum(data, pos, size)
        raw = bytes(data[pos:pos + size])
        try:
            name = check_request(raw)
        except PARSE_ERRORS as exc:
            raise malformed(tees.state, _message(raw), exc) from exc
        if name in ACTIVE_COMMANDS:
            raise ActiveFrame(size)
        if not flags & _MORE_TO_COME:
            pending[_I32(data, pos + 4)[0]] = True
    return check


def _backend_frame(tees: TeeState) -> Check:
    pending = tees.pending

    def check(data: Any, pos: int, size: int) -> None:
        op_code = _I32(data, pos + 12)[0]
        flags = _U32(data, pos + 16)[0] if op_code == _OP_MSG and size >= 20 else 0
        if flags & wire.CHECKSUM_PRESENT:
            check_checksum(data, pos, size)
        if not pending.pop(_I32(data, pos + 8)[0], None):
            raise ActiveFrame(size)
        if flags & _MORE_TO_COME:
            pending[_I32(data, pos + 4)[0]] = True  # the next exhaust reply answers this one
    return check


_EVERY = frozenset(wire.KNOWN_OPCODES)


def _sides(tees: TeeState) -> tuple[FrameSide, FrameSide]:
    """This session's two ``FrameSide``s: every opcode is looked at; OP_MSG (client) and OP_MSG /
    OP_REPLY (backend) may be passive, any other frame is active."""
    client = FrameSide(FRAMING, interest=_EVERY, type_of=opcode_at,
                       checks={op: (_client_frame(tees) if op == _OP_MSG else _active) for op in _EVERY})
    backend_check = _backend_frame(tees)
    backend = FrameSide(FRAMING, interest=_EVERY, type_of=opcode_at,
                        checks={op: (backend_check if op in (_OP_MSG, wire.OP_REPLY) else _active) for op in _EVERY})
    return client, backend


class RunGuard:
    """First stage of each direction: a ``PassedRun`` is forwarded as is, seen by no stage
    (inline, there is none: one type test per message)."""

    name = "mongo-tee-run"

    def handle(self, msg: Any, ctx: Any) -> Verdict | None:
        return KEEP if type(msg) is PassedRun else None


class TapCompressed:
    """Tapped session: an OP_COMPRESSED request whose inner message is passive is tapped as
    received and sent on decompressed; any other goes on to the inline stages (which decompress
    it themselves).  Inline: nothing."""

    name = "mongo-tee-compressed-request"

    def __init__(self, tee: TeeState) -> None:
        self.tee = tee

    def handle(self, msg: Any, ctx: Any) -> Verdict | None:
        tee = self.tee
        if msg.op_code != wire.OP_COMPRESSED or not tee.tapping:
            return None
        st = tee.state
        try:
            plain = wire.decompress(msg, max_message_size=st.max_message_size)
            if plain.op_code != _OP_MSG or check_request(plain.raw) in ACTIVE_COMMANDS:
                return None
        except PARSE_ERRORS as exc:
            raise malformed(st, msg, exc) from exc
        if not plain.more_to_come:
            tee.pending[msg.request_id] = True
        tee.taps[0](msg.raw)
        return replace(plain.raw)


class TapCompressedReply:
    """Tapped session: a compressed reply to a passive request (a backend that compresses
    anyway) is tapped as received and unwrapped for the client, as ``flow.DecompressedReply``."""

    name = "mongo-tee-compressed-reply"

    def __init__(self, tee: TeeState) -> None:
        self.tee = tee

    def handle(self, msg: Any, ctx: Any) -> Verdict | None:
        tee = self.tee
        pending = tee.pending
        if msg.op_code != wire.OP_COMPRESSED or msg.response_to not in pending:
            return None
        limit = max(tee.state.max_message_size, wire.DEFAULT_MAX_MESSAGE_SIZE)
        plain = wire.decompress(msg, max_message_size=limit)
        del pending[msg.response_to]
        if plain.more_to_come:
            pending[plain.request_id] = True
        tee.taps[1](msg.raw)
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
