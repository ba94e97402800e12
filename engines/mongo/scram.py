"""Sans-IO SCRAM-SHA-1 / SCRAM-SHA-256 for MongoDB, both sides (RFC 5802, RFC 7677).

Strategy.  The SCRAM exchange itself is ``dbproxy.scram`` (scramp); this
module adds what is Mongo's: the password digests, the mechanisms' defaults
and the saslStart/saslContinue documents.  No I/O happens here.
``ScramClient`` produces the three client messages for the proxy's own
login to the backend; the engine wraps them in ``saslStart`` /
``saslContinue`` (``sasl_start`` / ``sasl_continue``) and reads the answers
with ``parse_sasl_reply``:

    client = ScramClient("SCRAM-SHA-256", user, password)
    send(sasl_start(client.mechanism, client.client_first(), db=source))
    r = parse_sasl_reply(reply)                 # raises UpstreamError on ok: 0
    send(sasl_continue(r.conversation_id, client.client_final(r.payload), db=source))
    r = parse_sasl_reply(reply)
    client.verify_server_final(r.payload)       # the server proved it knows the key
    while not r.done:                           # servers without skipEmptyExchange
        send(sasl_continue(r.conversation_id, b"", db=source)); r = parse_sasl_reply(reply)

``ScramServer`` answers a client's SCRAM from stored keys (the proxy
authenticating its own users); ``scram_credentials`` derives those keys.
``MONGO_SHA_1`` is the SCRAM-SHA-1 flavour the engine declares for the token
registry (``dbproxy token issue`` records a verifier of Mongo's digest).

MongoDB specifics (mongodb/specifications ``source/auth/auth.md``):
SCRAM-SHA-1 uses ``hex(md5(user + ":mongo:" + password))`` as the password;
SCRAM-SHA-256 uses ``saslprep(password)``; user names are *not* SASLprep'd
(only ``=``/``,`` escaped per RFC 5802 §5.1); no channel binding (``n,,``);
clients refuse an iteration count below 4096.
"""

from __future__ import annotations

import base64
import hashlib
import os
from typing import Any, Mapping

import attrs
from bson.binary import Binary

from dbproxy import scram as core
from dbproxy.errors import AccessDenied, RemoteProtocolError, UpstreamError
from dbproxy.scram import ClientFirst, parse_client_first  # noqa: F401  (re-exported for the engine)

SCRAM_SHA_1 = core.SCRAM_SHA_1
SCRAM_SHA_256 = core.SCRAM_SHA_256
MECHANISMS = (SCRAM_SHA_1, SCRAM_SHA_256)

#: mongod's defaults (scramIterationCount / scramSHA256IterationCount).
DEFAULT_ITERATIONS = {SCRAM_SHA_1: 10_000, SCRAM_SHA_256: 15_000}
#: auth.md: drivers MUST refuse fewer than 4096 iterations (downgrade protection);
#: scramp refuses them too.
MIN_ITERATIONS = 4096
#: A backend asking for more PBKDF2 rounds than this is refused rather than
#: letting it pin a CPU (mongod's defaults are 10k / 15k).
MAX_ITERATIONS = 1_000_000


def _check_mechanism(mechanism: str) -> None:
    if mechanism not in MECHANISMS:
        raise ValueError(f"unsupported SCRAM mechanism {mechanism!r}")


def _nonce() -> bytes:
    return base64.b64encode(os.urandom(24))


def escape_username(user: str) -> bytes:
    """RFC 5802 §5.1 ``saslname``: ``=`` → ``=3D``, ``,`` → ``=2C`` (no SASLprep, per Mongo)."""
    return core.escape_saslname(user).encode("utf-8")


def mongo_digest(user: str, password: str) -> str:
    """auth.md "SCRAM-SHA-1": the password SCRAM hashes is ``hex(md5(user + ":mongo:" + password))``."""
    return hashlib.md5(f"{user}:mongo:{password}".encode("utf-8")).hexdigest()


def mongo_password(mechanism: str, user: str, password: str) -> bytes:
    """The password as SCRAM sees it (auth.md "SCRAM-SHA-1" / "SCRAM-SHA-256")."""
    if mechanism == SCRAM_SHA_1:
        return mongo_digest(user, password).encode("ascii")
    if mechanism == SCRAM_SHA_256:
        from pymongo.saslprep import saslprep

        return saslprep(password).encode("utf-8")
    raise ValueError(f"unsupported SCRAM mechanism {mechanism!r}")


#: The token registry's SCRAM-SHA-1 verifier is of Mongo's digest of the token
#: (declared by ``MongoEngine.scram_flavours``; SCRAM-SHA-256 is the core's plain flavour).
MONGO_SHA_1 = core.ScramFlavour(SCRAM_SHA_1, mongo_digest)


# --- client ----------------------------------------------------------------------


class ScramClient(core.ScramClient):
    """One SCRAM conversation as a client of a Mongo-wire server.  Single use.

    The user name goes out escaped but not SASLprep'd, with no channel
    binding (``n,,``); the password is ``mongo_password``'s.  ``nonce`` is
    for test vectors only; by default 24 random bytes, base64.  Failures
    raise ``UpstreamError(kind="auth")``: the backend misbehaved or could not
    prove it knows the password.
    """

    def __init__(self, mechanism: str, user: str, password: str, nonce: bytes | str | None = None) -> None:
        _check_mechanism(mechanism)
        self.user = user
        super().__init__(
            mechanism, user, mongo_password(mechanism, user, password),
            nonce=nonce if nonce is not None else _nonce(), max_iterations=MAX_ITERATIONS,
        )


# --- saslStart / saslContinue documents --------------------------------------------


def sasl_start(mechanism: str, payload: bytes, *, db: str | None = None) -> dict[str, Any]:
    """``{saslStart: 1, mechanism, payload, autoAuthorize: 1, options: {skipEmptyExchange: true}}``"""
    doc: dict[str, Any] = {
        "saslStart": 1,
        "mechanism": mechanism,
        "payload": Binary(payload),
        "autoAuthorize": 1,
        "options": {"skipEmptyExchange": True},
    }
    if db is not None:
        doc["$db"] = db
    return doc


def sasl_continue(conversation_id: Any, payload: bytes, *, db: str | None = None) -> dict[str, Any]:
    """``{saslContinue: 1, conversationId, payload}``"""
    doc: dict[str, Any] = {"saslContinue": 1, "conversationId": conversation_id, "payload": Binary(payload)}
    if db is not None:
        doc["$db"] = db
    return doc


@attrs.frozen
class SaslReply:
    conversation_id: Any
    payload: bytes = attrs.field(repr=False)
    done: bool


def parse_sasl_reply(doc: Mapping[str, Any]) -> SaslReply:
    """Read a saslStart/saslContinue reply; ``ok: 0`` raises UpstreamError(kind="auth")."""
    if not doc.get("ok"):
        code = doc.get("code")
        raise UpstreamError(
            f"backend refused authentication: {doc.get('errmsg', 'no errmsg')} (code {code})",
            kind="auth",
            client_hint="backend authentication failed",
        )
    payload = doc.get("payload", b"")
    if isinstance(payload, str):  # some servers answer base64 text when asked in text
        payload = base64.b64decode(payload)
    return SaslReply(doc.get("conversationId"), bytes(payload), bool(doc.get("done", False)))


def sasl_reply(conversation_id: Any, payload: bytes, *, done: bool) -> dict[str, Any]:
    """The server-side answer ``{conversationId, done, payload, ok: 1.0}``."""
    return {"conversationId": conversation_id, "done": done, "payload": Binary(payload), "ok": 1.0}


# --- server --------------------------------------------------------------------


ScramCredentials = core.Verifier  # what a server stores for one user and mechanism (never the password)


def scram_credentials(
    mechanism: str,
    user: str,
    password: str,
    *,
    salt: bytes | None = None,
    iterations: int | None = None,
) -> ScramCredentials:
    """Derive StoredKey / ServerKey the way mongod does for ``createUser``."""
    _check_mechanism(mechanism)
    if salt is None:
        salt = os.urandom(16 if mechanism == SCRAM_SHA_1 else 28)
    if iterations is None:
        iterations = DEFAULT_ITERATIONS[mechanism]
    return core.make_verifier(mechanism, mongo_password(mechanism, user, password).decode("utf-8"), salt, iterations)


class ScramServer:
    """One SCRAM conversation as the server (``dbproxy.scram.ScramServer``).  Single use.

    ``server_first(client_first)`` → ``r=…,s=…,i=…``;
    ``server_final(client_final)`` → ``v=<ServerSignature>`` or raises
    ``AccessDenied`` for a wrong proof or nonce (``RemoteProtocolError`` for a
    malformed message or a channel binding that differs from the GS2 header).
    ``user`` is the client's ``n=``; ``authenticated`` is true afterwards.
    """

    def __init__(self, mechanism: str, stored_key: bytes, server_key: bytes, salt: bytes, iterations: int,
                 nonce: bytes | str | None = None) -> None:
        _check_mechanism(mechanism)
        self.mechanism = mechanism
        self.authenticated = False
        verifier = (salt, iterations, [(stored_key, server_key)])
        self._server = core.ScramServer(mechanism, lambda _user: verifier, nonce=nonce if nonce is not None else _nonce())

    def __repr__(self) -> str:
        return f"<ScramServer {self.mechanism} user={self.user!r}>"

    @property
    def user(self) -> str | None:
        return self._server.user

    @classmethod
    def from_credentials(cls, creds: ScramCredentials, **kwargs: Any) -> "ScramServer":
        return cls(creds.mechanism, creds.stored_key, creds.server_key, creds.salt, creds.iterations, **kwargs)

    def server_first(self, client_first: bytes | ClientFirst) -> bytes:
        return self._server.server_first(client_first)

    def server_final(self, client_final: bytes) -> bytes:
        try:
            final = self._server.server_final(client_final)
        except core.ScramFailed as exc:
            if exc.reason == "scram_bad_binding":
                raise RemoteProtocolError(str(exc), client_hint="SCRAM channel binding mismatch") from None
            raise AccessDenied(f"SCRAM {exc.reason.removeprefix('scram_').replace('_', ' ')} for user {self.user!r}",
                               reason="authentication failed") from None
        self.authenticated = True
        return final
