"""Mongo sessions audited through a tap (``audit.link``): the audit worker's side.

``MongoTap`` (an ``audit.frametap.FrameTap``: the core's loop over the
codec's ``FRAMING``) runs the engine's own audit observers —
``stages.audit.CommandAudit``, ``stages.flow.InFlight`` (which only records
here: a moreToCome request's unacknowledged result, the table replies are
matched against) and ``ReplyAudit`` — over the frames the proxy's tee
(``tee.py``) tapped, so a tapped session's trail is the one the inline stages
write: the same ``session.read_request`` / ``read_reply`` views (an
OP_COMPRESSED frame is decompressed here, through the same libraries), the
same renderer, the same cursor table.  Plain OP_MSG commands and small
replies — a driver's everyday traffic — are audited in place first
(``tapfast.py``: the same events from one ``bson.decode``); whatever that
declines goes to the observers.

A frame of opCode ``tee.NOTE_OPCODE`` in the client direction is a note from
the proxy (JSON): ``add`` — the proxy's own counts (what it audited inline:
hello, SASL…), added to this tap's in the session's end event; ``lost`` /
``abandon`` — the passive requests still waiting were answered ``ok: 0`` by
the proxy (the backend went away) or will get no reply (the session ended):
their results are audited here, where their query uids are.
"""

from __future__ import annotations

from typing import Any

import orjson

from dbproxy.audit.frametap import FrameTap
from dbproxy.tee import FrameSide

from . import protocol as wire
from .codec import FRAMING
from .stages.audit import CommandAudit, ReplyAudit
from .stages.flow import InFlight
from .stages.session import MongoSessionState, abandon_pending, lost_backend_replies
from .tapfast import FastMongoAudit
from .tee import NOTE_OPCODE

#: Counts the end event carries: the worker's plus the proxy's (``add`` note).
COUNTS = ("commands", "errors", "compressed_requests")


def _opcode(data: Any, pos: int) -> int:
    return wire.I32.unpack_from(data, pos + 12)[0]  # the proxy checked it (a note's is NOTE_OPCODE)


_SIDE = FrameSide(FRAMING, interest=frozenset(wire.KNOWN_OPCODES) | {NOTE_OPCODE}, type_of=_opcode)


class _Requests:
    """The client direction's observers, and the proxy's notes."""

    def __init__(self, tap: "MongoTap") -> None:
        self.tap = tap
        self.stages = (CommandAudit(tap.state, tap.audit), InFlight(tap.state, tap.audit))

    def handle(self, msg: wire.WireMessage, ctx: Any) -> None:
        if msg.op_code == NOTE_OPCODE:
            self.tap.note(orjson.loads(msg.body))
            return
        try:
            for stage in self.stages:
                stage.handle(msg, ctx)
        finally:
            self.tap.state.request_done()


class _Replies:
    def __init__(self, tap: "MongoTap") -> None:
        self.state = tap.state
        self.audit = ReplyAudit(tap.state, tap.audit)

    def handle(self, msg: wire.WireMessage, ctx: Any) -> None:
        try:
            self.audit.handle(msg, ctx)
        finally:
            self.state.reply_done()


class MongoTap(FrameTap):
    """One tapped Mongo session in the audit worker."""

    sides = (_SIDE, _SIDE)

    def __init__(self, audit: Any) -> None:
        # The proxy checked sizes against the listener's limit; decompression here only needs a bound.
        self.state = MongoSessionState(auth=None, max_message_size=wire.DEFAULT_MAX_MESSAGE_SIZE)
        self.audit = audit
        self.added = dict.fromkeys(COUNTS, 0)
        replies = _Replies(self)
        super().__init__(audit, (_Requests(self), replies))
        # Plain OP_MSG commands and small replies in place (``tapfast``); anything else, the observers.
        fast = FastMongoAudit(self.state, audit, replies.audit)
        self.fast = (fast.request, fast.response)

    def message(self, direction: int, mtype: int, frame: bytes) -> wire.WireMessage:
        length, request_id, response_to, op_code = wire.HEADER.unpack_from(frame)
        return wire.WireMessage(length, request_id, response_to, op_code, frame)

    def describe(self, mtype: int) -> tuple[str, str]:
        return f"opcode {mtype}", str(mtype)

    def note(self, note: dict) -> None:
        st = self.state
        for key, n in note.get("add", {}).items():
            self.added[key] += int(n)
        if "lost" in note:
            lost_backend_replies(st, self.audit, note["lost"], code=note["code"])
        if "abandon" in note:
            abandon_pending(st, self.audit, note["abandon"])

    def counts(self) -> dict:
        st = self.state
        return {"commands": st.commands + self.added["commands"], "errors": st.errors + self.added["errors"],
                "compressed_requests": st.compressed_requests + self.added["compressed_requests"]}
