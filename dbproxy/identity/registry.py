"""The token registry: each token's SCRAM verifiers, signed, keyed by token id.

Strategy.  In SCRAM (Postgres SCRAM-SHA-256, Mongo SCRAM-SHA-1/-256) the
proxy never sees the password, so it needs a verifier it can derive.  ``token
issue`` therefore also writes the token's SCRAM verifier — salt, iteration
count, StoredKey, ServerKey (RFC 5802 §3), never the token — to this file,
with the claims.  Every entry is signed with the token key (so nobody who can
write the file but does not hold the key can grant themselves roles).  All
active tokens of a user share one salt per mechanism, because the salt goes
out in the server-first message before the client's proof says which token
it used.  The SCRAM-SHA-256 verifier serves Postgres and Mongo alike (an
ASCII token is its own SASLprep); other verifiers come from the *flavours*
engines declare (``dbproxy.scram.ScramFlavour``; Mongo's SCRAM-SHA-1 hashes
its own digest of the token): ``token issue`` records one per flavour; the
proxy only reads stored keys and needs no flavour.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import Any, Iterable

import attrs
import orjson

from .. import scram
from ..scram import ScramFlavour
from .files import FileLock, WatchedFile, atomic_write
from .keys import TokenKeys, b64url, b64url_decode
from .tokens import TokenClaims

log = logging.getLogger("dbproxy.identity")

#: What ``token issue`` records when the caller names no engine flavours.
DEFAULT_FLAVOURS: tuple[ScramFlavour, ...] = (scram.PLAIN_SHA_256,)
#: Tokens carry 256+ bits of signature: the iteration count protects nothing
#: here, but Mongo drivers refuse fewer than 4096 (auth spec) and libpq's
#: default is 4096.
SCRAM_ITERATIONS = 4096
_ENTRY_CONTEXT = b"dbproxy-scram-verifier-v1\0"


def _canonical(obj: Any) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)


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
        self._file = WatchedFile(path, self._parse, {})

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
        with FileLock(self.path):
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
            atomic_write(self.path, orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")
        return entry

    def remove(self, jti: str) -> bool:
        with FileLock(self.path):
            doc = self._read_doc()
            found = doc["tokens"].pop(jti, None) is not None
            if found:
                atomic_write(self.path, orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")
        return found
