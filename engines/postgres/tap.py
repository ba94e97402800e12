"""PostgreSQL sessions audited through a tap (see ``audit.link``).

Proxy side — ``Framer``: the decoder a session's pumps use when nothing in
the pipeline acts on messages (no statement rules): it checks every frame's
header exactly as the real decoders do (length >= 4, ``max_message_size``,
so a bad or oversized frame still ends the session with the same error
before it is forwarded), consumes whole frames without building message
objects, and taps the frames the audit stages read; the pump forwards the
chunk as received.  It notes the client's Terminate, and the type of the last
whole frame (``last_type``: did the backend say why before it closed?).

Bodies the worker will parse are known to parse: before a frame of a type
the audit reads is consumed, its ``checks`` entry accepts it only if the
``parse_*`` function the audit stage will run accepts it
(``FRONTEND_CHECKS``: Query, Parse, Bind, Execute, Close;
``BACKEND_CHECKS``: CommandComplete, ErrorResponse).  A body
that does not parse raises ``MalformedMessage``: the frames before it are
tapped and forwarded, it is not, and the pipeline audits it
(``audit.malformed``) and ends the session with FATAL 08P01 — what the
in-process stages do with the same bytes, so both audit modes behave alike.
Cost: Query, CommandComplete and ErrorResponse are accepted on one byte
(their last byte is the NUL the parser needs; only a frame that fails it
goes to the parser, which decides); Parse/Bind/Execute/Close are walked in
place by a check that accepts exactly what their parser accepts (no copy, no
objects; hypothesis holds them together), and a frame it refuses is handed
to the parser for its error.  DataRow, CopyData and the other types are not
looked at.

Worker side — ``Tap``: the real decoders and the engine's own audit stages
(``stages.FrontendAudit`` / ``BackendAudit``) over those bytes, so a tapped
session's trail is the one the in-process stages would write.  A frame a
stage cannot handle (the proxy checked it, so this means a bug or a check
out of step with its parser) is audited as ``audit.malformed`` and the tap
goes on with the next frame: one frame never ends a session's audit.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Mapping
from typing import Any, Callable

from dbproxy.audit.events import MALFORMED
from dbproxy.buffer import ReceiveBuffer
from dbproxy.errors import FrameTooLarge, MalformedMessage, ProtocolError
from dbproxy.sansio import NEED_DATA

from . import messages as m
from .codec import DEFAULT_MAX_MESSAGE_SIZE, _bad_length
from .messages import BE, FE, Message
from .stages import BackendAudit, FrontendAudit, PgSessionState

log = logging.getLogger("dbproxy.postgres.tap")

_LEN = struct.Struct(">i")
_TERMINATE = FE.TERMINATE

# A check: (buffer data, frame start, frame length field) -> None, or raises MalformedMessage.


def _refuse(parse: Callable[[Message], Any], data: Any, pos: int, length: int) -> None:
    """A frame its check refused: the audit's parser says why (its MalformedMessage)."""
    frame = Message(data[pos], bytes(data[pos:pos + length + 1]))
    parse(frame)
    # The parser would have read it: the check is stricter than the parser (a bug the tests
    # look for).  Still refused: never forward a frame the proxy did not accept.
    raise MalformedMessage(f"{chr(frame.type)!r} frame refused by its check", type_name=f"{chr(frame.type)!r} frame",
                           type_code=chr(frame.type), raw=frame.raw)


_I16 = struct.Struct(">h").unpack_from
_I32 = _LEN.unpack_from

# Checks that walk a frame in place (no copy, no objects) and accept exactly what the audit's
# parser accepts (tests/unit/postgres/test_tap_malformed.py holds them together with hypothesis);
# a frame one refuses goes to the parser for its error.  Offsets: ``p`` is the frame's type byte,
# ``end`` one past its last byte.  A string is "a NUL before end"; a count is read only if its
# bytes are there; what follows the last field the parser reads is not looked at (by it either).


def _check_parse(d: Any, p: int, length: int) -> None:
    """Parse (§55.7): name\\0 query\\0 int16 n >= 0, n int32 type OIDs."""
    end = p + length + 1
    q = d.find(0, p + 5, end)
    if q >= 0:
        q = d.find(0, q + 1, end)
        if q >= 0 and q + 3 <= end:
            n = _I16(d, q + 1)[0]
            if n >= 0 and q + 3 + 4 * n <= end:
                return
    _refuse(m.parse_parse, d, p, length)


def _check_bind(d: Any, p: int, length: int) -> None:
    """Bind (§55.7): portal\\0 statement\\0 int16 formats; int16 n values (int32 size, -1 NULL); int16 result formats."""
    if not _bind_ok(d, p, p + length + 1):
        _refuse(m.parse_bind, d, p, length)


def _bind_ok(d: Any, p: int, end: int) -> bool:
    p = d.find(0, p + 5, end)
    if p < 0:
        return False
    p = d.find(0, p + 1, end) + 1
    if p == 0 or p + 2 > end:
        return False
    formats = _I16(d, p)[0]
    p += 2 + 2 * formats
    if formats < 0 or p + 2 > end:
        return False
    n = _I16(d, p)[0]
    p += 2
    if n < 0:
        return False
    for _ in range(n):
        if p + 4 > end:
            return False
        size = _I32(d, p)[0]
        p += 4
        if size != -1:
            p += size
            if size < 0 or p > end:
                return False
    if p + 2 > end:
        return False
    results = _I16(d, p)[0]
    return results >= 0 and p + 2 + 2 * results <= end


def _check_execute(d: Any, p: int, length: int) -> None:
    """Execute (§55.7): portal\\0 int32 row limit."""
    end = p + length + 1
    q = d.find(0, p + 5, end)
    if q < 0 or q + 5 > end:
        _refuse(m.parse_execute, d, p, length)


def _check_close(d: Any, p: int, length: int) -> None:
    """Close (§55.7): one kind byte, name\\0."""
    end = p + length + 1
    if p + 6 > end or d.find(0, p + 6, end) < 0:
        _refuse(m.parse_close, d, p, length)


def _nul_terminated(parse: Callable[[Message], Any]) -> Callable[[Any, int, int], None]:
    """Bodies a parser accepts whenever their last byte is a NUL (``parse_query`` and
    ``parse_command_complete`` read up to the first NUL; ``parse_error_fields`` needs the last
    byte NUL): that one byte accepts them; any other frame goes to the parser, which decides."""
    def check(data: Any, pos: int, length: int) -> None:
        if length > 4 and data[pos + length] == 0:
            return
        parse(Message(data[pos], bytes(data[pos:pos + length + 1])))
    return check


#: The types ``FrontendAudit`` parses (Sync, FunctionCall and Terminate have no body it reads).
FRONTEND_CHECKS: Mapping[int, Callable[[Any, int, int], None]] = {
    FE.QUERY: _nul_terminated(m.parse_query),
    FE.PARSE: _check_parse,
    FE.BIND: _check_bind,
    FE.EXECUTE: _check_execute,
    FE.CLOSE: _check_close,
}
#: The types ``BackendAudit`` parses (EmptyQueryResponse, PortalSuspended, ReadyForQuery: none read).
BACKEND_CHECKS: Mapping[int, Callable[[Any, int, int], None]] = {
    BE.COMMAND_COMPLETE: _nul_terminated(m.parse_command_complete),
    BE.ERROR_RESPONSE: _nul_terminated(m.parse_error_fields),
}


class Framer:
    """Consumes whole typed frames (header-checked); yields no messages.

    With ``tap``: every frame whose type is in ``interest`` (the types the
    audit stage of this direction acts on) is handed to ``tap`` as soon as it
    is framed — before the pump sends the batch, so a query reaches the audit
    before its answer can.  The rest (DataRow, CopyData, a password…) never
    leaves the proxy: a 100 MB result costs the audit worker nothing.
    """

    __slots__ = ("buffer", "max_message_size", "frames", "terminated", "tap", "interest", "last_type", "checks")

    def __init__(self, buffer: ReceiveBuffer, *, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
                 tap: Callable[[bytes], Any] | None = None, interest: frozenset = frozenset(),
                 checks: Mapping[int, Callable[[Any, int, int], None]] | None = None) -> None:
        self.buffer = buffer
        self.max_message_size = max_message_size
        self.frames = 0
        self.terminated = False
        self.tap = tap
        self.interest = interest
        self.last_type = 0  # type byte of the last whole frame (0: none yet)
        # The body checks of the tapped types (FRONTEND_CHECKS / BACKEND_CHECKS): a tap's
        # frames are the ones the worker parses, so they must parse.
        self.checks = checks or {}

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self.buffer.feed(data)

    def next_message(self) -> Any:
        data, start, end = self.buffer.span()
        pos = start
        unpack = _LEN.unpack_from
        limit = self.max_message_size
        tap = self.tap
        interest = self.interest
        checks = self.checks
        run = -1  # start of the current run of frames for the tap
        mtype = 0
        parts: list = []
        frames = 0
        try:
            while end - pos >= 5:
                length = unpack(data, pos + 1)[0]
                if length < 4:
                    raise _bad_length(length)
                if length > limit:
                    raise FrameTooLarge(length, limit, what=f"message {chr(data[pos])!r}")
                if end - pos <= length:
                    break
                mtype = data[pos]
                if mtype == _TERMINATE:
                    self.terminated = True
                if tap is not None:
                    if mtype in interest:
                        check = checks.get(mtype)
                        if check is not None:
                            check(data, pos, length)  # raises MalformedMessage: not consumed, not tapped
                        if run < 0:
                            run = pos
                    elif run >= 0:
                        parts.append(data[run:pos])
                        run = -1
                pos += length + 1
                frames += 1
        finally:
            # Also on a refused frame: the frames before it are forwarded, so tapped first.
            if pos != start:
                self.buffer.skip(pos - start)
                self.frames += frames
                self.last_type = mtype  # set per batch, not per frame
            if run >= 0:
                parts.append(data[run:pos])
            if parts:
                payload = parts[0] if len(parts) == 1 else b"".join(parts)
                tap(bytes(payload) if type(payload) is not bytes else payload)
        return NEED_DATA

    def announced_length(self) -> int | None:
        """Wire length of the partly received frame (None: header incomplete); for the buffer budget."""
        buf = self.buffer
        if len(buf) < 5:
            return None
        return 1 + buf.i32_be(1)


class Tap:
    """One session's audit in the audit worker: frames in, the audit stages run on them.

    Only the message types a stage acts on (its ``interest``) become
    ``Message`` objects; any other frame is stepped over by its header (the
    proxy's ``Framer`` sends none, but a tap fed raw bytes works the same).
    """

    def __init__(self, audit: Any) -> None:
        self.audit = audit
        self.state = PgSessionState()
        self.buffers = (ReceiveBuffer(), ReceiveBuffer())
        self.stages = (FrontendAudit(self.state, audit), BackendAudit(self.state, audit))

    def feed(self, direction: int, data: bytes) -> None:
        buf = self.buffers[direction]
        stage = self.stages[direction]
        interest = stage.interest
        handle = stage.handle
        buf.feed(data)
        raw, start, end = buf.span()
        pos = start
        unpack = _LEN.unpack_from
        while end - pos >= 5:
            length = unpack(raw, pos + 1)[0]
            if length < 4:  # the proxy's Framer refused these already
                buf.skip(pos - start)
                raise _bad_length(length)
            if end - pos <= length:
                break
            mtype = raw[pos]
            if mtype in interest:
                frame = bytes(raw[pos:pos + length + 1])
                try:
                    handle(Message(mtype, frame), None)
                except Exception as exc:  # one frame never ends the session's audit
                    self._malformed(direction, frame, exc)
            pos += length + 1
        buf.skip(pos - start)
        buf.compact()

    def _malformed(self, direction: int, frame: bytes, exc: Exception) -> None:
        if not isinstance(exc, MalformedMessage):
            if not isinstance(exc, ProtocolError):
                log.exception("audit stage failed on a %r frame of %d bytes", chr(frame[0]), len(frame))
            exc = MalformedMessage(f"audit stage failed: {exc.__class__.__name__}: {exc}",
                                   type_name=f"{chr(frame[0])!r} frame", type_code=chr(frame[0]), raw=frame)
        self.audit.emit(MALFORMED, direction="client" if direction == 0 else "backend", success=False,
                        **exc.audit_fields())

    def counts(self) -> dict:
        return {"queries": self.state.queries, "errors": self.state.errors}
