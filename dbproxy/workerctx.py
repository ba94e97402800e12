"""This process's place under a ``"workers": N`` supervisor (``dbproxy.workers``): its index, the
number of processes, the supervisor's state directory.  Its own module, importing nothing of the
core, so the server and the limits can read it without importing the supervisor.
"""

from __future__ import annotations

import os
from typing import Any

import attrs


@attrs.define(eq=False)
class WorkerContext:
    """What a proxy process under a supervisor knows of its place (``current()``)."""

    index: int
    count: int
    state_dir: str
    counts: Any = None  # dbproxy.limits.SharedCounts, opened on first use

    @property
    def audit_socket(self) -> str:
        return audit_socket(self.state_dir)

    @property
    def limits_file(self) -> str:
        return limits_file(self.state_dir)


def audit_socket(state_dir: str) -> str:
    return os.path.join(state_dir, "audit.sock")


def limits_file(state_dir: str) -> str:
    return os.path.join(state_dir, "limits")


_current: WorkerContext | None = None


def current() -> WorkerContext | None:
    """This process's place among the supervisor's; None when it is the only proxy process."""
    return _current


def set_current(ctx: WorkerContext | None) -> None:
    global _current
    _current = ctx
