"""One-time login codes: short, single-use secrets for clients whose protocol carries only a short password.

Strategy.  Some clients cannot send a proxy token: a classic VNC viewer
answers a challenge with a password of at most 8 characters.  For them
``dbproxy token issue --code`` (alias ``--vnc``) makes a *code*: 8 characters
from an unambiguous alphabet, bound to a user, roles and one target,
expiring after ``ttl`` seconds (default 60), good for one login.

The codes live in a state file (``identity.token.codes_file``) that the
command line writes and the proxy reads, as the token registry does: each
entry signed with the token key (whoever can write the file but does not
hold the key cannot grant themselves anything), rewritten atomically under a
lock.  A challenge–response protocol needs the secret itself on the
verifying side, so the file holds the codes (0600); they live a minute and
die at first use.  The engine checks a client's answer against each pending
code (``pending``) and then ``consume``s the one that matched: ``consume``
removes it from the file under the lock and says whether it was still there,
so a code is accepted once even when two proxies share the file.  Nothing
here logs a code.
"""

from __future__ import annotations

import logging
import secrets
import time

import attrs
import orjson

from .files import FileLock, WatchedFile, atomic_write
from .keys import TokenKeys, b64url, b64url_decode

log = logging.getLogger("dbproxy.identity")

# No 0/O, 1/l/I: read off a screen and typed into a viewer's password box.
ALPHABET = "abcdefghijkmnpqrstuvwxyz23456789"
CODE_LENGTH = 8
DEFAULT_CODE_TTL = 60
MAX_CODE_TTL = 3600
_CONTEXT = b"dbproxy-one-time-code-v1\0"


@attrs.frozen
class CodeEntry:
    id: str
    code: str = attrs.field(repr=False)
    user: str
    roles: tuple[str, ...]
    target: str
    iat: int
    exp: int
    signature: bytes = attrs.field(repr=False, default=b"")
    used: bool = False  # used up (kept until it expires, so a second use is told apart from a wrong code)

    def signed_bytes(self) -> bytes:
        body = {"id": self.id, "code": self.code, "user": self.user, "roles": list(self.roles), "target": self.target,
                "iat": self.iat, "exp": self.exp}
        return _CONTEXT + orjson.dumps(body, option=orjson.OPT_SORT_KEYS)

    def to_json(self) -> dict:
        return {"code": self.code, "user": self.user, "roles": list(self.roles), "target": self.target,
                "iat": self.iat, "exp": self.exp, "sig": b64url(self.signature)}


class OneTimeCodes:
    """The codes file: ``{"version": 1, "codes": {id: entry}}``."""

    def __init__(self, path: str, keys: TokenKeys) -> None:
        self.path = path
        self.keys = keys
        self._file = WatchedFile(path, self._parse, {})

    def _parse(self, data: bytes) -> dict[str, CodeEntry]:
        try:
            doc = orjson.loads(data) if data.strip() else {}
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"not JSON: {exc}") from None
        out = {}
        for cid, e in (doc.get("codes") or {}).items():
            try:
                entry = CodeEntry(cid, e["code"], e["user"], tuple(e["roles"]), e["target"], int(e["iat"]),
                                  int(e["exp"]), b64url_decode(e["sig"]), bool(e.get("used")))
            except (KeyError, TypeError, ValueError):
                log.warning("codes file %s: entry %s is malformed: ignored", self.path, str(cid)[:32])
                continue
            if not self.keys.verify(entry.signed_bytes(), entry.signature):
                log.warning("codes file %s: entry %s has a bad signature: ignored", self.path, str(cid)[:32])
                continue
            out[cid] = entry
        return out

    def pending(self) -> list[CodeEntry]:
        """The codes in the file (signature checked), used and expired ones included: the caller
        tells a code used up or expired apart from a wrong one (``issue`` prunes expired entries)."""
        try:
            return list(self._file.get().values())
        except OSError as exc:
            log.error("codes file %s unreadable (%s): no code logins", self.path, exc.strerror or exc)
            return []

    def _read_doc(self) -> dict:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return {"version": 1, "codes": {}}
        doc = orjson.loads(data) if data.strip() else {}
        doc.setdefault("version", 1)
        doc.setdefault("codes", {})
        return doc

    def issue(self, user: str, roles: tuple[str, ...], target: str, ttl: int = DEFAULT_CODE_TTL, *,
              now: float | None = None) -> CodeEntry:
        """A new code (expired ones are pruned on the way)."""
        now = time.time() if now is None else now
        code = "".join(secrets.choice(ALPHABET) for _ in range(CODE_LENGTH))
        unsigned = CodeEntry(secrets.token_hex(8), code, user, tuple(roles), target, int(now), int(now) + ttl)
        entry = attrs.evolve(unsigned, signature=self.keys.sign(unsigned.signed_bytes()))
        with FileLock(self.path):
            doc = self._read_doc()
            codes = {c: e for c, e in doc["codes"].items() if int(e.get("exp", 0)) > now}
            codes[entry.id] = entry.to_json()
            doc["codes"] = codes
            atomic_write(self.path, orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")
        return entry

    def consume(self, entry_id: str, *, now: float | None = None) -> bool:
        """Use a code up: True when it was there and unused (this login is the one that used it).
        The entry stays, marked used, until it expires and ``issue`` prunes it."""
        now = time.time() if now is None else now
        with FileLock(self.path):
            doc = self._read_doc()
            entry = doc["codes"].get(entry_id)
            if entry is None or entry.get("used"):
                return False
            entry["used"] = int(now)
            atomic_write(self.path, orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")
        return True
