"""Backend connections: the one dial every engine uses.  Callers set deadlines (``trio.fail_after``);
these functions take none.

``connect_backend(host, port, via=...)`` dials directly, or — for a backend
whose config says ``"via": "agent:NODE"`` — opens a CONNECT stream through a
connected agent of that node (``dbproxy.agent.hub.AgentHub.dial``).  Either
way the engine gets a ``trio.abc.HalfCloseableStream`` and failures are an
``UpstreamError`` with a client hint.  The server makes its agent hub
reachable through the ``AGENTS`` context variable, set once in
``ProxyServer.run`` and so inherited by every session task (as the session
id is, ``dbproxy.logs.SESSION``): the protocol code that dials (a backend
login, a cancel request, a BMC connection pool) needs no extra parameter.
"""

from __future__ import annotations

import contextvars
from typing import Any

import trio

from .errors import UpstreamError

# The running server's dbproxy.agent.hub.AgentHub (None: no "agents" section, or no server).
AGENTS: contextvars.ContextVar[Any] = contextvars.ContextVar("dbproxy_agents", default=None)


async def connect_backend(host: str, port: int, *, via: str | None = None) -> trio.abc.HalfCloseableStream:
    if via is not None:
        return await _through_agent(via, host, port)
    try:
        return await trio.open_tcp_stream(host, port)
    except OSError as exc:
        raise UpstreamError(
            f"could not connect to backend {host}:{port}: {exc.strerror or exc}",
            kind="connect",
            client_hint=f"the proxy could not connect to the backend database at {host}:{port}",
        ) from None


async def _through_agent(via: str, host: str, port: int) -> trio.abc.HalfCloseableStream:
    from .agent.config import via_node

    node = via_node(via)
    hub = AGENTS.get()
    if node is None or hub is None:
        raise UpstreamError(
            f"backend {host}:{port} is reached via {via!r}, but this proxy serves no agents",
            kind="connect", client_hint=f"the proxy cannot reach {host}:{port}: no agent listener is configured")
    return await hub.dial(node, host, port)


def peer_address(stream: trio.abc.Stream) -> str:
    client_addr = getattr(stream, "client_addr", None)  # a UDP DatagramSession knows its peer
    if isinstance(client_addr, str):
        return client_addr
    sock = getattr(stream, "socket", None)
    if sock is None:
        inner = getattr(stream, "transport_stream", None)
        return peer_address(inner) if inner is not None else "unknown"
    try:
        host, port = sock.getpeername()[:2]
    except OSError:
        return "unknown"
    return f"{host}:{port}"
