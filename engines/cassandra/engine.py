"""The Cassandra engine (CQL native protocol v3, v4, v5, v6-beta).

Handshake (client side), owned by the proxy: ``handshake.py`` (TLS, version,
OPTIONS, STARTUP, the client's credentials).

  routing    first route whose globs match ``user``, ``driver_name``,
             ``driver_version``; listener and route ``options.expected_user``
             (a glob) must match the user name, else AUTH_ERROR.  With an
             identity layer the identity's roles must allow the route
             (UNAUTHORIZED) and connection limits apply (OVERLOADED).  A grant
             with read-only, deny_commands or keyspace rules adds the policy
             stage (``policy.py``): every QUERY, PREPARE, EXECUTE and BATCH
             is checked, a refused one answered UNAUTHORIZED on its stream.
  backend    ``backend.open_backend`` logs in with the route's credential at
             the client's version and compression; the client then sees
             AUTH_SUCCESS (or READY) as from a real node.

A failed handshake answers in CQL before closing: AUTH_ERROR (0x0100) for
refused credentials, no route or a wrong user (after SUPPORTED and
AUTHENTICATE: drivers report a clean authentication error), for a failed
login of the proxy's own (a Kerberos failure — KDC down, stale keytab,
unknown service principal — shows the client only that the proxy could not
authenticate, the detail goes to the audit; a backend refusing the proxy's
principal or password is relayed with its message); the backend's own
PROTOCOL_ERROR relayed verbatim (an unsupported version must reach the
driver as is); SERVER_ERROR (0x0000) when the backend is unreachable, fails
TLS or breaks the protocol.  Every refusal is audited as a failed session
start with the detail.

Session: the core pipeline.  Client side: ``stages.SessionGuard`` (STARTUP /
AUTH_RESPONSE after the handshake refused), the audit observers
(``observers.py``), then the statement policy when the grant has rules
(``policy.py``); frames pass through as received.  Without a policy the
core taps the session: the pumps only frame, check and tee what the audit
reads, and the audit worker runs the observers (``tap.py``).  Client-side protocol errors (garbage, oversized frame,
bad segment CRC) get a PROTOCOL_ERROR on the offending stream and the session
closes; when the backend breaks the protocol or goes away, every request
still waiting gets a SERVER_ERROR on its stream (``clientwire.py``).

Limits: client frames are bounded by the listener's ``max_message_size``
(default 16 MiB, Cassandra's own ``native_transport_max_frame_size``
default); backend frames by the protocol's 256 MiB, since a result page is
the server's to size.
"""

from __future__ import annotations

import fnmatch
import functools
import logging
from typing import Any

from dbproxy.access import TooManyConnections
from dbproxy.channel import MessageStream
from dbproxy.engine import Engine
from dbproxy.errors import AccessDenied, ProxyError, UpstreamError
from dbproxy.flow import Backend, Refused, Request, Wiring, send_quietly
from dbproxy.tls import server_context

from . import handshake as hs
from . import protocol as F
from . import settings
from .backend import BackendRefused, open_backend
from .codec import CqlDecoder
from .observers import CqlSessionState, RequestAudit, ResponseAudit
from .policy import CqlPolicy, needs_policy
from .prepared import PreparedCache
from .stages import SessionGuard
from .tap import CqlTee
from .clientwire import BACKEND_LOST, ClientWire, Hello

log = logging.getLogger("dbproxy.cassandra")


class CassandraEngine(Engine):
    protocol = "cassandra"
    match_keys = ("user", "driver_name", "driver_version")
    auth_methods = ("none", "password", "gssapi")
    password_methods = ("password",)
    client_auth_methods = ("token", "mtls", "anonymous")
    default_max_message_size = 16 * 1024 * 1024
    max_message_size_limit = F.DEFAULT_MAX_MESSAGE_SIZE
    max_message_size_limit_source = "native protocol v5 spec 2.4.1.5: frame bodies are limited to 256 MiB"

    def __init__(self, listener: Any, services: Any) -> None:
        super().__init__(listener, services)
        self.ssl_context = server_context(listener.tls) if listener.tls else None
        options = listener.options or {}
        self.client_auth = options.get("client_auth", "password")
        self.expected_user = options.get("expected_user")
        self.prepared: PreparedCache = services.extras.setdefault("cassandra.prepared", PreparedCache())

    # ------------------------------------------------------------------ config (settings.py)
    @classmethod
    def validate_auth(cls, v: Any, method: str, ad: dict, path: str) -> dict:
        return settings.validate_auth(v, method, ad, path)

    @classmethod
    def validate_listener(cls, v: Any, d: dict, path: str) -> None:
        settings.validate_listener(v, d, path)

    # ------------------------------------------------------------------ session flow hooks (dbproxy.flow)
    def new_request(self, session: Any, stream: Any) -> Request:
        channel = MessageStream(stream, CqlDecoder("client", max_message_size=self.max_message_size),
                                budget=self.services.buffers)
        return Request(channel, extra=Hello(ClientWire(channel)))

    async def handshake(self, session: Any, request: Request) -> bool:
        """Listener TLS, then OPTIONS / STARTUP (the client's version, compression, driver)."""
        return await hs.handshake(self, session, request)

    async def identify(self, session: Any, request: Request) -> None:
        """The client's credentials (``handshake.client_auth_plan``): AUTHENTICATE and its SASL exchange."""
        await hs.identify(self, session, request)

    def no_route(self, request: Request) -> Refused:
        keys = request.keys
        message = f"no route for user \"{keys['user']}\" (driver \"{keys['driver_name']}\") on listener {self.listener.name}"
        return Refused(message, code=F.ErrorCode.AUTH_ERROR, fields={"error_code": F.ErrorCode.AUTH_ERROR})

    def check_route(self, session: Any, request: Request, route: Any) -> None:
        user = request.login
        for where, glob in (("listener", self.expected_user), (f"route {route.name}", route.options.get("expected_user"))):
            if glob is not None and not fnmatch.fnmatchcase(user or "", glob):
                raise Refused(f"user \"{user}\" is not allowed through this proxy ({where} expects \"{glob}\")",
                              code=F.ErrorCode.AUTH_ERROR, fields={"error_code": F.ErrorCode.AUTH_ERROR})

    def denied(self, session: Any, request: Request, exc: AccessDenied) -> Refused:
        if isinstance(exc, TooManyConnections):
            code, message = F.ErrorCode.OVERLOADED, "too many connections through this proxy listener for this user"
        else:
            code, message = F.ErrorCode.UNAUTHORIZED, f"User {session.identity.user} has no role allowing route {request.route.name}"
        return Refused(message, code=code, fields={"error_code": code})

    def upstream_refused(self, request: Request, exc: UpstreamError) -> Refused:
        code, message = _upstream_reply(exc)
        fields = {"error_code": code, "backend_error_kind": exc.kind}
        if isinstance(exc, BackendRefused):
            fields["backend_error_code"] = exc.code
        return Refused(str(exc), client_message=message, code=code, fields=fields)

    def unavailable(self, request: Request, reason: str) -> Refused:
        return Refused(reason, code=F.ErrorCode.SERVER_ERROR)

    def render_error(self, request: Request, exc: ProxyError) -> bytes:
        hello = request.extra
        if isinstance(exc, Refused):
            return hello.wire.error(hello.reply_stream, exc.code, exc.client_message)
        return hello.wire.protocol_error(exc)

    async def connect_backend(self, session: Any, request: Request, route: Any, grant: Any) -> Backend:
        hello = request.extra
        link = await open_backend(
            route,
            version=hello.version,
            options=hello.options,
            compression=hello.compression,
            max_message_size=max(self.max_message_size, F.DEFAULT_MAX_MESSAGE_SIZE),
            credentials=self.services.credentials,
        )
        fields = {
            "backend_tls": link.tls,
            "backend_auth": route.backend.auth.method,
            "backend_auth_mechanism": link.mechanism,
            "backend_authenticator": link.authenticator_class,
        }
        if link.principal is not None:
            fields["backend_principal"] = link.principal
        return Backend(link.stream, link.decoder, link.encoder, link=link, start_fields=fields)

    async def ready(self, session: Any, request: Request, backend: Backend) -> None:
        hello = request.extra
        wire, version = hello.wire, hello.version
        if hello.authenticated:
            await wire.send(wire.encoder(F.encode_auth_success(version, hello.reply_stream, None, compressor=wire.compression)))
        else:
            await wire.send(F.encode_ready(version, hello.reply_stream, compressor=wire.compression))
            if version >= F.FIRST_SEGMENT_VERSION:
                wire.encoder.set_framing("segments", hello.compression)

    def wiring(self, session: Any, request: Request, backend: Backend, grant: Any) -> Wiring:
        audit, hello = session.audit, request.extra
        wire = hello.wire
        state = CqlSessionState(backend=session.backend_addr, prepared=self.prepared, session=session, version=hello.version)
        client_stages: list = []
        if needs_policy(grant):
            hello.policy = CqlPolicy(state, grant, session, audit, compressor=wire.compression)
            client_stages.append(hello.policy)
        # The observers run inline or in the audit worker, as the core decides
        # (dbproxy.flow.assemble); the guard runs on the proxy either way.
        return Wiring(request.client.decoder, backend.decoder, client_stages, [], state,
                      functools.partial(wire.pipeline_error, state),
                      to_client_encoder=wire.encoder, to_backend_encoder=backend.encoder,
                      client_guards=[SessionGuard(audit, compressor=wire.compression)],
                      client_observers=[RequestAudit(state, audit)], backend_observers=[ResponseAudit(state, audit)],
                      tap=CqlTee.plan(state, wire.compression))

    async def session_ended(self, session: Any, request: Request, backend: Backend, wiring: Wiring, pipeline: Any) -> dict:
        hello, state = request.extra, wiring.state
        if session.details["end_reason"].startswith("backend") and state.pending:
            await send_quietly(request.client.stream, hello.wire.fail_pending(state, BACKEND_LOST))
        # A tapped session's counts are added to its end event by the audit worker.
        fields = {} if wiring.tapped else {"requests": state.requests, "errors": state.errors, "events": state.events}
        if hello.policy is not None:
            fields["refused"] = hello.policy.denied
        return fields


def _upstream_reply(exc: UpstreamError) -> tuple[int, str]:
    if isinstance(exc, BackendRefused):
        if exc.code == F.ErrorCode.PROTOCOL_ERROR:
            return exc.code, exc.server_message  # verbatim: drivers downgrade on its wording
        if exc.kind == "auth":
            return F.ErrorCode.AUTH_ERROR, exc.client_hint
        return exc.code, exc.client_hint
    if exc.kind == "auth":
        return F.ErrorCode.AUTH_ERROR, exc.client_hint
    return F.ErrorCode.SERVER_ERROR, exc.client_hint
