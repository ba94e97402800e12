"""The agent: dials the proxy, holds the link, and opens the backend connections the proxy asks for.

Strategy: one loop (``run_agent``) — TCP, TLS with the proxy's certificate
verified against ``ca_file`` (host name checked against ``server_name`` or
the proxy's host), the hello with the node token (``dbproxy.agent.hello``),
then an ``H2Link`` in the HTTP/2 *server* role on the connection it dialled:
each CONNECT stream the proxy opens is checked against the allow-list
(``AllowList``) and either refused (403 and a reason: the proxy renders it
as its client's native error) or connected to the target (502 and the
reason when that fails) and spliced both ways.  When the link ends the agent
dials again after an exponential backoff with jitter (full range 0.5–1.5 ×,
capped); a token the proxy refuses ends the agent (exit code 3) — retrying a
refused token would only fill the proxy's audit trail.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import socket
import ssl
import time
from typing import Any, Callable

import attrs
import trio

from . import hello
from .link import READ_SIZE, H2Link, LinkStream

log = logging.getLogger("dbproxy.agent")

EXIT_REFUSED = 3


class AgentRefused(Exception):
    """The proxy refused the agent's token (``reason``: the proxy's code, e.g. ``token_expired``)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@attrs.frozen
class AllowRule:
    """One ``--allow``: ``HOST:PORT`` where HOST is a name, a ``*.`` wildcard, an address or a CIDR
    network, and PORT a number, ``LOW-HIGH`` or ``*``."""

    host: str | None  # a name or a wildcard pattern (lower case); None for a network
    network: Any  # ipaddress network, or None
    ports: tuple[int, int]

    @classmethod
    def parse(cls, text: str) -> "AllowRule":
        host, sep, port = text.rpartition(":")
        host = host.strip("[]").lower()
        if not sep or not host:
            raise ValueError(f"--allow wants HOST:PORT (HOST a name, *.domain, address or CIDR), got {text!r}")
        if port == "*":
            ports = (1, 65535)
        elif "-" in port:
            low, _, high = port.partition("-")
            if not (low.isdigit() and high.isdigit()) or not 1 <= int(low) <= int(high) <= 65535:
                raise ValueError(f"--allow port range LOW-HIGH within 1-65535, got {port!r}")
            ports = (int(low), int(high))
        elif port.isdigit() and 1 <= int(port) <= 65535:
            ports = (int(port), int(port))
        else:
            raise ValueError(f"--allow port: a number, LOW-HIGH or *, got {port!r}")
        try:
            return cls(None, ipaddress.ip_network(host, strict=False), ports)
        except ValueError:
            pass
        if host.startswith("*.") and len(host) > 2 or host not in ("*",) and "*" not in host:
            return cls(host, None, ports)
        raise ValueError(f"--allow host: a name, *.domain, address or CIDR, got {host!r}")

    def port_ok(self, port: int) -> bool:
        return self.ports[0] <= port <= self.ports[1]

    def name_ok(self, host: str) -> bool:
        if self.host is None:
            return False
        if self.host.startswith("*."):
            return host.endswith(self.host[1:]) and len(host) > len(self.host) - 1
        return host == self.host


class AllowList:
    """The targets this agent may dial.  A name rule allows that name; a network rule allows an
    address literal in it, or a name whose resolved address is in it (the agent then dials that
    checked address, so a name cannot be re-resolved elsewhere in between)."""

    def __init__(self, rules: list[AllowRule]) -> None:
        self.rules = rules

    @classmethod
    def parse(cls, items: list[str]) -> "AllowList":
        return cls([AllowRule.parse(item) for item in items])

    async def resolve(self, host: str, port: int) -> str | None:
        """The address to dial for ``host:port``, or None when the allow-list says no."""
        host = host.lower()
        for rule in self.rules:
            if rule.port_ok(port) and rule.name_ok(host):
                return host
        networks = [r for r in self.rules if r.network is not None and r.port_ok(port)]
        if not networks:
            return None
        try:
            addresses = [ipaddress.ip_address(host)]
        except ValueError:
            try:
                infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError:
                return None
            addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
        for address in addresses:
            if any(address.version == r.network.version and address in r.network for r in networks):
                return str(address)
        return None


def parse_authority(authority: str) -> tuple[str, int] | None:
    host, sep, port = authority.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        return None
    return host, int(port)


@attrs.define
class AgentOptions:
    proxy_host: str
    proxy_port: int
    node: str
    token: Callable[[], str]  # read at each connection (a renewed token file is picked up)
    allow: AllowList
    ca_file: str | None = None
    server_name: str | None = None
    version: str = "?"
    connect_timeout: float = 10.0
    heartbeat: float = 10.0
    heartbeat_timeout: float = 30.0
    backoff_initial: float = 0.5
    backoff_max: float = 30.0


class Agent:
    def __init__(self, options: AgentOptions) -> None:
        self.options = options
        self.link: H2Link | None = None
        self.connected = trio.Event()  # set once a link is up (tests, status)
        self.links = 0

    async def run(self) -> int:
        """Dial, serve, re-dial; returns an exit code only when the proxy refused the token."""
        o = self.options
        backoff = o.backoff_initial
        while True:
            began = time.monotonic()
            try:
                await self.connect_once()
            except AgentRefused as exc:
                log.error("the proxy refused this agent for node %r: %s", o.node, exc)
                return EXIT_REFUSED
            except (OSError, ssl.SSLError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError,
                    hello.HelloError) as exc:
                log.warning("cannot hold a link to the proxy %s:%d: %s", o.proxy_host, o.proxy_port,
                            exc.__cause__ or exc or exc.__class__.__name__)
            if time.monotonic() - began > 2 * o.backoff_max:
                backoff = o.backoff_initial  # it was up for a good while: start over
            delay = backoff * random.uniform(0.5, 1.5)
            log.info("dialling the proxy again in %.1fs", delay)
            await trio.sleep(delay)
            backoff = min(backoff * 2, o.backoff_max)

    async def connect_once(self) -> None:
        o = self.options
        with trio.fail_after(o.connect_timeout):
            tcp = await trio.open_tcp_stream(o.proxy_host, o.proxy_port)
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=o.ca_file)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        tls = trio.SSLStream(tcp, ctx, server_hostname=o.server_name or o.proxy_host)
        try:
            with trio.fail_after(o.connect_timeout):
                await tls.do_handshake()
                await tls.send_all(hello.encode({"agent": hello.PROTOCOL, "node": o.node, "token": o.token(),
                                                 "version": o.version}))
                reply, rest = await hello.read_line(tls)
            if not reply.get("ok"):
                raise AgentRefused(str(reply.get("reason", "refused")), str(reply.get("message", "")))
            link = H2Link(tls, client=False, handler=self._serve_stream, initial=rest, heartbeat=o.heartbeat,
                          heartbeat_timeout=o.heartbeat_timeout)
            self.link = link
            self.links += 1
            log.info("linked to the proxy %s:%d as node %r", o.proxy_host, o.proxy_port, o.node)
            self.connected.set()
            await link.run()
            log.warning("link to the proxy ended: %s", link.lost_reason)
        finally:
            self.link = None
            await trio.aclose_forcefully(tls)

    async def _serve_stream(self, stream: LinkStream) -> None:
        link = stream.link
        target = parse_authority(stream.authority)
        address = await self.options.allow.resolve(*target) if target is not None else None
        if target is None or address is None:
            log.warning("refused a connection to %s: not on the allow-list", stream.authority)
            await link.respond(stream, 403, f"{stream.authority} is not on the allow-list of this agent")
            return
        try:
            with trio.fail_after(self.options.connect_timeout):
                tcp = await trio.open_tcp_stream(address, target[1])
        except (OSError, trio.TooSlowError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc) or "timed out"
            log.warning("cannot connect to %s: %s", stream.authority, reason)
            await link.respond(stream, 502, f"cannot connect to {stream.authority}: {reason}")
            return
        try:
            # Urgent data (telnet's Synch, RFC 854) stays in the byte stream the tunnel carries.
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
        except OSError:
            pass
        log.info("stream %d: connected to %s", stream.stream_id, stream.authority)
        try:
            await link.respond(stream, 200)
            await splice(stream, tcp)
        finally:
            await trio.aclose_forcefully(tcp)
            log.info("stream %d to %s closed (%d bytes in, %d out)", stream.stream_id, stream.authority,
                     stream.bytes_in, stream.bytes_out)


async def splice(stream: LinkStream, tcp: trio.SocketStream) -> None:
    """Copy both ways until both directions ended (EOF passed on as a half-close), or either broke."""

    async def copy(source: Any, sink: Any, nursery: trio.Nursery) -> None:
        try:
            while data := await source.receive_some(READ_SIZE):
                await sink.send_all(data)
            await sink.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(copy, stream, tcp, nursery)
        nursery.start_soon(copy, tcp, stream, nursery)
