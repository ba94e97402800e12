"""``identity.publickey``: SSH public keys and OpenSSH user certificates tied to identities.

Strategy: the config names, per user, a file of OpenSSH public keys and the
user's roles, and/or one user CA whose certificates name the user as a
principal.  The files are read with asyncssh (imported on use, so the core
loads it only when such a section exists) at load time, so a key it cannot
parse is a config error naming the file and line; the SSH engine checks keys
and signatures during the client's login.
"""

from __future__ import annotations

from typing import Any

import attrs

PUBLICKEY_KEYS = {"users", "user_ca_file"}
PUBLICKEY_USER_KEYS = {"roles", "authorized_keys_file"}


@attrs.frozen
class PublicKeyConfig:
    """``identity.publickey``: SSH public keys and OpenSSH user certificates tied to identities.

    ``users``: (user, roles, authorized_keys_file or None) — a key in the user's file proves the
    user; ``user_ca_file``: the public key of a user CA whose certificates name the user as a
    principal (the engine that speaks the key format — SSH — checks keys and signatures).
    """

    users: tuple[tuple[str, tuple[str, ...], str | None], ...] = ()
    user_ca_file: str | None = None



def _public_keys_problem(asyncssh: Any, path: str) -> str | None:
    """None when every line of *path* is a plain OpenSSH public key (``TYPE BASE64 [COMMENT]``)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [(n, line.strip()) for n, line in enumerate(f, 1)]
    except (OSError, UnicodeDecodeError) as exc:
        return f"a file of OpenSSH public keys, but {path} could not be read: {exc}"
    found = False
    for n, line in lines:
        if not line or line.startswith("#"):
            continue
        try:
            asyncssh.import_public_key(line)
        except (ValueError, asyncssh.KeyImportError) as exc:
            # authorized_keys options (from=, command=…) would not be enforced: not accepted.
            return f"one OpenSSH public key per line (TYPE BASE64 [COMMENT], no options), but {path} line {n} is not: {exc}"
        found = True
    return None if found else f"at least one OpenSSH public key, but {path} has none"


def validate_publickey(v: Any, raw: Any, path: str) -> PublicKeyConfig | None:
    """Files are read with asyncssh (imported on use), so a key it cannot parse is a config error."""
    d = v.section(raw, path, PUBLICKEY_KEYS)
    if d is None:
        return None
    import asyncssh

    users: list[tuple[str, tuple[str, ...], str | None]] = []
    ud = v.obj(d.get("users", {}), f"{path}.users", "an object of user name → {\"roles\", \"authorized_keys_file\"}")
    for user, item in (ud or {}).items():
        up = f"{path}.users.{user}"
        entry = v.section(item, up, PUBLICKEY_USER_KEYS)
        if entry is None:
            continue
        roles = entry.get("roles")
        if not isinstance(roles, list) or not all(isinstance(r, str) and r for r in roles):
            v.err(f"{up}.roles" if "roles" in entry else up, "a key \"roles\": an array of role names")
            continue
        keys = v.file_path(entry, "authorized_keys_file", up, required=False)
        if keys is not None:
            problem = _public_keys_problem(asyncssh, keys)
            if problem:
                v.err(f"{up}.authorized_keys_file", problem)
                continue
        users.append((user, tuple(roles), keys))
    ca = v.file_path(d, "user_ca_file", path, required=False)
    if ca is not None:
        try:
            asyncssh.read_public_key(ca)
        except (OSError, ValueError, asyncssh.KeyImportError) as exc:
            v.err(f"{path}.user_ca_file", f"an OpenSSH public key (the user CA's .pub), but {ca} could not be read: {exc}")
            ca = None
    if not any(keys for _, _, keys in users) and "user_ca_file" not in d:
        v.err(path, "\"users\" with an \"authorized_keys_file\" and/or a \"user_ca_file\"")
    return PublicKeyConfig(users=tuple(users), user_ca_file=ca)


__all__ = ["PUBLICKEY_KEYS", "PublicKeyConfig", "validate_publickey"]
