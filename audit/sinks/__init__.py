"""Audit sinks: config validation (``validate_sink``) and construction (``build_sink``)."""

from __future__ import annotations

import os
from typing import Any

from dbproxy.config import SinkConfig

SINK_TYPES = ("jsonl",)
# Keys allowed directly under "audit" in a config file.
AUDIT_KEYS = {"sinks", "queue_size"}


def validate_sink(v: Any, item: Any, path: str, index: int) -> SinkConfig | None:
    d = v.obj(item, path)
    if d is None:
        return None
    stype = v.string(d, "type", path, choices=SINK_TYPES)
    name = v.string(d, "name", path, required=False) or f"{stype}{index}"
    if stype is None:
        return None
    spath = None
    if stype == "jsonl":
        v.unknown_keys(d, {"type", "name", "path"}, path)
        spath = v.string(d, "path", path)
        if spath is None:
            return None
        if not os.path.isabs(spath):
            spath = os.path.join(v.base, spath)
    params = {k: val for k, val in d.items() if k not in {"type", "name", "path"}}
    return SinkConfig(type=stype, name=name, path=spath, params=params)


def build_sink(cfg: SinkConfig):
    from .jsonl import JsonlSink

    if cfg.type == "jsonl":
        return JsonlSink(path=cfg.path, name=cfg.name)
    raise ValueError(f"unknown sink type {cfg.type!r}")
