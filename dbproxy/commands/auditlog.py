"""``GET /audit/logs``: search the JSONL audit trail, a page at a time.

Strategy: the trail the audit side writes (the first ``jsonl`` sink) is read
as it is on disk — the API writes nothing and keeps no index.  A page starts
at a byte offset (the ``cursor`` of the previous page; 0 first), reads whole
lines only (a line the writer is still appending has no newline yet and is
left for the next page), keeps the events every filter accepts and stops
after ``limit`` of them; ``next_cursor`` is the offset after the last line
read, ``None`` when the file's end was reached.  Scanning runs in a worker
thread (``trio.to_thread``): a large trail does not stall other requests.

Filters (all optional, all must hold): ``user``, ``sid`` (session id),
``event`` (an exact event name or a glob such as ``command.*``), ``job``
(``job_id``), ``since``/``until`` (RFC 3339 times, compared with the
events' ``time`` after both are brought to the trail's own format).
"""

from __future__ import annotations

import datetime
import fnmatch
from typing import Any

import orjson

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
# Bytes scanned per page at most: a filter that matches nothing does not read a whole large trail at once.
MAX_SCAN = 64 * 1024 * 1024


class QueryError(ValueError):
    pass


def trail_time(text: str, what: str) -> str:
    """An RFC 3339 time as the trail writes it (``YYYY-MM-DDTHH:MM:SS.ffffffZ``, UTC)."""
    try:
        t = datetime.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise QueryError(f"{what}: an RFC 3339 time such as 2026-01-31T12:00:00Z, got {text!r}") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=datetime.timezone.utc)
    t = t.astimezone(datetime.timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_query(query: dict[str, str]) -> dict:
    known = {"user", "sid", "event", "job", "since", "until", "limit", "cursor"}
    unknown = sorted(set(query) - known)
    if unknown:
        raise QueryError(f"unknown query parameter {unknown[0]!r} (known: {', '.join(sorted(known))})")
    q: dict[str, Any] = {k: query[k] for k in ("user", "sid", "event", "job") if query.get(k)}
    for k in ("since", "until"):
        if query.get(k):
            q[k] = trail_time(query[k], k)
    try:
        q["limit"] = int(query.get("limit", DEFAULT_LIMIT))
        q["cursor"] = int(query.get("cursor", 0))
    except ValueError:
        raise QueryError("limit and cursor: integers") from None
    if not 1 <= q["limit"] <= MAX_LIMIT:
        raise QueryError(f"limit: 1 to {MAX_LIMIT}")
    if q["cursor"] < 0:
        raise QueryError("cursor: a value from a previous page's next_cursor")
    return q


def _accepts(e: dict, q: dict) -> bool:
    if "user" in q and e.get("user") != q["user"]:
        return False
    if "sid" in q and e.get("sid") != q["sid"]:
        return False
    if "job" in q and e.get("job_id") != q["job"]:
        return False
    if "event" in q and not fnmatch.fnmatchcase(str(e.get("event", "")), q["event"]):
        return False
    t = e.get("time")
    if "since" in q and (not isinstance(t, str) or t < q["since"]):
        return False
    if "until" in q and (not isinstance(t, str) or t > q["until"]):
        return False
    return True


def read_page(path: str, q: dict) -> dict:
    """One page of matching events from ``path`` (blocking: run it in a thread)."""
    events: list[dict] = []
    offset = q["cursor"]
    scanned = 0
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return {"events": [], "next_cursor": None}
    with f:
        f.seek(offset)
        while True:
            line = f.readline()
            if not line or not line.endswith(b"\n"):
                return {"events": events, "next_cursor": None}
            offset += len(line)
            scanned += len(line)
            try:
                e = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(e, dict) and _accepts(e, q):
                events.append(e)
                if len(events) >= q["limit"]:
                    break
            if scanned >= MAX_SCAN:
                break
        # More may follow: the caller asks again from here.
        return {"events": events, "next_cursor": str(offset)}
