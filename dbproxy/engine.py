"""The engine interface and the explicit engine registry.

One Engine per protocol (Teleport's shape): the server hands it each accepted
client stream with a ``Session``; the engine does the protocol's handshake
(startup, TLS upgrade, proxy-owned backend authentication), then runs the
session's ``Pipeline`` and returns when the session is over.  Errors for the
client are rendered in the client's own wire format by the engine.

Listener kinds (``dbproxy.listen``): an engine lists the kinds it serves in
``listener_kinds`` (default ``("tcp",)``) and implements the matching entry:
``handle_connection(session, stream)`` for tcp and tls (on tls the stream is
the core's ``trio.SSLStream``: ``getpeercert()`` gives the client
certificate), ``handle_datagram_session(session, channel)`` for udp (a
``DatagramSession``; optional ``datagram_session_key(data, peer)``), and
``handle_http_request(session, request) -> HTTPResponse`` for http (optional
``render_http_error(status, message)``).  The core runs every kind through
the same session accounting (``ProxyServer.handle_client``).

Engines also declare what their routes may say (``match_keys``,
``auth_methods``, ``password_methods``) so the config validator can name
mistakes without knowing any database.
"""

from __future__ import annotations

import fnmatch
import logging
from typing import Any, Callable, ClassVar

import attrs

from .config import ListenerConfig, RouteConfig

log = logging.getLogger("dbproxy.engine")

# How long a client has for its handshake (startup, TLS upgrade, proving who it is)
# unless the listener says otherwise (``handshake_timeout_seconds``).
DEFAULT_HANDSHAKE_TIMEOUT = 30.0


@attrs.define(eq=False)
class Services:
    """Process-wide things engines share: the audit recorder, credential providers, the buffer budget."""

    recorder: Any
    credentials: Any = None  # dbproxy.kerberos.CredentialCache when Kerberos routes exist
    access: Any = None  # identity/RBAC policy, when configured
    # dbproxy.buffer.BufferBudget: engines pass it to client MessageStreams and the Pipeline
    # (None: unbounded, e.g. unit tests of other things).
    buffers: Any = None
    extras: dict = attrs.field(factory=dict)


class Engine:
    protocol: ClassVar[str] = ""
    # Which listener kinds (dbproxy.config.LISTENER_KINDS) this engine serves; the config refuses others.
    listener_kinds: ClassVar[tuple[str, ...]] = ("tcp",)
    match_keys: ClassVar[tuple[str, ...]] = ()
    auth_methods: ClassVar[tuple[str, ...]] = ()
    password_methods: ClassVar[tuple[str, ...]] = ()
    default_max_message_size: ClassVar[int] = 64 * 1024 * 1024
    # The protocol's own ceiling for one message: the config refuses a larger
    # ``max_message_size`` and names the source (None: the protocol sets none).
    max_message_size_limit: ClassVar[int | None] = None
    max_message_size_limit_source: ClassVar[str] = ""

    def __init__(self, listener: ListenerConfig, services: Services) -> None:
        self.listener = listener
        self.services = services
        self.max_message_size = listener.max_message_size or self.default_max_message_size

    def select_route(self, requested: dict[str, str]) -> RouteConfig | None:
        """First route whose every glob matches what the client asked for (case-sensitive)."""
        for route in self.listener.routes:
            if all(fnmatch.fnmatchcase(requested.get(key) or "", glob) for key, glob in route.match.items()):
                return route
        return None

    @property
    def handshake_timeout(self) -> float:
        return self.listener.handshake_timeout or DEFAULT_HANDSHAKE_TIMEOUT

    def handshake_timed_out(self, session: Any, what: str, **fields: Any) -> None:
        """A client that did not finish its handshake in time: one log line and a failed
        ``db.session.start`` (a slow or stalled client is something an auditor wants to see,
        and it held a connection slot for the whole timeout)."""
        log.info("session %s from %s: %s after %gs", session.id, session.client_addr, what, self.handshake_timeout)
        session.details["end_reason"] = what
        if session.audit is not None:
            session.audit.on_session_start(success=False, error=what, timeout_seconds=self.handshake_timeout, **fields)

    async def handle_connection(self, session: Any, stream: Any) -> None:  # pragma: no cover - interface
        raise NotImplementedError


class EngineRegistry:
    def __init__(self) -> None:
        self._engines: dict[str, Callable[..., Engine]] = {}

    def register(self, protocol: str, factory: Any) -> None:
        if protocol in self._engines:
            raise ValueError(f"engine for {protocol!r} registered twice")
        self._engines[protocol] = factory

    def get(self, protocol: str) -> Any:
        return self._engines[protocol]

    def names(self) -> list[str]:
        return sorted(self._engines)
