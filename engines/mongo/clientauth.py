"""What a Mongo listener does with the credentials its *clients* send.

Strategy.  The proxy owns the backend login (``backend.py``); a client's
``saslStart`` / ``saslContinue`` / ``authenticate`` / ``logout`` and the
``speculativeAuthenticate`` inside its ``hello`` are answered here and never
reach the backend.  One ``ClientAuthPolicy`` per listener (its options), one
``ClientAuthenticator`` per session (the conversation state).  Stages call
``handle(name, body)`` / ``speculative(doc)`` and get reply documents; no I/O.

Policies (listener ``options.client_auth``):

``accept`` (default)
    A client that sends credentials still connects: Teleport refuses client
    SCRAM and so breaks Compass (its issue #66008); we must not.
    * PLAIN: accepted as is; the user name is recorded, the password dropped.
    * SCRAM-SHA-1 / SCRAM-SHA-256: a SCRAM client checks the server's
      signature, which only someone who knows the password can compute.  With
      ``options.client_password_file`` (or ``client_password_env``) the proxy is
      a real SCRAM server for *any* user name, with verifiers derived from that
      one listener password (cached per mechanism and user; a per-process
      random salt); a wrong password is refused with AuthenticationFailed.
      Without it, SCRAM gets a clear ``ok: 0`` saying what to do instead.
    * MONGODB-X509 ``authenticate``: accepted (TLS already happened).
``reject``
    Every authentication attempt gets ``ok: 0`` code 18 explaining that the
    proxy logs in to the database itself.

The user names recorded by these policies are claims (verified only against
the shared listener password), never identities.

Identity mode (``IdentityAuthenticator``): a listener whose ``auth.methods``
include ``token`` or ``mtls`` proves who each client is with
``dbproxy.identity`` instead (see ``policy.py`` for what happens next):

* SCRAM-SHA-256 / SCRAM-SHA-1: ``ScramTokenServer`` against the token
  registry (the user comes from the SCRAM ``n=``; the SHA-1 verifier is of
  Mongo's ``md5(user:mongo:token)``), also as ``speculativeAuthenticate``.
* PLAIN: the token itself is verified, and only on a TLS client link (the
  token would otherwise cross the network in the clear; refused unverified).
* MONGODB-X509: the listener's verified client certificate (mtls).

A refused token or certificate answers code 18 ``Authentication failed.``
whatever the reason (expired, revoked, another user's, forged — the
``AuthFailed`` reason goes to the audit, never to the client); PLAIN without
TLS and X509 without a certificate add a hint, which says nothing about any
token.  334 MechanismUnavailable for a mechanism the listener does not
offer.  A new conversation once the connection is established as someone
answers 13: one connection, one identity.

Nothing here ever returns, logs or stores a client password or token.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Mapping

import attrs
from bson.binary import Binary

from dbproxy.config import SecretRef
from dbproxy.errors import AccessDenied, ProtocolError
from dbproxy.identity import AuthFailed
from dbproxy.session import Identity

from . import scram
from .commands import error_document

MODES = ("accept", "reject")
AUTH_COMMANDS = frozenset({"saslStart", "saslContinue", "authenticate", "logout", "getnonce"})
PLAIN = "PLAIN"
X509 = "MONGODB-X509"

REJECT_MESSAGE = (
    "this proxy does not accept client credentials: connect without a username and password"
    " (the proxy logs in to the database itself)"
)
NO_PASSWORD_MESSAGE = (
    "this proxy answers client SCRAM only when its listener has a password configured"
    " (options.client_password_file); connect without credentials, use authMechanism=PLAIN,"
    " or ask the operator for the listener password"
)

# mongod's error codes (src/mongo/base/error_codes.yml).
AUTHENTICATION_FAILED = 18
UNAUTHORIZED = 13
PROTOCOL_ERROR = 17
MECHANISM_UNAVAILABLE = 334
COMMAND_NOT_FOUND = 59


@attrs.define(eq=False)
class ClientAuthPolicy:
    """A listener's client-auth policy and its cache of SCRAM verifiers."""

    mode: str = "accept"
    secret: SecretRef | None = None
    _salts: dict = attrs.field(factory=dict, repr=False)
    _verifiers: dict = attrs.field(factory=dict, repr=False)

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> "ClientAuthPolicy":
        secret = None
        if options.get("client_password_file"):
            secret = SecretRef(file=options["client_password_file"])
        elif options.get("client_password_env"):
            secret = SecretRef(env=options["client_password_env"])
        return cls(mode=options.get("client_auth", "accept"), secret=secret)

    def mechanisms(self) -> list[str]:
        """What ``saslSupportedMechs`` announces (mongod's order: SHA-1 first)."""
        if self.mode == "reject":
            return []
        if self.secret is not None:
            return [scram.SCRAM_SHA_1, scram.SCRAM_SHA_256, PLAIN]
        return [PLAIN]

    def verifier(self, mechanism: str, user: str) -> scram.ScramCredentials:
        """StoredKey/ServerKey for ``user`` from the listener password (read at use, so rotation works)."""
        password = self.secret.reveal()  # type: ignore[union-attr]
        key = (mechanism, user, hashlib.sha256(password.encode("utf-8")).digest())
        creds = self._verifiers.get(key)
        if creds is None:
            salt = self._salts.setdefault(mechanism, os.urandom(16 if mechanism == scram.SCRAM_SHA_1 else 28))
            creds = scram.scram_credentials(mechanism, user, password, salt=salt)
            if len(self._verifiers) >= 1024:
                self._verifiers.pop(next(iter(self._verifiers)))
            self._verifiers[key] = creds
        return creds

    def session(self) -> "ClientAuthenticator":
        return ClientAuthenticator(self)


@attrs.frozen
class AuthOutcome:
    """A reply document and what the audit should say about it (never a secret)."""

    reply: dict
    mechanism: str | None = None
    user: str | None = None
    done: bool = False  # the conversation ended successfully with this reply
    #: Identity mode: who the client proved to be (set once, when the proof verified).
    identity: Identity | None = None
    #: Why the attempt failed, for the audit trail (an AuthFailed reason or a code of ours).
    reason: str | None = None
    failure: AccessDenied | None = attrs.field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return bool(self.reply.get("ok"))


_REASONS = {
    AUTHENTICATION_FAILED: "authentication_failed",
    MECHANISM_UNAVAILABLE: "mechanism_unavailable",
    PROTOCOL_ERROR: "malformed_authentication",
    COMMAND_NOT_FOUND: "unsupported_auth_command",
    UNAUTHORIZED: "already_authenticated",
}


def _error(code: int, message: str, *, reason: str | None = None, **kw: Any) -> AuthOutcome:
    name = {MECHANISM_UNAVAILABLE: "MechanismUnavailable", PROTOCOL_ERROR: "ProtocolError"}.get(code)
    return AuthOutcome(error_document(code, message, code_name=name), reason=reason or _REASONS.get(code), **kw)


def _begin_scram(auth: Any, server: Any, server_first: bytes, body: Mapping[str, Any], mechanism: str, user: str) -> AuthOutcome:
    """Open a SCRAM conversation on ``auth`` (either authenticator) and answer saslStart."""
    auth._server = server
    auth._step = 1
    options = body.get("options")
    auth._skip_empty = bool(isinstance(options, Mapping) and options.get("skipEmptyExchange"))
    auth.mechanism, auth.user = mechanism, user
    return AuthOutcome(
        {"conversationId": auth._conversation_id, "done": False, "payload": Binary(server_first), "ok": 1.0},
        mechanism, user,
    )


@attrs.define(eq=False)
class ClientAuthenticator:
    """One session's client-auth conversation (saslStart → saslContinue… or authenticate)."""

    policy: ClientAuthPolicy
    user: str | None = None
    mechanism: str | None = None
    authenticated: bool = False
    _server: scram.ScramServer | None = attrs.field(default=None, repr=False)
    _step: int = 0
    _skip_empty: bool = False
    _conversation_id: int = 0

    # -- entry points ------------------------------------------------------------
    def mechanisms(self) -> list[str]:
        return self.policy.mechanisms()

    def reset(self) -> None:
        self._server = None
        self._step = 0

    def handle(self, name: str, body: Mapping[str, Any]) -> AuthOutcome:
        if name == "saslStart":
            return self._sasl_start(body)
        if name == "saslContinue":
            return self._sasl_continue(body)
        if name == "authenticate":
            return self._authenticate(body)
        if name == "logout":
            self.user = self.mechanism = None
            self.authenticated = False
            return AuthOutcome({"ok": 1.0})
        return _error(COMMAND_NOT_FOUND, f"{name} is not supported (MONGODB-CR was removed from MongoDB)")

    def speculative(self, doc: Any) -> AuthOutcome | None:
        """The answer to ``hello.speculativeAuthenticate`` or None (the driver then authenticates explicitly)."""
        if not isinstance(doc, Mapping) or self.policy.mode == "reject":
            return None
        try:
            first = next(iter(doc), None)
        except Exception:
            return None
        if first == "saslStart":
            outcome = self._sasl_start(doc)
        elif first == "authenticate":
            outcome = self._authenticate(doc)
        else:
            return None
        return outcome if outcome.ok else None

    # -- mechanisms -------------------------------------------------------------
    def _sasl_start(self, body: Mapping[str, Any]) -> AuthOutcome:
        mechanism = body.get("mechanism")
        mechanism = mechanism if isinstance(mechanism, str) else ""
        self._server = None
        self._step = 0
        if self.policy.mode == "reject":
            return _error(AUTHENTICATION_FAILED, REJECT_MESSAGE, mechanism=mechanism)
        payload = body.get("payload", b"")
        if not isinstance(payload, (bytes, Binary)):
            return _error(PROTOCOL_ERROR, "saslStart payload must be binary", mechanism=mechanism)
        payload = bytes(payload)
        self._conversation_id += 1
        if mechanism == PLAIN:
            # RFC 4616: [authzid] NUL authcid NUL passwd.  Only the name is kept.
            parts = payload.split(b"\x00")
            if len(parts) != 3 or not parts[1]:
                return _error(PROTOCOL_ERROR, "malformed PLAIN payload", mechanism=mechanism)
            user = parts[1].decode("utf-8", "replace")
            self._finish(mechanism, user)
            return AuthOutcome(
                {"conversationId": self._conversation_id, "done": True, "payload": Binary(b""), "ok": 1.0},
                mechanism, user, done=True,
            )
        if mechanism in scram.MECHANISMS:
            if self.policy.secret is None:
                return _error(AUTHENTICATION_FAILED, NO_PASSWORD_MESSAGE, mechanism=mechanism)
            try:
                first = scram.parse_client_first(payload)
                creds = self.policy.verifier(mechanism, first.user)
            except ProtocolError as exc:
                return _error(PROTOCOL_ERROR, exc.client_hint, mechanism=mechanism)
            except (OSError, KeyError):
                return _error(AUTHENTICATION_FAILED, "the proxy's listener password is not readable", mechanism=mechanism)
            server = scram.ScramServer.from_credentials(creds)
            return _begin_scram(self, server, server.server_first(first), body, mechanism, first.user)
        return _error(
            MECHANISM_UNAVAILABLE,
            f"authentication mechanism {mechanism!r} is not supported by this proxy (use SCRAM or PLAIN)",
            mechanism=mechanism,
        )

    def _sasl_continue(self, body: Mapping[str, Any]) -> AuthOutcome:
        server = self._server
        if self.policy.mode == "reject":
            return _error(AUTHENTICATION_FAILED, REJECT_MESSAGE)
        if server is None or body.get("conversationId") != self._conversation_id:
            return _error(PROTOCOL_ERROR, "no SASL conversation in progress")
        mechanism, user = self.mechanism, self.user
        payload = body.get("payload", b"")
        payload = bytes(payload) if isinstance(payload, (bytes, Binary)) else b""
        if self._step == 1:
            try:
                final = server.server_final(payload)
            except (AccessDenied, ProtocolError):
                self._server = None
                self.authenticated = False
                return _error(AUTHENTICATION_FAILED, "Authentication failed.", mechanism=mechanism, user=user)
            done = self._skip_empty
            self._step = 2
            if done:
                self._finish(mechanism, user)
            return AuthOutcome(
                {"conversationId": self._conversation_id, "done": done, "payload": Binary(final), "ok": 1.0},
                mechanism, user, done=done,
            )
        # Step 2: the empty exchange of clients without skipEmptyExchange (auth.md).
        self._finish(mechanism, user)
        return AuthOutcome(
            {"conversationId": self._conversation_id, "done": True, "payload": Binary(b""), "ok": 1.0},
            mechanism, user, done=True,
        )

    def _authenticate(self, body: Mapping[str, Any]) -> AuthOutcome:
        mechanism = body.get("mechanism")
        mechanism = mechanism if isinstance(mechanism, str) else ""
        if self.policy.mode == "reject":
            return _error(AUTHENTICATION_FAILED, REJECT_MESSAGE, mechanism=mechanism)
        if mechanism != X509:
            return _error(MECHANISM_UNAVAILABLE, f"authenticate with {mechanism!r} is not supported by this proxy",
                          mechanism=mechanism)
        user = body.get("user") if isinstance(body.get("user"), str) else ""
        self._finish(mechanism, user)
        return AuthOutcome({"dbname": "$external", "user": user, "ok": 1.0}, mechanism, user, done=True)

    def _finish(self, mechanism: str | None, user: str | None) -> None:
        self._server = None
        self._step = 0
        self.mechanism, self.user = mechanism, user
        self.authenticated = True


# --------------------------------------------------------------------------- identity mode

AUTH_FAILED_MESSAGE = "Authentication failed."
PLAIN_NEEDS_TLS_MESSAGE = (
    "Authentication failed. dbproxy takes a token with PLAIN only over TLS, since PLAIN sends it in the clear:"
    " connect with tls=true, or use SCRAM-SHA-256 (the default), which never sends the token"
)
NO_TOKENS_MESSAGE = "dbproxy: token authentication is not enabled on this listener (it authenticates clients by certificate)"
NO_REGISTRY_MESSAGE = (
    "dbproxy: SCRAM needs the token registry (identity.token.registry_file); use authMechanism=PLAIN over TLS"
)
NO_CERTIFICATE_MESSAGE = "Authentication failed. dbproxy: MONGODB-X509 needs a client certificate the listener's CA verified"


def _subject_matches(requested: str, subject: str) -> bool:
    """The X509 ``user`` a client names (a full subject DN, or just the name) against the certificate's identity."""
    if requested == subject:
        return True
    return any(part.strip() == f"CN={subject}" for part in requested.split(","))


@attrs.define(eq=False)
class IdentityAuthenticator:
    """One session's client authentication against dbproxy identities (tokens, client certificates).

    Same surface as ``ClientAuthenticator`` (``handle``, ``speculative``,
    ``mechanisms``); an outcome whose proof verified carries the ``Identity``.
    The session (``policy.MongoAccess``) decides whether that identity may use
    the route; ``revoke()`` undoes an identity it refused, ``lock()`` ends
    authentication once the connection is established.
    """

    auth: Any  # the listener's dbproxy.identity.ClientAuthenticator
    client_tls: bool = False
    certificate: Identity | None = None  # the verified client certificate's identity (mtls), if any
    certificate_error: AuthFailed | None = None
    user: str | None = None  # the user name of the latest attempt
    mechanism: str | None = None
    authenticated: bool = False
    identity: Identity | None = None
    speculative_conversation: bool = False  # the current conversation began inside hello
    locked_as: str | None = None
    _server: Any = attrs.field(default=None, repr=False)
    _step: int = 0
    _skip_empty: bool = False
    _conversation_id: int = 0

    def mechanisms(self) -> list[str]:
        """``saslSupportedMechs`` (mongod's order, SHA-1 first; drivers pick SCRAM-SHA-256 when listed)."""
        out: list[str] = []
        if self.auth.scram_available:
            out += [scram.SCRAM_SHA_1, scram.SCRAM_SHA_256]
        if self.auth.token:
            out.append(PLAIN)
        return out

    def reset(self) -> None:
        self._server = None
        self._step = 0

    def revoke(self) -> None:
        """The session refused the identity this authenticator produced: back to unauthenticated."""
        self.reset()
        self.identity = None
        self.authenticated = False

    def lock(self, user: str) -> None:
        """The connection is established as ``user``: no new conversation; one that did not
        produce this identity (the session was established another way) cannot finish either."""
        self.locked_as = user
        if self.identity is None:
            self.reset()

    # -- entry points ------------------------------------------------------------
    def handle(self, name: str, body: Mapping[str, Any]) -> AuthOutcome:
        if self.locked_as is not None and name in ("saslStart", "authenticate"):
            return _error(
                UNAUTHORIZED,
                f"dbproxy: this connection is already authenticated as {self.locked_as!r};"
                " open a new connection to log in as someone else",
            )
        if name == "saslStart":
            return self._sasl_start(body, speculative=False)
        if name == "saslContinue":
            return self._sasl_continue(body)
        if name == "authenticate":
            return self._authenticate(body)
        if name == "logout":
            if self.locked_as is not None:
                return _error(UNAUTHORIZED, "dbproxy: logout is not supported; close the connection to end the session")
            self.revoke()
            self.user = self.mechanism = None
            return AuthOutcome({"ok": 1.0})
        return _error(COMMAND_NOT_FOUND, f"{name} is not supported (MONGODB-CR was removed from MongoDB)")

    def speculative(self, doc: Any) -> AuthOutcome | None:
        """The answer to ``hello.speculativeAuthenticate`` or None (the driver then authenticates explicitly)."""
        if not isinstance(doc, Mapping) or self.locked_as is not None:
            return None
        try:
            first = next(iter(doc), None)
        except Exception:
            return None
        if first == "saslStart":
            outcome = self._sasl_start(doc, speculative=True)
        elif first == "authenticate":
            outcome = self._authenticate(doc)
        else:
            return None
        if not outcome.ok:
            self.reset()
            return None
        return outcome

    # -- mechanisms -------------------------------------------------------------
    def _sasl_start(self, body: Mapping[str, Any], *, speculative: bool) -> AuthOutcome:
        mechanism = body.get("mechanism")
        mechanism = mechanism if isinstance(mechanism, str) else ""
        self.reset()
        payload = body.get("payload", b"")
        if not isinstance(payload, (bytes, Binary)):
            return _error(PROTOCOL_ERROR, "saslStart payload must be binary", mechanism=mechanism)
        payload = bytes(payload)
        self._conversation_id += 1
        self.speculative_conversation = speculative
        if mechanism == PLAIN:
            return self._plain(payload)
        if mechanism in scram.MECHANISMS:
            if not self.auth.token:
                return _error(MECHANISM_UNAVAILABLE, NO_TOKENS_MESSAGE, mechanism=mechanism)
            if not self.auth.scram_available:
                return _error(MECHANISM_UNAVAILABLE, NO_REGISTRY_MESSAGE, mechanism=mechanism)
            try:
                server = self.auth.scram(None, mechanism)  # the user comes from the SCRAM n=
                server_first = server.server_first(payload)
            except ProtocolError as exc:
                return _error(PROTOCOL_ERROR, exc.client_hint, mechanism=mechanism)
            except AuthFailed as exc:
                return _error(AUTHENTICATION_FAILED, AUTH_FAILED_MESSAGE, mechanism=mechanism, reason=exc.reason, failure=exc)
            return _begin_scram(self, server, server_first, body, mechanism, server.user)
        return _error(
            MECHANISM_UNAVAILABLE,
            f"authentication mechanism {mechanism!r} is not supported by this proxy (use SCRAM-SHA-256 with a dbproxy token)",
            mechanism=mechanism,
        )

    def _plain(self, payload: bytes) -> AuthOutcome:
        if not self.auth.token:
            return _error(MECHANISM_UNAVAILABLE, NO_TOKENS_MESSAGE, mechanism=PLAIN)
        # RFC 4616: [authzid] NUL authcid NUL passwd.
        parts = payload.split(b"\x00")
        if len(parts) != 3 or not parts[1]:
            return _error(PROTOCOL_ERROR, "malformed PLAIN payload", mechanism=PLAIN)
        user = parts[1].decode("utf-8", "replace")
        self.mechanism, self.user = PLAIN, user
        if not self.client_tls:
            return _error(AUTHENTICATION_FAILED, PLAIN_NEEDS_TLS_MESSAGE, mechanism=PLAIN, user=user, reason="plain_without_tls")
        if parts[0] and parts[0] != parts[1]:
            return _error(AUTHENTICATION_FAILED, AUTH_FAILED_MESSAGE, mechanism=PLAIN, user=user, reason="plain_authzid_differs")
        try:
            identity = self.auth.verify_token(user, parts[2])
        except AuthFailed as exc:
            return _error(AUTHENTICATION_FAILED, AUTH_FAILED_MESSAGE, mechanism=PLAIN, user=user, reason=exc.reason, failure=exc)
        self._finish(PLAIN, user, identity)
        return AuthOutcome(
            {"conversationId": self._conversation_id, "done": True, "payload": Binary(b""), "ok": 1.0},
            PLAIN, user, done=True, identity=identity,
        )

    def _sasl_continue(self, body: Mapping[str, Any]) -> AuthOutcome:
        server = self._server
        if server is None or body.get("conversationId") != self._conversation_id:
            return _error(PROTOCOL_ERROR, "no SASL conversation in progress")
        mechanism, user = self.mechanism, self.user
        payload = body.get("payload", b"")
        payload = bytes(payload) if isinstance(payload, (bytes, Binary)) else b""
        if self._step == 1:
            try:
                final = server.server_final(payload)
            except AuthFailed as exc:
                self.revoke()
                return _error(AUTHENTICATION_FAILED, AUTH_FAILED_MESSAGE, mechanism=mechanism, user=user, reason=exc.reason, failure=exc)
            except ProtocolError as exc:
                self.revoke()
                return _error(AUTHENTICATION_FAILED, AUTH_FAILED_MESSAGE, mechanism=mechanism, user=user,
                              reason="malformed_authentication", failure=AuthFailed(str(exc), reason="malformed_authentication"))
            identity = server.identity
            done = self._skip_empty
            self._step = 2
            self.identity = identity
            if done:
                self._finish(mechanism, user, identity)
            # The identity is reported once, with the verified proof (the empty step 2 adds nothing).
            return AuthOutcome(
                {"conversationId": self._conversation_id, "done": done, "payload": Binary(final), "ok": 1.0},
                mechanism, user, done=done, identity=identity,
            )
        # Step 2: the empty exchange of clients without skipEmptyExchange (auth.md).
        self._finish(mechanism, user, self.identity)
        return AuthOutcome(
            {"conversationId": self._conversation_id, "done": True, "payload": Binary(b""), "ok": 1.0},
            mechanism, user, done=True,
        )

    def _authenticate(self, body: Mapping[str, Any]) -> AuthOutcome:
        mechanism = body.get("mechanism")
        mechanism = mechanism if isinstance(mechanism, str) else ""
        self.reset()
        self.speculative_conversation = False
        if mechanism != X509:
            return _error(MECHANISM_UNAVAILABLE, f"authenticate with {mechanism!r} is not supported by this proxy",
                          mechanism=mechanism)
        if "mtls" not in self.auth.methods:
            return _error(MECHANISM_UNAVAILABLE, "dbproxy: this listener does not authenticate clients by certificate",
                          mechanism=mechanism)
        requested = body.get("user") if isinstance(body.get("user"), str) else None
        cert = self.certificate
        if cert is None:
            exc = self.certificate_error or AuthFailed("no verified client certificate", reason="certificate_missing")
            return _error(AUTHENTICATION_FAILED, NO_CERTIFICATE_MESSAGE, mechanism=mechanism, user=requested,
                          reason=exc.reason, failure=exc)
        if requested and not _subject_matches(requested, cert.user):
            exc = AuthFailed(f"X509 user {requested!r} is not the certificate's {cert.user!r}", reason="certificate_wrong_user")
            return _error(AUTHENTICATION_FAILED, AUTH_FAILED_MESSAGE, mechanism=mechanism, user=requested,
                          reason=exc.reason, failure=exc)
        self._finish(mechanism, cert.user, cert)
        return AuthOutcome({"dbname": "$external", "user": requested or cert.user, "ok": 1.0}, mechanism, cert.user,
                           done=True, identity=cert)

    def _finish(self, mechanism: str | None, user: str | None, identity: Identity | None) -> None:
        self.reset()
        self.mechanism, self.user = mechanism, user
        self.identity = identity
        self.authenticated = True
