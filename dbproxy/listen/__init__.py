"""Listener kinds: how the core opens a listener and what it hands the engine.

Strategy: a listener's ``kind`` (``dbproxy.config.LISTENER_KINDS``) picks how
its socket is opened and served; whatever the kind, each connection — or, for
UDP, each peer — becomes one call of ``ProxyServer.handle_client(entry, lc,
transport)``, so every kind gets the same ``Session``, limits, audit end and
closing.  ``entry`` adapts the engine to that call:

- ``tcp``: the engine itself (``handle_connection(session, stream)``); no
  adapter, nothing added to today's path.
- ``tls``: ``TLSEntry`` terminates TLS (``dbproxy.tls.server_context`` of the
  listener's ``tls`` section, the engine's handshake timeout) and hands the
  engine the ``trio.SSLStream``: ``stream.getpeercert()`` is the verified
  client certificate (``ClientAuthenticator.certificate_identity(stream)``
  works on it unchanged).
- ``udp``: ``DatagramEntry`` runs ``handle_datagram_session(session,
  channel)`` inside the session's idle scope (``dbproxy.listen.udp``).
- ``http``: ``HTTPEntry`` runs the core's HTTP/1.1 loop over the (optionally
  TLS) stream and calls ``handle_http_request(session, request)`` per request
  (``dbproxy.listen.http``).

Adapters pass every other attribute through to the engine, so code that asks
the engine for its hooks (``refuse``, timeouts…) sees the engine.
"""

from __future__ import annotations

import logging
import ssl
from typing import Any, Awaitable, Callable

import trio

from ..config import ListenerConfig
from ..tls import server_context
from .http import HTTPError, HTTPRequest, HTTPResponse, serve_http
from .udp import DatagramListener, DatagramSession, open_udp_socket

__all__ = [
    "DatagramEntry", "DatagramListener", "DatagramSession", "HTTPEntry", "HTTPError", "HTTPRequest", "HTTPResponse",
    "TLSEntry", "accept_tls", "open_listener", "serve_listener",
]

log = logging.getLogger("dbproxy.listen")

DEFAULT_TLS_HANDSHAKE_TIMEOUT = 30.0


async def accept_tls(engine: Any, session: Any, stream: Any, ctx: ssl.SSLContext, *,
                     https_compatible: bool = False) -> trio.SSLStream | None:
    """Server-side TLS handshake under the engine's handshake timeout; None when it failed (logged, audited)."""
    timeout = getattr(engine, "handshake_timeout", DEFAULT_TLS_HANDSHAKE_TIMEOUT)
    tls = trio.SSLStream(stream, ctx, server_side=True, https_compatible=https_compatible)
    try:
        with trio.fail_after(timeout):
            await tls.do_handshake()
    except trio.TooSlowError:
        if hasattr(engine, "handshake_timed_out"):
            engine.handshake_timed_out(session, "client TLS handshake timed out")
        else:
            session.details["end_reason"] = "client TLS handshake timed out"
        return None
    except trio.BrokenResourceError as exc:
        cause = exc.__cause__ or exc
        log.info("session %s from %s: client TLS handshake failed: %s", session.id, session.client_addr, cause)
        session.details["end_reason"] = f"client TLS handshake failed: {cause.__class__.__name__}"
        return None
    session.details["client_tls"] = True
    return tls


class _Entry:
    """Adapts an engine to ``handle_client``'s ``handle_connection(session, transport)``."""

    def __init__(self, engine: Any, lc: ListenerConfig) -> None:
        self.engine = engine
        self.listener_config = lc

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)


class TLSEntry(_Entry):
    def __init__(self, engine: Any, lc: ListenerConfig) -> None:
        super().__init__(engine, lc)
        assert lc.tls is not None  # the config requires it for kind "tls"
        self.ssl_context = server_context(lc.tls)

    async def handle_connection(self, session: Any, stream: Any) -> None:
        tls = await accept_tls(self.engine, session, stream, self.ssl_context)
        if tls is not None:
            await self.engine.handle_connection(session, tls)

    async def refuse(self, session: Any, stream: Any, reason: str) -> None:
        if not hasattr(self.engine, "refuse"):
            return
        tls = await accept_tls(self.engine, session, stream, self.ssl_context)
        if tls is not None:
            await self.engine.refuse(session, tls, reason)


class HTTPEntry(_Entry):
    def __init__(self, engine: Any, lc: ListenerConfig, services: Any) -> None:
        super().__init__(engine, lc)
        self.services = services
        self.ssl_context = None
        if lc.tls is not None:
            self.ssl_context = server_context(lc.tls)
            self.ssl_context.set_alpn_protocols(["http/1.1"])

    async def _stream(self, session: Any, stream: Any) -> Any:
        if self.ssl_context is None:
            return stream
        # https_compatible: HTTPS clients commonly close without close_notify (RFC 9112 §9.8 allows it).
        return await accept_tls(self.engine, session, stream, self.ssl_context, https_compatible=True)

    async def handle_connection(self, session: Any, stream: Any) -> None:
        inner = await self._stream(session, stream)
        if inner is not None:
            await serve_http(self.engine, session, inner, self.listener_config.http, budget=self.services.buffers,
                             tls=self.ssl_context is not None)

    async def refuse(self, session: Any, stream: Any, reason: str) -> None:
        inner = await self._stream(session, stream)
        if inner is not None:
            await serve_http(self.engine, session, inner, self.listener_config.http, tls=self.ssl_context is not None,
                             refuse=reason)


class DatagramEntry(_Entry):
    async def handle_connection(self, session: Any, channel: DatagramSession) -> None:
        try:
            with channel.idle_scope:
                await self.engine.handle_datagram_session(session, channel)
            if channel.idle_scope.cancelled_caught:
                session.details.setdefault("end_reason", "idle timeout")
                log.info("session %s from %s: idle for %g s", session.id, session.client_addr, channel.idle_timeout)
        finally:
            stats = channel.statistics()
            session.details.setdefault("end_fields", {}).update(
                datagrams_received=stats.received, datagrams_dropped=stats.dropped, datagrams_sent=stats.sent)
            # The key is free for a new session now, not after the audit flush that follows
            # (synchronous: this may run in a cancelled scope).
            channel.close()

    async def refuse(self, session: Any, channel: DatagramSession, reason: str) -> None:
        log.info("session %s from %s refused: %s (datagrams dropped)", session.id, session.client_addr, reason)


def make_entry(engine: Any, lc: ListenerConfig, services: Any) -> Any:
    if lc.kind == "tcp":
        return engine
    if lc.kind == "tls":
        return TLSEntry(engine, lc)
    if lc.kind == "http":
        return HTTPEntry(engine, lc, services)
    if lc.kind == "udp":
        return DatagramEntry(engine, lc)
    raise ValueError(f"unknown listener kind {lc.kind!r}")


async def open_listener(lc: ListenerConfig, *, reuse_port: bool = False) -> list[Any]:
    """Open a listener's sockets: trio SocketListeners for stream kinds, one bound UDP socket for udp.

    ``reuse_port`` (``"workers": N``, dbproxy.workers): SO_REUSEPORT, so every proxy process binds
    the same port and the kernel spreads connections (TCP) and peers (UDP, by source address)
    over them."""
    if lc.kind == "udp":
        return [await open_udp_socket(lc.host, lc.port, reuse_port=reuse_port)]
    if reuse_port:
        return await _open_reuseport_listeners(lc.host, lc.port)
    return await trio.open_tcp_listeners(lc.port, host=lc.host)


async def _open_reuseport_listeners(host: str, port: int) -> list[trio.SocketListener]:
    """``trio.open_tcp_listeners`` with SO_REUSEPORT set before bind."""
    import socket as socket_module

    infos = await trio.socket.getaddrinfo(host, port, type=socket_module.SOCK_STREAM, flags=socket_module.AI_PASSIVE)
    listeners = []
    try:
        for family, type_, proto, _, addr in infos:
            sock = trio.socket.socket(family, type_, proto)
            try:
                sock.setsockopt(socket_module.SOL_SOCKET, socket_module.SO_REUSEADDR, 1)
                sock.setsockopt(socket_module.SOL_SOCKET, socket_module.SO_REUSEPORT, 1)
                if family == socket_module.AF_INET6:
                    sock.setsockopt(socket_module.IPPROTO_IPV6, socket_module.IPV6_V6ONLY, 1)
                await sock.bind(addr)
                sock.listen(4096)
            except BaseException:
                sock.close()
                raise
            listeners.append(trio.SocketListener(sock))
    except BaseException:
        for listener in listeners:
            listener.socket.close()
        raise
    return listeners


def bound_address(opened: Any) -> tuple[str, int]:
    sock = opened if isinstance(opened, trio.socket.SocketType) else opened.socket
    host, port = sock.getsockname()[:2]
    return host, port


async def serve_listener(lc: ListenerConfig, engine: Any, services: Any, opened: list[Any],
                         handle_client: Callable[[Any, ListenerConfig, Any], Awaitable[None]],
                         sessions: trio.Nursery) -> None:
    """Serve one listener until cancelled; every connection / datagram session runs in ``sessions``."""
    entry = make_entry(engine, lc, services)

    async def run(transport: Any) -> None:
        await handle_client(entry, lc, transport)

    if lc.kind == "udp":
        (sock,) = opened
        udp = lc.udp
        listener = DatagramListener(sock, max_sessions=udp.max_sessions, queue_datagrams=udp.queue_datagrams,
                                    idle_timeout=udp.idle_timeout, max_datagram_size=udp.max_datagram_size,
                                    key=getattr(engine, "datagram_session_key", None), name=lc.name,
                                    budget=services.buffers)
        services.extras.setdefault("datagram_listeners", {})[lc.name] = listener
        await listener.serve(run, sessions)
    else:
        await trio.serve_listeners(run, opened, handler_nursery=sessions)
