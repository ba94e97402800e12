"""A real RDP server (Debian's xrdp 0.9.21) as the target of the RDP tests, and the xfreerdp client.

Strategy: ``xrdp -n -c DIR/xrdp.ini`` in the foreground (our child, its own
process group) on a free loopback port, with a private config derived from
the package's ``/etc/xrdp/xrdp.ini``: its own TLS certificate and key (RSA,
made with openssl), its own log file, no syslog.  xrdp forks one child per
connection (``fork=true``); ``stop()`` ends the group.  In the foreground
(``-n``) neither xrdp nor sesman writes a pid file: our child processes
(``scripts.peers.process.PeerProcess``, one for xrdp, one for sesman) are
the handles (so several xrdp instances can run side by side).

Credentials.  xrdp 0.9 offers TLS and Standard RDP Security, not CredSSP
(NLA): it checks a login *after* the RDP connection is up, by asking
``xrdp-sesman`` (PAM).  So ``xfreerdp /auth-only`` — which stops once the
connection sequence completes, before xrdp has asked sesman — exits 0
whatever the password (checked by hand: 0 with the right password and with a
wrong one); what it proves is that the whole sequence (X.224, TLS, MCS,
licensing, capabilities) went through.  Whether a password was accepted is
seen by running xfreerdp fully (under Xvfb) and reading xrdp's log: ``login
successful for user U`` or ``login failed for user U`` (``Xrdp.wait_login``).
For that, ``with_sesman=True`` also runs ``xrdp-sesman -n -c DIR/sesman.ini``
with a private config whose X servers are ``/bin/false``: PAM checks the
password, then the desktop session fails to start at once (nothing of a
desktop is needed).  xrdp finds sesman on the port of the *installed*
``/etc/xrdp/sesman.ini`` (compiled in: ``XRDP_CFG_PATH``), so there is one
sesman per machine, on that port (3350); the tests that need it start one.

The account: a local user ``dbprdp`` (no login shell, a home for sesman's
``.Xauthority``) with this machine's random password for it
(``scripts.peers.accounts``) — idempotent, root only.

Runnable: ``python -m scripts.peers.xrdp [DIR]`` prints the connection info
as JSON and waits for Ctrl-C.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import attrs

from scripts.peers import free_port, wait_for_tcp
from scripts.peers.accounts import ensure_account
from scripts.peers.process import PeerProcess, run_in_foreground

__all__ = ["Xrdp", "Xvfb", "TEST_USER", "ensure_user", "start_xrdp", "start_xvfb", "xfreerdp", "xfreerdp_command",
           "xrdp_bin"]

TEST_USER = "dbprdp"
SYSTEM_SESMAN_INI = Path("/etc/xrdp/sesman.ini")


def xrdp_bin() -> str:
    for name in ("xrdp", "xrdp-sesman", "xfreerdp", "Xvfb", "openssl"):
        if shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:" + os.environ.get("PATH", "")) is None:
            raise FileNotFoundError(f"{name} not found: run scripts/install/rdp.sh (xrdp, freerdp2-x11, xvfb)")
    return shutil.which("xrdp", path="/usr/sbin:/usr/bin:" + os.environ.get("PATH", ""))  # type: ignore[return-value]


def ensure_user(name: str) -> str:
    """The local account ``name`` (no login shell, a home); returns its password (scripts.peers.accounts)."""
    return ensure_account(name, shell="/usr/sbin/nologin", prefix="Rp-")


def sesman_port() -> int:
    """The port xrdp looks for sesman on (the installed sesman.ini's ListenPort)."""
    try:
        text = SYSTEM_SESMAN_INI.read_text()
    except FileNotFoundError:
        return 3350
    m = re.search(r"^ListenPort=(\d+)", text, re.M)
    return int(m.group(1)) if m else 3350


def _ini(source: Path, replace: dict[str, dict[str, str]]) -> str:
    """``source`` with the ``key=`` lines of ``replace[section]`` rewritten in that section only
    (xrdp's ini files repeat keys — ``param=``, a module's ``port=-1`` — which configparser would
    refuse: a line edit keeps them)."""
    out = []
    section = ""
    for line in source.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            section = stripped[1:-1]
        key = line.split("=", 1)[0].strip()
        keys = replace.get(section, {})
        if "=" in line and not stripped.startswith((";", "#")) and key in keys:
            line = f"{key}={keys[key]}"
        out.append(line)
    return "\n".join(out) + "\n"


def _sesman_listening() -> bool:
    """Is anything on sesman's port?  sesman (xrdp's own bind code) turns ``ListenAddress=127.0.0.1``
    into ``[::1]`` — or ``[::ffff:127.0.0.1]`` when ``[::1]`` is taken — so both are tried."""
    for host in ("::1", "127.0.0.1"):
        try:
            socket.create_connection((host, sesman_port()), timeout=1).close()
            return True
        except OSError:
            pass
    return False


def _wait_for_sesman(timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not _sesman_listening():
        if proc.poll() is not None:
            raise RuntimeError(f"xrdp-sesman exited with code {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"xrdp-sesman is not listening on port {sesman_port()} after {timeout}s")
        time.sleep(0.05)


@attrs.define(eq=False)
class _Sesman(PeerProcess):
    """``xrdp-sesman -n``, beside its xrdp: the same life, its output in xrdp's ``xrdp.out``."""

    _proc: subprocess.Popen | None = None
    _stop_signal_group = True
    # Its per-session children wait for an X server that never came, and ignore SIGTERM.
    _kill_group_after_stop = True
    _log_files = ()


@attrs.define(eq=False)
class Xrdp(PeerProcess):
    dir: Path
    port: int
    login: str
    password: str
    host: str = "127.0.0.1"
    with_sesman: bool = False
    _proc: subprocess.Popen | None = None
    _sesman: _Sesman | None = None
    _stop_signal_group = True  # xrdp and its per-connection children
    _kill_group_after_stop = True
    _log_files = ("log_file", "out_file")  # log_text: xrdp's own log (wait_login reads it)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.dir / "xrdp.log"

    @property
    def out_file(self) -> Path:
        """xrdp's and sesman's stdout and stderr."""
        return self.dir / "xrdp.out"

    def _configure(self) -> None:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "7",
                        "-subj", "/CN=localhost", "-keyout", str(self.dir / "key.pem"),
                        "-out", str(self.dir / "cert.pem")], check=True, capture_output=True,
                       stdin=subprocess.DEVNULL)
        (self.dir / "xrdp.ini").write_text(_ini(Path("/etc/xrdp/xrdp.ini"), {
            "Globals": {"port": f"tcp://{self.host}:{self.port}", "certificate": str(self.dir / "cert.pem"),
                        "key_file": str(self.dir / "key.pem"), "fork": "true"},
            "Logging": {"LogFile": str(self.log_file), "EnableSyslog": "false"},
        }))
        # The X servers sesman would start: /bin/false, so a login that PAM accepted ends there.
        sesman = _ini(SYSTEM_SESMAN_INI, {"Logging": {"LogFile": str(self.dir / "sesman.log"), "EnableSyslog": "false"},
                                          "ChansrvLogging": {"EnableSyslog": "false"}})
        sesman = sesman.replace("param=/usr/lib/xorg/Xorg", "param=/bin/false").replace("param=Xvnc", "param=/bin/false")
        (self.dir / "sesman.ini").write_text(sesman)

    def start(self, timeout: float = 15.0) -> "Xrdp":
        self._configure()
        self._spawn([xrdp_bin(), "-n", "-c", str(self.dir / "xrdp.ini")], log=self.out_file, cwd=self.dir,
                    new_session=True)
        if self.with_sesman:
            if _sesman_listening():
                self.stop()
                raise RuntimeError(f"port {sesman_port()} (xrdp's sesman port, from {SYSTEM_SESMAN_INI}) is taken: "
                                   "another xrdp-sesman running? (there can be one per machine)")
            self._sesman = _Sesman()
            self._sesman._spawn(["xrdp-sesman", "-n", "-c", str(self.dir / "sesman.ini")], log=self.out_file,
                                cwd=self.dir, new_session=True)
        try:
            wait_for_tcp(self.host, self.port, timeout=timeout, proc=self._proc)
            if self._sesman is not None:
                _wait_for_sesman(timeout, self._sesman._proc)
        except Exception as exc:
            self.stop()
            raise RuntimeError(f"xrdp did not start: {exc}\n{self.log_text()}") from None
        return self

    def stop(self, timeout: float | None = None) -> None:
        super().stop(timeout)
        if self._sesman is not None:
            self._sesman.stop(timeout)

    def kill(self) -> None:
        super().kill()
        if self._sesman is not None:
            self._sesman.kill()

    def wait_login(self, user: str, since: int = 0, timeout: float = 30.0) -> str:
        """``"successful"`` or ``"failed"``: xrdp's verdict on ``user``'s login (after ``since``
        bytes of its log), once sesman answered."""
        pattern = re.compile(rf"login (successful|failed) for user {re.escape(user)}\b")
        deadline = time.monotonic() + timeout
        while True:
            m = pattern.search(self.log_text()[since:])
            if m:
                return m.group(1)
            if time.monotonic() > deadline:
                raise TimeoutError(f"xrdp logged no login verdict for {user} in {timeout}s:\n{self.log_text()[since:]}")
            time.sleep(0.1)

    def info(self) -> dict:
        return {"host": self.host, "port": self.port, "login": self.login, "password": self.password,
                "dir": str(self.dir)}


@attrs.define(eq=False)
class Xvfb(PeerProcess):
    """One Xvfb for many xfreerdp runs (``xvfb-run -a`` per client races for display numbers when
    clients start together).  Its output is discarded."""

    display: str
    _proc: subprocess.Popen | None = None
    _log_files = ()


def start_xvfb(first: int = 140, tries: int = 40) -> Xvfb:
    """Xvfb on the first free display number from ``first`` (its lock file and socket absent)."""
    for n in range(first, first + tries):
        if Path(f"/tmp/.X{n}-lock").exists() or Path(f"/tmp/.X11-unix/X{n}").exists():
            continue
        xvfb = Xvfb(display=f":{n}")
        xvfb._spawn(["Xvfb", f":{n}", "-nolisten", "tcp", "-screen", "0", "1024x768x24"], log=None)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and xvfb.running():
            if Path(f"/tmp/.X11-unix/X{n}").exists():
                return xvfb
            time.sleep(0.05)
        xvfb.kill()
    raise RuntimeError(f"no Xvfb display could start in :{first}..:{first + tries - 1}")


def xfreerdp_command(address: str, *args: str, auth_only: bool = True) -> list[str]:
    """The xfreerdp command line against ``address`` (HOST:PORT); ``/cert:ignore`` since the test
    server's certificate is self-signed."""
    command = ["xfreerdp", f"/v:{address}", "/cert:ignore", *args]
    if auth_only:
        command.append("/auth-only")
    return command


def xfreerdp(address: str, *args: str, display: str, timeout: float = 60.0,
             auth_only: bool = True) -> subprocess.CompletedProcess:
    """Run xfreerdp to its end (``/auth-only`` by default) on X display ``display``: it is an X
    client even when it never draws."""
    return subprocess.run(["timeout", str(timeout), *xfreerdp_command(address, *args, auth_only=auth_only)],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          env=dict(os.environ, DISPLAY=display))


def start_xrdp(base_dir: str | Path, *, user: str = TEST_USER, with_sesman: bool = False) -> Xrdp:
    """The test user (with a fresh random password) and a running xrdp under *base_dir* on a free port."""
    xrdp_bin()
    base = Path(base_dir)
    base.mkdir(parents=True, exist_ok=True)
    dir = Path(tempfile.mkdtemp(prefix="xrdp-", dir=base))
    password = ensure_user(user)
    last: Exception | None = None
    for _ in range(5):
        server = Xrdp(dir=dir, port=free_port(), login=user, password=password, with_sesman=with_sesman)
        try:
            return server.start()
        except RuntimeError as exc:  # the port was taken meanwhile: another one
            last = exc
    raise RuntimeError(f"xrdp did not start: {last}")


if __name__ == "__main__":
    sys.exit(run_in_foreground(lambda base: start_xrdp(base, with_sesman=True), sys.argv[1] if len(sys.argv) > 1
                               else None, prefix="xrdp-peer-"))
