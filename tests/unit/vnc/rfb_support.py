"""Test support for the VNC framing/render/recording tests: real VNC servers and a tiny direct RFB client.

``VncServer`` starts a real server on a loopback port: Xtigervnc (its own X server,
tigervnc-standalone-server) or x11vnc serving an Xvfb display, with known content drawn
on it (a Pillow-made picture as the root window background — photographic areas make
Tight choose JPEG and gradients — and an xterm with coloured text).  ``RfbCapture`` is a
direct RFB 3.8 client (security None or VNC authentication) that asks for one encoding
list, requests a full update and returns the exact server→client bytes after ServerInit,
so the tests can frame and render what a real server sent.  ``scripts/gen_vnc_fixtures``
is not needed: ``python -m tests.unit.vnc.rfb_support OUTDIR`` regenerates the captured
fixtures in tests/unit/vnc/data/ (see its README).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

from dbproxy.engines.vnc.updates import PixelFormat, ServerStream
from scripts.peers import free_port

DATA = Path(__file__).resolve().parent / "data"
W, H = 250, 170  # not multiples of 16 or 64: partial Hextile/ZRLE tiles at the edges


def free_display() -> int:
    for n in range(40, 400):
        if not os.path.exists(f"/tmp/.X11-unix/X{n}") and not os.path.exists(f"/tmp/.X{n}-lock"):
            return n
    raise RuntimeError("no free X display number")


def picture(path: Path, w: int = W, h: int = H) -> None:
    """A background with a smooth gradient (JPEG/gradient-filter territory), flat blocks and a few colours."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (w, h))
    px = img.load()
    for y in range(h):
        for x in range(w):
            px[x, y] = ((x * 255) // w, (y * 255) // h, ((x + y) * 7) % 256)
    d = ImageDraw.Draw(img)
    d.rectangle([10, 10, 60, 50], fill=(200, 30, 30))
    d.rectangle([70, 10, 120, 50], fill=(30, 200, 30))
    d.ellipse([130, 5, 200, 60], fill=(250, 250, 0), outline=(0, 0, 255))
    img.save(path)


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"VNC server did not listen on {port}")


class VncServer:
    """A real VNC server on 127.0.0.1:``port`` showing known content.  ``kind``: "tigervnc" or "x11vnc"."""

    def __init__(self, kind: str, workdir: Path, *, password: str | None = None) -> None:
        self.kind = kind
        self.workdir = workdir
        self.port = free_port()
        self.display = free_display()
        self.procs: list[subprocess.Popen] = []
        self.password = password
        self.env = {**os.environ, "DISPLAY": f":{self.display}"}

    @staticmethod
    def missing(kind: str) -> str | None:
        need = ["Xtigervnc"] if kind == "tigervnc" else ["Xvfb", "x11vnc"]
        need += ["xterm", "display", "vncpasswd"]
        gone = [b for b in need if shutil.which(b) is None]
        return ", ".join(gone) or None

    def _spawn(self, *argv: str) -> subprocess.Popen:
        log = open(self.workdir / f"{Path(argv[0]).name}-{len(self.procs)}.log", "wb")
        p = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.procs.append(p)
        return p

    def start(self) -> "VncServer":
        self.workdir.mkdir(parents=True, exist_ok=True)
        geometry = f"{W}x{H}"
        pwfile = None
        if self.password is not None:
            pwfile = self.workdir / "passwd"
            subprocess.run(["vncpasswd", "-f"], input=self.password.encode() + b"\n", stdout=open(pwfile, "wb"),
                           check=True)
            pwfile.chmod(0o600)
        if self.kind == "tigervnc":
            sec = ["-SecurityTypes", "VncAuth", "-PasswordFile", str(pwfile)] if pwfile else ["-SecurityTypes", "None"]
            self._spawn("Xtigervnc", f":{self.display}", "-geometry", geometry, "-depth", "24", "-rfbport",
                        str(self.port), "-localhost", "-nolisten", "tcp", "-AlwaysShared", *sec)
            wait_port(self.port)
        else:
            self._spawn("Xvfb", f":{self.display}", "-screen", "0", f"{geometry}x24", "-nolisten", "tcp")
            deadline = time.monotonic() + 10
            while not os.path.exists(f"/tmp/.X11-unix/X{self.display}"):
                if time.monotonic() > deadline:
                    raise RuntimeError("Xvfb did not start")
                time.sleep(0.05)
            auth = ["-rfbauth", str(pwfile)] if pwfile else ["-nopw"]
            self._spawn("x11vnc", "-display", f":{self.display}", "-rfbport", str(self.port), "-localhost",
                        "-forever", "-shared", "-nocursor", "-noxdamage", "-quiet", *auth)
            wait_port(self.port)
        self.draw()
        return self

    def draw(self) -> None:
        bg = self.workdir / "bg.png"
        picture(bg)
        subprocess.run(["display", "-window", "root", str(bg)], env=self.env, check=False, timeout=30)  # exits 1 even when it painted the root
        # An xterm with coloured text, no cursor blink, placed at a fixed spot.
        script = ("printf '\\033[31mred \\033[32mgreen \\033[34mblue\\033[0m\\nhello vnc\\n'; "
                  "stty -echo; exec sleep 100000")
        self._spawn("xterm", "-geometry", "24x4+60+90", "-fa", "", "-fn", "fixed", "-bg", "white", "-fg", "black",
                    "+bc", "-e", "sh", "-c", script)
        time.sleep(1.5)  # let the X clients map and paint

    def popup(self) -> subprocess.Popen:
        """A second small xterm over the picture; returns once it has had time to paint."""
        p = self._spawn("xterm", "-geometry", "12x2+8+120", "-fn", "fixed", "-bg", "#202080", "-fg", "yellow",
                        "+bc", "-e", "sh", "-c", "printf 'popup 42'; stty -echo; exec sleep 100000")
        time.sleep(1.0)
        return p

    def unpopup(self, p: subprocess.Popen) -> None:
        p.terminate()
        p.wait(timeout=5)
        self.procs.remove(p)
        time.sleep(0.5)

    def screenshot(self, path: Path) -> None:
        """vncdotool's own screenshot of the screen (its own connection, Raw pixels).

        Captured twice in one session, the second kept: vncdotool 1.4.2 takes the first rect it
        receives as the whole screen and places it at 0,0 (``updateRectangle``: ``if not
        self.screen: self.screen = update``), so when a server's first rect is not at the
        origin (Xtigervnc's often is not) that area stays black in the first capture; the
        second capture repaints a screen of the right size."""
        first = path.with_name(path.stem + ".first.png")
        subprocess.run(["vncdo", "-s", f"127.0.0.1::{self.port}", *(["-p", self.password] if self.password else []),
                        "capture", str(first), "capture", str(path)],
                       check=True, timeout=60, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        first.unlink()

    def x_screenshot(self, path: Path) -> None:
        """The X server's own pixels (ImageMagick ``import``): no VNC involved."""
        subprocess.run(["import", "-window", "root", str(path)], env=self.env, check=True, timeout=60)

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in reversed(self.procs):
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionError("VNC server closed the connection")
        out += chunk
    return bytes(out)


def vnc_auth_response(challenge: bytes, password: str) -> bytes:
    """VNC authentication (RFC 6143 §7.2.2): DES-encrypt the challenge with the password, each key
    byte bit-reversed (the historical quirk)."""
    from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
    from cryptography.hazmat.primitives.ciphers import Cipher, modes

    key = bytes(int(f"{b:08b}"[::-1], 2) for b in password.encode()[:8].ljust(8, b"\0"))
    enc = Cipher(TripleDES(key * 3), modes.ECB()).encryptor()  # K1 = K2 = K3: single DES
    return enc.update(challenge) + enc.finalize()


class RfbCapture:
    """A direct RFB 3.8 client.  ``client_bytes`` records what it sent after ServerInit and
    ``server_bytes`` what it received, in order, as (direction, bytes) chunks in ``log``."""

    def __init__(self, port: int, *, password: str | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        s = self.sock
        version = _recv_exact(s, 12)
        assert version.startswith(b"RFB 003."), version
        s.sendall(b"RFB 003.008\n")
        (n,) = _recv_exact(s, 1)
        types = _recv_exact(s, n)
        if password is None:
            assert 1 in types, types
            s.sendall(b"\x01")
        else:
            assert 2 in types, types
            s.sendall(b"\x02")
            s.sendall(vnc_auth_response(_recv_exact(s, 16), password))
        (result,) = struct.unpack(">I", _recv_exact(s, 4))
        assert result == 0, "security handshake failed"
        s.sendall(b"\x01")  # ClientInit shared
        self.width, self.height = struct.unpack(">HH", _recv_exact(s, 4))
        self.server_pf_bytes = _recv_exact(s, 16)
        (nlen,) = struct.unpack(">I", _recv_exact(s, 4))
        self.name = _recv_exact(s, nlen).decode("latin-1")
        self.pixel_format = PixelFormat.parse(self.server_pf_bytes)
        self.stream = ServerStream(self.pixel_format)
        self.log: list[tuple[str, bytes]] = []

    def send(self, data: bytes) -> None:
        self.log.append(("c", data))
        self.sock.sendall(data)

    def set_pixel_format(self, pf: PixelFormat) -> None:
        self.send(b"\x00\x00\x00\x00" + pf.encode())
        self.stream.set_pixel_format(pf)
        self.pixel_format = pf

    def set_encodings(self, encodings: list[int]) -> None:
        self.send(struct.pack(">BxH", 2, len(encodings)) + b"".join(struct.pack(">i", e) for e in encodings))

    def request(self, incremental: bool = False) -> None:
        self.send(struct.pack(">BBHHHH", 3, int(incremental), 0, 0, self.width, self.height))

    def read_update(self, timeout: float = 20.0) -> list:
        """Receive until one FramebufferUpdate is complete; returns the messages read (all kinds).
        TimeoutError when none began within ``timeout`` (a message begun is waited for)."""
        deadline = time.monotonic() + timeout
        got: list = []
        while not any(m.kind == "update" for m in got):
            left = deadline - time.monotonic()
            if left <= 0 and self.stream.buffered == 0:
                raise TimeoutError("no update")
            self.sock.settimeout(max(0.05, left) if self.stream.buffered == 0 else 20)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                if self.stream.buffered:
                    raise
                raise TimeoutError("no update") from None
            if not chunk:
                raise ConnectionError("VNC server closed the connection")
            self.log.append(("s", chunk))
            got += self.stream.feed(chunk)
        return got

    def server_bytes(self) -> bytes:
        return b"".join(d for k, d in self.log if k == "s")

    def close(self) -> None:
        self.sock.close()


PSEUDO = [-223, -224, -308]  # DesktopSize, LastRect, ExtendedDesktopSize: what viewers ask for besides pixels
# Fixtures: (server, name, encodings asked for, pixel format or None for the server's).
PF16 = PixelFormat(16, 16, False, True, 31, 63, 31, 11, 5, 0)
PF8 = PixelFormat(8, 8, False, True, 7, 7, 3, 0, 3, 6)  # BGR233
CASES = [
    ("tigervnc", "raw-cursor", [0, -239, -232], None),  # with Cursor and PointerPos pseudo-rects
    ("tigervnc", "hextile", [5, 1], None),
    ("tigervnc", "rre", [2], None),
    ("tigervnc", "zrle", [16], None),
    ("tigervnc", "tight", [7, -256 + 6], None),  # compression level 6, no JPEG quality: lossless
    ("tigervnc", "tight-jpeg", [7, -32 + 5], None),  # JPEG quality level 5
    ("tigervnc", "zrle-16bpp", [16], PF16),
    ("tigervnc", "hextile-8bpp", [5], PF8),
    ("tigervnc", "tight-16bpp", [7, -256 + 9], PF16),
    ("x11vnc", "raw", [0], None),
    ("x11vnc", "corre", [4], None),
    ("x11vnc", "zlib", [6], None),
    ("x11vnc", "tight", [7, -256 + 9], None),
    ("x11vnc", "hextile", [5], None),
]


def capture_case(server: VncServer, encodings: list[int], pf: PixelFormat | None) -> dict:
    """Full update, then a popup window appears and an incremental update carries only it (small
    areas of few colours: Tight palettes, ZRLE palette/RLE tiles, Hextile subrects), then it goes."""
    c = RfbCapture(server.port)
    popup = None
    try:
        if pf is not None:
            c.set_pixel_format(pf)
        c.set_encodings(encodings + PSEUDO)
        # A server may answer first with pseudo-rects only (TigerVNC sends ExtendedDesktopSize
        # alone); ask again, incrementally (the region stays requested), until pixels come.
        for i in range(5):
            c.request(incremental=i > 0)
            if any(r.encoding >= 0 for m in c.read_update() for r in m.rects):
                break
        popup = server.popup()
        # Incremental updates until the server has nothing more to send for a second (x11vnc
        # polls the screen and may send the new window in several updates).
        while True:
            c.request(incremental=True)
            try:
                c.read_update(timeout=1.0)
            except TimeoutError:
                break
        shot = server.workdir / "shot.png"
        server.screenshot(shot)
        return {"width": c.width, "height": c.height, "server_pixel_format": c.server_pf_bytes.hex(),
                "name": c.name, "log": c.log, "screenshot": shot.read_bytes()}
    finally:
        c.close()
        if popup is not None:
            server.unpopup(popup)


def main(outdir: str) -> None:
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    index = {}
    for kind in ("tigervnc", "x11vnc"):
        srv = VncServer(kind, Path(f"/tmp/vnc-fixtures-{kind}")).start()
        try:
            for server, name, encs, pf in CASES:
                if server != kind:
                    continue
                cap = capture_case(srv, encs, pf)
                stem = f"{server}-{name}"
                # The server's bytes after ServerInit (the client sent SetPixelFormat, SetEncodings and
                # FramebufferUpdateRequests only), and vncdotool's screenshot of the same screen.
                stream = b"".join(d for k, d in cap["log"] if k == "s")
                (out / f"{stem}.rfb").write_bytes(stream)
                (out / f"{stem}.png").write_bytes(cap["screenshot"])
                index[stem] = {"width": cap["width"], "height": cap["height"],
                               "pixel_format": (pf.encode() if pf else bytes.fromhex(cap["server_pixel_format"])).hex(),
                               "encodings": encs + PSEUDO, "server": server}
        finally:
            srv.stop()
    (out / "fixtures.json").write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
