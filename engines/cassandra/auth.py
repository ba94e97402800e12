"""Authentication steps of the Cassandra engine: what the proxy says to the
backend, and what it accepts from clients.

CQL authentication is SASL carried in AUTHENTICATE / AUTH_RESPONSE /
AUTH_CHALLENGE / AUTH_SUCCESS (native protocol v4 section 4.2.3, v5 4.2.3).
Both directions are small step objects so the engine's handshake code never
knows a mechanism:

Backend (``BackendAuthenticator``): the proxy logs in with the *route's*
credential.  ``initial_response(authenticator_class)`` gives the first token,
``evaluate_challenge(token)`` answers each AUTH_CHALLENGE, ``on_success``
sees AUTH_SUCCESS's token.  The steps are ``async`` so a mechanism that needs
a worker thread (SASL GSSAPI) slots in without changing the engine.
``PlainAuthenticator`` (SASL PLAIN, what Cassandra's PasswordAuthenticator
speaks; DSE's DseAuthenticator first wants the mechanism name and a
``PLAIN-START`` challenge, handled too).  ``GssapiAuthenticator`` (method
``gssapi``): SASL GSSAPI of RFC 4752 with the proxy's own Kerberos credential
(``dbproxy.kerberos``: one credential per principal/keytab shared by all
sessions, renewed in the background; the context and the security-layer
exchange in ``SaslGssapi``).  The authenticator classes seen in the field:
the Instaclustr plugin (``com.instaclustr.cassandra.auth.KerberosAuthenticator``)
and DSE's older ``com.datastax.bdp.cassandra.auth.KerberosAuthenticator`` take
the first GSS token at once; DSE's unified ``DseAuthenticator`` first wants
the mechanism name ``GSSAPI`` and answers ``GSSAPI-START``; any other class
gets the GSS token at once too, except PasswordAuthenticator (PLAIN only),
refused with a clear error.

Client (``ClientAuthenticator``): what the proxy does with the client's
AUTH_RESPONSE; the engine only calls ``step``.  ``PlainClientAuthenticator``
(listener ``client_auth: "password"`` without an identity layer) takes the
SASL PLAIN token, keeps the user name (a *claim*, used for routing,
``expected_user`` and the audit) and drops the password on the spot.
``TokenClientAuthenticator`` (listener ``auth.methods`` has ``token``)
checks the password as a dbproxy token through ``dbproxy.identity``.  A
client password is never forwarded, stored or logged.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import attrs

from dbproxy.config import RouteConfig
from dbproxy.errors import ProxyError, UpstreamError

from .requests import sasl_plain_token

log = logging.getLogger("dbproxy.cassandra")

PASSWORD_AUTHENTICATOR = "org.apache.cassandra.auth.PasswordAuthenticator"
DSE_AUTHENTICATOR = "com.datastax.bdp.cassandra.auth.DseAuthenticator"
# Kerberos authenticators in the field that expect the first GSS token in the first AUTH_RESPONSE.
INSTACLUSTR_KERBEROS_AUTHENTICATOR = "com.instaclustr.cassandra.auth.KerberosAuthenticator"
DSE_KERBEROS_AUTHENTICATOR = "com.datastax.bdp.cassandra.auth.KerberosAuthenticator"
KERBEROS_AUTHENTICATORS = frozenset({INSTACLUSTR_KERBEROS_AUTHENTICATOR, DSE_KERBEROS_AUTHENTICATOR, DSE_AUTHENTICATOR})
GSSAPI_DEFAULT_SERVICE = "cassandra"  # the service principal cassandra/<host>@REALM (Instaclustr's default)


# --------------------------------------------------------------------------- backend


class BackendAuthenticator(Protocol):
    mechanism: str

    async def initial_response(self, authenticator_class: str) -> bytes | None: ...

    async def evaluate_challenge(self, challenge: bytes | None) -> bytes | None: ...

    def on_success(self, token: bytes | None) -> None: ...


def _auth_error(message: str, hint: str | None = None) -> UpstreamError:
    return UpstreamError(message, kind="auth", client_hint=hint or "the proxy could not log in to the backend database")


class PlainAuthenticator:
    """SASL PLAIN with the route's user and password (read when used, never kept)."""

    mechanism = "PLAIN"

    def __init__(self, user: str, secret: Any) -> None:
        self.user = user
        self._secret = secret
        self._dse = False
        self._sent = False

    def _token(self) -> bytes:
        try:
            password = self._secret.reveal()
        except (OSError, KeyError) as exc:
            raise _auth_error(f"could not read the route's backend password: {exc.__class__.__name__}") from None
        self._sent = True
        return sasl_plain_token(self.user, password)

    async def initial_response(self, authenticator_class: str) -> bytes | None:
        if authenticator_class == DSE_AUTHENTICATOR:
            # DSE negotiates the mechanism first, then challenges with PLAIN-START.
            self._dse = True
            return b"PLAIN"
        return self._token()

    async def evaluate_challenge(self, challenge: bytes | None) -> bytes | None:
        if self._dse and not self._sent and challenge == b"PLAIN-START":
            return self._token()
        raise _auth_error(
            "backend sent an AUTH_CHALLENGE after the SASL PLAIN credentials; PLAIN has no further step",
            "the backend database asked for an authentication step the proxy does not support",
        )

    def on_success(self, token: bytes | None) -> None:
        return None


class GssapiAuthenticator:
    """SASL GSSAPI (RFC 4752) as the route's Kerberos principal.

    The credential comes from the process-wide ``CredentialCache`` (acquired
    once from the keytab/ccache for all sessions, renewed before expiry); the
    service ticket for ``service@host`` is fetched by the first context step.
    The backend is authenticated only when the security-layer offer has been
    unwrapped, so an AUTH_SUCCESS before that is refused.
    """

    mechanism = "GSSAPI"

    def __init__(self, route: RouteConfig, credentials: Any) -> None:
        self.route = route
        self.credentials = credentials
        params = route.backend.auth.params
        self.service = params.get("service", GSSAPI_DEFAULT_SERVICE)
        self.host = params.get("host") or route.backend.host
        self.authzid = params.get("authorization_id", "")
        self._dse = False
        self._sasl: Any = None
        self.principal: str | None = None

    async def _start(self) -> bytes:
        from dbproxy.kerberos import CLIENT_HINT, GssInitiator, SaslGssapi

        if self.credentials is None:
            raise UpstreamError("no Kerberos credential cache configured", kind="auth", client_hint=CLIENT_HINT)
        creds = await self.credentials.for_auth(self.route.backend.auth.params).get()
        # RFC 4752 3.1: mutual authentication, and integrity for the layer exchange's GSS_Wrap/Unwrap.
        initiator = GssInitiator(creds, self.service, self.host, mutual=True, integrity=True)
        self.principal = str(creds.name)
        self._sasl = SaslGssapi(initiator, self.authzid)
        return await self._sasl.initial()

    async def initial_response(self, authenticator_class: str) -> bytes | None:
        if authenticator_class == PASSWORD_AUTHENTICATOR:
            raise _auth_error(
                f"backend {self.route.backend.address} authenticates with {authenticator_class} (SASL PLAIN only),"
                " but the route's backend.auth.method is gssapi: the node needs a Kerberos authenticator",
                "the backend database does not offer Kerberos authentication",
            )
        if authenticator_class == DSE_AUTHENTICATOR:
            # DSE negotiates the mechanism first, then challenges with GSSAPI-START.
            self._dse = True
            return b"GSSAPI"
        if authenticator_class not in KERBEROS_AUTHENTICATORS:
            # A plugin of its own: the first GSS token at once is what every known one expects.
            log.info("backend %s announces %s: starting SASL GSSAPI with the first context token",
                     self.route.backend.address, authenticator_class)
        return await self._start()

    async def evaluate_challenge(self, challenge: bytes | None) -> bytes | None:
        if self._sasl is None:
            if self._dse and challenge == b"GSSAPI-START":
                return await self._start()
            raise _auth_error(
                f"backend answered the SASL mechanism name GSSAPI with {challenge!r}, not GSSAPI-START",
                "the backend database does not offer Kerberos authentication",
            )
        return await self._sasl.respond(challenge)

    def on_success(self, token: bytes | None) -> None:
        if self._sasl is None or not self._sasl.done:
            raise _auth_error(
                f"backend {self.route.backend.address} reported AUTH_SUCCESS before the SASL GSSAPI exchange"
                " completed: the server did not prove its identity (RFC 4752 3.1)",
                "the backend database did not complete Kerberos mutual authentication",
            )


def backend_authenticator(route: RouteConfig, credentials: Any = None) -> BackendAuthenticator | None:
    """The authenticator for a route's ``backend.auth.method`` (None for ``none``)."""
    auth = route.backend.auth
    if auth.method == "none":
        return None
    if auth.method == "password":
        return PlainAuthenticator(route.backend.user or "", auth.secret)
    if auth.method == "gssapi":
        return GssapiAuthenticator(route, credentials)
    raise _auth_error(f"backend auth method {auth.method!r} is not supported by the cassandra engine")


# --------------------------------------------------------------------------- client


class ClientAuthFailed(ProxyError):
    """The client's credentials were refused; the message is safe to send it (AUTH_ERROR).

    ``cause`` (a ``dbproxy.identity.AuthFailed``) carries the reason for the
    audit trail when a token check failed; the client sees only the message.
    """

    def __init__(self, message: str, *, cause: Any = None) -> None:
        super().__init__(message)
        self.cause = cause


@attrs.frozen
class ClientAuthStep:
    """One step's outcome: a challenge to send, or done with the client's user name
    (and its ``Identity`` when the step proved one)."""

    done: bool
    challenge: bytes | None = None
    user: str | None = None
    identity: Any = None


class ClientAuthenticator(Protocol):
    authenticator_class: str  # announced to the client in AUTHENTICATE

    def step(self, token: bytes | None) -> ClientAuthStep: ...


class PlainClientAuthenticator:
    """Accept a SASL PLAIN token, keep the user name, drop the password.

    Token layout (RFC 4616): ``[authzid] NUL authcid NUL passwd``.  Errors use
    Cassandra's own wording (PlainTextSaslAuthenticator) so drivers show the
    same thing they would show against a real node.
    """

    authenticator_class = PASSWORD_AUTHENTICATOR

    def step(self, token: bytes | None) -> ClientAuthStep:
        user, _password = parse_plain(token)
        return ClientAuthStep(done=True, user=user)  # a claim only: the password is dropped here


def parse_plain(token: bytes | None) -> tuple[str, bytes]:
    if token is None:
        raise ClientAuthFailed("Failed to authenticate: an SASL PLAIN token is required")
    parts = token.split(b"\x00")
    if len(parts) != 3:
        raise ClientAuthFailed("Failed to authenticate: malformed SASL PLAIN token")
    user_raw, password = parts[1], parts[2]
    if not user_raw:
        raise ClientAuthFailed("Authentication ID must not be null")
    if not password:
        raise ClientAuthFailed("Password must not be null")
    try:
        return user_raw.decode("utf-8"), password
    except UnicodeDecodeError:
        raise ClientAuthFailed("Failed to authenticate: user name is not valid UTF-8") from None


class TokenClientAuthenticator:
    """The listener's identity layer (``dbproxy.identity.ClientAuthenticator``):
    the SASL PLAIN password must be a dbproxy token for that user.

    Every refusal shows the client Cassandra's own words for bad credentials,
    whatever the reason (a client cannot probe which tokens exist); the
    reason goes to the audit trail through ``cause``.
    """

    authenticator_class = PASSWORD_AUTHENTICATOR

    def __init__(self, auth: Any) -> None:
        self.auth = auth

    def step(self, token: bytes | None) -> ClientAuthStep:
        from dbproxy.identity import AuthFailed

        user, password = parse_plain(token)
        try:
            identity = self.auth.verify_token(user, password)
        except AuthFailed as exc:
            raise ClientAuthFailed(f"Provided username {user} and/or password are incorrect", cause=exc) from None
        return ClientAuthStep(done=True, user=user, identity=identity)


def client_authenticator(mode: str) -> ClientAuthenticator | None:
    """The client authenticator for a listener's ``client_auth`` mode (None for ``none``)."""
    if mode == "password":
        return PlainClientAuthenticator()
    return None
