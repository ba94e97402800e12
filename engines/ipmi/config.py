"""The IPMI engine's configuration (no trio; called by the core's validator).

Listener: ``kind`` must be ``udp`` (RMCP+ is UDP, port 623 by convention);
``auth`` ``{"methods": ["token"]}`` — clients log in with the single-use
code of ``dbproxy token issue --ipmi`` (kept in
``identity.token.codes_file``, by default next to ``registry_file``: one of
them must be set).
Optional ``cipher_suites``: the suites offered to clients (default
``[3, 17]``); ``recording``: ``{"dir": …, "input": false}`` — where
Serial-over-LAN consoles are recorded (asciicast, as terminals are).

Backend: ``address`` (host:port of the BMC's RMCP+ port), ``auth``:
``{"method": "rakp", "username": …, "password_file" | "password_env": …}``
— the BMC account only the proxy holds (IPMI: user name ≤ 16 bytes,
password ≤ 20 bytes); ``cipher_suite``: 3 (default) or 17 toward the BMC;
``privilege``: the proxy's session privilege at the BMC, ``"operator"`` or
``"administrator"`` (default).

Role key ``ipmi``: command-name globs (``commands.py``).
"""

from __future__ import annotations

from typing import Any

from dbproxy.terminal.config import validate_recording

from . import commands
from .rakp import MAX_USERNAME, PRIV_ADMIN, PRIV_OPERATOR, PRIV_USER, SUITES

LISTENER_KEYS = ("cipher_suites", "recording")
BACKEND_KEYS = ("cipher_suite", "privilege")
PRIVILEGES = {"user": PRIV_USER, "operator": PRIV_OPERATOR, "administrator": PRIV_ADMIN}


def validate_listener(v: Any, d: dict, path: str) -> dict:
    extra: dict = {"cipher_suites": (3, 17)}
    if "cipher_suites" in d:
        raw = d["cipher_suites"]
        if not isinstance(raw, list) or not raw or any(s not in SUITES for s in raw) or \
                any(isinstance(s, bool) for s in raw):
            v.err(f"{path}.cipher_suites", f"a non-empty array of cipher suite ids from {sorted(SUITES)}")
        else:
            extra["cipher_suites"] = tuple(raw)
    if "auth" not in d:
        v.err(path, 'a key "auth": {"methods": ["token"]} (IPMI clients log in with a code from '
              '"dbproxy token issue --ipmi")')
    if d.get("kind") != "udp":
        v.err(f"{path}.kind", 'kind "udp" (IPMI v2.0 / RMCP+ is UDP)')
    # Serial-over-LAN consoles are recorded like terminals (sol_session.py): {"dir": …, "input": bool}.
    validate_recording(v, d, path, extra)
    return extra


def validate_auth(v: Any, method: str, ad: dict, path: str) -> dict:
    for k in sorted(k for k in ad if k not in {"method", "password_file", "password_env", "username"}):
        v.err(f"{path}.{k}", f"no key {k!r} for method {method} (allowed: username, password_file, password_env)")
    username = v.string(ad, "username", path)
    if username is not None and len(username.encode()) > MAX_USERNAME:
        v.err(f"{path}.username", f"an IPMI user name of at most {MAX_USERNAME} bytes")
    return {"username": username} if username is not None else {}


def validate_backend(v: Any, d: dict, path: str) -> dict:
    extra: dict = {"cipher_suite": 3, "privilege": PRIV_ADMIN}
    for k in ("database", "user"):
        if k in d:
            v.err(f"{path}.{k}", f'no key {k!r} for an IPMI backend (the BMC account is "auth.username")')
    if "cipher_suite" in d:
        suite = d["cipher_suite"]
        if isinstance(suite, bool) or suite not in SUITES:
            v.err(f"{path}.cipher_suite", f"one of {sorted(SUITES)}")
        else:
            extra["cipher_suite"] = suite
    if "privilege" in d:
        priv = d["privilege"]
        if priv not in PRIVILEGES:
            v.err(f"{path}.privilege", f"one of {', '.join(PRIVILEGES)}")
        else:
            extra["privilege"] = PRIVILEGES[priv]
    return extra


validate_role_key = commands.validate_role_key
