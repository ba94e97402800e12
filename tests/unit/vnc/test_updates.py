"""``engines/vnc/updates.py``: framing the RFB server→client stream.

Two kinds of input:
- captured streams of real servers (tests/unit/vnc/data/*.rfb, see data/README.md):
  Xtigervnc and x11vnc answering a full and an incremental update request in Raw,
  CopyRect, RRE, CoRRE, Hextile, zlib, ZRLE and Tight (lossless and JPEG), in 32, 16
  and 8 bits per pixel;
- messages built here for what those servers did not send (every Tight filter and
  length form, the pseudo-encodings, the other server messages).

Each is framed whole, one byte per ``feed`` (every split point of the stream in
one pass), cut in two at every byte (built messages), and in random chunks
(hypothesis); a message's ``raw`` must be its exact bytes and the rects' payloads
must tile it.  Hypothesis also throws corrupted and random streams at the framer:
it may only raise ``RfbError``.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dbproxy.engines.vnc import updates as U
from dbproxy.engines.vnc.updates import PixelFormat, Rect, RfbError, ServerMessage, ServerStream

DATA = Path(__file__).resolve().parent / "data"
FIXTURES = json.loads((DATA / "fixtures.json").read_text())
PF32 = PixelFormat()
PF16 = PixelFormat(16, 16, False, True, 31, 63, 31, 11, 5, 0)
PF8 = PixelFormat(8, 8, False, True, 7, 7, 3, 0, 3, 6)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def fixture(stem: str) -> tuple[PixelFormat, bytes]:
    return PixelFormat.parse(bytes.fromhex(FIXTURES[stem]["pixel_format"])), (DATA / f"{stem}.rfb").read_bytes()


def update(*rects: tuple[int, int, int, int, int, bytes], count: int | None = None) -> bytes:
    out = struct.pack(">BxH", 0, len(rects) if count is None else count)
    for x, y, w, h, enc, payload in rects:
        out += struct.pack(">HHHHi", x, y, w, h, enc) + payload
    return out


def compact(n: int) -> bytes:
    """Tight's compact length (1-3 bytes)."""
    out = bytearray([n & 0x7F])
    if n > 0x7F:
        out[0] |= 0x80
        out.append((n >> 7) & 0x7F)
        if n > 0x3FFF:
            out[1] |= 0x80
            out.append(n >> 14)
    return bytes(out)


def check_framing(msgs: list[ServerMessage], stream: bytes) -> None:
    """raw of the messages concatenate to the stream; an update's rect headers + payloads tile its raw."""
    assert b"".join(m.raw for m in msgs) == stream
    for m in msgs:
        if m.kind != "update":
            continue
        off = 4
        for r in m.rects:
            assert m.raw[off:off + 12] == struct.pack(">HHHHi", r.x, r.y, r.w, r.h, r.encoding)
            off += 12
            assert m.raw[off:off + r.payload_size] == r.payload
            off += r.payload_size
        assert off == len(m.raw)


def feed_chunks(pf: PixelFormat, stream: bytes, cuts: list[int]) -> list[ServerMessage]:
    s = ServerStream(pf)
    out: list[ServerMessage] = []
    prev = 0
    for c in sorted(set(cuts)) + [len(stream)]:
        out += s.feed(stream[prev:c])
        prev = c
    assert s.buffered == 0
    return out


def summary(msgs: list[ServerMessage]) -> list:
    return [(m.kind, m.type, m.raw, m.text, [(r.x, r.y, r.w, r.h, r.encoding, r.payload) for r in m.rects]) for m in msgs]


# -- captured streams of real servers ----------------------------------------------------------

EXPECTED_ENCODINGS = {
    "tigervnc-raw-cursor": {0}, "tigervnc-hextile": {5}, "tigervnc-hextile-8bpp": {5}, "tigervnc-rre": {2},
    "tigervnc-zrle": {16}, "tigervnc-zrle-16bpp": {16}, "tigervnc-tight": {7}, "tigervnc-tight-jpeg": {7},
    "tigervnc-tight-16bpp": {7}, "x11vnc-raw": {0}, "x11vnc-corre": {4}, "x11vnc-zlib": {6}, "x11vnc-tight": {7},
    "x11vnc-hextile": {5},
}


@pytest.mark.parametrize("stem", sorted(FIXTURES))
def test_captured_stream_frames_whole_and_byte_by_byte(stem: str) -> None:
    pf, stream = fixture(stem)
    s = ServerStream(pf)
    whole = s.feed(stream)
    assert s.buffered == 0
    check_framing(whole, stream)
    updates = [m for m in whole if m.kind == "update"]
    assert len(updates) >= 3  # desktop size, the full screen, the popup window
    pixel_encodings = {r.encoding for m in updates for r in m.rects if r.encoding >= 0}
    # The encoding asked for is what carries the pixels (servers add Raw for tiny rects: RRE/CoRRE).
    assert EXPECTED_ENCODINGS[stem] <= pixel_encodings <= EXPECTED_ENCODINGS[stem] | {0}
    # Every split point at once: one byte per feed.
    s = ServerStream(pf)
    bytewise: list[ServerMessage] = []
    for i in range(len(stream)):
        bytewise += s.feed(stream[i:i + 1])
    assert summary(bytewise) == summary(whole)


@pytest.mark.parametrize("stem", ["tigervnc-tight-jpeg", "tigervnc-zrle-16bpp", "x11vnc-tight", "tigervnc-hextile-8bpp"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                                  HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_captured_stream_random_chunks(stem: str, data) -> None:
    pf, stream = fixture(stem)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=60))
    assert summary(feed_chunks(pf, stream, cuts)) == summary(ServerStream(pf).feed(stream))


def test_cursor_capture_has_cursor_rects() -> None:
    """Xtigervnc sent the cursor shape (Cursor pseudo-encoding: pixels + bitmask) when asked."""
    pf, stream = fixture("tigervnc-raw-cursor")
    cursors = [r for m in ServerStream(pf).feed(stream) for r in m.rects if r.encoding == -239]
    assert cursors and all(r.payload_size == r.w * r.h * 4 + (r.w + 7) // 8 * r.h for r in cursors)


def test_tight_jpeg_capture_is_jpeg() -> None:
    """The JPEG capture really carries JPEG rects (compression-control type 9) with JPEG data."""
    pf, stream = fixture("tigervnc-tight-jpeg")
    jpeg = [r for m in ServerStream(pf).feed(stream) for r in m.rects if r.encoding == 7 and r.payload[0] >> 4 == 9]
    assert jpeg
    for r in jpeg:
        body = r.payload[1:]
        n = body[0] & 0x7F
        k = 1
        if body[0] & 0x80:
            n |= (body[1] & 0x7F) << 7
            k = 2
            if body[1] & 0x80:
                n |= body[2] << 14
                k = 3
        assert body[k:k + 2] == b"\xff\xd8" and len(body) == k + n  # SOI marker, exact length


# -- built messages: every encoding and message --------------------------------------------------

def hextile_payload(bpp: int) -> bytes:
    """A 20x18 Hextile rect: 4 tiles (16x16, 4x16, 16x2, 4x2) using every subencoding bit."""
    px = bytes(range(1, bpp + 1))
    t1 = bytes([2 | 4 | 8]) + px + px + bytes([2, 0x00, 0x11, 0x22, 0x33])  # bg, fg, 2 subrects
    t2 = bytes([1]) + px * (4 * 16)  # raw tile
    t3 = bytes([8 | 16, 1]) + px + bytes([0x00, 0x10])  # coloured subrect, bg carried over
    t4 = bytes([0])  # solid background carried over
    return t1 + t2 + t3 + t4


def tight_cases(pf: PixelFormat) -> dict[str, tuple[int, int, bytes]]:
    tpx = pf.tpixel_size
    p = bytes(range(7, 7 + tpx))
    z = zlib.compress(b"\x01" * 40)
    big = b"\xaa" * 300
    return {
        "fill": (5, 5, bytes([0x80]) + p),
        "jpeg-1byte-len": (8, 8, bytes([0x90]) + compact(10) + b"\xff\xd8" + b"j" * 8),
        "jpeg-2byte-len": (8, 8, bytes([0x90]) + compact(300) + big),
        "jpeg-3byte-len": (8, 8, bytes([0x90]) + compact(20000) + b"\x00" * 20000),
        "basic-copy-small": (1, 2, bytes([0x00]) + p * 2 if 2 * tpx < 12 else bytes([0x00]) + compact(len(z)) + z),
        "basic-copy-zlib": (4, 4, bytes([0x10]) + compact(len(z)) + z),  # stream 1, no filter byte
        "basic-copy-explicit": (4, 4, bytes([0x60, 0]) + compact(len(z)) + z),  # stream 2, filter byte 0
        "palette-2": (16, 2, bytes([0x40 | 0x0F, 1, 1]) + p + p + b"\x12\x34\x56\x78"),  # 4 bytes of bits < 12: raw
        "palette-2-zlib": (64, 4, bytes([0x40 | 0x30, 1, 1]) + p + p + compact(len(z)) + z),
        "palette-5": (3, 3, bytes([0x40, 1, 4]) + p * 5 + bytes(9)),  # 9 one-byte indices < 12: raw
        # The 12-byte threshold ("data size < 12: sent as is"): 11 indices raw, 12 compressed.
        "palette-5-11": (11, 1, bytes([0x40, 1, 4]) + p * 5 + bytes(11)),
        "palette-5-12": (12, 1, bytes([0x40, 1, 4]) + p * 5 + compact(len(z)) + z),
        "palette-5-zlib": (4, 4, bytes([0x40, 1, 4]) + p * 5 + compact(len(z)) + z),
        "palette-256": (4, 4, bytes([0x40, 1, 255]) + p * 256 + compact(len(z)) + z),
        "gradient": (4, 4, bytes([0x40, 2]) + compact(len(z)) + z),
    }


def built_messages(pf: PixelFormat) -> dict[str, bytes]:
    bpp = pf.bytes_per_pixel
    px = bytes(range(1, bpp + 1))
    z = zlib.compress(bytes(100))
    msgs = {
        "raw": update((1, 2, 3, 2, 0, px * 6)),
        "raw-empty": update((0, 0, 0, 5, 0, b"")),
        "copyrect": update((10, 10, 4, 4, 1, struct.pack(">HH", 0, 1))),
        "rre": update((0, 0, 8, 8, 2, struct.pack(">I", 2) + px + (px + struct.pack(">HHHH", 1, 1, 2, 2)) * 2)),
        "corre": update((0, 0, 8, 8, 4, struct.pack(">I", 3) + px + (px + bytes([1, 1, 2, 2])) * 3)),
        "hextile": update((0, 0, 20, 18, 5, hextile_payload(bpp))),
        "zlib": update((0, 0, 5, 5, 6, struct.pack(">I", len(z)) + z)),
        "zrle": update((0, 0, 5, 5, 16, struct.pack(">I", len(z)) + z)),
        "h264": update((0, 0, 16, 16, 50, struct.pack(">II", 5, 0) + b"h264!")),
        "desktop-size": update((0, 0, 800, 600, -223, b"")),
        "ext-desktop-size": update((1, 0, 800, 600, -308, bytes([2, 0, 0, 0]) + bytes(32))),
        "last-rect": update((0, 0, 1, 1, 0, px), (0, 0, 0, 0, -224, b""), count=0xFFFF),
        "cursor": update((3, 4, 9, 2, -239, px * 18 + bytes(2 * 2))),
        "xcursor": update((1, 1, 9, 2, -240, bytes(6) + bytes(2 * 2 * 2))),
        "xcursor-empty": update((0, 0, 0, 0, -240, b"")),
        "pointer-pos": update((10, 20, 0, 0, -232, b"")),
        "desktop-name": update((0, 0, 0, 0, -307, struct.pack(">I", 4) + b"desk")),
        "qemu-led": update((0, 0, 0, 0, -261, b"\x05")),
        "qemu-ack": update((0, 0, 0, 0, -258, b""), (0, 0, 0, 0, -257, b""), (0, 0, 0, 0, -259, b"")),
        "cursor-alpha": update((0, 0, 2, 2, -314, struct.pack(">i", 0) + bytes(16))),
        "many-rects": update((0, 0, 1, 1, 0, px), (1, 0, 1, 1, 1, bytes(4)), (2, 0, 0, 0, -223, b"")),
        "empty-update": update(),
        "colormap": struct.pack(">BxHH", 1, 0, 2) + bytes(12),
        "bell": b"\x02",
        "cut-text": struct.pack(">B3xI", 3, 5) + b"hello",
        "cut-text-extended": struct.pack(">B3xi", 3, -8) + b"\x10\x00\x00\x01" + b"abcd",
        "end-of-continuous-updates": b"\x96",
        "fence": struct.pack(">B3xIB", 248, 0x80000003, 3) + b"abc",
        "xvp": bytes([250, 0, 1, 1]),
        "gii-be": bytes([253, 0x81, 0, 4, 0, 1, 0, 1]),
        "gii-le": bytes([253, 0x01, 4, 0, 1, 0, 1, 0]),
    }
    for name, (w, h, payload) in tight_cases(pf).items():
        msgs[f"tight-{name}"] = update((0, 0, w, h, 7, payload))
    msgs["tightpng-png"] = update((0, 0, 4, 4, -260, bytes([0xA0]) + compact(5) + b"\x89PNG\r"))
    msgs["tightpng-fill"] = update((0, 0, 4, 4, -260, bytes([0x80]) + bytes(pf.tpixel_size)))
    return msgs


KINDS = {"colormap": "colormap", "bell": "bell", "cut-text": "cut_text", "cut-text-extended": "cut_text",
         "end-of-continuous-updates": "other", "fence": "other", "xvp": "other", "gii-be": "other", "gii-le": "other"}
ALL_PF = [("32", PF32), ("16", PF16), ("8", PF8)]


@pytest.mark.parametrize("pfname,pf", ALL_PF)
def test_built_messages_every_split(pfname: str, pf: PixelFormat) -> None:
    """Each message alone, cut in two at every byte, and followed by a Bell (trailing bytes)."""
    for name, msg in built_messages(pf).items():
        s = ServerStream(pf)
        whole = s.feed(msg)
        assert len(whole) == 1 and whole[0].raw == msg, name
        assert whole[0].kind == KINDS.get(name, "update"), name
        check_framing(whole, msg)
        for i in range(len(msg) + 1):
            s = ServerStream(pf)
            got = s.feed(msg[:i]) + s.feed(msg[i:] + b"\x02")
            assert summary(got) == summary(whole) + [("bell", 2, b"\x02", b"", [])], (name, i)
            assert s.buffered == 0


def test_built_payloads() -> None:
    msgs = built_messages(PF32)
    [m] = ServerStream(PF32).feed(msgs["cut-text"])
    assert m.text == b"hello" and not m.extended
    [m] = ServerStream(PF32).feed(msgs["cut-text-extended"])
    assert m.text == b"\x10\x00\x00\x01abcd" and m.extended
    [m] = ServerStream(PF32).feed(msgs["last-rect"])
    assert [r.encoding for r in m.rects] == [0, -224]  # count 0xFFFF, ended by LastRect
    [m] = ServerStream(PF32).feed(msgs["hextile"])
    assert m.rects == [Rect(0, 0, 20, 18, 5, hextile_payload(4))]
    assert m.encodings == {5}
    [m] = ServerStream(PF32).feed(msgs["tight-palette-256"])
    assert m.rects[0].payload_size == 3 + 256 * 3 + len(compact(len(zlib.compress(b"\x01" * 40)))) + len(
        zlib.compress(b"\x01" * 40))


def test_tpixel_and_cpixel_sizes() -> None:
    assert PF32.tpixel_size == 3 and PF32.cpixel_size == 3
    assert PF16.tpixel_size == 2 and PF16.cpixel_size == 2
    assert PF8.tpixel_size == 1
    # Big-endian 32 bpp with channels in the high bytes: CPIXEL still 3 bytes (the most significant ones).
    hi = PixelFormat(32, 24, True, True, 255, 255, 255, 24, 16, 8)
    assert hi.cpixel_size == 3 and hi.tpixel_size == 3
    # Depth 32 (alpha channel room): TPIXEL/CPIXEL are full PIXELs.
    assert PixelFormat(32, 32, False, True, 255, 255, 255, 16, 8, 0).tpixel_size == 4


def test_pixel_format_round_trip_and_errors() -> None:
    for pf in (PF32, PF16, PF8):
        assert PixelFormat.parse(pf.encode()) == pf and len(pf.encode()) == 16
    assert PF16.bytes_per_pixel == 2
    with pytest.raises(RfbError, match="bits-per-pixel must be 8, 16 or 32, got 24"):
        PixelFormat.parse(bytes([24, 24, 0, 1]) + bytes(12))
    with pytest.raises(RfbError, match="16 bytes"):
        PixelFormat.parse(bytes(15))


def test_set_pixel_format_applies_to_the_next_message() -> None:
    """A message whose first byte arrived before the client's SetPixelFormat was seen was sent
    before the server could apply it: it keeps the old format; the next one uses the new."""
    first = update((0, 0, 2, 1, 0, bytes(8)))  # 32 bpp
    second = update((0, 0, 2, 1, 0, bytes(4)))  # 16 bpp
    s = ServerStream(PF32)
    got = s.feed(first)
    s.set_pixel_format(PF16)
    got += s.feed(second)
    assert [m.raw for m in got] == [first, second]
    s = ServerStream(PF32)
    got = s.feed(first[:1])  # begun
    s.set_pixel_format(PF16)
    got += s.feed(first[1:] + second)
    assert [m.raw for m in got] == [first, second]
    # Without the change, the 16 bpp update is misframed: 8 bytes of pixels expected, 4 sent.
    s = ServerStream(PF32)
    assert [m.raw for m in s.feed(first + second + b"\x02" * 4)] == [first, second + b"\x02" * 4]


# -- errors ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("enc,name", [(8, "zlibhex (8)"), (15, "TRLE (15)"), (17, "ZYWRLE (17)"),
                                      (1234, "encoding 1234"), (-600, "encoding -600"),
                                      (0x574D5664, "VMware (1464686180)")])
def test_unknown_encoding_names_it(enc: int, name: str) -> None:
    msg = update((0, 0, 4, 4, 0, bytes(64)), (0, 0, 4, 4, enc, bytes(10)))
    s = ServerStream(PF32)
    with pytest.raises(RfbError) as info:
        s.feed(msg)
    assert f"unsupported {name} rectangle" in str(info.value)
    assert info.value.messages == []
    with pytest.raises(RfbError):  # the stream stays failed: nothing after it can be framed
        s.feed(b"\x02")


@pytest.mark.parametrize("msg,match", [
    (b"\x07", "unknown server message type 7"),
    (update((0, 0, 4, 4, 7, bytes([0xB0]))), "Tight compression control 0xb0 is not valid"),
    (update((0, 0, 4, 4, 7, bytes([0xA0]))), "Tight compression control 0xa0"),  # PNG only in TightPNG
    (update((0, 0, 4, 4, 7, bytes([0x40, 3]))), "Tight filter 3 is not valid"),
    (struct.pack(">B3xIB", 248, 0, 65), "ServerFence payload of 65 bytes"),
    (update((0, 0, 2, 2, -314, struct.pack(">i", 7))), r"CursorWithAlpha pixels in Tight \(7\)"),
])
def test_protocol_errors(msg: bytes, match: str) -> None:
    with pytest.raises(RfbError, match=match):
        ServerStream(PF32).feed(msg)
    s = ServerStream(PF32)  # the same error one byte at a time
    with pytest.raises(RfbError, match=match):
        for i in range(len(msg)):
            s.feed(msg[i:i + 1])


def test_messages_before_an_error_come_with_it() -> None:
    good = update((0, 0, 1, 1, 0, bytes(4)))
    s = ServerStream(PF32)
    with pytest.raises(RfbError) as info:
        s.feed(good + b"\x02" + b"\x07")
    assert [m.raw for m in info.value.messages] == [good, b"\x02"]
    with pytest.raises(RfbError) as again:
        s.feed(b"\x02")
    assert again.value is info.value


def test_max_message_is_checked_before_buffering() -> None:
    s = ServerStream(PF32, max_message=1000)
    with pytest.raises(RfbError, match="exceeds the maximum of 1000 bytes"):
        s.feed(update((0, 0, 100, 100, 0, b"")))  # announces 40000 bytes of Raw pixels
    assert s.buffered < 100
    ok = update((0, 0, 10, 10, 0, bytes(400)))
    assert ServerStream(PF32, max_message=1000).feed(ok)[0].raw == ok


def test_rfb_error_is_a_remote_protocol_error() -> None:
    from dbproxy.errors import RemoteProtocolError

    assert issubclass(RfbError, RemoteProtocolError)
    assert U.encoding_name(-250) == "compression level (-250)"


# -- fuzz -----------------------------------------------------------------------------------------

def _valid_stream() -> st.SearchStrategy[tuple[PixelFormat, bytes]]:
    def build(pfi: int, names: list[str]) -> tuple[PixelFormat, bytes]:
        pf = ALL_PF[pfi][1]
        msgs = built_messages(pf)
        keys = sorted(msgs)
        return pf, b"".join(msgs[keys[i % len(keys)]] for i in names)
    return st.builds(build, st.integers(0, 2), st.lists(st.integers(0, 200), min_size=1, max_size=6))


@FUZZ
@given(case=_valid_stream(), cuts=st.lists(st.integers(0, 400), max_size=8),
       edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
       tail=st.binary(max_size=40))
def test_fuzz_only_rfb_errors(case, cuts, edits, tail) -> None:
    pf, stream = case
    data = bytearray(stream)
    for pos, val in edits:
        if data:
            data[pos % len(data)] = val
    data += tail
    s = ServerStream(pf, max_message=1 << 20)
    prev = 0
    try:
        for c in sorted(set(x % (len(data) + 1) for x in cuts)) + [len(data)]:
            for m in s.feed(bytes(data[prev:c])):
                assert m.kind in ("update", "colormap", "bell", "cut_text", "other")
                for r in m.rects:
                    r.payload
            prev = c
    except RfbError:
        pass


@FUZZ
@given(pf_bytes=st.sampled_from([PF32.encode(), PF16.encode(), PF8.encode()]), data=st.binary(max_size=300))
def test_fuzz_random_bytes(pf_bytes: bytes, data: bytes) -> None:
    s = ServerStream(PixelFormat.parse(pf_bytes), max_message=1 << 20)
    try:
        whole = s.feed(data)
    except RfbError:
        return
    check_framing(whole, data[:len(data) - s.buffered])
