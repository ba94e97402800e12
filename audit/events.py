"""Audit event construction.

Events are plain dicts, because sinks serialise them straight away with orjson
and engines add protocol-specific fields.  Field names follow Teleport's
database events where they exist (``event``, ``uid``, ``time``, ``sid``,
``user``, ``db_protocol``, ``db_name``, ``db_user``, ``db_query``,
``db_query_parameters``, ``affected_records``, ``success``, ``error``,
``addr.remote``) so a SIEM already parsing those needs no new mapping.

Strings that can be large (queries, parameters, documents) go through
``truncate`` so an oversized statement is recorded with a marker, never
dropped and never allowed to bloat the trail.
"""

from __future__ import annotations

import base64
import itertools
import os
import time as _time

SESSION_START = "db.session.start"
SESSION_END = "db.session.end"


def session_start_event(family: str) -> str:
    """The session start event of an event family (``db`` → Teleport's ``db.session.start``)."""
    return SESSION_START if family == "db" else f"{family}.session.start"


def session_end_event(family: str) -> str:
    return SESSION_END if family == "db" else f"{family}.session.end"


def access_denied_event(family: str) -> str:
    """A refusal's event per family (``db`` → ``db.session.access_denied``, ``ssh`` → ``ssh.session.access_denied``)."""
    return ACCESS_DENIED if family == "db" else f"{family}.session.access_denied"


def is_session_start(kind: object) -> bool:
    return isinstance(kind, str) and kind.endswith(".session.start")


def is_session_end(kind: object) -> bool:
    return isinstance(kind, str) and kind.endswith(".session.end")
QUERY = "db.session.query"
RESULT = "db.session.result"
PG_PARSE = "db.session.postgres.statements.parse"
PG_BIND = "db.session.postgres.statements.bind"
PG_EXECUTE = "db.session.postgres.statements.execute"
ACCESS_DENIED = "db.session.access_denied"
# The audit trail's own events: a sink's spool overflowed in drop_oldest mode.
AUDIT_LOSS = "audit.loss"
# A client (or backend) message that framed correctly but whose body the audit could not
# parse: refused, never forwarded, and the session ended (``dbproxy.errors.MalformedMessage``).
MALFORMED = "audit.malformed"
# A proxy process starts / stops cleanly (``dbproxy audit verify`` finds unclean restarts with them).
PROXY_START = "proxy.start"
PROXY_STOP = "proxy.stop"
PROXY_RELOAD = "proxy.reload"
# ``"workers": N`` (dbproxy.workers): the supervisor writes ``proxy.start``/``proxy.stop`` for the run;
# each proxy process its own start/stop, and the supervisor the exit of one that died (restarted).
PROXY_WORKER_START = "proxy.worker.start"
PROXY_WORKER_STOP = "proxy.worker.stop"
PROXY_WORKER_EXIT = "proxy.worker.exit"

# Teleport's event codes for the events it has; ours extend the series.
CODES = {
    SESSION_START: "TDB00I",
    QUERY: "TDB02I",
    RESULT: "TDB08I",
    SESSION_END: "TDB01I",
    PG_PARSE: "TPG00I",
    PG_BIND: "TPG01I",
    PG_EXECUTE: "TPG02I",
    ACCESS_DENIED: "TDB10W",
    AUDIT_LOSS: "TAU00W",
    MALFORMED: "TAU01W",
    PROXY_START: "TAU02I",
    PROXY_STOP: "TAU03I",
    PROXY_RELOAD: "TAU04I",
    PROXY_WORKER_START: "TAU10I",
    PROXY_WORKER_STOP: "TAU11I",
    PROXY_WORKER_EXIT: "TAU12W",
}

MAX_QUERY_CHARS = 16 * 1024
MAX_PARAM_CHARS = 2 * 1024
TRUNCATION_MARKER = "…[truncated {n} of {total} chars]"


# Event ids: 64 random bits chosen per process, then a 64-bit counter — unique
# across processes and restarts without coordination, and cheaper than 16
# fresh random bytes per event (the hot path emits two events per query).
_ID_PREFIX = os.urandom(8).hex()
_id_counter = itertools.count(1)


def new_event_id() -> str:
    return f"{_ID_PREFIX}{next(_id_counter):016x}"


_time_cache: list = [-1, ""]


def now_iso(t: float | None = None) -> str:
    """UTC time (now, or ``t`` in seconds since the epoch), RFC 3339 with microseconds;
    the formatted second is cached."""
    if t is None:
        t = _time.time()
    sec = int(t)
    if sec != _time_cache[0]:
        _time_cache[0] = sec
        _time_cache[1] = _time.strftime("%Y-%m-%dT%H:%M:%S", _time.gmtime(sec))
    return f"{_time_cache[1]}.{int((t - sec) * 1_000_000):06d}Z"


def truncate(text: str, limit: int = MAX_QUERY_CHARS) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + TRUNCATION_MARKER.format(n=len(text) - limit, total=len(text))


def param_text(value: bytes | None, *, binary: bool, limit: int = MAX_PARAM_CHARS) -> str | None:
    """A bound parameter as audit text: text-format values decoded, binary ones base64."""
    if value is None:
        return None
    if binary:
        encoded = "base64:" + base64.b64encode(value[: limit]).decode("ascii")
        if len(value) > limit:
            encoded += TRUNCATION_MARKER.format(n=len(value) - limit, total=len(value))
        return encoded
    return truncate(value.decode("utf-8", "replace"), limit)


def marker(kind: str, **fields) -> dict:
    """An event of the proxy itself (no session): ``proxy.start`` / ``proxy.stop``."""
    return {"event": kind, "code": CODES.get(kind, ""), "uid": new_event_id(), "time": now_iso(), **fields}
