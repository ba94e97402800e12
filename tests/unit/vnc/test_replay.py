"""``dbproxy replay`` on desktop recordings (engines/vnc/replay.py through dbproxy/replay_cli.py).

The end-to-end proof without the proxy: a direct RFB client (rfb_support.RfbCapture)
talks to a real Xtigervnc / x11vnc and records both directions with
``DesktopRecorder`` — with a SetPixelFormat to 16 bpp and back in the middle, and a
window appearing — then the replay's last frame must equal vncdotool's screenshot of
the same screen, pixel for pixel, and its intermediate frames must show the 16 bpp
and the before-the-window screens.  (Through the proxy, the same comparison belongs to
the VNC engine's integration test.)

``dbproxy replay`` (core) finds the desktop replay through the engine registry: an
engine package whose ``replay`` module's ``MAGIC`` starts the file.  The VNC engine's
class lives in ``dbproxy.engines.vnc.engine`` (registered by the VNC engine's branch);
these tests hand ``cmd_replay`` a registry holding a stand-in class of that module, so
they exercise the same lookup.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
from pathlib import Path

import pytest
from PIL import Image, ImageChops

from dbproxy import replay_cli
from dbproxy.engine import EngineRegistry
from dbproxy.engines.vnc.recording import DesktopRecorder, read_recording
from dbproxy.engines.vnc.updates import PixelFormat
from tests.support import peer_missing

from tests.unit.vnc.rfb_support import DATA, PF16, RfbCapture, VncServer

FIXTURES = json.loads((DATA / "fixtures.json").read_text())


class StandInVncEngine:
    """Stands in for the registered VNC engine class (only its module matters to the lookup)."""


StandInVncEngine.__module__ = "dbproxy.engines.vnc.engine"


def registry() -> EngineRegistry:
    reg = EngineRegistry()
    reg.register("vnc", StandInVncEngine)
    return reg


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    replay_cli.add_parser(parser.add_subparsers())
    return parser.parse_args(["replay", *argv])


def run(*argv: str) -> int:
    return replay_cli.cmd_replay(parse(*argv), registry=registry())


def flat_equal(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and ImageChops.difference(a.convert("RGB"), b.convert("RGB")).getbbox() is None


def recording_from_fixture(tmp: Path, stem: str, *, chunk: int = 1500) -> Path:
    """A recording of a captured server stream (as the proxy would write it: TCP-sized chunks)."""
    meta = FIXTURES[stem]
    stream = (DATA / f"{stem}.rfb").read_bytes()
    path = tmp / f"{stem}.vncrec"
    rec = DesktopRecorder(str(path), width=meta["width"], height=meta["height"],
                          pixel_format=bytes.fromhex(meta["pixel_format"]), name=stem)
    for i in range(0, len(stream), chunk):
        rec.server(stream[i:i + chunk])
    rec.close()
    return path


# -- from captured streams (no server needed) -----------------------------------------------------

@pytest.mark.parametrize("stem", ["tigervnc-zrle", "x11vnc-tight", "tigervnc-hextile"])
def test_last_frame_of_a_recorded_capture(tmp_path: Path, stem: str, capsys) -> None:
    path = recording_from_fixture(tmp_path, stem)
    assert run(str(path), "--last", str(tmp_path / "last.png")) == 0
    assert flat_equal(Image.open(tmp_path / "last.png"), Image.open(DATA / f"{stem}.png"))


def test_png_frames_and_animations(tmp_path: Path) -> None:
    path = recording_from_fixture(tmp_path, "tigervnc-tight")
    frames = tmp_path / "frames"
    assert run(str(path), "--png-dir", str(frames), "--out", str(tmp_path / "a.apng")) == 0
    pngs = sorted(frames.iterdir())
    assert len(pngs) >= 2  # the full screen, then the window
    assert flat_equal(Image.open(pngs[-1]), Image.open(DATA / "tigervnc-tight.png"))
    assert not flat_equal(Image.open(pngs[0]), Image.open(pngs[-1]))
    apng = Image.open(tmp_path / "a.apng")
    assert getattr(apng, "n_frames", 1) == len(pngs)
    apng.seek(apng.n_frames - 1)
    assert flat_equal(apng, Image.open(DATA / "tigervnc-tight.png"))
    assert run(str(path), "--out", str(tmp_path / "a.webp"), "--every", "5000") == 0
    webp = Image.open(tmp_path / "a.webp")
    webp.seek(webp.n_frames - 1)
    assert flat_equal(webp, Image.open(DATA / "tigervnc-tight.png"))  # lossless WebP


def test_truncated_recording_plays_its_prefix(tmp_path: Path, capsys) -> None:
    path = recording_from_fixture(tmp_path, "x11vnc-zlib")
    blob = path.read_bytes()
    cut = tmp_path / "cut.vncrec"
    cut.write_bytes(blob[:len(blob) - 200])
    assert run(str(cut), "--last", str(tmp_path / "cut.png")) == 0
    assert "ends early" in capsys.readouterr().err
    assert Image.open(tmp_path / "cut.png").size == (FIXTURES["x11vnc-zlib"]["width"], FIXTURES["x11vnc-zlib"]["height"])


def test_summary_without_outputs(tmp_path: Path, capsys) -> None:
    path = recording_from_fixture(tmp_path, "tigervnc-zrle")
    assert run(str(path)) == 0
    out = capsys.readouterr().out
    assert "desktop recording of 'tigervnc-zrle', 250x170 (32 bpp)" in out and "ZRLE x" in out


def test_cli_errors(tmp_path: Path, capsys) -> None:
    cast = tmp_path / "t.cast"
    cast.write_text('{"version": 2, "width": 80, "height": 24}\n')
    assert run(str(cast), "--png-dir", str(tmp_path / "d")) == 2
    assert "--png-dir renders desktop recordings" in capsys.readouterr().err
    path = recording_from_fixture(tmp_path, "tigervnc-zrle")
    assert run(str(path), "--out", str(tmp_path / "x.gif")) == 2
    assert "expected a .apng, .png or .webp" in capsys.readouterr().err
    other = tmp_path / "bin"
    other.write_bytes(b"\x00\x01binary")
    assert run(str(other)) == 2  # no engine claims it: the asciicast reader refuses it
    assert "not JSON" in capsys.readouterr().err
    # Without a registry that has the VNC engine, nothing claims the magic.
    assert replay_cli.engine_replayer(path.read_bytes()[:64], EngineRegistry()) is None
    assert replay_cli.engine_replayer(path.read_bytes()[:64], registry()).__name__ == "dbproxy.engines.vnc.replay"


# -- a live session against real servers ------------------------------------------------------------

def _servers_or_skip(kind: str) -> None:
    missing = VncServer.missing(kind)
    if missing or shutil.which("vncdo") is None:
        peer_missing(f"{kind} VNC server / vncdotool ({missing or 'vncdo'}; scripts/install/vnc.sh)")


def record_live_session(server: VncServer, path: Path) -> None:
    """32 bpp full screen; SetPixelFormat 16 bpp + full screen; a window appears (16 bpp update);
    SetPixelFormat back to 32 bpp + full screen.  Every byte each way goes into the recording."""
    c = RfbCapture(server.port, password=server.password)
    rec = DesktopRecorder(str(path), width=c.width, height=c.height, pixel_format=c.server_pf_bytes, name=c.name)
    popup = None

    def send(data: bytes) -> None:
        rec.client(data)
        c.sock.sendall(data)

    def pump(incremental: bool, until_idle: bool = False) -> None:
        for i in range(8):
            send(struct.pack(">BBHHHH", 3, int(incremental or i > 0), 0, 0, c.width, c.height))
            before = len(c.log)
            try:
                msgs = c.read_update(timeout=1.0 if (until_idle or i > 0) else 20)
            except TimeoutError:
                return
            for _, data in c.log[before:]:
                rec.server(data)
            if not until_idle and any(r.encoding >= 0 for m in msgs for r in m.rects):
                return

    try:
        send(struct.pack(">BxH", 2, 4) + struct.pack(">iiii", 16, 5, -223, -224))  # ZRLE, Hextile
        pump(False)
        pf16 = PF16.encode()
        send(b"\x00\x00\x00\x00" + pf16)
        c.stream.set_pixel_format(PixelFormat.parse(pf16))
        pump(False)
        popup = server.popup()
        pump(True, until_idle=True)
        send(b"\x00\x00\x00\x00" + c.server_pf_bytes)
        c.stream.set_pixel_format(PixelFormat.parse(c.server_pf_bytes))
        pump(False)
        server.screenshot(path.with_suffix(".shot.png"))
        server.x_screenshot(path.with_suffix(".x.png"))
    finally:
        rec.close()
        c.close()
        if popup is not None:
            server.unpopup(popup)


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["tigervnc", "x11vnc"])
def test_replay_last_frame_equals_the_screen(tmp_path: Path, kind: str) -> None:
    _servers_or_skip(kind)
    server = VncServer(kind, tmp_path / "server", password="s3cret-pw").start()
    try:
        path = tmp_path / "session.vncrec"
        record_live_session(server, path)
    finally:
        server.stop()
    rec = read_recording(str(path))
    assert not rec.truncated and {k for _, k, _ in rec.events} == {"s", "c"}
    frames = tmp_path / "frames"
    assert run(str(path), "--png-dir", str(frames), "--last", str(tmp_path / "last.png")) == 0
    last = Image.open(tmp_path / "last.png")
    screen = Image.open(path.with_suffix(".shot.png"))
    assert flat_equal(last, screen)  # vncdotool's screenshot of the same screen
    assert flat_equal(last, Image.open(path.with_suffix(".x.png")))  # and the X server's own pixels
    # The 16 bpp frames are there and quantised: above the window, some frame differs from the
    # final screen, by no more than a 5/6-bit step (a misdecoded frame would differ by far more).
    pngs = [Image.open(p).convert("RGB") for p in sorted(frames.iterdir())]
    assert len(pngs) >= 3
    top = (0, 0, 250, 100)
    quantised = [p for p in pngs
                 if 0 < max(hi for _, hi in ImageChops.difference(p.crop(top), last.crop(top)).getextrema()) <= 8]
    assert quantised, "no 16 bpp frame"


def test_unframeable_stream_keeps_what_came_before(tmp_path: Path, capsys) -> None:
    """An encoding nobody can frame (zlibhex) after a good update in the same chunk: the good
    update is drawn, the replay stops there with a warning naming the encoding."""
    stem = "tigervnc-zrle"
    meta = FIXTURES[stem]
    stream = (DATA / f"{stem}.rfb").read_bytes()
    bad = struct.pack(">BxHHHHHi", 0, 1, 0, 0, 16, 16, 8) + bytes(40)
    path = tmp_path / "bad.vncrec"
    rec = DesktopRecorder(str(path), width=meta["width"], height=meta["height"],
                          pixel_format=bytes.fromhex(meta["pixel_format"]), name="bad")
    rec.server(stream + bad)  # one chunk: the good updates and the bad one together
    rec.close()
    assert run(str(path), "--last", str(tmp_path / "last.png")) == 0
    assert "unsupported zlibhex (8) rectangle" in capsys.readouterr().err
    assert flat_equal(Image.open(tmp_path / "last.png"), Image.open(DATA / f"{stem}.png"))


def test_every_until_and_seek(tmp_path: Path, monkeypatch) -> None:
    """Frames on the session's clock: updates at 0.0, 0.1, 0.2, 1.0 and 2.5 s, each painting a
    4x1 screen one colour; --every 500 keeps the latest of each half second, --until stops, --seek drops."""
    from dbproxy.engines.vnc import recording as R

    clock = [100.0]
    monkeypatch.setattr(R.time, "monotonic", lambda: clock[0])
    path = tmp_path / "clock.vncrec"
    rec = DesktopRecorder(str(path), width=4, height=1, pixel_format=PixelFormat().encode(), name="clock")
    colours = {0.0: 10, 0.1: 20, 0.2: 30, 1.0: 40, 2.5: 50}
    for t, v in colours.items():
        clock[0] = 100.0 + t
        rec.server(struct.pack(">BxHHHHHi", 0, 1, 0, 0, 4, 1, 0) + bytes((v, v, v, 0)) * 4)
    rec.close()

    def frames(*argv: str) -> list[tuple[int, int]]:
        d = tmp_path / f"f{len(list(tmp_path.iterdir()))}"
        assert run(str(path), "--png-dir", str(d), *argv) == 0
        return [(int(p.stem.split("-")[1]), Image.open(p).getpixel((0, 0))[0]) for p in sorted(d.iterdir())]

    assert frames() == [(0, 10), (100, 20), (200, 30), (1000, 40), (2500, 50)]
    assert frames("--every", "500") == [(0, 10), (200, 30), (1000, 40), (2500, 50)]
    assert frames("--until", "1.5") == [(0, 10), (100, 20), (200, 30), (1000, 40)]
    assert frames("--seek", "0.15") == [(200, 30), (1000, 40), (2500, 50)]
    assert run(str(path), "--last", str(tmp_path / "at.png"), "--until", "0.15") == 0
    assert Image.open(tmp_path / "at.png").getpixel((0, 0))[0] == 20


def test_asciicast_files_still_replay_as_terminals(tmp_path: Path, capsys) -> None:
    """The desktop dispatch leaves terminal recordings to the asciicast reader (no engine is asked)."""
    from dbproxy.terminal.recording import AsciicastWriter

    cast = tmp_path / "t.cast"
    w = AsciicastWriter(str(cast), 20, 3, "xterm")
    w.output(b"hello desk\r\n")
    w.close()
    assert replay_cli.cmd_replay(parse("--text", str(cast)), registry=EngineRegistry()) == 0
    assert "hello desk" in capsys.readouterr().out
