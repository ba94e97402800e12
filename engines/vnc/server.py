"""The server→client direction as the pipeline reads it: ``updates.ServerStream`` behind a decoder.

Strategy.  ``updates.ServerStream`` (framing of FramebufferUpdate with its
encodings, SetColourMapEntries, Bell, ServerCutText) returns whole messages
with their exact bytes; ``ServerDecoder`` adapts it to the pipeline's
decoder contract (``buffer``, ``feed``, ``next_message``): the bytes go into
a ``ReceiveBuffer`` and into the stream, and each message the stream
completes is taken off the buffer by its size, so the buffer's consumed span
is exactly the messages handed out and the pipeline forwards the received
bytes as they came when no stage changed anything.

The stream's pixel format follows the client's SetPixelFormat (update sizes
depend on it), switched where the server switches:

- a viewer without fences sends SetPixelFormat while it processes the last
  update it asked for (TigerVNC's CConnection, rfbproto §7.5.1): that
  update has passed the proxy whole, no other is in flight, so the format
  changes at once (``set_pixel_format``);
- a viewer with fences (TigerVNC) sends a ClientFence with Request|SyncNext
  just before SetPixelFormat: the server answers that fence after it
  applied the new format (rfbproto "ClientFence": SyncNext), so updates
  before the ServerFence answer are in the old format, those after it in
  the new one.  ``set_pixel_format(raw, after_fence=True)`` waits for that
  answer: while one is pending the stream is fed in small pieces, and at the
  fence the bytes after it are framed again by a stream in the new format.
No trio.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from dbproxy.buffer import ReceiveBuffer
from dbproxy.sansio import NEED_DATA


SERVER_FENCE = 248
FENCE_SYNC_NEXT = 4
# While a format change waits for its fence, how many bytes the stream is fed at a time (a message
# after the fence is at most this far parsed in the old format before it is framed again).
PENDING_STEP = 64


class ServerDecoder:
    def __init__(self, pixel_format: bytes) -> None:
        from .updates import PixelFormat, ServerStream

        self._pf = PixelFormat
        self._stream_cls = ServerStream
        self.stream = ServerStream(PixelFormat.parse(pixel_format))
        self.buffer = ReceiveBuffer()
        self._ready: deque = deque()
        self._pending: bytes | None = None

    def set_pixel_format(self, raw: bytes, *, after_fence: bool = False) -> None:
        if after_fence:
            self._pending = bytes(raw)
        else:
            self.stream.set_pixel_format(self._pf.parse(raw))

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self.buffer.feed(data)
        if self._pending is None:
            self._ready.extend(self.stream.feed(bytes(data)))
            return
        data = bytes(data)
        for i in range(0, len(data), PENDING_STEP):
            for msg in self.stream.feed(data[i:i + PENDING_STEP]):
                self._ready.append(msg)
                if msg.type == SERVER_FENCE and int.from_bytes(msg.raw[4:8], "big") & FENCE_SYNC_NEXT:
                    self._switch()
                    return

    def _switch(self) -> None:
        """The server's answer to the SyncNext fence just came: what follows it is in the new format."""
        used = sum(len(m.raw) for m in self._ready)
        buf, pos, end = self.buffer.span()
        rest = bytes(buf[pos + used:end])
        self.stream = self._stream_cls(self._pf.parse(self._pending), max_message=self.stream.max_message)
        self._pending = None
        self._ready.extend(self.stream.feed(rest))

    def next_message(self) -> Any:
        if not self._ready:
            return NEED_DATA
        msg = self._ready.popleft()
        self.buffer.skip(len(msg.raw))
        return msg
