"""Real VNC desktops for the tests: TigerVNC's Xtigervnc, or x11vnc on Xvfb, each with an xterm.

Strategy: one supervisor shell per desktop, started in its own session
(``stop()`` ends its process group: ``scripts.peers.process.PeerProcess``),
runs the X server and an xterm on it.
X servers keep a lock file and a socket under ``/tmp`` by display number:
when ``unshare --mount`` works (root, as here and on CI) the supervisor gets
a private ``/tmp`` (a bind mount of the desktop's own folder), so desktops
of parallel test runs never meet there; the display number is random as
well (the abstract X socket is per network namespace).  The VNC port is on
loopback (``-localhost``), with VNC authentication and a random password in
a VNC password file (``vncpasswd -f``); only the proxy is given it.

The xterm shows a known line (``READY_TEXT``) and runs ``cat > typed.txt``:
what a viewer types there lands in the desktop folder's ``typed.txt``
(``typed()``), one line per Enter.  ``flavour``: ``"tigervnc"`` (Xtigervnc,
RFB 3.8, also VeNCrypt if asked) or ``"x11vnc"`` (Xvfb + x11vnc).

Runnable: ``python -m scripts.peers.vnc [DIR] [tigervnc|x11vnc]`` prints the
connection info as JSON and waits for Ctrl-C.
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import attrs

from scripts.peers import free_port, wait_for_tcp
from scripts.peers.process import PeerProcess, run_in_foreground

__all__ = ["Desktop", "start_desktop", "vnc_binaries", "READY_TEXT", "tigervnc_viewer_screenshot"]

READY_TEXT = "VNC-PEER-READY"
GEOMETRY = (640, 400)


def vnc_binaries(flavour: str = "tigervnc") -> dict:
    names = {"tigervnc": ("Xtigervnc", "xterm", "vncpasswd"), "x11vnc": ("Xvfb", "x11vnc", "xterm", "vncpasswd")}
    found = {}
    for name in names[flavour]:
        path = shutil.which(name)
        if path is None:
            raise FileNotFoundError(f"{name} not found: run scripts/install/vnc.sh")
        found[name] = path
    return found


def _private_tmp_works() -> bool:
    try:
        done = subprocess.run(["unshare", "--mount", "sh", "-c", "mount -t tmpfs none /mnt 2>/dev/null || "
                               "mount --bind / /mnt"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@attrs.define(eq=False)
class Desktop(PeerProcess):
    dir: Path
    port: int
    password: str
    display: int
    flavour: str = "tigervnc"
    # Xtigervnc's -SecurityTypes (e.g. "TLSVnc", "X509Vnc": VeNCrypt; X509 needs cert files in the folder
    # as server.crt / server.key)
    security: str = "VncAuth"
    host: str = "127.0.0.1"
    _proc: subprocess.Popen | None = None
    _stop_signal_group = True  # the supervisor shell, the X server, x11vnc and the xterm

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.dir / "desktop.log"

    @property
    def password_file(self) -> Path:
        return self.dir / "passwd"

    def typed(self) -> str:
        """What was typed into the xterm (lines ended with Enter)."""
        try:
            return (self.dir / "typed.txt").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def set_clipboard(self, text: str) -> None:
        """An X client on the desktop (the xterm, told by OSC 52) takes the CLIPBOARD selection with
        ``text``: the VNC server then sends it to its viewers (ServerCutText)."""
        import base64

        tty = (self.dir / "tty.txt").read_text().strip()
        with open(tty, "wb") as f:
            # PRIMARY and CLIPBOARD both: the VNC server sends PRIMARY when it has an owner (SendPrimary).
            f.write(b"\x1b]52;pc;" + base64.b64encode(text.encode()) + b"\x07")

    def _script(self, private_tmp: bool) -> str:
        # Paths relative to the supervisor's folder (its cwd, inherited by every child): once /tmp is
        # the private bind mount, a desktop folder under the real /tmp is out of sight by its path.
        d = "."
        n = self.display
        w, h = GEOMETRY
        lines = ["set -e"]
        if private_tmp:
            lines.append("mkdir -p tmp && mount --bind tmp /tmp && mkdir -m 1777 -p /tmp/.X11-unix")
        x509 = "-X509Cert server.crt -X509Key server.key " if "X509" in self.security else ""
        if self.flavour == "tigervnc":
            # -BlacklistThreshold: Xtigervnc blocks an address after a few failed logins; the proxy is one
            # address for every viewer, and a test of a wrong backend password would lock the others out.
            lines.append(f"Xtigervnc :{n} -rfbport {self.port} -localhost -SecurityTypes {self.security} {x509}"
                         f"-PasswordFile {d}/passwd -geometry {w}x{h} -depth 24 -AlwaysShared -AcceptSetDesktopSize=0 "
                         f"-BlacklistThreshold=1000000 -nolisten tcp & X=$!")
        else:
            lines.append(f"Xvfb :{n} -screen 0 {w}x{h}x24 -nolisten tcp & X=$!")
        lines.append(f"for i in $(seq 200); do [ -e /tmp/.X11-unix/X{n} ] && break; sleep 0.05; done")
        lines.append(f"[ -e /tmp/.X11-unix/X{n} ] || {{ echo 'X server did not start'; exit 1; }}")
        if self.flavour == "x11vnc":
            lines.append(f"x11vnc -display :{n} -rfbport {self.port} -localhost -rfbauth {d}/passwd -forever -shared "
                         f"-norc -quiet -nopw -noxdamage & V=$!")
        # A fixed font and no cursor blink: two screenshots of the same state are the same pixels.  OSC 52
        # (set the selection) allowed, for ``set_clipboard``; the terminal's name in tty.txt.
        lines.append(f"DISPLAY=:{n} xterm -geometry 80x20+0+0 -fn fixed -bg white -fg black +bc -xrm "
                     f"'XTerm*cursorBlink: false' -xrm 'XTerm*disallowedWindowOps: 20,21,SetXprop' "
                     f"-e sh -c 'tty > {d}/tty.txt; echo {READY_TEXT}; exec cat > {d}/typed.txt' &")
        lines.append("wait $X")
        return "\n".join(lines)

    def start(self, private_tmp: bool, timeout: float = 20.0) -> "Desktop":
        done = subprocess.run(["vncpasswd", "-f"], input=self.password.encode(), capture_output=True, check=True)
        self.password_file.write_bytes(done.stdout)
        os.chmod(self.password_file, 0o600)
        script = self._script(private_tmp)
        argv = ["unshare", "--mount", "sh", "-c", script] if private_tmp else ["sh", "-c", script]
        self._spawn(argv, log=self.log_file, cwd=self.dir, new_session=True)
        try:
            wait_for_tcp(self.host, self.port, timeout=timeout, proc=self._proc)
        except Exception as exc:
            self.stop()
            raise RuntimeError(f"{self.flavour} desktop did not start: {exc}\n{self.log_text()}") from None
        return self

    def info(self) -> dict:
        return {"host": self.host, "port": self.port, "password": self.password, "display": self.display,
                "flavour": self.flavour, "dir": str(self.dir)}


def tigervnc_viewer_screenshot(workdir: str | Path, server: str, *, args: tuple[str, ...] = (),
                               files: dict | None = None, env: dict | None = None, settle: float = 4.0,
                               timeout: float = 40.0) -> tuple[bytes | None, str]:
    """Run TigerVNC's ``vncviewer`` against ``server`` (``HOST::PORT``) on a private Xvfb, wait ``settle``
    seconds, and capture that X screen with ImageMagick's ``import -window root``: (PNG bytes or None,
    the viewer's log).

    ``files`` (name → bytes) are written to the viewer's folder and ``args`` name them relatively (the
    private /tmp hides absolute paths under /tmp); ``env`` carries what the viewer reads
    non-interactively (``VNC_USERNAME`` / ``VNC_PASSWORD`` for VeNCrypt Plain).  The viewer's window
    sits at the top left of a screen larger than the desktop (no window manager)."""
    work = Path(tempfile.mkdtemp(prefix="viewer-", dir=workdir))
    for name, data in (files or {}).items():
        (work / name).write_bytes(data)
    n = random.randrange(3000, 6000)
    private = _private_tmp_works()
    viewer = " ".join(_q(a) for a in ("vncviewer", server, *args))
    script = "\n".join([
        "mkdir -p tmp && mount --bind tmp /tmp && mkdir -m 1777 -p /tmp/.X11-unix" if private else ":",
        f"Xvfb :{n} -screen 0 1024x768x24 -nolisten tcp > xvfb.log 2>&1 & X=$!",
        f"for i in $(seq 200); do [ -e /tmp/.X11-unix/X{n} ] && break; sleep 0.05; done",
        f"DISPLAY=:{n} {viewer} > viewer.log 2>&1 < /dev/null & V=$!",
        f"sleep {settle}",
        f"DISPLAY=:{n} import -window root shot.png",
        "kill $V $X 2>/dev/null",
    ])
    argv = ["unshare", "--mount", "sh", "-c", script] if private else ["sh", "-c", script]
    proc = subprocess.Popen(argv, cwd=str(work), env=dict(os.environ, **(env or {})), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        proc.wait(timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the viewer and Xvfb, whatever happened
        except ProcessLookupError:
            pass
        proc.wait()
    shot = work / "shot.png"
    log = (work / "viewer.log").read_text(errors="replace") if (work / "viewer.log").exists() else ""
    return (shot.read_bytes() if shot.exists() else None), log


def _q(text: str) -> str:
    import shlex

    return shlex.quote(text)


def start_desktop(base_dir: str | Path, flavour: str = "tigervnc", *, security: str = "VncAuth",
                  cert: tuple[Path, Path] | None = None) -> Desktop:
    """A desktop with an xterm under *base_dir*, on a free loopback port, with a fresh random password.

    ``security``: Xtigervnc's security types; ``cert``: (certificate, key) files for the X509 ones."""
    vnc_binaries(flavour)
    base = Path(base_dir)
    base.mkdir(parents=True, exist_ok=True)
    private_tmp = _private_tmp_works()
    last = None
    for _ in range(5):
        d = Path(tempfile.mkdtemp(prefix=f"{flavour}-", dir=base))
        # VNC passwords are 8 bytes at most (RFC 6143 §7.2.2).
        desktop = Desktop(dir=d, port=free_port(), password=secrets.token_urlsafe(6)[:8],
                          display=random.randrange(100, 3000), flavour=flavour, security=security)
        if cert is not None:
            shutil.copyfile(cert[0], d / "server.crt")
            shutil.copyfile(cert[1], d / "server.key")
        try:
            return desktop.start(private_tmp)
        except RuntimeError as exc:
            last = exc
    raise RuntimeError(f"{flavour}: no desktop after 5 tries: {last}")


if __name__ == "__main__":
    flavour = sys.argv[2] if len(sys.argv) > 2 else "tigervnc"
    sys.exit(run_in_foreground(lambda base: start_desktop(base, flavour), sys.argv[1] if len(sys.argv) > 1 else None,
                               prefix="dbproxy-vnc-", indent=2))
