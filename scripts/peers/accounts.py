"""Local test accounts for peers that log in through PAM/login (telnetd, xrdp).

Strategy: one account per peer kind (``dbptelnet``, ``dbprdp``), created once
with ``useradd`` (root only), and a random password that stays the same on
this machine: it is kept in a root-only file under ``~/.cache/dbproxy/accounts``
and set with ``chpasswd`` on every start.  Several test runs on one machine
(worktrees, a CI run beside a developer's) share the system's account: a fresh
password per start would change it under the other runs' live sessions, and
their logins would fail for no reason of their own.
"""

from __future__ import annotations

import fcntl
import os
import pwd
import secrets
import subprocess
from pathlib import Path

__all__ = ["ensure_account"]

STATE_DIR = Path.home() / ".cache" / "dbproxy" / "accounts"


def _stable_password(name: str, prefix: str) -> str:
    STATE_DIR.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = STATE_DIR / name
    with open(STATE_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return path.read_text().strip()
        except FileNotFoundError:
            password = prefix + secrets.token_urlsafe(12)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(password + "\n")
            return password


def ensure_account(name: str, *, shell: str, prefix: str, quiet_login: bool = False) -> str:
    """The local account ``name`` exists with ``shell`` and this machine's password for it (returned).
    Idempotent; needs root.  ``quiet_login``: a ``.hushlogin`` (no MOTD / last-login lines)."""
    if os.geteuid() != 0:
        raise PermissionError(f"the test account {name!r} is a local user: run as root")
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", shell, name], check=True, capture_output=True)
    password = _stable_password(name, prefix)
    subprocess.run(["chpasswd"], input=f"{name}:{password}\n", text=True, check=True, capture_output=True)
    if quiet_login:
        (Path(pwd.getpwnam(name).pw_dir) / ".hushlogin").touch()
    return password
