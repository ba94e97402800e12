"""The audit worker's fast path for a tapped Mongo session's everyday traffic: plain OP_MSG commands and replies.

A driver's load is uncompressed OP_MSG requests with flagBits 0 — a body
first, maybe document sequences (``insert``'s ``documents``) — and small
OP_MSG replies to them.  ``MongoTap`` (``audit.frametap.FrameTap.fast``)
hands each such frame here first, in place: the body is decoded once, in C
(``bson.decode``), and that one decode gives the command name, ``$db`` and
collection (as ``session._names`` reads them off the raw top level) and the
text (``render.render_decoded``: ``render_command``'s own fast path); a
reply's summary comes from ``render.summarize_small_reply``'s single decode
and is recorded by ``ReplyAudit.record``.  No ``WireMessage``, ``OpMsg``,
``RawBSONDocument``, ``Request`` or ``Reply`` is built.

Only the case whose trail is certainly the observers' is taken: OP_MSG,
flagBits 0 (no checksum, moreToCome, exhaust), the body first, well-formed
sections (OP_MSG.md), a body ``render_command`` renders on its fast path
(small, no redactable key, not an authentication command), not
``getMore`` / ``killCursors`` (their audit reads the cursor table); a
small reply to a pending, audited request.  Anything else — or
anything the decode or the renderer refuses — returns False *before* the
session state changes, and the observers read the frame as they always did
(tests/unit/mongo/test_mongo_tapfast.py compares the two trails).
"""

from __future__ import annotations

import struct
from typing import Any

import bson

from .stages.render import SMALL_REPLY, fast_renderable, plain_sequences, render_decoded, summarize_reply
from .stages.session import Pending
from . import protocol as wire

_I32 = struct.Struct("<i").unpack_from
_U32 = struct.Struct("<I").unpack_from
_OP_MSG = wire.OP_MSG
#: Commands whose audit reads the cursor table (``CommandAudit._tie_*``): the observers.
_CURSOR_COMMANDS = frozenset({"getMore", "killCursors"})


class FastMongoAudit:
    """``MongoTap.fast``: ``request`` / ``response`` audit a frame in place or return False."""

    __slots__ = ("state", "audit", "replies")

    def __init__(self, state: Any, audit: Any, replies: Any) -> None:
        self.state = state
        self.audit = audit
        self.replies = replies  # the tap's ReplyAudit: records a result exactly as for a slow reply

    def request(self, d: Any, pos: int, size: int) -> bool:
        if size < 26 or _I32(d, pos + 12)[0] != _OP_MSG or _U32(d, pos + 16)[0] or d[pos + 20]:
            return False
        end = pos + size
        bsize = _I32(d, pos + 21)[0]
        body_end = pos + 21 + bsize
        if bsize < 5 or body_end > end:
            return False
        # Document sequences (kind 1) after the body, counted as ``session._sequence_counts`` counts them.
        sequences = plain_sequences(d, body_end, end)
        if sequences is None:
            return False
        raw = bytes(d[pos + 21:body_end])
        try:
            doc = bson.decode(raw)
        except Exception:
            return False
        if not doc:
            return False
        name = next(iter(doc))
        if name in _CURSOR_COMMANDS or not fast_renderable(raw, name):
            return False
        first = doc[name]
        db = doc.get("$db")
        try:
            text = render_decoded(doc, sequences)
        except Exception:
            return False
        db = db if isinstance(db, str) else None
        collection = first if isinstance(first, str) else None
        request_id = _I32(d, pos + 4)[0]
        st = self.state
        st.commands += 1
        # ``CommandAudit._record``'s fields, in its order; then ``InFlight``'s pending entry.
        fields: dict[str, Any] = {"command": name, "db_name": db, "collection": collection, "request_id": request_id}
        if sequences:
            fields["document_count"] = sum(sequences.values())
        event = self.audit.on_query(text, **fields)
        st.pending[request_id] = Pending(event["uid"], name, collection, db, False)
        return True

    def response(self, d: Any, pos: int, size: int) -> bool:
        if size < 26 or size > SMALL_REPLY or _I32(d, pos + 12)[0] != _OP_MSG or _U32(d, pos + 16)[0] or d[pos + 20]:
            return False
        st = self.state
        response_to = _I32(d, pos + 8)[0]
        pending = st.pending.get(response_to)
        if pending is None or not pending.audited:
            return False
        bsize = _I32(d, pos + 21)[0]
        if bsize < 5 or 21 + bsize > size:
            return False
        try:
            summary = summarize_reply(bson.decode(bytes(d[pos + 21:pos + 21 + bsize])))
        except Exception:
            return False
        del st.pending[response_to]
        self.replies.record(pending, summary)
        return True


__all__ = ["FastMongoAudit"]
