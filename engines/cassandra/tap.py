"""Cassandra sessions audited through a tap: the proxy tees frames, the audit worker audits them.

When nothing in a session acts on messages but ``stages.SessionGuard`` (no
statement policy), the core (``dbproxy.flow.assemble``) puts a ``CqlTee`` in
place of each direction's decoder and the audit worker runs the observers
(``observers.RequestAudit`` / ``ResponseAudit``) in a ``CqlTap``.

Proxy side — ``CqlTee``: drives the direction's own ``CqlDecoder`` (its one
frame loop: the header checks, the size limit, v5 segments with their CRCs
and LZ4, all exactly as inline), so the framing, every error and the byte
where it is raised are the inline ones; the pump forwards the received
chunk as it came.  It reads the decoder's envelopes (``next_envelope``: a
frame's fields as a tuple) and builds a ``Frame`` only for a frame it must
read (a request for its parser, a frame for the guard, a result it notes),
so the hot path is the segment pass and a few tuple reads per frame.  What
it adds per frame:

- client → backend: a request the audit reads (QUERY, PREPARE, EXECUTE,
  BATCH, REGISTER) is known to parse before it can be forwarded: EXECUTE
  and QUERY by an in-place walk (``checks.py``), anything that walk does not
  accept by the very parser ``RequestAudit`` runs
  (``observers.REQUEST_PARSERS``); one that does not parse is refused (``Refused``, raised by the guard: ``audit.malformed``,
  PROTOCOL_ERROR on its stream), as inline.  Its stream is noted as pending
  (``state.pending``: the requests that get SERVER_ERROR when the backend is
  lost).  STARTUP / AUTH_RESPONSE go to the guard as messages.
- backend → client: every response frees its stream; a RESULT Set_keyspace
  sets the session's ``db_name`` (the proxy's own events — the session's
  end — carry it, as inline), a RESULT Prepared answering a PREPARE goes
  into the engine's ``PreparedCache`` (the statement policy of a policed
  session checks an EXECUTE against the CQL its id stands for, wherever it
  was prepared).  Every response is tapped (``ResponseAudit``
  frees streams on all of them), a RESULT Rows only up to its row count when
  it is large: the rows never leave the proxy.

What goes to the worker is whole frames at the message layer: de-segmented
and LZ4-decompressed in v5 (the framing is done; the worker never sees a
segment), as on the wire in v3/v4 (a compressed body stays compressed: the
worker's ``Frame.body()`` decompresses it with the session's algorithm, which
its tap is given: ``TapPlan.params``).  The
framing switch happens in the handshake, before any tee exists, so a tee's
framing is fixed for the session; a STARTUP that would switch it later is
refused by the guard.

The batch contract of the pump (``dbproxy.pipeline``): a decoder's consumed
span must be the wire bytes of the messages it returned.  A tee returns none
— until a frame needs a stage (the guard): then the frames it already
consumed in this batch come out first as one ``Passthrough`` message, the
frame itself follows (a ``Frame``, or ``Refused``), and so does every
later frame of the batch; a rebuilt batch (a refusal) is then the forwarded
frames re-encoded, as inline.

Worker side — ``CqlTap`` (``audit.frametap.FrameTap``): the same frame loop
over the tapped bytes, the engine's ``Frame`` and its observers, with a
``PreparedCache`` of the worker's own (prepared ids are learnt from the
PREPAREs and RESULTs it audits, exactly as the inline one from those the
proxy sees).  EXECUTE and RESULT Void/Rows — a driver's load — are audited
in place first (``tapfast.py``: the same events, no ``Frame`` or parsed
records); whatever that declines goes to the observers.  A keyspace change moves ``db_name`` in the worker's template
for the session's later events.
"""

from __future__ import annotations

import collections
import struct
from typing import Any, Callable

from dbproxy.audit.frametap import FrameTap
from dbproxy.errors import ProtocolError
from dbproxy.sansio import NEED_DATA, LengthPrefixed
from dbproxy.tee import FrameSide, TapPlan

from . import protocol as F
from .checks import envelope_parses
from .observers import REQUEST_PARSERS, CqlSessionState, RequestAudit, ResponseAudit, malformed_request
from .prepared import PreparedCache, learn_prepared
from .tapfast import FastCqlAudit

_STARTUP = F.Opcode.STARTUP
_AUTH_RESPONSE = F.Opcode.AUTH_RESPONSE
_RESULT = F.Opcode.RESULT
_EVENT = F.Opcode.EVENT
_PREPARE = F.Opcode.PREPARE
_SET_KEYSPACE = F.ResultKind.SET_KEYSPACE
_PREPARED = F.ResultKind.PREPARED
_NOTED = (_SET_KEYSPACE, _PREPARED)
_UNAUDITED = object()
_COMPRESSED = F.FLAG_COMPRESSION
_FIRST_SEGMENT_VERSION = F.FIRST_SEGMENT_VERSION
_PREFIX_FLAGS = F.FLAG_TRACING | F.FLAG_WARNING | F.FLAG_CUSTOM_PAYLOAD
_KIND = struct.Struct(">i").unpack_from
_LENGTH = struct.Struct(">I")
_FIRST_FLAGS_STREAM = struct.Struct(">BBh").unpack_from  # native protocol §2: version, flags, stream
_VERSION_MASK = F.VERSION_MASK

#: A RESULT Rows whose body is larger is tapped only up to its row count (``Rows.end``).
ROWS_CUT = 16 * 1024
#: A compressed v3/v4 RESULT larger than this is not opened by the proxy for its kind: a
#: Set_keyspace result is a kind and a keyspace name (plus, at most, a warning or two).
KIND_PEEK_LIMIT = 64 * 1024


def _bad_length(length: int) -> Exception:  # never: an unsigned length is not below 0
    return F.CqlProtocolError(f"negative CQL frame length {length}")


#: The frame layout of what a tee hands the worker: v3+ frames, a 9-byte header whose
#: unsigned length (offset 5) counts the body, the opcode at offset 4 (native protocol §2).
FRAME_LAYOUT = LengthPrefixed(header_size=F.HEADER_SIZE, length_format=">I", length_offset=5, extra=F.HEADER_SIZE,
                              min_length=0, bad_length=_bad_length)
CLIENT_SIDE = FrameSide(FRAME_LAYOUT, interest=RequestAudit.interest, type_offset=4)
BACKEND_SIDE = FrameSide(FRAME_LAYOUT, interest=ResponseAudit.interest, type_offset=4)


class _SessionTees:
    """``TapPlan.tee`` for one session: ``over(decoder, side, tap)`` builds its ``CqlTee``s (a tee
    needs the session's state, which a class alone does not carry)."""

    __slots__ = ("cls", "state")

    def __init__(self, cls: type, state: CqlSessionState) -> None:
        self.cls = cls
        self.state = state

    def over(self, decoder: Any, side: FrameSide, tap: Callable[[bytes], Any]) -> "CqlTee":
        return self.cls(decoder, tap, self.state, client=side is CLIENT_SIDE)


class Passthrough:
    """Frames a tee consumed in this batch before one that needs a stage: forwarded as they are."""

    __slots__ = ("raw",)
    opcode = -1
    refusal = None

    def __init__(self, raw: bytes) -> None:
        self.raw = raw


class Refused:
    """A request whose body does not parse: ``SessionGuard`` raises ``refusal`` for the pump."""

    __slots__ = ("raw", "refusal")
    opcode = -1

    def __init__(self, frame: F.Frame, refusal: Exception) -> None:
        self.raw = frame.raw
        self.refusal = refusal


class CqlTee:
    """A direction's decoder in a tapped session (see the module docstring).

    ``decoder``: the direction's ``CqlDecoder`` (its buffer and framing are
    the tee's); ``tap(bytes)``: hands frames to the audit worker;
    ``state``: the session's ``CqlSessionState`` (``pending``, ``keyspace``,
    ``session``).  ``frames``, ``last_type`` and ``seen`` as a core ``Tee``.
    """

    __slots__ = ("decoder", "buffer", "tap", "state", "client", "frames", "last_type", "seen",
                 "_out", "_consumed", "_parts", "_slow")

    def __init__(self, decoder: Any, tap: Callable[[bytes], Any], state: CqlSessionState, *, client: bool) -> None:
        self.decoder = decoder
        self.buffer = decoder.buffer
        self.tap = tap
        self.state = state
        self.client = client
        self.frames = 0
        self.last_type = 0
        self.seen: set[int] = set()
        self._out: collections.deque = collections.deque()
        self._consumed: list[bytes] = []  # message-layer bytes of the frames consumed in this batch
        self._parts: list[bytes] = []  # frames for the tap, not yet handed over
        self._slow = False  # this batch has returned a message: every frame of it is returned

    @classmethod
    def plan(cls, state: CqlSessionState, compression: str | None) -> TapPlan:
        """The session's ``TapPlan``: tees over this session's state, the worker's ``CqlTap`` with
        the session's v3/v4 compression (``Frame.body()`` needs it there)."""
        return TapPlan(CqlTap, CLIENT_SIDE, BACKEND_SIDE, params={"compression": compression} if compression else {},
                       tee=_SessionTees(cls, state))

    @property
    def max_message_size(self) -> int:
        return self.decoder.max_message_size

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self.buffer.feed(data)

    def announced_length(self) -> int | None:
        return self.decoder.announced_length()

    def next_message(self) -> Any:
        out = self._out
        if out:
            return out.popleft()
        next_envelope = self.decoder.next_envelope
        consumed = self._consumed
        parts = self._parts
        handle = self._request if self.client else self._response
        try:
            while True:
                # An envelope: the frame's fields as a tuple (``Frame(*envelope)``); a Frame is
                # built only for the few frames the proxy reads (a parse, a stage, a result it notes).
                envelope = next_envelope()
                if envelope is NEED_DATA:
                    self._slow = False
                    consumed.clear()
                    return NEED_DATA
                self.frames += 1
                self.last_type = envelope[3]
                special = handle(envelope, parts)
                if special is None and not self._slow:
                    consumed.append(envelope[4])
                    continue
                # A frame for a stage (or any frame after one, in this batch): the frames
                # consumed before it go first, as one message, so a rebuilt batch has them.
                self._slow = True
                message = F.Frame(*envelope) if special is None else special
                if consumed:
                    out.append(message)
                    message = Passthrough(b"".join(consumed))
                    consumed.clear()
                return message
        finally:
            # Before the pump sends anything of this batch (also on an error: the frames
            # before the bad one are forwarded, so tapped first).
            if parts:
                self.tap(parts[0] if len(parts) == 1 else b"".join(parts))
                parts.clear()

    # -- per frame --------------------------------------------------------------------------
    def _request(self, envelope: tuple, parts: list) -> Any:
        version, flags, stream, op, raw, offset, _ = envelope
        parse = REQUEST_PARSERS.get(op)
        if parse is not None:
            parsed = None
            # The parser decides (and a PREPARE's text is kept) where the in-place walk does not.
            if op == _PREPARE or not envelope_parses(op, flags, raw, offset, version):
                frame = F.Frame(*envelope)
                try:
                    parsed = parse(frame)
                except ProtocolError as exc:
                    return Refused(frame, malformed_request(frame, exc))
            # A PREPARE's (text, keyspace): its answer teaches the engine's PreparedCache, which
            # the statement policy of every session reads (ids prepared here, executed there).
            self.state.pending[stream] = (
                (parsed.query, parsed.keyspace or self.state.keyspace) if op == _PREPARE else None)
            parts.append(raw)
            return None
        if op == _STARTUP or op == _AUTH_RESPONSE:
            return F.Frame(*envelope)
        return None

    def _response(self, envelope: tuple, parts: list) -> None:
        op = envelope[3]
        if op == _EVENT:
            parts.append(envelope[4])
            return None
        # ``ResponseAudit`` reads a RESULT only when it answers a request it audited.
        pending = self.state.pending.pop(envelope[2], _UNAUDITED)
        parts.append(envelope[4] if op != _RESULT or pending is _UNAUDITED else self._result(envelope, pending))
        return None

    def _result(self, envelope: tuple, prepare: tuple | None) -> bytes:
        version, flags, _, _, raw, offset, _ = envelope
        if flags & _COMPRESSED and version < _FIRST_SEGMENT_VERSION:  # ``Frame.compressed``
            if prepare is not None or len(raw) <= KIND_PEEK_LIMIT:
                self._note(F.Frame(*envelope), prepare)
            return raw
        if len(raw) - offset > ROWS_CUT:
            return self._rows_prefix(F.Frame(*envelope), prepare)
        if flags & _PREFIX_FLAGS or (len(raw) >= offset + 4 and _KIND(raw, offset)[0] in _NOTED):
            self._note(F.Frame(*envelope), prepare)
        return raw

    def _note(self, frame: F.Frame, prepare: tuple | None, result: Any = None) -> None:
        """What the proxy itself needs of a result (as ``ResponseAudit`` reads it): a Set_keyspace
        moves the session's keyspace, a Prepared answering a PREPARE teaches the engine's cache."""
        if result is None:
            try:
                result = F.parse_result(frame)
            except ProtocolError:
                return  # the worker's observer audits it as unparsed
        state = self.state
        if result.kind == _SET_KEYSPACE:
            state.keyspace = result.keyspace
            if state.session is not None:
                state.session.db_name = result.keyspace
        elif result.kind == _PREPARED and prepare is not None:
            learn_prepared(state.prepared, state.backend, frame, result.prepared_id, *prepare)

    def _rows_prefix(self, frame: F.Frame, prepare: tuple | None) -> bytes:
        """A large uncompressed RESULT: cut after its row count if it is Rows (all the audit reads
        of it; the header's length says so), else whole."""
        try:
            result = F.parse_result(frame)
        except ProtocolError:
            return frame.raw
        if result.rows is None:
            self._note(frame, prepare, result)
            return frame.raw
        raw = frame.raw
        end = frame.body_offset + result.rows.end
        return raw[:5] + _LENGTH.pack(result.rows.end) + raw[frame.body_offset:end]


# --------------------------------------------------------------------------- worker side

#: The worker's prepared statements (every tapped session of every listener it audits).
PREPARED = PreparedCache()


class _TemplateSession:
    """What ``ResponseAudit`` changes of a session, on the worker's template: the keyspace."""

    __slots__ = ("audit",)

    def __init__(self, audit: Any) -> None:
        self.audit = audit

    @property
    def db_name(self) -> str | None:
        return self.audit.template.get("db_name")

    @db_name.setter
    def db_name(self, keyspace: str | None) -> None:
        self.audit.update_template(db_name=keyspace)


class CqlTap(FrameTap):
    """One tapped session's audit in the audit worker: frames in, the engine's observers run on them.

    ``compression``: the session's v3/v4 per-frame compression (``TapPlan.params``)."""

    sides = (CLIENT_SIDE, BACKEND_SIDE)

    def __init__(self, audit: Any, compression: str | None = None) -> None:
        self.compression = compression
        template = audit.template
        self.state = CqlSessionState(backend=template.get("db_uri") or "", prepared=PREPARED,
                                     session=_TemplateSession(audit))
        super().__init__(audit, (RequestAudit(self.state, audit), ResponseAudit(self.state, audit)))
        # EXECUTE and RESULT Void/Rows in place (``tapfast``); anything else, the observers.
        fast = FastCqlAudit(self.state, audit)
        self.fast = (fast.request, fast.response)

    def message(self, direction: int, mtype: int, frame: bytes) -> F.Frame:
        first, flags, stream = _FIRST_FLAGS_STREAM(frame)
        return F.Frame(first & _VERSION_MASK, flags, stream, mtype, frame, F.HEADER_SIZE, self.compression)

    def describe(self, mtype: int) -> tuple[str, str]:
        try:
            return F.Opcode(mtype).name, str(mtype)
        except ValueError:
            return f"opcode {mtype:#04x}", str(mtype)

    def counts(self) -> dict:
        st = self.state
        return {"requests": st.requests, "errors": st.errors, "events": st.events}
