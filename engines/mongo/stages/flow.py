"""What is sent on: requests in flight, and decompressed messages.

``InFlight`` keeps the session's table of requests waiting for a reply
(``state.pending``, keyed by requestID), which the backend stages match
replies against and the engine answers ``ok: 0`` when the backend goes
away.  It runs after every stage that may answer a request in the proxy's
place, so only what is really forwarded waits for a reply.  A request sent
with moreToCome (OP_MSG) or a fire-and-forget legacy opcode gets no reply:
its audited query is closed right away with an unacknowledged result.

``Decompressed`` / ``DecompressedReply`` come last in their direction (and
so drop the message's read-once view, ``state.request_done``): the
backend link never negotiates compression, so an OP_COMPRESSED request is
sent on decompressed (header rebuilt by ``compression.decompress``,
identical to the client's pre-compression message, so an OP_MSG checksum
stays valid), and a backend that compresses anyway is unwrapped.  Replies to
a client that negotiated compression may be uncompressed
(OP_COMPRESSED.md), so the hot path never re-encodes.
"""

from __future__ import annotations

from typing import Any

from dbproxy.sansio import Verdict, replace

from .. import protocol as wire
from .session import MongoSessionState, Pending


class InFlight:
    name = "mongo-in-flight"

    def __init__(self, state: MongoSessionState, audit: Any) -> None:
        self.state = state
        self.audit = audit

    def handle(self, msg: Any, ctx: Any) -> None:
        st = self.state
        r = st.request(msg)
        plain = r.plain
        if r.name is None:  # a legacy opcode (refused under access control before this stage)
            name = r.legacy_name
            if plain.op_code == wire.OP_GET_MORE:  # answered with OP_REPLY
                st.pending[plain.request_id] = Pending(r.uid, name, None, None, True)
            else:  # fire-and-forget opcodes: no reply will come
                self.audit.on_result(success=True, query_uid=r.uid, command=name, acknowledged=False)
            return None
        pending = Pending(r.uid, r.name, r.collection, r.db, plain.op_code == wire.OP_QUERY, audited=not r.handshake)
        pending.cursor_id, pending.cursor_origin, pending.kill = r.cursor_id, r.cursor_origin, r.kill
        r.pending = pending
        if not r.more_to_come:
            st.pending[plain.request_id] = pending
        elif pending.audited:
            self.audit.on_result(success=True, query_uid=r.uid, command=r.name, acknowledged=False)
        return None


class Decompressed:
    name = "mongo-decompressed-request"

    def __init__(self, state: MongoSessionState) -> None:
        self.state = state

    def handle(self, msg: Any, ctx: Any) -> Verdict | None:
        plain = self.state.request(msg).plain
        return self.state.request_done(replace(plain.raw) if plain is not msg else None)


class DecompressedReply:
    name = "mongo-decompressed-reply"

    def __init__(self, state: MongoSessionState) -> None:
        self.state = state

    def handle(self, msg: Any, ctx: Any) -> Verdict | None:
        plain = self.state.reply(msg).plain
        return self.state.reply_done(replace(plain.raw) if plain is not msg else None)
