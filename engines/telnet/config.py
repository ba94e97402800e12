"""The Telnet engine's configuration (no trio at import).

Strategy: the core's validator (``dbproxy.config``) calls the engine class's
hooks for the keys it owns, and every problem names the file, JSON path and
expectation:

- listener: ``recording`` and ``idle_timeout_seconds`` (shared with SSH,
  ``dbproxy.terminal.config``), ``auth`` (required: the proxy's own
  ``login:`` / ``Password:`` prompts take ``LOGIN@TARGET`` and a proxy token),
  ``banner`` (a line shown before the proxy's ``login:``);
- backend: ``login`` (the account on the target; default the login the
  client named), ``auth`` ``password`` (``password_file`` / ``password_env``,
  checked by the core; Telnet has no other credential), and ``prompts``:
  regular expressions matched against the end of what the target printed —
  ``login`` (default ``login:``), ``password`` (default ``Password:``),
  ``shell`` (the logged-in prompt; default a line ending in ``$``, ``#``,
  ``>`` or ``%``), ``failure`` (default ``Login incorrect`` and the like),
  and ``timeout_seconds`` for the whole login (default 10).
"""

from __future__ import annotations

import re
from typing import Any

from dbproxy.terminal.config import validate_idle_timeout, validate_recording

LISTENER_KEYS = ("recording", "idle_timeout_seconds", "banner")
BACKEND_KEYS = ("login", "prompts")
PROMPT_KEYS = {"login", "password", "shell", "failure", "timeout_seconds"}

DEFAULT_PROMPTS = {
    "login": r"(?i)login:\s*$",
    "password": r"(?i)password:\s*$",
    "shell": r"[$#>%][ \t]*$",
    "failure": r"(?i)(login incorrect|incorrect password|authentication fail|access denied|permission denied)",
}
DEFAULT_LOGIN_TIMEOUT = 10.0


def validate_listener(v: Any, d: dict, path: str) -> dict:
    extra: dict = {}
    validate_recording(v, d, path, extra)
    validate_idle_timeout(v, d, path, extra)
    banner = v.string(d, "banner", path, required=False)
    if banner is not None:
        extra["banner"] = banner
    if "auth" not in d:
        # Without it the core would make the listener anonymous: a proxy that logs anyone in to the
        # targets with its own passwords is never what is meant.
        v.err(path, 'a key "auth": {"methods": ["token"]} (Telnet clients prove who they are with a proxy token '
                    'at the proxy\'s Password: prompt)')
    return extra


def validate_auth(v: Any, method: str, ad: dict, path: str) -> dict:
    for k in sorted(k for k in ad if k not in {"method", "password_file", "password_env"}):
        v.err(f"{path}.{k}", f"no key {k!r} for method {method} (password_file or password_env)")
    return {}


def validate_backend(v: Any, d: dict, path: str) -> dict:
    extra: dict = {}
    if "user" in d:
        v.err(f"{path}.user", 'the key "login" (the account on the target host)')
    if "database" in d:
        v.err(f"{path}.database", "no key 'database' for a Telnet backend")
    login = v.string(d, "login", path, required=False)
    if login is not None:
        extra["login"] = login
    prompts = {k: re.compile(p) for k, p in DEFAULT_PROMPTS.items()}
    timeout = DEFAULT_LOGIN_TIMEOUT
    if "prompts" in d:
        pp = f"{path}.prompts"
        pd = v.obj(d["prompts"], pp)
        if pd is not None:
            v.unknown_keys(pd, PROMPT_KEYS, pp)
            for key in ("login", "password", "shell", "failure"):
                pattern = v.string(pd, key, pp, required=False)
                if pattern is None:
                    continue
                try:
                    prompts[key] = re.compile(pattern)
                except re.error as exc:
                    v.err(f"{pp}.{key}", f"a regular expression (Python re), but {pattern!r} is not one: {exc}")
            t = v.number(pd, "timeout_seconds", pp, minimum=1.0)
            if t is not None:
                timeout = t
    extra["prompts"] = prompts
    extra["login_timeout"] = timeout
    return extra
