"""Requests between the proxy processes of one supervisor (``"workers": N``, dbproxy.workers).

Strategy.  A client may reach any process (the kernel spreads connections
over the SO_REUSEPORT sockets by a hash of the addresses), but some requests
concern state only the process that holds a session has — the canonical
case is a cancel request, which arrives on a fresh connection.  Each process
serves a Unix socket in the supervisor's state directory
(``worker-<i>.sock``); an engine registers a handler under a name of its own
(``register("<engine>.cancel", handler)``) and, when a key is not its
own, asks its siblings (``route``): every other process runs the handler of
that name on the opaque key and answers with bytes (handled) or nothing.
Keys stay full strength: nothing of the process index is encoded into
them, the price being one local round trip per sibling, paid only by a
request the receiving process could not serve itself (rare: cancels).

The supervisor uses the same channel for what it gathers from every process
(the admin listener's ``/metrics`` and ``/readyz``: ``ask``).

Wire (one request per connection, so a slow handler blocks nobody): the name
(2-byte length), the key (4-byte length); the answer: 1 byte (0: not handled,
1: handled) and a 4-byte length with the payload.  The core never looks inside
a key or a payload.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket as socket_module
import struct
from typing import Any, Awaitable, Callable

import trio

log = logging.getLogger("dbproxy.siblings")

Handler = Callable[[bytes], Awaitable[bytes | None]]
ASK_TIMEOUT = 5.0  # seconds a sibling may take to answer (a cancel is delivered within it)
MAX_KEY = 64 * 1024


def socket_path(state_dir: str, index: int) -> str:
    return os.path.join(state_dir, f"worker-{index}.sock")


async def _read_exact(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = await stream.receive_some(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


async def ask(path: str, name: str, key: bytes = b"") -> bytes | None:
    """Ask the process serving ``path`` to run its ``name`` handler on ``key``: its answer,
    or None (not handled, no such handler, not reachable)."""
    try:
        with trio.fail_after(ASK_TIMEOUT):
            stream = await trio.open_unix_socket(path)
            async with stream:
                raw = name.encode()
                await stream.send_all(struct.pack(">H", len(raw)) + raw + struct.pack(">I", len(key)) + key)
                handled, length = struct.unpack(">BI", await _read_exact(stream, 5))
                payload = await _read_exact(stream, length)
                return payload if handled else None
    except (OSError, EOFError, trio.TooSlowError, trio.BrokenResourceError) as exc:
        log.debug("sibling %s (%s): %s", path, name, exc)
        return None


class Siblings:
    """This process's end of the channel: its handlers, and the way to its siblings."""

    def __init__(self, state_dir: str, index: int, count: int) -> None:
        self.state_dir = state_dir
        self.index = index
        self.count = count
        self.handlers: dict[str, Handler] = {}

    def register(self, name: str, handler: Handler) -> None:
        """Serve ``name`` for the siblings (a reload's new engine replaces its predecessor's)."""
        self.handlers[name] = handler

    async def route(self, name: str, key: bytes) -> bytes | None:
        """Ask every other process (all at once); the first answer of one that handled it."""
        found: list[bytes] = []

        async def one(i: int) -> None:
            answer = await ask(socket_path(self.state_dir, i), name, key)
            if answer is not None:
                found.append(answer)

        async with trio.open_nursery() as nursery:
            for i in range(self.count):
                if i != self.index:
                    nursery.start_soon(one, i)
        return found[0] if found else None

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        path = socket_path(self.state_dir, self.index)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        sock = trio.socket.socket(socket_module.AF_UNIX, socket_module.SOCK_STREAM)
        await sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(64)
        async with trio.open_nursery() as nursery:
            task_status.started()
            await trio.serve_listeners(self._serve_one, [trio.SocketListener(sock)], handler_nursery=nursery)

    async def _serve_one(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                with trio.fail_after(ASK_TIMEOUT):
                    (n,) = struct.unpack(">H", await _read_exact(stream, 2))
                    name = (await _read_exact(stream, n)).decode()
                    (n,) = struct.unpack(">I", await _read_exact(stream, 4))
                    if n > MAX_KEY:
                        return
                    key = await _read_exact(stream, n)
                    handler = self.handlers.get(name)
                    answer = None if handler is None else await handler(key)
                    body = answer or b""
                    await stream.send_all(struct.pack(">BI", answer is not None, len(body)) + body)
            except (OSError, EOFError, UnicodeDecodeError, trio.TooSlowError, trio.BrokenResourceError):
                pass
            except Exception:  # a handler's bug must not take the channel down
                log.exception("sibling request failed")
