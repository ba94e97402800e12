"""The hello handshake, rewritten both ways so drivers stay on the proxy.

Client → backend (``HelloRewriter``): ``hello`` / ``isMaster`` is forwarded
without ``client`` (the backend already got it in the proxy's own
handshake; the session keeps the application name and driver),
``compression``, ``saslSupportedMechs`` and ``speculativeAuthenticate`` —
the proxy answers those itself.  It picks the compressor (the first the
client offers among the listener's ``compressors``), asks the session's
authenticator for its mechanisms and runs the speculative authentication
(which, for MONGODB-X509 before establishment, establishes the session).
What to answer is kept as the request's ``HelloPlan``.

Backend → client (``HelloReplyRewriter``): the hello reply is rewritten to
present a standalone server (``hosts``/``me``/``setName``/``primary``…
removed: SDAM would otherwise connect to the members directly), with the
proxy's ``saslSupportedMechs``, chosen ``compression``,
``speculativeAuthenticate`` answer and ``maxMessageSizeBytes`` capped at the
proxy's limit; a reply that already is that (heartbeats) is forwarded as
received.  OP_MSG flags are kept (moreToCome for a streaming hello) and a
checksum is recomputed.
"""

from __future__ import annotations

from typing import Any, Mapping

from bson.raw_bson import RawBSONDocument

from dbproxy.sansio import Verdict, replace

from .. import protocol as wire
from .session import PARSE_ERRORS, HelloPlan, MongoSessionState, Pending, malformed

HELLO_COMMANDS = frozenset({"hello", "isMaster", "ismaster"})

#: Hello reply fields that would make a driver discover and connect to other
#: hosts (SDAM: replica set members, mongos lists).  The proxy presents a standalone.
TOPOLOGY_FIELDS = (
    "hosts", "passives", "arbiters", "setName", "setVersion", "primary", "me", "secondary",
    "arbiterOnly", "passive", "hidden", "tags", "electionId", "isreplicaset", "lastWrite",
)
#: Fields of a client hello the proxy answers itself (never forwarded).
HELLO_PROXY_FIELDS = ("client", "compression", "saslSupportedMechs", "speculativeAuthenticate")


class HelloRewriter:
    name = "mongo-hello-request"

    def __init__(self, state: MongoSessionState, audit: Any) -> None:
        self.state = state
        self.audit = audit

    def handle(self, msg: Any, ctx: Any) -> Verdict | None:
        r = self.state.request(msg)
        if r.name not in HELLO_COMMANDS:
            return None
        try:
            new_body = self._plan(r.body, r.pending)
            if new_body is not None:
                return self.state.request_done(replace(rebuild_request(r.plain, new_body)))
        except PARSE_ERRORS as exc:
            raise malformed(self.state, msg, exc) from exc
        return None

    def _plan(self, body: RawBSONDocument, pending: Pending) -> dict | None:
        st = self.state
        plan = HelloPlan()
        pending.hello = plan
        present = [k for k in HELLO_PROXY_FIELDS if k in body]
        if not present:
            return None
        doc = wire.decode_document(body)
        client = doc.pop("client", None)
        if isinstance(client, Mapping) and "application_name" not in st.details:
            app = client.get("application")
            driver = client.get("driver")
            if isinstance(app, Mapping) and isinstance(app.get("name"), str):
                st.details["application_name"] = app["name"]
            if isinstance(driver, Mapping):
                st.details["driver"] = f"{driver.get('name', '')} {driver.get('version', '')}".strip()
        offered = doc.pop("compression", None)
        if offered is not None:
            names = [c for c in offered if isinstance(c, str)] if isinstance(offered, list) else []
            chosen = next((c for c in names if c in st.compressors), None)
            plan.compression = [chosen] if chosen else []
            st.compressor = chosen
        if doc.pop("saslSupportedMechs", None) is not None:
            plan.sasl_mechs = st.auth.mechanisms()
        spec = doc.pop("speculativeAuthenticate", None)
        if spec is not None:
            outcome = st.auth.speculative(spec)
            gate = st.gate
            if outcome is not None and gate is not None and not gate.established:
                if outcome.identity is not None:  # MONGODB-X509: the certificate is the proof
                    refusal = gate.establish(outcome.identity, client_auth=outcome.mechanism, client_auth_speculative=True)
                    if refusal is not None:
                        # No speculative answer: the driver authenticates explicitly and gets the refusal.
                        st.auth.revoke()
                        outcome = None
                elif outcome.done and outcome.user is not None:
                    gate.claimed_user, gate.claimed_mechanism = outcome.user, outcome.mechanism
            elif outcome is not None and gate is None:
                self.audit.emit(
                    "db.session.mongo.client_auth", mechanism=outcome.mechanism, client_user=outcome.user,
                    speculative=True, success=True, done=outcome.done,
                )
            if outcome is not None:
                plan.speculative = outcome.reply
        return doc


def rebuild_request(msg: wire.WireMessage, body: dict) -> bytes:
    """``msg`` (uncompressed OP_MSG / OP_QUERY) with another command document; checksum recomputed."""
    if msg.op_code == wire.OP_MSG:
        op = wire.parse_op_msg(msg)
        sequences = {ident: docs for ident, docs in op.sequences.items()} if op.sequences_raw else None
        return wire.encode_op_msg(
            body, request_id=msg.request_id, response_to=msg.response_to, flags=op.flags, sequences=sequences
        )
    q = wire.parse_op_query(msg)
    outer = wire.decode_document(q.query_raw)
    first = next(iter(outer), None)
    if first in ("$query", "query") and isinstance(outer[first], dict):
        outer[first] = body
        query: Any = outer
    else:
        query = body
    return wire.encode_op_query(
        q.full_collection_name, query, request_id=msg.request_id, response_to=msg.response_to, flags=q.flags,
        number_to_skip=q.number_to_skip, number_to_return=q.number_to_return, fields=q.fields_raw,
    )


class HelloReplyRewriter:
    name = "mongo-hello-reply"

    def __init__(self, state: MongoSessionState) -> None:
        self.state = state

    def handle(self, msg: Any, ctx: Any) -> Verdict | None:
        rep = self.state.reply(msg)
        pending = rep.pending
        if pending is None or pending.hello is None:
            return None
        try:
            doc, op_reply = rep.document()
            rewritten = self._rewrite(rep.plain, doc, op_reply, pending.hello)
        except PARSE_ERRORS:
            rewritten = None  # forwarded as received; the driver judges it
        return self.state.reply_done(replace(rewritten)) if rewritten is not None else None

    def _rewrite(
        self, plain: wire.WireMessage, doc: RawBSONDocument, op_reply: wire.OpReply | None, plan: HelloPlan
    ) -> bytes | None:
        """The hello reply as the proxy presents it, or None when it is already that (heartbeats)."""
        if not doc.get("ok"):
            return None
        st = self.state
        size = doc.get("maxMessageSizeBytes")
        cap = not isinstance(size, int) or size > st.max_message_size
        drop = [k for k in (*TOPOLOGY_FIELDS, "compression", "saslSupportedMechs", "speculativeAuthenticate") if k in doc]
        if not (cap or drop or plan.sasl_mechs is not None or plan.compression or plan.speculative is not None):
            return None
        out = wire.decode_document(doc)
        for key in drop:
            del out[key]
        if cap:
            out["maxMessageSizeBytes"] = st.max_message_size
        if plan.sasl_mechs is not None:
            out["saslSupportedMechs"] = plan.sasl_mechs
        if plan.compression:
            out["compression"] = plan.compression
        if plan.speculative is not None:
            out["speculativeAuthenticate"] = plan.speculative
        if op_reply is not None:
            return wire.encode_op_reply(
                [out], plain.request_id, plain.response_to,
                response_flags=op_reply.response_flags, cursor_id=op_reply.cursor_id,
                starting_from=op_reply.starting_from,
            )
        # Same flags (moreToCome for a streaming hello); a checksum, if present, is recomputed.
        return wire.encode_op_msg(out, request_id=plain.request_id, response_to=plain.response_to,
                                  flags=plain.op_msg_flags)
