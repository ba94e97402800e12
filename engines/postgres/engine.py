"""The PostgreSQL engine.

Handshake (client side, PostgreSQL protocol §55.2):
  SSLRequest     → 'S' and a TLS handshake when the listener has ``tls``, else 'N'
  GSSENCRequest  → 'N' (clients fall back to TLS or plain)
  CancelRequest  → looked up in the proxy's cancel-key map and delivered to
                   the backend that owns the session (never audited as a session)
  StartupMessage → route chosen by (database, user) globs; a 3.x minor
                   version above 0 or ``_pq_.`` options get NegotiateProtocolVersion.

The client's startup parameters are checked (``startup.backend_settings``:
settings and ``options`` -c settings pass on, identity/privilege/log ones are
refused).  The proxy then logs in to the backend itself
(``backend.open_backend``), tells the client AuthenticationOk, replays the
backend's ParameterStatus messages, hands the client BackendKeyData with the
backend's real pid and a secret of the proxy's own (``CancelMap``), and relays
ReadyForQuery.  From there the session is the core pipeline with the audit
stages; every other message passes through as bytes.

With identity configured (``services.access``), the client first proves
who it is (``clientauth``: mTLS, or a token as the password — cleartext over
TLS, SCRAM-SHA-256 without), then the route is checked against its roles and
the connection limits, a read-only grant makes the backend session read-only,
and ``policy`` stages check every statement.

Errors reach the client as ErrorResponse with a SQLSTATE: 28000 no route /
no client certificate, 28P01 bad token, 42501 role does not allow the
route/database/user (FATAL), a startup setting (FATAL) or the statement
(ERROR, session continues), 0A000/42601 an ``options`` switch that is not a
setting / malformed, 53300 too many connections, 08001 backend unreachable,
28P01 backend refused the proxy's credential, 08P01 protocol violation, 54000
message too large, 53200 the proxy's buffer budget cannot hold the message
(08P01 "message not received in time" after its deadline), 08006 backend
lost mid-session (only when the backend's last message was not an
ErrorResponse: after its own FATAL the client needs no second one).
A client that stalls its handshake past the listener's handshake timeout is
logged and audited (failed ``db.session.start``); one that resets it is an
info line.
"""

from __future__ import annotations

import functools

import logging
from typing import Any

import trio

from dbproxy.access import TooManyConnections
from dbproxy.channel import MessageStream
from dbproxy.engine import Engine
from dbproxy.errors import AccessDenied, ProtocolError, ProxyError, UpstreamError
from dbproxy.flow import CONNECT_TIMEOUT, Backend, Refused, Request, Wiring, send_quietly
from dbproxy.kerberos import validate_gssapi
from dbproxy.tls import server_context

from . import messages as m
from .backend import make_backend_read_only, open_backend, send_cancel
from .cancel import SIBLING_CANCEL, CancelMap, cancel_key_bytes, parse_cancel_key
from .clientwire import client_error_for, error_message
from .codec import DEFAULT_MAX_MESSAGE_SIZE, FrontendDecoder
from .clientauth import ClientAuthError, authenticate
from .startup import SettingRefused, backend_settings, setting
from .policy import BackendPolicy, FrontendPolicy, PolicyState
from .tap import TAP_PLAN
from .stages import BackendAudit, FrontendAudit, LastBackendMessage, PgSessionState

log = logging.getLogger("dbproxy.postgres")


class PostgresEngine(Engine):
    protocol = "postgres"
    match_keys = ("database", "user", "application_name")
    auth_methods = ("trust", "password", "md5", "scram-sha-256", "gssapi")
    password_methods = ("password", "md5", "scram-sha-256")
    default_max_message_size = 256 * 1024 * 1024
    max_message_size_limit = DEFAULT_MAX_MESSAGE_SIZE
    max_message_size_limit_source = "MaxAllocSize, 1 GiB - 1"
    client_auth_methods = ("token", "mtls", "anonymous")

    def __init__(self, listener: Any, services: Any) -> None:
        super().__init__(listener, services)
        self.ssl_context = server_context(listener.tls) if listener.tls else None
        self.cancels: CancelMap = services.extras.setdefault("postgres.cancel_map", CancelMap())
        # ``"workers": N``: a CancelRequest may reach a process that does not hold the session;
        # its siblings are asked (dbproxy.siblings), and this one answers for its own sessions.
        self.siblings = services.extras.get("siblings")
        if self.siblings is not None:
            self.siblings.register(SIBLING_CANCEL, self._cancel_for_sibling)

    @classmethod
    def validate_auth(cls, v: Any, method: str, ad: dict, path: str) -> dict:
        extra = {k for k in ad if k not in {"method", "password_file", "password_env"}}
        if method == "gssapi":
            return validate_gssapi(v, ad, path, extra, extra_keys={"gssencmode": ("disable", "prefer", "require")})
        for k in sorted(extra):
            v.err(f"{path}.{k}", f"no key {k!r} for method {method}")
        return {}

    # -- the session flow's hooks (dbproxy.flow) ---------------------------------
    def new_request(self, session: Any, stream: Any) -> Request:
        decoder = FrontendDecoder(max_message_size=self.max_message_size, startup=True)
        return Request(MessageStream(stream, decoder, budget=self.services.buffers), extra={})

    async def handshake(self, session: Any, request: Request) -> bool:
        client = request.client
        startup = await self._client_startup(session, client)
        if startup is None:
            return False  # cancel request or refused SSL: not a session
        params = dict(startup.params)
        user = params.get("user", "")
        database = params.get("database") or user
        session.details["requested_database"] = database
        session.details["requested_user"] = user
        application_name = setting(params, "application_name") or ""
        if application_name:
            session.details["application_name"] = application_name
        if startup.minor != 0 or any(k.startswith("_pq_.") for k in params):
            unrecognized = [k for k in params if k.startswith("_pq_.")]
            await client.send(m.encode_negotiate_protocol_version(0, unrecognized))
            for k in unrecognized:
                params.pop(k)
        request.keys = {"database": database, "user": user, "application_name": application_name}
        request.target, request.login = database, user
        request.start_fields = {"requested_database": database, "requested_user": user,
                                "client_tls": bool(session.details.get("client_tls"))}
        request.extra["params"] = params
        return True

    async def _client_startup(self, session: Any, client: MessageStream) -> m.StartupMessage | None:
        decoder = client.decoder
        while True:
            msg = await client.receive()
            if isinstance(msg, m.SSLRequest):
                if self.ssl_context is None:
                    await client.send(b"N")
                    continue
                if decoder.buffer:
                    raise ProtocolError("data received after SSLRequest before the TLS handshake", client_hint="unencrypted data after SSL request")
                await client.send(b"S")
                tls = trio.SSLStream(client.stream, self.ssl_context, server_side=True)
                try:
                    await tls.do_handshake()
                except trio.BrokenResourceError as exc:
                    log.info("session %s: client TLS handshake failed: %s", session.id, exc.__cause__ or exc)
                    return None
                client.stream = tls
                session.details["client_tls"] = True
            elif isinstance(msg, m.GSSENCRequest):
                await client.send(b"N")
            elif isinstance(msg, m.CancelRequest):
                await self._forward_cancel(msg)
                return None
            else:
                return msg

    async def _forward_cancel(self, req: m.CancelRequest) -> None:
        if await self._cancel_here(req.pid, req.secret):
            return
        if self.siblings is not None:
            answer = await self.siblings.route(SIBLING_CANCEL, cancel_key_bytes(req.pid, req.secret))
            if answer is not None:
                log.info("cancel request (pid %d): routed to the proxy process holding the session", req.pid)
                return
        log.info("cancel request for an unknown key (pid %d): ignored", req.pid)

    async def _cancel_for_sibling(self, key: bytes) -> bytes | None:
        """A sibling process received a CancelRequest: deliver it if the session is ours."""
        pid, secret = parse_cancel_key(key)
        return b"" if await self._cancel_here(pid, secret, routed=True) else None

    async def _cancel_here(self, pid: int, secret: bytes, *, routed: bool = False) -> bool:
        """Deliver a CancelRequest for a session this process holds; False: not one of ours."""
        found = self.cancels.lookup(pid, secret)
        if found is None:
            return False
        route, key = found
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                await send_cancel(route, key)
            log.info("cancel request%s delivered to backend %s pid %d", " (from a sibling process)" if routed else "",
                     route.backend.address, key.pid)
        except (ProxyError, trio.TooSlowError, OSError, trio.BrokenResourceError) as exc:
            log.warning("cancel request to backend %s failed: %s", route.backend.address, exc)
        return True

    async def identify(self, session: Any, request: Request) -> None:
        """With identity configured, the client proves who it is (``clientauth``)."""
        if self.access is None:
            return
        try:
            identity, mechanism = await authenticate(
                self.access.auth, request.client, request.login or "", client_tls=bool(session.details.get("client_tls"))
            )
        except ClientAuthError as exc:
            session.identity = exc.identity
            raise Refused(exc.client_message, code=exc.sqlstate, detail=exc.detail,
                          fields={"sqlstate": exc.sqlstate, "reason": exc.cause.reason},
                          cause=exc.cause, stage="authenticate", denial_fields={"client_auth": exc.mechanism}) from None
        session.identity = identity
        request.start_fields["client_auth"] = mechanism

    def no_route(self, request: Request) -> Refused:
        msg = f"no route for database \"{request.target}\" and user \"{request.login}\" on listener {self.listener.name}"
        return Refused(msg, code="28000")

    def denied(self, session: Any, request: Request, exc: AccessDenied) -> Refused:
        if isinstance(exc, TooManyConnections):
            # PostgreSQL's own words for these (53300 too_many_connections).
            msg = f'too many connections for role "{session.identity.user}"' if exc.scope == "identity" else "sorry, too many clients already"
            return Refused(msg, code="53300", fields={"sqlstate": "53300"})
        return Refused(f'permission denied for database "{session.db_name}"', code="42501", detail=str(exc),
                       fields={"sqlstate": "42501"})

    def upstream_refused(self, request: Request, exc: UpstreamError) -> Refused:
        sqlstate = getattr(exc, "sqlstate", None) or ("28P01" if exc.kind == "auth" else "08001")
        if exc.kind == "auth" and sqlstate not in ("28P01", "28000"):
            sqlstate = "28000"
        return Refused(str(exc), client_message=exc.client_hint, code=sqlstate, fields={"sqlstate": sqlstate})

    def unavailable(self, request: Request, reason: str) -> Refused:
        return Refused(reason, code="53000")

    def render_error(self, request: Request, exc: ProxyError) -> bytes:
        if isinstance(exc, Refused):
            return error_message(exc.code, exc.client_message, detail=exc.detail)
        return client_error_for(exc)

    async def connect_backend(self, session: Any, request: Request, route: Any, grant: Any) -> Backend:
        read_only = grant is not None and grant.read_only
        if grant is not None:
            request.start_fields["read_only"] = read_only
        params = request.extra["params"]
        try:
            settings = backend_settings(params, read_only=read_only,
                                        denied_command=grant.denied_command if grant is not None else None)
        except SettingRefused as exc:
            raise Refused(exc.message, code=exc.sqlstate, detail=exc.detail,
                          fields={"sqlstate": exc.sqlstate, "detail": exc.detail},
                          cause="setting_refused" if exc.sqlstate == "42501" else None, stage="startup",
                          denial_fields={"error": exc.message, "detail": exc.detail}) from None
        if settings:
            # What the client set at connection start is part of the session's record.
            request.start_fields["client_settings"] = settings
        link = await open_backend(
            route, settings, user=request.login, database=request.target, max_message_size=self.max_message_size,
            credentials=self.services.credentials, read_only=read_only,
        )
        if read_only:
            try:
                replay, link.ready = await make_backend_read_only(link.channel)
            except BaseException:
                await link.channel.aclose()
                raise
            link.replay.extend(replay)
        pid, secret = self.cancels.issue(route, link.key)
        request.extra["cancel_key"] = (pid, secret)
        return Backend(
            link.channel.stream, link.channel.decoder, link=link,
            close=functools.partial(self.cancels.release, pid, secret),
            start_fields={
                "backend_tls": link.tls,
                "backend_gssenc": link.gssenc,
                "backend_auth": route.backend.auth.method,
                "backend_auth_mechanism": link.mechanism,
                "server_version": link.params.get("server_version"),
            },
        )

    async def ready(self, session: Any, request: Request, backend: Backend) -> None:
        link = backend.link
        pid, secret = request.extra["cancel_key"]
        hello = [m.encode_auth_ok(), *link.replay, m.encode_backend_key_data(pid, secret), link.ready]
        await request.client.send(b"".join(hello))

    def wiring(self, session: Any, request: Request, backend: Backend, grant: Any) -> Wiring:
        audit = session.audit
        state = PgSessionState()
        # Observers: the audit, and the type of the backend's last message (a tapped session's
        # backend Tee keeps that itself).  The core runs them inline or taps (dbproxy.flow.assemble).
        last_backend = request.extra["last_backend"] = LastBackendMessage()
        frontend_audit, backend_audit = FrontendAudit(state, audit), BackendAudit(state, audit)
        client_stages: list = []
        backend_stages: list = []
        if grant is not None and grant.has_statement_rules:
            # After the audit (the attempt is recorded), before the backend sees it; a rewritten
            # error is shown to the observers by the policy itself.
            policy = PolicyState()
            client_stages.append(FrontendPolicy(policy, grant, session))
            backend_stages.append(BackendPolicy(policy, observers=(last_backend, backend_audit)))
        return Wiring(request.client.decoder, backend.decoder, client_stages, backend_stages, state, client_error_for,
                      client_observers=[frontend_audit], backend_observers=[last_backend, backend_audit],
                      tap=TAP_PLAN)

    async def session_ended(self, session: Any, request: Request, backend: Backend, wiring: Wiring, pipeline: Any) -> dict:
        state = wiring.state
        reason = session.details["end_reason"]
        last_backend = wiring.tees[1] if wiring.tapped else request.extra["last_backend"]
        if wiring.tapped and m.FE.TERMINATE in wiring.tees[0].seen:
            state.terminated = True
        if (not state.terminated and reason.startswith("backend") and pipeline.error is None
                and last_backend.last_type != m.BE.ERROR_RESPONSE):
            # The backend went away under a live client without saying why (a
            # crash, a lost link): tell the client in its own protocol.  When its
            # last word was an ErrorResponse (FATAL 57P01 after pg_terminate_backend,
            # 57P02 crash shutdown…), the client has the server's own reason already,
            # and after a backend-side protocol error (53200 buffer budget…) the
            # pipeline has sent the client the proxy's error.
            await send_quietly(request.client.stream,
                               error_message("08006", "the connection to the backend database was lost"))
        if state.terminated:
            session.details["end_reason"] = "client terminated"
        if wiring.tapped:
            return {}  # a tapped session's counts are added by the audit worker
        return {"queries": state.queries, "errors": state.errors}
