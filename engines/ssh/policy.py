"""Exec command policy: a role's ``deny_commands`` applied to an SSH exec request before the target sees it.

Strategy: the command line is split into the simple commands a POSIX shell
would run — at ``;``, ``&``, ``|``, newlines, and inside ``$(…)`` and
backquotes — and each piece (leading ``VAR=value`` assignments and a
``sudo``/``env``/``exec``/``command``/``nohup`` prefix stripped) is matched
with the core's ``Grant.denied_command`` (case-insensitive glob on the
whole piece or its first word).  The first match refuses the request.

What this cannot stop, honestly: the target's shell interprets the line, so
anything that hides the command word from a plain reading gets through —
aliases and functions, a script that runs it (``./x.sh``), an interpreter
(``python -c``, ``sh -c 'r''m …'``), quoting or escapes (``\\rm``, ``r""m``),
variables (``$X``), encodings (``echo … | base64 -d | sh``) and paths
(``/bin/rm`` unless the pattern says ``*/rm``).  Deny patterns are a
guard-rail against mistakes, not a sandbox; the audit of every exec line is
the control that holds.  No trio, no I/O.
"""

from __future__ import annotations

from typing import Any

# The splitter is the terminal engines' (Telnet's line policy uses it too): dbproxy/terminal/linepolicy.py.
from dbproxy.terminal.linepolicy import simple_commands

__all__ = ["denied_exec", "simple_commands"]


def denied_exec(grant: Any, line: str) -> tuple[str, str] | None:
    """(the refused piece, the deny pattern) for the first piece of ``line`` the grant denies, else None."""
    if grant is None or not getattr(grant, "deny_commands", ()):
        return None
    for piece in simple_commands(line):
        pattern = grant.denied_command(piece)
        if pattern is not None:
            return piece, pattern
    return None
