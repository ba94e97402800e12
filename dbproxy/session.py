"""What the proxy knows about one client connection.

The session model is protocol-family neutral: ``target`` is what the client
reaches on the backend (a database, a host's shell, a desktop, a BMC),
``login`` the account it acts as there, ``family`` which kind of session it is
(``database``, ``terminal``, ``desktop``, ``bmc``).  Database sessions keep
Teleport's names for these, ``db_name`` / ``db_user`` (the audit trail's
``db.*`` field names), as aliases of ``target`` / ``login``.
"""

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


FAMILIES = ("database", "terminal", "desktop", "bmc")


@attrs.define(eq=False, init=False)
class Session:
    listener: str
    protocol: str
    client_addr: str
    family: str = "database"
    # The load balancer the connection came through when a PROXY protocol header named the client.
    balancer_addr: str | None = None
    # Prefix of the session start/end events: Teleport's ``db`` for databases; an engine of
    # another family names its own (``ssh`` → ``ssh.session.start``/``ssh.session.end``).
    event_family: str = "db"
    id: str = attrs.field(factory=new_session_id)
    identity: Identity = ANONYMOUS
    start_time: float = attrs.field(factory=time.time)
    started: bool = False
    route_name: str | None = None
    backend_addr: str | None = None
    target: str | None = None
    login: str | None = None
    audit: Any = None
    # Engine-specific facts worth showing in logs (client application name, driver…).
    details: dict = attrs.field(factory=dict)

    def __init__(self, *args: Any, db_name: str | None = None, db_user: str | None = None, **kwargs: Any) -> None:
        # ``db_name`` / ``db_user`` are accepted as the database family's names of target / login.
        if db_name is not None:
            kwargs.setdefault("target", db_name)
        if db_user is not None:
            kwargs.setdefault("login", db_user)
        self.__attrs_init__(*args, **kwargs)

    @property
    def db_name(self) -> str | None:
        return self.target

    @db_name.setter
    def db_name(self, value: str | None) -> None:
        self.target = value

    @property
    def db_user(self) -> str | None:
        return self.login

    @db_user.setter
    def db_user(self, value: str | None) -> None:
        self.login = value
