"""Single-use login codes: issued by ``dbproxy token issue --code KIND``, consumed once by the proxy.

Strategy.  Some protocols cannot carry a proxy token: IPMI v2.0 passwords
are at most 20 bytes, and RAKP message 2 hands anyone who names a user an
HMAC of that user's password (offline-crackable).  For those, ``token
issue`` also writes a short random *code* bound to a user, roles, a target
and a few minutes of life; the client uses it as its password once.

The codes live in one state file next to the token registry
(``<identity.token.registry_file>.codes``), JSON, mode 0600, rewritten
atomically and fsync'd under an ``flock`` (``dbproxy.identity.files``): the
CLI appends, the proxy reads it when it changes and *consumes* a code by
removing it under the same lock — so a code works once even across proxy
processes sharing the file.  Each entry is signed with the token key (as the
registry's are), so whoever can write the file but does not hold the key
cannot grant themselves roles.  The code is stored as issued (the protocol
needs it as a key, e.g. RAKP's Kuid), which is why it is short-lived,
single-use and the file private; expired entries are dropped on every write.

Lookup is by *login name* (what the protocol carries in the clear, e.g.
RAKP 1's user name): one outstanding code per (kind, name) — issuing a new
one replaces the previous, because the protocol must pick the key before
the client proves which code it holds.

This module knows no protocol: an engine names its ``kind`` and length.
"""

from __future__ import annotations

import secrets
import string
import time

import attrs
import orjson

from .identity.files import FileLock, WatchedFile, atomic_write
from .identity.keys import TokenKeys, b64url, b64url_decode

ALPHABET = string.ascii_letters + string.digits  # printable, shell- and URL-safe
_CONTEXT = b"dbproxy-onetime-code-v1\0"


def codes_path(registry_file: str) -> str:
    return registry_file + ".codes"


@attrs.frozen
class Code:
    id: str
    kind: str
    name: str  # the login name the client presents
    user: str
    roles: tuple[str, ...]
    target: str | None
    iat: int
    exp: int
    secret: bytes = attrs.field(repr=False)

    def _signed(self) -> bytes:
        body = {"id": self.id, "kind": self.kind, "name": self.name, "user": self.user, "roles": list(self.roles),
                "target": self.target, "iat": self.iat, "exp": self.exp, "secret": b64url(self.secret)}
        return _CONTEXT + orjson.dumps(body, option=orjson.OPT_SORT_KEYS)

    def to_json(self, keys: TokenKeys) -> dict:
        return {"id": self.id, "kind": self.kind, "name": self.name, "user": self.user, "roles": list(self.roles),
                "target": self.target, "iat": self.iat, "exp": self.exp, "secret": b64url(self.secret),
                "sig": b64url(keys.sign(self._signed()))}

    @classmethod
    def from_json(cls, d: dict) -> tuple["Code", bytes]:
        code = cls(str(d["id"]), str(d["kind"]), str(d["name"]), str(d["user"]), tuple(d["roles"]),
                   d.get("target"), int(d["iat"]), int(d["exp"]), b64url_decode(d["secret"]))
        return code, b64url_decode(d["sig"])


def _parse(data: bytes) -> list[dict]:
    if not data.strip():
        return []
    doc = orjson.loads(data)
    if not isinstance(doc, dict) or not isinstance(doc.get("codes"), list):
        raise ValueError("not a codes file (expected {\"codes\": [...]})")
    return doc["codes"]


class CodeStore:
    """The codes file: ``issue`` (the CLI), ``lookup`` and ``consume`` (the proxy)."""

    def __init__(self, path: str, keys: TokenKeys) -> None:
        self.path = path
        self.keys = keys
        self._file = WatchedFile(path, _parse, [])
        self._consumed: set[str] = set()  # belt and braces: never accept one twice in this process

    def _read_locked(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                return _parse(f.read())
        except FileNotFoundError:
            return []

    def _write_locked(self, entries: list[dict]) -> None:
        atomic_write(self.path, orjson.dumps({"codes": entries}), 0o600)

    def issue(self, kind: str, name: str, user: str, roles: tuple[str, ...], target: str | None, ttl: int, *,
              length: int = 20, now: float | None = None) -> Code:
        now = int(time.time() if now is None else now)
        secret = "".join(secrets.choice(ALPHABET) for _ in range(length)).encode()
        code = Code(secrets.token_hex(8), kind, name, user, tuple(roles), target, now, now + ttl, secret)
        with FileLock(self.path):
            entries = [e for e in self._read_locked()
                       if int(e.get("exp", 0)) > now and not (e.get("kind") == kind and e.get("name") == name)]
            entries.append(code.to_json(self.keys))
            self._write_locked(entries)
        return code

    def lookup(self, kind: str, name: str, *, now: float | None = None) -> Code | None:
        """The outstanding, unexpired, correctly signed code for (kind, name), or None."""
        now = time.time() if now is None else now
        found = None
        for entry in self._file.get():
            if entry.get("kind") != kind or entry.get("name") != name:
                continue
            try:
                code, sig = Code.from_json(entry)
            except (KeyError, TypeError, ValueError):
                continue
            if code.exp <= now or code.id in self._consumed or not self.keys.verify(code._signed(), sig):
                continue
            if found is None or code.iat >= found.iat:
                found = code
        return found

    def consume(self, code: Code) -> bool:
        """Remove ``code`` from the file; True when it was still there (this caller used it), False when
        another session or process consumed it first.  Raises OSError when the file cannot be written
        (the caller refuses the login: a code that cannot be burnt must not work)."""
        if code.id in self._consumed:
            return False
        with FileLock(self.path):
            entries = self._read_locked()
            kept = [e for e in entries if e.get("id") != code.id and int(e.get("exp", 0)) > time.time()]
            present = len(kept) != len(entries) and any(e.get("id") == code.id for e in entries)
            if present or len(kept) != len(entries):
                self._write_locked(kept)
        self._consumed.add(code.id)
        return present
