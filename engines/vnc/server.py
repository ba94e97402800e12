"""The server→client direction as the pipeline reads it: ``updates.ServerStream`` behind a decoder.

Strategy.  ``updates.ServerStream`` (framing of FramebufferUpdate with its
encodings, SetColourMapEntries, Bell, ServerCutText) returns whole messages
with their exact bytes; ``ServerDecoder`` adapts it to the pipeline's
decoder contract (``buffer``, ``feed``, ``next_message``): the bytes go into
a ``ReceiveBuffer`` and into the stream, and each message the stream
completes is taken off the buffer by its size, so the buffer's consumed span
is exactly the messages handed out and the pipeline forwards the received
bytes as they came when no stage changed anything.  The stream's pixel
format follows the client's SetPixelFormat (the update sizes depend on it):
the proxy forwards SetPixelFormat before the server can answer in the new
format, and the client stage hands it over as it passes.  No trio.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from dbproxy.buffer import ReceiveBuffer
from dbproxy.sansio import NEED_DATA


class ServerDecoder:
    def __init__(self, pixel_format: bytes) -> None:
        from .updates import PixelFormat, ServerStream

        self._pf = PixelFormat
        self.stream = ServerStream(PixelFormat.parse(pixel_format))
        self.buffer = ReceiveBuffer()
        self._ready: deque = deque()

    def set_pixel_format(self, raw: bytes) -> None:
        self.stream.set_pixel_format(self._pf.parse(raw))

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self.buffer.feed(data)
        self._ready.extend(self.stream.feed(bytes(data)))

    def next_message(self) -> Any:
        if not self._ready:
            return NEED_DATA
        msg = self._ready.popleft()
        self.buffer.skip(len(msg.raw))
        return msg
