"""State files of the identity layer: re-read on change, rewritten atomically under a lock.

Strategy: the proxy reads the token registry and the revocation list on
use, parsing again only when (inode, size, mtime) changes, so ``dbproxy
token revoke`` takes effect without a restart.  Writers (the token CLI)
take an ``flock`` on ``<file>.lock``, write a temporary file, fsync it and
``rename`` it over the old one, so a reader sees the old or the new file,
never half of one.
"""

from __future__ import annotations

import fcntl
import logging
import os
from typing import Any

log = logging.getLogger("dbproxy.identity")


class WatchedFile:
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


def parse_revocations(data: bytes) -> frozenset[str]:
    ids = set()
    for line in data.decode("utf-8", "replace").splitlines():
        word = line.split("#", 1)[0].strip()
        if word:
            ids.add(word)
    return frozenset(ids)


def atomic_write(path: str, data: bytes, mode: int = 0o600) -> None:
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


class FileLock:
    """An exclusive ``flock`` on ``<path>.lock`` around read-modify-write of a state file."""

    def __init__(self, path: str) -> None:
        self.path = path + ".lock"

    def __enter__(self) -> "FileLock":
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: Any) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
