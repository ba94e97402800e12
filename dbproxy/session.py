"""What the proxy knows about one client connection."""

from __future__ import annotations

import os
import time
from typing import Any

import attrs


@attrs.frozen
class Identity:
    """Who the client proved to be.  Until a listener authenticates clients, ``anonymous``."""

    user: str = "anonymous"
    roles: tuple[str, ...] = ()
    method: str = "anonymous"
    token_id: str | None = None


ANONYMOUS = Identity()


def new_session_id() -> str:
    return os.urandom(16).hex()


@attrs.define(eq=False)
class Session:
    listener: str
    protocol: str
    client_addr: str
    id: str = attrs.field(factory=new_session_id)
    identity: Identity = ANONYMOUS
    start_time: float = attrs.field(factory=time.time)
    started: bool = False
    route_name: str | None = None
    backend_addr: str | None = None
    db_name: str | None = None
    db_user: str | None = None
    audit: Any = None
    # Engine-specific facts worth showing in logs (client application name, driver…).
    details: dict = attrs.field(factory=dict)
