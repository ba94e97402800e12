"""Mongo sessions audited through a tap (``audit.link``): the audit worker's side.

``MongoTap`` runs the engine's own audit observers (``stages.audit.CommandAudit``,
the audit half of ``stages.flow.InFlight``, ``ReplyAudit``) over the frames the
proxy's tee (``tee.py``) tapped, so a tapped session's trail is the one the
inline stages write: the same ``session.read_request`` / ``read_reply`` views
(an OP_COMPRESSED frame is decompressed here, through the same libraries),
the same renderer, the same cursor table.  Frames are walked by the codec's
``FRAMING`` (the one frame loop).

Direction 2 carries the proxy's notes (``tee.NOTE``, JSON): ``add`` — the
proxy's own counts (commands it audited inline: hello, SASL…), added to this
tap's in the session's end event; ``lost`` / ``abandon`` — the requests still
waiting were answered ``ok: 0`` by the proxy (the backend went away) or will
get no reply (the session ended): their results are audited here, where their
query uids are.

A frame a stage cannot handle (the proxy checked it, so a bug or a check out
of step with the parser) is audited as ``audit.malformed`` and the tap goes
on: one frame never ends a session's audit.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

from dbproxy.audit.events import MALFORMED
from dbproxy.buffer import ReceiveBuffer
from dbproxy.errors import MalformedMessage, ProtocolError

from . import protocol as wire
from .codec import FRAMING
from .stages.audit import CommandAudit, ReplyAudit
from .stages.flow import InFlight
from .stages.session import MongoSessionState, abandon_pending, lost_backend_replies

log = logging.getLogger("dbproxy.mongo.tap")

#: Counts the end event carries; the worker's plus the proxy's (``add`` note).
COUNTS = ("commands", "errors", "compressed_requests")
_NO_LIMIT = (1 << 31) - 1  # the proxy enforced the listener's limit on these frames


class MongoTap:
    """One tapped Mongo session in the audit worker: ``feed(direction, data)``, ``counts()``."""

    def __init__(self, audit: Any) -> None:
        self.audit = audit
        # The proxy checked sizes against the listener's limit; decompression here only needs a bound.
        self.state = MongoSessionState(auth=None, max_message_size=wire.DEFAULT_MAX_MESSAGE_SIZE)
        self.buffers = (ReceiveBuffer(), ReceiveBuffer())
        self.requests = (CommandAudit(self.state, audit), InFlight(self.state, audit))
        self.replies = ReplyAudit(self.state, audit)
        self.added = dict.fromkeys(COUNTS, 0)

    def feed(self, direction: int, data: bytes) -> None:
        if direction > 1:
            self.note(orjson.loads(data))
            return
        buf = self.buffers[direction]
        buf.feed(data)
        raw, start, end = buf.span()
        done = start
        try:
            for pos, size in FRAMING.frames(raw, start, end, _NO_LIMIT):
                frame = bytes(raw[pos:pos + size])
                done = pos + size
                length, request_id, response_to, op_code = wire.HEADER.unpack_from(frame)
                msg = wire.WireMessage(length, request_id, response_to, op_code, frame)
                try:
                    if direction == 0:
                        for stage in self.requests:
                            stage.handle(msg, None)
                    else:
                        self.replies.handle(msg, None)
                except Exception as exc:  # one frame never ends the session's audit
                    self._malformed(direction, msg, exc)
                finally:
                    self.state.request_done()
                    self.state.reply_done()
        finally:
            buf.skip(done - start)
            buf.compact()

    def note(self, note: dict) -> None:
        st = self.state
        if "add" in note:
            for key in COUNTS:
                self.added[key] += int(note["add"].get(key, 0))
        if "lost" in note:
            lost_backend_replies(st, self.audit, note["lost"], code=note["code"])
        if "abandon" in note:
            abandon_pending(st, self.audit, note["abandon"])

    def _malformed(self, direction: int, msg: wire.WireMessage, exc: Exception) -> None:
        if not isinstance(exc, MalformedMessage):
            if not isinstance(exc, ProtocolError):
                log.exception("audit stage failed on an opcode %d frame of %d bytes", msg.op_code, msg.length)
            exc = MalformedMessage(f"audit stage failed: {exc.__class__.__name__}: {exc}",
                                   type_name=f"opcode {msg.op_code}", type_code=msg.op_code, raw=msg.raw)
        self.audit.emit(MALFORMED, direction="client" if direction == 0 else "backend", success=False,
                        **exc.audit_fields())

    def counts(self) -> dict:
        st = self.state
        return {"commands": st.commands + self.added["commands"], "errors": st.errors + self.added["errors"],
                "compressed_requests": st.compressed_requests + self.added["compressed_requests"]}
