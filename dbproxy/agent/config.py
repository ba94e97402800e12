"""The ``"agents"`` section (where agents dial in) and a backend's ``"via"``.

    "agents": {"listen": "0.0.0.0:7443",
               "tls": {"cert_file": "proxy.crt", "key_file": "proxy.key"},
               "heartbeat_seconds": 10, "heartbeat_timeout_seconds": 30,
               "handshake_timeout_seconds": 10}

    "backend": {"address": "10.0.0.5:5432", "via": "agent:site-a", ...}

Agent links are not client sessions (no protocol, no route, no engine), like
the admin listener: a top-level section, served by ``dbproxy.agent.hub``.  TLS
is required (the agent verifies the proxy's certificate; the proxy verifies
the agent's node token, ``identity.token`` must be configured).
"""

from __future__ import annotations

import re
from typing import Any

import attrs

from ..configtypes import ListenerTLS
from ..validate import Validator, join

AGENTS_KEYS = {"listen", "tls", "heartbeat_seconds", "heartbeat_timeout_seconds", "handshake_timeout_seconds"}
TLS_KEYS = {"cert_file", "key_file"}
NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


@attrs.frozen
class AgentsConfig:
    host: str
    port: int
    tls: ListenerTLS
    heartbeat: float = 10.0
    heartbeat_timeout: float = 30.0
    handshake_timeout: float = 10.0


def validate_agents(v: Validator, item: Any, path: str = "agents") -> AgentsConfig | None:
    d = v.section(item, path, AGENTS_KEYS)
    if d is None:
        return None
    addr = v.address(d, "listen", path)
    tls = None
    if "tls" not in d:
        v.err(path, "a \"tls\" section (cert_file, key_file): agents verify the proxy's certificate")
    else:
        tp = join(path, "tls")
        td = v.section(d["tls"], tp, TLS_KEYS)
        if td is not None:
            cert = v.file_path(td, "cert_file", tp)
            key = v.file_path(td, "key_file", tp)
            if cert and key:
                tls = ListenerTLS(cert, key)
    heartbeat = v.number(d, "heartbeat_seconds", path, minimum=0.05)
    timeout = v.number(d, "heartbeat_timeout_seconds", path, minimum=0.1)
    handshake = v.number(d, "handshake_timeout_seconds", path, minimum=0.1)
    defaults = AgentsConfig("", 0, ListenerTLS("", ""))
    heartbeat = defaults.heartbeat if heartbeat is None else heartbeat
    timeout = defaults.heartbeat_timeout if timeout is None else timeout
    if timeout <= heartbeat:
        v.err(join(path, "heartbeat_timeout_seconds"), f"more than heartbeat_seconds ({heartbeat:g}), got {timeout:g}")
    if addr is None or tls is None:
        return None
    return AgentsConfig(addr[0], addr[1], tls, heartbeat, timeout,
                        defaults.handshake_timeout if handshake is None else handshake)


def validate_via(v: Validator, d: dict, path: str) -> str | None:
    """A backend's ``via``: ``"agent:NODE"`` (the node's agents dial the backend's address)."""
    if "via" not in d:
        return None
    value = d["via"]
    kind, sep, node = value.partition(":") if isinstance(value, str) else ("", "", "")
    if kind != "agent" or not sep or not NODE_NAME.match(node):
        v.err(join(path, "via"), f"\"agent:NODE\" (a node name of letters, digits, '.', '_', '-'), got {value!r}")
        return None
    return value


def via_node(via: str | None) -> str | None:
    """The node of ``"agent:NODE"``; None for a direct backend."""
    if via and via.startswith("agent:"):
        return via[len("agent:"):]
    return None
