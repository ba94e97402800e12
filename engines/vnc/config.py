"""The VNC engine's configuration (no trio; called by the core's validator).

Listener (kind ``tcp``):

- ``auth`` (required): clients prove who they are with a proxy token
  (VeNCrypt X509Plain: TLS with the listener's ``tls`` certificate, then the
  token as password) or with a single-use code (classic VNC authentication;
  the codes file is ``identity.token.codes_file``, or next to
  ``registry_file`` by default: one of them must be set);
- ``tls`` (the core's listener section): the certificate VeNCrypt's TLS
  presents; without it VeNCrypt is not offered;
- ``target`` (optional): the one desktop this listener reaches (a VeNCrypt
  user name then need not name it);
- ``recording`` (``dir``, ``input``: as the terminal engines; ``input`` adds
  key events to the recording, off by default — what is typed into a
  password box would be in it);
- ``audit_keys`` (default false): typed text in ``desktop.keys`` events.
  Off by default: a desktop has no notion of "this field is a password", so
  every typed password would be in the trail.

Backend ``auth`` methods: ``vnc`` (VNC authentication, the password from
``password_file`` / ``password_env``; through VeNCrypt TLSVnc/X509Vnc when
the server only offers VeNCrypt), ``plain`` (VeNCrypt Plain over TLS:
``username`` and the password), ``none``.  The backend's ``tls`` section
(the core's modes) checks an X509 VeNCrypt server's certificate.

Role key ``desktop`` (with ``desktops``): ``{"view_only": bool,
"clipboard": {"to_server": bool, "to_client": bool}}``; see ``policy.py``.
"""

from __future__ import annotations

from typing import Any

from dbproxy.terminal.config import validate_recording

LISTENER_KEYS = ("target", "recording", "audit_keys")
BACKEND_KEYS = ()
AUTH_KEYS = {"username"}
ROLE_KEYS = {"view_only", "clipboard"}
CLIPBOARD_KEYS = {"to_server", "to_client"}


def validate_listener(v: Any, d: dict, path: str) -> dict:
    extra: dict = {}
    if "target" in d:
        target = v.string(d, "target", path)
        if target is not None:
            extra["target"] = target
    validate_recording(v, d, path, extra)
    extra["audit_keys"] = v.boolean(d, "audit_keys", path)
    if "auth" not in d:
        v.err(path, 'a key "auth": {"methods": ["token"]} (VNC viewers prove who they are with a proxy token '
                    'over VeNCrypt, or with a one-time code)')
    return extra


def validate_auth(v: Any, method: str, ad: dict, path: str) -> dict:
    allowed = {"method"} | ({"password_file", "password_env"} if method != "none" else set()) | \
        (AUTH_KEYS if method == "plain" else set())
    for k in sorted(k for k in ad if k not in allowed):
        v.err(f"{path}.{k}", f"no key {k!r} for method {method} (allowed: {', '.join(sorted(allowed - {'method'}))})")
    if method == "plain":
        username = v.string(ad, "username", path)
        return {"username": username} if username is not None else {}
    return {}


def validate_backend(v: Any, d: dict, path: str) -> dict:
    for k in ("database", "user"):
        if k in d:
            v.err(f"{path}.{k}", f'no key {k!r} for a VNC backend (a VeNCrypt Plain user name is "auth.username")')
    return {}


def validate_role_key(key: str, v: Any, value: Any, path: str) -> Any:
    d = v.section(value, path, ROLE_KEYS, 'an object {"view_only": bool, "clipboard": {"to_server": bool, '
                                          '"to_client": bool}}')
    if d is None:
        return None
    clipboard = {"to_server": False, "to_client": False}
    if "clipboard" in d:
        cp = f"{path}.clipboard"
        cd = v.section(d["clipboard"], cp, CLIPBOARD_KEYS, 'an object {"to_server": bool, "to_client": bool}')
        if cd is not None:
            for k in CLIPBOARD_KEYS:
                clipboard[k] = v.boolean(cd, k, cp)
    return {"view_only": v.boolean(d, "view_only", path), **clipboard}
