"""The server→client direction as the pipeline reads it: a streaming framer over ``updates``' parsers.

Strategy: forward bytes as they are framed, hold only what must be whole.
The message parsers of ``updates.py`` ask for *fields* (the bytes that
decide a length: a message header, a rectangle header, a subrect count, a
ZRLE/zlib u32, a Tight control byte and compact length) and *skip* the rest
(pixels, compressed data) by count.  ``ServerDecoder`` runs them over the
pipeline's ``ReceiveBuffer`` in place: a skip consumes whatever part of it
has arrived, a field is consumed once it is whole (a field cut by a read
stays in the buffer until the next one: the forwarded bytes are the same
however the stream is split, also when a field turns out malformed).  Each
``next_message`` hands out everything framed since the last one as one
``Span`` — on the hot path the whole received chunk, which the pipeline
sends as it came (the buffer adopted it: no copy) and the recorder reads
through a view.  A 1 MB Raw update thus goes on piece by piece as the
socket delivers it, not after its last byte, and is never copied.

Held whole: a ServerCutText (RFC 6143 §7.6.4), which the policy may refuse
and the audit describes — the bytes before it are handed out first, then
the message as a ``updates.ServerMessage`` once it is complete (bounded by
``max_message``).  A stream the parsers cannot frame (an unknown message
type or encoding) raises ``RfbError`` after the framed bytes before the bad
field have been handed out: the viewer gets every good byte, then the
session ends with the reason.

The pixel format (update sizes depend on it) follows the client's
SetPixelFormat, switched where the server switches:

- a viewer without fences sends SetPixelFormat while it processes the last
  update it asked for (TigerVNC's CConnection, rfbproto §7.5.1): no update
  is in flight, so the format applies from the next message
  (``set_pixel_format``);
- a viewer with fences (TigerVNC) sends a ClientFence with Request|SyncNext
  just before SetPixelFormat: the server answers that fence after it
  applied the new format (rfbproto "ClientFence": SyncNext), so updates
  before the ServerFence answer are in the old format, those after it in
  the new one.  ``set_pixel_format(raw, after_fence=True)`` switches when
  the framer completes a ServerFence with SyncNext.
No trio.
"""

from __future__ import annotations

from typing import Any

from dbproxy.buffer import ReceiveBuffer
from dbproxy.sansio import NEED_DATA

from .updates import PixelFormat, RfbError, ServerMessage, ServerStream, message_parser

SERVER_FENCE = 248
SERVER_CUT_TEXT = 3
FENCE_SYNC_NEXT = 4
_IDLE = 1 << 62  # no message begun (no parser request is this large)


class Span:
    """Framed server bytes handed out together: ``data[start:end]`` (``data`` is the receive buffer's
    object, valid until the pipeline's next ``feed``/``compact``).  ``raw`` copies them (only a
    rebuilt batch asks); ``view()`` does not."""

    __slots__ = ("data", "start", "end")
    kind = "span"
    type = -1

    def __init__(self, data: bytes | bytearray, start: int, end: int) -> None:
        self.data, self.start, self.end = data, start, end

    @property
    def raw(self) -> bytes:
        return bytes(self.data[self.start:self.end])

    def view(self) -> bytes | memoryview:
        """The bytes without a copy: the received chunk itself when the span is all of it, else a
        view (release it before the buffer changes: ``with span.view() as v``)."""
        data = self.data
        if self.start == 0 and self.end == len(data) and type(data) is bytes:
            return data
        return memoryview(data)[self.start:self.end]

    def __len__(self) -> int:
        return self.end - self.start

    def __repr__(self) -> str:
        return f"Span({self.end - self.start} bytes)"


class ServerDecoder:
    """The pipeline's decoder of the desktop's stream: ``feed``, then ``next_message`` until NEED_DATA
    (``Span`` s and whole ``ServerMessage`` cut texts, in stream order)."""

    def __init__(self, pixel_format: bytes, *, max_message: int = ServerStream.DEFAULT_MAX_MESSAGE) -> None:
        self.pixel_format = PixelFormat.parse(pixel_format)
        self.max_message = max_message
        self.buffer = ReceiveBuffer()
        self._pending: PixelFormat | None = None  # a format waiting for the server's SyncNext fence
        self._parser: Any = None
        self._req = _IDLE  # the parser's pending request (``updates.Parse``)
        self._type = -1  # the type of the message being framed
        self._held = 0  # bytes of a held (whole-only) message already framed, from the buffer position
        self._failed: RfbError | None = None

    def set_pixel_format(self, raw: bytes, *, after_fence: bool = False) -> None:
        pf = PixelFormat.parse(raw)
        if after_fence:
            self._pending = pf
        else:
            self.pixel_format = pf

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self.buffer.feed(data)

    @property
    def at_boundary(self) -> bool:
        """No message is partly framed (everything handed out ended whole)."""
        return self._req == _IDLE

    def next_message(self) -> Any:
        if self._failed is not None:
            raise self._failed
        buf = self.buffer
        data, pos, end = buf.span()
        cur = pos + self._held
        parser, req = self._parser, self._req
        error: RfbError | None = None
        before = cur  # where the step being taken began: a field the parser refuses is not handed out
        try:
            while True:
                before = cur
                if req == _IDLE:
                    if cur >= end:
                        break
                    t = data[cur]
                    if t == SERVER_CUT_TEXT and cur > pos:
                        break  # hand out what precedes a held message first
                    self._type = t
                    parser = message_parser(t, self.pixel_format)
                    req = next(parser)
                if req < 0:  # a skip: what has arrived of it goes on now
                    n = ~req
                    avail = end - cur
                    if n > avail:
                        cur = end
                        req = ~(n - avail)
                        break
                    cur += n
                    before = cur  # skipped bytes are payload, good whatever follows
                    field: Any = None
                else:  # a field: consumed when whole
                    if req > self.max_message:
                        raise RfbError(f"a server message field of {req} bytes exceeds the maximum of "
                                       f"{self.max_message} bytes")
                    if end - cur < req:
                        break
                    field = data[cur:cur + req]
                    cur += req
                try:
                    req = parser.send(field)
                except StopIteration as stop:
                    parser, req = None, _IDLE
                    t = self._type
                    if t == SERVER_CUT_TEXT:
                        # Everything before it was handed out, so the held message starts at pos.
                        self._held = 0
                        buf.skip(cur - pos)
                        text, extended = stop.value
                        return ServerMessage("cut_text", t, bytes(data[pos:cur]), text=text, extended=extended)
                    if t == SERVER_FENCE and self._pending is not None and stop.value & FENCE_SYNC_NEXT:
                        self.pixel_format, self._pending = self._pending, None
        except RfbError as exc:
            # The bytes framed before the bad field go on first (none of a held message); the next
            # call raises.
            error = self._failed = exc
            cur = pos if self._type == SERVER_CUT_TEXT else before
            parser, req = None, _IDLE
        finally:
            self._parser, self._req = parser, req
        if self._type == SERVER_CUT_TEXT and req != _IDLE and error is None:
            self._held = cur - pos  # nothing is handed out of a message held whole
            return NEED_DATA
        self._held = 0
        if cur > pos:
            buf.skip(cur - pos)
            return Span(data, pos, cur)
        if error is not None:
            raise error
        return NEED_DATA
