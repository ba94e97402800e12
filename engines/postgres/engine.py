"""The PostgreSQL engine.

Handshake (client side, PostgreSQL protocol §55.2):
  SSLRequest     → 'S' and a TLS handshake when the listener has ``tls``, else 'N'
  GSSENCRequest  → 'N' (clients fall back to TLS or plain)
  CancelRequest  → looked up in the proxy's cancel-key map and delivered to
                   the backend that owns the session (never audited as a session)
  StartupMessage → route chosen by (database, user) globs; a 3.x minor
                   version above 0 or ``_pq_.`` options get NegotiateProtocolVersion.

The proxy then logs in to the backend itself (``backend.open_backend``), tells
the client AuthenticationOk, replays the backend's ParameterStatus messages,
hands the client the proxy's *own* BackendKeyData (pid/secret mapped to the
backend's), and relays ReadyForQuery.  From there the session is the core
pipeline with the audit stages; every other message passes through as bytes.

Errors reach the client as ErrorResponse with a SQLSTATE: 28000 no route /
access denied, 08001 backend unreachable, 28P01 backend refused the proxy's
credential, 08P01 protocol violation, 54000 message too large, 08006 backend
lost mid-session.
"""

from __future__ import annotations

import logging
import os
import struct
from typing import Any

import trio

from dbproxy.channel import MessageStream, PeerClosed
from dbproxy.engine import Engine
from dbproxy.errors import FrameTooLarge, ProtocolError, ProxyError, UpstreamError
from dbproxy.pipeline import Pipeline
from dbproxy.tls import server_context

from . import messages as m
from .backend import open_backend, send_cancel
from .codec import FrontendDecoder
from .stages import BackendAudit, FrontendAudit, PgSessionState

log = logging.getLogger("dbproxy.postgres")

HANDSHAKE_TIMEOUT = 30.0
CONNECT_TIMEOUT = 15.0


def error_message(sqlstate: str, message: str, *, severity: str = "FATAL", detail: str | None = None, hint: str | None = None) -> bytes:
    return m.encode_error(severity, sqlstate, message, detail=detail, hint=hint)


def client_error_for(exc: ProxyError) -> bytes:
    if isinstance(exc, FrameTooLarge):
        return error_message("54000", exc.client_hint)
    if isinstance(exc, ProtocolError):
        return error_message("08P01", f"protocol violation: {exc.client_hint}")
    if isinstance(exc, UpstreamError):
        return error_message(getattr(exc, "sqlstate", None) or "08006", exc.client_hint)
    return error_message("XX000", str(exc))


class CancelMap:
    """Proxy-issued (pid, secret) → (route, backend key).  Shared by every Postgres listener."""

    def __init__(self) -> None:
        self._map: dict[tuple[int, bytes], tuple[Any, m.BackendKeyData]] = {}

    def issue(self, route: Any, backend_key: m.BackendKeyData | None) -> tuple[int, bytes]:
        while True:
            pid = struct.unpack(">I", os.urandom(4))[0] & 0x7FFFFFFF
            secret = os.urandom(4)
            if (pid, secret) not in self._map and pid:
                break
        if backend_key is not None:
            self._map[(pid, secret)] = (route, backend_key)
        return pid, secret

    def lookup(self, pid: int, secret: bytes) -> tuple[Any, m.BackendKeyData] | None:
        return self._map.get((pid, secret))

    def release(self, pid: int, secret: bytes) -> None:
        self._map.pop((pid, secret), None)


class PostgresEngine(Engine):
    protocol = "postgres"
    match_keys = ("database", "user", "application_name")
    auth_methods = ("trust", "password", "md5", "scram-sha-256", "gssapi")
    password_methods = ("password", "md5", "scram-sha-256")
    default_max_message_size = 256 * 1024 * 1024

    GSSAPI_KEYS = {"principal", "keytab_file", "ccache", "service", "host", "krb5_config", "gssencmode", "renew_margin_seconds"}

    def __init__(self, listener: Any, services: Any) -> None:
        super().__init__(listener, services)
        self.ssl_context = server_context(listener.tls) if listener.tls else None
        self.cancels: CancelMap = services.extras.setdefault("postgres.cancel_map", CancelMap())

    @classmethod
    def validate_auth(cls, v: Any, method: str, ad: dict, path: str) -> dict:
        params: dict = {}
        extra = {k for k in ad if k not in {"method", "password_file", "password_env"}}
        if method != "gssapi":
            for k in sorted(extra):
                v.err(f"{path}.{k}", f"no key {k!r} for method {method}")
            return params
        for k in sorted(extra - cls.GSSAPI_KEYS):
            v.err(f"{path}.{k}", f"a gssapi key ({', '.join(sorted(cls.GSSAPI_KEYS))})")
        if "keytab_file" in ad and "ccache" in ad:
            v.err(path, "only one of \"keytab_file\" or \"ccache\"")
        if "keytab_file" not in ad and "ccache" not in ad:
            v.err(path, "\"keytab_file\" or \"ccache\" for method gssapi")
        for key in ("principal", "service", "host", "ccache"):
            if key in ad:
                val = v.string(ad, key, path)
                if val:
                    params[key] = val
        for key in ("keytab_file", "krb5_config"):
            if key in ad:
                f = v.file_path(ad, key, path)
                if f:
                    params[key] = f
        if "gssencmode" in ad:
            val = v.string(ad, "gssencmode", path, choices=("disable", "prefer", "require"))
            if val:
                params["gssencmode"] = val
        if "renew_margin_seconds" in ad:
            val = v.number(ad, "renew_margin_seconds", path)
            if val is not None:
                params["renew_margin_seconds"] = val
        return params

    # ------------------------------------------------------------------
    async def handle_connection(self, session: Any, stream: Any) -> None:
        decoder = FrontendDecoder(max_message_size=self.max_message_size, startup=True)
        client = MessageStream(stream, decoder)
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                startup = await self._client_startup(session, client)
        except trio.TooSlowError:
            session.details["end_reason"] = "client handshake timed out"
            return
        except PeerClosed:
            return
        except ProtocolError as exc:
            log.info("session %s: client protocol error during startup: %s", session.id, exc)
            await self._send_quietly(client, client_error_for(exc))
            return
        if startup is None:
            return  # cancel request or refused SSL: not a session
        await self._run_session(session, client, startup)

    async def _send_quietly(self, client: MessageStream, data: bytes) -> None:
        with trio.move_on_after(5):
            try:
                await client.send(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass

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
        found = self.cancels.lookup(req.pid, req.secret)
        if found is None:
            log.info("cancel request for an unknown key (pid %d): ignored", req.pid)
            return
        route, key = found
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                await send_cancel(route, key)
            log.info("cancel request delivered to backend %s pid %d", route.backend.address, key.pid)
        except (ProxyError, trio.TooSlowError, OSError, trio.BrokenResourceError) as exc:
            log.warning("cancel request to backend %s failed: %s", route.backend.address, exc)

    async def _run_session(self, session: Any, client: MessageStream, startup: m.StartupMessage) -> None:
        audit = session.audit
        params = dict(startup.params)
        user = params.get("user", "")
        database = params.get("database") or user
        session.details["requested_database"] = database
        session.details["requested_user"] = user
        if params.get("application_name"):
            session.details["application_name"] = params["application_name"]
        if startup.minor != 0 or any(k.startswith("_pq_.") for k in params):
            unrecognized = [k for k in params if k.startswith("_pq_.")]
            await client.send(m.encode_negotiate_protocol_version(0, unrecognized))
            for k in unrecognized:
                params.pop(k)
        route = self.select_route({"database": database, "user": user, "application_name": params.get("application_name", "")})
        start_fields = {"requested_database": database, "requested_user": user, "client_tls": bool(session.details.get("client_tls"))}
        if route is None:
            msg = f"no route for database \"{database}\" and user \"{user}\" on listener {self.listener.name}"
            session.db_name, session.db_user = database, user
            audit.on_session_start(success=False, error=msg, **start_fields)
            await self._send_quietly(client, error_message("28000", msg))
            return
        session.route_name = route.name
        session.backend_addr = route.backend.address
        session.db_name = route.backend.database or database
        session.db_user = route.backend.user or user
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                link = await open_backend(
                    route, params, max_message_size=self.max_message_size, credentials=self.services.credentials
                )
        except (UpstreamError, trio.TooSlowError) as exc:
            if isinstance(exc, trio.TooSlowError):
                exc = UpstreamError(
                    f"backend {route.backend.address} did not complete login within {CONNECT_TIMEOUT:.0f}s",
                    kind="connect",
                    client_hint=f"the backend database at {route.backend.address} did not answer in time",
                )
            sqlstate = getattr(exc, "sqlstate", None) or ("28P01" if exc.kind == "auth" else "08001")
            if exc.kind == "auth" and sqlstate not in ("28P01", "28000"):
                sqlstate = "28000"
            log.warning("session %s: %s", session.id, exc)
            audit.on_session_start(success=False, error=str(exc), sqlstate=sqlstate, **start_fields)
            await self._send_quietly(client, error_message(sqlstate, exc.client_hint))
            return

        state = PgSessionState()
        pid, secret = self.cancels.issue(route, link.key)
        backend = link.channel
        try:
            hello = [m.encode_auth_ok()]
            hello.extend(link.replay)
            hello.append(m.encode_backend_key_data(pid, secret))
            hello.append(link.ready)
            audit.on_session_start(
                success=True,
                backend_tls=link.tls,
                backend_gssenc=link.gssenc,
                backend_auth=route.backend.auth.method,
                backend_auth_mechanism=link.mechanism,
                server_version=link.params.get("server_version"),
                **start_fields,
            )
            await client.send(b"".join(hello))
            pipeline = Pipeline(
                session=session,
                client=client.stream,
                backend=backend.stream,
                client_decoder=client.decoder,
                backend_decoder=backend.decoder,
                client_stages=[FrontendAudit(state, audit)],
                backend_stages=[BackendAudit(state, audit)],
                state=state,
                client_error=client_error_for,
                flush_audit=audit.flush,
            )
            await pipeline.run()
            reason = pipeline.end_reason or "closed"
            if not state.terminated and reason.startswith("backend"):
                # The backend went away under a live client: tell it in its own protocol.
                await self._send_quietly(
                    MessageStream(client.stream, None),
                    error_message("08006", "the connection to the backend database was lost"),
                )
            c2b, b2c = pipeline.statistics()
            session.details["end_reason"] = "client terminated" if state.terminated else reason
            session.details["end_fields"] = {
                "queries": state.queries,
                "errors": state.errors,
                "bytes_from_client": c2b.bytes_in,
                "bytes_to_client": b2c.bytes_out,
            }
        finally:
            self.cancels.release(pid, secret)
            await backend.aclose()
