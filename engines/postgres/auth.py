"""Client-side PostgreSQL authentication computations (pure, no I/O).

The proxy authenticates to the backend itself.  This module computes what
the client side of each method sends; the engine moves the bytes with the
codec (AuthenticationSASL* → ``encode_sasl_initial`` / ``encode_sasl_response``).

- MD5 (protocol docs §55.2.1, AuthenticationMD5Password):
  ``"md5" + hex(md5(hex(md5(password + user)) + salt))``.
- SCRAM-SHA-256 and SCRAM-SHA-256-PLUS (§55.3; RFC 5802, RFC 7677) as a
  sans-IO state machine: ``client_first()`` → ``client_final(server_first)``
  → ``verify_server_final(server_final)``.  PostgreSQL ignores the SCRAM
  user name (it uses the startup packet's), so it is sent empty by default,
  as libpq does.
- Channel binding ``tls-server-end-point`` (RFC 5929 §4.1): the hash of the
  server's certificate with the certificate's signature hash algorithm,
  MD5 and SHA-1 replaced by SHA-256.
- Passwords are SASLprep'ed (RFC 4013) the way PostgreSQL does it: pure
  ASCII is used as is, and a password that is not valid UTF-8 or that
  SASLprep rejects is used as raw bytes (src/common/saslprep.c, libpq's
  fe-auth-scram.c), so the proxy derives the same keys the server stored.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from pymongo.saslprep import saslprep

from dbproxy.errors import LocalProtocolError, UpstreamError

SCRAM_SHA_256 = "SCRAM-SHA-256"
SCRAM_SHA_256_PLUS = "SCRAM-SHA-256-PLUS"

# A hostile server could ask for an absurd PBKDF2 iteration count to pin a CPU.
DEFAULT_MAX_ITERATIONS = 1_000_000


def md5_password(user: str | bytes, password: str | bytes, salt: bytes) -> bytes:
    """The PasswordMessage payload answering AuthenticationMD5Password."""
    if isinstance(user, str):
        user = user.encode("utf-8")
    if isinstance(password, str):
        password = password.encode("utf-8")
    inner = hashlib.md5(password + user).hexdigest().encode("ascii")
    return b"md5" + hashlib.md5(inner + salt).hexdigest().encode("ascii")


def normalize_password(password: str | bytes) -> bytes:
    """SASLprep a password as PostgreSQL does, falling back to the raw bytes."""
    if isinstance(password, bytes):
        try:
            text = password.decode("utf-8")
        except UnicodeDecodeError:
            return password
        raw = password
    else:
        text = password
        raw = password.encode("utf-8", "surrogateescape")
    if text.isascii() or not text:
        return raw
    try:
        return saslprep(text).encode("utf-8")
    except ValueError:
        return raw


def tls_server_end_point(cert_der: bytes) -> bytes:
    """Channel-binding data for ``tls-server-end-point`` (RFC 5929 §4.1).

    Raises ValueError when the certificate's signature has no single hash
    algorithm (e.g. Ed25519); PostgreSQL cannot do channel binding then either.
    """
    cert = x509.load_der_x509_certificate(cert_der)
    algo = cert.signature_hash_algorithm
    if algo is None:
        raise ValueError("certificate signature algorithm has no hash: no tls-server-end-point binding")
    if isinstance(algo, (hashes.MD5, hashes.SHA1)):
        algo = hashes.SHA256()
    h = hashes.Hash(algo)
    h.update(cert_der)
    return h.finalize()


def _auth_failed(detail: str) -> UpstreamError:
    return UpstreamError(f"SCRAM authentication with the backend failed: {detail}",
                         kind="auth", client_hint="backend authentication failed")


def _escape_saslname(name: str) -> str:
    # RFC 5802 §5.1: ',' and '=' in a user name are sent as =2C and =3D.
    return name.replace("=", "=3D").replace(",", "=2C")


def _parse_attributes(msg: bytes, what: str) -> dict[str, str]:
    try:
        text = msg.decode("ascii")
    except UnicodeDecodeError:
        raise _auth_failed(f"{what} is not ASCII") from None
    attrs: dict[str, str] = {}
    for part in text.split(","):
        if len(part) < 2 or part[1] != "=":
            raise _auth_failed(f"malformed attribute in {what}")
        attrs.setdefault(part[0], part[2:])
    return attrs


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


class ScramClient:
    """Client side of SCRAM-SHA-256(-PLUS), one exchange per instance.

    ``channel_binding``: the ``tls_server_end_point`` data of the backend's
    certificate to use SCRAM-SHA-256-PLUS, or None for SCRAM-SHA-256.
    ``binding_supported``: without binding data, send gs2 flag ``y`` (the
    client could bind but the server did not offer -PLUS over TLS) instead
    of ``n``.  ``username`` and ``nonce`` exist for test vectors.
    """

    def __init__(
        self,
        password: str | bytes,
        channel_binding: bytes | None = None,
        *,
        binding_supported: bool = False,
        username: str = "",
        nonce: str | None = None,
        max_iterations: int = DEFAULT_MAX_ITERATIONS,
    ) -> None:
        self._password = normalize_password(password)
        self._cb_data = channel_binding
        if channel_binding is not None:
            self.mechanism = SCRAM_SHA_256_PLUS
            self._gs2_header = b"p=tls-server-end-point,,"
        else:
            self.mechanism = SCRAM_SHA_256
            self._gs2_header = b"y,," if binding_supported else b"n,,"
        # libpq sends 18 random bytes in base64; printable, no ','.
        self._nonce = nonce if nonce is not None else base64.b64encode(secrets.token_bytes(18)).decode("ascii")
        self._first_bare = f"n={_escape_saslname(username)},r={self._nonce}".encode("utf-8")
        self._max_iterations = max_iterations
        self._server_signature: bytes | None = None
        self._state = "start"

    def client_first(self) -> bytes:
        """client-first-message: the SASLInitialResponse data."""
        if self._state != "start":
            raise LocalProtocolError("client_first() called twice")
        self._state = "first-sent"
        return self._gs2_header + self._first_bare

    def client_final(self, server_first: bytes) -> bytes:
        """client-final-message (the SASLResponse data) for AuthenticationSASLContinue's data."""
        if self._state != "first-sent":
            raise LocalProtocolError("client_final() before client_first() or twice")
        self._state = "final-sent"
        attrs = _parse_attributes(bytes(server_first), "server-first-message")
        if "m" in attrs:
            raise _auth_failed("server requires an unsupported SCRAM extension")
        try:
            nonce, salt_b64, iters = attrs["r"], attrs["s"], attrs["i"]
        except KeyError as exc:
            raise _auth_failed(f"server-first-message lacks {exc.args[0]!r}") from None
        if not nonce.startswith(self._nonce) or len(nonce) <= len(self._nonce):
            raise _auth_failed("server nonce does not extend the client nonce")
        try:
            salt = base64.b64decode(salt_b64, validate=True)
            iterations = int(iters)
        except ValueError:
            raise _auth_failed("malformed salt or iteration count") from None
        if not salt or not 1 <= iterations <= self._max_iterations:
            raise _auth_failed(f"unacceptable salt or iteration count {iterations}")

        cbind = self._gs2_header + (self._cb_data or b"")
        without_proof = b"c=" + base64.b64encode(cbind) + b",r=" + nonce.encode("ascii")
        auth_message = self._first_bare + b"," + bytes(server_first) + b"," + without_proof

        salted = hashlib.pbkdf2_hmac("sha256", self._password, salt, iterations)
        client_key = _hmac(salted, b"Client Key")
        stored_key = hashlib.sha256(client_key).digest()
        signature = _hmac(stored_key, auth_message)
        proof = (int.from_bytes(client_key, "big") ^ int.from_bytes(signature, "big")).to_bytes(32, "big")
        self._server_signature = _hmac(_hmac(salted, b"Server Key"), auth_message)
        return without_proof + b",p=" + base64.b64encode(proof)

    def verify_server_final(self, server_final: bytes) -> None:
        """Check AuthenticationSASLFinal's data; raises UpstreamError(kind="auth") on mismatch."""
        if self._state != "final-sent" or self._server_signature is None:
            raise LocalProtocolError("verify_server_final() before client_final()")
        self._state = "done"
        attrs = _parse_attributes(bytes(server_final), "server-final-message")
        if "e" in attrs:
            raise _auth_failed(f"server reported {attrs['e']!r}")
        try:
            verifier = base64.b64decode(attrs["v"], validate=True)
        except (KeyError, ValueError):
            raise _auth_failed("server-final-message lacks a valid verifier") from None
        if not hmac.compare_digest(verifier, self._server_signature):
            raise _auth_failed("server signature mismatch")
