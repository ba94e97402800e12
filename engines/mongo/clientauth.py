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

The user names recorded here are claims (verified only against the shared
listener password); a later identity layer replaces this class wholesale:
keep it small.  Nothing here ever returns, logs or stores a client password.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Mapping

import attrs
from bson.binary import Binary

from dbproxy.config import SecretRef
from dbproxy.errors import AccessDenied, ProtocolError

from . import scram
from .wire import error_document

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

    @property
    def ok(self) -> bool:
        return bool(self.reply.get("ok"))


def _error(code: int, message: str, **kw: Any) -> AuthOutcome:
    name = {MECHANISM_UNAVAILABLE: "MechanismUnavailable", PROTOCOL_ERROR: "ProtocolError"}.get(code)
    return AuthOutcome(error_document(code, message, code_name=name), **kw)


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
            server_first = server.server_first(first)
            self._server = server
            self._step = 1
            options = body.get("options")
            self._skip_empty = bool(isinstance(options, Mapping) and options.get("skipEmptyExchange"))
            self.mechanism, self.user = mechanism, first.user
            return AuthOutcome(
                {"conversationId": self._conversation_id, "done": False, "payload": Binary(server_first), "ok": 1.0},
                mechanism, first.user,
            )
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
