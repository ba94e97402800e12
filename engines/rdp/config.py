"""The RDP engine's configuration (no trio at import).

Strategy: the proxy passes RDP through after the X.224 exchange, so there is
little to configure, and what would mislead is refused with the file, JSON
path and expectation (``dbproxy.config``'s validator):

- backend ``auth``: method ``passthrough`` only, without a secret — the
  client's credentials travel inside TLS / CredSSP, end to end to the RDP
  server; the proxy holds none and injects none (not yet);
- backend ``user`` / ``database``: refused (the login is the client's, inside TLS);
- listener ``auth``: only ``anonymous`` (RDP gives the proxy nothing to check
  before TLS; the core's listener rules — loopback unless
  ``i_know_this_is_open``, ``anonymous_roles`` when roles exist — apply).
"""

from __future__ import annotations

from typing import Any

LISTENER_KEYS: tuple[str, ...] = ()
BACKEND_KEYS: tuple[str, ...] = ()


def validate_auth(v: Any, method: str, ad: dict, path: str) -> dict:
    for key in sorted(k for k in ad if k != "method"):
        v.err(f"{path}.{key}", f"no key {key!r} for method {method} (RDP credentials travel end to end inside "
                               "TLS/CredSSP: the proxy holds no RDP secret)")
    return {}


def validate_backend(v: Any, d: dict, path: str) -> dict:
    for key in ("user", "database"):
        if key in d:
            v.err(f"{path}.{key}", f"no key {key!r} for an RDP backend (the client logs in inside TLS; "
                                   "the proxy injects no credential)")
    return {}
