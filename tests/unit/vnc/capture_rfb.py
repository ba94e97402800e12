"""Capture real RFB sessions for ``test_rfb.py``: a relay records both directions between a real viewer
and a real desktop (``scripts/peers/vnc.py``).

``python -m tests.unit.vnc.capture_rfb tests/unit/vnc/data`` writes, per case, ``<case>.c2s.bin``
and ``<case>.s2c.bin`` (the exact bytes of each direction, from the first byte) and adds the case
to ``rfb-captures.json`` (the desktop's VNC password, a test-only random one, so the test can check
the VNC authentication response against the captured challenge):

- ``tigervnc-vncdotool``: Xtigervnc, vncdotool logging in with VNC authentication, a screenshot,
  keys, pointer moves and clicks, a ClientCutText;
- ``tigervnc-viewer``: Xtigervnc and TigerVNC's own viewer (SetEncodings with its pseudo-encodings,
  fences, EnableContinuousUpdates, SetDesktopSize-capable) under Xvfb for a few seconds.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path


class Relay:
    """A loopback TCP relay for one connection, keeping what passed each way."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.port = self.listener.getsockname()[1]
        self.c2s = bytearray()
        self.s2c = bytearray()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _pump(self, src: socket.socket, dst: socket.socket, out: bytearray) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                out += data
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _run(self) -> None:
        client, _ = self.listener.accept()
        server = socket.create_connection(self.target)
        a = threading.Thread(target=self._pump, args=(client, server, self.c2s))
        b = threading.Thread(target=self._pump, args=(server, client, self.s2c))
        a.start()
        b.start()
        a.join()
        b.join()


def capture(out: Path) -> None:
    from scripts.peers.vnc import start_desktop, tigervnc_viewer_screenshot

    out.mkdir(parents=True, exist_ok=True)
    index_path = out / "rfb-captures.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {}
    import tempfile

    scratch = Path(tempfile.mkdtemp(prefix="rfb-capture-"))
    desktop = start_desktop(scratch)
    try:
        time.sleep(1.5)
        relay = Relay(("127.0.0.1", desktop.port))
        from vncdotool import api

        client = api.connect(f"127.0.0.1::{relay.port}", password=desktop.password, timeout=15)
        client.refreshScreen()
        client.mouseMove(100, 50)
        client.mousePress(1)
        for ch in "ls":
            client.keyPress(ch)
        client.keyPress("enter")
        client.paste("clipboard text")
        client.pause(0.5)
        client.disconnect()
        api.shutdown()
        relay.thread.join(10)
        _save(out, index, "tigervnc-vncdotool", relay, desktop.password)

        relay = Relay(("127.0.0.1", desktop.port))
        pw = subprocess.run(["vncpasswd", "-f"], input=desktop.password.encode(), capture_output=True,
                            check=True).stdout
        tigervnc_viewer_screenshot(scratch, f"127.0.0.1::{relay.port}", args=("-passwd", "pw"),
                                   files={"pw": pw}, settle=4)
        relay.thread.join(10)
        _save(out, index, "tigervnc-viewer", relay, desktop.password)
    finally:
        desktop.stop()
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _save(out: Path, index: dict, case: str, relay: Relay, password: str) -> None:
    from dbproxy.buffer import ReceiveBuffer
    from dbproxy.engines.vnc import rfb

    # The server's side up to ServerInit only (the updates are updates.py's fixtures, and large).
    buf = ReceiveBuffer()
    buf.feed(bytes(relay.s2c))
    version = rfb.parse_version(buf)
    rfb.parse_security_types(version)(buf)
    rfb.parse_challenge(buf)
    rfb.parse_security_result(version)(buf)
    rfb.parse_server_init(buf)
    relay.s2c[buf.position:] = b""
    (out / f"{case}.c2s.bin").write_bytes(bytes(relay.c2s))
    (out / f"{case}.s2c.bin").write_bytes(bytes(relay.s2c))
    index[case] = {"password": password, "c2s_bytes": len(relay.c2s), "s2c_bytes": len(relay.s2c)}


if __name__ == "__main__":
    capture(Path(sys.argv[1]))
