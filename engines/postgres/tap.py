"""PostgreSQL's part of a tapped session: what the core ``Tee`` and the worker's ``FrameTap`` need.

The core decides whether a session's audit observers run inline or in the
audit worker (``dbproxy.flow.assemble``); the engine declares, in its
``Wiring.tap`` (``TAP_PLAN``), per direction a ``FrameSide`` over the one
typed-frame loop (``codec.FRAMES``: a bad or oversized header ends the
session with the decoders' own error) and the worker-side class ``Tap``.
Frontend: the types ``FrontendAudit`` acts on are tapped, and a Terminate is
noted by the proxy itself (``watch``: a client that said goodbye gets no
08006).  Backend: the types ``BackendAudit`` acts on; the proxy's ``Tee``
keeps the type of the last frame (did the backend say why before it closed?).

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

Worker side — ``Tap``: the engine's own audit stages (``stages.FrontendAudit``
/ ``BackendAudit``) over those frames as ``Message`` objects, so a tapped
session's trail is the one the in-process stages would write; a frame a
stage cannot handle is audited as ``audit.malformed`` and the tap goes on
(``dbproxy.audit.frametap``).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any, Callable

from dbproxy.audit.frametap import FrameTap
from dbproxy.errors import MalformedMessage
from dbproxy.tee import Check, FrameSide, TapPlan

from . import messages as m
from .codec import FRAMES
from .messages import BE, FE, Message
from .stages import BackendAudit, FrontendAudit, PgSessionState

# A check (``dbproxy.tee.Check``): (buffer data, frame start, frame size on the wire) -> None,
# or raises MalformedMessage.


def _refuse(parse: Callable[[Message], Any], data: Any, pos: int, size: int) -> None:
    """A frame its check refused: the audit's parser says why (its MalformedMessage)."""
    frame = Message(data[pos], bytes(data[pos:pos + size]))
    parse(frame)
    # The parser would have read it: the check is stricter than the parser (a bug the tests
    # look for).  Still refused: never forward a frame the proxy did not accept.
    raise MalformedMessage(f"{chr(frame.type)!r} frame refused by its check", type_name=f"{chr(frame.type)!r} frame",
                           type_code=chr(frame.type), raw=frame.raw)


_I16 = struct.Struct(">h").unpack_from
_I32 = struct.Struct(">i").unpack_from

# Checks that walk a frame in place (no copy, no objects) and accept exactly what the audit's
# parser accepts (tests/unit/postgres/test_tap_malformed.py holds them together with hypothesis);
# a frame one refuses goes to the parser for its error.  Offsets: ``p`` is the frame's type byte,
# ``end`` one past its last byte (``p + size``).  A string is "a NUL before end"; a count is read only if its
# bytes are there; what follows the last field the parser reads is not looked at (by it either).


def _check_parse(d: Any, p: int, size: int) -> None:
    """Parse (§55.7): name\\0 query\\0 int16 n >= 0, n int32 type OIDs."""
    end = p + size
    q = d.find(0, p + 5, end)
    if q >= 0:
        q = d.find(0, q + 1, end)
        if q >= 0 and q + 3 <= end:
            n = _I16(d, q + 1)[0]
            if n >= 0 and q + 3 + 4 * n <= end:
                return
    _refuse(m.parse_parse, d, p, size)


def _check_bind(d: Any, p: int, size: int) -> None:
    """Bind (§55.7): portal\\0 statement\\0 int16 formats; int16 n values (int32 size, -1 NULL); int16 result formats."""
    if not _bind_ok(d, p, p + size):
        _refuse(m.parse_bind, d, p, size)


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


def _check_execute(d: Any, p: int, size: int) -> None:
    """Execute (§55.7): portal\\0 int32 row limit."""
    end = p + size
    q = d.find(0, p + 5, end)
    if q < 0 or q + 5 > end:
        _refuse(m.parse_execute, d, p, size)


def _check_close(d: Any, p: int, size: int) -> None:
    """Close (§55.7): one kind byte, name\\0."""
    end = p + size
    if p + 6 > end or d.find(0, p + 6, end) < 0:
        _refuse(m.parse_close, d, p, size)


def _nul_terminated(parse: Callable[[Message], Any]) -> Check:
    """Bodies a parser accepts whenever their last byte is a NUL (``parse_query`` and
    ``parse_command_complete`` read up to the first NUL; ``parse_error_fields`` needs the last
    byte NUL): that one byte accepts them; any other frame goes to the parser, which decides."""
    def check(data: Any, pos: int, size: int) -> None:
        if size > 5 and data[pos + size - 1] == 0:
            return
        parse(Message(data[pos], bytes(data[pos:pos + size])))
    return check


#: The types ``FrontendAudit`` parses (Sync, FunctionCall and Terminate have no body it reads).
FRONTEND_CHECKS: Mapping[int, Check] = {
    FE.QUERY: _nul_terminated(m.parse_query),
    FE.PARSE: _check_parse,
    FE.BIND: _check_bind,
    FE.EXECUTE: _check_execute,
    FE.CLOSE: _check_close,
}
#: The types ``BackendAudit`` parses (EmptyQueryResponse, PortalSuspended, ReadyForQuery: none read).
BACKEND_CHECKS: Mapping[int, Check] = {
    BE.COMMAND_COMPLETE: _nul_terminated(m.parse_command_complete),
    BE.ERROR_RESPONSE: _nul_terminated(m.parse_error_fields),
}


#: Client → backend: the frames ``FrontendAudit`` reads, checked; a Terminate is noted on the proxy.
FRONTEND_SIDE = FrameSide(FRAMES, interest=FrontendAudit.interest, checks=FRONTEND_CHECKS,
                          watch=frozenset((FE.TERMINATE,)))
#: Backend → client: the frames ``BackendAudit`` reads, checked.
BACKEND_SIDE = FrameSide(FRAMES, interest=BackendAudit.interest, checks=BACKEND_CHECKS)


class Tap(FrameTap):
    """One session's audit in the audit worker: the engine's audit stages over the tapped frames."""

    sides = (FRONTEND_SIDE, BACKEND_SIDE)

    def __init__(self, audit: Any) -> None:
        self.state = PgSessionState()
        super().__init__(audit, (FrontendAudit(self.state, audit), BackendAudit(self.state, audit)))

    def message(self, direction: int, mtype: int, frame: bytes) -> Message:
        return Message(mtype, frame)

    def describe(self, mtype: int) -> tuple[str, str]:
        return f"{chr(mtype)!r} frame", chr(mtype)

    def counts(self) -> dict:
        return {"queries": self.state.queries, "errors": self.state.errors}


#: What the engine's ``Wiring`` declares for tapping (``dbproxy.flow.assemble`` decides).
TAP_PLAN = TapPlan(Tap, FRONTEND_SIDE, BACKEND_SIDE)
