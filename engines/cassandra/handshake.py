"""The CQL client handshake, owned by the proxy (the engine's ``handshake`` and ``identify`` hooks).

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
             Cassandra checks it.  Then the client's credentials
             (``client_auth_plan``): AUTHENTICATE (PasswordAuthenticator) and
             the client's SASL PLAIN AUTH_RESPONSE, whose user name is a
             claim (routing, ``expected_user``, audit) and whose password is
             dropped — or, with an identity layer, mTLS / a dbproxy token as
             the PLAIN password (TLS listeners only) / anonymous.

Framing follows the codec's rules (``codec.py``): v5+ client decoder to
segments right after STARTUP, encoder toward the client right after the
proxy's AUTHENTICATE/READY went out; v3/v4 compression from STARTUP on.
"""

from __future__ import annotations

import logging
import socket as socket_module
from typing import Any

import trio

from dbproxy.errors import AccessDenied
from dbproxy.flow import Refused, Request, send_quietly
from dbproxy.identity import AuthFailed
from dbproxy.session import Identity

from . import protocol as F
from .auth import ClientAuthFailed, ClientAuthenticator, TokenClientAuthenticator, client_authenticator
from .clientwire import ClientWire

log = logging.getLogger("dbproxy.cassandra")

TLS_HANDSHAKE_RECORD = 0x16
CQL_VERSION = "3.4.7"  # Cassandra 5.0's
SUPPORTED_OPTIONS = {
    "PROTOCOL_VERSIONS": F.supported_versions_text().split(", "),
    "COMPRESSION": ["snappy", "lz4"],
    "CQL_VERSION": [CQL_VERSION],
}
TLS_REQUIRED = "this port requires TLS: connect to the proxy with TLS (cqlsh --ssl, or an ssl_context in the driver)"


def auth_refused(message: str, cause: AccessDenied) -> Refused:
    """The client's credentials are refused during the handshake: AUTH_ERROR, audited as a denial."""
    code = F.ErrorCode.AUTH_ERROR
    return Refused(message, code=code, fields={"error_code": code}, cause=cause, stage="authenticate")


async def handshake(engine: Any, session: Any, request: Request) -> bool:
    """Listener TLS, then OPTIONS / STARTUP (the client's version, compression, driver)."""
    if engine.ssl_context is not None and not await _client_tls(engine, session, request):
        return False
    request.waiting_for = "client handshake timed out"
    channel, hello = request.client, request.extra
    wire = hello.wire
    while True:
        frame = await channel.receive()
        check_version(frame, wire)
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
    request.start_fields = start_fields(session)
    return True


async def _client_tls(engine: Any, session: Any, request: Request) -> bool:
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
            await _refuse_plaintext(session, stream)
            return False
    request.waiting_for = "client TLS handshake timed out"
    tls = trio.SSLStream(stream, engine.ssl_context, server_side=True)
    try:
        await tls.do_handshake()
    except trio.BrokenResourceError as exc:
        log.info("session %s: client TLS handshake failed: %s", session.id, getattr(exc, "__cause__", None) or exc)
        return False
    session.details["client_tls"] = True
    request.client.stream = tls
    return True


async def _refuse_plaintext(session: Any, stream: Any) -> None:
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


def check_version(frame: F.Frame, wire: ClientWire) -> None:
    if wire.version is None:
        wire.version = frame.version
    elif frame.version != wire.version:
        message = f"Invalid message version. Got {frame.version} but previous messages on this connection had version {wire.version}"
        raise F.CqlProtocolError(message, stream=frame.stream, version=wire.version)


async def identify(engine: Any, session: Any, request: Request) -> None:
    """The client's credentials (``_client_auth_plan``): AUTHENTICATE and its SASL exchange."""
    channel, hello = request.client, request.extra
    wire, version = hello.wire, hello.version
    authenticator, identity, mechanism = client_auth_plan(engine, session, channel.stream)
    session.details["client_auth"] = mechanism
    request.start_fields = start_fields(session)
    if identity is not None:
        session.identity = identity
    if authenticator is None:
        hello.user = identity.user if identity is not None and mechanism == "mtls" else None
        _requested(session, request)
        return
    await wire.send(
        F.encode_authenticate(version, hello.reply_stream, authenticator.authenticator_class, compressor=wire.compression)
    )
    if version >= F.FIRST_SEGMENT_VERSION:
        wire.encoder.set_framing("segments", hello.compression)
    while True:
        frame = await channel.receive()
        check_version(frame, wire)
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
            _requested(session, request)
            return
        await wire.send(wire.encoder(F.encode_auth_challenge(version, frame.stream, step.challenge, compressor=wire.compression)))


def _requested(session: Any, request: Request) -> None:
    hello = request.extra
    options = hello.options
    request.login = hello.user
    request.keys = {
        "user": hello.user or "",
        "driver_name": options.get("DRIVER_NAME", ""),
        "driver_version": options.get("DRIVER_VERSION", ""),
    }
    request.start_fields = start_fields(session)


def client_auth_plan(engine: Any, session: Any, stream: Any) -> tuple[ClientAuthenticator | None, Any, str]:
    """(authenticator for AUTH_RESPONSE or None, identity known already, mechanism name).

    Without an identity layer the listener's ``client_auth`` decides
    (``claim``: the user name is taken, the password dropped; ``none``).
    With one (``services.access``), the listener's ``auth.methods``, first
    that applies: ``mtls`` (a verified client certificate: no exchange),
    ``token`` (the SASL PLAIN password is a dbproxy token; only over
    client TLS — CQL has no SCRAM, and a token never crosses an
    unencrypted link), ``anonymous``.
    """
    if engine.access is None:
        auth = client_authenticator(engine.client_auth)
        return auth, None, "claim" if auth is not None else "none"
    acc = engine.access.auth
    methods = acc.methods
    if "mtls" in methods:
        try:
            identity = acc.certificate_identity(stream)
        except AuthFailed as exc:
            raise auth_refused("certificate authentication failed", exc) from None
        if identity is not None:
            return None, identity, "mtls"
    if acc.token:
        if engine.ssl_context is not None:
            return TokenClientAuthenticator(acc), None, "token"
        if "anonymous" not in methods:
            raise auth_refused(
                "token authentication needs an encrypted connection to the proxy (a TLS listener; cqlsh --ssl)",
                AuthFailed("token method on a listener without TLS: a CQL password travels in cleartext", reason="method_unavailable"),
            )
    if "anonymous" in methods:
        auth = client_authenticator(engine.client_auth)
        return auth, acc.anonymous(), "anonymous"
    raise auth_refused(
        "connection requires a valid client certificate",
        AuthFailed("no verified client certificate on an mtls listener", reason="certificate_missing"),
    )


def start_fields(session: Any) -> dict:
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
