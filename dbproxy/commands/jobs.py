"""Jobs: one template run on one or more targets, its output, and the concurrency limits.

Strategy.  A ``Job`` holds a ``TargetRun`` per target.  A run's output is
kept in memory up to the template's ``output_limit`` (stdout and stderr
together): the first byte past it stops the run (the runner kills the remote
command) and marks it ``output_limit`` — a runaway ``yes`` cannot fill the
proxy's memory.  Every chunk is also appended to the job's log so readers
that stream (``GET /jobs/{id}?stream=true``) see output as it arrives: they
hold an index into the log and wait on ``changed`` (a fresh ``trio.Event``
per change, the usual trio condition).

A run stops three ways, all by cancelling its ``CancelScope``: its deadline
(the template's timeout), ``stop("output_limit")`` and ``stop("cancelled")``
(``POST /jobs/{id}/cancel``).  The runner (the engine's ``execute``) sees a
trio cancellation and must kill the remote command before it returns.

``Limits`` counts running jobs per caller and running runs per target; a
request over either is refused (HTTP 429), never queued: a queue would hold
the caller's HTTP request (or an unbounded backlog) for an unknown time.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any

import attrs
import trio

# Terminal states of a run and of a job.
RUN_STATES = ("queued", "running", "succeeded", "failed", "timeout", "cancelled", "output_limit", "error")
FINISHED = frozenset(RUN_STATES[2:])


def new_job_id() -> str:
    return os.urandom(12).hex()


@attrs.define(eq=False)
class TargetRun:
    job: "Job"
    target: str
    login: str | None = None
    route: str | None = None
    status: str = "queued"
    exit_status: int | None = None
    exit_signal: str | None = None
    error: str | None = None
    stdout: bytearray = attrs.field(factory=bytearray)
    stderr: bytearray = attrs.field(factory=bytearray)
    truncated: bool = False
    started: float | None = None
    ended: float | None = None
    stop_reason: str | None = None
    scope: trio.CancelScope | None = None
    session_id: str | None = None
    command_line: str = ""
    recorder: Any = None  # dbproxy.terminal.recording.AsciicastWriter when the listener records

    def output(self, stream: str, data: bytes) -> None:
        """Output from the target (called by the runner as it arrives)."""
        if self.truncated or not data:
            return
        room = self.job.template.output_limit - len(self.stdout) - len(self.stderr)
        if len(data) > room:
            data = data[:room]
            self.truncated = True
        if data:
            (self.stderr if stream == "stderr" else self.stdout).extend(data)
            if self.recorder is not None:
                self.recorder.output(data)  # what a terminal would show: both streams, in arrival order
            self.job.log.append((self.target, stream, bytes(data)))
            self.job.notify()
        if self.truncated:
            self.stop("output_limit")

    def stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        if self.scope is not None:
            self.scope.cancel()

    @property
    def duration_ms(self) -> float | None:
        if self.started is None:
            return None
        return round(((self.ended or time.monotonic()) - self.started) * 1000, 3)

    def digests(self) -> dict:
        return {"stdout_sha256": hashlib.sha256(self.stdout).hexdigest(),
                "stderr_sha256": hashlib.sha256(self.stderr).hexdigest()}

    def snapshot(self, *, output: bool = True) -> dict:
        d: dict = {"target": self.target, "login": self.login, "status": self.status, "exit_status": self.exit_status,
                   "exit_signal": self.exit_signal, "error": self.error, "duration_ms": self.duration_ms,
                   "output_truncated": self.truncated, "stdout_bytes": len(self.stdout),
                   "stderr_bytes": len(self.stderr)}
        if output:
            d["stdout"] = self.stdout.decode("utf-8", "replace")
            d["stderr"] = self.stderr.decode("utf-8", "replace")
        if self.status in FINISHED and self.status != "error":
            d.update(self.digests())
        return d


@attrs.define(eq=False)
class Job:
    id: str
    template: Any  # templates.Template
    params: dict
    user: str
    client_addr: str
    identity: Any
    command: str
    created: float = attrs.field(factory=time.time)
    runs: list[TargetRun] = attrs.field(factory=list)
    log: list[tuple[str, str, bytes]] = attrs.field(factory=list)
    done: trio.Event = attrs.field(factory=trio.Event)
    changed: trio.Event = attrs.field(factory=trio.Event)
    finished_at: float | None = None
    cancel_requested: bool = False

    def notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    @property
    def status(self) -> str:
        if not self.done.is_set():
            return "running" if any(r.status != "queued" for r in self.runs) else "queued"
        if self.cancel_requested:
            return "cancelled"
        return "succeeded" if all(r.status == "succeeded" for r in self.runs) else "failed"

    def finish(self) -> None:
        self.finished_at = time.time()
        self.done.set()
        self.notify()

    def cancel(self) -> None:
        self.cancel_requested = True
        for run in self.runs:
            if run.status not in FINISHED:
                run.stop("cancelled")

    def snapshot(self, *, output: bool = True) -> dict:
        return {"job_id": self.id, "template": self.template.name, "params": self.params, "status": self.status,
                "user": self.user, "created": self.created, "finished": self.finished_at,
                "targets": [r.snapshot(output=output) for r in self.runs]}


class LimitExceeded(Exception):
    pass


@attrs.define(eq=False)
class Limits:
    """Running jobs per caller, running runs per target (``None``: unlimited)."""

    per_caller: int | None = 4
    per_target: int | None = 4
    callers: dict[str, int] = attrs.field(factory=dict)
    targets: dict[str, int] = attrs.field(factory=dict)

    def admit(self, user: str, targets: list[str]) -> None:
        """Take a caller slot and a slot on every target, or none of them (``LimitExceeded``)."""
        if self.per_caller is not None and self.callers.get(user, 0) >= self.per_caller:
            raise LimitExceeded(f"{user!r} already runs {self.per_caller} job(s), the most one caller may run at once")
        if self.per_target is not None:
            for t in targets:
                if self.targets.get(t, 0) >= self.per_target:
                    raise LimitExceeded(f"target {t!r} already runs {self.per_target} command(s), "
                                        "the most one target may run at once")
        self.callers[user] = self.callers.get(user, 0) + 1
        for t in targets:
            self.targets[t] = self.targets.get(t, 0) + 1

    def release_target(self, target: str) -> None:
        n = self.targets.get(target, 0) - 1
        if n > 0:
            self.targets[target] = n
        else:
            self.targets.pop(target, None)

    def release_caller(self, user: str) -> None:
        n = self.callers.get(user, 0) - 1
        if n > 0:
            self.callers[user] = n
        else:
            self.callers.pop(user, None)
