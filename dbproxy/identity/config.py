"""The ``identity`` config section: token keys and files, mTLS subjects and roles.

Strategy: plain frozen attrs objects and one validator pass in the style of
``dbproxy.config`` (``v`` is its ``Validator``: every problem named by file,
JSON path and expectation).  Keys are never inline: a key file others can
read is refused (``chmod 600``).  Nothing here reads a key; ``keys.py`` does.
"""

from __future__ import annotations

import fnmatch
import os
from typing import Any

import attrs

from .publickey import PublicKeyConfig, validate_publickey

ALGORITHMS = ("EdDSA", "HS256")
DEFAULT_MAX_TTL = 24 * 3600
DEFAULT_LEEWAY = 30


@attrs.frozen
class TokenConfig:
    algorithm: str
    key_file: str | None  # HS256: the shared secret; EdDSA: the private key (only `token issue` needs it)
    public_key_file: str | None  # EdDSA: what the proxy verifies with
    registry_file: str | None
    revocation_file: str | None
    issuer: str = "dbproxy"
    # Single-use login codes (``dbproxy.onetime``: ``token issue --code``); None: ``<registry_file>.codes``.
    codes_file: str | None = None
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
    publickey: PublicKeyConfig | None = None


IDENTITY_KEYS = {"token", "mtls", "publickey"}
TOKEN_KEYS = {"algorithm", "key_file", "public_key_file", "registry_file", "revocation_file", "issuer", "max_ttl_seconds", "leeway_seconds",
              "codes_file"}
MTLS_KEYS = {"subject", "users"}


def validate_identity(v: Any, raw: Any, path: str = "identity") -> IdentityConfig | None:
    """The ``identity`` section (``v`` is a ``dbproxy.validate.Validator``)."""
    d = v.section(raw, path, IDENTITY_KEYS)
    if d is None:
        return None
    token = mtls = None
    if "token" in d:
        token = _validate_token(v, d["token"], f"{path}.token")
    if "mtls" in d:
        mtls = _validate_mtls(v, d["mtls"], f"{path}.mtls")
    publickey = validate_publickey(v, d["publickey"], f"{path}.publickey") if "publickey" in d else None
    if not {"token", "mtls", "publickey"} & set(d):
        v.err(path, "\"token\", \"mtls\" and/or \"publickey\"")
    return IdentityConfig(token=token, mtls=mtls, publickey=publickey)


def _validate_token(v: Any, raw: Any, path: str) -> TokenConfig | None:
    d = v.section(raw, path, TOKEN_KEYS)
    if d is None:
        return None
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
    codes = v.file_path(d, "codes_file", path, required=False, must_exist=False)
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
        codes_file=codes,
    )


def _validate_mtls(v: Any, raw: Any, path: str) -> MtlsConfig | None:
    d = v.section(raw, path, MTLS_KEYS)
    if d is None:
        return None
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
