"""The Mongo audit observers: they look at every command and reply, and never change one.

Contract (issue 14, every engine): ``handle`` always returns None — an
observer records, it never answers, rewrites, drops or closes; what the
other stages decide is audited by them against the query this observer
recorded (``request.uid``).  ``CommandAudit`` runs right after the session
gate, before any stage that may refuse, so a refused command is audited
before its refusal.

Client → backend (``CommandAudit``), per request of an established session
(or of any session without access control): one ``db.session.query`` with
the command name, ``$db``, collection, request id, the client's compressor,
an OP_MSG document sequence's document count, and the command document as
bounded, redacted JSON text (``render.render_command``).  Authentication
commands and ``connectionStatus`` under access control are marked
``answered_by: proxy`` (their stage answers them).  ``getMore`` /
``killCursors`` name the query that opened their cursor.  Legacy opcodes
(OP_INSERT, OP_GET_MORE… — gone since MongoDB 5.1) are recorded by opcode
and size; under access control the policy refuses them instead.  Handshake
commands before establishment are not audited (the gate counts them).

Backend → client (``ReplyAudit``), per reply to an audited request: one
``db.session.result`` with ``ok``, ``n``/``nModified``,
``errmsg``/``code``/``codeName``, write errors, cursor id and batch size
(``render.summarize_reply``), linked by ``query_uid``; the cursor-origin
table that lets later ``getMore``s name their query is kept here.  A reply
the audit cannot read is still forwarded (the client's driver judges it)
and recorded as unreadable.
"""

from __future__ import annotations

from typing import Any

from ..clientauth import AUTH_COMMANDS
from .render import render_command, summarize_reply, summarize_small_reply
from .session import PARSE_ERRORS, CursorOrigin, MongoSessionState, Pending, Request, malformed


class CommandAudit:
    name = "mongo-command-audit"

    def __init__(self, state: MongoSessionState, audit: Any) -> None:
        self.state = state
        self.audit = audit

    def handle(self, msg: Any, ctx: Any) -> None:
        r = self.state.request(msg)
        if r.handshake:
            return None
        try:
            self._record(r)
        except PARSE_ERRORS as exc:
            raise malformed(self.state, msg, exc) from exc
        return None

    def _record(self, r: Request) -> None:
        gate = self.state.gate
        name = r.name
        if name is None:
            if gate is None:  # under access control the policy refuses it, audited as a denial
                plain = r.plain
                event = self.audit.on_query(f"<{r.legacy_name}, {plain.length} bytes>", command=r.legacy_name,
                                            request_id=plain.request_id)
                r.uid = event["uid"]
            return
        if name in AUTH_COMMANDS:
            event = self.audit.on_query(
                render_command(r.body, name), command=name, db_name=r.db, collection=None,
                request_id=r.plain.request_id, answered_by="proxy",
            )
            r.uid = event["uid"]
            return
        fields: dict[str, Any] = {"command": name, "db_name": r.db, "collection": r.collection,
                                  "request_id": r.plain.request_id}
        if r.compressor:
            fields["compressor"] = r.compressor
        if r.sequences:
            fields["document_count"] = sum(r.sequences.values())
        if gate is not None and name == "connectionStatus":
            event = self.audit.on_query(render_command(r.body, name), answered_by="proxy", **fields)
        else:
            if name == "getMore":
                self._tie_get_more(r, fields)
            elif name == "killCursors":
                self._tie_kill(r, fields)
            event = self.audit.on_query(render_command(r.body, name, r.sequences), **fields)
        r.uid = event["uid"]

    def _tie_get_more(self, r: Request, fields: dict) -> None:
        cid = r.body.get("getMore")
        if isinstance(cid, int):
            cid = int(cid)
            origin = self.state.cursors.get(cid)
            r.cursor_id = cid
            r.cursor_origin = origin
            fields["cursor_id"] = cid
            if origin is not None:
                fields["cursor_query_uid"] = origin.uid
                fields["cursor_command"] = origin.command

    def _tie_kill(self, r: Request, fields: dict) -> None:
        ids = r.body.get("cursors")
        if isinstance(ids, list):
            kill = tuple(int(c) for c in ids if isinstance(c, int))
            r.kill = kill
            fields["cursor_ids"] = list(kill)
            fields["cursor_query_uids"] = [o.uid if (o := self.state.cursors.get(c)) else None for c in kill]


class ReplyAudit:
    name = "mongo-reply-audit"

    def __init__(self, state: MongoSessionState, audit: Any) -> None:
        self.state = state
        self.audit = audit

    def handle(self, msg: Any, ctx: Any) -> None:
        st = self.state
        rep = st.reply(msg)
        pending = rep.pending
        if pending is None or not pending.audited:
            return None
        try:
            summary = summarize_small_reply(rep.plain)
            if summary is None:
                doc, op_reply = rep.document()
                summary = summarize_reply(doc, op_reply)
        except PARSE_ERRORS as exc:
            # Forwarded all the same: the client's driver judges the reply; the audit says it was unreadable.
            summary = {"ok": 0, "errmsg": f"unreadable reply: {exc}"}
        self.record(pending, summary)
        return None

    def record(self, pending: Pending, summary: dict) -> None:
        """The result of the audited request ``pending``, from its reply's ``summary``."""
        st = self.state
        ok = bool(summary.get("ok")) and "write_errors" not in summary and "write_concern_error" not in summary
        if not ok:
            st.errors += 1
            if summary.get("errmsg"):
                summary["error"] = summary["errmsg"]
        self._cursors(pending, summary)
        fields = {"command": pending.command, "collection": pending.collection, "db_name": pending.db}
        if pending.cursor_origin is not None:
            fields["cursor_query_uid"] = pending.cursor_origin.uid
        if "n" in summary:
            fields["affected_records"] = summary.get("nModified", summary["n"])
        fields.update(summary)
        self.audit.on_result(success=ok, query_uid=pending.uid, **fields)

    def _cursors(self, pending: Pending, summary: dict) -> None:
        st = self.state
        cid = summary.get("cursor_id")
        if pending.command == "getMore":
            if cid == 0 and pending.cursor_id is not None:
                st.cursors.pop(pending.cursor_id, None)
        elif pending.kill:
            for c in pending.kill:
                st.cursors.pop(c, None)
        elif isinstance(cid, int) and cid != 0:
            st.remember_cursor(cid, CursorOrigin(pending.uid, pending.command, pending.collection, pending.db))
