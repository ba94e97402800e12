"""A private OpenSSH sshd (Debian's openssh-server) as the target host of the SSH tests.

Strategy: ``sshd -D -e -f CONF`` as our child process with a config of our
own (never /etc/ssh) under a directory the caller owns:

- its own ed25519 host key (``host_key``) and a ``known_hosts`` line for it
  (``known_hosts``: what the proxy verifies the target against);
- one client key pair (``client_key``) authorized for ``login`` — the user
  running the tests (root on CI) — the credential only the proxy holds;
- a user CA (``user_ca``, private key) whose certificates sshd accepts
  (``TrustedUserCAKeys``; the certificate's principal must be the login);
- ``UsePAM no`` (Debian's PAM stack wants a real login session),
  ``StrictModes no`` (pytest's temporary folders are not 0700 all the way
  up), public-key authentication only, the sftp subsystem, TCP forwarding
  allowed (so a refused forward in a test is the proxy's refusal, not sshd's).

sshd's privilege separation needs ``/run/sshd`` to exist (created when we are
root).  ``stop()`` terminates it.

Runnable: ``python -m scripts.peers.sshd [DIR]`` prints the connection info as
JSON and waits for Ctrl-C.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import attrs

from scripts.peers import free_port, wait_for_interrupt, wait_for_tcp
from scripts.peers.process import PeerProcess

__all__ = ["Sshd", "sshd_bin", "start_sshd", "make_key"]

SFTP_SERVER_CANDIDATES = ("/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server", "/usr/libexec/sftp-server")


def sshd_bin() -> str:
    found = shutil.which("sshd", path="/usr/sbin:/usr/bin:/sbin:" + os.environ.get("PATH", ""))
    if found is None:
        raise FileNotFoundError("sshd not found: run scripts/install/ssh.sh")
    return found


def make_key(path: Path, comment: str = "dbproxy-test") -> Path:
    """An unencrypted ed25519 key pair at *path* (+ ``.pub``) made by ssh-keygen."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)], check=True,
                   stdin=subprocess.DEVNULL)
    return path


@attrs.define(eq=False)
class Sshd(PeerProcess):
    dir: Path
    port: int
    login: str
    host_key: Path
    client_key: Path
    known_hosts: Path
    user_ca: Path | None = None  # a user CA's private key; sshd trusts its certificates (TrustedUserCAKeys)
    host: str = "127.0.0.1"
    _proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.dir / "sshd.log"

    def start(self, timeout: float = 10.0) -> "Sshd":
        self._spawn([sshd_bin(), "-D", "-e", "-f", str(self.dir / "sshd_config")], log=self.log_file)
        try:
            wait_for_tcp(self.host, self.port, timeout=timeout, proc=self._proc)
        except Exception as exc:
            raise RuntimeError(f"sshd did not start: {exc}\n{self.log_text()}") from None
        return self

    def info(self) -> dict:
        return {"host": self.host, "port": self.port, "login": self.login, "client_key": str(self.client_key),
                "known_hosts": str(self.known_hosts), "dir": str(self.dir)}


def _config(dir: Path, port: int, host_key: Path, authorized: Path, login: str, user_ca: Path, *,
            sftp: str | None = None, extra: tuple[str, ...] = ()) -> str:
    sftp = sftp or next((p for p in SFTP_SERVER_CANDIDATES if os.path.exists(p)), "internal-sftp")
    return "\n".join([
        *extra,  # first: for most keywords sshd keeps the first value it reads (sshd_config(5))
        f"ListenAddress 127.0.0.1:{port}",
        f"HostKey {host_key}",
        f"PidFile {dir / 'sshd.pid'}",
        f"AuthorizedKeysFile {authorized}",
        f"TrustedUserCAKeys {user_ca}.pub",
        "UsePAM no",
        "StrictModes no",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password" if login == "root" else "PermitRootLogin no",
        f"AllowUsers {login}",
        "AllowTcpForwarding yes",
        "X11Forwarding no",
        "PrintMotd no",
        "PrintLastLog no",
        "UseDNS no",
        # Every session through the proxy is a new connection from one address: sshd's default
        # MaxStartups (10:30:100) drops some of 50 sessions starting at once (test_ssh_scale.py).
        "MaxStartups 200",
        "LogLevel VERBOSE",
        "AcceptEnv LANG LC_*",
        f"Subsystem sftp {sftp}",
        "",
    ])


def start_sshd(base_dir: str | Path, *, port: int | None = None, sftp: str | None = None,
               extra: Sequence[str] = ()) -> Sshd:
    """Keys, config and a running sshd under *base_dir* on a free loopback port.

    *sftp*: the ``Subsystem sftp`` command instead of the system's sftp-server; *extra*: more
    sshd_config lines (e.g. ``Ciphers …``), placed first so they win over the defaults here.
    scripts/bench/ssh uses both for a relaying middle host (its "openssh-hop" target)."""
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    base = Path(base_dir)
    base.mkdir(parents=True, exist_ok=True)
    dir = Path(tempfile.mkdtemp(prefix="sshd-", dir=base))
    login = pwd.getpwuid(os.geteuid()).pw_name
    host_key = make_key(dir / "host_ed25519", "dbproxy-test-host")
    client_key = make_key(dir / "client_ed25519", "dbproxy-proxy-credential")
    user_ca = make_key(dir / "user_ca", "dbproxy-test-user-ca")
    authorized = dir / "authorized_keys"
    authorized.write_text((dir / "client_ed25519.pub").read_text())
    os.chmod(authorized, 0o600)
    for _ in range(5):
        chosen = port or free_port()
        known_hosts = dir / "known_hosts"
        pub = (dir / "host_ed25519.pub").read_text().split()
        known_hosts.write_text(f"[127.0.0.1]:{chosen} {pub[0]} {pub[1]}\n")
        (dir / "sshd_config").write_text(_config(dir, chosen, host_key, authorized, login, user_ca, sftp=sftp,
                                                          extra=tuple(extra)))
        server = Sshd(dir=dir, port=chosen, login=login, host_key=host_key, client_key=client_key,
                      known_hosts=known_hosts, user_ca=user_ca)
        try:
            return server.start()
        except RuntimeError:
            if port is not None or "Address already in use" not in server.log_text():
                raise
            time.sleep(0.1)  # the free port was taken in between: another one
    raise RuntimeError("sshd: no free port after 5 tries")


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="dbproxy-sshd-"))
    sshd = start_sshd(target)
    print(json.dumps(sshd.info(), indent=2), flush=True)
    try:
        wait_for_interrupt()
    finally:
        sshd.stop()
