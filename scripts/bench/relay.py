"""The bare trio byte relay: the floor cost of any trio proxy.

Strategy: accept, connect upstream, then two pumps in one nursery, each
``receive_some(256 KiB)`` → ``send_all``; when either side ends, both end.
No parsing, no audit, no handshake: whatever a trio proxy does on top of this
is the cost the benchmark measures against it.  Same receive size as
``dbproxy.pipeline.RECEIVE_SIZE``; trio's ``SocketStream`` sets TCP_NODELAY on
both sides, as in the proxy.

``--lean``: the same two pumps on the proxy's own socket I/O
(``dbproxy.pipeline.Receiver``/``Sender``: ``os.read``/``os.write`` first,
waiting on the fd only when the kernel has nothing / takes nothing), so the
pipeline's and the audit's cost can be read against a relay that moves bytes
exactly the way dbproxy does.

Runnable: ``python -m scripts.bench.relay --upstream HOST:PORT [--listen 127.0.0.1:0] [--lean]``
prints ``relay listening on HOST:PORT`` once it accepts connections.
"""

from __future__ import annotations

import argparse
import functools
import sys

import trio

RECEIVE_SIZE = 256 * 1024


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


async def _pump(source: trio.abc.ReceiveStream, sink: trio.abc.SendStream, nursery: trio.Nursery) -> None:
    try:
        while True:
            data = await source.receive_some(RECEIVE_SIZE)
            if not data:
                return
            await sink.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        nursery.cancel_scope.cancel()


async def _lean_pump(source: trio.SocketStream, sink: trio.SocketStream, nursery: trio.Nursery) -> None:
    from dbproxy.pipeline import Receiver, Sender

    receive = Receiver(source, RECEIVE_SIZE).receive
    send = Sender(sink, lambda data: data).send_wire
    try:
        while True:
            data = await receive()
            if not data:
                return
            await send(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    finally:
        nursery.cancel_scope.cancel()


async def _handle(upstream: tuple[str, int], client: trio.SocketStream, pump=_pump) -> None:
    async with client:
        try:
            backend = await trio.open_tcp_stream(*upstream)
        except OSError:
            return
        async with backend:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump, client, backend, nursery)
                nursery.start_soon(pump, backend, client, nursery)


async def serve(listen: tuple[str, int], upstream: tuple[str, int], lean: bool = False) -> None:
    handler = functools.partial(_handle, upstream, pump=_lean_pump if lean else _pump)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, listen[1], host=listen[0]))
        host, port = listeners[0].socket.getsockname()[:2]
        print(f"relay listening on {host}:{port}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scripts.bench.relay", description=__doc__.split("\n")[0])
    ap.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0: the kernel picks)")
    ap.add_argument("--upstream", required=True, help="HOST:PORT to relay to")
    ap.add_argument("--lean", action="store_true", help="use dbproxy's own socket I/O (Receiver/Sender)")
    args = ap.parse_args(argv)
    try:
        trio.run(serve, _host_port(args.listen), _host_port(args.upstream), args.lean)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
