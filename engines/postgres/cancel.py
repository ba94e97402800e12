"""Cancel keys: the (pid, secret) a client is given and the backend key it stands for.

With several proxy processes (``"workers": N``) each has its own map; the
kernel may hand a CancelRequest (a new connection, §55.2.7) to any of them,
so one that does not know the key asks its siblings through the core's
routing channel (``dbproxy.siblings``, under ``SIBLING_CANCEL``) and the one
holding the session delivers it.  The key the client sees is unchanged (the
backend's real pid, 4 random bytes of secret): no process index in it.
"""

from __future__ import annotations

import os
import struct
from typing import Any

from . import messages as m


# ``"workers": N`` (dbproxy.siblings): the name a CancelRequest is routed under to the proxy
# process that holds the session (the key: pid and secret, as the client sent them).
SIBLING_CANCEL = "postgres.cancel"
_PID = struct.Struct(">I")


def cancel_key_bytes(pid: int, secret: bytes) -> bytes:
    return _PID.pack(pid & 0xFFFFFFFF) + secret


def parse_cancel_key(key: bytes) -> tuple[int, bytes]:
    return _PID.unpack_from(key)[0], key[4:]


class CancelMap:
    """Client-visible (pid, secret) → (route, backend key).  Shared by every Postgres listener.

    The client is given the backend's *real* pid — ``PQbackendPID`` must equal
    ``pg_backend_pid()`` and the pid of NotificationResponse, and a pool's
    ``pg_terminate_backend(pid)`` must reach its own session — with a secret of
    the proxy's own (random; the backend's secret never leaves the proxy).  A
    CancelRequest (§55.2.7) is honoured only when both the pid and the proxy's
    secret match, so knowing a pid (it is visible in ``pg_stat_activity``) is
    not enough to cancel anyone's query.  Two backends on different hosts may
    share a pid: the map is keyed by (pid, secret), and the secret is drawn
    again until the pair is unique.
    """

    def __init__(self) -> None:
        self._map: dict[tuple[int, bytes], tuple[Any, m.BackendKeyData]] = {}

    def issue(self, route: Any, backend_key: m.BackendKeyData | None) -> tuple[int, bytes]:
        while True:
            if backend_key is not None:
                pid = backend_key.pid
            else:  # a backend that sent no BackendKeyData: nothing to cancel, any pid will do
                pid = (struct.unpack(">I", os.urandom(4))[0] & 0x7FFFFFFF) or 1
            secret = os.urandom(4)
            if (pid, secret) not in self._map:
                break
        if backend_key is not None:
            self._map[(pid, secret)] = (route, backend_key)
        return pid, secret

    def lookup(self, pid: int, secret: bytes) -> tuple[Any, m.BackendKeyData] | None:
        return self._map.get((pid, secret))

    def release(self, pid: int, secret: bytes) -> None:
        self._map.pop((pid, secret), None)
