"""The server-side framer switches pixel format where the server does (engines/vnc/server.py).

Synthetic server streams (Raw updates: their size is width × height × bytes per pixel, so a
format switched at the wrong message misframes): without a fence the switch is immediate; after a
ClientFence Request|SyncNext the bytes before the server's fence answer are in the old format and
those after it in the new one — checked at every split of the stream (a ServerCutText after each
message is handed out whole only when the framer stands at that boundary)."""

from __future__ import annotations

import struct

from dbproxy.engines.vnc import rfb
from dbproxy.engines.vnc.server import ServerDecoder
from dbproxy.engines.vnc.stages import ClientStage, DesktopPolicy, DesktopState
from dbproxy.sansio import NEED_DATA

PF32 = bytes.fromhex("2018000100ff00ff00ff100800000000")  # 32 bpp true colour (Xtigervnc's)
PF8 = struct.pack(">BBBBHHHBBBxxx", 8, 8, 0, 1, 7, 7, 3, 0, 3, 6)  # 8 bpp true colour, BGR233


def _raw_update(w: int, h: int, bpp: int, fill: int) -> bytes:
    return struct.pack(">BxH", 0, 1) + struct.pack(">HHHHi", 0, 0, w, h, 0) + bytes([fill]) * (w * h * bpp)


def _fence(flags: int) -> bytes:
    return struct.pack(">BxxxIB", 248, flags, 0)


def _cut(text: bytes) -> bytes:
    return struct.pack(">BxxxI", 3, len(text)) + text


OLD = _raw_update(4, 4, 4, 0x11)  # 64-byte payload
NEW = _raw_update(4, 4, 1, 0x22)  # 16-byte payload
# The decoder hands out spans of framed bytes and cut texts whole: a cut text between two messages comes
# out as one only if the framer is at that message boundary, so each one checks the framing before it.
CUT = _cut(b"boundary")
STREAM = OLD + CUT + OLD + CUT + _fence(rfb.FENCE_SYNC_NEXT) + CUT + NEW + CUT + NEW + CUT


def _frame(dec: ServerDecoder, data: bytes, splits: list[int]) -> list[bytes]:
    """The forwarded bytes, cut where the decoder handed out a whole cut text."""
    out = [b""]
    for a, b in zip([0, *splits], [*splits, len(data)]):
        dec.feed(data[a:b])
        while (msg := dec.next_message()) is not NEED_DATA:
            if msg.kind == "cut_text":
                out[-1:] = [out[-1], msg.raw, b""] if out[-1] else [msg.raw, b""]
            else:
                out[-1] += msg.raw
        dec.buffer.compact()
    assert len(dec.buffer) == 0 and dec.at_boundary
    return [b for b in out if b]


def test_format_switches_at_the_servers_fence_answer_at_every_split():
    expected = [OLD, CUT, OLD, CUT, _fence(rfb.FENCE_SYNC_NEXT), CUT, NEW, CUT, NEW, CUT]
    for cut in range(0, len(STREAM)):
        dec = ServerDecoder(PF32)
        dec.set_pixel_format(PF8, after_fence=True)
        assert _frame(dec, STREAM, [cut] if cut else []) == expected, cut


def test_without_a_fence_the_switch_is_immediate():
    dec = ServerDecoder(PF32)
    assert _frame(dec, OLD + CUT, []) == [OLD, CUT]
    dec.set_pixel_format(PF8)
    assert _frame(dec, NEW + CUT + NEW + CUT, []) == [NEW, CUT, NEW, CUT]


def test_client_stage_defers_the_switch_after_a_sync_fence():
    calls = []
    state = DesktopState(None, DesktopPolicy(), on_pixel_format=lambda pf, after_fence: calls.append(after_fence))
    stage = ClientStage(state)
    spf = struct.pack(">Bxxx", 0) + PF8
    dec = rfb.ClientMessageDecoder()
    dec.feed(struct.pack(">BxxxIB", 248, rfb.FENCE_SYNC_REQUEST, 0) + spf + spf)
    while (m := dec.next_message()) is not NEED_DATA:
        stage.handle(m, None)
    assert calls == [True, False]
