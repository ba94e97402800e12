"""Human-readable audit events (``dbproxy audit tail``) and the one-line summary syslog uses.

One line per event:

    2024-05-01T10:00:00.123Z #42 alice 1a2b3c4d QUERY app as u_scram: SELECT 1

``follow`` keeps reading a growing file like ``tail -F``: it notices a
rotation (the path now names a new file, or the file shrank) and reopens.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Iterator

import orjson

from . import events as ev

MAX_FIELD = 300


def _short(text: Any, limit: int = MAX_FIELD) -> str:
    text = str(text).replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "…"


def _detail(event: dict) -> str:
    kind = event.get("event", "?")
    target = f"{event.get('db_user') or '?'}@{event.get('db_name') or '?'}"
    if ev.is_session_start(kind):
        text = f"START {target} via {event.get('route') or '-'} from {event.get('addr.remote') or '?'}"
        if event.get("success") is False:
            text += f" FAILED: {_short(event.get('error'))}"
        return text
    if ev.is_session_end(kind):
        return f"END {target} {event.get('reason', '')} ({event.get('duration_ms', '?')} ms, {event.get('queries', '?')} queries)"
    if kind in (ev.QUERY, ev.PG_PARSE, ev.PG_EXECUTE):
        label = {ev.QUERY: "QUERY", ev.PG_PARSE: "PARSE", ev.PG_EXECUTE: "EXECUTE"}[kind]
        text = f"{label} {target}: {_short(event.get('db_query', ''))}"
        if event.get("db_query_parameters"):
            text += f" params={_short(orjson.dumps(event['db_query_parameters']).decode(), 120)}"
        return text
    if kind == ev.PG_BIND:
        return f"BIND {target} {event.get('statement_name') or '<unnamed>'} params={_short(orjson.dumps(event.get('db_query_parameters')).decode(), 120)}"
    if kind == ev.RESULT:
        if event.get("success") is False:
            return f"RESULT error {event.get('sqlstate') or ''} {_short(event.get('error', ''))}".replace("  ", " ")
        rows = event.get("affected_records")
        return f"RESULT ok {event.get('command_tag') or ''}" + (f" rows={rows}" if rows is not None else "")
    if kind == ev.AUDIT_LOSS:
        return (
            f"AUDIT LOSS sink={event.get('sink')} dropped={event.get('dropped')} "
            f"(seq {event.get('dropped_first_seq')}-{event.get('dropped_last_seq')}, {event.get('dropped_total')} in total)"
        )
    skip = {"event", "code", "uid", "time", "sid", "user", "roles", "seq", "prev_hash", "hash", "db_protocol", "listener", "auth_method"}
    rest = " ".join(f"{k}={_short(v, 80)}" for k, v in event.items() if k not in skip and v is not None)
    return f"{kind} {rest}".rstrip()


def describe(event: dict, *, with_time: bool = True) -> str:
    parts = []
    if with_time:
        parts.append(str(event.get("time", "-")))
    parts.append(f"#{event.get('seq', '?')}")
    parts.append(str(event.get("user") or "-"))
    parts.append(str(event.get("sid") or "-")[:8])
    parts.append(_detail(event))
    return " ".join(parts)


def matcher(*, user: str | None = None, session: str | None = None) -> Callable[[dict], bool]:
    def match(event: dict) -> bool:
        if user is not None and event.get("user") != user and event.get("db_user") != user:
            return False
        if session is not None and not str(event.get("sid") or "").startswith(session):
            return False
        return True

    return match


def _events(lines: Iterator[bytes]) -> Iterator[dict | str]:
    for line in lines:
        if not line.strip():
            continue
        try:
            event = orjson.loads(line)
        except orjson.JSONDecodeError:
            yield f"<unparseable line: {_short(line.decode('utf-8', 'replace'), 80)}>"
            continue
        yield event if isinstance(event, dict) else "<not an object>"


def read_existing(path: str, match: Callable[[dict], bool], last: int | None) -> tuple[list[str], int]:
    """Formatted matching events of *path* (the last *last* of them, or all), and the offset read to."""
    from .chain import open_trail

    out: list[str] = []
    with open_trail(path) as f:
        data = f.read()
    end = data.rfind(b"\n") + 1
    for item in _events(iter(data[:end].split(b"\n"))):
        if isinstance(item, str):
            out.append(item)
        elif match(item):
            out.append(describe(item))
    if last is not None:
        out = out[-last:] if last else []
    return out, end


def follow(path: str, offset: int, match: Callable[[dict], bool], emit: Callable[[str], None], *, interval: float = 0.2, stop: Callable[[], bool] = lambda: False) -> None:
    """Print events appended to *path* after *offset* until ``stop()``; survives rotation."""
    f = open(path, "rb")
    f.seek(offset)
    ino = os.fstat(f.fileno()).st_ino
    partial = b""
    try:
        while not stop():
            chunk = f.read()
            if chunk:
                data = partial + chunk
                end = data.rfind(b"\n") + 1
                partial = data[end:]
                for item in _events(iter(data[:end].split(b"\n"))):
                    if isinstance(item, str):
                        emit(item)
                    elif match(item):
                        emit(describe(item))
                continue
            try:
                st = os.stat(path)
            except FileNotFoundError:
                time.sleep(interval)
                continue
            if st.st_ino != ino or st.st_size < f.tell():
                f.close()
                f = open(path, "rb")
                ino = os.fstat(f.fileno()).st_ino
                partial = b""
                continue
            time.sleep(interval)
    finally:
        f.close()
