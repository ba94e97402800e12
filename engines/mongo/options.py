"""The Mongo engine's configuration and routing facts, outside the session flow's hooks.

``validate_listener``: the listener's ``options`` (``client_auth`` policy, the
client password, ``compressors``) and each route's backend ``options``
(``auth_source``, ``handshake``); errors name the file's JSON path.
``first_hello_facts``: what the client's first message (its hello) says
about it — the application name routes match on, the driver, and the
``client`` metadata handed to the backend handshake.
"""

from __future__ import annotations

import os
from typing import Any

from dbproxy.errors import ProtocolError

from . import protocol as wire
from .backend import HANDSHAKES
from .clientauth import MODES
from .stages import SUPPORTED_COMPRESSORS

LISTENER_OPTIONS = {"client_auth", "client_password_file", "client_password_env", "compressors"}
#: Options of the listener policies for client credentials, which identity mode replaces.
LEGACY_AUTH_OPTIONS = ("client_auth", "client_password_file", "client_password_env")
BACKEND_OPTIONS = {"auth_source", "handshake"}


def validate_listener(v: Any, d: dict, path: str, password_methods: tuple) -> None:
    """The Mongo listener's ``options`` and its routes' backend ``options`` (errors name the JSON path)."""
    opts = d.get("options")
    if isinstance(opts, dict):
        op = f"{path}.options"
        v.unknown_keys(opts, LISTENER_OPTIONS, op)
        mode = v.string(opts, "client_auth", op, required=False, choices=MODES) or "accept"
        if "client_password_file" in opts and "client_password_env" in opts:
            v.err(op, "only one of \"client_password_file\" or \"client_password_env\"")
        if "client_password_file" in opts:
            resolved = v.file_path(opts, "client_password_file", op)
            if resolved:
                # The engine reads the file at use; store it resolved against the config file's folder.
                opts["client_password_file"] = resolved
        if "client_password_env" in opts:
            name = v.string(opts, "client_password_env", op)
            if name and name not in os.environ:
                v.err(f"{op}.client_password_env", f"environment variable {name} to be set")
        if mode == "reject" and ("client_password_file" in opts or "client_password_env" in opts):
            v.err(op, "no client password with client_auth \"reject\" (it is only used to accept client SCRAM)")
        auth = d.get("auth")
        methods = auth.get("methods") if isinstance(auth, dict) else None
        if isinstance(methods, list) and ("token" in methods or "mtls" in methods):
            for key in LEGACY_AUTH_OPTIONS:
                if key in opts:
                    v.err(f"{op}.{key}", "no listener client_auth options with auth methods token/mtls "
                                         "(clients then authenticate with dbproxy identities)")
        if "compressors" in opts:
            comps = opts["compressors"]
            if not isinstance(comps, list) or any(c not in SUPPORTED_COMPRESSORS for c in comps):
                v.err(f"{op}.compressors", f"an array of {', '.join(SUPPORTED_COMPRESSORS)}, got {comps!r}")
    routes = d.get("routes")
    if not isinstance(routes, list):
        return
    for i, r in enumerate(routes):
        b = r.get("backend") if isinstance(r, dict) else None
        if not isinstance(b, dict):
            continue
        bp = f"{path}.routes[{i}].backend"
        bopts = b.get("options", {})
        if isinstance(bopts, dict):
            v.unknown_keys(bopts, BACKEND_OPTIONS, f"{bp}.options")
            if "auth_source" in bopts:
                v.string(bopts, "auth_source", f"{bp}.options")
            if "handshake" in bopts:
                v.string(bopts, "handshake", f"{bp}.options", choices=HANDSHAKES)
        else:
            v.err(f"{bp}.options", "an object")
        auth = b.get("auth")
        if isinstance(auth, dict) and auth.get("method") in password_methods and not b.get("user"):
            v.err(bp, f"a \"user\" for auth method {auth.get('method')}")


def first_hello_facts(msg: wire.WireMessage, max_size: int) -> dict:
    """Routing facts from the client's first message (empty when it is not a readable hello)."""
    try:
        cmd = wire.inspect_command(msg, max_message_size=max_size)
    except ProtocolError:
        return {}
    if cmd is None or cmd.name not in ("hello", "isMaster", "ismaster"):
        return {}
    try:
        client = cmd.body.get("client")
        meta = wire.decode_document(client.raw) if client is not None and hasattr(client, "raw") else None
    except Exception:
        return {}
    facts: dict[str, Any] = {"metadata": meta}
    if isinstance(meta, dict):
        app = meta.get("application")
        if isinstance(app, dict) and isinstance(app.get("name"), str):
            facts["application_name"] = app["name"]
        driver = meta.get("driver")
        if isinstance(driver, dict):
            facts["driver"] = f"{driver.get('name', '')} {driver.get('version', '')}".strip()
    return facts
