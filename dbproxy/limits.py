"""Connection limits: live sessions per listener and per identity (config root ``limits``).

Strategy.  Counters in the one trio thread (no locks).  A session is
admitted once, before its backend is reached, and released by the server
when it ends; a refused session is never counted, so releasing it frees
nobody's slot.  ``TooManyConnections`` is an ``AccessDenied`` whose reason
names the scope (``too_many_connections_listener`` / ``…_identity``).

Several proxy processes (``"workers": N``, dbproxy.workers): the counts live
in ``SharedCounts``, a small table in a shared memory file of the
supervisor's state directory, read and changed under an exclusive
``flock`` — admit stays synchronous (a stage may call it) and costs two
system calls per session, not per message.  Each slot holds a key (a hash of
scope and name) and one count per process, so the supervisor can drop a
dead process's counts (``clear_worker``) without knowing its sessions; the
limit is checked against the sum.  With one process nothing of this runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import mmap
import os
import struct
from typing import Any, Iterator

import attrs

from .errors import AccessDenied

LIMITS_KEYS = {"max_connections_per_identity", "max_connections_per_listener", "identities", "listeners"}


@attrs.frozen
class LimitsConfig:
    per_identity: int | None = None
    per_listener: int | None = None
    identities: dict = attrs.field(factory=dict)  # user -> limit
    listeners: dict = attrs.field(factory=dict)  # listener name -> limit


def validate_limits(v: Any, raw: Any, path: str = "limits") -> LimitsConfig | None:
    d = v.section(raw, path, LIMITS_KEYS)
    if d is None:
        return None
    maps = {}
    for key in ("identities", "listeners"):
        sub = d.get(key, {})
        sd = v.obj(sub, f"{path}.{key}", "an object of name → connection limit")
        maps[key] = {}
        for name in sd or {}:
            limit = v.integer(sd, name, f"{path}.{key}", minimum=1)
            if limit is not None:
                maps[key][name] = limit
    return LimitsConfig(
        per_identity=v.integer(d, "max_connections_per_identity", path, minimum=1),
        per_listener=v.integer(d, "max_connections_per_listener", path, minimum=1),
        identities=maps["identities"],
        listeners=maps["listeners"],
    )


class TooManyConnections(AccessDenied):
    def __init__(self, message: str, *, scope: str) -> None:
        super().__init__(message, reason=f"too_many_connections_{scope}")
        self.scope = scope  # "listener" or "identity"


class SharedCounts:
    """Counts shared by the proxy processes of one supervisor (a file mapped by each of them).

    ``SLOTS`` slots of ``KEY`` bytes (blake2b of scope and name; all zero: never used) and
    ``workers`` little 32-bit counts (one per process index).  Open addressing: a lookup walks
    from the key's home slot to the key or a never-used slot; a key whose counts are all zero is
    as good as absent, and its slot is taken again by the next new key that passes it."""

    SLOTS = 16384
    KEY = 8

    def __init__(self, path: str, workers: int, index: int) -> None:
        self.workers = workers
        self.index = index
        self.slot_size = self.KEY + 4 * workers
        self._counts = struct.Struct(f"<{workers}i")
        self._one = struct.Struct("<i")
        self.fd = os.open(path, os.O_RDWR)
        self.map = mmap.mmap(self.fd, self.SLOTS * self.slot_size)

    @classmethod
    def create(cls, path: str, workers: int) -> None:
        """The supervisor makes the (zeroed) file before it starts the processes."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, cls.SLOTS * (cls.KEY + 4 * workers))
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    @staticmethod
    def key(scope: str, name: str) -> bytes:
        k = hashlib.blake2b(f"{scope}\0{name}".encode(), digest_size=SharedCounts.KEY).digest()
        return k if any(k) else b"\x01" + k[1:]

    def _slot(self, key: bytes, insert: bool) -> int | None:
        """Offset of ``key``'s slot (with ``insert``: a new one if absent); call under ``locked``."""
        m, size, empty = self.map, self.slot_size, bytes(self.KEY)
        home = int.from_bytes(key[:4], "little") % self.SLOTS
        free = None
        for i in range(self.SLOTS):
            at = ((home + i) % self.SLOTS) * size
            found = m[at:at + self.KEY]
            if found == key:
                return at
            if found == empty:
                break
            if free is None and insert and not any(self._counts.unpack_from(m, at + self.KEY)):
                free = at  # a key no process counts any more: reusable
        else:
            at = None
        if not insert:
            return None
        if free is None:
            free = at
        if free is None:
            raise RuntimeError("connection limits: the shared table is full")
        m[free:free + size] = key + bytes(size - self.KEY)
        return free

    def total(self, key: bytes) -> int:
        at = self._slot(key, insert=False)
        return 0 if at is None else sum(self._counts.unpack_from(self.map, at + self.KEY))

    def add(self, key: bytes, delta: int) -> None:
        at = self._slot(key, insert=True) + self.KEY + 4 * self.index
        (n,) = self._one.unpack_from(self.map, at)
        self._one.pack_into(self.map, at, max(0, n + delta))

    def clear_worker(self, index: int) -> None:
        """A process died: its sessions are gone, so are its counts (the supervisor calls this)."""
        with self.locked():
            for slot in range(self.SLOTS):
                at = slot * self.slot_size + self.KEY + 4 * index
                self._one.pack_into(self.map, at, 0)


def _shared_counts() -> SharedCounts | None:
    """This process's view of the supervisor's shared counts; None with one process."""
    from .workerctx import current

    ctx = current()
    if ctx is None:
        return None
    if ctx.counts is None:
        ctx.counts = SharedCounts(ctx.limits_file, ctx.count, ctx.index)
    return ctx.counts


class ConnectionLimits:
    """Live sessions per listener and per identity (user name).  Single trio thread: no locks
    (across processes: ``SharedCounts``)."""

    def __init__(self, cfg: LimitsConfig | None) -> None:
        self.cfg = cfg or LimitsConfig()
        self.by_listener: dict[str, int] = {}
        self.by_identity: dict[str, int] = {}
        self._admitted: dict[str, tuple[str, str]] = {}
        self.shared = _shared_counts()

    def reconfigure(self, cfg: LimitsConfig | None) -> None:
        """New limits (a reload): sessions already admitted stay counted against them."""
        self.cfg = cfg or LimitsConfig()

    def admit(self, session: Any) -> None:
        if session.id in self._admitted:
            return
        if self.shared is not None:
            return self._admit_shared(session)
        listener, user = session.listener, session.identity.user
        lim = self.cfg.listeners.get(listener, self.cfg.per_listener)
        if lim is not None and self.by_listener.get(listener, 0) >= lim:
            raise TooManyConnections(f"listener {listener!r} has {lim} connections (its limit)", scope="listener")
        lim = self.cfg.identities.get(user, self.cfg.per_identity)
        if lim is not None and self.by_identity.get(user, 0) >= lim:
            raise TooManyConnections(f"{user!r} has {lim} connections (the limit per identity)", scope="identity")
        self.by_listener[listener] = self.by_listener.get(listener, 0) + 1
        self.by_identity[user] = self.by_identity.get(user, 0) + 1
        self._admitted[session.id] = (listener, user)

    def _admit_shared(self, session: Any) -> None:
        """``admit`` against every process's sessions (``SharedCounts``)."""
        listener, user = session.listener, session.identity.user
        shared = self.shared
        lkey, ikey = shared.key("listener", listener), shared.key("identity", user)
        with shared.locked():
            lim = self.cfg.listeners.get(listener, self.cfg.per_listener)
            if lim is not None and shared.total(lkey) >= lim:
                raise TooManyConnections(f"listener {listener!r} has {lim} connections (its limit)", scope="listener")
            lim = self.cfg.identities.get(user, self.cfg.per_identity)
            if lim is not None and shared.total(ikey) >= lim:
                raise TooManyConnections(f"{user!r} has {lim} connections (the limit per identity)", scope="identity")
            shared.add(lkey, 1)
            shared.add(ikey, 1)
        self.by_listener[listener] = self.by_listener.get(listener, 0) + 1
        self.by_identity[user] = self.by_identity.get(user, 0) + 1
        self._admitted[session.id] = (listener, user)

    def release(self, session: Any) -> None:
        found = self._admitted.pop(session.id, None)
        if found is None:
            return
        listener, user = found
        self.by_listener[listener] -= 1
        self.by_identity[user] -= 1
        shared = self.shared
        if shared is not None:
            with shared.locked():
                shared.add(shared.key("listener", listener), -1)
                shared.add(shared.key("identity", user), -1)
