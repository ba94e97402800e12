"""The Redfish engine's configuration (no trio; called by the core's validator).

Listener (``kind`` must be ``http``; its ``tls`` makes it HTTPS):

- ``target`` (optional): the one BMC this listener reaches.  Without it the
  client names the BMC in the ``Host`` header's first label
  (``https://bmc-1.bmc.example.com:8443/redfish/v1`` → ``bmc-1``; point a
  wildcard DNS name or certificate at the proxy); the route's ``match``
  selects on it (``{"target": "bmc-*"}``).
- ``auth`` is required: clients prove who they are with a proxy token
  (Bearer, or Basic with the token as password), or a client certificate.

Backend: ``address``, ``tls`` (the core's modes), and ``auth``:
``{"method": "basic" | "session", "username": …, "password_file" |
"password_env": …}`` — the BMC account only the proxy holds.

Role key ``redfish``: the rules of ``policy.py`` (validated there).
"""

from __future__ import annotations

from typing import Any

from .policy import validate_rules

LISTENER_KEYS = ("target",)
AUTH_KEYS = {"username"}


def validate_listener(v: Any, d: dict, path: str) -> dict:
    extra: dict = {}
    if "target" in d:
        target = v.string(d, "target", path)
        if target is not None:
            extra["target"] = target
    if "auth" not in d:
        v.err(path, 'a key "auth": {"methods": ["token"]} (Redfish clients prove who they are with a proxy token)')
    if d.get("kind") != "http":
        v.err(f"{path}.kind", 'kind "http" (Redfish is HTTP; add "tls" for HTTPS)')
    return extra


def validate_auth(v: Any, method: str, ad: dict, path: str) -> dict:
    for k in sorted(k for k in ad if k not in {"method", "password_file", "password_env"} | AUTH_KEYS):
        v.err(f"{path}.{k}", f"no key {k!r} for method {method} (allowed: username, password_file, password_env)")
    username = v.string(ad, "username", path)
    return {"username": username} if username is not None else {}


def validate_backend(v: Any, d: dict, path: str) -> dict:
    for k in ("database", "user"):
        if k in d:
            v.err(f"{path}.{k}", f'no key {k!r} for a Redfish backend (the BMC account is "auth.username")')
    return {}


def validate_role_key(key: str, v: Any, value: Any, path: str) -> Any:
    return validate_rules(v, value, path)
