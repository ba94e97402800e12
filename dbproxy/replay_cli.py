"""``dbproxy replay FILE``: play a terminal recording (asciicast v2) in this terminal, or print its final screen.

``--speed`` divides the delays, ``--seek`` starts that many seconds in (what
came before is drawn at once), ``--idle-limit`` caps a pause; ``--text``
prints the final screen as text (``--until`` seconds for an earlier one),
as a VT100 emulator (pyte) draws it.  A file that is not asciicast v2 is
refused with the line that is wrong.
"""

from __future__ import annotations

import sys
import time
from typing import Any


def cmd_replay(args: Any) -> int:
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


def add_parser(sub: Any) -> None:
    p = sub.add_parser("replay", help="play a terminal recording (asciicast v2), or print its final screen")
    p.add_argument("file")
    p.add_argument("--speed", type=_positive, default=1.0, help="playback speed factor (2 = twice as fast)")
    p.add_argument("--seek", type=float, default=0.0, help="start this many seconds into the recording")
    p.add_argument("--idle-limit", type=_positive, default=None, help="cap pauses at this many seconds")
    p.add_argument("--text", action="store_true", help="print the final screen as text instead of playing")
    p.add_argument("--until", type=float, default=None, help="with --text: the screen at this many seconds")
    p.set_defaults(func=cmd_replay)
