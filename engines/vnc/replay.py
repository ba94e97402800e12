"""``dbproxy replay FILE.vncrec``: a desktop recording to PNG frames, an animated APNG/WebP, or its last frame.

``dbproxy replay`` (dbproxy/replay_cli.py, core) knows no engine: for a file
that is not an asciicast it asks each registered engine's package for a
``replay`` module whose ``MAGIC`` starts the file, and calls its ``replay(args)``.

Frames: ``--every MS`` keeps at most one frame per MS milliseconds of session
time (the latest screen of each interval); without it, one frame per received
chunk that completed an update.  ``--png-dir D`` writes ``D/NNNNNN-<ms>.png``,
``--out F.apng|F.png|F.webp`` an animation (frame durations = session time
between frames divided by ``--speed``; every frame is held in memory: use
``--every`` for long sessions), ``--last F.png`` the final screen (or the screen at
``--until`` seconds).  ``--seek S`` drops the frames before S seconds.  Without
an output option it prints what the recording holds.  A truncated recording
(the proxy died mid-session) plays up to its last whole record, with a warning.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from .recording import MAGIC, read_recording
from .render import DesktopReplay
from .updates import ENCODING_NAMES, PixelFormat

__all__ = ["MAGIC", "replay"]

ANIMATION_FORMATS = {".apng": "PNG", ".png": "PNG", ".webp": "WEBP"}


def replay(args: Any) -> int:
    err = sys.stderr
    try:
        rec = read_recording(args.file)
    except (OSError, ValueError) as exc:
        print(f"dbproxy replay: {exc}", file=err)
        return 2
    if rec.truncated:
        print(f"dbproxy replay: {args.file}: the recording ends early (the session did not close it); "
              "playing what it holds", file=err)
    png_dir = getattr(args, "png_dir", None)
    out = getattr(args, "out", None)
    last = getattr(args, "last", None)
    until = getattr(args, "until", None)
    seek = getattr(args, "seek", 0.0) or 0.0
    speed = getattr(args, "speed", 1.0) or 1.0
    every_ms = getattr(args, "every", None)
    fmt = None
    if out is not None:
        fmt = ANIMATION_FORMATS.get(os.path.splitext(out)[1].lower())
        if fmt is None:
            print(f"dbproxy replay: --out {out}: expected a .apng, .png or .webp file name", file=err)
            return 2
    player = DesktopReplay(rec)
    if png_dir is None and out is None and last is None:
        return _summary(args.file, rec, player)
    if png_dir is not None:
        os.makedirs(png_dir, exist_ok=True)
    frames: list[tuple[float, Any]] = []
    n = 0
    every = every_ms / 1000.0 if every_ms else None
    if png_dir is None and out is None:
        every = float("inf")  # only the last frame is wanted: render, don't copy every frame
    for t, img in player.frames(every=every, until=until):
        if t < seek:
            continue
        if png_dir is not None:
            img.save(os.path.join(png_dir, f"{n:06d}-{round(t * 1000):09d}.png"))
        if out is not None:
            frames.append((t, img))
        n += 1
    for w in player.warnings:
        print(f"dbproxy replay: {w}", file=err)
    final = player.fb.image()
    if last is not None:
        final.save(last, "PNG")
    if out is not None:
        if not frames:
            frames = [(0.0, final)]
        images = [img for _, img in frames]
        durations = [max(20, int((frames[i + 1][0] - frames[i][0]) * 1000 / speed)) for i in range(len(frames) - 1)]
        durations.append(1000)
        extra = {"lossless": True} if fmt == "WEBP" else {}
        images[0].save(out, fmt, save_all=True, append_images=images[1:], duration=durations, loop=0, **extra)
    if png_dir is not None:
        print(f"{n} frames written to {png_dir}", file=err)
    return 0


def _summary(path: str, rec: Any, player: DesktopReplay) -> int:
    pf = PixelFormat.parse(rec.pixel_format)
    server = sum(len(d) for _, k, d in rec.events if k == "s")
    client = sum(len(d) for _, k, d in rec.events if k == "c")
    player.last()
    encs = ", ".join(f"{ENCODING_NAMES.get(e, str(e))} x{c}" for e, c in sorted(player.encodings.items()))
    print(f"{path}: desktop recording of {rec.header.get('name', '')!r}, {rec.width}x{rec.height} "
          f"({pf.bits_per_pixel} bpp), {rec.duration:.1f} s")
    print(f"  {server} bytes from the server, {client} from the client; {player.fb.updates} updates ({encs or 'none'})")
    if rec.truncated:
        print("  truncated: the session did not close the recording")
    for w in player.warnings:
        print(f"  warning: {w}")
    print("  render it with --png-dir DIR, --out FILE.apng|FILE.webp or --last FILE.png")
    return 0
