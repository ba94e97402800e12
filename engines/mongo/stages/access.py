"""Mongo access control as two stages: the session gate and the command policy.

Both do nothing without identity and access configured (``state.gate``, a
``policy.MongoAccess``; ``policy.py`` has the whole story).

``SessionGate`` runs first, before the audit: until the session is
*established* there is no session to audit a query into.  Only the
handshake commands run then — forwarded unaudited and counted
(``gate.note_handshake``); ``connectionStatus`` / ``endSessions`` are
answered by the proxy; the authentication commands are left to
``auth.ClientAuth``, whose proof establishes the session.  Any other
command establishes it implicitly (a verified client certificate, an
allowed anonymous identity) or is refused — code 13, audited by the gate as
an access denial.  A request it lets through as handshake is flagged
(``request.handshake``) so the later stages treat it as such even if the
hello's speculative authentication establishes the session meanwhile.

``AccessPolicy`` runs after the audit observer, so a refused command is
audited before its refusal: every command of an established session is
checked against the session's grant (``gate.check``, per database); a
refusal is recorded as ``access_denied`` and the query's failed result, and
answered code 13 (no answer to a moreToCome request).  ``connectionStatus``
is answered by the proxy with the client's identity.  Legacy opcodes
(OP_INSERT, OP_GET_MORE… — gone since MongoDB 5.1) cannot be policed by
command and end the session.
"""

from __future__ import annotations

from typing import Any

from dbproxy.access import audit_denial
from dbproxy.sansio import Verdict, reply

from .. import protocol as wire
from ..clientauth import AUTH_COMMANDS
from ..policy import HANDSHAKE_COMMANDS, UNAUTHORIZED, denial_message
from .session import PARSE_ERRORS, MongoSessionState, Request, malformed, refuse


class SessionGate:
    name = "mongo-session-gate"

    def __init__(self, state: MongoSessionState) -> None:
        self.state = state

    def handle(self, msg: Any, ctx: Any) -> Verdict | None:
        gate = self.state.gate
        if gate is None or gate.established:
            return None
        r = self.state.request(msg)
        if r.name is None:
            return None  # a legacy opcode: AccessPolicy ends the session
        try:
            verdict = self._before_establishment(r)
        except PARSE_ERRORS as exc:
            raise malformed(self.state, msg, exc) from exc
        return None if verdict is None else self.state.request_done(verdict)

    def _before_establishment(self, r: Request) -> Verdict | None:
        st = self.state
        gate = st.gate
        name = r.name
        if name in HANDSHAKE_COMMANDS:  # authentication commands included
            gate.note_handshake(name)
            r.handshake = True
            if name in ("connectionStatus", "endSessions"):
                if r.more_to_come:
                    return Verdict(replace=())
                # endSessions: nothing this connection ran could have used a session.
                doc = gate.connection_status() if name == "connectionStatus" else {"ok": 1.0}
                return reply(wire.reply_to(r.plain, doc))
            return None
        refusal = gate.establish_implicit(name, r.db)
        if refusal is not None:
            st.errors += 1
            st.denied += 1
            return refuse(r.plain, refusal.code, refusal.message, more_to_come=r.more_to_come, close=refusal.close)
        return None


class AccessPolicy:
    name = "mongo-access-policy"

    def __init__(self, state: MongoSessionState, audit: Any) -> None:
        self.state = state
        self.audit = audit

    def handle(self, msg: Any, ctx: Any) -> Verdict | None:
        st = self.state
        if st.gate is None:
            return None
        r = st.request(msg)
        if r.name is None:
            return st.request_done(self._legacy(r))
        if r.handshake or r.name in AUTH_COMMANDS:
            return None
        try:
            verdict = self._check(r)
        except PARSE_ERRORS as exc:
            raise malformed(st, msg, exc) from exc
        return None if verdict is None else st.request_done(verdict)

    def _legacy(self, r: Request) -> Verdict:
        st = self.state
        name = r.legacy_name
        st.denied += 1
        audit_denial(st.gate.session, "legacy_opcode", stage="command", command=name,
                     error=f"{name} is not supported under access control (MongoDB removed it in 5.1)")
        return Verdict(replace=(), close=True)

    def _check(self, r: Request) -> Verdict | None:
        st = self.state
        gate = st.gate
        name, db = r.name, r.db
        if name == "connectionStatus":
            doc = gate.connection_status()
            self.audit.on_result(success=True, query_uid=r.uid, command=name, db_name=db, ok=1, answered_by="proxy")
            return reply(wire.reply_to(r.plain, doc))
        denial = gate.check(name, db, r.body)
        if denial is None:
            return None
        st.errors += 1
        st.denied += 1
        message = denial_message(denial, name, db)
        audit_denial(gate.session, denial.reason, stage="command", error=message, command=denial.command,
                     db_name=db, collection=r.collection, query_uid=r.uid)
        self.audit.on_result(success=False, query_uid=r.uid, command=name, collection=r.collection,
                             db_name=db, ok=0, code=UNAUTHORIZED, errmsg=message, error=message, answered_by="proxy")
        return refuse(r.plain, UNAUTHORIZED, message, more_to_come=r.more_to_come)
