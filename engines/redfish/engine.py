"""The Redfish engine: an HTTPS reverse proxy in front of BMCs, with proxy-held BMC credentials.

Strategy.  The listener is the core's HTTP kind (``dbproxy.listen.http``:
h11, keep-alive, streamed bodies, optional TLS); a session is one client
connection, and the session flow's steps happen on its first request:

    identify   ``Authorization: Bearer TOKEN``, or ``Basic`` with the token
               as password (the user name, if any, must be the token's),
               or ``X-Auth-Token: TOKEN``, or a client certificate (mtls) —
               checked again on every request (expiry and revocation
               apply mid-connection); one identity per connection
    route      match key ``target``: the listener's ``target``, else the
               ``Host`` header's first label (``bmc-1.bmcs.example`` → bmc-1)
    authorize  roles grant BMCs (``bmcs`` globs, family ``bmc``) and what may
               be done there (``redfish`` rules, ``policy.py``), deny by default
    connect    a keep-alive HTTP/1.1 connection to the BMC and the proxy's
               login (``backend.BmcLogin``: Basic, or a Redfish session it
               holds and re-creates on 401)
    relay      per request: the path checked (``policy.normalize_path``), an
               action's JSON body parsed (capped at ``codec.MAX_ACTION_BODY``)
               for its parameters, the policy decides; allowed requests are
               forwarded with the client's credentials replaced by the
               proxy's, the response streamed back without the BMC's
               credentials or address (``codec``)

Audit (``event_family`` ``bmc.redfish``): ``bmc.redfish.session.start`` /
``.end`` / ``.access_denied``; ``bmc.redfish.request`` for every request the
client makes — before it is forwarded (method, path, query, action and its
parameters with secrets redacted, the properties a PATCH sets, the verdict),
or as refused with its status; ``bmc.redfish.response`` once the BMC
answered (status, the BMC's error message, ms), or ``status`` 502/504 when it
did not.  So nothing reaches a BMC unaudited, and the trail says what the BMC
did with it.  No token, BMC password or BMC session token enters the trail.

Refusals are Redfish error bodies (DSP0266 §9.7): 401 (no or bad token), 403
(role), 400 (bad path, bad action body, ``$expand``), 404 (no route), 502 (BMC
unreachable or refused the proxy's login), 504 (BMC too slow).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import attrs
import orjson
import trio

from dbproxy.access import audit_denial
from dbproxy.engine import Engine
from dbproxy.errors import AccessDenied
from dbproxy.listen import HTTPResponse
from dbproxy.session import Identity

from . import codec, config as rfconfig
from .backend import BmcConnection, BmcError, BmcLogin, Exchange
from .policy import BadPath, Policy, action_of, normalize_path

log = logging.getLogger("dbproxy.redfish")


def redfish_error(status: int, message: str, **kw: Any) -> HTTPResponse:
    err = codec.redfish_error(status, message, **kw)
    return HTTPResponse(err.status, err.headers, err.body)

# The proxy's login to the BMC at a session's start (connect, TLS, a Redfish session).
CONNECT_TIMEOUT = 15.0
# How long the BMC may take to answer one request's head (a slow action: a BMC may take a while).
BMC_RESPONSE_TIMEOUT = 120.0
# DSP0266 §13.3.1: the service root and the OData documents are readable without authentication
# (clients read the root first to learn where the session service is).  Relayed without credentials.
PUBLIC_PATHS = frozenset(("/redfish", "/redfish/", "/redfish/v1", "/redfish/v1/", "/redfish/v1/odata",
                          "/redfish/v1/$metadata"))
# Bodies up to this size are held so a request can be sent again after a new BMC session (session login).
MAX_REPLAY_BODY = 64 * 1024


@attrs.define(eq=False)
class _Conn:
    """One client connection's state (one dbproxy session)."""

    target: str | None = None
    route: Any = None
    policy: Policy | None = None
    bmc: BmcConnection | None = None
    login: BmcLogin | None = None
    requests: int = 0
    refused: int = 0
    forwarded: int = 0
    bmc_errors: int = 0


class RedfishEngine(Engine):
    protocol = "redfish"
    family = "bmc"
    event_family = "bmc.redfish"
    listener_kinds = ("http",)
    match_keys = ("target",)
    auth_methods = ("basic", "session")
    password_methods = ("basic", "session")
    client_auth_methods = ("token", "mtls")
    listener_keys = rfconfig.LISTENER_KEYS
    role_keys = ("redfish",)

    validate_listener = staticmethod(rfconfig.validate_listener)
    validate_auth = staticmethod(rfconfig.validate_auth)
    validate_backend = staticmethod(rfconfig.validate_backend)
    validate_role_key = staticmethod(rfconfig.validate_role_key)

    def __init__(self, listener: Any, services: Any) -> None:
        super().__init__(listener, services)
        self._conns: dict[str, _Conn] = {}
        self._logins: dict[str, BmcLogin] = {}  # per route: a Redfish session is shared by the route's sessions

    # -- the core's HTTP hooks ----------------------------------------------------------------
    @staticmethod
    def render_http_error(status: int, message: str) -> HTTPResponse:
        return redfish_error(status, message)

    async def http_connection_closed(self, session: Any) -> None:
        state = self._conns.pop(session.id, None)
        if state is None:
            return
        if state.bmc is not None:
            await state.bmc.aclose()
        session.details.setdefault("end_fields", {}).update(
            requests_forwarded=state.forwarded, requests_refused=state.refused, bmc_errors=state.bmc_errors)

    async def handle_http_request(self, session: Any, request: Any) -> HTTPResponse:
        session.family = self.family
        state = self._conns.get(session.id)
        if state is None:
            state = self._conns[session.id] = _Conn()
        state.requests += 1
        rid = state.requests
        if request.method in ("GET", "HEAD") and request.target in PUBLIC_PATHS and \
                codec.client_credentials(request.headers) is None:  # no query: nothing to $expand
            return await self._public(session, request, state, rid)
        identity = self._identify(session, request, state, rid)
        if isinstance(identity, HTTPResponse):
            return identity
        if not session.started:
            refusal = await self._start(session, request, state, identity)
            if refusal is not None:
                return refusal
        elif identity.user != session.identity.user or identity.token_id != session.identity.token_id:
            return self._refuse(session, state, request, rid, 401, "identity_changed",
                                "one connection serves one identity: open a new connection for another token")
        else:
            target = self._target(request)
            if target != state.target:
                return self._refuse(session, state, request, rid, 421, "target_changed",
                                    f"this connection reaches BMC {state.target!r}, not {target!r}: open a new one")
        return await self._relay(session, request, state, rid)

    async def _public(self, session: Any, request: Any, state: _Conn, rid: int) -> HTTPResponse:
        """An unauthenticated read of the service root: relayed to the BMC without any credential."""
        target = state.target or self._target(request)
        route = state.route or (self.select_route({"target": target}) if target else None)
        if route is None:
            return redfish_error(404, f"no BMC {target!r} behind this proxy" if target else "no BMC named")
        bmc = state.bmc or BmcConnection(route.backend.host, route.backend.port, route.backend.tls, via=route.backend.via)
        if state.route is None:
            state.target, state.route, state.bmc = target, route, bmc
            session.target, session.route_name, session.backend_addr = target, route.name, route.backend.address
        session.audit.emit("bmc.redfish.request", request_id=rid, method=request.method, path=request.path,
                           verdict="allowed", reason="public", authenticated=False)
        started = time.monotonic()
        try:
            with trio.fail_after(BMC_RESPONSE_TIMEOUT):
                exchange = await bmc.request(request.method, request.target,
                                             codec.client_request_headers(request.headers, bmc.authority), None)
        except trio.TooSlowError:
            await bmc.aclose()
            return self._bmc_failed(session, state, rid, 504, "the BMC did not answer in time", "bmc_timeout", started)
        except BmcError as exc:
            return self._bmc_failed(session, state, rid, 502, f"{exc.client_hint} ({target})", str(exc), started)
        return await self._respond(session, state, request, rid, exchange, started)

    # -- identify, route, authorize, connect (the first request) -------------------------------
    def _identify(self, session: Any, request: Any, state: _Conn, rid: int) -> Identity | HTTPResponse:
        access = self.access
        creds = codec.client_credentials(request.headers)
        try:
            if creds is None:
                ident = access.auth.certificate_identity(request.transport) if access is not None else None
                if ident is None:
                    raise AccessDenied("no credentials: send the proxy token as Bearer, or as Basic password",
                                       reason="no_credentials")
                return ident
            scheme, user, secret = creds
            if scheme == "bad":
                raise AccessDenied(secret, reason="malformed_credentials")
            if access is None or not access.auth.token:
                raise AccessDenied(f"listener {self.listener.name}: token authentication is not configured",
                                   reason="method_unavailable")
            return access.auth.verify_token(user, secret)
        except AccessDenied as exc:
            log.info("session %s: request %d: %s", session.id, rid, exc)
            message = "authentication failed: the proxy token was not accepted" if creds else str(exc)
            if not session.started:
                audit_denial(session, exc, stage="authenticate", method=request.method, path=request.path)
                session.audit.on_session_start(success=False, error=str(exc), reason=exc.reason,
                                               requested_target=self._target(request))
                session.details["end_reason"] = f"authentication failed: {exc.reason}"
                return redfish_error(401, message)
            return self._refuse(session, state, request, rid, 401, exc.reason, message, error=str(exc))

    def _target(self, request: Any) -> str | None:
        return self.listener.extra.get("target") or codec.target_from_host(request.header("host"))

    async def _start(self, session: Any, request: Any, state: _Conn, identity: Identity) -> HTTPResponse | None:
        session.identity = identity
        target = self._target(request)
        fields: dict = {"identity_method": identity.method, "requested_target": target}

        def failed(status: int, error: str, message: str, reason: str, *, cause: Any = None,
                   stage: str | None = None) -> HTTPResponse:
            log.info("session %s: %s", session.id, error)
            if cause is not None and stage is not None:
                audit_denial(session, cause, stage=stage, **fields)
            session.audit.on_session_start(success=False, error=error, reason=reason, **fields)
            session.details["end_reason"] = error
            return redfish_error(status, message)

        if target is None:
            return failed(404, "no BMC named: the Host header's first label names the BMC", "the proxy could not tell "
                          "which BMC you want: name it as the first label of the host name (bmc-1.proxy.example)",
                          "no_target")
        route = self.select_route({"target": target})
        if route is None:
            return failed(404, f"no route for BMC {target!r} on listener {self.listener.name}",
                          f"no BMC {target!r} behind this proxy", "no_route")
        session.route_name = route.name
        session.backend_addr = route.backend.address
        session.target = target
        session.login = route.backend.auth.params.get("username")
        if self.access is not None:
            try:
                grant = self.access.authorize(identity, route=route.name, database=target, db_user=None,
                                              family=self.family)
                self.access.admit(session)
            except AccessDenied as exc:
                return failed(403, str(exc), f"access denied: your roles do not allow BMC {target!r}", exc.reason,
                              cause=exc, stage="connect")
            fields["granted_roles"] = list(grant.roles)
            state.policy = Policy.from_grant(grant.policy("redfish"))
        else:
            state.policy = Policy.from_grant(None)
        if state.route is not None and state.route is not route:
            await state.bmc.aclose()
            state.bmc = None
        state.target, state.route = target, route
        backend = route.backend
        state.bmc = state.bmc or BmcConnection(backend.host, backend.port, backend.tls, via=backend.via)
        state.login = self._login(route)
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                if state.login.method == "session":
                    await state.login.ensure(state.bmc)
                elif state.bmc.stream is None:
                    await state.bmc._open()
        except trio.TooSlowError:
            await state.bmc.aclose()
            return failed(504, f"BMC {backend.address} did not answer within {CONNECT_TIMEOUT:.0f}s",
                          f"the BMC {target!r} did not answer in time", "bmc_timeout")
        except BmcError as exc:
            await state.bmc.aclose()
            return failed(502, str(exc), f"{exc.client_hint} ({target})", f"bmc_{exc.kind}")
        session.audit.on_session_start(success=True, bmc_auth=state.login.method, **fields)
        return None

    def _login(self, route: Any) -> BmcLogin:
        login = self._logins.get(route.name)
        if login is None:
            auth = route.backend.auth
            login = self._logins[route.name] = BmcLogin(auth.method, auth.params["username"], auth.secret.reveal())
        return login

    # -- one request ------------------------------------------------------------------------
    def _refuse(self, session: Any, state: _Conn, request: Any, rid: int, status: int, reason: str, message: str,
                *, error: str | None = None, code: str | None = None, **fields: Any) -> HTTPResponse:
        state.refused += 1
        session.audit.emit("bmc.redfish.request", request_id=rid, method=request.method, path=request.path,
                           verdict="denied", success=False, status=status, reason=reason, error=error or message,
                           **fields)
        return redfish_error(status, message, code=code)

    async def _relay(self, session: Any, request: Any, state: _Conn, rid: int) -> HTTPResponse:
        method = request.method
        try:
            path = normalize_path(request.path)
        except BadPath as exc:
            return self._refuse(session, state, request, rid, 400, "bad_path", f"refused path: {exc}")
        query = request.query
        if "$expand" in query.lower() or "%24expand" in query.lower():
            # $expand (DSP0266 §7.3) inlines linked resources the policy never sees by path.
            return self._refuse(session, state, request, rid, 400, "query_not_allowed",
                                "the proxy does not relay $expand: read each resource by its own path",
                                code="Base.1.0.QueryNotSupported")
        action = action_of(method, path)
        fields: dict = {}
        body: Any = None
        length_text = request.header("content-length")
        length = int(length_text) if length_text is not None else None
        has_body = length is not None and length > 0 or request.header("transfer-encoding") is not None
        params = None
        if action is not None:
            fields["action"] = action
            if length is not None and length > codec.MAX_ACTION_BODY:
                return self._refuse(session, state, request, rid, 413, "action_body_too_large",
                                    f"an action's body may be at most {codec.MAX_ACTION_BODY} bytes", action=action)
            raw = await _read_capped(request, codec.MAX_ACTION_BODY)
            if raw is None:
                return self._refuse(session, state, request, rid, 413, "action_body_too_large",
                                    f"an action's body may be at most {codec.MAX_ACTION_BODY} bytes", action=action)
            try:
                params = codec.parse_action_body(raw)
            except ValueError as exc:
                return self._refuse(session, state, request, rid, 400, "bad_action_body", str(exc), action=action)
            fields["parameters"] = codec.redact(params)
            body = raw
        elif has_body and (state.login.method == "session" and length is not None and length <= MAX_REPLAY_BODY):
            body = await request.read()  # small: kept so it can be sent again after a new BMC session
        elif has_body:
            body = request.body()
        if method == "PATCH" and isinstance(body, bytes):
            try:
                patched = orjson.loads(body)
                if isinstance(patched, dict):
                    fields["properties"] = sorted(patched)[:50]
            except orjson.JSONDecodeError:
                pass
        decision = state.policy.decide(method, path, action, params)
        if not decision.allowed:
            return self._refuse(session, state, request, rid, 403, decision.reason, decision.message, **fields)
        session.audit.emit("bmc.redfish.request", request_id=rid, method=method, path=request.path,
                           **({"query": query} if query else {}), verdict="allowed", **fields)
        await session.audit.flush()  # the audit's backpressure before the BMC acts, as the pipelines do
        state.forwarded += 1
        started = time.monotonic()
        try:
            with trio.fail_after(BMC_RESPONSE_TIMEOUT):
                exchange = await self._forward(state, request, body, length)
        except trio.TooSlowError:
            await state.bmc.aclose()
            return self._bmc_failed(session, state, rid, 504, f"the BMC did not answer within "
                                    f"{BMC_RESPONSE_TIMEOUT:.0f}s", "bmc_timeout", started)
        except BmcError as exc:
            return self._bmc_failed(session, state, rid, 502, f"{exc.client_hint} ({state.target})", str(exc), started)
        return await self._respond(session, state, request, rid, exchange, started)

    async def _forward(self, state: _Conn, request: Any, body: Any, length: int | None) -> Exchange:
        bmc, login = state.bmc, state.login
        headers = codec.client_request_headers(request.headers, bmc.authority)
        if login.method == "session" and login.token is None:
            await login.ensure(bmc)
        token = login.token
        exchange = await bmc.request(request.method, request.target, headers + login.headers(), body,
                                     length=length)
        if exchange.status == 401:
            await exchange.discard()
            if login.method != "session" or not isinstance(body, (bytes, type(None))):
                if login.method == "session":
                    await login.ensure(bmc, stale=token)  # the next request has a session again
                raise BmcError(f"BMC {bmc.authority} answered 401 to the proxy's {login.method} login",
                               kind="auth", client_hint="the BMC refused the proxy's login")
            # The BMC's session expired or was deleted: log in again and send the request once more.
            await login.ensure(bmc, stale=token)
            exchange = await bmc.request(request.method, request.target, headers + login.headers(), body)
            if exchange.status == 401:
                await exchange.discard()
                raise BmcError(f"BMC {bmc.authority} answered 401 to a new session", kind="auth",
                               client_hint="the BMC refused the proxy's login")
        return exchange

    def _bmc_failed(self, session: Any, state: _Conn, rid: int, status: int, message: str, error: str,
                    started: float) -> HTTPResponse:
        state.bmc_errors += 1
        log.warning("session %s: request %d: %s", session.id, rid, error)
        session.audit.emit("bmc.redfish.response", request_id=rid, status=status, success=False, error=error,
                           duration_ms=round((time.monotonic() - started) * 1000, 3))
        return redfish_error(status, message)

    async def _respond(self, session: Any, state: _Conn, request: Any, rid: int, exchange: Exchange,
                       started: float) -> HTTPResponse:
        bmc = state.bmc
        origins = (f"http://{bmc.authority}", f"https://{bmc.authority}", f"http://{bmc.host}", f"https://{bmc.host}")
        headers = codec.bmc_response_headers(exchange.headers, tuple(o.lower() for o in origins))
        status = exchange.status
        fields: dict = {}
        body: Any
        if request.method == "HEAD":
            await exchange.discard()
            body = b""
        elif status >= 400:
            text, whole = await exchange.read(codec.MAX_ERROR_BODY)
            message = codec.bmc_message(text)
            if message:
                fields["bmc_message"] = message
            if whole:
                body = text
                headers = [(k, v) for k, v in headers if k != "content-length"]
            else:
                body = _prefixed(text, exchange)
        else:
            body = exchange.body()
        session.audit.emit("bmc.redfish.response", request_id=rid, status=status, success=status < 400,
                           duration_ms=round((time.monotonic() - started) * 1000, 3), **fields)
        return HTTPResponse(status, tuple(headers), body)


async def _read_capped(request: Any, limit: int) -> bytes | None:
    """The body when it is at most ``limit`` bytes; None past it (the rest stays unread: the connection closes)."""
    parts, size = [], 0
    async for chunk in request.body():
        size += len(chunk)
        if size > limit:
            request._conn.body_refused = True
            return None
        parts.append(chunk)
    return b"".join(parts)


async def _prefixed(first: bytes, exchange: Exchange) -> Any:
    yield first
    async for chunk in exchange.body():
        yield chunk
