"""Client authentication as a stage: the proxy answers the authentication commands itself.

``saslStart`` / ``saslContinue`` / ``authenticate`` / ``logout`` /
``getnonce`` are answered by the session's authenticator
(``clientauth.ClientAuthenticator`` for a listener's ``client_auth``
policy, ``clientauth.IdentityAuthenticator`` in identity mode) and never
forwarded: the backend already has the proxy's own login.

Before the session is established (``access.SessionGate`` flagged the
request as handshake) an identity the conversation proves establishes it
(``gate.establish``); a refusal revokes the conversation and is answered in
its place; a failed attempt is audited by the gate.  Once established, or
without access control, the command was recorded by ``audit.CommandAudit``
(``answered_by: proxy``, SASL payloads redacted) and this stage records its
result: mechanism, user, whether the conversation is done, and the error.
"""

from __future__ import annotations

from typing import Any

from dbproxy.sansio import Verdict, reply

from .. import protocol as wire
from ..clientauth import AUTH_COMMANDS
from .session import PARSE_ERRORS, MongoSessionState, Request, malformed


class ClientAuth:
    name = "mongo-client-auth"

    def __init__(self, state: MongoSessionState, audit: Any) -> None:
        self.state = state
        self.audit = audit

    def handle(self, msg: Any, ctx: Any) -> Verdict | None:
        r = self.state.request(msg)
        if r.name not in AUTH_COMMANDS:
            return None
        try:
            verdict = self._establishing(r) if r.handshake else self._answer(r)
        except PARSE_ERRORS as exc:
            raise malformed(self.state, msg, exc) from exc
        return self.state.request_done(verdict)

    def _answer(self, r: Request) -> Verdict:
        st = self.state
        name = r.name
        outcome = st.auth.handle(name, r.body)
        fields: dict[str, Any] = {"ok": outcome.reply.get("ok", 0), "answered_by": "proxy"}
        if outcome.mechanism:
            fields["mechanism"] = outcome.mechanism
        if outcome.user is not None:
            fields["client_user"] = outcome.user
        if outcome.done:
            fields["client_authenticated"] = True
        if not outcome.ok:
            st.errors += 1
            fields.update(errmsg=outcome.reply.get("errmsg"), code=outcome.reply.get("code"), error=outcome.reply.get("errmsg"))
        self.audit.on_result(success=outcome.ok, query_uid=r.uid, command=name, **fields)
        return reply(wire.reply_to(r.plain, outcome.reply))

    def _establishing(self, r: Request) -> Verdict:
        """An authentication command before establishment; an identity it proves establishes the session."""
        st = self.state
        gate = st.gate
        outcome = st.auth.handle(r.name, r.body)
        doc, close = outcome.reply, False
        if outcome.identity is not None:
            refusal = gate.establish(outcome.identity, client_auth=outcome.mechanism,
                                     client_auth_speculative=bool(getattr(st.auth, "speculative_conversation", False)))
            if refusal is not None:
                st.auth.revoke()
                st.errors += 1
                st.denied += 1
                doc, close = wire.error_document(refusal.code, refusal.message), refusal.close
        elif not outcome.ok:
            st.errors += 1
            gate.audit_auth_failure(r.name, outcome)
        elif outcome.done and outcome.user is not None:
            gate.claimed_user, gate.claimed_mechanism = outcome.user, outcome.mechanism
        return reply(wire.reply_to(r.plain, doc), close=close)
