"""Message-at-a-time I/O for handshakes.

Before a session's pipeline starts, engines converse message by message
(startup, TLS upgrade, proxy-owned authentication).  ``MessageStream`` pairs
a stream with a sans-IO decoder and does the reading, so engine handshake
code stays free of socket handling.  Bytes read past the handshake stay in
the decoder's buffer and the pipeline decodes them first.
"""

from __future__ import annotations

from typing import Any, Callable

import trio

from .pipeline import NEED_DATA, RECEIVE_SIZE


class PeerClosed(Exception):
    """The peer closed its side before sending what the handshake needed."""


class MessageStream:
    def __init__(self, stream: trio.abc.Stream, decoder: Any, *, receive_size: int = RECEIVE_SIZE) -> None:
        self.stream = stream
        self.decoder = decoder
        self.receive_size = receive_size

    async def receive_with(self, step: Callable[[], Any]) -> Any:
        """Call ``step`` (a decoder method) until it returns something other than NEED_DATA."""
        while True:
            result = step()
            if result is not NEED_DATA:
                return result
            data = await self.stream.receive_some(self.receive_size)
            if not data:
                raise PeerClosed()
            self.decoder.feed(data)

    async def receive(self) -> Any:
        return await self.receive_with(self.decoder.next_message)

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)
