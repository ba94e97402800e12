"""Who is connecting: signed tokens, SCRAM verifiers for tokens, mTLS identities.

Strategy.  A person proves who they are to the proxy with a **short-lived
signed token used as the password** of their stock client, or with a client
certificate (mTLS).  Engines never parse tokens or certificates themselves:
they call one ``ClientAuthenticator`` (one per listener, built by
``dbproxy.access``) and get a ``dbproxy.session.Identity`` or an
``AuthFailed`` whose ``reason`` goes to the audit trail (never the token).

Tokens are JWTs (RFC 7519, compact JWS RFC 7515), signed and verified by
PyJWT with ``alg`` ``EdDSA`` (Ed25519, RFC 8037) or ``HS256``; keys are
loaded with ``cryptography``.  Claims: ``sub`` (user), ``roles``, ``iat``,
``exp``, ``jti`` (token id), ``iss`` (and ``nbf`` if present).  The key's
algorithm is pinned (``algorithms=[alg]``: no ``none``, no algorithm
confusion) and the header's ``kid`` must name this key.  Refused: bad shape,
bad signature, expired, not yet valid, ``sub`` ≠ the user the client logged
in as, ``jti`` in the revocation file (re-read whenever it changes).  The
time checks are ours (``check_time``: a caller-given clock and leeway).

SCRAM.  In SCRAM (Postgres SCRAM-SHA-256, Mongo SCRAM-SHA-1/-256) the proxy
never sees the password, so it needs a verifier it can derive.  ``token
issue`` therefore also writes the token's SCRAM verifier — salt, iteration
count, StoredKey, ServerKey (RFC 5802 §3), never the token — to the
*token registry* file, keyed by token id, with the claims.  Every registry
entry is signed with the token key (so nobody who can write the file but
does not hold the key can grant themselves roles).  All active tokens of a
user share one salt per mechanism, because the salt goes out in the
server-first message before the client's proof says which token it used.
When the proof arrives, ``ScramTokenServer`` (``dbproxy.scram.ScramServer``
over scramp) offers it to each of the user's active tokens' verifiers; the
one that accepts it is the token used, and the proxy answers with that
token's ServerSignature.  The SCRAM-SHA-256 verifier serves Postgres and
Mongo alike (an ASCII token is its own SASLprep).  Other verifiers come from
the *flavours* engines declare (``dbproxy.scram.ScramFlavour``; Mongo's
SCRAM-SHA-1 hashes its own digest of the token): ``token issue`` records one
per flavour; the proxy only reads stored keys and needs no flavour.  An
unknown user gets a stable fake salt (PostgreSQL's mock authentication) and
fails at the proof.

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
import jwt
import orjson

from . import scram
from .errors import AccessDenied
from .scram import SCRAM_SHA_1, SCRAM_SHA_256, ScramFlavour  # noqa: F401  (SCRAM_SHA_1: re-exported for engines)
from .session import Identity

log = logging.getLogger("dbproxy.identity")

ALGORITHMS = ("EdDSA", "HS256")
#: What ``token issue`` records when the caller names no engine flavours.
DEFAULT_FLAVOURS: tuple[ScramFlavour, ...] = (scram.PLAIN_SHA_256,)
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
class PublicKeyConfig:
    """``identity.publickey``: SSH public keys and OpenSSH user certificates tied to identities.

    ``users``: (user, roles, authorized_keys_file or None) — a key in the user's file proves the
    user; ``user_ca_file``: the public key of a user CA whose certificates name the user as a
    principal (the engine that speaks the key format — SSH — checks keys and signatures).
    """

    users: tuple[tuple[str, tuple[str, ...], str | None], ...] = ()
    user_ca_file: str | None = None


@attrs.frozen
class IdentityConfig:
    token: TokenConfig | None = None
    mtls: MtlsConfig | None = None
    publickey: PublicKeyConfig | None = None


IDENTITY_KEYS = {"token", "mtls", "publickey"}
PUBLICKEY_KEYS = {"users", "user_ca_file"}
PUBLICKEY_USER_KEYS = {"roles", "authorized_keys_file"}
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
    publickey = _validate_publickey(v, d["publickey"], f"{path}.publickey") if "publickey" in d else None
    if not {"token", "mtls", "publickey"} & set(d):
        v.err(path, "\"token\", \"mtls\" and/or \"publickey\"")
    return IdentityConfig(token=token, mtls=mtls, publickey=publickey)


def _public_keys_problem(asyncssh: Any, path: str) -> str | None:
    """None when every line of *path* is a plain OpenSSH public key (``TYPE BASE64 [COMMENT]``)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [(n, line.strip()) for n, line in enumerate(f, 1)]
    except (OSError, UnicodeDecodeError) as exc:
        return f"a file of OpenSSH public keys, but {path} could not be read: {exc}"
    found = False
    for n, line in lines:
        if not line or line.startswith("#"):
            continue
        try:
            asyncssh.import_public_key(line)
        except (ValueError, asyncssh.KeyImportError) as exc:
            # authorized_keys options (from=, command=…) would not be enforced: not accepted.
            return f"one OpenSSH public key per line (TYPE BASE64 [COMMENT], no options), but {path} line {n} is not: {exc}"
        found = True
    return None if found else f"at least one OpenSSH public key, but {path} has none"


def _validate_publickey(v: Any, raw: Any, path: str) -> PublicKeyConfig | None:
    """Files are read with asyncssh (imported on use), so a key it cannot parse is a config error."""
    d = v.obj(raw, path)
    if d is None:
        return None
    v.unknown_keys(d, PUBLICKEY_KEYS, path)
    import asyncssh

    users: list[tuple[str, tuple[str, ...], str | None]] = []
    ud = v.obj(d.get("users", {}), f"{path}.users", "an object of user name → {\"roles\", \"authorized_keys_file\"}")
    for user, item in (ud or {}).items():
        up = f"{path}.users.{user}"
        entry = v.obj(item, up)
        if entry is None:
            continue
        v.unknown_keys(entry, PUBLICKEY_USER_KEYS, up)
        roles = entry.get("roles")
        if not isinstance(roles, list) or not all(isinstance(r, str) and r for r in roles):
            v.err(f"{up}.roles" if "roles" in entry else up, "a key \"roles\": an array of role names")
            continue
        keys = v.file_path(entry, "authorized_keys_file", up, required=False)
        if keys is not None:
            problem = _public_keys_problem(asyncssh, keys)
            if problem:
                v.err(f"{up}.authorized_keys_file", problem)
                continue
        users.append((user, tuple(roles), keys))
    ca = v.file_path(d, "user_ca_file", path, required=False)
    if ca is not None:
        try:
            asyncssh.read_public_key(ca)
        except (OSError, ValueError, asyncssh.KeyImportError) as exc:
            v.err(f"{path}.user_ca_file", f"an OpenSSH public key (the user CA's .pub), but {ca} could not be read: {exc}")
            ca = None
    if not any(keys for _, _, keys in users) and "user_ca_file" not in d:
        v.err(path, "\"users\" with an \"authorized_keys_file\" and/or a \"user_ca_file\"")
    return PublicKeyConfig(users=tuple(users), user_ca_file=ca)


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


# --------------------------------------------------------------------------- tokens


@attrs.frozen
class TokenClaims:
    sub: str
    roles: tuple[str, ...]
    iat: int
    exp: int
    jti: str
    iss: str | None = None
    nbf: int | None = None

    def to_json(self) -> dict:
        out = {"iss": self.iss, "sub": self.sub, "roles": list(self.roles), "iat": self.iat, "exp": self.exp, "jti": self.jti}
        if self.iss is None:
            del out["iss"]
        if self.nbf is not None:
            out["nbf"] = self.nbf
        return out


def looks_like_token(text: str) -> bool:
    return text.count(".") == 2 and len(text) > 20


class TokenCodec:
    """Sign and verify JWTs with one key (PyJWT, the key's algorithm pinned); knows nothing of users or files."""

    #: PyJWT checks signature, algorithm, the claims' presence and the types of sub/jti;
    #: the clock (exp/nbf/iat) is ``check_time``'s, with the caller's ``now``.
    _OPTIONS = {
        "verify_signature": True,
        "verify_exp": False,
        "verify_nbf": False,
        "verify_iat": False,
        "verify_iss": False,
        "verify_aud": False,
        "require": ["sub", "iat", "exp", "jti"],
        "enforce_minimum_key_length": True,
    }

    def __init__(self, keys: TokenKeys, *, issuer: str | None = "dbproxy", leeway: int = DEFAULT_LEEWAY) -> None:
        self.keys = keys
        self.issuer = issuer
        self.leeway = leeway

    def issue(self, user: str, roles: Iterable[str], ttl: int, *, now: float | None = None, jti: str | None = None) -> tuple[str, TokenClaims]:
        iat = int(time.time() if now is None else now)
        claims = TokenClaims(
            sub=user, roles=tuple(roles), iat=iat, exp=iat + int(ttl),
            jti=jti or secrets.token_urlsafe(12), iss=self.issuer,
        )
        payload = dict(sorted(claims.to_json().items()))  # the same bytes as ever: sorted, compact
        token = jwt.encode(payload, self.keys.signing_key, algorithm=self.keys.algorithm, headers={"kid": self.keys.key_id})
        return token, claims

    def decode(self, token: str | bytes) -> TokenClaims:
        """Check shape, algorithm, key id and signature; return the claims (not yet time/user/revocation)."""
        if isinstance(token, bytes):
            try:
                token = token.decode("ascii")
            except UnicodeDecodeError:
                raise AuthFailed("password is not a token (not ASCII)", reason="token_malformed") from None
        if len(token) > MAX_TOKEN_BYTES or token.count(".") != 2:
            raise AuthFailed("password is not a token", reason="token_malformed")
        try:
            decoded = jwt.decode_complete(token, self.keys.verifying_key, algorithms=[self.keys.algorithm], options=self._OPTIONS)
        except jwt.InvalidAlgorithmError:
            # RFC 8725 §3.1: accept only the algorithm the key is for.
            raise AuthFailed(f"token algorithm {_header_alg(token)!r} is not {self.keys.algorithm}", reason="token_bad_signature") from None
        except jwt.InvalidSignatureError:
            raise AuthFailed("token signature does not verify", reason="token_bad_signature") from None
        except jwt.DecodeError:
            if _json_segments(token):  # header and claims read fine: the signature is what is broken
                raise AuthFailed("token signature is not valid base64url", reason="token_bad_signature") from None
            raise AuthFailed("token is not base64url JSON", reason="token_malformed") from None
        except jwt.InvalidTokenError as exc:  # a missing claim, sub/jti not strings
            raise AuthFailed(f"token lacks sub/iat/exp/jti ({exc})", reason="token_malformed") from None
        except jwt.PyJWTError as exc:  # anything else PyJWT refuses is still a refused token, never a crash
            raise AuthFailed(f"token refused: {type(exc).__name__}", reason="token_malformed") from None
        if decoded["header"].get("kid") != self.keys.key_id:
            # Signed with this key, but the header names another: not a token this proxy issued.
            raise AuthFailed("token key id is not this proxy's key", reason="token_bad_signature")
        body = decoded["payload"]
        try:
            nbf = body.get("nbf")
            claims = TokenClaims(
                sub=_str(body["sub"]), roles=tuple(_str(r) for r in body.get("roles", [])),
                iat=_int(body["iat"]), exp=_int(body["exp"]), jti=_str(body["jti"]), iss=body.get("iss"),
                nbf=None if nbf is None else _int(nbf),
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
        if claims.iat > now + self.leeway or (claims.nbf is not None and claims.nbf > now + self.leeway):
            raise AuthFailed(f"token {claims.jti} of {claims.sub!r} is issued in the future", reason="token_not_yet_valid", token_id=claims.jti)


def _json_segments(token: str) -> bool:
    """Whether a token's header and claims are base64url JSON objects (which of its parts is broken)."""
    try:
        return all(isinstance(orjson.loads(b64url_decode(part)), dict) for part in token.split(".")[:2])
    except (ValueError, orjson.JSONDecodeError):
        return False


def _header_alg(token: str) -> str:
    try:
        return str(jwt.get_unverified_header(token).get("alg"))[:16]
    except jwt.InvalidTokenError:
        return "?"


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


ScramVerifier = scram.Verifier  # salt, iterations, StoredKey, ServerKey


def _verifier_json(v: ScramVerifier) -> dict:
    return {"salt": b64url(v.salt), "i": v.iterations, "stored_key": b64url(v.stored_key), "server_key": b64url(v.server_key)}


def _verifier_from_json(mechanism: str, d: dict) -> ScramVerifier:
    return ScramVerifier(mechanism, b64url_decode(d["salt"]), int(d["i"]), b64url_decode(d["stored_key"]), b64url_decode(d["server_key"]))


def scram_verifier(flavour: ScramFlavour, user: str, token: str, salt: bytes, iterations: int = SCRAM_ITERATIONS) -> ScramVerifier:
    """The verifier of ``token`` for one flavour (the derivation is scramp's)."""
    return scram.make_verifier(flavour.mechanism, flavour.password(user, token), salt, iterations)


def _unique_flavours(flavours: Iterable[ScramFlavour]) -> tuple[ScramFlavour, ...]:
    """One flavour per mechanism (the registry keys verifiers by mechanism); the first wins."""
    out: dict[str, ScramFlavour] = {}
    for flavour in flavours:
        if flavour.mechanism not in scram.MECHANISMS:
            raise ValueError(f"unsupported SCRAM mechanism {flavour.mechanism!r}")
        out.setdefault(flavour.mechanism, flavour)
    return tuple(out.values())


@attrs.frozen
class RegistryEntry:
    claims: TokenClaims
    scram: dict  # mechanism -> ScramVerifier
    signature: bytes = attrs.field(repr=False)

    def signed_bytes(self) -> bytes:
        return _ENTRY_CONTEXT + _canonical({"claims": self.claims.to_json(), "scram": {k: _verifier_json(v) for k, v in sorted(self.scram.items())}})

    def to_json(self) -> dict:
        return {**self.claims.to_json(), "scram": {k: _verifier_json(v) for k, v in self.scram.items()}, "sig": b64url(self.signature)}


class TokenRegistry:
    """The SCRAM verifier file: ``{"version": 1, "tokens": {jti: entry}}``.

    The proxy reads it (re-read on change) and keeps only entries whose
    signature verifies; ``token issue`` / ``token revoke`` rewrite it
    atomically under a lock.  It holds verifiers, never tokens; it is still
    written 0600 since a ServerKey would let its holder pose as the proxy.
    """

    def __init__(self, path: str, keys: TokenKeys, flavours: Iterable[ScramFlavour] = DEFAULT_FLAVOURS) -> None:
        self.path = path
        self.keys = keys
        self.flavours = _unique_flavours(flavours)
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
                    scram={mech: _verifier_from_json(mech, v) for mech, v in e["scram"].items() if mech in scram.MECHANISMS},
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
            verifiers = {}
            for flavour in self.flavours:
                mech = flavour.mechanism
                salt, iterations = salts.get(mech) or (secrets.token_bytes(16), SCRAM_ITERATIONS)
                verifiers[mech] = scram_verifier(flavour, claims.sub, token, salt, iterations)
            unsigned = RegistryEntry(claims, verifiers, b"")
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

    def __init__(self, cfg: TokenConfig, keys: TokenKeys | None = None, *, flavours: Iterable[ScramFlavour] = DEFAULT_FLAVOURS) -> None:
        """``flavours``: the SCRAM verifiers ``token issue`` records (the engines' ``scram_flavours``)."""
        self.cfg = cfg
        self.keys = keys or TokenKeys.from_config(cfg)
        self.codec = TokenCodec(self.keys, issuer=cfg.issuer, leeway=cfg.leeway)
        self.revocations = _WatchedFile(cfg.revocation_file, _parse_revocations, frozenset())
        self.registry = TokenRegistry(cfg.registry_file, self.keys, flavours) if cfg.registry_file else None
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
        # A keyed hash, not SCRAM: the same fake salt every time for this name (PostgreSQL's
        # scram_mock_salt hashes a per-cluster nonce with the name the same way).
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
    PostgreSQL does); ``None`` takes it from ``n=`` (Mongo).  The exchange is
    ``dbproxy.scram.ScramServer`` with one candidate per active token.

        srv = authority.scram_server(user, "SCRAM-SHA-256")
        send(srv.server_first(client_first))     # r=…,s=…,i=…
        send(srv.server_final(client_final))     # v=…   (raises AuthFailed)
        srv.identity                             # the Identity of the matching token
    """

    def __init__(self, authority: TokenAuthority, mechanism: str, user: str | None) -> None:
        if mechanism not in scram.MECHANISMS:
            raise ValueError(f"unsupported SCRAM mechanism {mechanism!r}")
        self.authority = authority
        self.mechanism = mechanism
        self.identity: Identity | None = None
        self._entries: list[RegistryEntry] = []
        self._server = scram.ScramServer(mechanism, self._candidates, user=user)

    @property
    def user(self) -> str | None:
        return self._server.user

    def _candidates(self, user: str) -> tuple[bytes, int, list[tuple[bytes, bytes]]]:
        salt, iterations, self._entries = self.authority.scram_candidates(user, self.mechanism)
        keys = [(e.scram[self.mechanism].stored_key, e.scram[self.mechanism].server_key) for e in self._entries]
        return salt, iterations, keys

    def server_first(self, client_first: bytes) -> bytes:
        return self._server.server_first(client_first)

    def server_final(self, client_final: bytes) -> bytes:
        try:
            final = self._server.server_final(client_final)
        except scram.ScramFailed as exc:
            if exc.reason == "scram_no_match":
                raise AuthFailed(f"no active token of {self.user!r} matches the SCRAM proof", reason="scram_no_match") from None
            raise AuthFailed(str(exc), reason=exc.reason) from None
        assert self._server.matched is not None
        # Revocation/expiry were filtered at server_first; check again (the file may have changed).
        self.identity = self.authority._accept(self._entries[self._server.matched].claims, self.user, None)
        return final


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

    def __init__(self, methods: tuple[str, ...], *, authority: TokenAuthority | None, mtls: MtlsConfig | None, anonymous_roles: tuple[str, ...] = (),
                 publickey: PublicKeyConfig | None = None) -> None:
        self.methods = methods
        self.authority = authority
        self.mtls = mtls
        # The keys and user CA an engine that speaks SSH checks (``"publickey" in methods``).
        self.publickey = publickey if "publickey" in methods else None
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
