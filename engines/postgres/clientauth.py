"""Who the Postgres client is: the proxy's side of client authentication.

Runs after the startup packet (and any TLS upgrade), before routing
(protocol docs §55.2.1 "Start-up", §55.3 "SASL Authentication"), with the
listener's ``identity.ClientAuthenticator``.  The first method that applies wins:

1. ``mtls`` — the client presented a certificate the listener's CA verified:
   identity = its CN (the startup ``user`` must be that CN, like
   PostgreSQL's ``cert`` method) or its SAN URI.  No exchange.
2. ``token`` — the password is a dbproxy token:
   - over client TLS: AuthenticationCleartextPassword → PasswordMessage;
     the token itself is verified (signature, expiry, user, revocation);
   - without TLS: AuthenticationSASL [SCRAM-SHA-256] → SASLInitialResponse
     → AuthenticationSASLContinue → SASLResponse → AuthenticationSASLFinal,
     against the SCRAM verifiers ``token issue`` recorded (see
     ``dbproxy.identity``).  The token never crosses the wire.
   A token is never asked for in cleartext over an unencrypted link.
3. ``anonymous`` — no exchange; the listener's anonymous identity.

AuthenticationOk is *not* sent here: the engine sends it with the backend's
parameters once the backend login succeeded.  Failures raise
``ClientAuthError`` with the SQLSTATE and message a real server would send
(28P01 ``password authentication failed for user "…"``; 28000 for
certificates and unavailable methods) and the ``AuthFailed`` cause for the
audit trail — the same client message whatever the reason, so a client
cannot probe which tokens exist or why one was refused.
"""

from __future__ import annotations

from typing import Any

from dbproxy.channel import MessageStream
from dbproxy.errors import RemoteProtocolError
from dbproxy.identity import SCRAM_SHA_256, AuthFailed
from dbproxy.session import Identity

from . import messages as m

#: A token is a few hundred bytes; SCRAM messages are smaller still.
MAX_AUTH_MESSAGE = 16 * 1024


class ClientAuthError(Exception):
    """Authentication failed: ``sqlstate``/``client_message`` for the client, ``cause`` for the audit."""

    def __init__(self, sqlstate: str, client_message: str, cause: AuthFailed, *, mechanism: str, detail: str | None = None) -> None:
        super().__init__(str(cause))
        self.sqlstate = sqlstate
        self.client_message = client_message
        self.detail = detail
        self.cause = cause
        self.mechanism = mechanism

    @property
    def identity(self) -> Identity:
        """What the audit trail shows for the failed attempt: nobody, and the method they tried."""
        return Identity(user="unauthenticated", method="mtls" if self.mechanism == "mtls" else "token", token_id=None)


async def _receive_password_message(client: MessageStream, what: str) -> m.Message:
    msg = await client.receive()
    if getattr(msg, "type", None) != m.FE.PASSWORD:
        raise RemoteProtocolError(
            f"expected a {what} message, got {getattr(msg, 'type_char', '?')!r}",
            client_hint=f"expected {what} response",
        )
    if len(msg.raw) > MAX_AUTH_MESSAGE:
        raise RemoteProtocolError(f"{what} message of {len(msg.raw)} bytes", client_hint=f"{what} message too long")
    return msg


async def authenticate(auth: Any, client: MessageStream, user: str, *, client_tls: bool) -> tuple[Identity, str]:
    """Run the exchange; return (identity, mechanism: mtls / cleartext / SCRAM-SHA-256 / anonymous)."""
    if "mtls" in auth.methods:
        try:
            identity = auth.certificate_identity(client.stream)
        except AuthFailed as exc:
            raise ClientAuthError("28000", f'certificate authentication failed for user "{user}"', exc, mechanism="mtls") from None
        if identity is not None:
            if auth.mtls.subject == "cn" and identity.user != user:
                raise ClientAuthError(
                    "28000",
                    f'certificate authentication failed for user "{user}"',
                    AuthFailed(f"certificate CN {identity.user!r} is not the requested user {user!r}", reason="certificate_wrong_user"),
                    mechanism="mtls",
                    detail=f"provided user name ({user}) and authenticated user name ({identity.user}) do not match",
                )
            return identity, "mtls"
    if auth.token:
        if client_tls:
            return await _cleartext(auth, client, user), "cleartext"
        if auth.scram_available:
            return await _scram(auth, client, user), SCRAM_SHA_256
        if "anonymous" not in auth.methods:
            raise ClientAuthError(
                "28000",
                "token authentication needs an encrypted connection to the proxy (sslmode=require)",
                AuthFailed("no client TLS and no SCRAM verifier registry (identity.token.registry_file)", reason="method_unavailable"),
                mechanism="none",
            )
    if "anonymous" in auth.methods:
        return auth.anonymous(), "anonymous"
    # An mtls-only listener and no certificate (or no TLS at all).
    raise ClientAuthError(
        "28000",
        "connection requires a valid client certificate",
        AuthFailed("no verified client certificate on an mtls listener", reason="certificate_missing"),
        mechanism="mtls",
    )


def _password_failed(user: str, exc: AuthFailed, mechanism: str) -> ClientAuthError:
    return ClientAuthError("28P01", f'password authentication failed for user "{user}"', exc, mechanism=mechanism)


async def _cleartext(auth: Any, client: MessageStream, user: str) -> Identity:
    await client.send(m.encode_auth_cleartext())
    msg = await _receive_password_message(client, "password")
    password = m.parse_password(msg)
    try:
        return auth.verify_token(user, password)
    except AuthFailed as exc:
        raise _password_failed(user, exc, "cleartext") from None


async def _scram(auth: Any, client: MessageStream, user: str) -> Identity:
    await client.send(m.encode_auth_sasl([SCRAM_SHA_256]))
    first = m.parse_sasl_initial_response(await _receive_password_message(client, "SASL"))
    if first.mechanism != SCRAM_SHA_256 or first.data is None:
        raise RemoteProtocolError(
            f"client selected SASL mechanism {first.mechanism!r}",
            client_hint="client selected an invalid SASL authentication mechanism",
        )
    try:
        server = auth.scram(user, SCRAM_SHA_256)  # PostgreSQL ignores the SCRAM n=; the startup user counts
        await client.send(m.encode_auth_sasl_continue(server.server_first(first.data)))
        final = m.parse_sasl_response(await _receive_password_message(client, "SASL"))
        await client.send(m.encode_auth_sasl_final(server.server_final(final)))
    except AuthFailed as exc:
        raise _password_failed(user, exc, SCRAM_SHA_256) from None
    assert server.identity is not None
    return server.identity
