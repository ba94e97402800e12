"""Reading a PROXY protocol header off an accepted connection (the parsing is ``dbproxy.proxyproto``).

Strategy: peek (``MSG_PEEK``) until the header is whole, then receive exactly
its length — the protocol's own first bytes stay in the kernel's buffer, so the
engine reads a socket exactly as if no balancer stood in front (engines that
read the raw socket for speed need no wrapper stream, and a TLS ClientHello
behind the header reaches the TLS handshake untouched).  Headers arrive in one
segment in practice; should one come split, the peek loop waits briefly
between looks instead of spinning on data it has already seen.
"""

from __future__ import annotations

import socket as _socket
from typing import Any

import trio

from ..proxyproto import V1_MAX, V2_MAX_PAYLOAD, ClosedBeforeHeader, ProxyHeader, ProxyProtocolError, parse
from ..sansio import NEED_DATA

_PEEK = max(16 + V2_MAX_PAYLOAD, V1_MAX)


def raw_socket(stream: Any) -> Any:
    sock = getattr(stream, "socket", None)
    if sock is None:
        raise TypeError(f"PROXY protocol needs a socket stream, got {type(stream).__name__}")
    return sock


def peer_host(stream: Any) -> str | None:
    try:
        return raw_socket(stream).getpeername()[0]
    except (OSError, TypeError):
        return None


async def read_proxy_header(stream: Any, timeout: float) -> ProxyHeader:
    """The connection's PROXY header, consumed from the socket; raises ``ProxyProtocolError`` (also
    for a connection closed or silent past ``timeout``)."""
    sock = raw_socket(stream)
    seen = 0
    try:
        with trio.fail_after(timeout):
            while True:
                data = await sock.recv(_PEEK, _socket.MSG_PEEK)
                if not data:
                    raise ClosedBeforeHeader("the connection closed before its PROXY protocol header")
                header = parse(data)
                if header is not NEED_DATA:
                    break
                if len(data) == seen:
                    await trio.sleep(0.005)
                seen = len(data)
            remaining = header.length
            while remaining:
                chunk = await sock.recv(remaining)
                if not chunk:
                    raise ProxyProtocolError("the connection closed inside its PROXY protocol header")
                remaining -= len(chunk)
    except trio.TooSlowError:
        raise ProxyProtocolError(f"no complete PROXY protocol header within {timeout:g} s") from None
    except OSError as exc:
        raise ProxyProtocolError(f"connection lost before its PROXY protocol header: {exc}") from None
    return header


__all__ = ["peer_host", "read_proxy_header"]
