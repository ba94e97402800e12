"""The SSH engine's configuration and the client's user name (no trio, no asyncssh at import).

Strategy: the core's validator (``dbproxy.config``) calls the engine class's
hooks for the keys it owns — listener ``host_key_file``; backend ``login`` and
``host_key.known_hosts_file``; backend ``auth`` ``publickey`` (``key_file``),
``password`` (``password_file`` / ``password_env``, checked by the core) or
``certificate`` (``ca_key_file``, ``validity_seconds``) —
and every problem is reported with the file, JSON path and expectation, like
the rest of the config.  Key files are parsed here (asyncssh's own reader), so
an unreadable or encrypted key is a config error, not a failed session.

The client names the account and the host it wants in its SSH user name,
``LOGIN@TARGET`` (``ssh deploy@web-1@proxy``): split at the *last* ``@``, since
a host name never holds one and some logins do (``alice@corp@web-1``).
"""

from __future__ import annotations

import os
from typing import Any

from dbproxy.terminal.config import BadUserName, UserName, parse_login_target, validate_idle_timeout, \
    validate_recording

LISTENER_KEYS = ("host_key_file", "recording", "env_allow", "keepalive_seconds", "keepalive_count_max",
                 "idle_timeout_seconds")
BACKEND_KEYS = ("login", "host_key")
HOST_KEY_KEYS = {"known_hosts_file"}
AUTH_KEYS = {"publickey": {"key_file"}, "password": set(), "certificate": {"ca_key_file", "validity_seconds"}}
# A per-session certificate is valid this long by default (it only has to outlive the login).
DEFAULT_CERT_VALIDITY = 300
MAX_CERT_VALIDITY = 24 * 3600


def parse_user(name: str) -> UserName:
    """``LOGIN@TARGET`` → (login, target); split at the last ``@`` (``dbproxy.terminal.config``)."""
    return parse_login_target(name, "SSH user name")


def _private_key_problem(path: str) -> str | None:
    """None when asyncssh reads *path* as an unencrypted private key, else why not."""
    import asyncssh  # imported on use: config validation of other protocols does not pay for it

    try:
        asyncssh.read_private_key(path)
    except (OSError, ValueError, asyncssh.KeyImportError) as exc:
        return f"an unencrypted OpenSSH private key, but {path} could not be read: {exc}"
    return None


def validate_listener(v: Any, d: dict, path: str) -> dict:
    """``host_key_file`` (the proxy's own host key) and an ``auth`` naming the token method."""
    extra: dict = {}
    _key_file(v, d, "host_key_file", path, extra)
    validate_recording(v, d, path, extra)
    if "env_allow" in d:
        # Environment variables the client sends (RFC 4254 §6.4) that reach the target: globs on the
        # name; none by default (LD_PRELOAD, BASH_ENV… change what the target runs).
        globs = d["env_allow"]
        if not isinstance(globs, list) or not all(isinstance(g, str) and g for g in globs):
            v.err(f"{path}.env_allow", "an array of non-empty name globs (e.g. [\"LANG\", \"LC_*\"])")
        else:
            extra["env_allow"] = tuple(globs)
    # Keepalives (the proxy asks the client, RFC 4254 §4 global request "keepalive@openssh.com"):
    # a client that stops answering ``keepalive_count_max`` in a row is disconnected.
    keepalive = v.number(d, "keepalive_seconds", path, minimum=0.1)
    if keepalive is not None:
        extra["keepalive_seconds"] = keepalive
    count = v.integer(d, "keepalive_count_max", path, minimum=1)
    if count is not None:
        if keepalive is None:
            v.err(f"{path}.keepalive_count_max", 'a "keepalive_seconds" too (no keepalives are sent without it)')
        extra["keepalive_count_max"] = count
    # Idle timeout: no channel data either way for this long closes the session (keepalives and
    # other SSH-level messages do not count as activity).
    validate_idle_timeout(v, d, path, extra)
    if "auth" not in d:
        # Without it the core would make the listener anonymous: an SSH proxy that lets anyone
        # in with its own keys to the targets is never what is meant.
        v.err(path, 'a key "auth": {"methods": ["token"]} (SSH clients prove who they are with a proxy token)')
    return extra


def _key_file(v: Any, ad: dict, key: str, path: str, params: dict) -> None:
    """``ad[key]``, a private key file asyncssh reads, into ``params[key]``; else a config error at its path."""
    found = v.file_path(ad, key, path)
    if found is None:
        return
    problem = _private_key_problem(found)
    if problem:
        v.err(f"{path}.{key}", problem)
    else:
        params[key] = found


def _no_password(v: Any, ad: dict, path: str, method: str, why: str) -> None:
    """A key-based method takes no password: each password key given is an error naming ``why``."""
    for k in ("password_file", "password_env"):
        if k in ad:
            v.err(f"{path}.{k}", f"no password for method {method} ({why})")


def validate_auth(v: Any, method: str, ad: dict, path: str) -> dict:
    params: dict = {}
    allowed = AUTH_KEYS.get(method, set())
    for k in sorted(k for k in ad if k not in {"method", "password_file", "password_env"} | allowed):
        v.err(f"{path}.{k}", f"no key {k!r} for method {method}" + (f" (allowed: {', '.join(sorted(allowed))})" if allowed else ""))
    if method == "publickey":
        _key_file(v, ad, "key_file", path, params)
        _no_password(v, ad, path, "publickey", "the key file is the credential")
    if method == "certificate":
        # The proxy's user CA: it signs a short-lived certificate for each session (the target's
        # sshd trusts the CA with TrustedUserCAKeys; the certificate's principal is the login).
        _key_file(v, ad, "ca_key_file", path, params)
        validity = v.integer(ad, "validity_seconds", path, minimum=30)
        if validity is not None and validity > MAX_CERT_VALIDITY:
            v.err(f"{path}.validity_seconds", f"at most {MAX_CERT_VALIDITY} seconds (a per-session certificate), got {validity}")
            validity = None
        params["validity_seconds"] = validity or DEFAULT_CERT_VALIDITY
        _no_password(v, ad, path, "certificate", "the CA key signs the credential")
    return params


def validate_backend(v: Any, d: dict, path: str) -> dict:
    """``login`` (default: the login the client asked for) and ``host_key.known_hosts_file`` (required:
    the target's host key is always verified)."""
    extra: dict = {}
    if "user" in d:
        v.err(f"{path}.user", 'the key "login" (the account on the target host)')
    login = v.string(d, "login", path, required=False)
    if login is not None:
        extra["login"] = login
    if "database" in d:
        v.err(f"{path}.database", "no key 'database' for an SSH backend")
    hp = f"{path}.host_key"
    if "host_key" not in d:
        v.err(path, 'a key "host_key": {"known_hosts_file": …} (the target\'s host key is always verified)')
        return extra
    hd = v.obj(d["host_key"], hp)
    if hd is None:
        return extra
    v.unknown_keys(hd, HOST_KEY_KEYS, hp)
    known = v.file_path(hd, "known_hosts_file", hp)
    if known is not None:
        problem = _known_hosts_problem(known)
        if problem:
            v.err(f"{hp}.known_hosts_file", problem)
        else:
            extra["known_hosts_file"] = known
    return extra


def _known_hosts_problem(path: str) -> str | None:
    import asyncssh

    try:
        asyncssh.read_known_hosts(path)
    except (OSError, ValueError) as exc:
        return f"an OpenSSH known_hosts file, but {path} could not be read: {exc}"
    if os.path.getsize(path) == 0:
        return f"an OpenSSH known_hosts file naming the target's host key, but {path} is empty"
    return None
