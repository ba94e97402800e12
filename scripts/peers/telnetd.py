"""A real Telnet server (Debian's inetutils-telnetd) with a real login, as the target of the Telnet tests.

Strategy: inetutils ``telnetd`` is inetd-style — it serves the one connection
on its standard input.  Instead of a system inetd, a small accept loop of
ours (``python -m scripts.peers.telnetd --serve HOST PORT``, our child
process) listens on a free loopback port and starts one ``telnetd -h`` per
connection with the socket as its stdin/stdout.  telnetd runs the real
``/bin/login`` (PAM, /etc/shadow) at a real pty, so the proxy meets a real
``login:`` / ``Password:`` dialogue, a real shell, real echo and NAWS.

The account: a local user ``dbptelnet`` with a bash shell and a random
password, created (``useradd``) and given the password (``chpasswd``) each
time a peer starts — idempotent, root only (the tests run as root here and on
CI).  ``stop()`` ends the accept loop and every telnetd it started (its
process group).

Runnable: ``python -m scripts.peers.telnetd [DIR]`` prints the connection info
as JSON and waits for Ctrl-C.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import attrs

from scripts.peers import free_port, wait_for_interrupt, wait_for_tcp
from scripts.peers.accounts import ensure_account
from scripts.peers.process import PeerProcess

__all__ = ["Telnetd", "TEST_USER", "telnetd_bin", "start_telnetd", "ensure_user"]

TEST_USER = "dbptelnet"


def telnetd_bin() -> str:
    found = shutil.which("telnetd", path="/usr/sbin:/usr/bin:/sbin:" + os.environ.get("PATH", ""))
    if found is None:
        raise FileNotFoundError("telnetd not found: run scripts/install/telnet.sh (inetutils-telnetd)")
    return found


def ensure_user(name: str) -> str:
    """The local account ``name`` with a bash shell; returns its password (scripts.peers.accounts).
    A quiet, fixed environment for the tests: no MOTD/last-login noise, a known prompt."""
    return ensure_account(name, shell="/bin/bash", prefix="Tp-", quiet_login=True)


@attrs.define(eq=False)
class Telnetd(PeerProcess):
    dir: Path
    port: int
    login: str
    password: str
    host: str = "127.0.0.1"
    _proc: subprocess.Popen | None = None
    _stop_signal_group = True  # the loop and the telnetd/login/shells it started

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.dir / "telnetd.log"

    def start(self, timeout: float = 10.0) -> "Telnetd":
        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self._spawn([sys.executable, "-m", "scripts.peers.telnetd", "--serve", self.host, str(self.port)],
                    log=self.log_file, env=env, cwd=root, new_session=True)
        try:
            wait_for_tcp(self.host, self.port, timeout=timeout, proc=self._proc)
        except Exception as exc:
            raise RuntimeError(f"telnetd accept loop did not start: {exc}\n{self.log_text()}") from None
        return self

    def info(self) -> dict:
        return {"host": self.host, "port": self.port, "login": self.login, "password": self.password,
                "dir": str(self.dir)}


def serve(host: str, port: int) -> None:
    """The accept loop: one ``telnetd -h`` per connection, the socket as its stdin and stdout."""
    binary = telnetd_bin()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(128)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # telnetd children are reaped by the kernel
    while True:
        conn, _ = listener.accept()
        try:
            # -h: no host information before the login (a fixed, short banner)
            subprocess.Popen([binary, "-h"], stdin=conn.fileno(), stdout=conn.fileno(), stderr=subprocess.DEVNULL,
                             close_fds=True)
        finally:
            conn.close()


def start_telnetd(base_dir: str | Path, *, port: int | None = None, user: str = TEST_USER) -> Telnetd:
    """The test user (this machine's password for it) and a running telnetd under *base_dir* on a free port."""
    telnetd_bin()
    base = Path(base_dir)
    base.mkdir(parents=True, exist_ok=True)
    dir = Path(tempfile.mkdtemp(prefix="telnetd-", dir=base))
    password = ensure_user(user)
    for _ in range(5):
        chosen = port or free_port()
        server = Telnetd(dir=dir, port=chosen, login=user, password=password)
        try:
            return server.start()
        except RuntimeError:
            if port is not None or "Address already in use" not in server.log_text():
                raise
    raise RuntimeError("telnetd: no free port after 5 tries")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--serve":
        serve(sys.argv[2], int(sys.argv[3]))
        sys.exit(0)
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="dbproxy-telnetd-"))
    peer = start_telnetd(target)
    print(json.dumps(peer.info(), indent=2), flush=True)
    try:
        wait_for_interrupt()
    finally:
        peer.stop()
