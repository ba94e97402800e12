"""One terminal's recording, observer and command audit, as every terminal engine does it.

Strategy: an engine (SSH per pty channel, Telnet per connection) makes one
``TerminalAudit`` and hands it both directions of the terminal stream:

- ``output(data)`` — what the target drew: written to the asciicast
  recording, fed to the observer; returns the ``Step`` an Enter that waited
  for this echo now takes (or None);
- ``input(data)`` / ``resume(timed_out)`` — the client's keys through the
  observer (``observer.py``): the returned ``Step`` says what to forward to
  the target and what to tell the client; the lines it decided are audited
  here first (``<family>.shell.command``, ``.command.end``,
  ``.hidden_input``, and ``<family>.session.access_denied`` for a refusal),
  and the echoed keys go to the input recording;
- ``resize``, and ``close()`` → the recording fields (file, size, SHA-256)
  for the engine's end event, so the audit's hash chain covers them.

The engine keeps the timer for ``waiting`` (``echo_wait`` seconds) and does
the I/O.  Sans-IO apart from the recording files; no trio.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

from dbproxy.access import audit_denial
from dbproxy.errors import AccessDenied

from .linepolicy import LinePolicy
from .observer import ShellObserver, Step
from .recording import AsciicastWriter

log = logging.getLogger("dbproxy.terminal")


class TerminalAudit:
    def __init__(self, session: Any, emit: Callable[..., Any], family: str, *, width: int, height: int,
                 term: str | None, grant: Any, split: Callable[[str], list[str]], recording_path: str | None = None,
                 recording_input: bool = False, fields: dict | None = None) -> None:
        """``recording_path``: the output recording's file (None: not recorded); raises OSError when it (or
        the input recording) cannot be created — the engine refuses the terminal then."""
        self.session = session
        self.emit = emit
        self.family = family
        self.fields = fields or {}
        self.recorder: AsciicastWriter | None = None
        self.input_recorder: AsciicastWriter | None = None
        if recording_path is not None:
            self.recorder = AsciicastWriter(recording_path, width, height, term)
            if recording_input:
                try:
                    self.input_recorder = AsciicastWriter(recording_path[: -len(".cast")] + ".input.cast", width,
                                                          height, term, started=self.recorder.started, kind="i")
                except OSError:
                    self.recorder.close()
                    self.recorder = None
                    raise
        self.observer: ShellObserver | None = ShellObserver(width, height, check=LinePolicy(grant, split))

    # -- the two directions ------------------------------------------------------------------
    def output(self, data: bytes) -> Step | None:
        if self.recorder is not None:
            self.recorder.output(data)
        if self.observer is None:
            return None
        self.observer.output(data)
        if self.observer.waiting:  # an Enter waits for this echo
            return self._audit(self.observer.resume())
        return None

    def input(self, data: bytes) -> Step:
        if self.observer is None:
            return Step(forward=bytearray(data))
        return self._audit(self.observer.input(data))

    def resume(self, *, timed_out: bool = False) -> Step:
        if self.observer is None:
            return Step()
        return self._audit(self.observer.resume(timed_out=timed_out))

    @property
    def waiting(self) -> bool:
        return self.observer is not None and self.observer.waiting

    @property
    def wait_started(self) -> float:
        """When the waiting Enter began waiting (``time.monotonic``, the observer's clock)."""
        return self.observer.wait_started if self.observer is not None else 0.0

    @property
    def echo_wait(self) -> float:
        return self.observer.echo_wait if self.observer is not None else 0.0

    def resize(self, width: int, height: int) -> None:
        if self.recorder is not None:
            self.recorder.resize(width, height)
        if self.observer is not None:
            self.observer.resize(width, height)

    def close(self) -> tuple[dict, list[dict]]:
        """End the terminal: the last command's output counted, the files closed.

        Returns (fields for the engine's end event: ``recording``, ``recording_bytes``,
        ``recording_sha256`` and ``input_*`` alike; the session end's ``recordings`` entries)."""
        if self.observer is not None:
            self._audit(self.observer.close())
            self.observer = None
        fields: dict = {}
        recordings: list[dict] = []
        if self.recorder is not None:
            recorded = self.recorder.close()
            self.recorder = None
            fields.update(recorded)
            recordings.append({**self.fields, **recorded})
        if self.input_recorder is not None:
            recorded = self.input_recorder.close()
            self.input_recorder = None
            fields.update({f"input_{k}": v for k, v in recorded.items()})
            recordings.append({**self.fields, "input": True, **recorded})
        return fields, recordings

    # -- the audit of decided lines ----------------------------------------------------------
    def _audit(self, step: Step) -> Step:
        prefix = f"{self.family}.shell"
        for line, output_bytes in step.finished:  # the previous command's output ends where the next begins
            self.emit(f"{prefix}.command.end", **self.fields, line=line.seq, command=line.text,
                      output_bytes=output_bytes)
        for line in step.lines:
            self._line_event(prefix, line)
        if step.record and self.input_recorder is not None:
            self.input_recorder.output(bytes(step.record))
        return step

    def _line_event(self, prefix: str, line: Any) -> None:
        fields: dict = {**self.fields, "line": line.seq}
        if self.recorder is not None:
            fields.update(recording=os.path.basename(self.recorder.path), recording_offset=self.recorder.elapsed(),
                          recording_byte_offset=self.recorder.size)
        if not line.echoed:
            # Typed while the terminal did not echo (a password prompt): its text goes nowhere.
            if line.denied is not None:
                fields.update(success=False, denied_pattern=line.denied[1])
            self.emit(f"{prefix}.hidden_input", bytes=line.typed_bytes, **fields)
        else:
            fields.update(command=line.text, observed=True, source=line.source)
            if line.denied is not None:
                fields.update(success=False, denied_command=line.denied[0], denied_pattern=line.denied[1])
            self.emit(f"{prefix}.command", **fields)
        if line.denied is not None:
            reason = f"command refused by policy: deny pattern {line.denied[1]!r}"
            extra = {"command": line.text} if line.echoed else {}
            audit_denial(self.session, AccessDenied(reason, reason="command_denied"), stage="shell",
                         pattern=line.denied[1], **extra)
