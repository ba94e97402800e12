"""Tests' helper: a worker tap's trail with its fast path (``FrameTap.fast``) on and off.

``trail(tap, steps, fast=...)`` feeds ``steps`` ((direction, bytes) pairs) to
``tap`` — with its fast path counted, or switched off so every frame goes
through the observers — and returns its events (uid and time dropped, the
uids an event names replaced by the index of the event they name), its
counts and how many frames the fast path took.  ``same_trail`` asserts the
two runs agree event for event, key order included.
"""

from __future__ import annotations

from typing import Any, Callable

import orjson

from dbproxy.audit.recorder import AuditRecorder, TemplateAudit

_LINKS = ("query_uid", "cursor_query_uid")


def trail(make_tap: Callable[[Any], Any], template: dict, steps: list, *, fast: bool) -> tuple[list[dict], dict, int]:
    recorder = AuditRecorder([], capacity=1_000_000)
    tap = make_tap(TemplateAudit(recorder, dict(template)))
    hits = [0]
    if fast:
        def counted(fn):
            def wrapper(d, pos, size):
                taken = fn(d, pos, size)
                hits[0] += bool(taken)
                return taken
            return wrapper
        tap.fast = tuple(counted(fn) for fn in tap.fast)
    else:
        tap.fast = (None, None)
    for direction, data in steps:
        tap.feed(direction, data)
    events = [orjson.loads(body) for body in recorder._queue]
    index = {e["uid"]: i for i, e in enumerate(events)}
    out = []
    for e in events:
        e = {k: v for k, v in e.items() if k not in ("uid", "time")}
        for key in _LINKS:
            if e.get(key) is not None:
                e[key] = index.get(e[key], "?")
        if e.get("cursor_query_uids"):
            e["cursor_query_uids"] = [index.get(u, "?") for u in e["cursor_query_uids"]]
        out.append(e)
    return out, tap.counts(), hits[0]


def same_trail(make_tap: Callable[[Any], Any], template: dict, steps: list) -> int:
    """Both runs' trails and counts are equal; returns how many frames the fast path took."""
    fast_events, fast_counts, hits = trail(make_tap, template, steps, fast=True)
    slow_events, slow_counts, _ = trail(make_tap, template, steps, fast=False)
    assert [list(e.items()) for e in fast_events] == [list(e.items()) for e in slow_events]
    assert fast_counts == slow_counts
    return hits
