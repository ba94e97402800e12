"""Reading a JSONL audit trail from Python: ``dbproxy.audit.read(path, **filters)`` and ``verify(path)``.

Strategy: one generator over the trail's files in chain order (rotated
``.gz`` files too, ordered by their first ``seq`` as ``dbproxy audit verify``
orders them), yielding parsed events that pass every filter.  Filters are
plain keyword arguments so a notebook or a SIEM bridge reads naturally:

    for e in dbproxy.audit.read("audit.jsonl", event="ssh.*", user="alice", since="2026-12-06T10:00:00Z"):
        ...

``event`` is an exact type or a glob (or several); ``user`` matches the
proxy identity or, for databases, the database login; ``session`` a session
id or its prefix; ``since``/``until`` bound the event time (ISO 8601 strings
or aware datetimes; ``until`` exclusive); any other keyword must equal the
event's field of that name (``listener="pg"``, ``success=False``).  A line
that is not JSON (a torn last line after a crash) is skipped, not raised:
``verify`` is the tool that judges a trail's integrity.
"""

from __future__ import annotations

import datetime as _dt
import fnmatch
from typing import Any, Iterable, Iterator

import orjson

from .chain import VerifyResult, _first_seq, iter_lines, verify_files

__all__ = ["read", "verify"]


def _paths(path: str | Iterable[str]) -> list[str]:
    paths = [path] if isinstance(path, str) else list(path)
    if not paths:
        raise ValueError("no audit file given")
    return sorted(paths, key=_first_seq) if len(paths) > 1 else paths


def _time(value: Any, name: str) -> _dt.datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = _dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"{name}: an ISO 8601 time (2026-12-06T10:00:00Z), got {value!r}") from None
    if not isinstance(value, _dt.datetime):
        raise TypeError(f"{name}: an ISO 8601 string or a datetime, got {type(value).__name__}")
    if value.tzinfo is None:
        raise ValueError(f"{name}: a time with its zone (events are in UTC), got a naive datetime")
    return value


def read(path: str | Iterable[str], *, event: str | Iterable[str] | None = None, user: str | None = None,
         session: str | None = None, since: Any = None, until: Any = None, limit: int | None = None,
         **fields: Any) -> Iterator[dict]:
    """The events of the trail at ``path`` (one file or a rotated set) that pass every filter."""
    kinds = None if event is None else ([event] if isinstance(event, str) else list(event))
    start, end = _time(since, "since"), _time(until, "until")
    left = limit
    if left is not None and left <= 0:
        return
    for p in _paths(path):
        for _, line in iter_lines(p):
            if not line.strip():
                continue
            try:
                e = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(e, dict):
                continue
            if kinds is not None and not any(fnmatch.fnmatchcase(e.get("event", ""), k) for k in kinds):
                continue
            if user is not None and e.get("user") != user and e.get("db_user") != user:
                continue
            if session is not None and not str(e.get("sid") or "").startswith(session):
                continue
            if start is not None or end is not None:
                when = _event_time(e)
                if when is None or (start is not None and when < start) or (end is not None and when >= end):
                    continue
            if fields and any(e.get(k) != v for k, v in fields.items()):
                continue
            yield e
            if left is not None:
                left -= 1
                if left == 0:
                    return


def _event_time(e: dict) -> _dt.datetime | None:
    raw = e.get("time")
    if not isinstance(raw, str):
        return None
    try:
        return _dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        return None


def verify(path: str | Iterable[str]) -> VerifyResult:
    """Check the hash chain of the trail at ``path`` (``dbproxy audit verify``): ``result.ok`` is True
    when the chain is whole and no session lost events; ``result.error`` / ``result.gaps`` say why not."""
    return verify_files([path] if isinstance(path, str) else list(path))
