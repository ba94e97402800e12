"""The engine interface and the explicit engine registry.

One Engine per protocol (Teleport's shape): the server hands it each accepted
client stream with a ``Session``; ``handle_connection`` runs the core's
session flow (``dbproxy.flow.run_session``), which calls the engine's hooks —
``new_request``/``handshake`` (the client's protocol hello), ``identify``,
``check_route``, ``connect_backend``, ``ready``, ``wiring`` (decoders, stages,
encoders), ``session_ended`` — and renders every refusal and error through
``render_error`` in the client's own wire format.  An engine states its
session ``family`` (database, terminal, desktop, bmc).

Listener kinds (``dbproxy.listen``): an engine lists the kinds it serves in
``listener_kinds`` (default ``("tcp",)``) and implements the matching entry:
``handle_connection(session, stream)`` for tcp and tls (on tls the stream is
the core's ``trio.SSLStream``: ``getpeercert()`` gives the client
certificate), ``handle_datagram_session(session, channel)`` for udp (a
``DatagramSession``; optional ``datagram_session_key(data, peer)``), and
``handle_http_request(session, request) -> HTTPResponse`` for http (optional
``render_http_error(status, message)`` and ``async http_connection_closed(session)``, called when
the client's connection ends: state kept per connection, such as a backend connection).  The core runs every kind through
the same session accounting (``ProxyServer.handle_client``).

Engines also declare what their routes may say (``match_keys``,
``auth_methods``, ``password_methods``) so the config validator can name
mistakes without knowing any database.
"""

from __future__ import annotations

import fnmatch
import logging
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import attrs

from .config import ListenerConfig, RouteConfig
from .errors import AccessDenied, ProxyError, UpstreamError

if TYPE_CHECKING:
    from . import flow

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
    metrics: Any = None  # dbproxy.metrics.ProxyMetrics of the server (None: no server, e.g. unit tests)
    extras: dict = attrs.field(factory=dict)


class Engine:
    protocol: ClassVar[str] = ""
    # Which listener kinds (dbproxy.config.LISTENER_KINDS) this engine serves; the config refuses others.
    listener_kinds: ClassVar[tuple[str, ...]] = ("tcp",)
    family: ClassVar[str] = "database"
    # Session start/end events are ``<event_family>.session.start|end`` (audit needs no change).
    event_family: ClassVar[str] = "db"
    # True: the client proves who it is inside the pipeline (Mongo's SASL commands); the core
    # then neither authorizes at connect nor emits the session start (the engine's gate does).
    identifies_in_band: ClassVar[bool] = False
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
        # Identity and access for this listener (None: no identity/roles/limits configured).
        self.access = services.access.listener(listener.name) if services.access is not None else None

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

    # -- the session flow (dbproxy.flow) --------------------------------------------
    async def handle_connection(self, session: Any, stream: Any) -> None:
        from .flow import run_session  # the engine registry stays importable without trio

        session.family = self.family
        await run_session(self, session, stream)

    async def refuse(self, session: Any, stream: Any, reason: str) -> None:
        """Turn a client away before any session (audit unavailable): handshake, then ``unavailable``."""
        from .flow import refuse_session

        session.family = self.family
        await refuse_session(self, session, stream, reason)

    def new_request(self, session: Any, stream: Any) -> "flow.Request":  # pragma: no cover - interface
        """The client side of a new connection: a ``Request`` with its ``MessageStream``."""
        raise NotImplementedError

    async def handshake(self, session: Any, request: "flow.Request") -> bool:  # pragma: no cover - interface
        """The client's protocol hello (TLS upgrade, startup); fills ``request``.  False: no session
        (a cancel request, a refused TLS handshake).  Runs under the handshake timeout."""
        raise NotImplementedError

    async def identify(self, session: Any, request: "flow.Request") -> None:
        """The client proves who it is (sets ``session.identity``); raise ``flow.Refused`` to turn it away."""

    def check_route(self, session: Any, request: "flow.Request", route: RouteConfig) -> None:
        """Engine-specific conditions of a chosen route; raise ``flow.Refused``."""

    async def connect_backend(self, session: Any, request: "flow.Request", route: RouteConfig,
                              grant: Any) -> "flow.Backend":  # pragma: no cover - interface
        """Log in to the backend with the route's credential (raises UpstreamError / ``flow.Refused``)."""
        raise NotImplementedError

    async def ready(self, session: Any, request: "flow.Request", backend: "flow.Backend") -> None:
        """Tell the client it is in (after the session start is audited)."""

    def wiring(self, session: Any, request: "flow.Request", backend: "flow.Backend",
               grant: Any) -> "flow.Wiring":  # pragma: no cover - interface
        raise NotImplementedError

    async def session_ended(self, session: Any, request: "flow.Request", backend: "flow.Backend",
                            wiring: "flow.Wiring", pipeline: Any) -> dict:
        """After the pipeline: last words to the client; returns the end event's engine fields."""
        return {}

    def render_error(self, request: "flow.Request", exc: ProxyError) -> bytes:  # pragma: no cover - interface
        """Any ProxyError (a ``flow.Refused``, a ProtocolError…) in the client's wire format."""
        raise NotImplementedError

    def no_route(self, request: "flow.Request") -> "flow.Refused":
        from .flow import Refused

        return Refused(f"no route on listener {self.listener.name} for {request.keys!r}")

    def denied(self, session: Any, request: "flow.Request", exc: AccessDenied) -> "flow.Refused":
        """The refusal for a role that does not allow the route, or a connection limit."""
        from .flow import Refused

        return Refused(str(exc))

    def upstream_refused(self, request: "flow.Request", exc: UpstreamError) -> "flow.Refused":
        from .flow import Refused

        return Refused(str(exc), client_message=exc.client_hint)

    def unavailable(self, request: "flow.Request", reason: str) -> "flow.Refused":
        from .flow import Refused

        return Refused(reason)


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
