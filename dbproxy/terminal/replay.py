"""Replaying an asciicast v2 recording: the final screen (pyte) and the timed playback plan.

Strategy: the screen is rebuilt by feeding every output event (``"o"``) to
a pyte screen of the header's size, resizes (``"r"``) applied as they come;
``screen_text`` returns its rows, trailing blanks trimmed — what the person
saw when the recording stopped (or at ``until`` seconds).  ``schedule``
turns the events into (delay, text) pairs for a player: delays divided by
``speed``, everything before ``seek`` written at once, long idle gaps cut
to ``idle_limit``.  Sans-IO: the caller writes and sleeps.
"""

from __future__ import annotations

from typing import Iterator

import pyte


def screen_text(header: dict, events: list[tuple[float, str, str]], *, until: float | None = None) -> list[str]:
    screen = pyte.Screen(int(header.get("width") or 80), int(header.get("height") or 24))
    stream = pyte.Stream(screen)
    for t, code, data in events:
        if until is not None and t > until:
            break
        if code == "o":
            stream.feed(data)
        elif code == "r":
            try:
                w, h = (int(x) for x in data.split("x"))
            except ValueError:
                continue
            screen.resize(h, w)
    rows = [row.rstrip() for row in screen.display]
    while rows and not rows[-1]:
        rows.pop()
    return rows


def schedule(events: list[tuple[float, str, str]], *, speed: float = 1.0, seek: float = 0.0,
             idle_limit: float | None = None) -> Iterator[tuple[float, str, str]]:
    """(seconds to wait before it, code, data) for each output/resize event, in order."""
    last = seek
    for t, code, data in events:
        if code not in ("o", "r"):
            continue
        if t <= seek:
            yield 0.0, code, data
            continue
        gap = t - last
        if idle_limit is not None:
            gap = min(gap, idle_limit)
        last = t
        yield max(gap, 0.0) / speed, code, data
