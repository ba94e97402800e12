"""Client-side PostgreSQL authentication computations (pure, no I/O).

The proxy authenticates to the backend itself.  This module computes what
the client side of each method sends; the engine moves the bytes with the
codec (AuthenticationSASL* → ``encode_sasl_initial`` / ``encode_sasl_response``).

- MD5 (protocol docs §55.2.1, AuthenticationMD5Password):
  ``"md5" + hex(md5(hex(md5(password + user)) + salt))``.
- SCRAM-SHA-256 and SCRAM-SHA-256-PLUS (§55.3; RFC 5802, RFC 7677) through
  the core's SCRAM layer (``dbproxy.scram``, over scramp), sans-IO:
  ``client_first()`` → ``client_final(server_first)`` →
  ``verify_server_final(server_final)``.  PostgreSQL ignores the SCRAM user
  name (it uses the startup packet's), so it is sent empty by default, as
  libpq does.  A backend asking for fewer than 4096 iterations (possible
  with PostgreSQL 16's ``scram_iterations``) or more than 1,000,000 is refused.
- Channel binding ``tls-server-end-point`` (RFC 5929 §4.1): the hash of the
  server's certificate with the certificate's signature hash algorithm,
  MD5 and SHA-1 replaced by SHA-256.  Computed here from the certificate's
  DER and handed to scramp as bytes: scramp reads certificates only from an
  ``ssl.SSLSocket``/``SSLObject``, which a trio ``SSLStream`` does not expose.
- Passwords are SASLprep'ed (RFC 4013) the way PostgreSQL does it: pure
  ASCII is used as is, and a password that is not valid UTF-8 or that
  SASLprep rejects is used as raw bytes (src/common/saslprep.c, libpq's
  fe-auth-scram.c), so the proxy derives the same keys the server stored.
"""

from __future__ import annotations

import hashlib

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from pymongo.saslprep import saslprep

from dbproxy import scram
from dbproxy.scram import DEFAULT_MAX_ITERATIONS, SCRAM_SHA_256

SCRAM_SHA_256_PLUS = "SCRAM-SHA-256-PLUS"


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


class ScramClient(scram.ScramClient):
    """Client side of SCRAM-SHA-256(-PLUS), one exchange per instance (``dbproxy.scram`` over scramp).

    ``channel_binding``: the ``tls_server_end_point`` data of the backend's
    certificate to use SCRAM-SHA-256-PLUS, or None for SCRAM-SHA-256.
    ``binding_supported``: without binding data, send gs2 flag ``y`` (the
    client could bind but the server did not offer -PLUS over TLS) instead
    of ``n``.  The password is prepared as PostgreSQL does
    (``normalize_password``); the SCRAM user name is empty, as libpq sends
    it.  ``username`` and ``nonce`` exist for test vectors.
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
        super().__init__(
            SCRAM_SHA_256,
            username,
            normalize_password(password),
            channel_binding=channel_binding,
            binding_supported=binding_supported,
            nonce=nonce,
            max_iterations=max_iterations,
        )
