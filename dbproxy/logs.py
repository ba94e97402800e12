"""Operational logs: text or JSON lines, the session id on every line, a level per module.

Strategy: one handler on the root logger, configured once per process
(``configure``) from the config's ``"logging"`` section and the command
line.  The session id travels in a ``contextvars.ContextVar`` set by the core
when a connection's task begins (``dbproxy.server``): trio runs each task in
its own copy of the context and children inherit it, so every line a
session's tasks log — core, engine, library — carries its id without any
call site passing it.  A handler-level filter stamps it on each record.

JSON lines (``"format": "json"``) have ``time`` (UTC, ms), ``level``,
``logger``, ``message``, ``process`` (``proxy`` or ``audit-worker``),
``session`` when inside one, and ``exc`` for a traceback.  The audit worker
process gets the same settings through ``DBPROXY_LOG`` in its environment.
Logs are for operators; the audit trail is the record — neither carries
secrets (the code never logs a password, token or key).
"""

from __future__ import annotations

import contextvars
import datetime as _dt
import json
import logging
import os
import sys
from typing import Any

import orjson

__all__ = ["SESSION", "LOG_FORMATS", "JSONFormatter", "configure", "configure_from_env", "parse_levels"]

SESSION: contextvars.ContextVar[str | None] = contextvars.ContextVar("dbproxy_session", default=None)
LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")
_ENV = "DBPROXY_LOG"


class _SessionFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "session"):
            record.session = SESSION.get()
        return True


class JSONFormatter(logging.Formatter):
    def __init__(self, process: str) -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": _dt.datetime.fromtimestamp(record.created, _dt.timezone.utc).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": self.process,
        }
        session = getattr(record, "session", None)
        if session:
            out["session"] = session
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


class _Handler(logging.StreamHandler):
    """The handler ``configure`` installs (and replaces on a second call)."""


def parse_levels(text: str) -> tuple[str | None, dict[str, str]]:
    """``"INFO"`` or ``"INFO,dbproxy.engines.ssh=DEBUG,asyncssh=WARNING"`` → (root level, per module)."""
    root, modules = None, {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, level = part.rpartition("=")
        level = level.upper()
        if level not in LEVELS:
            raise ValueError(f"{level!r} is not a log level (one of {', '.join(LEVELS)})")
        if eq:
            modules[name] = level
        else:
            root = level
    return root, modules


def configure(*, level: str = "INFO", fmt: str = "text", levels: dict[str, str] | None = None,
              process: str = "proxy", stream: Any = None) -> None:
    """(Re)configure this process's logging; children started later (the audit worker) inherit it."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format {fmt!r}: one of {', '.join(LOG_FORMATS)}")
    root = logging.getLogger()
    for h in [h for h in root.handlers if isinstance(h, _Handler) or type(h) is logging.StreamHandler]:
        root.removeHandler(h)
    handler = _Handler(stream or sys.stderr)
    handler.setFormatter(JSONFormatter(process) if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(_SessionFilter())
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name, lvl in (levels or {}).items():
        logging.getLogger(name).setLevel(lvl.upper())
    os.environ[_ENV] = json.dumps({"format": fmt, "level": level.upper(), "levels": levels or {}})


def configure_from_env(*, level: str | None, process: str) -> None:
    """In a child process (the audit worker): the parent's format and module levels."""
    try:
        settings = json.loads(os.environ.get(_ENV, "{}"))
    except ValueError:
        settings = {}
    configure(level=level or settings.get("level", "INFO"), fmt=settings.get("format", "text"),
              levels=settings.get("levels") or {}, process=process)
