"""Single-use login codes: issued by ``dbproxy token issue --code KIND``, used once by the proxy.

Strategy.  Some protocols cannot carry a proxy token: a classic VNC viewer
answers a challenge with a password of at most 8 characters; IPMI v2.0
passwords are at most 20 bytes, and RAKP message 2 hands anyone who names a
user an HMAC of that user's password (offline-crackable).  For those,
``token issue`` writes a short random *code* bound to a user, roles, one
target and a minute or a few of life; the client uses it as its password
once.  Engines declare the kinds they accept (``Engine.onetime_codes``:
kind → ``length``, ``ttl`` (default), ``max_ttl``, ``alphabet``,
``max_name``; see ``kind_spec``); this module knows no protocol.

The codes live in one state file: ``identity.token.codes_file``, by default
``<identity.token.registry_file>.codes`` (``codes_path``: the command line
and every engine find it the same way).  JSON ``{"codes": [entry, …]}``,
mode 0600, rewritten atomically and fsync'd under an ``flock``
(``dbproxy.identity.files``): the CLI appends, the proxy reads it when it
changes.  Each entry is signed with the token key (as the registry's are),
so whoever can write the file but does not hold the key cannot grant
themselves roles.  The code is stored as issued (a challenge-response
protocol needs the secret itself: VNC's DES key, RAKP's Kuid), which is why
it is short-lived, single-use and the file private.

Using a code (``consume``) *marks* its entry used, under the lock, and says
whether this caller was the one that did: a code works once even across
proxy processes sharing the file.  A used entry stays until it expires, so
an engine can tell a second use from a wrong code (``entries`` lists them
all, used and expired included); every write drops expired entries.  The
``used`` mark is not signed (the proxy holds only the verifying key);
clearing it needs write access to the file, which could as well restore an
older copy — the file's mode is the protection there, the short life the
bound.

Two ways to find a code, as the protocol allows:

* by *login name* (``lookup``), when the protocol carries one in the clear
  before the proof (RAKP 1's user name): one outstanding code per (kind,
  name) — issuing a new one replaces the previous, because the protocol
  must pick the key before the client proves which code it holds;
* without one (``entries``; kind declared with ``max_name`` 0), when the
  client proves a secret and names nothing (VNC authentication): the engine
  tries the answer against each of the kind's codes.

Nothing here logs a code.
"""

from __future__ import annotations

import secrets
import string
import time
from typing import Any

import attrs
import orjson

from .identity.files import FileLock, WatchedFile, atomic_write
from .identity.keys import TokenKeys, b64url, b64url_decode

ALPHABET = string.ascii_letters + string.digits  # printable, shell- and URL-safe
_CONTEXT = b"dbproxy-onetime-code-v1\0"
# Why no code can be issued or accepted: neither file setting is there.
NO_CODES_FILE = ("neither identity.token.codes_file nor identity.token.registry_file is configured: single-use "
                 "login codes have no file (set codes_file, or registry_file to keep them next to it)")


def kind_spec(spec: dict) -> dict:
    """An engine's declaration of a kind, with the defaults filled in: ``length`` (characters, 20),
    ``alphabet`` (``ALPHABET``), ``ttl`` (seconds, 300: the default life), ``max_ttl`` (the longest
    ``--ttl`` accepted, default ``ttl``), ``max_name`` (bytes of the login name the code is bound to,
    255; 0: the protocol carries no name, codes are found by trying each)."""
    out = {"length": 20, "alphabet": ALPHABET, "ttl": 300, "max_name": 255, **spec}
    out.setdefault("max_ttl", out["ttl"])
    return out


def codes_path(token_cfg: Any) -> str | None:
    """The codes file of an ``identity.token`` config (``TokenConfig``): ``codes_file``, else
    ``<registry_file>.codes``; None when neither is set (``NO_CODES_FILE`` says so to an operator)."""
    if token_cfg is None:
        return None
    if token_cfg.codes_file:
        return token_cfg.codes_file
    return token_cfg.registry_file + ".codes" if token_cfg.registry_file else None


def store_for(authority: Any) -> "CodeStore | None":
    """A ``CodeStore`` on the token authority's codes file with its keys, or None (no file configured)."""
    path = codes_path(authority.cfg) if authority is not None else None
    return CodeStore(path, authority.keys) if path else None


@attrs.frozen
class Code:
    id: str
    kind: str
    name: str  # the login name the client presents; "" for a kind without one
    user: str
    roles: tuple[str, ...]
    target: str | None
    iat: int
    exp: int
    secret: bytes = attrs.field(repr=False)
    used: int = 0  # when it was used up (0: not yet); not signed, see the module docstring

    def _signed(self) -> bytes:
        return _CONTEXT + orjson.dumps(self._body(), option=orjson.OPT_SORT_KEYS)

    def _body(self) -> dict:
        return {"id": self.id, "kind": self.kind, "name": self.name, "user": self.user, "roles": list(self.roles),
                "target": self.target, "iat": self.iat, "exp": self.exp, "secret": b64url(self.secret)}

    def to_json(self, keys: TokenKeys) -> dict:
        return {**self._body(), "sig": b64url(keys.sign(self._signed()))}

    @classmethod
    def from_json(cls, d: dict) -> tuple["Code", bytes]:
        code = cls(str(d["id"]), str(d["kind"]), str(d["name"]), str(d["user"]), tuple(d["roles"]),
                   d.get("target"), int(d["iat"]), int(d["exp"]), b64url_decode(d["secret"]), int(d.get("used") or 0))
        return code, b64url_decode(d["sig"])


def _parse(data: bytes) -> list[dict]:
    if not data.strip():
        return []
    doc = orjson.loads(data)
    if not isinstance(doc, dict) or not isinstance(doc.get("codes"), list):
        raise ValueError("not a codes file (expected {\"codes\": [...]})")
    return doc["codes"]


class CodeStore:
    """The codes file: ``issue`` (the CLI); ``lookup`` / ``entries`` and ``consume`` (the proxy)."""

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
              length: int = 20, alphabet: str = ALPHABET, now: float | None = None) -> Code:
        """A new code (expired entries are pruned on the way; a named one replaces the (kind, name)'s)."""
        now = int(time.time() if now is None else now)
        secret = "".join(secrets.choice(alphabet) for _ in range(length)).encode()
        code = Code(secrets.token_hex(8), kind, name, user, tuple(roles), target, now, now + ttl, secret)
        with FileLock(self.path):
            entries = [e for e in self._read_locked()
                       if int(e.get("exp", 0)) > now and not (name and e.get("kind") == kind and e.get("name") == name)]
            entries.append(code.to_json(self.keys))
            self._write_locked(entries)
        return code

    def entries(self, kind: str) -> list[Code]:
        """The kind's correctly signed codes, used and expired ones included (an engine tells a code used
        up or expired apart from a wrong one); oldest first.  Raises OSError when the file is unreadable."""
        found = []
        for entry in self._file.get():
            if entry.get("kind") != kind:
                continue
            try:
                code, sig = Code.from_json(entry)
            except (KeyError, TypeError, ValueError):
                continue
            if self.keys.verify(code._signed(), sig):
                found.append(attrs.evolve(code, used=code.used or int(code.id in self._consumed)))
        return sorted(found, key=lambda c: c.iat)

    def lookup(self, kind: str, name: str, *, now: float | None = None) -> Code | None:
        """The outstanding (unused, unexpired) code for (kind, name), or None."""
        now = time.time() if now is None else now
        live = [c for c in self.entries(kind) if c.name == name and not c.used and c.exp > now]
        return live[-1] if live else None

    def consume(self, code: Code, *, now: float | None = None) -> bool:
        """Use ``code`` up: True when it was there and unused (this caller used it), False when it is gone or
        another session or process used it first.  The entry stays, marked used, until it expires.  Raises
        OSError when the file cannot be written (the caller refuses the login: a code that cannot be
        burnt must not work)."""
        if code.id in self._consumed:
            return False
        now = int(time.time() if now is None else now)
        with FileLock(self.path):
            entries = self._read_locked()
            mine = next((e for e in entries if e.get("id") == code.id), None)
            fresh = mine is not None and not mine.get("used")
            if fresh:
                mine["used"] = now
            kept = [e for e in entries if int(e.get("exp", 0)) > now or e is mine]
            if fresh or len(kept) != len(entries):
                self._write_locked(kept)
        self._consumed.add(code.id)
        return fresh
