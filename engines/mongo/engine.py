"""The MongoDB engine.

Session, in order:
  1. Listener TLS (``tls`` on the listener): TLS from the first byte, as on
     mongod's TLS ports.
  2. The client's first message (normally its ``hello``/``isMaster``) is read
     to choose the route (match key ``application_name``: the
     ``client.application.name`` of that hello) and to hand its ``client``
     metadata to the backend handshake.
  3. ``backend.open_backend``: the proxy connects and logs in with the route's
     credential.  If that fails the client's first request gets an ``ok: 0``
     reply in its own opcode style (code 18 AuthenticationFailed, 6
     HostUnreachable, 89 NetworkTimeout, 13 Unauthorized for no route), the
     session start is audited as failed with the detail, and the connection
     closes.
  4. The core pipeline runs with ``stages.client_stages`` and
     ``stages.backend_stages``; the first message goes through it like any
     other (it is fed back into a fresh decoder ahead of whatever followed).
     Without an access gate the wiring offers the core a ``TapPlan``
     (``tee.py`` / ``tap.py``): the core may then tap the session — passive
     commands and their replies are audited by the audit worker, hello, SASL
     and the proxy's other answers stay on these stages.

Identity and access (``services.access`` configured; ``policy.py`` has the
whole story).  The backend login still happens at connect (a hello must be
answered before any client authentication), but the session is only
*established* — route authorized, limit slot taken, ``session.identity``
set, ``db.session.start`` emitted — once the client proved who it is
(``clientauth.IdentityAuthenticator``: token via SCRAM-SHA-256/-1 or PLAIN
over TLS, or MONGODB-X509) or, for a verified client certificate or an
allowed anonymous identity, at its first command beyond the handshake.
Until then only handshake commands run.  A listener whose methods include
neither ``token`` nor ``mtls`` keeps its ``client_auth`` policy below for
client credentials (claims, not identities) and establishes as anonymous.
A connection that never establishes (a driver's monitoring connection) is
audited once when it closes (``db.session.mongo.handshake_only``).

Client protocol errors (garbage header, length over the listener's
``max_message_size``, bad OP_MSG checksum) end the session; when the bad
message's header names a request (OP_MSG / OP_QUERY / OP_COMPRESSED) the
client first gets an ``ok: 0`` answer to it (code 17 ProtocolError, 10334
BSONObjectTooLarge), else the connection just closes.  A backend that dies
or breaks the protocol mid-session: every request still waiting is answered
``ok: 0`` code 6 and audited as failed, then the client is disconnected (a
driver reconnects through the proxy).

Listener options: ``client_auth`` (``accept`` | ``reject``, see
``clientauth``; not with ``auth.methods`` token/mtls), ``client_password_file`` / ``client_password_env``,
``compressors`` (the subset of snappy/zlib/zstd the proxy negotiates with
clients; default all three).  Backend options: ``auth_source``,
``handshake`` (``hello`` | ``isMaster``).
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from dbproxy.channel import MessageStream
from dbproxy.engine import Engine
from dbproxy.errors import BufferBudgetExceeded, MessageTimeout, ProtocolError, ProxyError, UpstreamError
from dbproxy.flow import Backend, BackendTimeout, Refused, Request, Wiring, send_quietly
from dbproxy.tee import TapPlan
from dbproxy.identity import AuthFailed
from dbproxy.tls import server_context

from . import protocol as wire
from . import scram
from .backend import open_backend
from .clientauth import ClientAuthPolicy, IdentityAuthenticator
from .options import LEGACY_AUTH_OPTIONS, first_hello_facts, validate_listener
from .codec import MongoDecoder
from .policy import PENDING, MongoAccess
from .stages import (
    HOST_UNREACHABLE,
    REQUEST_OPCODES,
    SUPPORTED_COMPRESSORS,
    MongoSessionState,
    abandon_pending,
    backend_stages,
    client_stages,
    lost_backend_replies,
)
from .errors import AttributingDecoder, client_protocol_error_reply
from .tap import MongoTap
from .tee import RunGuard, TapCompressed, TapCompressedReply, TeeState, abandon_passive, lost_passive_replies

log = logging.getLogger("dbproxy.mongo")

HANDSHAKE_ONLY_EVENT = "db.session.mongo.handshake_only"

UNKNOWN_ERROR = 8
UNAUTHORIZED = 13
AUTHENTICATION_FAILED = 18
NETWORK_TIMEOUT = 89


class MongoEngine(Engine):
    protocol = "mongo"
    match_keys = ("application_name",)
    auth_methods = ("scram-sha-256", "scram-sha-1", "plain", "none")
    password_methods = ("scram-sha-256", "scram-sha-1", "plain")
    default_max_message_size = wire.DEFAULT_MAX_MESSAGE_SIZE
    max_message_size_limit = wire.DEFAULT_MAX_MESSAGE_SIZE
    max_message_size_limit_source = "maxMessageSizeBytes, 48000000 bytes"
    client_auth_methods = ("token", "mtls", "anonymous")
    # The client's SASL commands run in the pipeline (policy.MongoAccess authorizes and starts the session).
    identifies_in_band = True
    #: The token registry also records a SCRAM-SHA-1 verifier of Mongo's digest of each token.
    scram_flavours = (scram.MONGO_SHA_1,)

    def __init__(self, listener: Any, services: Any) -> None:
        super().__init__(listener, services)
        self.ssl_context = server_context(listener.tls) if listener.tls else None
        options = listener.options or {}
        self.client_auth = ClientAuthPolicy.from_options(options)
        self.compressors = tuple(options.get("compressors", SUPPORTED_COMPRESSORS))
        methods = self.access.methods if self.access is not None else ()
        self.identity_mode = "token" in methods or "mtls" in methods
        ignored = [k for k in LEGACY_AUTH_OPTIONS if k in options]
        if self.identity_mode and ignored:
            log.warning("listener %s: options %s are ignored: clients authenticate with %s",
                        listener.name, ", ".join(ignored), " / ".join(methods))

    # -- config validation -----------------------------------------------------
    @classmethod
    def validate_auth(cls, v: Any, method: str, ad: dict, path: str) -> dict:
        for key in sorted(k for k in ad if k not in {"method", "password_file", "password_env"}):
            v.err(f"{path}.{key}", f"no key {key!r} for method {method}")
        return {}

    @classmethod
    def validate_listener(cls, v: Any, d: dict, path: str) -> None:
        validate_listener(v, d, path, cls.password_methods)

    # -- the session flow's hooks (dbproxy.flow) -----------------------------------
    def new_request(self, session: Any, stream: Any) -> Request:
        decoder = AttributingDecoder(MongoDecoder(max_message_size=self.max_message_size), "client")
        return Request(MessageStream(stream, decoder, budget=self.services.buffers), extra={})

    async def handshake(self, session: Any, request: Request) -> bool:
        """Listener TLS, then the client's first message (its hello: routing facts)."""
        client = request.client
        if self.ssl_context is not None:
            request.waiting_for = "client TLS handshake timed out"
            tls = trio.SSLStream(client.stream, self.ssl_context, server_side=True)
            try:
                await tls.do_handshake()
            except trio.BrokenResourceError as exc:
                log.info("session %s: client TLS handshake failed: %s", session.id, exc.__cause__ or exc)
                session.details["end_reason"] = "client TLS handshake failed"
                return False
            client.stream = tls
            session.details["client_tls"] = True
        request.waiting_for = "client sent no request in time"
        first = await client.receive()
        facts = first_hello_facts(first, self.max_message_size)
        app = facts.get("application_name", "")
        for key in ("application_name", "driver"):
            if facts.get(key):
                session.details[key] = facts[key]
        request.keys = {"application_name": app}
        request.start_fields = {
            "client_tls": bool(session.details.get("client_tls")),
            "application_name": app or None,
            "client_driver": facts.get("driver"),
        }
        request.extra.update(first=first, facts=facts)
        return True

    async def identify(self, session: Any, request: Request) -> None:
        """Only a client certificate is known before the pipeline: the client's SASL commands
        run in band (``policy.MongoAccess``), so the identity stays PENDING until then."""
        certificate = certificate_error = None
        if self.access is None:
            request.start_fields["client_auth"] = self.client_auth.mode
        else:
            session.identity = PENDING
            if not self.identity_mode:
                request.start_fields["client_auth_policy"] = self.client_auth.mode
            try:
                certificate = self.access.auth.certificate_identity(request.client.stream)
            except AuthFailed as exc:
                certificate_error = exc
            if certificate is not None:
                request.start_fields["certificate_subject"] = certificate.user
        request.extra.update(certificate=certificate, certificate_error=certificate_error)

    def no_route(self, request: Request) -> Refused:
        msg = f"no route on listener {self.listener.name} for application name {request.keys['application_name']!r}"
        return Refused(msg, client_message=f"dbproxy: {msg}", code=UNAUTHORIZED, fields={"code": UNAUTHORIZED})

    def upstream_refused(self, request: Request, exc: UpstreamError) -> Refused:
        if isinstance(exc, BackendTimeout):
            code, hint = NETWORK_TIMEOUT, "the backend database did not answer in time"
        else:
            code, hint = (AUTHENTICATION_FAILED if exc.kind == "auth" else HOST_UNREACHABLE), exc.client_hint
        address = request.route.backend.address
        return Refused(str(exc), client_message=f"dbproxy could not log in to the backend database {address}: {hint}",
                       code=code, fields={"code": code})

    def unavailable(self, request: Request, reason: str) -> Refused:
        return Refused(reason, client_message=f"dbproxy: {reason}", code=UNAUTHORIZED)

    def render_error(self, request: Request, exc: ProxyError) -> bytes:
        if isinstance(exc, Refused):
            first = request.extra["first"]
            if first.op_code not in REQUEST_OPCODES:
                return b""
            return wire.error_reply_for(first, exc.code, exc.client_message)
        if isinstance(exc, ProtocolError):
            return client_protocol_error_reply(exc)
        return b""

    async def connect_backend(self, session: Any, request: Request, route: Any, grant: Any) -> Backend:
        b = route.backend
        backend_max = max(self.max_message_size, wire.DEFAULT_MAX_MESSAGE_SIZE)
        link = await open_backend(route, client_metadata=request.extra["facts"].get("metadata"), max_message_size=backend_max)
        return Backend(
            link.channel.stream, AttributingDecoder(link.channel.decoder, "backend"), link=link,
            # With identity, db.session.start waits for the client's identity (policy.MongoAccess.establish).
            deferred_start=self.access is not None,
            start_fields={
                "backend_tls": link.tls,
                "backend_auth": b.auth.method,
                "backend_auth_mechanism": link.mechanism,
                "backend_auth_source": link.auth_source,
                "server_max_wire_version": link.hello.get("maxWireVersion"),
            },
        )

    def wiring(self, session: Any, request: Request, backend: Backend, grant: Any) -> Wiring:
        audit = session.audit
        extra = request.extra
        certificate, certificate_error = extra["certificate"], extra["certificate_error"]
        if self.identity_mode:
            client_auth: Any = IdentityAuthenticator(
                self.access.auth, client_tls=bool(session.details.get("client_tls")),
                certificate=certificate, certificate_error=certificate_error,
            )
        else:
            client_auth = self.client_auth.session()
        state = MongoSessionState(auth=client_auth, max_message_size=self.max_message_size, compressors=self.compressors)
        state.details.update({k: v for k, v in extra["facts"].items() if k in ("application_name", "driver")})
        if self.access is not None:
            state.gate = MongoAccess(
                self.access, session, client_auth, route=session.route_name, db_user=session.login,
                start_fields=request.start_fields, certificate=certificate, certificate_error=certificate_error,
            )
        client_stage_list, backend_stage_list = client_stages(state, audit), backend_stages(state, audit)
        plan = tees = None
        if state.gate is None:
            # Nothing here polices commands: the core may tap this session (dbproxy.flow.assemble).
            # Its tees (tee.py) tap the passive frames for the audit worker's MongoTap and return
            # the active ones (hello, SASL, compressed…) to these stages, audit included.
            tees = request.extra["tee"] = TeeState(state)
            client_stage_list[:0] = [RunGuard(), TapCompressed(tees)]
            backend_stage_list[:0] = [RunGuard(), TapCompressedReply(tees)]
            plan = TapPlan(MongoTap, *tees.sides, tee=tees, active_frames=True)
        # The first message goes through the pipeline's stages like every other.
        decoder = AttributingDecoder(MongoDecoder(max_message_size=self.max_message_size), "client")
        decoder.feed(extra["first"].raw)
        decoder.feed(request.client.decoder.buffer.take_rest())

        def lost(errmsg: str, code: int = HOST_UNREACHABLE) -> bytes:
            out = lost_backend_replies(state, audit, errmsg, code=code)
            return out + lost_passive_replies(tees, errmsg, code) if tees is not None else out

        def client_error(exc: ProxyError) -> bytes:
            side = getattr(exc, "mongo_side", None)
            if side == "client":
                return client_protocol_error_reply(exc)  # type: ignore[arg-type]
            if side == "backend":
                return lost("dbproxy: the backend database sent an invalid message")
            # The session is ended by the proxy itself (e.g. the audit became unavailable, fail-closed).
            hint = getattr(exc, "client_hint", None) or str(exc)
            partial = b""
            if isinstance(exc, (BufferBudgetExceeded, MessageTimeout)) and getattr(exc, "direction", None) == "client":
                # The request the client is still sending (its header is at the read position) is
                # answered too, so the driver reports why instead of a closed connection.
                exc.mongo_header = decoder._header()  # type: ignore[attr-defined]
                partial = client_protocol_error_reply(exc)
            return partial + lost(f"dbproxy: {hint}", UNKNOWN_ERROR)

        request.extra["lost"] = lost
        return Wiring(decoder, backend.decoder, client_stage_list, backend_stage_list, state, client_error, tap=plan)

    async def session_ended(self, session: Any, request: Request, backend: Backend, wiring: Wiring, pipeline: Any) -> dict:
        state, audit = wiring.state, session.audit
        tee = request.extra.get("tee")
        reason = session.details["end_reason"]
        waiting = bool(state.pending or (tee is not None and tee.pending))  # tee.pending: tapped only
        if reason.startswith("backend") and waiting:
            # The backend went away under waiting requests: answer them in the client's protocol.
            await send_quietly(request.client.stream, request.extra["lost"]("dbproxy: the connection to the backend database was lost"))
        elif waiting:
            abandon_pending(state, audit, f"no reply: the session ended ({reason})")
            if tee is not None:
                abandon_passive(tee, f"no reply: the session ended ({reason})")
        fields = {
            "commands": state.commands,
            "errors": state.errors,
            "compressor": state.compressor,
            "compressed_requests": state.compressed_requests,
            "client_user": state.auth.user,
        }
        if tee is not None and tee.tapping:
            # The worker's counts and these (what the proxy audited inline) make the session's:
            # the worker adds them up in the end event, which closes the tap.
            tee.note(add={k: fields.pop(k) for k in ("commands", "errors", "compressed_requests")})
        if state.gate is not None:
            fields["denied"] = state.denied
            if not state.gate.established:
                # One record for a connection that never became a session (e.g. a driver's monitor).
                c2b, b2c = pipeline.statistics()
                audit.emit(HANDSHAKE_ONLY_EVENT, **state.gate.handshake_only_fields(reason=reason, started=session.start_time),
                           bytes_from_client=c2b.bytes_in, bytes_to_client=b2c.bytes_out)
        return fields
