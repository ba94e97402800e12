"""Line policy for interactive terminals: a role's deny patterns on each submitted command line.

Strategy: the observer (``observer.py``) calls ``check(line)`` when Enter is
pressed, for the line as the screen shows it and as it was typed; a paste of
several lines is split at each Enter and every line is checked before it is
submitted.  ``LinePolicy`` splits a line into the simple commands a shell
would run (the engine's splitter, normally ``simple_commands`` below)
and matches each with the grant's ``denied_command``.  Engine-agnostic: the
splitter and the grant are handed in.  No trio, no I/O.
"""

from __future__ import annotations

import re
from typing import Any, Callable


class LinePolicy:
    def __init__(self, grant: Any, split: Callable[[str], list[str]]) -> None:
        self.grant = grant
        self.split = split

    @property
    def active(self) -> bool:
        return bool(getattr(self.grant, "deny_commands", ()))

    def __call__(self, line: str) -> tuple[str, str] | None:
        """(refused piece, deny pattern) for the first piece of ``line`` the grant denies, else None."""
        if not self.active:
            return None
        for piece in self.split(line):
            pattern = self.grant.denied_command(piece)
            if pattern is not None:
                return piece, pattern
        return None


# The shell splitter both terminal engines use (SSH exec policy, SSH and Telnet line policy): at ``;``, ``&``,
# ``|``, newlines, inside ``$(…)`` and backquotes; leading ``VAR=value`` and ``sudo``/``env``/… stripped.
_SEPARATORS = re.compile(r"\$\(|`|\)|;|&&?|\|\|?|\n")
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=\S*\s+")
_PREFIXES = ("sudo ", "env ", "exec ", "command ", "nohup ", "time ")


def simple_commands(line: str) -> list[str]:
    """The pieces of ``line`` a shell would run as separate commands (best effort: see engines/ssh/policy.py
    and docs/ssh.md for what this reading cannot see)."""
    pieces = []
    for piece in _SEPARATORS.split(line):
        piece = piece.strip().lstrip("({!").strip()
        changed = True
        while changed and piece:
            changed = False
            m = _ASSIGNMENT.match(piece)
            if m:
                piece, changed = piece[m.end():].lstrip(), True
            for prefix in _PREFIXES:
                if piece.startswith(prefix):
                    piece, changed = piece[len(prefix):].lstrip(), True
        if piece:
            pieces.append(piece)
    return pieces
