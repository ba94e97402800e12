"""``engines/vnc/render.py``: RFB rectangles to pixels.

- Captured streams of real servers (data/*.rfb, see data/README.md) rendered to the
  same pixels as vncdotool's screenshot of that screen: exactly for lossless 24-bit
  encodings, within the quantisation step for 16 and 8 bits per pixel, within JPEG
  error for Tight JPEG.
- Payloads built here (per RFC 6143 §7.7 / rfbproto) decoded to known pixels, for
  every ZRLE tile subencoding, every Tight filter and stream reset, the pixel formats
  (big-endian, 16 bpp, colour map) and the pseudo-rects that resize.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image, ImageChops, ImageStat

from dbproxy.engines.vnc.render import Framebuffer, PixelCodec, RenderError
from dbproxy.engines.vnc.updates import PixelFormat, Rect, ServerStream

DATA = Path(__file__).resolve().parent / "data"
FIXTURES = json.loads((DATA / "fixtures.json").read_text())
PF32 = PixelFormat()
PF32BE = PixelFormat(32, 24, True, True, 255, 255, 255, 16, 8, 0)
PF16 = PixelFormat(16, 16, False, True, 31, 63, 31, 11, 5, 0)
PF8MAP = PixelFormat(8, 8, False, False, 0, 0, 0, 0, 0, 0)

RED, GREEN, BLUE, WHITE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)


def render_fixture(stem: str) -> Framebuffer:
    meta = FIXTURES[stem]
    pf = PixelFormat.parse(bytes.fromhex(meta["pixel_format"]))
    fb = Framebuffer(meta["width"], meta["height"], pf)
    for m in ServerStream(pf).feed((DATA / f"{stem}.rfb").read_bytes()):
        fb.apply(m)
    return fb


@pytest.mark.parametrize("stem", sorted(FIXTURES))
def test_captured_stream_renders_the_screenshot(stem: str) -> None:
    fb = render_fixture(stem)
    shot = Image.open(DATA / f"{stem}.png").convert("RGB")
    assert fb.image().size == shot.size
    diff = ImageChops.difference(fb.image(), shot)
    worst = [hi for _, hi in diff.getextrema()]
    pf = PixelFormat.parse(bytes.fromhex(FIXTURES[stem]["pixel_format"]))
    if "jpeg" in stem:
        assert max(worst) <= 64 and max(ImageStat.Stat(diff).mean) < 2.0, worst
    elif pf.bits_per_pixel < 32:
        # Channels narrower than 8 bits: off by at most half a quantisation step (the server
        # rounds, the framebuffer scales v * 255 // max), never more.
        steps = [255 / pf.red_max, 255 / pf.green_max, 255 / pf.blue_max]
        assert all(w <= s / 2 + 1 for w, s in zip(worst, steps)), (worst, steps)
    else:
        assert diff.getbbox() is None, diff.getbbox()


def test_captured_jpeg_is_decoded_not_skipped() -> None:
    """The JPEG capture's first full-screen update alone (before TigerVNC's lossless refresh) is
    already close to the screen: the JPEG rects were drawn."""
    meta = FIXTURES["tigervnc-tight-jpeg"]
    pf = PixelFormat.parse(bytes.fromhex(meta["pixel_format"]))
    fb = Framebuffer(meta["width"], meta["height"], pf)
    msgs = [m for m in ServerStream(pf).feed((DATA / "tigervnc-tight-jpeg.rfb").read_bytes()) if m.kind == "update"]
    full = next(m for m in msgs if any(r.encoding == 7 and r.payload[0] >> 4 == 9 for r in m.rects))
    for m in msgs[:msgs.index(full) + 1]:
        fb.apply(m)
    shot = Image.open(DATA / "tigervnc-tight-jpeg.png").convert("RGB")
    box = (0, 0, meta["width"], 80)  # the upper part: no popup there
    diff = ImageChops.difference(fb.image().crop(box), shot.crop(box))
    # Quality level 5 with chroma subsampling: a mean error of a few levels; an undrawn (black)
    # area would be off by the screen's mean brightness.
    assert max(ImageStat.Stat(diff).mean) < 20.0
    assert min(ImageStat.Stat(shot.crop(box)).mean) > 80


# -- built payloads -----------------------------------------------------------------------------

def px32(rgb: tuple[int, int, int]) -> bytes:
    return bytes((rgb[2], rgb[1], rgb[0], 0))  # little-endian, red shift 16


def fb_with(pf: PixelFormat = PF32, w: int = 32, h: int = 32) -> Framebuffer:
    return Framebuffer(w, h, pf)


def flat(img: Image.Image) -> list[tuple[int, int, int]]:
    raw = img.convert("RGB").tobytes()
    return [tuple(raw[i:i + 3]) for i in range(0, len(raw), 3)]  # type: ignore[misc]


def pixels(fb: Framebuffer, box: tuple[int, int, int, int]) -> set:
    return set(flat(fb.image().crop(box)))


def test_raw_in_every_pixel_format() -> None:
    for pf, enc in [
        (PF32, lambda c: px32(c)),
        (PF32BE, lambda c: bytes((0, c[0], c[1], c[2]))),
        (PixelFormat(32, 24, False, True, 255, 255, 255, 0, 8, 16), lambda c: bytes((c[0], c[1], c[2], 0))),
        (PixelFormat(32, 24, False, True, 255, 255, 255, 8, 16, 24), lambda c: bytes((0, c[0], c[1], c[2]))),
        (PF16, lambda c: struct.pack("<H", ((c[0] >> 3) << 11) | ((c[1] >> 2) << 5) | (c[2] >> 3))),
        (PixelFormat(16, 16, True, True, 31, 63, 31, 11, 5, 0),
         lambda c: struct.pack(">H", ((c[0] >> 3) << 11) | ((c[1] >> 2) << 5) | (c[2] >> 3))),
        # 30-bit colour (10 bits a channel): the per-pixel path.
        (PixelFormat(32, 30, False, True, 1023, 1023, 1023, 20, 10, 0),
         lambda c: struct.pack("<I", ((c[0] * 1023 // 255) << 20) | ((c[1] * 1023 // 255) << 10) | (c[2] * 1023 // 255))),
    ]:
        fb = fb_with(pf, 4, 2)
        colours = [RED, GREEN, BLUE, WHITE, BLACK, (255, 0, 255), (0, 255, 255), (255, 255, 0)]
        fb.apply_rect(Rect(0, 0, 4, 2, 0, b"".join(enc(c) for c in colours)))
        assert flat(fb.image()) == colours, pf


def test_colour_map_8bpp() -> None:
    fb = fb_with(PF8MAP, 3, 1)
    entries = [(0xFFFF, 0, 0), (0, 0x8000, 0), (0x1234, 0x5678, 0x9ABC)]
    colormap = struct.pack(">BxHH", 1, 10, 3) + b"".join(struct.pack(">HHH", *e) for e in entries)
    for m in ServerStream(PF8MAP).feed(colormap + struct.pack(">BxHHHHHi", 0, 1, 0, 0, 3, 1, 0) + bytes([10, 11, 12])):
        fb.apply(m)
    assert flat(fb.image()) == [(255, 0, 0), (0, 128, 0), (0x12, 0x56, 0x9A)]


def test_copyrect_overlapping() -> None:
    fb = fb_with(PF32, 4, 1)
    fb.apply_rect(Rect(0, 0, 4, 1, 0, b"".join(px32(c) for c in (RED, GREEN, BLUE, WHITE))))
    fb.apply_rect(Rect(1, 0, 3, 1, 1, struct.pack(">HH", 0, 0)))  # shift right by one: source overlaps
    assert flat(fb.image()) == [RED, RED, GREEN, BLUE]


def test_rre_and_corre() -> None:
    fb = fb_with(PF32, 10, 10)
    fb.apply_rect(Rect(0, 0, 10, 10, 2, struct.pack(">I", 1) + px32(BLUE) + px32(RED) + struct.pack(">HHHH", 2, 3, 4, 5)))
    assert fb.image().getpixel((0, 0)) == BLUE and fb.image().getpixel((2, 3)) == RED
    assert fb.image().getpixel((5, 7)) == RED and fb.image().getpixel((6, 8)) == BLUE
    fb.apply_rect(Rect(1, 1, 5, 5, 4, struct.pack(">I", 1) + px32(WHITE) + px32(GREEN) + bytes([1, 1, 2, 2])))
    assert fb.image().getpixel((1, 1)) == WHITE and fb.image().getpixel((2, 2)) == GREEN
    assert fb.image().getpixel((3, 3)) == GREEN and fb.image().getpixel((4, 4)) == WHITE


def test_hextile_carries_background_and_foreground() -> None:
    fb = fb_with(PF32, 40, 16)
    tiles = (bytes([2 | 4 | 8, ]) + px32(BLUE) + px32(RED) + bytes([1, 0x11, 0x10])  # bg blue, fg red, 2x1 at 1,1
             + bytes([8, 1, 0x22, 0x00])  # bg and fg carried: a 1x1 red at 2,2
             + bytes([1]) + px32(GREEN) * (8 * 16))  # last tile (8 wide) raw green
    fb.apply_rect(Rect(0, 0, 40, 16, 5, tiles))
    img = fb.image()
    assert img.getpixel((0, 0)) == BLUE and img.getpixel((1, 1)) == RED and img.getpixel((2, 1)) == RED
    assert img.getpixel((3, 1)) == BLUE
    assert img.getpixel((16, 0)) == BLUE and img.getpixel((18, 2)) == RED and img.getpixel((19, 2)) == BLUE
    assert pixels(fb, (32, 0, 40, 16)) == {GREEN}
    # Coloured subrects.
    fb.apply_rect(Rect(0, 0, 4, 4, 5, bytes([2 | 8 | 16]) + px32(WHITE) + bytes([1]) + px32(GREEN) + bytes([0x00, 0x00])))
    assert fb.image().getpixel((0, 0)) == GREEN and fb.image().getpixel((1, 0)) == WHITE


def test_zlib_stream_spans_rects() -> None:
    z = zlib.compressobj()
    a = z.compress(px32(RED) * 4) + z.flush(zlib.Z_SYNC_FLUSH)
    b = z.compress(px32(RED) * 4) + z.flush(zlib.Z_SYNC_FLUSH)  # back-references into the first rect
    fb = fb_with(PF32, 4, 2)
    fb.apply_rect(Rect(0, 0, 4, 1, 6, struct.pack(">I", len(a)) + a))
    fb.apply_rect(Rect(0, 1, 4, 1, 6, struct.pack(">I", len(b)) + b))
    assert pixels(fb, (0, 0, 4, 2)) == {RED}
    fresh = fb_with(PF32, 4, 2)
    with pytest.raises(RenderError, match="zlib"):
        fresh.apply_rect(Rect(0, 1, 4, 1, 6, struct.pack(">I", len(b)) + b))  # out of step: a clear error


def cpx(rgb: tuple[int, int, int]) -> bytes:
    return bytes((rgb[2], rgb[1], rgb[0]))  # CPIXEL of PF32: the three low bytes, little-endian


def zrle(fb: Framebuffer, z, x: int, y: int, w: int, h: int, tiles: bytes) -> None:
    data = z.compress(tiles) + z.flush(zlib.Z_SYNC_FLUSH)
    fb.apply_rect(Rect(x, y, w, h, 16, struct.pack(">I", len(data)) + data))


def test_zrle_every_subencoding() -> None:
    z = zlib.compressobj()
    fb = fb_with(PF32, 70, 8)
    # Two tiles across (64 + 6 wide): raw, then solid.
    raw_tile = bytes([0]) + b"".join(cpx(RED if (i % 64) < 32 else GREEN) for i in range(64 * 4))
    zrle(fb, z, 0, 0, 70, 4, raw_tile + bytes([1]) + cpx(BLUE))
    img = fb.image()
    assert img.getpixel((0, 0)) == RED and img.getpixel((40, 3)) == GREEN and pixels(fb, (64, 0, 70, 4)) == {BLUE}
    # Packed palettes: 2 colours (1 bit), 3 (2 bits), 5 (4 bits); rows padded to bytes.
    zrle(fb, z, 0, 4, 10, 1, bytes([2]) + cpx(WHITE) + cpx(BLACK) + bytes([0b10100000, 0b01000000]))
    assert [fb.image().getpixel((i, 4)) for i in range(10)] == [BLACK, WHITE, BLACK] + [WHITE] * 6 + [BLACK]
    zrle(fb, z, 0, 5, 5, 1, bytes([3]) + cpx(RED) + cpx(GREEN) + cpx(BLUE) + bytes([0b00011000, 0b01000000]))
    assert [fb.image().getpixel((i, 5)) for i in range(5)] == [RED, GREEN, BLUE, RED, GREEN]
    four = [RED, GREEN, BLUE, WHITE]  # 4 colours: still 2 bits
    zrle(fb, z, 0, 5, 5, 1, bytes([4]) + b"".join(cpx(c) for c in four) + bytes([0b00011011, 0b00000000]))
    assert [fb.image().getpixel((i, 5)) for i in range(5)] == four + [RED]
    five = [RED, GREEN, BLUE, WHITE, BLACK]
    zrle(fb, z, 0, 6, 5, 1, bytes([5]) + b"".join(cpx(c) for c in five) + bytes([0x01, 0x23, 0x40]))
    assert [fb.image().getpixel((i, 6)) for i in range(5)] == five
    # Plain RLE: a run of 300 (255 + 44 + 1) then 20 more: 320 = 64 x 5.
    fb2 = fb_with(PF32, 64, 5)
    z = zlib.compressobj()  # a new connection, a new stream
    zrle(fb2, z, 0, 0, 64, 5, bytes([128]) + cpx(RED) + bytes([255, 44]) + cpx(GREEN) + bytes([19]))
    assert [fb2.image().getpixel((i % 64, i // 64)) for i in (0, 299, 300, 319)] == [RED, RED, GREEN, GREEN]
    # Palette RLE: index with the top bit = a run follows; without = one pixel.
    zrle(fb2, z, 0, 0, 64, 1, bytes([130]) + cpx(BLUE) + cpx(WHITE) + bytes([0x80, 9, 1, 0x80 | 1, 52]))
    row = [fb2.image().getpixel((i, 0)) for i in range(64)]
    assert row == [BLUE] * 10 + [WHITE] + [WHITE] * 53
    with pytest.raises(RenderError, match="subencoding 17"):
        zrle(fb2, z, 0, 0, 4, 4, bytes([17]))


def test_zrle_cpixel_big_endian_and_16bpp() -> None:
    z = zlib.compressobj()
    fb = fb_with(PF32BE, 2, 1)  # channels in the low 24 bits, big-endian: CPIXEL drops the first byte
    zrle(fb, z, 0, 0, 2, 1, bytes([0]) + bytes(RED) + bytes(BLUE))
    assert flat(fb.image()) == [RED, BLUE]
    hi = PixelFormat(32, 24, False, True, 255, 255, 255, 24, 16, 8)  # little-endian, channels high: drops byte 0
    fb = fb_with(hi, 1, 1)
    zrle(fb, zlib.compressobj(), 0, 0, 1, 1, bytes([1]) + bytes((255, 0, 0)))  # bytes 1-3: blue, green, red
    assert fb.image().getpixel((0, 0)) == (0, 0, 255)
    fb = fb_with(PF16, 1, 1)
    zrle(fb, zlib.compressobj(), 0, 0, 1, 1, bytes([1]) + struct.pack("<H", 0b11111_000000_00000))
    assert fb.image().getpixel((0, 0)) == RED


def compact(n: int) -> bytes:
    out = bytearray([n & 0x7F])
    if n > 0x7F:
        out[0] |= 0x80
        out.append((n >> 7) & 0x7F)
        if n > 0x3FFF:
            out[1] |= 0x80
            out.append(n >> 14)
    return bytes(out)


def test_tight_fill_copy_palette() -> None:
    fb = fb_with(PF32, 16, 16)
    fb.apply_rect(Rect(0, 0, 16, 16, 7, bytes([0x80]) + bytes(GREEN)))  # fill, TPIXEL = R, G, B
    assert pixels(fb, (0, 0, 16, 16)) == {GREEN}
    # Copy filter, small (< 12 bytes: not compressed): 3 pixels.
    fb.apply_rect(Rect(0, 0, 3, 1, 7, bytes([0x00]) + bytes(RED) + bytes(BLUE) + bytes(WHITE)))
    assert [fb.image().getpixel((i, 0)) for i in range(3)] == [RED, BLUE, WHITE]
    # Copy filter compressed on stream 1 across two rects (the stream continues), then reset.
    z = zlib.compressobj()
    a = z.compress(bytes(BLUE) * 16) + z.flush(zlib.Z_SYNC_FLUSH)
    b = z.compress(bytes(BLUE) * 16) + z.flush(zlib.Z_SYNC_FLUSH)
    fb.apply_rect(Rect(0, 1, 16, 1, 7, bytes([0x10]) + compact(len(a)) + a))
    fb.apply_rect(Rect(0, 2, 16, 1, 7, bytes([0x10]) + compact(len(b)) + b))
    assert pixels(fb, (0, 1, 16, 3)) == {BLUE}
    with pytest.raises(RenderError):  # the reset bit for stream 1 throws the dictionary away: b no longer decodes
        fb.apply_rect(Rect(0, 2, 16, 1, 7, bytes([0x12]) + compact(len(b)) + b))
    # Palette, 2 colours: 1 bit per pixel, rows padded (16 x 2 = 4 bytes: raw).
    fb.apply_rect(Rect(0, 4, 10, 2, 7, bytes([0x40, 1, 1]) + bytes(BLACK) + bytes(WHITE)
                       + bytes([0b10000000, 0b01000000, 0xFF, 0xC0])))
    assert [fb.image().getpixel((i, 4)) for i in range(10)] == [WHITE] + [BLACK] * 8 + [WHITE]
    assert pixels(fb, (0, 5, 10, 6)) == {WHITE}
    # Palette, 3 colours: a byte per index, compressed (16 bytes >= 12) on stream 3.
    idx = bytes([0, 1, 2, 1] * 4)
    z3 = zlib.compress(idx)
    fb.apply_rect(Rect(0, 6, 16, 1, 7, bytes([0x70, 1, 2]) + bytes(RED) + bytes(GREEN) + bytes(BLUE)
                       + compact(len(z3)) + z3))
    assert [fb.image().getpixel((i, 6)) for i in range(4)] == [RED, GREEN, BLUE, GREEN]


def gradient_encode(rows: list[list[tuple[int, int, int]]], maxes=(255, 255, 255)) -> list[tuple[int, int, int]]:
    """The encoder side of Tight's gradient filter (residual = value - clamp(left + up - upleft))."""
    h, w = len(rows), len(rows[0])
    out = []
    for y in range(h):
        for x in range(w):
            left = rows[y][x - 1] if x else (0, 0, 0)
            up = rows[y - 1][x] if y else (0, 0, 0)
            ul = rows[y - 1][x - 1] if x and y else (0, 0, 0)
            out.append(tuple((rows[y][x][c] - min(max(left[c] + up[c] - ul[c], 0), maxes[c])) & maxes[c]
                             for c in range(3)))
    return out


def test_tight_gradient_filter() -> None:
    rows = [[((x * 40) % 256, (y * 60 + x) % 256, (x * y * 17) % 256) for x in range(6)] for y in range(5)]
    # A checkerboard row pair: predictions 255 + 255 - 0 and 0 + 0 - 255 leave [0, 255] and are clamped.
    rows[3] = [(255, 0, 255) if x % 2 else (0, 255, 0) for x in range(6)]
    rows[4] = [(0, 255, 0) if x % 2 else (255, 0, 255) for x in range(6)]
    resid = gradient_encode(rows)
    z = zlib.compress(b"".join(bytes(p) for p in resid))
    fb = fb_with(PF32, 6, 5)
    fb.apply_rect(Rect(0, 0, 6, 5, 7, bytes([0x40, 2]) + compact(len(z)) + z))
    assert [fb.image().getpixel((x, y)) for y in range(5) for x in range(6)] == [p for r in rows for p in r]
    # 16 bpp: residuals are PIXELs of the format; components have 5/6/5 bits.
    rows16 = [[(x * 5 % 32, (x + y * 9) % 64, y * 7 % 32) for x in range(4)] for y in range(3)]
    resid16 = gradient_encode(rows16, (31, 63, 31))
    z = zlib.compress(b"".join(struct.pack("<H", (r << 11) | (g << 5) | b) for r, g, b in resid16))
    fb = fb_with(PF16, 4, 3)
    fb.apply_rect(Rect(0, 0, 4, 3, 7, bytes([0x40, 2]) + compact(len(z)) + z))
    want = [(r * 255 // 31, g * 255 // 63, b * 255 // 31) for row in rows16 for r, g, b in row]
    assert [fb.image().getpixel((x, y)) for y in range(3) for x in range(4)] == want


def test_tight_jpeg_and_png() -> None:
    src = Image.new("RGB", (16, 8), (200, 100, 50))
    buf = io.BytesIO()
    src.save(buf, "JPEG", quality=95)
    jpg = buf.getvalue()
    fb = fb_with(PF32, 20, 20)
    fb.apply_rect(Rect(2, 3, 16, 8, 7, bytes([0x90]) + compact(len(jpg)) + jpg))
    r, g, b = fb.image().getpixel((10, 6))
    assert abs(r - 200) <= 3 and abs(g - 100) <= 3 and abs(b - 50) <= 3
    assert fb.image().getpixel((1, 1)) == BLACK
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (1, 2, 3)).save(buf, "PNG")
    png = buf.getvalue()
    fb.apply_rect(Rect(0, 0, 4, 4, -260, bytes([0xA0]) + compact(len(png)) + png))  # TightPNG
    assert pixels(fb, (0, 0, 4, 4)) == {(1, 2, 3)}
    with pytest.raises(RenderError, match="JPEG data does not decode"):
        fb.apply_rect(Rect(0, 0, 4, 4, 7, bytes([0x90]) + compact(5) + b"nope!"))


def test_tight_16bpp_tpixel_is_a_pixel() -> None:
    fb = fb_with(PF16, 2, 1)
    fb.apply_rect(Rect(0, 0, 2, 1, 7, bytes([0x80]) + struct.pack("<H", 0x001F)))
    assert pixels(fb, (0, 0, 2, 1)) == {BLUE}


def test_desktop_size_and_extended_desktop_size() -> None:
    fb = fb_with(PF32, 4, 4)
    fb.apply_rect(Rect(0, 0, 4, 4, 0, px32(RED) * 16))
    fb.apply_rect(Rect(0, 0, 8, 6, -223, b""))
    assert fb.image().size == (8, 6) and fb.image().getpixel((3, 3)) == RED and fb.image().getpixel((6, 5)) == BLACK
    fb.apply_rect(Rect(0, 0, 2, 2, -308, bytes([1, 0, 0, 0]) + bytes(16)))
    assert fb.image().size == (2, 2)
    fb.apply_rect(Rect(1, 3, 50, 50, -308, bytes([1, 0, 0, 0]) + bytes(16)))  # refused SetDesktopSize: no change
    assert fb.image().size == (2, 2)


def test_pseudo_rects_leave_pixels_and_h264_is_counted() -> None:
    fb = fb_with(PF32, 4, 4)
    fb.apply_rect(Rect(0, 0, 4, 4, 0, px32(GREEN) * 16))
    for r in [Rect(0, 0, 2, 2, -239, px32(RED) * 4 + bytes(2)), Rect(1, 1, 0, 0, -232, b""),
              Rect(0, 0, 0, 0, -224, b""), Rect(0, 0, 2, 2, -314, bytes(4) + bytes(16))]:
        fb.apply_rect(r)
    assert pixels(fb, (0, 0, 4, 4)) == {GREEN}
    fb.apply_rect(Rect(0, 0, 4, 4, 50, struct.pack(">II", 3, 0) + b"abc"))
    assert fb.skipped == {50: 1} and pixels(fb, (0, 0, 4, 4)) == {GREEN}


def test_short_payloads_are_render_errors() -> None:
    fb = fb_with(PF32, 32, 32)
    for r in [Rect(0, 0, 4, 4, 0, bytes(10)), Rect(0, 0, 32, 32, 5, bytes([2])),
              Rect(0, 0, 4, 4, 7, bytes([0x40, 1])), Rect(0, 0, 4, 4, 2, struct.pack(">I", 3) + bytes(4))]:
        with pytest.raises(RenderError):
            fb.apply_rect(r)


def test_pixel_codec_scales_narrow_channels() -> None:
    c = PixelCodec(PixelFormat(8, 8, False, True, 7, 7, 3, 0, 3, 6))
    assert c.rgb_of_value(0xFF) == bytes((255, 255, 255))
    assert c.rgb_of_value(0b01_010_100) == bytes((4 * 255 // 7, 2 * 255 // 7, 1 * 255 // 3))


# -- fuzz: whatever a (corrupt) recording holds, rendering fails only with RenderError ------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from dbproxy.engines.vnc.updates import RfbError  # noqa: E402

ENCODINGS = [0, 1, 2, 4, 5, 6, 7, 16, -260, -223, -308, 50, -239]


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pfi=st.integers(0, 3), x=st.integers(0, 40), y=st.integers(0, 40), w=st.integers(0, 40), h=st.integers(0, 40),
       enc=st.sampled_from(ENCODINGS), payload=st.binary(max_size=300), prefix=st.sampled_from([b"", b"\x80", b"\x90",
                                                                                              b"\x40\x01\x01", b"\x40\x02"]))
def test_fuzz_render_raises_only_render_errors(pfi, x, y, w, h, enc, payload, prefix) -> None:
    pf = [PF32, PF32BE, PF16, PF8MAP][pfi]
    fb = Framebuffer(32, 32, pf)
    if enc in (6, 16):  # give the zlib-based ones a valid length prefix over random or compressed data
        body = zlib.compress(payload) if prefix else payload
        payload = struct.pack(">I", len(body)) + body
    elif enc in (7, -260):
        payload = prefix + payload
    # Zeros behind: whatever the random bytes announce gets completed (a zero byte after the
    # update is an empty FramebufferUpdate), so the rect is always framed and drawn.
    msg = struct.pack(">BxHHHHHi", 0, 1, x, y, w, h, enc) + payload + bytes(8000)
    try:
        msgs = ServerStream(pf).feed(msg)
    except RfbError as exc:  # trailing random bytes: keep the update framed before them
        msgs = exc.messages
    for m in msgs:
        try:
            fb.apply(m)
        except RenderError:
            pass
    assert fb.image().size == (fb.width, fb.height)
