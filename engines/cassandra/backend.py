"""The proxy's own login to a Cassandra backend.

Strategy: connect (TLS from the first byte when the route's ``backend.tls``
says so: the native protocol has no STARTTLS), send STARTUP at the *client's*
protocol version with the client's options (CQL_VERSION, COMPRESSION,
DRIVER_NAME/VERSION… — all harmless, and the compression must match because
frames pass through untouched), then answer AUTHENTICATE with the route's
``BackendAuthenticator`` until AUTH_SUCCESS.  READY (a backend without
authentication) is accepted whatever the route says: no credential is sent,
so nothing can be downgraded.

Framing (v5 spec 2.3.1, checked on Cassandra 5.0.9): STARTUP and its answer
are bare frames.  v3/v4 with compression: Cassandra compresses from its
answer to STARTUP on, so the decoder switches as soon as STARTUP is sent; our
AUTH_RESPONSE is compressed like a driver's.  v5+: the encoder toward the
backend switches to segments right after STARTUP (AUTH_RESPONSE travels in a
segment), the decoder right after READY/AUTHENTICATE.

Stream ids: the proxy originates frames toward the backend only here, on a
fresh connection, before any client request is relayed; nothing else is in
flight, so stream 0 cannot collide with a client's id.  After the handshake
the proxy never injects a request.

The backend's own ERROR answer is kept (``BackendRefused.code``/``.message``)
so the engine can relay it: a PROTOCOL_ERROR about an unsupported version
must reach a driver verbatim for it to downgrade and retry.
"""

from __future__ import annotations

import logging
from typing import Any

import attrs
import trio

from dbproxy.channel import MessageStream, login_errors
from dbproxy.config import RouteConfig
from dbproxy.errors import ProtocolError, UpstreamError
from dbproxy.net import connect_backend
from dbproxy.tls import wrap_backend

from . import protocol as F
from .auth import backend_authenticator
from .codec import CqlDecoder, CqlEncoder

log = logging.getLogger("dbproxy.cassandra")

HANDSHAKE_STREAM = 0


class BackendRefused(UpstreamError):
    """The backend answered the proxy's STARTUP or AUTH_RESPONSE with a CQL ERROR."""

    def __init__(self, message: str, *, kind: str, code: int, server_message: str, client_hint: str) -> None:
        super().__init__(message, kind=kind, client_hint=client_hint)
        self.code = code
        self.server_message = server_message


class BackendProtocolError(ProtocolError):
    """The backend broke the CQL protocol mid-session (the client is not to blame)."""


class BackendDecoder(CqlDecoder):
    """``CqlDecoder('server')`` whose errors say the *backend* broke the protocol.

    The pipeline renders any ProtocolError for the client; tagging the
    backend's lets the engine answer SERVER_ERROR on the client's pending
    streams instead of blaming the client with a PROTOCOL_ERROR.
    """

    def __init__(self, *, max_message_size: int) -> None:
        super().__init__("server", max_message_size=max_message_size)

    def next_message(self) -> Any:
        try:
            return super().next_message()
        except ProtocolError as exc:
            raise BackendProtocolError(
                f"backend broke the CQL protocol: {exc}",
                client_hint="the backend database sent an invalid response; the proxy closed the connection",
            ) from None


@attrs.define(eq=False)
class BackendLink:
    stream: trio.abc.Stream
    decoder: BackendDecoder
    encoder: CqlEncoder
    tls: bool
    mechanism: str  # "none" when the backend sent READY, else the SASL mechanism used
    authenticator_class: str | None
    principal: str | None = None  # the Kerberos principal the proxy logged in as (method gssapi)

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


def _refused(route: RouteConfig, frame: F.Frame, stage: str) -> BackendRefused:
    err = F.parse_error(frame)
    address = route.backend.address
    if err.code == F.ErrorCode.PROTOCOL_ERROR:
        return BackendRefused(
            f"backend {address} refused the proxy's {stage}: {err.message}",
            kind="protocol", code=err.code, server_message=err.message, client_hint=err.message,
        )
    kind = "auth" if err.code in (F.ErrorCode.AUTH_ERROR, F.ErrorCode.UNAUTHORIZED) else "protocol"
    return BackendRefused(
        f"backend {address} refused the proxy's {stage}: {err.code:#06x} {err.message}",
        kind=kind, code=err.code, server_message=err.message,
        client_hint=f"the proxy could not log in to the backend database: {err.message}",
    )


def _unexpected(route: RouteConfig, frame: F.Frame, stage: str) -> UpstreamError:
    name = F.Opcode(frame.opcode).name
    return UpstreamError(
        f"backend {route.backend.address} answered the proxy's {stage} with {name}",
        kind="protocol",
        client_hint="the backend database sent an unexpected message during login",
    )


async def open_backend(
    route: RouteConfig,
    *,
    version: int,
    options: dict[str, str],
    compression: str | None,
    max_message_size: int,
    credentials: Any = None,
) -> BackendLink:
    """Connect and log in; raises ``UpstreamError`` (``BackendRefused`` for a CQL ERROR)."""
    b = route.backend
    stream: trio.abc.Stream = await connect_backend(b.host, b.port, via=b.via)
    try:
        tls = False
        if b.tls.mode != "disable":
            stream = await wrap_backend(stream, b.tls, b.host)
            tls = True
        return await _login(stream, route, version, options, compression, max_message_size, credentials, tls)
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise


async def _login(
    stream: trio.abc.Stream,
    route: RouteConfig,
    version: int,
    options: dict[str, str],
    compression: str | None,
    max_size: int,
    credentials: Any,
    tls: bool,
) -> BackendLink:
    b = route.backend
    decoder = BackendDecoder(max_message_size=max_size)
    encoder = CqlEncoder()
    channel = MessageStream(stream, decoder)
    segments = version >= F.FIRST_SEGMENT_VERSION
    frame_compressor = compression if not segments else None
    with login_errors(b.address):
        await channel.send(F.encode_startup(version, HANDSHAKE_STREAM, options))
        if segments:
            encoder.set_framing("segments", compression)
        elif compression:
            decoder.set_framing("frames", compression)
        answer = await channel.receive()
        if answer.opcode == F.Opcode.ERROR:
            raise _refused(route, answer, "STARTUP")
        if answer.opcode == F.Opcode.READY:
            if segments:
                decoder.set_framing("segments", compression)
            return BackendLink(stream, decoder, encoder, tls, "none", None)
        if answer.opcode != F.Opcode.AUTHENTICATE:
            raise _unexpected(route, answer, "STARTUP")
        authenticator_class = F.parse_authenticate(answer)
        if segments:
            decoder.set_framing("segments", compression)
        authenticator = backend_authenticator(route, credentials)
        if authenticator is None:
            raise UpstreamError(
                f"backend {b.address} requires authentication ({authenticator_class})"
                " but the route's backend.auth.method is none",
                kind="auth",
                client_hint="the backend database requires authentication and the proxy has no credential for it",
            )
        token = await authenticator.initial_response(authenticator_class)
        while True:
            await channel.send(encoder(F.encode_auth_response(version, HANDSHAKE_STREAM, token, compressor=frame_compressor)))
            answer = await channel.receive()
            if answer.opcode == F.Opcode.AUTH_SUCCESS:
                authenticator.on_success(F.parse_auth_token(answer))
                return BackendLink(stream, decoder, encoder, tls, authenticator.mechanism, authenticator_class,
                                   getattr(authenticator, "principal", None))
            if answer.opcode == F.Opcode.AUTH_CHALLENGE:
                token = await authenticator.evaluate_challenge(F.parse_auth_token(answer))
                continue
            if answer.opcode == F.Opcode.ERROR:
                raise _refused(route, answer, "credentials")
            raise _unexpected(route, answer, "AUTH_RESPONSE")
