"""The proxy's side of the agents: where they dial in, who is connected, and dialling through them.

Strategy: ``AgentHub.serve`` accepts TLS connections on the ``agents``
address (``dbproxy.agent.config``).  An agent first sends one JSON line, its
hello (``dbproxy.agent.hello``: node name, node token, version); the hub
checks the token (``NodeTokens``: a node token, for this node, unexpired,
unrevoked) and answers one JSON line — refused: a reason, and the connection
closes; accepted: the connection becomes an ``H2Link`` with the proxy in the
HTTP/2 client role.  Several agents may serve one node (HA): ``dial`` picks a
connected one with the fewest open streams and opens a CONNECT stream to the
backend through it; when no agent of the node is connected, or the agent
refuses (not on its allow-list, unreachable), the caller gets an
``UpstreamError`` whose ``client_hint`` the engine renders in its client's
own protocol.

Audit: ``agent.connect`` / ``agent.disconnect`` (node, agent address and
version, the reason it ended), ``agent.refused`` (a bad token: the reason,
never the token), and ``agent.stream.open`` / ``agent.stream.close`` (node,
target, session id, bytes each way) as proxy-level events through the
server's recorder (the ``emit`` callback).  ``status()`` and
``connections()`` are the admin API's ``/api/nodes`` and ``/api/connections``.
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any, Callable

import attrs
import trio

from ..errors import AuthFailed, UpstreamError
from ..logs import SESSION
from ..tls import server_context
from . import hello
from .link import H2Link, LinkLost, LinkStream, StreamRefused

log = logging.getLogger("dbproxy.agent")

AGENT_CONNECT = "agent.connect"
AGENT_DISCONNECT = "agent.disconnect"
AGENT_REFUSED = "agent.refused"
STREAM_OPEN = "agent.stream.open"
STREAM_CLOSE = "agent.stream.close"


@attrs.define(eq=False)
class ConnectedAgent:
    id: int
    node: str
    address: str
    version: str
    link: H2Link
    token_id: str
    connected_at: float = attrs.field(factory=time.time)

    def summary(self) -> dict:
        stats = self.link.statistics()
        return {"id": self.id, "node": self.node, "address": self.address, "version": self.version,
                "connected_at": self.connected_at, "token_id": self.token_id, **stats}


class AgentHub:
    """Connected agents per node name; ``dial`` reaches a backend through one of them."""

    def __init__(self, config: Any, tokens: Any, emit: Callable[..., None] | None = None) -> None:
        self.config = config
        self.tokens = tokens  # dbproxy.agent.tokens.NodeTokens
        self.emit = emit or (lambda kind, **fields: None)
        self.nodes: dict[str, list[ConnectedAgent]] = {}
        self.address: tuple[str, int] | None = None
        self._ids = itertools.count(1)

    # -- the listener ------------------------------------------------------------------------------
    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.config.port, host=self.config.host)
        sockname = listeners[0].socket.getsockname()
        self.address = (sockname[0], sockname[1])
        ctx = server_context(self.config.tls)
        log.info("agents listener on %s:%d", *self.address)
        async with trio.open_nursery() as nursery:
            task_status.started(self.address)
            await trio.serve_listeners(lambda s: self._serve_one(s, ctx), listeners, handler_nursery=nursery)

    async def _serve_one(self, tcp: trio.SocketStream, ctx: Any) -> None:
        address = _peer(tcp)
        tls = trio.SSLStream(tcp, ctx, server_side=True)
        try:
            try:
                with trio.fail_after(self.config.handshake_timeout):
                    await tls.do_handshake()
                    message, rest = await hello.read_line(tls)
            except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError, OSError,
                    hello.HelloError) as exc:
                log.info("agent connection from %s: no valid hello: %s", address, exc)
                return
            agent = await self._admit(tls, address, message, rest)
            if agent is not None:
                await self._hold(agent, rest)
        finally:
            await trio.aclose_forcefully(tls)

    async def _admit(self, tls: trio.SSLStream, address: str, message: dict, rest: bytes) -> ConnectedAgent | None:
        node = message.get("node")
        version = str(message.get("version", "?"))[:64]
        token = message.get("token")
        try:
            if not isinstance(node, str) or not node or not isinstance(token, str):
                raise AuthFailed("the hello names no node or token", reason="bad_hello")
            claims = self.tokens.verify(token, node)
        except AuthFailed as exc:
            reason = getattr(exc, "reason", "token_refused")
            log.warning("agent from %s for node %r refused: %s", address, node, exc)
            self.emit(AGENT_REFUSED, node=node if isinstance(node, str) else None, agent_addr=address,
                      agent_version=version, reason=reason, error=str(exc),
                      **({"attempted_token_id": exc.token_id} if getattr(exc, "token_id", None) else {}))
            with trio.move_on_after(2):
                try:
                    await tls.send_all(hello.encode({"ok": False, "reason": reason, "message": str(exc)}))
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
            return None
        try:
            await tls.send_all(hello.encode({"ok": True, "node": node}))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return None
        link = H2Link(tls, client=True, heartbeat=self.config.heartbeat, heartbeat_timeout=self.config.heartbeat_timeout)
        return ConnectedAgent(next(self._ids), node, address, version, link, claims.jti)

    async def _hold(self, agent: ConnectedAgent, rest: bytes) -> None:
        agent.link._initial = rest  # what came after the hello belongs to HTTP/2
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(agent.link.run)
                # Dialable from now on (the link's tasks run).
                self.nodes.setdefault(agent.node, []).append(agent)
                log.info("agent %d for node %r connected from %s (version %s)", agent.id, agent.node, agent.address,
                         agent.version)
                self.emit(AGENT_CONNECT, node=agent.node, agent_id=agent.id, agent_addr=agent.address,
                          agent_version=agent.version, token_id=agent.token_id)
        finally:
            agents = self.nodes.get(agent.node, [])
            if agent in agents:
                agents.remove(agent)
            if not agents:
                self.nodes.pop(agent.node, None)
            reason = agent.link.lost_reason or "closed"
            log.info("agent %d for node %r disconnected: %s", agent.id, agent.node, reason)
            stats = agent.link.statistics()
            self.emit(AGENT_DISCONNECT, node=agent.node, agent_id=agent.id, agent_addr=agent.address,
                      agent_version=agent.version, reason=reason, streams_opened=stats["streams_opened"],
                      bytes_in=stats["bytes_in"], bytes_out=stats["bytes_out"],
                      duration_ms=round((time.time() - agent.connected_at) * 1000, 3))

    # -- dialling ------------------------------------------------------------------------------------
    def pick(self, node: str) -> ConnectedAgent | None:
        live = [a for a in self.nodes.get(node, ()) if a.link.alive]
        return min(live, key=lambda a: len(a.link.streams)) if live else None

    async def dial(self, node: str, host: str, port: int) -> LinkStream:
        """A stream to ``host:port`` through an agent of ``node``; ``UpstreamError`` when none can."""
        target = f"{host}:{port}"
        tried = 0
        while True:
            agent = self.pick(node)
            if agent is None:
                why = "no agent connected" if not tried else "its agents' links broke"
                raise UpstreamError(
                    f"cannot reach {target} through node {node!r}: {why}", kind="connect",
                    client_hint=f"the proxy cannot reach {target}: no agent of node {node!r} is connected")
            tried += 1
            try:
                stream = await agent.link.open_stream(host, port)
            except StreamRefused as exc:
                what = {403: "refused by the agent", 503: "the agent is busy"}.get(exc.status, "unreachable from the agent")
                raise UpstreamError(
                    f"cannot reach {target} through node {node!r}: {what} ({exc.status} {exc.reason})",
                    kind="connect",
                    client_hint=f"the agent of node {node!r} cannot reach {target}: {exc.reason}") from None
            except LinkLost:
                continue  # that agent just went away: another of the node may still serve
            break
        session_id = SESSION.get(None)
        stream.session_id = session_id
        stream.on_close = lambda s, a=agent: self._closed(a, s)
        self.emit(STREAM_OPEN, node=node, agent_id=agent.id, target=target, session_id=session_id,
                  stream_id=stream.stream_id)
        return stream

    def _closed(self, agent: ConnectedAgent, stream: LinkStream) -> None:
        self.emit(STREAM_CLOSE, node=agent.node, agent_id=agent.id, target=stream.authority,
                  session_id=stream.session_id, stream_id=stream.stream_id, bytes_to_target=stream.bytes_out,
                  bytes_from_target=stream.bytes_in, reason=stream.reset or "closed",
                  duration_ms=round((time.time() - stream.opened_at) * 1000, 3))

    # -- status (the admin API) ----------------------------------------------------------------------
    def status(self) -> dict:
        return {"nodes": [{"node": node, "agents": [a.summary() for a in agents]}
                          for node, agents in sorted(self.nodes.items())]}

    def connections(self) -> dict:
        rows = []
        for node, agents in sorted(self.nodes.items()):
            for agent in agents:
                for stream in list(agent.link.streams.values()):
                    rows.append({"node": node, "agent_id": agent.id, "stream_id": stream.stream_id,
                                 "target": stream.authority, "session_id": stream.session_id,
                                 "opened_at": stream.opened_at, "bytes_to_target": stream.bytes_out,
                                 "bytes_from_target": stream.bytes_in})
        return {"connections": rows}


def _peer(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
    except OSError:
        return "unknown"
    return f"{host}:{port}"
