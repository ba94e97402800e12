"""Who is connecting: signed tokens, SCRAM verifiers for tokens, mTLS identities.

Strategy.  A person proves who they are to the proxy with a **short-lived
signed token used as the password** of their stock client, or with a client
certificate (mTLS).  Engines never parse tokens or certificates themselves:
they call one ``ClientAuthenticator`` (one per listener, built by
``dbproxy.access``) and get a ``dbproxy.session.Identity`` or an
``AuthFailed`` whose ``reason`` goes to the audit trail (never the token).

Tokens are JWTs (RFC 7519, compact JWS RFC 7515): ``base64url(header) .
base64url(claims) . base64url(signature)`` with ``alg`` ``EdDSA`` (Ed25519,
RFC 8037) or ``HS256``.  Claims: ``sub`` (user), ``roles``, ``iat``, ``exp``,
``jti`` (token id), ``iss``.  Only the configured algorithm is accepted (no
``none``, no algorithm confusion).  Refused: bad shape, bad signature,
expired, issued in the future, ``sub`` ≠ the user the client logged in as,
``jti`` in the revocation file (re-read whenever it changes).

SCRAM.  In SCRAM (Postgres SCRAM-SHA-256, Mongo SCRAM-SHA-1/-256) the proxy
never sees the password, so it needs a verifier it can derive.  ``token
issue`` therefore also writes the token's SCRAM verifier — salt, iteration
count, StoredKey, ServerKey (RFC 5802 §3), never the token — to the
*token registry* file, keyed by token id, with the claims.  Every registry
entry is signed with the token key (so nobody who can write the file but
does not hold the key can grant themselves roles).  All active tokens of a
user share one salt per mechanism, because the salt goes out in the
server-first message before the client's proof says which token it used.
When the proof arrives, ``ScramTokenServer`` tests each of the user's active
tokens: ``ClientKey = proof XOR HMAC(StoredKey, AuthMessage)``; the token
whose ``H(ClientKey) == StoredKey`` is the one used, and the proxy answers
with that token's ServerSignature.  The SCRAM-SHA-256 verifier serves
Postgres and Mongo alike (an ASCII token is its own SASLprep); Mongo's
SCRAM-SHA-1 uses ``hex(md5(user + ":mongo:" + token))`` as the password, so
the registry holds a separate SHA-1 verifier for it.  An unknown user gets a
stable fake salt (PostgreSQL's mock authentication) and fails at the proof.

mTLS.  The listener's TLS context verifies the chain against
``client_ca_file``; identity is the verified certificate's subject CN or its
first SAN URI (``identity.mtls.subject``), roles come from the config
(``identity.mtls.users``: subject glob → roles).
"""

from __future__ import annotations

import base64
import fcntl
import fnmatch
import hashlib
import hmac
import logging
import os
import re
import secrets
import time
from typing import Any, Iterable

import attrs
import orjson

from .errors import AccessDenied, RemoteProtocolError
from .scram import parse_attributes as _parse_attributes
from .scram import parse_client_first
from .session import Identity

log = logging.getLogger("dbproxy.identity")

ALGORITHMS = ("EdDSA", "HS256")
SCRAM_SHA_256 = "SCRAM-SHA-256"
SCRAM_SHA_1 = "SCRAM-SHA-1"
SCRAM_MECHANISMS = (SCRAM_SHA_256, SCRAM_SHA_1)
_SCRAM_HASH = {SCRAM_SHA_256: "sha256", SCRAM_SHA_1: "sha1"}
#: Tokens carry 256+ bits of signature: the iteration count protects nothing
#: here, but Mongo drivers refuse fewer than 4096 (auth spec) and libpq's
#: default is 4096.
SCRAM_ITERATIONS = 4096
DEFAULT_MAX_TTL = 24 * 3600
DEFAULT_LEEWAY = 30
MAX_TOKEN_BYTES = 4096
MIN_HMAC_KEY_BYTES = 32
_ENTRY_CONTEXT = b"dbproxy-scram-verifier-v1\0"


# --------------------------------------------------------------------------- errors


class AuthFailed(AccessDenied):
    """A client could not prove who it is.

    ``reason`` is a short code for the audit trail (``token_expired``,
    ``token_bad_signature``, ``token_revoked``, ``token_wrong_user``,
    ``token_malformed``, ``scram_no_match``, ``certificate_missing``,
    ``method_unavailable`` …); ``str(exc)`` adds detail for the log.  Neither
    ever holds the token.  ``token_id`` is set when a correctly signed token
    was refused (expired, revoked, other user), for forensics.
    """

    def __init__(self, message: str, *, reason: str, token_id: str | None = None) -> None:
        super().__init__(message, reason=reason)
        self.token_id = token_id


# --------------------------------------------------------------------------- config


@attrs.frozen
class TokenConfig:
    algorithm: str
    key_file: str | None  # HS256: the shared secret; EdDSA: the private key (only `token issue` needs it)
    public_key_file: str | None  # EdDSA: what the proxy verifies with
    registry_file: str | None
    revocation_file: str | None
    issuer: str = "dbproxy"
    max_ttl: int = DEFAULT_MAX_TTL
    leeway: int = DEFAULT_LEEWAY


@attrs.frozen
class MtlsConfig:
    subject: str = "cn"  # or "san_uri"
    users: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (subject glob, roles), in config order

    def roles_for(self, subject: str) -> tuple[str, ...]:
        roles: list[str] = []
        for pattern, granted in self.users:
            if fnmatch.fnmatchcase(subject, pattern):
                roles.extend(r for r in granted if r not in roles)
        return tuple(roles)


@attrs.frozen
class IdentityConfig:
    token: TokenConfig | None = None
    mtls: MtlsConfig | None = None


IDENTITY_KEYS = {"token", "mtls"}
TOKEN_KEYS = {"algorithm", "key_file", "public_key_file", "registry_file", "revocation_file", "issuer", "max_ttl_seconds", "leeway_seconds"}
MTLS_KEYS = {"subject", "users"}


def validate_identity(v: Any, raw: Any, path: str = "identity") -> IdentityConfig | None:
    """The ``identity`` section (``v`` is ``dbproxy.config._Validator``)."""
    d = v.obj(raw, path)
    if d is None:
        return None
    v.unknown_keys(d, IDENTITY_KEYS, path)
    token = mtls = None
    if "token" in d:
        token = _validate_token(v, d["token"], f"{path}.token")
    if "mtls" in d:
        mtls = _validate_mtls(v, d["mtls"], f"{path}.mtls")
    if "token" not in d and "mtls" not in d:
        v.err(path, "\"token\" and/or \"mtls\"")
    return IdentityConfig(token=token, mtls=mtls)


def _validate_token(v: Any, raw: Any, path: str) -> TokenConfig | None:
    d = v.obj(raw, path)
    if d is None:
        return None
    v.unknown_keys(d, TOKEN_KEYS, path)
    for inline in ("key", "secret", "private_key", "public_key"):
        if inline in d:
            v.err(f"{path}.{inline}", "no inline key: name a file with \"key_file\" / \"public_key_file\"")
    alg = v.string(d, "algorithm", path, choices=ALGORITHMS)
    key_file = public_key_file = None
    if alg == "HS256":
        key_file = v.file_path(d, "key_file", path)
        if key_file and _world_accessible(key_file):
            v.err(f"{path}.key_file", f"a key file others cannot read ({key_file} is world-accessible: chmod 600)")
        if "public_key_file" in d:
            v.err(f"{path}.public_key_file", "no public key for HS256 (one shared secret in \"key_file\")")
    elif alg == "EdDSA":
        public_key_file = v.file_path(d, "public_key_file", path)
        # The private key is needed by `dbproxy token issue` only; the proxy may run without it.
        key_file = v.file_path(d, "key_file", path, required=False, must_exist=False)
        if key_file and os.path.exists(key_file) and _world_accessible(key_file):
            v.err(f"{path}.key_file", f"a key file others cannot read ({key_file} is world-accessible: chmod 600)")
    registry = v.file_path(d, "registry_file", path, required=False, must_exist=False)
    revocation = v.file_path(d, "revocation_file", path, required=False, must_exist=False)
    issuer = v.string(d, "issuer", path, required=False) or "dbproxy"
    max_ttl = v.integer(d, "max_ttl_seconds", path, minimum=1) or DEFAULT_MAX_TTL
    leeway = v.integer(d, "leeway_seconds", path, minimum=0)
    if alg is None:
        return None
    return TokenConfig(
        algorithm=alg,
        key_file=key_file,
        public_key_file=public_key_file,
        registry_file=registry,
        revocation_file=revocation,
        issuer=issuer,
        max_ttl=max_ttl,
        leeway=DEFAULT_LEEWAY if leeway is None else leeway,
    )


def _validate_mtls(v: Any, raw: Any, path: str) -> MtlsConfig | None:
    d = v.obj(raw, path)
    if d is None:
        return None
    v.unknown_keys(d, MTLS_KEYS, path)
    subject = v.string(d, "subject", path, required=False, choices=("cn", "san_uri")) or "cn"
    users: list[tuple[str, tuple[str, ...]]] = []
    raw_users = d.get("users", {})
    ud = v.obj(raw_users, f"{path}.users", "an object of subject glob → array of role names")
    for pattern, roles in (ud or {}).items():
        if not isinstance(roles, list) or not all(isinstance(r, str) and r for r in roles):
            v.err(f"{path}.users.{pattern}", "an array of role names")
            continue
        users.append((pattern, tuple(roles)))
    return MtlsConfig(subject=subject, users=tuple(users))


def _world_accessible(path: str) -> bool:
    try:
        return bool(os.stat(path).st_mode & 0o007)
    except OSError:
        return False


# --------------------------------------------------------------------------- helpers


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str | bytes) -> bytes:
    if isinstance(text, str):
        text = text.encode("ascii")
    if not re.fullmatch(rb"[A-Za-z0-9_-]*", text) or len(text) % 4 == 1:
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + b"=" * (-len(text) % 4))


_TTL = re.compile(r"^\s*(\d+)\s*([smhdw]?)\s*$")
_TTL_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_ttl(text: str) -> int:
    """``"90"`` / ``"90s"`` / ``"30m"`` / ``"8h"`` / ``"1d"`` → seconds."""
    m = _TTL.match(text)
    if not m or int(m.group(1)) <= 0:
        raise ValueError(f"a duration like 30m, 8h or 1d, got {text!r}")
    return int(m.group(1)) * _TTL_UNITS[m.group(2)]


def _canonical(obj: Any) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)


# --------------------------------------------------------------------------- keys


class TokenKeys:
    """The signing and verifying half of the configured algorithm.

    ``sign`` needs the private key (EdDSA) or the secret (HS256); a proxy
    configured with only an Ed25519 public key can verify but not issue.
    """

    def __init__(self, algorithm: str, *, secret: bytes | None = None, private_key: Any = None, public_key: Any = None) -> None:
        self.algorithm = algorithm
        self._secret = secret
        self._private = private_key
        self._public = public_key
        if algorithm == "HS256":
            if not secret or len(secret) < MIN_HMAC_KEY_BYTES:
                raise ValueError(f"an HS256 key of at least {MIN_HMAC_KEY_BYTES} bytes")
            self.key_id = hashlib.sha256(b"dbproxy-kid\0" + secret).hexdigest()[:16]
        elif algorithm == "EdDSA":
            if public_key is None and private_key is not None:
                self._public = private_key.public_key()
            if self._public is None:
                raise ValueError("an Ed25519 public or private key")
            from cryptography.hazmat.primitives import serialization

            raw = self._public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            self.key_id = hashlib.sha256(raw).hexdigest()[:16]
        else:
            raise ValueError(f"unsupported algorithm {algorithm!r}")

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

    def sign(self, data: bytes) -> bytes:
        if self.algorithm == "HS256":
            assert self._secret is not None
            return hmac.digest(self._secret, data, "sha256")
        if self._private is None:
            raise ValueError("no private key to sign with")
        return self._private.sign(data)

    def verify(self, data: bytes, signature: bytes) -> bool:
        if self.algorithm == "HS256":
            assert self._secret is not None
            return hmac.compare_digest(hmac.digest(self._secret, data, "sha256"), signature)
        from cryptography.exceptions import InvalidSignature

        try:
            self._public.verify(signature, data)
        except InvalidSignature:
            return False
        return True


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


# --------------------------------------------------------------------------- tokens


@attrs.frozen
class TokenClaims:
    sub: str
    roles: tuple[str, ...]
    iat: int
    exp: int
    jti: str
    iss: str | None = None

    def to_json(self) -> dict:
        out = {"iss": self.iss, "sub": self.sub, "roles": list(self.roles), "iat": self.iat, "exp": self.exp, "jti": self.jti}
        if self.iss is None:
            del out["iss"]
        return out


def looks_like_token(text: str) -> bool:
    return text.count(".") == 2 and len(text) > 20


class TokenCodec:
    """Sign and verify JWTs with one key; knows nothing of users or files."""

    def __init__(self, keys: TokenKeys, *, issuer: str | None = "dbproxy", leeway: int = DEFAULT_LEEWAY) -> None:
        self.keys = keys
        self.issuer = issuer
        self.leeway = leeway
        self._header = b64url(_canonical({"alg": keys.algorithm, "kid": keys.key_id, "typ": "JWT"}))

    def issue(self, user: str, roles: Iterable[str], ttl: int, *, now: float | None = None, jti: str | None = None) -> tuple[str, TokenClaims]:
        iat = int(time.time() if now is None else now)
        claims = TokenClaims(
            sub=user, roles=tuple(roles), iat=iat, exp=iat + int(ttl),
            jti=jti or secrets.token_urlsafe(12), iss=self.issuer,
        )
        signing_input = f"{self._header}.{b64url(_canonical(claims.to_json()))}"
        signature = self.keys.sign(signing_input.encode("ascii"))
        return f"{signing_input}.{b64url(signature)}", claims

    def decode(self, token: str | bytes) -> TokenClaims:
        """Check shape, algorithm and signature; return the claims (not yet expiry/user/revocation)."""
        if isinstance(token, bytes):
            try:
                token = token.decode("ascii")
            except UnicodeDecodeError:
                raise AuthFailed("password is not a token (not ASCII)", reason="token_malformed") from None
        if len(token) > MAX_TOKEN_BYTES or token.count(".") != 2:
            raise AuthFailed("password is not a token", reason="token_malformed")
        head_b64, body_b64, sig_b64 = token.split(".")
        try:
            header = orjson.loads(b64url_decode(head_b64))
            body = orjson.loads(b64url_decode(body_b64))
            signature = b64url_decode(sig_b64)
        except (ValueError, orjson.JSONDecodeError):
            raise AuthFailed("token is not base64url JSON", reason="token_malformed") from None
        if not isinstance(header, dict) or not isinstance(body, dict):
            raise AuthFailed("token header/claims are not objects", reason="token_malformed")
        if header.get("alg") != self.keys.algorithm:
            # RFC 8725 §3.1: accept only the algorithm the key is for.
            raise AuthFailed(f"token algorithm {str(header.get('alg'))[:16]!r} is not {self.keys.algorithm}", reason="token_bad_signature")
        if not self.keys.verify(f"{head_b64}.{body_b64}".encode("ascii"), signature):
            raise AuthFailed("token signature does not verify", reason="token_bad_signature")
        try:
            claims = TokenClaims(
                sub=_str(body["sub"]), roles=tuple(_str(r) for r in body.get("roles", [])),
                iat=_int(body["iat"]), exp=_int(body["exp"]), jti=_str(body["jti"]), iss=body.get("iss"),
            )
        except (KeyError, TypeError, ValueError):
            raise AuthFailed("token lacks sub/iat/exp/jti", reason="token_malformed") from None
        if self.issuer is not None and claims.iss != self.issuer:
            raise AuthFailed(f"token issuer is not {self.issuer!r}", reason="token_bad_issuer", token_id=claims.jti)
        return claims

    def check_time(self, claims: TokenClaims, now: float | None = None) -> None:
        now = time.time() if now is None else now
        if now >= claims.exp + self.leeway:
            raise AuthFailed(f"token {claims.jti} of {claims.sub!r} expired", reason="token_expired", token_id=claims.jti)
        if claims.iat > now + self.leeway:
            raise AuthFailed(f"token {claims.jti} of {claims.sub!r} is issued in the future", reason="token_not_yet_valid", token_id=claims.jti)


def _str(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError("not a string")
    return value


def _int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError("not an integer")
    return value


# --------------------------------------------------------------------------- files re-read on change


class _WatchedFile:
    """A file parsed again only when its (inode, size, mtime) changes; a missing file is empty."""

    def __init__(self, path: str | None, parse: Any, empty: Any) -> None:
        self.path = path
        self._parse = parse
        self._empty = empty
        self._stamp: tuple | None = None
        self._value = empty

    def get(self) -> Any:
        if self.path is None:
            return self._empty
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._stamp, self._value = None, self._empty
            return self._value
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        if stamp != self._stamp:
            with open(self.path, "rb") as f:
                data = f.read()
            try:
                self._value = self._parse(data)
            except ValueError as exc:
                # Writers replace files atomically, so this is a broken file: keep the
                # last good copy (or nothing) and try again on the next use.
                log.error("cannot read %s (%s): using the previous version", self.path, exc)
                return self._value
            self._stamp = stamp
        return self._value


def _parse_revocations(data: bytes) -> frozenset[str]:
    ids = set()
    for line in data.decode("utf-8", "replace").splitlines():
        word = line.split("#", 1)[0].strip()
        if word:
            ids.add(word)
    return frozenset(ids)


def _atomic_write(path: str, data: bytes, mode: int = 0o600) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


class _FileLock:
    """An exclusive ``flock`` on ``<path>.lock`` around read-modify-write of a state file."""

    def __init__(self, path: str) -> None:
        self.path = path + ".lock"

    def __enter__(self) -> "_FileLock":
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: Any) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)


# --------------------------------------------------------------------------- SCRAM verifiers


@attrs.frozen
class ScramVerifier:
    mechanism: str
    salt: bytes = attrs.field(repr=False)
    iterations: int
    stored_key: bytes = attrs.field(repr=False)
    server_key: bytes = attrs.field(repr=False)

    def to_json(self) -> dict:
        return {"salt": b64url(self.salt), "i": self.iterations, "stored_key": b64url(self.stored_key), "server_key": b64url(self.server_key)}

    @classmethod
    def from_json(cls, mechanism: str, d: dict) -> "ScramVerifier":
        return cls(mechanism, b64url_decode(d["salt"]), int(d["i"]), b64url_decode(d["stored_key"]), b64url_decode(d["server_key"]))


def scram_password(mechanism: str, user: str, token: str) -> bytes:
    """What SCRAM hashes for a token: itself (SHA-256; ASCII is its own SASLprep) or Mongo's SHA-1 digest."""
    if mechanism == SCRAM_SHA_1:
        return hashlib.md5(f"{user}:mongo:{token}".encode("utf-8")).hexdigest().encode("ascii")
    if mechanism == SCRAM_SHA_256:
        return token.encode("utf-8")
    raise ValueError(f"unsupported SCRAM mechanism {mechanism!r}")


def scram_verifier(mechanism: str, user: str, token: str, salt: bytes, iterations: int = SCRAM_ITERATIONS) -> ScramVerifier:
    h = _SCRAM_HASH[mechanism]
    salted = hashlib.pbkdf2_hmac(h, scram_password(mechanism, user, token), salt, iterations)
    client_key = hmac.digest(salted, b"Client Key", h)
    return ScramVerifier(mechanism, salt, iterations, hashlib.new(h, client_key).digest(), hmac.digest(salted, b"Server Key", h))


@attrs.frozen
class RegistryEntry:
    claims: TokenClaims
    scram: dict  # mechanism -> ScramVerifier
    signature: bytes = attrs.field(repr=False)

    def signed_bytes(self) -> bytes:
        return _ENTRY_CONTEXT + _canonical({"claims": self.claims.to_json(), "scram": {k: v.to_json() for k, v in sorted(self.scram.items())}})

    def to_json(self) -> dict:
        return {**self.claims.to_json(), "scram": {k: v.to_json() for k, v in self.scram.items()}, "sig": b64url(self.signature)}


class TokenRegistry:
    """The SCRAM verifier file: ``{"version": 1, "tokens": {jti: entry}}``.

    The proxy reads it (re-read on change) and keeps only entries whose
    signature verifies; ``token issue`` / ``token revoke`` rewrite it
    atomically under a lock.  It holds verifiers, never tokens; it is still
    written 0600 since a ServerKey would let its holder pose as the proxy.
    """

    def __init__(self, path: str, keys: TokenKeys) -> None:
        self.path = path
        self.keys = keys
        self._file = _WatchedFile(path, self._parse, {})

    def _parse(self, data: bytes) -> dict[str, RegistryEntry]:
        try:
            doc = orjson.loads(data) if data.strip() else {"tokens": {}}
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"not JSON: {exc}") from None
        out: dict[str, RegistryEntry] = {}
        for jti, e in (doc.get("tokens") or {}).items():
            try:
                entry = RegistryEntry(
                    claims=TokenClaims(sub=e["sub"], roles=tuple(e.get("roles", [])), iat=int(e["iat"]), exp=int(e["exp"]), jti=e["jti"], iss=e.get("iss")),
                    scram={mech: ScramVerifier.from_json(mech, v) for mech, v in e["scram"].items() if mech in _SCRAM_HASH},
                    signature=b64url_decode(e["sig"]),
                )
            except (KeyError, TypeError, ValueError):
                log.warning("token registry %s: entry %s is malformed: ignored", self.path, str(jti)[:32])
                continue
            if entry.claims.jti != jti or not self.keys.verify(entry.signed_bytes(), entry.signature):
                log.warning("token registry %s: entry %s has a bad signature: ignored", self.path, str(jti)[:32])
                continue
            out[jti] = entry
        return out

    def entries(self) -> dict[str, RegistryEntry]:
        try:
            return self._file.get()
        except OSError as exc:
            log.error("token registry %s unreadable (%s): no SCRAM logins", self.path, exc.strerror or exc)
            return {}

    def for_user(self, user: str) -> list[RegistryEntry]:
        return [e for e in self.entries().values() if e.claims.sub == user]

    # -- writers (token CLI) ------------------------------------------------
    def _read_doc(self) -> dict:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return {"version": 1, "tokens": {}}
        doc = orjson.loads(data) if data.strip() else {}
        doc.setdefault("version", 1)
        doc.setdefault("tokens", {})
        return doc

    def add(self, claims: TokenClaims, token: str, *, now: float | None = None, revoked: frozenset[str] = frozenset()) -> RegistryEntry:
        """Record ``token``'s verifiers; reuse the user's salt while they hold active tokens; prune expired entries."""
        now = time.time() if now is None else now
        with _FileLock(self.path):
            doc = self._read_doc()
            tokens = {j: e for j, e in doc["tokens"].items() if int(e.get("exp", 0)) > now and j not in revoked}
            salts: dict[str, tuple[bytes, int]] = {}
            for e in sorted(tokens.values(), key=lambda e: int(e.get("iat", 0))):
                if e.get("sub") == claims.sub:
                    for mech, v in e.get("scram", {}).items():
                        salts[mech] = (b64url_decode(v["salt"]), int(v["i"]))
            scram = {}
            for mech in SCRAM_MECHANISMS:
                salt, iterations = salts.get(mech) or (secrets.token_bytes(16), SCRAM_ITERATIONS)
                scram[mech] = scram_verifier(mech, claims.sub, token, salt, iterations)
            unsigned = RegistryEntry(claims, scram, b"")
            entry = attrs.evolve(unsigned, signature=self.keys.sign(unsigned.signed_bytes()))
            tokens[claims.jti] = entry.to_json()
            doc["tokens"] = tokens
            _atomic_write(self.path, orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")
        return entry

    def remove(self, jti: str) -> bool:
        with _FileLock(self.path):
            doc = self._read_doc()
            found = doc["tokens"].pop(jti, None) is not None
            if found:
                _atomic_write(self.path, orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")
        return found


# --------------------------------------------------------------------------- the authority


class TokenAuthority:
    """Tokens as a whole: codec + revocation list + SCRAM registry, from ``identity.token``."""

    def __init__(self, cfg: TokenConfig, keys: TokenKeys | None = None) -> None:
        self.cfg = cfg
        self.keys = keys or TokenKeys.from_config(cfg)
        self.codec = TokenCodec(self.keys, issuer=cfg.issuer, leeway=cfg.leeway)
        self.revocations = _WatchedFile(cfg.revocation_file, _parse_revocations, frozenset())
        self.registry = TokenRegistry(cfg.registry_file, self.keys) if cfg.registry_file else None
        # PostgreSQL-style mock authentication: a fake but stable salt for unknown users.
        self._mock_key = secrets.token_bytes(32)

    def _revoked_ids(self) -> frozenset[str]:
        try:
            return self.revocations.get()
        except OSError as exc:
            # Fail closed: if the proxy cannot tell whether a token is revoked, no token is good.
            raise AuthFailed(f"revocation list unreadable: {exc.strerror or exc}", reason="revocation_list_unreadable") from None

    def revoked(self, jti: str) -> bool:
        return jti in self._revoked_ids()

    def _accept(self, claims: TokenClaims, user: str | None, now: float | None) -> Identity:
        if user is not None and claims.sub != user:
            raise AuthFailed(f"token {claims.jti} is for {claims.sub!r}, not {user!r}", reason="token_wrong_user", token_id=claims.jti)
        self.codec.check_time(claims, now)
        if self.revoked(claims.jti):
            raise AuthFailed(f"token {claims.jti} of {claims.sub!r} is revoked", reason="token_revoked", token_id=claims.jti)
        return Identity(user=claims.sub, roles=claims.roles, method="token", token_id=claims.jti)

    def verify_password(self, user: str | None, password: str | bytes, *, now: float | None = None) -> Identity:
        """A token presented as a password (PG cleartext, CQL PasswordAuthenticator, Mongo PLAIN)."""
        return self._accept(self.codec.decode(password), user, now)

    def scram_candidates(self, user: str, mechanism: str, *, now: float | None = None) -> tuple[bytes, int, list[RegistryEntry]]:
        """(salt, iterations, entries to test) for one login; a mock salt and no entries if none."""
        now = time.time() if now is None else now
        entries = []
        if self.registry is not None:
            revoked = self._revoked_ids()
            entries = [
                e for e in self.registry.for_user(user)
                if mechanism in e.scram and e.claims.jti not in revoked and now < e.claims.exp + self.codec.leeway
            ]
        if entries:
            newest = max(entries, key=lambda e: e.claims.iat).scram[mechanism]
            same = [e for e in entries if e.scram[mechanism].salt == newest.salt and e.scram[mechanism].iterations == newest.iterations]
            return newest.salt, newest.iterations, same
        mock = hmac.digest(self._mock_key, f"{mechanism}\0{user}".encode("utf-8"), "sha256")[:16]
        return mock, SCRAM_ITERATIONS, []

    def scram_server(self, user: str | None, mechanism: str = SCRAM_SHA_256) -> "ScramTokenServer":
        if self.registry is None:
            raise AuthFailed("SCRAM needs identity.token.registry_file", reason="method_unavailable")
        return ScramTokenServer(self, mechanism, user)


# --------------------------------------------------------------------------- SCRAM server


class ScramTokenServer:
    """One SCRAM conversation (RFC 5802 server side) against a user's active tokens.  Single use.

    ``user``: the login name when the protocol carries it outside SCRAM
    (Postgres: the startup packet; the SCRAM ``n=`` is ignored, as
    PostgreSQL does); ``None`` takes it from ``n=`` (Mongo).

        srv = authority.scram_server(user, "SCRAM-SHA-256")
        send(srv.server_first(client_first))     # r=…,s=…,i=…
        send(srv.server_final(client_final))     # v=…   (raises AuthFailed)
        srv.identity                             # the Identity of the matching token
    """

    def __init__(self, authority: TokenAuthority, mechanism: str, user: str | None) -> None:
        if mechanism not in _SCRAM_HASH:
            raise ValueError(f"unsupported SCRAM mechanism {mechanism!r}")
        self.authority = authority
        self.mechanism = mechanism
        self.user = user
        self.identity: Identity | None = None
        self._hash = _SCRAM_HASH[mechanism]
        self._nonce = base64.b64encode(secrets.token_bytes(18))
        self._first_bare = b""
        self._gs2 = b""
        self._client_nonce = b""
        self._server_first = b""
        self._entries: list[RegistryEntry] = []

    def server_first(self, client_first: bytes) -> bytes:
        first = parse_client_first(client_first)
        nonce = first.nonce
        if self.user is None:
            self.user = first.user
        self._gs2 = first.gs2_header
        self._first_bare = first.bare
        self._client_nonce = nonce
        salt, iterations, self._entries = self.authority.scram_candidates(self.user, self.mechanism)
        self._server_first = b"r=" + nonce + self._nonce + b",s=" + base64.b64encode(salt) + b",i=" + str(iterations).encode("ascii")
        return self._server_first

    def server_final(self, client_final: bytes) -> bytes:
        if not self._server_first:
            raise RuntimeError("server_first() must come first")
        client_final = bytes(client_final)
        try:
            without_proof, sep, proof_attr = client_final.rpartition(b",")
            if not sep or not proof_attr.startswith(b"p="):
                raise ValueError("missing proof")
            a = _parse_attributes(without_proof)
            proof = base64.b64decode(proof_attr[2:], validate=True)
            channel = base64.b64decode(a[b"c"], validate=True)
            nonce = a[b"r"]
        except (KeyError, ValueError) as exc:
            raise RemoteProtocolError(f"malformed SCRAM client-final-message: {exc}", client_hint="malformed SCRAM client-final-message") from None
        if channel != self._gs2:
            raise AuthFailed("SCRAM channel binding does not match the GS2 header", reason="scram_bad_binding")
        if nonce != self._client_nonce + self._nonce:
            raise AuthFailed("SCRAM nonce mismatch", reason="scram_bad_nonce")
        auth_message = self._first_bare + b"," + self._server_first + b"," + without_proof
        for entry in self._entries:
            v = entry.scram[self.mechanism]
            signature = hmac.digest(v.stored_key, auth_message, self._hash)
            if len(proof) != len(signature):
                break
            client_key = (int.from_bytes(proof, "big") ^ int.from_bytes(signature, "big")).to_bytes(len(proof), "big")
            if hmac.compare_digest(hashlib.new(self._hash, client_key).digest(), v.stored_key):
                # Revocation/expiry were filtered at server_first; check again (the file may have changed).
                self.identity = self.authority._accept(entry.claims, self.user, None)
                return b"v=" + base64.b64encode(hmac.digest(v.server_key, auth_message, self._hash))
        raise AuthFailed(f"no active token of {self.user!r} matches the SCRAM proof", reason="scram_no_match")


# --------------------------------------------------------------------------- mTLS


def certificate_subject(cert: dict | None, source: str = "cn") -> str | None:
    """The identity in a verified peer certificate (``ssl`` dict form), or None if there is none."""
    if not cert:
        return None
    if source == "san_uri":
        for kind, value in cert.get("subjectAltName", ()):
            if kind == "URI" and value:
                return value
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName" and value:
                return value
    return None


def peer_certificate(stream: Any) -> dict | None:
    """The verified client certificate of a TLS stream (trio.SSLStream), or None."""
    getpeercert = getattr(stream, "getpeercert", None)
    if getpeercert is None:
        return None
    try:
        return getpeercert() or None
    except ValueError:  # handshake not done
        return None


# --------------------------------------------------------------------------- per-listener authenticator


class ClientAuthenticator:
    """What one listener accepts (``methods``) and how to check it.  Engines call:

    - ``certificate_identity(stream)`` → Identity, None (no certificate), AuthFailed
    - ``verify_token(user, password)`` → Identity (cleartext / PLAIN / CQL password)
    - ``scram(user, mechanism)`` → ScramTokenServer
    - ``anonymous()`` → the listener's anonymous Identity
    """

    def __init__(self, methods: tuple[str, ...], *, authority: TokenAuthority | None, mtls: MtlsConfig | None, anonymous_roles: tuple[str, ...] = ()) -> None:
        self.methods = methods
        self.authority = authority
        self.mtls = mtls
        self.anonymous_roles = anonymous_roles

    @property
    def token(self) -> bool:
        return "token" in self.methods and self.authority is not None

    @property
    def scram_available(self) -> bool:
        return self.token and self.authority.registry is not None  # type: ignore[union-attr]

    def certificate_identity(self, stream: Any) -> Identity | None:
        if "mtls" not in self.methods or self.mtls is None:
            return None
        cert = peer_certificate(stream)
        if cert is None:
            return None
        subject = certificate_subject(cert, self.mtls.subject)
        if subject is None:
            raise AuthFailed(f"client certificate has no {self.mtls.subject}", reason="certificate_no_subject")
        return Identity(user=subject, roles=self.mtls.roles_for(subject), method="mtls")

    def verify_token(self, user: str | None, password: str | bytes) -> Identity:
        if not self.token:
            raise AuthFailed("token authentication is not enabled on this listener", reason="method_unavailable")
        return self.authority.verify_password(user, password)  # type: ignore[union-attr]

    def scram(self, user: str | None, mechanism: str = SCRAM_SHA_256) -> ScramTokenServer:
        if not self.token:
            raise AuthFailed("token authentication is not enabled on this listener", reason="method_unavailable")
        return self.authority.scram_server(user, mechanism)  # type: ignore[union-attr]

    def anonymous(self) -> Identity:
        return Identity(user="anonymous", roles=self.anonymous_roles, method="anonymous")
