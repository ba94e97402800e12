"""RFB server→client message framing (RFC 6143 §7.6, encodings §7.7, plus the common extensions).

Strategy: frame, don't decode.  A relay needs each server message's exact
bytes and where it ends; only a renderer (``render.py``) needs pixels.  So
each message has a *parser* that reads just the fields that decide a length
— a message header, a rectangle header, a subrect count, a Hextile tile's
subencoding mask, a ZRLE/zlib u32 length, a Tight compression-control byte
and compact length — and skips the rest by count.  Raw, ZRLE and Tight
payloads are never looked at; a Raw rect of any size costs a header read.

A parser is a generator of requests ("the next N bytes, for me to read" /
"skip N bytes"), so it holds no buffer and is resumable at every byte: the
driver decides what to keep.  ``ServerStream`` here keeps whole messages
(``ServerMessage.raw``, each rect's ``payload`` a lazy slice of it) for the
replay and test viewers; the relay's ``server.ServerDecoder`` forwards
skipped bytes as they arrive and holds only a field until it is whole.

Formats whose sizes depend on the pixel format (PIXEL = bits-per-pixel / 8
bytes, Tight's TPIXEL) use the format in force when the message began;
``set_pixel_format`` (the client's SetPixelFormat, §7.5.1) applies from the
next message — clients send it when no update is outstanding.

Covered: FramebufferUpdate with Raw (0), CopyRect (1), RRE (2), CoRRE (4),
Hextile (5), zlib (6), Tight (7), ZRLE (16), H.264 (50), TightPNG (-260) and
the pseudo-encodings DesktopSize (-223), LastRect (-224), PointerPos (-232),
Cursor (-239), XCursor (-240), QEMU pointer-motion/extended-key/audio
(-257/-258/-259), QEMU LED state (-261), DesktopName (-307),
ExtendedDesktopSize (-308), CursorWithAlpha (-314, Raw only);
SetColourMapEntries (1), Bell (2), ServerCutText (3, also the
ExtendedClipboard form with a negative length), EndOfContinuousUpdates
(150), ServerFence (248), xvp (250) and gii (253) server messages.  Anything
else raises ``RfbError`` naming it: the stream cannot be framed past an
unknown encoding, so the engine must close the session with that reason.

Sans-IO: no trio, no sockets.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Generator
from typing import Any

from dbproxy.errors import RemoteProtocolError

__all__ = [
    "ENCODING_NAMES", "Parse", "PixelFormat", "Rect", "RfbError", "ServerMessage", "ServerStream", "encoding_name",
    "message_parser",
]


class RfbError(RemoteProtocolError):
    """The RFB stream broke the protocol or used something we cannot frame (an unknown encoding).

    Raised by ``ServerStream.feed`` with ``messages``: the whole messages that feed completed
    before the error."""

    messages: list = []


# Encoding numbers (RFC 6143 §7.7, §7.8; the community registry in rfbproto.rst).
RAW, COPYRECT, RRE, CORRE, HEXTILE, ZLIB, TIGHT, ZLIBHEX, TRLE, ZRLE, ZYWRLE, H264 = 0, 1, 2, 4, 5, 6, 7, 8, 15, 16, 17, 50
TIGHT_PNG = -260
DESKTOP_SIZE, LAST_RECT, POINTER_POS, CURSOR, XCURSOR = -223, -224, -232, -239, -240
QEMU_POINTER_MOTION, QEMU_EXTENDED_KEY, QEMU_AUDIO, QEMU_LED_STATE = -257, -258, -259, -261
DESKTOP_NAME, EXTENDED_DESKTOP_SIZE, XVP, FENCE, CONTINUOUS_UPDATES, CURSOR_WITH_ALPHA = -307, -308, -309, -312, -313, -314
EXTENDED_CLIPBOARD = -1063131698  # 0xC0A1E5CE as S32

ENCODING_NAMES: dict[int, str] = {
    RAW: "Raw", COPYRECT: "CopyRect", RRE: "RRE", CORRE: "CoRRE", HEXTILE: "Hextile", ZLIB: "zlib",
    TIGHT: "Tight", ZLIBHEX: "zlibhex", TRLE: "TRLE", ZRLE: "ZRLE", ZYWRLE: "ZYWRLE", H264: "Open H.264",
    TIGHT_PNG: "TightPNG", DESKTOP_SIZE: "DesktopSize", LAST_RECT: "LastRect", POINTER_POS: "PointerPos",
    CURSOR: "Cursor", XCURSOR: "XCursor", QEMU_POINTER_MOTION: "QEMU Pointer Motion Change",
    QEMU_EXTENDED_KEY: "QEMU Extended Key Event", QEMU_AUDIO: "QEMU Audio", QEMU_LED_STATE: "QEMU LED State",
    DESKTOP_NAME: "DesktopName", EXTENDED_DESKTOP_SIZE: "ExtendedDesktopSize", XVP: "xvp", FENCE: "Fence",
    CONTINUOUS_UPDATES: "ContinuousUpdates", CURSOR_WITH_ALPHA: "CursorWithAlpha",
    EXTENDED_CLIPBOARD: "ExtendedClipboard", -305: "gii", -306: "popa",
}


def encoding_name(encoding: int) -> str:
    """``"Hextile (5)"``; unregistered numbers by range (JPEG quality, compression level) or as-is."""
    name = ENCODING_NAMES.get(encoding)
    if name is None:
        if -32 <= encoding <= -23:
            name = "JPEG quality level"
        elif -256 <= encoding <= -247:
            name = "compression level"
        elif -768 <= encoding <= -763:
            name = "JPEG fine-grained quality level"
        elif -512 <= encoding <= -412:
            name = "JPEG subsampling level"
        elif 0x574D5600 <= encoding <= 0x574D56FF:
            name = "VMware"
        else:
            return f"encoding {encoding}"
    return f"{name} ({encoding})"


@dataclasses.dataclass(frozen=True)
class PixelFormat:
    """PIXEL_FORMAT (RFC 6143 §7.4): 16 bytes in ServerInit and SetPixelFormat."""

    bits_per_pixel: int = 32
    depth: int = 24
    big_endian: bool = False
    true_colour: bool = True
    red_max: int = 255
    green_max: int = 255
    blue_max: int = 255
    red_shift: int = 16
    green_shift: int = 8
    blue_shift: int = 0

    _STRUCT = struct.Struct(">BBBBHHHBBB3x")

    @classmethod
    def parse(cls, b16: bytes | bytearray | memoryview) -> "PixelFormat":
        if len(b16) != 16:
            raise RfbError(f"PIXEL_FORMAT is 16 bytes, got {len(b16)}")
        bpp, depth, be, tc, rm, gm, bm, rs, gs, bs = cls._STRUCT.unpack(bytes(b16))
        if bpp not in (8, 16, 32):
            # §7.4: bits-per-pixel is 8, 16 or 32; anything else cannot be framed.
            raise RfbError(f"PIXEL_FORMAT bits-per-pixel must be 8, 16 or 32, got {bpp}")
        return cls(bpp, depth, bool(be), bool(tc), rm, gm, bm, rs, gs, bs)

    def encode(self) -> bytes:
        return self._STRUCT.pack(self.bits_per_pixel, self.depth, int(self.big_endian), int(self.true_colour),
                                 self.red_max, self.green_max, self.blue_max,
                                 self.red_shift, self.green_shift, self.blue_shift)

    @property
    def bytes_per_pixel(self) -> int:
        return self.bits_per_pixel // 8

    @property
    def tpixel_size(self) -> int:
        """Tight's TPIXEL: 3 bytes (R, G, B) for 32 bpp true colour of depth 24 with 8-bit channels."""
        if (self.true_colour and self.bits_per_pixel == 32 and self.depth == 24
                and self.red_max == self.green_max == self.blue_max == 255):
            return 3
        return self.bytes_per_pixel

    @property
    def cpixel_size(self) -> int:
        """ZRLE's CPIXEL (§7.7.6): 3 bytes for 32 bpp true colour of depth <= 24 whose channels fit
        in the low or the high three bytes; else a PIXEL."""
        if self.true_colour and self.bits_per_pixel == 32 and self.depth <= 24:
            top = max((self.red_max << self.red_shift), (self.green_max << self.green_shift),
                      (self.blue_max << self.blue_shift))
            low = min(self.red_shift, self.green_shift, self.blue_shift)
            if top < (1 << 24) or low >= 8:
                return 3
        return self.bytes_per_pixel


class Rect:
    """One rectangle of a FramebufferUpdate: header fields and its encoded payload (bytes after the
    12-byte header).  Framed rects hold a span of the message's ``raw``; ``payload`` slices it on
    first use, so a relay that never looks costs nothing."""

    __slots__ = ("x", "y", "w", "h", "encoding", "_src", "_a", "_b", "_payload")

    def __init__(self, x: int, y: int, w: int, h: int, encoding: int, payload: bytes = b"") -> None:
        self.x, self.y, self.w, self.h, self.encoding = x, y, w, h, encoding
        self._payload: bytes | None = bytes(payload)
        self._src = b""
        self._a = self._b = 0

    @classmethod
    def _framed(cls, x: int, y: int, w: int, h: int, encoding: int, src: bytes, a: int, b: int) -> "Rect":
        r = cls.__new__(cls)
        r.x, r.y, r.w, r.h, r.encoding = x, y, w, h, encoding
        r._src, r._a, r._b, r._payload = src, a, b, None
        return r

    @property
    def payload(self) -> bytes:
        if self._payload is None:
            self._payload = self._src[self._a:self._b]
        return self._payload

    @property
    def payload_size(self) -> int:
        return self._b - self._a if self._payload is None else len(self._payload)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Rect):
            return NotImplemented
        return ((self.x, self.y, self.w, self.h, self.encoding) == (other.x, other.y, other.w, other.h, other.encoding)
                and self.payload == other.payload)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (f"Rect(x={self.x}, y={self.y}, w={self.w}, h={self.h}, encoding={encoding_name(self.encoding)}, "
                f"payload={self.payload_size} bytes)")


@dataclasses.dataclass(frozen=True, eq=True)
class ServerMessage:
    """One server→client message.  ``kind``: "update", "colormap", "bell", "cut_text" or "other";
    ``type`` is the message-type byte; ``raw`` its exact bytes on the wire."""

    kind: str
    type: int
    raw: bytes
    rects: list[Rect] = dataclasses.field(default_factory=list)
    text: bytes = b""
    # ServerCutText sent with a negative length (ExtendedClipboard): ``text`` is then flags + data.
    extended: bool = False
    # For an update: the pixel format its PIXELs are in (the one in force at its first byte).
    pixel_format: PixelFormat | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def encodings(self) -> set[int]:
        return {r.encoding for r in self.rects}


# A message parser is a generator of requests.  ``yield n`` with n >= 0 reads a field: the next n
# bytes of the message, sent back as bytes (the parser looks at them: a header, a length, a mask);
# ``yield ~n`` (negative) skips n bytes it never looks at (pixels, compressed data), sent back None.
# Its return value is the message's summary (below).  The same parsers drive both framers: the
# whole-message ``ServerStream`` and the relay's streaming ``server.ServerDecoder``, which forwards
# skipped bytes as they arrive and holds only a field until it is whole.
Parse = Generator[int, Any, Any]
_RECT = struct.Struct(">HHHHi")
_FENCE = struct.Struct(">xxxxIB")
_DONE = 1 << 62  # a request no parser makes: it has returned


def message_parser(t: int, pf: PixelFormat) -> Parse:
    """The parser of one server message whose type byte is ``t`` (its first read includes that byte).

    Returns: an update's rects as ``(x, y, w, h, encoding, payload size)`` tuples; a cut text's
    ``(text, extended)``; a ServerFence's flags; None for the others.  Raises ``RfbError`` for a
    message or encoding it cannot frame."""
    if t == 0:  # FramebufferUpdate §7.6.1
        return _update(pf)
    if t == 1:  # SetColourMapEntries §7.6.2
        return _colormap()
    if t == 2 or t == 150:  # Bell §7.6.3; EndOfContinuousUpdates (rfbproto): type byte only
        return _type_only()
    if t == 3:  # ServerCutText §7.6.4; a negative length is the ExtendedClipboard form
        return _cut_text()
    if t == 248:  # ServerFence (rfbproto): type, 3 padding, U32 flags, U8 length, payload (<= 64)
        return _fence()
    if t == 250:  # xvp server message: type, padding, version, code
        return _fixed(4)
    if t == 253:  # gii server message: type, endian-and-sub-type, EU16 length, body
        return _gii()
    raise RfbError(f"unknown server message type {t}")


def _type_only() -> Parse:
    yield 1


def _fixed(n: int) -> Parse:
    yield n


def _colormap() -> Parse:
    head = yield 6
    (count,) = struct.unpack_from(">H", head, 4)
    yield ~(6 * count)


def _cut_text() -> Parse:
    head = yield 8
    (length,) = struct.unpack_from(">i", head, 4)
    text = yield abs(length)
    return bytes(text), length < 0


def _fence() -> Parse:
    head = yield 9
    flags, length = _FENCE.unpack(head)
    if length > 64:
        raise RfbError(f"ServerFence payload of {length} bytes (the maximum is 64)")
    yield ~length
    return flags


def _gii() -> Parse:
    head = yield 4
    length = int.from_bytes(head[2:4], "big" if head[1] & 0x80 else "little")
    yield ~length


def _update(pf: PixelFormat) -> Parse:
    head = yield 4
    (n,) = struct.unpack_from(">H", head, 2)
    rects: list[tuple[int, int, int, int, int, int]] = []
    i = 0
    while i < n:
        i += 1
        x, y, w, h, enc = _RECT.unpack((yield 12))
        size = yield from _rect(pf, enc, w, h)
        rects.append((x, y, w, h, enc, size))
        if enc == LAST_RECT:  # LastRect (§7.8.3 of rfbproto): the update ends here, whatever the count
            break
    return rects


def _u32(b: bytes | bytearray) -> int:
    return int.from_bytes(b, "big")


def _rect(pf: PixelFormat, enc: int, w: int, h: int) -> Parse:
    """One rectangle's payload (after its 12-byte header); returns the payload's size."""
    bpp = pf.bytes_per_pixel
    if enc == RAW:
        size = w * h * bpp
        yield ~size
        return size
    if enc == COPYRECT:
        yield ~4
        return 4
    if enc == RRE or enc == CORRE:
        n = _u32((yield 4))
        rest = bpp + n * (bpp + (8 if enc == RRE else 4))
        yield ~rest
        return 4 + rest
    if enc == HEXTILE:
        return (yield from _hextile(bpp, w, h))
    if enc in (ZRLE, ZLIB, DESKTOP_NAME):  # U32 length, then that many bytes
        n = _u32((yield 4))
        yield ~n
        return 4 + n
    if enc == TIGHT or enc == TIGHT_PNG:
        return (yield from _tight(pf, enc, w, h))
    if enc == H264:  # U32 length, U32 flags, data
        n = _u32((yield 4))
        yield ~(4 + n)
        return 8 + n
    if enc in (DESKTOP_SIZE, LAST_RECT, POINTER_POS, QEMU_POINTER_MOTION, QEMU_EXTENDED_KEY, QEMU_AUDIO):
        return 0
    if enc == CURSOR:  # pixels, then a 1-bit mask with rows padded to bytes
        size = w * h * bpp + ((w + 7) // 8) * h
        yield ~size
        return size
    if enc == XCURSOR:  # fore/back RGB, then bitmap and mask (nothing at all for an empty cursor)
        size = 6 + 2 * ((w + 7) // 8) * h if w * h else 0
        yield ~size
        return size
    if enc == QEMU_LED_STATE:
        yield ~1
        return 1
    if enc == EXTENDED_DESKTOP_SIZE:  # U8 number-of-screens, 3 padding, 16 bytes per SCREEN
        screens = (yield 1)[0]
        yield ~(3 + 16 * screens)
        return 4 + 16 * screens
    if enc == CURSOR_WITH_ALPHA:  # S32 encoding of the RGBA pixels; servers send them Raw
        (inner,) = struct.unpack(">i", (yield 4))
        if inner != RAW:
            raise RfbError(f"CursorWithAlpha pixels in {encoding_name(inner)} are not supported (only Raw)")
        yield ~(w * h * 4)
        return 4 + w * h * 4
    raise RfbError(f"unsupported {encoding_name(enc)} rectangle in a FramebufferUpdate: cannot frame the "
                   "server stream past it")


def _hextile(bpp: int, w: int, h: int) -> Parse:
    """Hextile (§7.7.4): walk the 16x16 tiles; each starts with a subencoding mask."""
    size = 0
    for ty in range(0, h, 16):
        th = min(16, h - ty)
        for tx in range(0, w, 16):
            tw = min(16, w - tx)
            sub = (yield 1)[0]
            size += 1
            if sub & 1:  # Raw: the other bits do not matter
                skip = tw * th * bpp
                yield ~skip
                size += skip
                continue
            skip = (bpp if sub & 2 else 0) + (bpp if sub & 4 else 0)  # Background/ForegroundSpecified
            if sub & 8:  # AnySubrects: a count, then the subrects
                if skip:
                    yield ~skip
                n = (yield 1)[0]
                size += skip + 1
                skip = n * ((bpp + 2) if sub & 16 else 2)
            if skip:
                yield ~skip
                size += skip
    return size


def _compact_len() -> Parse:
    """Tight's compact length: 1-3 bytes, 7 bits each, the third byte 8 bits. Returns (length, its size)."""
    b = (yield 1)[0]
    length = b & 0x7F
    if not b & 0x80:
        return length, 1
    b = (yield 1)[0]
    length |= (b & 0x7F) << 7
    if not b & 0x80:
        return length, 2
    return length | (yield 1)[0] << 14, 3


def _tight(pf: PixelFormat, enc: int, w: int, h: int) -> Parse:
    """Tight (rfbproto "Tight Encoding"): compression-control byte, then fill / JPEG / PNG / basic."""
    ctl = (yield 1)[0]
    kind = ctl >> 4
    tpx = pf.tpixel_size
    if kind == 8:  # FillCompression: one TPIXEL
        yield ~tpx
        return 1 + tpx
    if kind == 9 or (kind == 10 and enc == TIGHT_PNG):  # JPEG / PNG: compact length + data
        length, n = yield from _compact_len()
        yield ~length
        return 1 + n + length
    if kind > 7:
        raise RfbError(f"Tight compression control 0x{ctl:02x} is not valid ({encoding_name(enc)})")
    # BasicCompression: bits 4-5 zlib stream, bit 6 a filter-id follows.
    used = 1
    filt = 0
    if ctl & 0x40:
        filt = (yield 1)[0]
        used += 1
    if filt == 0 or filt == 2:  # copy / gradient: TPIXELs
        size = w * h * tpx
    elif filt == 1:  # palette: U8 colours-1, the palette, then 1-bit (2 colours) or 8-bit indices
        colours = (yield 1)[0] + 1
        yield ~(colours * tpx)
        used += 1 + colours * tpx
        size = ((w + 7) // 8) * h if colours == 2 else w * h
    else:
        raise RfbError(f"Tight filter {filt} is not valid (0 copy, 1 palette, 2 gradient)")
    if size < 12:  # sent uncompressed below 12 bytes
        yield ~size
        return used + size
    length, n = yield from _compact_len()
    yield ~length
    return used + n + length


class ServerStream:
    """Frames the server→client byte stream into whole ``ServerMessage`` s; ``feed`` takes any split.

    For whoever needs messages whole (``render.py``'s replay, test viewers); the relay streams
    instead (``server.ServerDecoder``).  ``max_message`` bounds one message's size (checked before
    its bytes are buffered): a Raw full-screen update of a 4K desktop is 33 MB, the default allows
    8 of those.
    """

    DEFAULT_MAX_MESSAGE = 256 * 1024 * 1024

    def __init__(self, pixel_format: PixelFormat, *, max_message: int = DEFAULT_MAX_MESSAGE) -> None:
        self.pixel_format = pixel_format
        self.max_message = max_message
        self._buf = bytearray()
        self._start = 0  # offset in _buf of the message being parsed
        self._parser: Parse | None = None
        self._type = 0
        self._pf = pixel_format  # the format of the message being parsed
        self._req = 0  # the parser's pending request (see ``Parse``; _DONE: it returned, the message is _off bytes)
        self._off = 0  # bytes of the current message (from _start) the parser has read or skipped
        self._result: Any = None
        self._failed: RfbError | None = None

    def set_pixel_format(self, pf: PixelFormat) -> None:
        """The client's SetPixelFormat: applies to messages that begin after this call."""
        self.pixel_format = pf

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned in a message."""
        return len(self._buf) - self._start

    def feed(self, data: bytes | bytearray | memoryview) -> list[ServerMessage]:
        """The messages ``data`` completed.  RfbError (with ``.messages``, the ones completed before
        it) when the stream cannot be framed further; every later call raises it again."""
        if self._failed is not None:
            raise self._failed
        buf = self._buf
        if data:
            buf += data
        out: list[ServerMessage] = []
        limit = self.max_message
        try:
            while True:
                start = self._start
                avail = len(buf) - start
                parser = self._parser
                if parser is None:
                    if avail < 1:
                        break
                    self._type = buf[start]
                    self._pf = self.pixel_format
                    parser = self._parser = message_parser(self._type, self._pf)
                    self._off = 0
                    self._req = next(parser)
                req, off = self._req, self._off
                while req != _DONE:
                    if req < 0:  # a skip: its bytes are needed only by the next read or the end
                        off += ~req
                        if off > limit:
                            raise self._too_large(off)
                        field: Any = None
                    else:
                        end = off + req
                        if end > limit:
                            raise self._too_large(end)
                        if end > avail:
                            break  # waiting for more bytes
                        field = bytes(buf[start + off:start + end])
                        off = end
                    try:
                        req = parser.send(field)
                    except StopIteration as stop:
                        self._result = stop.value
                        req = _DONE
                self._req, self._off = req, off
                if req != _DONE or off > avail:
                    break  # waiting for more bytes
                out.append(self._build(off))
                self._parser = None
        except RfbError as exc:
            # The whole messages before the error stay usable (a relay forwards them, then closes).
            exc.messages = out  # type: ignore[attr-defined]
            self._failed = exc
            raise
        # Compact once per feed, never inside a message parse (offsets are message-relative anyway).
        if self._start:
            del buf[:self._start]
            self._start = 0
        return out

    def _too_large(self, size: int) -> RfbError:
        return RfbError(f"server message of at least {size} bytes exceeds the maximum of {self.max_message} bytes")

    def _build(self, size: int) -> ServerMessage:
        s = self._start
        with memoryview(self._buf) as mv:  # one copy; the view is released before the buffer resizes
            raw = bytes(mv[s:s + size])
        self._start = s + size
        t, result = self._type, self._result
        self._result = None
        if t == 0:
            rects = []
            off = 4
            for x, y, w, h, enc, n in result:
                off += 12
                rects.append(Rect._framed(x, y, w, h, enc, raw, off, off + n))
                off += n
            return ServerMessage("update", 0, raw, rects, pixel_format=self._pf)
        if t == 3:
            text, extended = result
            return ServerMessage("cut_text", 3, raw, text=text, extended=extended)
        return ServerMessage({1: "colormap", 2: "bell"}.get(t, "other"), t, raw)
