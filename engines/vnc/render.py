"""Rendering RFB updates to pixels: the framebuffer a viewer would show, for ``dbproxy replay``.

Strategy: a Pillow RGB image is the framebuffer; each rectangle is decoded into
a small image (or a fill colour) and pasted.  Pixels are converted from the
session's pixel format (RFC 6143 §7.4) with Pillow's raw decoders where the
channels are whole bytes (the common 32 bpp formats, Tight's TPIXEL, ZRLE's
CPIXEL), with a lookup table for 8 and 16 bpp, and per pixel otherwise.
Channels narrower than 8 bits are scaled to 0..255 (v * 255 // max).

Decoders (RFC 6143 §7.7 and rfbproto.rst): Raw, CopyRect, RRE, CoRRE, Hextile
(background/foreground carried from tile to tile), zlib (one zlib stream per
connection), ZRLE (one zlib stream per connection; 64x64 tiles: raw, solid,
packed palette, plain RLE, palette RLE), Tight and TightPNG (four zlib streams
reset by the control byte; fill, JPEG and PNG through Pillow, basic with the
copy, palette and gradient filters).  Pseudo-rects: DesktopSize and
ExtendedDesktopSize resize the framebuffer (content kept where it still fits:
the spec leaves it undefined); cursor shapes, pointer position, LastRect and
the QEMU/xvp acknowledgements do not touch the framebuffer (a viewer draws the
cursor on top; a recording shows the desktop).  SetColourMapEntries feeds the
colour map of palette-based pixel formats.  H.264 rectangles cannot be decoded
here (no codec in the dependencies): they are counted in ``skipped`` and their
area keeps its previous content.

``DesktopReplay`` plays a recording (``recording.py``): the server records go
through ``updates.ServerStream`` and the framebuffer; the client records are
framed just far enough to see SetPixelFormat (§7.5.1), which changes the
format of the updates the server sends after it.

Sans-IO: no trio, no sockets (Pillow only).
"""

from __future__ import annotations

import io
import struct
import zlib
from array import array
from collections.abc import Iterator
from typing import Any

from PIL import Image

from .recording import Recording
from .updates import (
    COPYRECT, CORRE, CURSOR_WITH_ALPHA, DESKTOP_SIZE, EXTENDED_DESKTOP_SIZE, H264, HEXTILE, RAW, RRE, TIGHT, TIGHT_PNG,
    ZLIB, ZRLE, PixelFormat, Rect, RfbError, ServerMessage, ServerStream, encoding_name,
)

__all__ = ["DesktopReplay", "Framebuffer", "PixelCodec", "RenderError"]

# Pillow raw modes for 4-byte pixels whose R, G, B sit in whole bytes at these positions.
_RAW4 = {(0, 1, 2): "RGBX", (2, 1, 0): "BGRX", (1, 2, 3): "XRGB", (3, 2, 1): "XBGR"}
_RAW3 = {(0, 1, 2): "RGB", (2, 1, 0): "BGR"}


class RenderError(ValueError):
    """A rectangle's payload does not decode (corrupt data, or a zlib stream out of step)."""


class PixelCodec:
    """Converts PIXELs (and Tight's TPIXEL, ZRLE's CPIXEL) of one pixel format to RGB."""

    def __init__(self, pf: PixelFormat, colormap: list[tuple[int, int, int]] | None = None) -> None:
        self.pf = pf
        self.colormap = colormap if colormap is not None else [(0, 0, 0)] * 256
        self.bpp = pf.bytes_per_pixel
        self.order = "big" if pf.big_endian else "little"
        self._lut: list[bytes] | None = None
        self._cache: dict[int, bytes] = {}
        self.byte_channels: tuple[int, int, int] | None = None  # byte index of R, G, B in a PIXEL
        if (pf.true_colour and self.bpp == 4 and pf.red_max == pf.green_max == pf.blue_max == 255
                and pf.red_shift % 8 == pf.green_shift % 8 == pf.blue_shift % 8 == 0):
            pos = [s // 8 for s in (pf.red_shift, pf.green_shift, pf.blue_shift)]
            self.byte_channels = tuple(p if not pf.big_endian else 3 - p for p in pos)  # type: ignore[assignment]
        # ZRLE's 3-byte CPIXEL drops the byte the channels do not use: the most significant byte
        # when they fit in the low 24 bits, else the least significant one (§7.7.6).
        self.cpixel = pf.cpixel_size
        self._cdrop = 0
        if self.cpixel == 3:
            top = max(pf.red_max << pf.red_shift, pf.green_max << pf.green_shift, pf.blue_max << pf.blue_shift)
            drop_msb = top < (1 << 24)
            # Byte index (in wire order) of the dropped byte.
            self._cdrop = (3 if not pf.big_endian else 0) if drop_msb else (0 if not pf.big_endian else 3)
        self.tpixel = pf.tpixel_size

    # -- single colours -------------------------------------------------------------------------

    def rgb_of_value(self, v: int) -> bytes:
        """3 bytes R, G, B of a pixel value."""
        got = self._cache.get(v)
        if got is None:
            pf = self.pf
            if not pf.true_colour:
                got = bytes(self.colormap[v & 0xFF] if v < 256 else (0, 0, 0))
            else:
                got = bytes((_scale((v >> pf.red_shift) & pf.red_max, pf.red_max),
                             _scale((v >> pf.green_shift) & pf.green_max, pf.green_max),
                             _scale((v >> pf.blue_shift) & pf.blue_max, pf.blue_max)))
            if len(self._cache) < 65536:
                self._cache[v] = got
        return got

    def pixel(self, data: bytes | memoryview) -> bytes:
        return self.rgb_of_value(int.from_bytes(data, self.order))

    def cpixel_to_pixel(self, data: bytes) -> bytes:
        if self.cpixel == 3:
            return data[:self._cdrop] + b"\0" + data[self._cdrop:]
        return data

    def tpixel_rgb(self, data: bytes) -> bytes:
        return bytes(data) if self.tpixel == 3 else self.pixel(data)

    def cpixel_rgb(self, data: bytes) -> bytes:
        return self.pixel(self.cpixel_to_pixel(data)) if self.cpixel == 3 else self.pixel(data)

    # -- blocks -----------------------------------------------------------------------------------

    def image(self, data: bytes, w: int, h: int) -> Image.Image:
        """w*h PIXELs → an RGB image."""
        n = w * h * self.bpp
        if len(data) < n:
            raise RenderError(f"{len(data)} bytes of pixels for a {w}x{h} rectangle ({n} expected)")
        data = data[:n]
        if self.byte_channels is not None:
            mode = _RAW4.get(self.byte_channels)
            if mode is not None:
                return Image.frombytes("RGB", (w, h), data, "raw", mode)
            bands = Image.frombytes("RGBA", (w, h), data).split()
            r, g, b = self.byte_channels
            return Image.merge("RGB", (bands[r], bands[g], bands[b]))
        if self.bpp == 1:
            img = Image.frombytes("P", (w, h), data)
            img.putpalette(b"".join(self.rgb_of_value(v) for v in range(256)))
            return img.convert("RGB")
        if self.bpp == 2:
            if self._lut is None:
                self._lut = [self.rgb_of_value(v) for v in range(65536)]
            vals = array("H", data)
            if (self.order == "big") != (array("H", b"\x01\x00")[0] == 256):
                vals.byteswap()
            lut = self._lut
            return Image.frombytes("RGB", (w, h), b"".join([lut[v] for v in vals]))
        rgb = self.pixel
        return Image.frombytes("RGB", (w, h), b"".join([rgb(data[i:i + 4]) for i in range(0, n, 4)]))

    def rgb_image(self, rgb: bytes, w: int, h: int) -> Image.Image:
        return Image.frombytes("RGB", (w, h), rgb)

    def tpixel_image(self, data: bytes, w: int, h: int) -> Image.Image:
        if self.tpixel == 3:
            return Image.frombytes("RGB", (w, h), data[:w * h * 3])
        return self.image(data, w, h)

    def cpixel_image(self, data: bytes, w: int, h: int) -> Image.Image:
        if self.cpixel != 3:
            return self.image(data, w, h)
        if self.byte_channels is not None:
            pos = tuple(p - (1 if p > self._cdrop else 0) for p in self.byte_channels)
            mode = _RAW3.get(pos)  # type: ignore[arg-type]
            if mode is not None:
                return Image.frombytes("RGB", (w, h), data[:w * h * 3], "raw", mode)
        return Image.frombytes("RGB", (w, h), b"".join(
            [self.cpixel_rgb(data[i:i + 3]) for i in range(0, w * h * 3, 3)]))


def _scale(v: int, vmax: int) -> int:
    return v if vmax == 255 else (v * 255 // vmax if vmax else 0)


class _Reader:
    """Sequential reads over a decoded payload; a short read is a RenderError."""

    __slots__ = ("data", "off", "what")

    def __init__(self, data: bytes, what: str) -> None:
        self.data, self.off, self.what = data, 0, what

    def take(self, n: int) -> bytes:
        end = self.off + n
        if end > len(self.data):
            raise RenderError(f"{self.what}: data ends early ({len(self.data)} bytes)")
        out = self.data[self.off:end]
        self.off = end
        return out

    def u8(self) -> int:
        if self.off >= len(self.data):
            raise RenderError(f"{self.what}: data ends early ({len(self.data)} bytes)")
        self.off += 1
        return self.data[self.off - 1]

    def compact_len(self) -> int:
        b = self.u8()
        n = b & 0x7F
        if b & 0x80:
            b = self.u8()
            n |= (b & 0x7F) << 7
            if b & 0x80:
                n |= self.u8() << 14
        return n


class Framebuffer:
    """The desktop as a viewer sees it; ``apply`` takes ``ServerMessage`` s or single rects."""

    def __init__(self, width: int, height: int, pixel_format: PixelFormat | bytes) -> None:
        self.width, self.height = width, height
        self.img = Image.new("RGB", (width, height))
        self.colormap: list[tuple[int, int, int]] = [(0, 0, 0)] * 256
        self.codec = PixelCodec(_pf(pixel_format), self.colormap)
        self._zlib = zlib.decompressobj()  # the zlib encoding's stream (§7.7.5): one per connection
        self._zrle = zlib.decompressobj()  # ZRLE's stream (§7.7.6): one per connection
        self._tight: list[Any] = [zlib.decompressobj() for _ in range(4)]
        self.updates = 0
        self.skipped: dict[int, int] = {}  # encoding → rects that could not be drawn (H.264)

    @property
    def pixel_format(self) -> PixelFormat:
        return self.codec.pf

    def set_pixel_format(self, pf: PixelFormat | bytes) -> None:
        self.codec = PixelCodec(_pf(pf), self.colormap)

    def image(self) -> Image.Image:
        return self.img.copy()

    def apply(self, msg: ServerMessage) -> None:
        if msg.kind == "update":
            pf = getattr(msg, "pixel_format", None)
            if pf is not None and pf != self.codec.pf:
                self.set_pixel_format(pf)
            for r in msg.rects:
                self.apply_rect(r)
            self.updates += 1
        elif msg.kind == "colormap":
            first, count = struct.unpack_from(">HH", msg.raw, 2)
            for i in range(count):
                if first + i < 256:
                    r, g, b = struct.unpack_from(">HHH", msg.raw, 6 + 6 * i)
                    self.colormap[first + i] = (r >> 8, g >> 8, b >> 8)
            self.codec = PixelCodec(self.codec.pf, self.colormap)

    def apply_rect(self, r: Rect) -> None:
        enc = r.encoding
        try:
            if enc == RAW:
                if r.w and r.h:
                    self.img.paste(self.codec.image(r.payload, r.w, r.h), (r.x, r.y))
            elif enc == COPYRECT:
                sx, sy = struct.unpack(">HH", r.payload)
                self.img.paste(self.img.crop((sx, sy, sx + r.w, sy + r.h)), (r.x, r.y))
            elif enc == RRE or enc == CORRE:
                self._rre(r, enc == CORRE)
            elif enc == HEXTILE:
                self._hextile(r)
            elif enc == ZLIB:
                data = self._zlib.decompress(r.payload[4:])
                if r.w and r.h:
                    self.img.paste(self.codec.image(data, r.w, r.h), (r.x, r.y))
            elif enc == ZRLE:
                self._zrle_rect(r)
            elif enc == TIGHT or enc == TIGHT_PNG:
                self._tight_rect(r)
            elif enc == DESKTOP_SIZE:
                self.resize(r.w, r.h)
            elif enc == EXTENDED_DESKTOP_SIZE:
                # x-position 1 with a non-zero y-position: a refused SetDesktopSize, nothing changed.
                if not (r.x == 1 and r.y != 0):
                    self.resize(r.w, r.h)
            elif enc == H264:
                self.skipped[enc] = self.skipped.get(enc, 0) + 1
            # Other pseudo-encodings (cursor shapes, pointer position, LastRect, acknowledgements,
            # CursorWithAlpha) leave the framebuffer alone.
            elif enc == CURSOR_WITH_ALPHA or enc < 0:
                pass
        except zlib.error as exc:
            raise RenderError(f"{encoding_name(enc)} rect {r.w}x{r.h} at {r.x},{r.y}: zlib: {exc}") from None
        except (struct.error, IndexError) as exc:
            raise RenderError(f"{encoding_name(enc)} rect {r.w}x{r.h} at {r.x},{r.y}: {exc}") from None

    def resize(self, w: int, h: int) -> None:
        if (w, h) == (self.width, self.height):
            return
        img = Image.new("RGB", (w, h))
        img.paste(self.img, (0, 0))
        self.img, self.width, self.height = img, w, h

    # -- encodings --------------------------------------------------------------------------------

    def _fill(self, rgb: bytes, x: int, y: int, w: int, h: int) -> None:
        if w > 0 and h > 0:
            self.img.paste(tuple(rgb), (x, y, x + w, y + h))

    def _rre(self, r: Rect, compact: bool) -> None:
        bpp = self.codec.bpp
        p = r.payload
        (n,) = struct.unpack_from(">I", p, 0)
        self._fill(self.codec.pixel(p[4:4 + bpp]), r.x, r.y, r.w, r.h)
        off = 4 + bpp
        step = bpp + (4 if compact else 8)
        for _ in range(n):
            colour = self.codec.pixel(p[off:off + bpp])
            if compact:
                sx, sy, sw, sh = p[off + bpp:off + step]
            else:
                sx, sy, sw, sh = struct.unpack_from(">HHHH", p, off + bpp)
            self._fill(colour, r.x + sx, r.y + sy, sw, sh)
            off += step

    def _hextile(self, r: Rect) -> None:
        codec, bpp = self.codec, self.codec.bpp
        rd = _Reader(r.payload, "Hextile")
        bg = fg = b"\0\0\0"
        for ty in range(0, r.h, 16):
            th = min(16, r.h - ty)
            for tx in range(0, r.w, 16):
                tw = min(16, r.w - tx)
                x, y = r.x + tx, r.y + ty
                sub = rd.u8()
                if sub & 1:
                    self.img.paste(codec.image(rd.take(tw * th * bpp), tw, th), (x, y))
                    continue
                if sub & 2:
                    bg = codec.pixel(rd.take(bpp))
                self._fill(bg, x, y, tw, th)
                if sub & 4:
                    fg = codec.pixel(rd.take(bpp))
                if sub & 8:
                    for _ in range(rd.u8()):
                        colour = codec.pixel(rd.take(bpp)) if sub & 16 else fg
                        xy, wh = rd.u8(), rd.u8()
                        self._fill(colour, x + (xy >> 4), y + (xy & 15), (wh >> 4) + 1, (wh & 15) + 1)

    def _zrle_rect(self, r: Rect) -> None:
        data = self._zrle.decompress(r.payload[4:])
        codec = self.codec
        cps = codec.cpixel
        rd = _Reader(data, "ZRLE")
        for ty in range(0, r.h, 64):
            th = min(64, r.h - ty)
            for tx in range(0, r.w, 64):
                tw = min(64, r.w - tx)
                x, y = r.x + tx, r.y + ty
                sub = rd.u8()
                n = tw * th
                if sub == 0:  # raw CPIXELs
                    self.img.paste(codec.cpixel_image(rd.take(n * cps), tw, th), (x, y))
                elif sub == 1:  # solid
                    self._fill(codec.cpixel_rgb(rd.take(cps)), x, y, tw, th)
                elif 2 <= sub <= 16:  # packed palette: 1, 2 or 4 bits per index, rows padded to bytes
                    pal = [codec.cpixel_rgb(rd.take(cps)) for _ in range(sub)]
                    bits = 1 if sub == 2 else 2 if sub <= 4 else 4
                    row = (tw * bits + 7) // 8
                    packed = rd.take(row * th)
                    out = []
                    mask = (1 << bits) - 1
                    for yy in range(th):
                        base = yy * row
                        for xx in range(tw):
                            bit = xx * bits
                            idx = (packed[base + (bit >> 3)] >> (8 - bits - (bit & 7))) & mask
                            out.append(pal[idx] if idx < sub else b"\0\0\0")
                    self.img.paste(codec.rgb_image(b"".join(out), tw, th), (x, y))
                elif sub == 128 or sub >= 130:  # plain RLE / palette RLE
                    pal = [codec.cpixel_rgb(rd.take(cps)) for _ in range(sub - 128)] if sub >= 130 else None
                    out = []
                    left = n
                    while left > 0:
                        if pal is None:
                            colour = codec.cpixel_rgb(rd.take(cps))
                            run = _run_length(rd)
                        else:
                            idx = rd.u8()
                            colour = pal[idx & 0x7F] if (idx & 0x7F) < len(pal) else b"\0\0\0"
                            run = _run_length(rd) if idx & 0x80 else 1
                        run = min(run, left)
                        out.append(colour * run)
                        left -= run
                    self.img.paste(codec.rgb_image(b"".join(out), tw, th), (x, y))
                else:
                    raise RenderError(f"ZRLE tile subencoding {sub} is not defined")

    def _tight_rect(self, r: Rect) -> None:
        codec = self.codec
        rd = _Reader(r.payload, "Tight")
        ctl = rd.u8()
        for i in range(4):  # bits 0-3: reset zlib stream i before use
            if ctl & (1 << i):
                self._tight[i] = zlib.decompressobj()
        kind = ctl >> 4
        if kind == 8:  # fill
            self._fill(codec.tpixel_rgb(rd.take(codec.tpixel)), r.x, r.y, r.w, r.h)
            return
        if kind in (9, 10):  # JPEG / PNG
            blob = rd.take(rd.compact_len())
            try:
                img = Image.open(io.BytesIO(blob))
                img.load()
            except Exception as exc:  # Pillow raises many types for corrupt images
                raise RenderError(f"Tight {'JPEG' if kind == 9 else 'PNG'} data does not decode: {exc}") from None
            self.img.paste(img.convert("RGB").crop((0, 0, r.w, r.h)), (r.x, r.y))
            return
        stream = (ctl >> 4) & 3
        filt = rd.u8() if ctl & 0x40 else 0
        tps = codec.tpixel
        palette: list[bytes] = []
        if filt == 1:
            ncol = rd.u8() + 1
            palette = [codec.tpixel_rgb(rd.take(tps)) for _ in range(ncol)]
            size = ((r.w + 7) // 8) * r.h if ncol == 2 else r.w * r.h
        else:
            size = r.w * r.h * tps
        if size < 12:
            data = rd.take(size)
        else:
            data = self._tight[stream].decompress(rd.take(rd.compact_len()))
            if len(data) < size:
                raise RenderError(f"Tight basic data inflates to {len(data)} bytes, {size} expected")
        if filt == 0:
            img = codec.tpixel_image(data, r.w, r.h)
        elif filt == 1:
            out = []
            black = b"\0\0\0"
            if len(palette) == 2:
                row = (r.w + 7) // 8
                for yy in range(r.h):
                    for xx in range(r.w):
                        out.append(palette[(data[yy * row + (xx >> 3)] >> (7 - (xx & 7))) & 1])
            else:
                out = [palette[i] if i < len(palette) else black for i in data[:r.w * r.h]]
            img = codec.rgb_image(b"".join(out), r.w, r.h)
        else:
            img = codec.rgb_image(self._gradient(data, r.w, r.h), r.w, r.h)
        self.img.paste(img, (r.x, r.y))

    def _gradient(self, data: bytes, w: int, h: int) -> bytes:
        """Tight's gradient filter: each component is predicted as left + above - above-left,
        clamped to [0, max]; the data is the difference modulo max+1."""
        codec, pf = self.codec, self.codec.pf
        if codec.tpixel == 3:
            maxes = (255, 255, 255)

            def comps(i: int) -> tuple[int, int, int]:
                return data[3 * i], data[3 * i + 1], data[3 * i + 2]
        else:
            bpp = codec.bpp
            maxes = (pf.red_max, pf.green_max, pf.blue_max)
            shifts = (pf.red_shift, pf.green_shift, pf.blue_shift)

            def comps(i: int) -> tuple[int, int, int]:
                v = int.from_bytes(data[i * bpp:(i + 1) * bpp], codec.order)
                return tuple((v >> s) & m for s, m in zip(shifts, maxes))  # type: ignore[return-value]
        prev = [(0, 0, 0)] * w
        out = bytearray()
        for yy in range(h):
            cur: list[tuple[int, int, int]] = []
            left = upleft = (0, 0, 0)
            for xx in range(w):
                up = prev[xx]
                d = comps(yy * w + xx)
                px = tuple((min(max(left[c] + up[c] - upleft[c], 0), maxes[c]) + d[c]) & maxes[c] for c in range(3))
                cur.append(px)  # type: ignore[arg-type]
                out += bytes(_scale(px[c], maxes[c]) for c in range(3))
                left, upleft = px, up  # type: ignore[assignment]
            prev = cur
        return bytes(out)


def _run_length(rd: _Reader) -> int:
    n = 1
    while True:
        b = rd.u8()
        n += b
        if b != 255:
            return n


def _pf(pf: PixelFormat | bytes) -> PixelFormat:
    return pf if isinstance(pf, PixelFormat) else PixelFormat.parse(pf)


# -- the client side of a recording, just far enough for SetPixelFormat --------------------------

def _client_message_size(buf: bytes | bytearray, off: int) -> int | None:
    """Size of the client message at ``off`` (RFC 6143 §7.5 and extensions), None when incomplete."""
    n = len(buf) - off
    t = buf[off]
    fixed = {0: 20, 3: 10, 4: 8, 5: 6, 150: 10, 250: 4}
    if t in fixed:
        return fixed[t] if n >= fixed[t] else None
    if t == 2:  # SetEncodings
        return 4 + 4 * struct.unpack_from(">H", buf, off + 2)[0] if n >= 4 else None
    if t == 6:  # ClientCutText (negative length: ExtendedClipboard)
        return 8 + abs(struct.unpack_from(">i", buf, off + 4)[0]) if n >= 8 else None
    if t == 248:  # ClientFence
        return 9 + buf[off + 8] if n >= 9 else None
    if t == 251:  # SetDesktopSize
        return 8 + 16 * buf[off + 6] if n >= 8 else None
    if t == 253:  # gii: EU16 length after type and endian-and-sub-type
        if n < 4:
            return None
        return 4 + int.from_bytes(buf[off + 2:off + 4], "big" if buf[off + 1] & 0x80 else "little")
    if t == 255:  # QEMU client message: ExtendedKeyEvent (sub 0) is 12 bytes; audio (sub 1) 4 or 10
        if n < 4:
            return None
        sub, op = buf[off + 1], struct.unpack_from(">H", buf, off + 2)[0]
        if sub == 0:
            return 12
        if sub == 1:
            return 10 if op == 2 else 4
    raise RfbError(f"unknown client message type {t} in the recording")


class DesktopReplay:
    """Plays a ``Recording``: ``frames`` yields ``(seconds, Image)`` as the screen changes."""

    def __init__(self, rec: Recording) -> None:
        pf = PixelFormat.parse(rec.pixel_format)
        self.rec = rec
        self.fb = Framebuffer(rec.width, rec.height, pf)
        self.stream = ServerStream(pf)
        self._client = bytearray()
        self._client_ok = True
        self.warnings: list[str] = []
        self.encodings: dict[int, int] = {}
        self._failed_changed = False

    def _client_bytes(self, data: bytes) -> None:
        if not self._client_ok:
            return
        buf = self._client
        buf += data
        off = 0
        try:
            while off < len(buf):
                size = _client_message_size(buf, off)
                if size is None:
                    break
                if len(buf) - off < size:
                    break
                if buf[off] == 0:  # SetPixelFormat: updates begun after it use the new format
                    self.stream.set_pixel_format(PixelFormat.parse(bytes(buf[off + 4:off + 20])))
                off += size
        except RfbError as exc:
            self.warnings.append(f"client stream: {exc}; later SetPixelFormat messages are not followed")
            self._client_ok = False
        del buf[:off]

    def _server_bytes(self, data: bytes) -> bool:
        """Apply; True when an update changed the screen."""
        changed = False
        failed: RfbError | None = None
        try:
            msgs = self.stream.feed(data)
        except RfbError as exc:
            self.warnings.append(f"server stream: {exc}; the replay stops here")
            msgs, failed = exc.messages, exc  # draw what came before the error
        for m in msgs:
            if m.kind == "update":
                for r in m.rects:
                    self.encodings[r.encoding] = self.encodings.get(r.encoding, 0) + 1
                try:
                    self.fb.apply(m)
                except RenderError as exc:
                    self.warnings.append(f"update {self.fb.updates + 1}: {exc}")
                    self.fb.updates += 1
                changed = True
            else:
                self.fb.apply(m)
        if failed is not None:
            self._failed_changed = changed
            raise failed
        return changed

    def frames(self, *, every: float | None = None, until: float | None = None) -> Iterator[tuple[float, Image.Image]]:
        """The screen after each chunk that completed an update (``every`` None), or at most one
        frame per ``every`` seconds (the latest state in each interval, stamped with its time);
        the final state is always the last frame."""
        last_emit: float | None = None
        pending: float | None = None  # time of a change not yet emitted
        for t, kind, data in self.rec.events:
            if until is not None and t > until:
                break
            if kind == "c":
                self._client_bytes(data)
                continue
            if every is not None and pending is not None and last_emit is not None and t >= last_emit + every:
                # The interval is over: emit the state it ended with before applying newer bytes.
                yield pending, self.fb.image()
                last_emit, pending = pending, None
            try:
                changed = self._server_bytes(data)
            except RfbError:
                if self._failed_changed:
                    pending = t
                break
            if not changed:
                continue
            if every is None or last_emit is None:
                yield t, self.fb.image()
                last_emit, pending = t, None
            else:
                pending = t
        if pending is not None:
            yield pending, self.fb.image()

    def last(self, *, until: float | None = None) -> Image.Image:
        for _ in self.frames(every=float("inf"), until=until):
            pass
        return self.fb.image()
