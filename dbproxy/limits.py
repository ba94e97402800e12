"""Connection limits: live sessions per listener and per identity (config root ``limits``).

Strategy.  Counters in the one trio thread (no locks).  A session is
admitted once, before its backend is reached, and released by the server
when it ends; a refused session is never counted, so releasing it frees
nobody's slot.  ``TooManyConnections`` is an ``AccessDenied`` whose reason
names the scope (``too_many_connections_listener`` / ``…_identity``).
"""

from __future__ import annotations

from typing import Any

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


class ConnectionLimits:
    """Live sessions per listener and per identity (user name).  Single trio thread: no locks."""

    def __init__(self, cfg: LimitsConfig | None) -> None:
        self.cfg = cfg or LimitsConfig()
        self.by_listener: dict[str, int] = {}
        self.by_identity: dict[str, int] = {}
        self._admitted: dict[str, tuple[str, str]] = {}

    def reconfigure(self, cfg: LimitsConfig | None) -> None:
        """New limits (a reload): sessions already admitted stay counted against them."""
        self.cfg = cfg or LimitsConfig()

    def admit(self, session: Any) -> None:
        if session.id in self._admitted:
            return
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

    def release(self, session: Any) -> None:
        found = self._admitted.pop(session.id, None)
        if found is None:
            return
        listener, user = found
        self.by_listener[listener] -= 1
        self.by_identity[user] -= 1
