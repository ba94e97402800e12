"""What terminal engines (SSH, Telnet) share in their config and in the client's request.

Strategy: the listener keys that mean the same for every terminal engine —
``recording`` (``dir``: a writable folder for the asciicast files; ``input``:
record keystrokes too, off by default) and ``idle_timeout_seconds`` — are
validated here once, with the core's validator helpers (file, JSON path,
expectation), and come back as ``ListenerConfig.extra`` entries
(``recording_dir``, ``recording_input``, ``idle_timeout_seconds``).

``parse_login_target`` splits the ``LOGIN@TARGET`` a terminal client names
(the SSH user name, the Telnet ``login:`` answer) at the *last* ``@``: a host
name never holds one and some logins do (``alice@corp@web-1``).  No trio.
"""

from __future__ import annotations

import os
from typing import Any

import attrs

RECORDING_KEYS = {"dir", "input"}


class BadUserName(ValueError):
    """The name is not ``LOGIN@TARGET``; the message is what the client is told."""


@attrs.frozen
class UserName:
    login: str
    target: str


def parse_login_target(name: str, what: str = "user name") -> UserName:
    """``LOGIN@TARGET`` → (login, target); split at the last ``@``."""
    login, sep, target = name.rpartition("@")
    if not sep or not login or not target:
        raise BadUserName(f"the {what} must be LOGIN@TARGET (e.g. deploy@web-1), got {name!r}")
    if any(c.isspace() or ord(c) < 32 for c in name):
        raise BadUserName(f"the {what} may not contain spaces or control characters")
    return UserName(login=login, target=target)


def validate_recording(v: Any, d: dict, path: str, extra: dict) -> None:
    """``recording: {"dir": …, "input": bool}`` → ``extra["recording_dir"]``, ``extra["recording_input"]``."""
    if "recording" not in d:
        return
    rp = f"{path}.recording"
    rd = v.obj(d["recording"], rp)
    if rd is None:
        return
    v.unknown_keys(rd, RECORDING_KEYS, rp)
    folder = v.string(rd, "dir", rp)
    if folder is not None:
        resolved = folder if os.path.isabs(folder) else os.path.join(v.base, folder)
        if not os.path.isdir(resolved) or not os.access(resolved, os.W_OK):
            v.err(f"{rp}.dir", f"a writable folder for the recordings, but {resolved} is not one")
        else:
            extra["recording_dir"] = resolved
    # Keystrokes in a second asciicast file; off by default (see dbproxy/terminal/observer.py).
    extra["recording_input"] = v.boolean(rd, "input", rp)


def validate_idle_timeout(v: Any, d: dict, path: str, extra: dict) -> None:
    """``idle_timeout_seconds``: no terminal data either way for this long closes the session."""
    idle = v.number(d, "idle_timeout_seconds", path, minimum=1.0)
    if idle is not None:
        extra["idle_timeout_seconds"] = idle
