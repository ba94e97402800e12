"""The Cassandra engine (CQL native protocol v3, v4, v5, v6-beta).

Handshake (client side), owned by the proxy:

  TLS        with listener ``tls`` the client speaks TLS from the first byte
             (the protocol has no STARTTLS); a plaintext CQL frame on such a
             port gets a PROTOCOL_ERROR saying TLS is required.
  version    the first frame's header fixes the connection's version.  A
             version the codec refuses (v1/v2, v7+, DSE's 0x41/0x42) gets
             Cassandra's exact PROTOCOL_ERROR, so drivers downgrade and retry
             on a new connection as they do against a real node.
  OPTIONS    answered by the proxy with SUPPORTED (the versions the proxy
             speaks, lz4/snappy, Cassandra 5.0's CQL version): the route is
             not known yet (it may depend on the user name), and Cassandra
             4+ only checks that STARTUP's CQL_VERSION is 3.x.
  STARTUP    parsed (CQL_VERSION, COMPRESSION, DRIVER_NAME/VERSION go to the
             session-start audit event); compression is checked the way
             Cassandra checks it.  Then, per listener ``options.client_auth``:
             ``password`` (default): AUTHENTICATE (PasswordAuthenticator) →
               the client's SASL PLAIN AUTH_RESPONSE gives its user name (a
               claim: routing, ``expected_user``, audit); the password is
               dropped (``auth.PlainClientAuthenticator``, the seam a token
               check replaces later).
             ``none``: no client credentials; the client gets READY.
             With an identity layer (``services.access``: config ``identity``/
             ``roles``/``limits``) the listener's ``auth.methods`` decide
             instead: ``mtls`` (verified client certificate, no exchange),
             ``token`` (the PLAIN password is a dbproxy token; TLS listeners
             only), ``anonymous`` — see ``_client_auth_plan``.
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
refused credentials, no route or a wrong user; the backend's own
PROTOCOL_ERROR relayed verbatim (an unsupported version must reach the
driver as is); SERVER_ERROR (0x0000) when the backend is unreachable, fails
TLS or breaks the protocol.  Every refusal is audited as a failed session
start with the detail.

Framing follows the codec's rules (``codec.py``): v5+ client decoder to
segments right after STARTUP, encoder toward the client right after the
proxy's AUTHENTICATE/READY went out; v3/v4 compression from STARTUP on.
Everything the proxy itself sends after that goes through that encoder
(frames compressed like Cassandra does in v3/v4, segments in v5).

Session: the core pipeline with the audit stages (``stages.py``), then the
statement policy when the grant has rules (``policy.py``); frames pass
through as received.  Client-side protocol errors (garbage, oversized frame,
bad segment CRC) get a PROTOCOL_ERROR on the offending stream and the session
closes; when the backend breaks the protocol or goes away, every request
still waiting gets a SERVER_ERROR on its stream before the client connection
is closed, so drivers fail fast instead of timing out.

Limits: client frames are bounded by the listener's ``max_message_size``
(default 16 MiB, Cassandra's own ``native_transport_max_frame_size``
default); backend frames by the protocol's 256 MiB, since a result page is
the server's to size.
"""

from __future__ import annotations

import fnmatch
import functools
import logging
import socket as socket_module
from typing import Any

import attrs
import trio

from dbproxy.access import TooManyConnections
from dbproxy.channel import MessageStream
from dbproxy.engine import Engine
from dbproxy.errors import AccessDenied, BufferBudgetExceeded, FrameTooLarge, MessageTimeout, ProtocolError, ProxyError, UpstreamError
from dbproxy.flow import Backend, Refused, Request, Wiring, send_quietly
from dbproxy.identity import AuthFailed
from dbproxy.session import Identity
from dbproxy.tls import server_context

from . import protocol as F
from .auth import ClientAuthFailed, ClientAuthenticator, TokenClientAuthenticator, client_authenticator
from .backend import BackendProtocolError, BackendRefused, open_backend
from .codec import CqlDecoder, CqlEncoder
from .policy import CqlPolicy, needs_policy
from .stages import CqlSessionState, PreparedCache, RequestAudit, ResponseAudit

log = logging.getLogger("dbproxy.cassandra")

TLS_HANDSHAKE_RECORD = 0x16

CLIENT_AUTH_MODES = ("password", "none")
LISTENER_OPTIONS = frozenset({"client_auth", "expected_user"})
ROUTE_OPTIONS = frozenset({"expected_user"})
GSSAPI_KEYS = frozenset({"principal", "keytab_file", "ccache", "service", "host", "krb5_config", "renew_margin_seconds"})

CQL_VERSION = "3.4.7"  # Cassandra 5.0's
SUPPORTED_OPTIONS = {
    "PROTOCOL_VERSIONS": F.supported_versions_text().split(", "),
    "COMPRESSION": ["snappy", "lz4"],
    "CQL_VERSION": [CQL_VERSION],
}
BACKEND_LOST = "the connection to the backend database was lost"
TLS_REQUIRED = "this port requires TLS: connect to the proxy with TLS (cqlsh --ssl, or an ssl_context in the driver)"


@attrs.define(eq=False)
class _Hello:
    """The engine's part of a ``Request``: what the handshake and the client's login settled."""

    wire: "_ClientWire"
    version: int = 0
    options: dict = attrs.field(factory=dict)
    compression: str | None = None
    reply_stream: int = 0  # where AUTHENTICATE / AUTH_SUCCESS / READY / a refusal go: the last frame's stream
    user: str | None = None  # the user name the client logged in with (None: it sent no credentials)
    authenticated: bool = False  # AUTHENTICATE was sent: the client waits for AUTH_SUCCESS, not READY
    policy: Any = None  # the statement policy stage, when the grant has rules


def _auth_refused(message: str, cause: AccessDenied) -> Refused:
    """The client's credentials are refused during the handshake: AUTH_ERROR, audited as a denial."""
    code = F.ErrorCode.AUTH_ERROR
    return Refused(message, code=code, fields={"error_code": code}, cause=cause, stage="authenticate")


class _ClientWire:
    """Frames the proxy itself sends the client, in the connection's current framing."""

    def __init__(self, channel: MessageStream) -> None:
        self.channel = channel
        self.version: int | None = None
        self.compression: str | None = None  # v3/v4 per-frame compression, from STARTUP on
        self.encoder = CqlEncoder()

    def error(self, stream: int, code: int, message: str) -> bytes:
        version = self.version or F.CURRENT_VERSION
        return self.encoder(F.encode_error(version, stream, code, message, compressor=self.compression))

    def protocol_error(self, exc: Exception) -> bytes:
        """The PROTOCOL_ERROR for a client's ProtocolError, on its stream when known."""
        if self.version is None:
            if isinstance(exc, F.UnsupportedProtocolVersion):
                return F.protocol_error_reply(exc)
            # A bad first header is answered in the server's current version
            # (Cassandra does); an oversized one in its own, which is valid.
            version = getattr(exc, "version", None)
            if not (isinstance(exc, FrameTooLarge) and version in F.SUPPORTED_VERSIONS):
                version = F.CURRENT_VERSION
            return F.protocol_error_reply(exc, version=version)
        return self.encoder(F.protocol_error_reply(exc, version=self.version, compressor=self.compression))

    async def send(self, data: bytes) -> None:
        await self.channel.send(data)


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

    # ------------------------------------------------------------------ config
    @classmethod
    def validate_auth(cls, v: Any, method: str, ad: dict, path: str) -> dict:
        extra = sorted(k for k in ad if k not in {"method", "password_file", "password_env"})
        if method == "gssapi":
            for k in extra:
                if k not in GSSAPI_KEYS:
                    v.err(f"{path}.{k}", f"a gssapi key ({', '.join(sorted(GSSAPI_KEYS))})")
            v.err(f"{path}.method", "\"password\" or \"none\": SASL GSSAPI toward Cassandra is reserved, not supported yet")
            return {}
        for k in extra:
            v.err(f"{path}.{k}", f"no key {k!r} for method {method}")
        if method == "none" and ("password_file" in ad or "password_env" in ad):
            v.err(path, "no password for method none (use method \"password\")")
        return {}

    @classmethod
    def validate_listener(cls, v: Any, d: dict, path: str) -> None:
        needs_user = False
        opts = d.get("options", {})
        client_auth = None
        if isinstance(opts, dict):
            op = f"{path}.options"
            for k in opts:
                if k not in LISTENER_OPTIONS:
                    v.err(f"{op}.{k}", f"a cassandra listener option ({', '.join(sorted(LISTENER_OPTIONS))})")
            if "client_auth" in opts:
                client_auth = v.string(opts, "client_auth", op, choices=CLIENT_AUTH_MODES)
            if "expected_user" in opts:
                needs_user = True
                v.string(opts, "expected_user", op)
        routes = d.get("routes")
        for j, r in enumerate(routes if isinstance(routes, list) else []):
            if not isinstance(r, dict):
                continue
            rp = f"{path}.routes[{j}]"
            ropts = r.get("options", {})
            if isinstance(ropts, dict):
                for k in ropts:
                    if k not in ROUTE_OPTIONS:
                        v.err(f"{rp}.options.{k}", f"a cassandra route option ({', '.join(sorted(ROUTE_OPTIONS))})")
                if "expected_user" in ropts:
                    needs_user = True
                    v.string(ropts, "expected_user", f"{rp}.options")
            if isinstance(r.get("match"), dict) and "user" in r["match"]:
                needs_user = True
            backend = r.get("backend")
            if not isinstance(backend, dict):
                continue
            bp = f"{rp}.backend"
            if "database" in backend:
                v.err(f"{bp}.database", "no \"database\" for cassandra: clients choose keyspaces themselves (USE, or per statement)")
            auth = backend.get("auth")
            if isinstance(auth, dict) and auth.get("method") == "password" and not backend.get("user"):
                v.err(bp, "a \"user\" for auth method password (the role the proxy logs in as)")
            tls = backend.get("tls")
            if isinstance(tls, dict) and "mode" not in tls:
                v.err(f"{bp}.tls", "a \"mode\" (verify-full, verify-ca, require or disable): a tls object without one would silently mean disable")
        if client_auth == "none" and needs_user:
            v.err(f"{path}.options.client_auth", "\"password\": routes match on \"user\" or expected_user is set, which needs the client's user name")

    # ------------------------------------------------------------------ session flow hooks (dbproxy.flow)
    def new_request(self, session: Any, stream: Any) -> Request:
        channel = MessageStream(stream, CqlDecoder("client", max_message_size=self.max_message_size),
                                budget=self.services.buffers)
        return Request(channel, extra=_Hello(_ClientWire(channel)))

    async def handshake(self, session: Any, request: Request) -> bool:
        """Listener TLS, then OPTIONS / STARTUP (the client's version, compression, driver)."""
        if self.ssl_context is not None and not await self._client_tls(session, request):
            return False
        request.waiting_for = "client handshake timed out"
        channel, hello = request.client, request.extra
        wire = hello.wire
        while True:
            frame = await channel.receive()
            self._check_version(frame, wire)
            hello.reply_stream = frame.stream
            if frame.opcode == F.Opcode.OPTIONS:
                await wire.send(F.encode_supported(frame.version, frame.stream, SUPPORTED_OPTIONS))
                continue
            if frame.opcode == F.Opcode.STARTUP:
                break
            name = F.Opcode(frame.opcode).name
            raise F.CqlProtocolError(
                f"Unexpected message {name}, expecting STARTUP or OPTIONS", stream=frame.stream, version=frame.version
            )
        version = frame.version
        options = {k.upper(): v for k, v in F.parse_startup(frame).items()}
        if "CQL_VERSION" not in options:
            raise F.CqlProtocolError("Missing value CQL_VERSION in STARTUP message", stream=frame.stream, version=version)
        compression = options.get("COMPRESSION")
        if compression is not None:
            compression = compression.lower()
            if compression not in ("lz4", "snappy"):
                raise F.CqlProtocolError(f"Unknown compression algorithm: {compression}", stream=frame.stream, version=version)
            if compression == "snappy" and version >= F.FIRST_SEGMENT_VERSION:
                raise F.CqlProtocolError("Snappy compression is not supported in protocol V5", stream=frame.stream, version=version)
            options["COMPRESSION"] = compression
        details = session.details
        details["protocol_version"] = version
        details["cql_version"] = options.get("CQL_VERSION")
        details["compression"] = compression
        for key in ("DRIVER_NAME", "DRIVER_VERSION", "APPLICATION_NAME", "CLIENT_ID"):
            if options.get(key):
                details[key.lower()] = options[key]
        if version >= F.FIRST_SEGMENT_VERSION:
            channel.decoder.set_framing("segments", compression)
        elif compression:
            channel.decoder.set_framing("frames", compression)
            wire.compression = compression
        hello.version, hello.options, hello.compression = version, options, compression
        request.start_fields = self._start_fields(session)
        return True

    async def _client_tls(self, session: Any, request: Request) -> bool:
        stream = request.client.stream
        sock = getattr(stream, "socket", None)
        if sock is not None:
            request.waiting_for = "client sent nothing in time"
            try:
                first = await sock.recv(1, socket_module.MSG_PEEK)
            except OSError:
                return False
            if not first:
                return False
            if first[0] != TLS_HANDSHAKE_RECORD:
                await self._refuse_plaintext(session, stream)
                return False
        request.waiting_for = "client TLS handshake timed out"
        tls = trio.SSLStream(stream, self.ssl_context, server_side=True)
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError as exc:
            log.info("session %s: client TLS handshake failed: %s", session.id, getattr(exc, "__cause__", None) or exc)
            return False
        session.details["client_tls"] = True
        request.client.stream = tls
        return True

    async def _refuse_plaintext(self, session: Any, stream: Any) -> None:
        header = b""
        with trio.move_on_after(5):
            try:
                while len(header) < F.HEADER_SIZE:
                    chunk = await stream.receive_some(F.HEADER_SIZE - len(header))
                    if not chunk:
                        break
                    header += chunk
            except (trio.BrokenResourceError, OSError):
                return
        if len(header) < 4:
            return
        version = header[0] & F.VERSION_MASK
        stream_id = int.from_bytes(header[2:3] if version in F.LEGACY_VERSIONS else header[2:4], "big", signed=True)
        log.info("session %s: plaintext CQL on a TLS listener refused", session.id)
        await send_quietly(stream, F.encode_error(F.reply_version_for(version), stream_id, F.ErrorCode.PROTOCOL_ERROR, TLS_REQUIRED))

    def _check_version(self, frame: F.Frame, wire: _ClientWire) -> None:
        if wire.version is None:
            wire.version = frame.version
        elif frame.version != wire.version:
            message = f"Invalid message version. Got {frame.version} but previous messages on this connection had version {wire.version}"
            raise F.CqlProtocolError(message, stream=frame.stream, version=wire.version)

    async def identify(self, session: Any, request: Request) -> None:
        """The client's credentials (``_client_auth_plan``): AUTHENTICATE and its SASL exchange."""
        channel, hello = request.client, request.extra
        wire, version = hello.wire, hello.version
        authenticator, identity, mechanism = self._client_auth_plan(session, channel.stream)
        session.details["client_auth"] = mechanism
        request.start_fields = self._start_fields(session)
        if identity is not None:
            session.identity = identity
        if authenticator is None:
            hello.user = identity.user if identity is not None and mechanism == "mtls" else None
            self._requested(session, request)
            return
        await wire.send(
            F.encode_authenticate(version, hello.reply_stream, authenticator.authenticator_class, compressor=wire.compression)
        )
        if version >= F.FIRST_SEGMENT_VERSION:
            wire.encoder.set_framing("segments", hello.compression)
        while True:
            frame = await channel.receive()
            self._check_version(frame, wire)
            hello.reply_stream = frame.stream
            if frame.opcode != F.Opcode.AUTH_RESPONSE:
                name = F.Opcode(frame.opcode).name
                raise F.CqlProtocolError(f"Unexpected message {name}, expecting SASL response", stream=frame.stream, version=version)
            token = F.parse_auth_response(frame)
            try:
                step = authenticator.step(token)
            except ClientAuthFailed as exc:
                if exc.cause is not None:
                    session.identity = Identity(user="unauthenticated", method="token")
                raise Refused(f"client authentication refused: {exc.cause or exc}", client_message=str(exc),
                              code=F.ErrorCode.AUTH_ERROR, fields={"error_code": F.ErrorCode.AUTH_ERROR},
                              cause=exc.cause, stage="authenticate" if exc.cause is not None else None) from None
            if step.done:
                session.details["requested_user"] = step.user
                if step.identity is not None:
                    session.identity = step.identity
                hello.user, hello.authenticated = step.user, True
                self._requested(session, request)
                return
            await wire.send(wire.encoder(F.encode_auth_challenge(version, frame.stream, step.challenge, compressor=wire.compression)))

    def _requested(self, session: Any, request: Request) -> None:
        hello = request.extra
        options = hello.options
        request.login = hello.user
        request.keys = {
            "user": hello.user or "",
            "driver_name": options.get("DRIVER_NAME", ""),
            "driver_version": options.get("DRIVER_VERSION", ""),
        }
        request.start_fields = self._start_fields(session)

    def _client_auth_plan(self, session: Any, stream: Any) -> tuple[ClientAuthenticator | None, Any, str]:
        """(authenticator for AUTH_RESPONSE or None, identity known already, mechanism name).

        Without an identity layer the listener's ``client_auth`` decides
        (``claim``: the user name is taken, the password dropped; ``none``).
        With one (``services.access``), the listener's ``auth.methods``, first
        that applies: ``mtls`` (a verified client certificate: no exchange),
        ``token`` (the SASL PLAIN password is a dbproxy token; only over
        client TLS — CQL has no SCRAM, and a token never crosses an
        unencrypted link), ``anonymous``.
        """
        if self.access is None:
            auth = client_authenticator(self.client_auth)
            return auth, None, "claim" if auth is not None else "none"
        acc = self.access.auth
        methods = acc.methods
        if "mtls" in methods:
            try:
                identity = acc.certificate_identity(stream)
            except AuthFailed as exc:
                raise _auth_refused("certificate authentication failed", exc) from None
            if identity is not None:
                return None, identity, "mtls"
        if acc.token:
            if self.ssl_context is not None:
                return TokenClientAuthenticator(acc), None, "token"
            if "anonymous" not in methods:
                raise _auth_refused(
                    "token authentication needs an encrypted connection to the proxy (a TLS listener; cqlsh --ssl)",
                    AuthFailed("token method on a listener without TLS: a CQL password travels in cleartext", reason="method_unavailable"),
                )
        if "anonymous" in methods:
            auth = client_authenticator(self.client_auth)
            return auth, acc.anonymous(), "anonymous"
        raise _auth_refused(
            "connection requires a valid client certificate",
            AuthFailed("no verified client certificate on an mtls listener", reason="certificate_missing"),
        )

    def _start_fields(self, session: Any) -> dict:
        d = session.details
        fields = {
            "requested_user": d.get("requested_user"),
            "client_auth": d.get("client_auth", "none"),
            "client_tls": bool(d.get("client_tls")),
            "protocol_version": d.get("protocol_version"),
            "cql_version": d.get("cql_version"),
            "compression": d.get("compression"),
            "driver_name": d.get("driver_name"),
            "driver_version": d.get("driver_version"),
        }
        for key in ("application_name", "client_id"):
            if d.get(key):
                fields[key] = d[key]
        return fields

    def _user_refusal(self, route: Any, user: str | None) -> str | None:
        for where, glob in (("listener", self.expected_user), (f"route {route.name}", route.options.get("expected_user"))):
            if glob is not None and not fnmatch.fnmatchcase(user or "", glob):
                return f"user \"{user}\" is not allowed through this proxy ({where} expects \"{glob}\")"
        return None

    def no_route(self, request: Request) -> Refused:
        keys = request.keys
        message = f"no route for user \"{keys['user']}\" (driver \"{keys['driver_name']}\") on listener {self.listener.name}"
        return Refused(message, code=F.ErrorCode.AUTH_ERROR, fields={"error_code": F.ErrorCode.AUTH_ERROR})

    def check_route(self, session: Any, request: Request, route: Any) -> None:
        refusal = self._user_refusal(route, request.login)
        if refusal is not None:
            raise Refused(refusal, code=F.ErrorCode.AUTH_ERROR, fields={"error_code": F.ErrorCode.AUTH_ERROR})

    def denied(self, session: Any, request: Request, exc: AccessDenied) -> Refused:
        if isinstance(exc, TooManyConnections):
            code, message = F.ErrorCode.OVERLOADED, "too many connections through this proxy listener for this user"
        else:
            code, message = F.ErrorCode.UNAUTHORIZED, f"User {session.identity.user} has no role allowing route {request.route.name}"
        return Refused(message, code=code, fields={"error_code": code})

    def upstream_refused(self, request: Request, exc: UpstreamError) -> Refused:
        code, message = self._upstream_reply(exc)
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

    @staticmethod
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
        return Backend(link.stream, link.decoder, link.encoder, link=link, start_fields={
            "backend_tls": link.tls,
            "backend_auth": route.backend.auth.method,
            "backend_auth_mechanism": link.mechanism,
            "backend_authenticator": link.authenticator_class,
        })

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
        client_stages: list = [RequestAudit(state, audit, compressor=wire.compression)]
        if needs_policy(grant):
            hello.policy = CqlPolicy(state, grant, session, audit, compressor=wire.compression)
            client_stages.append(hello.policy)
        return Wiring(request.client.decoder, backend.decoder, client_stages, [ResponseAudit(state, audit)], state,
                      functools.partial(self._pipeline_error, wire, state),
                      to_client_encoder=wire.encoder, to_backend_encoder=backend.encoder)

    async def session_ended(self, session: Any, request: Request, backend: Backend, wiring: Wiring, pipeline: Any) -> dict:
        hello, state = request.extra, wiring.state
        if session.details["end_reason"].startswith("backend") and state.pending:
            await send_quietly(request.client.stream, self._fail_pending(hello.wire, state, BACKEND_LOST))
        fields = {"requests": state.requests, "errors": state.errors, "events": state.events}
        if hello.policy is not None:
            fields["refused"] = hello.policy.denied
        return fields

    @staticmethod
    def _fail_pending(wire: _ClientWire, state: CqlSessionState, message: str) -> bytes:
        """SERVER_ERROR on every stream still waiting for an answer (then the session closes)."""
        streams = list(state.pending)
        state.pending.clear()
        if not streams:
            return b""
        version = wire.version or F.CURRENT_VERSION
        frames = b"".join(
            F.encode_error(version, s, F.ErrorCode.SERVER_ERROR, message, compressor=wire.compression) for s in streams
        )
        return wire.encoder(frames)

    def _pipeline_error(self, wire: _ClientWire, state: CqlSessionState, exc: ProxyError) -> bytes:
        if isinstance(exc, BackendProtocolError):
            return self._fail_pending(wire, state, exc.client_hint)
        if isinstance(exc, (BufferBudgetExceeded, MessageTimeout)):
            return self._limit_error(wire, state, exc)
        return wire.protocol_error(exc)

    def _limit_error(self, wire: _ClientWire, state: CqlSessionState, exc: ProtocolError) -> bytes:
        """The proxy ends the session for a memory bound (``dbproxy.buffer``).

        The frame the client was still sending gets OVERLOADED for the buffer budget —
        Cassandra's own answer when its in-flight request bytes are exhausted
        (native_transport_max_request_data_in_flight) — or PROTOCOL_ERROR for the
        deadline, on its stream when its header is in ('frames' framing); every
        request still waiting gets SERVER_ERROR, as when the backend is lost.
        """
        out = b""
        stream = _partial_stream(wire.channel.decoder) if getattr(exc, "direction", None) == "client" else None
        if stream is not None:
            code = F.ErrorCode.OVERLOADED if isinstance(exc, BufferBudgetExceeded) else F.ErrorCode.PROTOCOL_ERROR
            state.pending.pop(stream, None)
            out = wire.error(stream, code, exc.client_hint)
        return out + self._fail_pending(wire, state, exc.client_hint)


def _partial_stream(decoder: CqlDecoder) -> int | None:
    """Stream id of the frame partly received at the decoder's read position ('frames' framing)."""
    buf = decoder.buffer
    if decoder.framing != "frames" or not buf:
        return None
    size = F.header_size_for(buf.peek_byte())
    if len(buf) < size:
        return None
    return F.parse_header(bytes(buf.peek(size)))[2]
