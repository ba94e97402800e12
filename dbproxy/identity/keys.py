"""Token keys: one key and the one JWS algorithm it is for, and their text forms.

Strategy: PyJWT's algorithm objects do the signing (``EdDSA`` = Ed25519, RFC
8037; ``HS256``); ``cryptography`` loads the PEM files.  The algorithm is
pinned per key, so a token can never choose it (RFC 8725 §3.1).  The same
key signs the token registry's entries (``registry.py``).  ``b64url`` is
RFC 7515 §2's unpadded base64url, used by every file this package writes.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import secrets
from typing import Any

import jwt

from .config import ALGORITHMS, TokenConfig

MIN_HMAC_KEY_BYTES = 32


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str | bytes) -> bytes:
    if isinstance(text, str):
        text = text.encode("ascii")
    if not re.fullmatch(rb"[A-Za-z0-9_-]*", text) or len(text) % 4 == 1:
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + b"=" * (-len(text) % 4))


class TokenKeys:
    """One key and the one algorithm it is for (PyJWT's algorithm object, pinned here).

    ``sign`` needs the private key (EdDSA) or the secret (HS256); a proxy
    configured with only an Ed25519 public key can verify but not issue.
    ``key_id`` (the tokens' ``kid``) is a fingerprint of the key: a SHA-256
    of the secret (with a context prefix) or of the raw public key.
    """

    def __init__(self, algorithm: str, *, secret: bytes | None = None, private_key: Any = None, public_key: Any = None) -> None:
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unsupported algorithm {algorithm!r}")
        self.algorithm = algorithm
        self._jws_alg = jwt.get_algorithm_by_name(algorithm)
        self._secret = secret
        self._private = private_key
        self._public = public_key
        if algorithm == "HS256":
            if not secret or len(secret) < MIN_HMAC_KEY_BYTES:
                raise ValueError(f"an HS256 key of at least {MIN_HMAC_KEY_BYTES} bytes")
            try:
                # PyJWT refuses a PEM/SSH public key as an HMAC secret (the classic confusion).
                self._secret = self._jws_alg.prepare_key(secret)
            except jwt.InvalidKeyError as exc:
                raise ValueError(f"not an HS256 secret: {exc}") from None
            self.key_id = hashlib.sha256(b"dbproxy-kid\0" + secret).hexdigest()[:16]
        elif algorithm == "EdDSA":
            if public_key is None and private_key is not None:
                self._public = private_key.public_key()
            if self._public is None:
                raise ValueError("an Ed25519 public or private key")
            from cryptography.hazmat.primitives import serialization

            raw = self._public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            self.key_id = hashlib.sha256(raw).hexdigest()[:16]

    @classmethod
    def from_config(cls, cfg: TokenConfig, *, need_signing: bool = False) -> "TokenKeys":
        if cfg.algorithm == "HS256":
            assert cfg.key_file
            return cls("HS256", secret=_read_secret(cfg.key_file))
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

        private = public = None
        if cfg.key_file and (need_signing or os.path.exists(cfg.key_file)):
            with open(cfg.key_file, "rb") as f:
                private = serialization.load_pem_private_key(f.read(), None)
            if not isinstance(private, Ed25519PrivateKey):
                raise ValueError(f"{cfg.key_file}: not an Ed25519 private key")
        if cfg.public_key_file:
            with open(cfg.public_key_file, "rb") as f:
                public = serialization.load_pem_public_key(f.read())
            if not isinstance(public, Ed25519PublicKey):
                raise ValueError(f"{cfg.public_key_file}: not an Ed25519 public key")
        if need_signing and private is None:
            raise ValueError("issuing EdDSA tokens needs identity.token.key_file (the Ed25519 private key)")
        keys = cls("EdDSA", private_key=private, public_key=public)
        if private is not None and public is not None:
            from cryptography.hazmat.primitives import serialization as s

            raw = lambda k: k.public_bytes(s.Encoding.Raw, s.PublicFormat.Raw)  # noqa: E731
            if raw(private.public_key()) != raw(public):
                raise ValueError("identity.token.key_file and public_key_file are not a key pair")
        return keys

    @property
    def can_sign(self) -> bool:
        return self._secret is not None or self._private is not None

    @property
    def signing_key(self) -> Any:
        key = self._secret if self.algorithm == "HS256" else self._private
        if key is None:
            raise ValueError("no private key to sign with")
        return key

    @property
    def verifying_key(self) -> Any:
        return self._secret if self.algorithm == "HS256" else self._public

    def sign(self, data: bytes) -> bytes:
        """A raw signature of ``data`` (registry entries): HMAC-SHA256 or Ed25519, by PyJWT's algorithm."""
        return self._jws_alg.sign(data, self.signing_key)

    def verify(self, data: bytes, signature: bytes) -> bool:
        return bool(self._jws_alg.verify(data, self.verifying_key, signature))


def _read_secret(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read().strip()


def generate_keys(algorithm: str, key_file: str, public_key_file: str | None = None) -> None:
    """Write a fresh key: HS256 → 32 random bytes as base64url text; EdDSA → PEM pair."""
    def write(path: str, data: bytes, mode: int) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)

    if algorithm == "HS256":
        write(key_file, b64url(secrets.token_bytes(32)).encode("ascii") + b"\n", 0o600)
        return
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if not public_key_file:
        raise ValueError("EdDSA needs a public key file too")
    key = Ed25519PrivateKey.generate()
    write(key_file, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), 0o600)
    write(public_key_file, key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo), 0o644)
