"""The proxy's own login to a PostgreSQL backend.

Strategy: connect, optionally upgrade the link (SSLRequest → TLS, or
GSSENCRequest → GSS encryption), send a StartupMessage with the *route's*
database and user plus the client's settings the engine let through
(``startup.backend_settings``: DateStyle, TimeZone, ``options`` -c settings…),
then answer the backend's Authentication
requests with the route's credential.  The client's own password never
reaches the backend.

A server may answer SSLRequest / GSSENCRequest with an ErrorResponse instead
of the answer byte (too old to know the request, or refusing the connection).
The server is not authenticated yet, so, as libpq does since CVE-2024-10977,
its text is logged (info) and never shown to the client, the connection is
closed, and the error counts as a refusal: ``gssencmode: prefer`` retries on a
new connection without GSS encryption (then TLS as the route says, or
plaintext); ``gssencmode: require`` and every TLS mode but ``disable`` fail.

The route's ``auth.method`` is a contract: a backend that asks for another
kind of authentication (say cleartext when the route says scram-sha-256) is
refused — a man in the middle must not be able to downgrade the proxy into
revealing a password.  SCRAM uses SCRAM-SHA-256-PLUS with tls-server-end-point
channel binding whenever the backend link is TLS and the server offers it.

After AuthenticationOk the backend's ParameterStatus / BackendKeyData /
NoticeResponse messages up to the first ReadyForQuery are collected for the
engine to replay to the client.
"""

from __future__ import annotations

import logging
from typing import Any

import attrs
import trio

from dbproxy.channel import MessageStream, PeerClosed, login_errors
from dbproxy.config import RouteConfig
from dbproxy.errors import ProtocolError, UpstreamError
from dbproxy.kerberos import CLIENT_HINT as KRB_CLIENT_HINT
from dbproxy.net import connect_backend
from dbproxy.tls import peer_cert_der, wrap_backend

from . import auth as pgauth
from . import messages as m
from .codec import BackendDecoder
from .gssenc import GssEncStream

log = logging.getLogger("dbproxy.postgres")

# How long the text of an error answering SSLRequest/GSSENCRequest may take to arrive.
REFUSAL_READ_SECONDS = 2.0

AUTH_NAMES = {
    m.AUTH_OK: "ok",
    m.AUTH_CLEARTEXT_PASSWORD: "password",
    m.AUTH_MD5_PASSWORD: "md5",
    m.AUTH_SASL: "scram-sha-256",
    m.AUTH_GSS: "gssapi",
    m.AUTH_SSPI: "sspi",
    m.AUTH_KERBEROS_V5: "kerberos-v5",
}


@attrs.define(eq=False)
class BackendLink:
    channel: MessageStream
    key: m.BackendKeyData | None
    replay: list[bytes]  # ParameterStatus / Notice raw messages for the client, in order
    ready: bytes  # the ReadyForQuery that ended the startup
    tls: bool
    gssenc: bool
    params: dict[str, str]
    mechanism: str  # what the proxy actually used: trust, password, md5, SCRAM-SHA-256(-PLUS), gssapi


def _backend_error(fields: dict[str, str], stage: str, route: RouteConfig) -> UpstreamError:
    sqlstate = fields.get("C", "08000")
    message = fields.get("M", "unknown error")
    kind = "auth" if sqlstate.startswith("28") else "protocol"
    err = UpstreamError(
        f"backend {route.backend.address} refused the proxy's {stage}: {sqlstate} {message}",
        kind=kind,
        client_hint=f"the proxy could not log in to the backend database: {message}",
    )
    err.sqlstate = sqlstate  # type: ignore[attr-defined]
    return err


async def open_backend(
    route: RouteConfig,
    settings: dict[str, str],
    *,
    user: str = "",
    database: str = "",
    max_message_size: int,
    credentials: Any = None,
    read_only: bool = False,
) -> BackendLink:
    """Log in to the route's backend with the client's checked ``settings`` (startup
    parameters from ``startup.backend_settings``); ``user``/``database`` are what the
    client asked for, used where the route names none.  ``read_only`` makes read-only the session's
    startup default (``options=-c default_transaction_read_only=on``), so even a
    RESET returns to read-only."""
    b = route.backend
    gssencmode = b.auth.params.get("gssencmode", "disable") if b.auth.method == "gssapi" else "disable"

    async def attempt(gssencmode: str) -> BackendLink:
        stream = await connect_backend(b.host, b.port, via=b.via)
        try:
            return await _login(stream, route, settings, user, database, max_message_size, credentials, read_only, gssencmode)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise

    try:
        return await attempt(gssencmode)
    except _GssEncRefused:
        # libpq (fe-connect.c, gss_ok == 'E'): GSS encryption came with PostgreSQL 12,
        # an error may mean an older server; with ``prefer`` it retries on a new
        # connection without GSS encryption (then TLS as configured, or plaintext).
        log.info("backend %s: retrying the login without GSS encryption (gssencmode=prefer)", b.address)
        return await attempt("disable")


class _GssEncRefused(Exception):
    """The backend answered GSSENCRequest with an error under ``gssencmode: prefer``."""


async def _refused(channel: MessageStream, decoder: BackendDecoder, request: str, address: str) -> None:
    """Read (bounded) and log the ErrorResponse a backend sent instead of the answer
    byte to ``request``.  The server is not authenticated yet: its text goes to the
    log, never to the client (§55.2.10, §55.2.11; CVE-2024-10977), and the caller
    closes this connection, as libpq does."""
    fields: Any = f"not complete within {REFUSAL_READ_SECONDS}s"
    try:
        # The refusal is the 'E'; its text is only for the log, so a server that
        # sends a part and stalls gets a short bound of its own (libpq does not read
        # it at all), leaving the caller's deadline to a ``prefer`` retry.
        with trio.move_on_after(REFUSAL_READ_SECONDS):
            fields = (await channel.receive_with(decoder.read_refusal)).fields
    except (PeerClosed, ProtocolError, trio.BrokenResourceError, OSError) as exc:
        fields = f"unreadable ({type(exc).__name__}: {exc})"
    # %r: the text is the server's, unauthenticated; keep control characters out of the log.
    log.info("backend %s answered the proxy's %s with an error (unauthenticated; logged, not shown to the client): %r",
             address, request, fields)


async def _login(stream: Any, route: RouteConfig, settings: dict, client_user: str, client_database: str, max_size: int, credentials: Any, read_only: bool, gssencmode: str) -> BackendLink:
    b = route.backend
    decoder = BackendDecoder(max_message_size=max_size)
    channel = MessageStream(stream, decoder)
    is_tls = False
    is_gssenc = False
    gss_ctx = None
    with login_errors(b.address):
        if gssencmode in ("prefer", "require"):
            await channel.send(m.encode_gssenc_request())
            answer = await channel.receive_with(decoder.read_gssenc_answer)
            if answer == b"E":
                await _refused(channel, decoder, "GSSENCRequest", b.address)
                if gssencmode == "prefer":
                    raise _GssEncRefused()
                raise UpstreamError(
                    f"backend {b.address} answered GSSENCRequest with an error and the route requires"
                    " gssencmode=require (the server's unauthenticated text is in the proxy log)",
                    kind="tls",
                    client_hint="the backend database refused an encrypted connection from the proxy",
                )
            if answer == b"G":
                gss_ctx = await _gss_initiator(route, credentials, confidential=True)
                wrapped = GssEncStream(channel.stream, gss_ctx)
                await wrapped.establish()
                channel.stream = wrapped
                decoder.encryption_established()
                is_gssenc = True
            elif gssencmode == "require":
                raise UpstreamError(
                    f"backend {b.address} refused GSS encryption (answer {answer!r})",
                    kind="tls",
                    client_hint="the backend database refused an encrypted connection from the proxy",
                )
        if not is_gssenc and b.tls.mode != "disable":
            await channel.send(m.encode_ssl_request())
            answer = await channel.receive_with(decoder.read_ssl_answer)
            if answer == b"E":
                # libpq fails in every sslmode here; every backend tls.mode but disable requires TLS.
                await _refused(channel, decoder, "SSLRequest", b.address)
                raise UpstreamError(
                    f"backend {b.address} answered SSLRequest with an error and the route requires"
                    f" tls.mode={b.tls.mode} (the server's unauthenticated text is in the proxy log)",
                    kind="tls",
                    client_hint="the backend database refused a TLS connection from the proxy",
                )
            if answer != b"S":
                raise UpstreamError(
                    f"backend {b.address} does not accept TLS (answered {answer!r}) but the route requires tls.mode={b.tls.mode}",
                    kind="tls",
                    client_hint="the backend database refused a TLS connection from the proxy",
                )
            channel.stream = await wrap_backend(channel.stream, b.tls, b.host)
            decoder.encryption_established()
            is_tls = True

        params = dict(settings)
        params["user"] = b.user or client_user
        params["database"] = b.database or client_database or params["user"]
        if read_only:
            # Last, so it is what the session starts with (the engine refused the client's own).
            params["options"] = " ".join(filter(None, (params.get("options"), "-c default_transaction_read_only=on")))
        await channel.send(m.encode_startup(params))
        mechanism = await _authenticate(channel, route, is_tls, credentials, gss_ctx)
        key = None
        replay: list[bytes] = []
        server_params: dict[str, str] = {}
        while True:
            msg = await channel.receive()
            t = msg.type
            if t == m.BE.READY_FOR_QUERY:
                return BackendLink(channel, key, replay, msg.raw, is_tls, is_gssenc, server_params, mechanism)
            if t == m.BE.BACKEND_KEY_DATA:
                key = m.parse_backend_key_data(msg)
            elif t == m.BE.ERROR_RESPONSE:
                raise _backend_error(m.parse_error_fields(msg), "session start", route)
            else:
                if t == m.BE.PARAMETER_STATUS:
                    name, value = m.parse_parameter_status(msg)
                    server_params[name] = value
                replay.append(msg.raw)


def _refuse(route: RouteConfig, asked: int) -> UpstreamError:
    return UpstreamError(
        f"backend {route.backend.address} asked for {AUTH_NAMES.get(asked, f'auth type {asked}')} authentication"
        f" but the route is configured for {route.backend.auth.method}; refusing",
        kind="auth",
        client_hint="the backend database asked for an authentication method the proxy is not configured to use",
    )


async def _authenticate(channel: MessageStream, route: RouteConfig, is_tls: bool, credentials: Any, gss_ctx: Any) -> str:
    b = route.backend
    method = b.auth.method
    used = "gssapi-encrypted" if gss_ctx is not None else "trust"
    scram: Any = None
    scram_verified = False
    while True:
        msg = await channel.receive()
        if msg.type == m.BE.ERROR_RESPONSE:
            raise _backend_error(m.parse_error_fields(msg), "login", route)
        if msg.type == m.BE.NOTICE_RESPONSE:
            continue
        if msg.type == m.BE.NEGOTIATE_PROTOCOL_VERSION:
            continue
        if msg.type != m.BE.AUTHENTICATION:
            raise UpstreamError(
                f"backend {b.address} sent {msg.type_char!r} before authentication finished",
                kind="protocol",
                client_hint="the backend database sent an unexpected message during login",
            )
        a = m.parse_authentication(msg)
        sub = a.subtype
        if sub == m.AUTH_OK:
            if scram is not None and not scram_verified:
                raise UpstreamError(
                    f"backend {b.address} ended SCRAM without a server signature", kind="auth",
                    client_hint="the backend database did not prove its identity during SCRAM",
                )
            if gss_ctx is not None and not gss_ctx.complete:
                raise UpstreamError(
                    f"backend {b.address} ended GSS authentication before proving its identity (mutual authentication)",
                    kind="auth",
                    client_hint=KRB_CLIENT_HINT,
                )
            return used
        if sub == m.AUTH_CLEARTEXT_PASSWORD:
            if method != "password":
                raise _refuse(route, sub)
            await channel.send(m.encode_password(b.auth.secret.reveal()))
            used = "password"
        elif sub == m.AUTH_MD5_PASSWORD:
            if method != "md5":
                raise _refuse(route, sub)
            digest = pgauth.md5_password(b.user or "", b.auth.secret.reveal(), a.data[:4])
            await channel.send(m.encode_password(digest))
            used = "md5"
        elif sub == m.AUTH_SASL:
            if method != "scram-sha-256":
                raise _refuse(route, sub)
            mechanisms = m.sasl_mechanisms(a.data)
            binding = None
            if is_tls and "SCRAM-SHA-256-PLUS" in mechanisms:
                cert = peer_cert_der(channel.stream)
                if cert:
                    binding = pgauth.tls_server_end_point(cert)
            elif "SCRAM-SHA-256" not in mechanisms:
                raise UpstreamError(
                    f"backend {b.address} offers SASL mechanisms {mechanisms}, none of which the proxy speaks",
                    kind="auth",
                    client_hint="the backend database offers no SASL mechanism the proxy supports",
                )
            scram = pgauth.ScramClient(b.auth.secret.reveal(), channel_binding=binding, binding_supported=is_tls)
            await channel.send(m.encode_sasl_initial(scram.mechanism, scram.client_first()))
            used = scram.mechanism
        elif sub == m.AUTH_SASL_CONTINUE:
            if scram is None:
                raise _refuse(route, sub)
            await channel.send(m.encode_sasl_response(scram.client_final(a.data)))
        elif sub == m.AUTH_SASL_FINAL:
            if scram is None:
                raise _refuse(route, sub)
            try:
                scram.verify_server_final(a.data)
                scram_verified = True
            except Exception as exc:
                raise UpstreamError(
                    f"backend {b.address} failed SCRAM server verification: {exc}",
                    kind="auth",
                    client_hint="the backend database failed to prove its identity during SCRAM",
                ) from None
        elif sub in (m.AUTH_GSS, m.AUTH_GSS_CONTINUE):
            if method != "gssapi":
                raise _refuse(route, sub)
            if gss_ctx is None:
                gss_ctx = await _gss_initiator(route, credentials, confidential=False)
                token = await gss_ctx.step(None)
            else:
                if gss_ctx.complete:
                    # GSSENC already authenticated the link; the server still runs
                    # the gss exchange on it in some versions: nothing to send.
                    continue
                token = await gss_ctx.step(a.data or None)
            used = "gssapi"
            if token:
                await channel.send(m.encode_gss_response(token))
        else:
            raise _refuse(route, sub)


async def _gss_initiator(route: RouteConfig, credentials: Any, *, confidential: bool) -> Any:
    from dbproxy.kerberos import GssInitiator

    if credentials is None:
        raise UpstreamError("no Kerberos credential cache configured", kind="auth", client_hint=KRB_CLIENT_HINT)
    p = route.backend.auth.params
    cred = credentials.for_auth(p)
    creds = await cred.get()
    service = p.get("service", "postgres")
    host = p.get("host") or route.backend.host
    return GssInitiator(creds, service, host, mutual=True, confidential=confidential)


async def send_cancel(route: RouteConfig, key: m.BackendKeyData) -> None:
    """Deliver a CancelRequest for ``key`` to the route's backend (TLS first when the route uses it)."""
    b = route.backend
    stream = await connect_backend(b.host, b.port, via=b.via)
    try:
        if b.tls.mode != "disable":
            decoder = BackendDecoder()
            channel = MessageStream(stream, decoder)
            await channel.send(m.encode_ssl_request())
            with login_errors(b.address):
                answer = await channel.receive_with(decoder.read_ssl_answer)
                if answer == b"E":
                    await _refused(channel, decoder, "SSLRequest", b.address)
            if answer != b"S":
                # The route requires TLS: the cancel key is not for a plaintext link, and
                # after an error the server is closing this one anyway.
                raise UpstreamError(
                    f"backend {b.address} refused TLS for a cancel request (answered {answer!r});"
                    f" tls.mode={b.tls.mode}, so the cancel was not sent",
                    kind="tls",
                )
            stream = await wrap_backend(stream, b.tls, b.host)
        await stream.send_all(m.encode_cancel_request(key.pid, key.secret))
        # The server closes the connection without answering; wait briefly for that.
        with trio.move_on_after(2):
            try:
                while await stream.receive_some(1024):
                    pass
            except (trio.BrokenResourceError, OSError):
                pass
    finally:
        await trio.aclose_forcefully(stream)


READ_ONLY_SETTING = "SET default_transaction_read_only = on"


async def make_backend_read_only(channel: MessageStream) -> tuple[list[bytes], bytes]:
    """Make the backend session read-only; return (ParameterStatus/Notice to replay, the ReadyForQuery)."""
    await channel.send(m.encode_query(READ_ONLY_SETTING))
    replay: list[bytes] = []
    while True:
        msg = await channel.receive()
        t = msg.type
        if t == m.BE.PARAMETER_STATUS or t == m.BE.NOTICE_RESPONSE:
            replay.append(msg.raw)
        elif t == m.BE.ERROR_RESPONSE:
            fields = m.parse_error_fields(msg)
            raise UpstreamError(
                f"backend refused to make the session read-only: {fields.get('C')} {fields.get('M')}",
                kind="protocol",
                client_hint="the proxy could not make the backend session read-only",
            )
        elif t == m.BE.READY_FOR_QUERY:
            return replay, msg.raw
