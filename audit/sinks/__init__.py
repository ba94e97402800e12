"""Audit sinks.  ``build_sink`` maps a validated config entry to a sink object."""

from __future__ import annotations

from typing import Any


def build_sink(cfg: Any):
    from .jsonl import JsonlSink

    if cfg.type == "jsonl":
        return JsonlSink(path=cfg.path, name=cfg.name)
    raise ValueError(f"unknown sink type {cfg.type!r}")
