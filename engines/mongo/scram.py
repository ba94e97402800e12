"""Sans-IO SCRAM-SHA-1 / SCRAM-SHA-256 for MongoDB, both sides (RFC 5802, RFC 7677).

Strategy.  The SCRAM arithmetic is a handful of HMACs and one PBKDF2
(``hashlib.pbkdf2_hmac``); no I/O happens here.  ``ScramClient`` produces the
three client messages for the proxy's own login to the backend; the engine
wraps them in ``saslStart`` / ``saslContinue`` (``sasl_start`` /
``sasl_continue``) and reads the answers with ``parse_sasl_reply``:

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

MongoDB specifics (mongodb/specifications ``source/auth/auth.md``):
SCRAM-SHA-1 uses ``hex(md5(user + ":mongo:" + password))`` as the password;
SCRAM-SHA-256 uses ``saslprep(password)``; user names are *not* SASLprep'd
(only ``=``/``,`` escaped per RFC 5802 §5.1); no channel binding (``n,,``);
clients refuse an iteration count below 4096.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from typing import Any, Mapping

import attrs
from bson.binary import Binary

from dbproxy.errors import AccessDenied, RemoteProtocolError, UpstreamError
from dbproxy.scram import ClientFirst, parse_client_first
from dbproxy.scram import parse_attributes as _parse_attributes

SCRAM_SHA_1 = "SCRAM-SHA-1"
SCRAM_SHA_256 = "SCRAM-SHA-256"
MECHANISMS = (SCRAM_SHA_1, SCRAM_SHA_256)

_HASHES = {SCRAM_SHA_1: "sha1", SCRAM_SHA_256: "sha256"}
#: mongod's defaults (scramIterationCount / scramSHA256IterationCount).
DEFAULT_ITERATIONS = {SCRAM_SHA_1: 10_000, SCRAM_SHA_256: 15_000}
MIN_ITERATIONS = 4096
#: A backend asking for more PBKDF2 rounds than this is refused rather than
#: letting it pin a CPU (mongod's defaults are 10k / 15k).
MAX_ITERATIONS = 1_000_000
_GS2_HEADER = b"n,,"
_CHANNEL_BINDING = base64.b64encode(_GS2_HEADER)  # "biws"


def _hash_name(mechanism: str) -> str:
    try:
        return _HASHES[mechanism]
    except KeyError:
        raise ValueError(f"unsupported SCRAM mechanism {mechanism!r}") from None


def _hmac(key: bytes, msg: bytes, hash_name: str) -> bytes:
    return hmac.digest(key, msg, hash_name)


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def _nonce() -> bytes:
    return base64.b64encode(os.urandom(24))


def escape_username(user: str) -> bytes:
    """RFC 5802 §5.1 ``saslname``: ``=`` → ``=3D``, ``,`` → ``=2C`` (no SASLprep, per Mongo)."""
    return user.replace("=", "=3D").replace(",", "=2C").encode("utf-8")


def mongo_password(mechanism: str, user: str, password: str) -> bytes:
    """The password as SCRAM sees it (auth.md "SCRAM-SHA-1" / "SCRAM-SHA-256")."""
    if mechanism == SCRAM_SHA_1:
        return hashlib.md5(f"{user}:mongo:{password}".encode("utf-8")).hexdigest().encode("ascii")
    if mechanism == SCRAM_SHA_256:
        from pymongo.saslprep import saslprep

        return saslprep(password).encode("utf-8")
    raise ValueError(f"unsupported SCRAM mechanism {mechanism!r}")


# --- client ----------------------------------------------------------------------


@attrs.define(eq=False)
class ScramClient:
    """One SCRAM conversation as a client.  Single use.

    ``nonce`` is for test vectors only; by default 24 random bytes, base64.
    Failures raise ``UpstreamError(kind="auth")``: the backend misbehaved or
    could not prove it knows the password.
    """

    mechanism: str
    user: str
    password: str = attrs.field(repr=False)
    nonce: bytes = attrs.field(factory=_nonce, repr=False)
    _hash: str = attrs.field(init=False, repr=False)
    _first_bare: bytes = attrs.field(init=False, default=b"", repr=False)
    _server_signature: bytes = attrs.field(init=False, default=b"", repr=False)

    def __attrs_post_init__(self) -> None:
        self._hash = _hash_name(self.mechanism)
        if isinstance(self.nonce, str):
            self.nonce = self.nonce.encode("ascii")

    def client_first(self) -> bytes:
        """``n,,n=<user>,r=<nonce>``"""
        self._first_bare = b"n=" + escape_username(self.user) + b",r=" + self.nonce
        return _GS2_HEADER + self._first_bare

    def client_final(self, server_first: bytes) -> bytes:
        """``c=biws,r=<nonce>,p=<proof>`` from the server's ``r=…,s=…,i=…``."""
        if not self._first_bare:
            raise RuntimeError("client_first() must be called first")
        server_first = bytes(server_first)
        try:
            attrs_ = _parse_attributes(server_first)
            if b"m" in attrs_:
                raise ValueError("server requires an unsupported SCRAM extension")
            nonce = attrs_[b"r"]
            salt = base64.b64decode(attrs_[b"s"], validate=True)
            iterations = int(attrs_[b"i"])
        except (KeyError, ValueError) as exc:
            raise UpstreamError(f"malformed SCRAM server-first-message: {exc}", kind="auth",
                                client_hint="backend authentication failed") from None
        if not nonce.startswith(self.nonce) or len(nonce) <= len(self.nonce):
            raise UpstreamError("SCRAM server nonce does not extend the client nonce", kind="auth",
                                client_hint="backend authentication failed")
        if not MIN_ITERATIONS <= iterations <= MAX_ITERATIONS:
            # auth.md: drivers MUST error below 4096 (downgrade protection).
            raise UpstreamError(
                f"SCRAM iteration count {iterations} is outside {MIN_ITERATIONS}..{MAX_ITERATIONS}",
                kind="auth",
                client_hint="backend authentication failed",
            )
        salted = hashlib.pbkdf2_hmac(
            self._hash, mongo_password(self.mechanism, self.user, self.password), salt, iterations
        )
        without_proof = b"c=" + _CHANNEL_BINDING + b",r=" + nonce
        auth_message = self._first_bare + b"," + server_first + b"," + without_proof
        client_key = _hmac(salted, b"Client Key", self._hash)
        stored_key = hashlib.new(self._hash, client_key).digest()
        proof = _xor(client_key, _hmac(stored_key, auth_message, self._hash))
        server_key = _hmac(salted, b"Server Key", self._hash)
        self._server_signature = _hmac(server_key, auth_message, self._hash)
        return without_proof + b",p=" + base64.b64encode(proof)

    def verify_server_final(self, server_final: bytes) -> None:
        """Check ``v=<ServerSignature>``; raise UpstreamError on ``e=`` or a wrong signature."""
        if not self._server_signature:
            raise RuntimeError("client_final() must be called first")
        try:
            attrs_ = _parse_attributes(bytes(server_final))
        except ValueError as exc:
            raise UpstreamError(f"malformed SCRAM server-final-message: {exc}", kind="auth",
                                client_hint="backend authentication failed") from None
        if b"e" in attrs_:
            raise UpstreamError(f"SCRAM server error: {attrs_[b'e'].decode('utf-8', 'replace')}", kind="auth",
                                client_hint="backend authentication failed")
        try:
            signature = base64.b64decode(attrs_.get(b"v", b""), validate=True)
        except ValueError:
            signature = b""
        if not hmac.compare_digest(signature, self._server_signature):
            raise UpstreamError("SCRAM server signature mismatch", kind="auth",
                                client_hint="backend authentication failed")


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


@attrs.frozen
class ScramCredentials:
    """What a server stores for one user and mechanism (never the password)."""

    mechanism: str
    salt: bytes = attrs.field(repr=False)
    iterations: int
    stored_key: bytes = attrs.field(repr=False)
    server_key: bytes = attrs.field(repr=False)


def scram_credentials(
    mechanism: str,
    user: str,
    password: str,
    *,
    salt: bytes | None = None,
    iterations: int | None = None,
) -> ScramCredentials:
    """Derive StoredKey / ServerKey the way mongod does for ``createUser``."""
    hash_name = _hash_name(mechanism)
    if salt is None:
        salt = os.urandom(16 if mechanism == SCRAM_SHA_1 else 28)
    if iterations is None:
        iterations = DEFAULT_ITERATIONS[mechanism]
    salted = hashlib.pbkdf2_hmac(hash_name, mongo_password(mechanism, user, password), salt, iterations)
    client_key = _hmac(salted, b"Client Key", hash_name)
    return ScramCredentials(
        mechanism,
        salt,
        iterations,
        hashlib.new(hash_name, client_key).digest(),
        _hmac(salted, b"Server Key", hash_name),
    )


@attrs.define(eq=False)
class ScramServer:
    """One SCRAM conversation as the server.  Single use.

    ``server_first(client_first)`` → ``r=…,s=…,i=…``;
    ``server_final(client_final)`` → ``v=<ServerSignature>`` or raises
    ``AccessDenied`` for a wrong proof (``RemoteProtocolError`` for a
    malformed message).  ``authenticated`` is true afterwards.
    """

    mechanism: str
    stored_key: bytes = attrs.field(repr=False)
    server_key: bytes = attrs.field(repr=False)
    salt: bytes = attrs.field(repr=False)
    iterations: int
    nonce: bytes = attrs.field(factory=_nonce, repr=False)
    user: str | None = None
    authenticated: bool = False
    _hash: str = attrs.field(init=False, repr=False)
    _client_first: ClientFirst | None = attrs.field(init=False, default=None, repr=False)
    _server_first: bytes = attrs.field(init=False, default=b"", repr=False)

    def __attrs_post_init__(self) -> None:
        self._hash = _hash_name(self.mechanism)

    @classmethod
    def from_credentials(cls, creds: ScramCredentials, **kwargs: Any) -> "ScramServer":
        return cls(creds.mechanism, creds.stored_key, creds.server_key, creds.salt, creds.iterations, **kwargs)

    def server_first(self, client_first: bytes | ClientFirst) -> bytes:
        first = client_first if isinstance(client_first, ClientFirst) else parse_client_first(client_first)
        self._client_first = first
        self.user = first.user
        self._server_first = (
            b"r=" + first.nonce + self.nonce
            + b",s=" + base64.b64encode(self.salt)
            + b",i=" + str(self.iterations).encode("ascii")
        )
        return self._server_first

    def server_final(self, client_final: bytes) -> bytes:
        first = self._client_first
        if first is None:
            raise RuntimeError("server_first() must be called first")
        client_final = bytes(client_final)
        without_proof, sep, proof_attr = client_final.rpartition(b",")
        try:
            if not sep or not proof_attr.startswith(b"p="):
                raise ValueError("missing proof")
            attrs_ = _parse_attributes(without_proof)
            proof = base64.b64decode(proof_attr[2:], validate=True)
            channel = base64.b64decode(attrs_[b"c"], validate=True)
            nonce = attrs_[b"r"]
        except (KeyError, ValueError) as exc:
            raise RemoteProtocolError(f"malformed SCRAM client-final-message: {exc}",
                                      client_hint="malformed SCRAM client-final-message") from None
        if channel != first.gs2_header:
            raise RemoteProtocolError("SCRAM channel binding does not match the GS2 header",
                                      client_hint="SCRAM channel binding mismatch")
        if nonce != first.nonce + self.nonce:
            raise AccessDenied("SCRAM nonce mismatch", reason="authentication failed")
        auth_message = first.bare + b"," + self._server_first + b"," + without_proof
        signature = _hmac(self.stored_key, auth_message, self._hash)
        if len(proof) != len(signature):
            raise AccessDenied("SCRAM proof has the wrong length", reason="authentication failed")
        client_key = _xor(proof, signature)
        if not hmac.compare_digest(hashlib.new(self._hash, client_key).digest(), self.stored_key):
            raise AccessDenied(f"SCRAM proof mismatch for user {first.user!r}", reason="authentication failed")
        self.authenticated = True
        return b"v=" + base64.b64encode(_hmac(self.server_key, auth_message, self._hash))
