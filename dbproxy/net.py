"""Backend connections.  Callers set deadlines (``trio.fail_after``); these functions take none."""

from __future__ import annotations

import trio

from .errors import UpstreamError


async def connect_backend(host: str, port: int) -> trio.SocketStream:
    try:
        return await trio.open_tcp_stream(host, port)
    except OSError as exc:
        raise UpstreamError(
            f"could not connect to backend {host}:{port}: {exc.strerror or exc}",
            kind="connect",
            client_hint=f"the proxy could not connect to the backend database at {host}:{port}",
        ) from None


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
