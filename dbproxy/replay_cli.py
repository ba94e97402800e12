"""``dbproxy replay FILE``: play a terminal recording (asciicast v2) in this terminal, or print its final screen;
render an engine's own recording format (desktop sessions) to images.

``--speed`` divides the delays, ``--seek`` starts that many seconds in (what
came before is drawn at once), ``--idle-limit`` caps a pause; ``--text``
prints the final screen as text (``--until`` seconds for an earlier one),
as a VT100 emulator (pyte) draws it.  A file that is not asciicast v2 is
refused with the line that is wrong.

Other formats belong to engines, and the core names none: a file that does not
start like JSON is offered to the registered engines (``default_registry()``)
by convention — an engine package with a ``replay`` module whose ``MAGIC``
bytes start the file plays it with that module's ``replay(args)`` (the VNC
engine's desktop recordings: ``--png-dir``, ``--every``, ``--out``, ``--last``).
"""

from __future__ import annotations

import importlib
import sys
import time
from typing import Any


def engine_replayer(head: bytes, registry: Any = None) -> Any:
    """The ``replay`` module of the registered engine whose ``MAGIC`` starts ``head``, or None."""
    if registry is None:
        from dbproxy.registry import default_registry

        registry = default_registry()
    seen = set()
    for name in registry.names():
        package = registry.get(name).__module__.rpartition(".")[0]
        if package in seen:
            continue
        seen.add(package)
        try:
            module = importlib.import_module(f"{package}.replay")
        except ModuleNotFoundError as exc:
            if exc.name != f"{package}.replay":
                raise
            continue
        magic = getattr(module, "MAGIC", None)
        if magic and head.startswith(magic):
            return module
    return None


def cmd_replay(args: Any, *, registry: Any = None) -> int:
    try:
        with open(args.file, "rb") as f:
            head = f.read(64)
    except OSError as exc:
        print(f"dbproxy replay: {exc}", file=sys.stderr)
        return 2
    if head and not head.lstrip().startswith(b"{"):
        module = engine_replayer(head, registry)
        if module is not None:
            return module.replay(args)
    for opt in ("png_dir", "out", "last"):
        if getattr(args, opt, None) is not None:
            print(f"dbproxy replay: --{opt.replace('_', '-')} renders desktop recordings; {args.file} is not one",
                  file=sys.stderr)
            return 2
    return _replay_cast(args)


def _replay_cast(args: Any) -> int:
    from dbproxy.terminal.recording import read_cast
    from dbproxy.terminal.replay import schedule, screen_text

    try:
        header, events = read_cast(args.file)
    except (OSError, ValueError) as exc:
        print(f"dbproxy replay: {exc}", file=sys.stderr)
        return 2
    if args.text:
        sys.stdout.write("\n".join(screen_text(header, events, until=args.until)) + "\n")
        return 0
    out = sys.stdout
    try:
        for delay, code, data in schedule(events, speed=args.speed, seek=args.seek, idle_limit=args.idle_limit):
            if delay:
                out.flush()
                time.sleep(delay)
            if code == "o":
                out.write(data)
            elif code == "r":
                w, _, h = data.partition("x")
                out.write(f"\x1b[8;{h};{w}t")  # xterm window resize (XTWINOPS), honoured where allowed
        out.flush()
    except KeyboardInterrupt:
        out.write("\x1b[0m\r\n")
        return 130
    return 0


def _positive(value: str) -> float:
    f = float(value)
    if f <= 0:
        raise ValueError(value)
    return f


def _positive_ms(value: str) -> int:
    n = int(value)
    if n <= 0:
        raise ValueError(value)
    return n


def add_parser(sub: Any) -> None:
    p = sub.add_parser("replay", help="play a terminal recording (asciicast v2), or print its final screen; "
                       "render a desktop recording to PNG frames / an animation")
    p.add_argument("file")
    p.add_argument("--speed", type=_positive, default=1.0, help="playback speed factor (2 = twice as fast)")
    p.add_argument("--seek", type=float, default=0.0, help="start this many seconds into the recording")
    p.add_argument("--idle-limit", type=_positive, default=None, help="cap pauses at this many seconds")
    p.add_argument("--text", action="store_true", help="print the final screen as text instead of playing")
    p.add_argument("--until", type=float, default=None, help="with --text: the screen at this many seconds "
                   "(desktop recordings: stop rendering there)")
    # Desktop recordings (rendered by the engine that wrote them).
    p.add_argument("--png-dir", default=None, help="desktop recording: write PNG frames into this folder")
    p.add_argument("--every", type=_positive_ms, default=None, metavar="MS",
                   help="desktop recording: at most one frame per MS milliseconds (default: one per update)")
    p.add_argument("--out", default=None, help="desktop recording: an animation, FILE.apng or FILE.webp")
    p.add_argument("--last", default=None, help="desktop recording: the final screen as a PNG file")
    p.set_defaults(func=cmd_replay)
