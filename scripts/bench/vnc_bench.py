"""VNC through dbproxy vs direct: frames/s and MB/s of a full-screen redraw loop.

Strategy: one Xtigervnc desktop (``scripts.peers.vnc``, an xterm on it) and one
dbproxy with a VNC listener in front of it (a one-time code for the viewer,
the desktop's password held by the proxy, recording and JSONL audit on), on
loopback.  A small viewer (a raw socket, the engine's own sans-IO pieces:
``rfb.vnc_response`` for the login, ``updates.ServerStream`` to frame what
the server sends) logs in either way, asks for Raw encoding only, then
requests the whole screen non-incrementally ``--frames`` times, one request
in flight: every update is a full-screen redraw of ``width * height * 4``
bytes.  Reported per way: frames/s and MB/s; then the ratio proxy/direct.
Through the proxy every byte passes the server-stream framer, the pipeline
and the recorder (zstd, SHA-256): the redraw loop is its worst case.

Rounds interleave direct and proxy.  Runnable:
``scripts/bench/vnc [--frames 200] [--rounds 2] [--json F]``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from dbproxy.engines.vnc import rfb  # noqa: E402
from dbproxy.engines.vnc.updates import PixelFormat, ServerStream  # noqa: E402
from scripts.peers.vnc import start_desktop  # noqa: E402
from tests.support import ProxyProcess, dbproxy_cli  # noqa: E402

RAW = 0


class Viewer:
    """Just enough of an RFB 3.8 viewer: VNC authentication, ClientInit, Raw updates."""

    def __init__(self, port: int, password: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self._exact(12)
        self.sock.sendall(b"RFB 003.008\n")
        (n,) = self._exact(1)
        types = self._exact(n)
        if rfb.SEC_VNC not in types:
            raise SystemExit(f"no VNC authentication offered: {list(types)}")
        self.sock.sendall(bytes([rfb.SEC_VNC]))
        self.sock.sendall(rfb.vnc_response(password.encode(), self._exact(16)))
        (result,) = struct.unpack(">I", self._exact(4))
        if result != 0:
            (length,) = struct.unpack(">I", self._exact(4))
            raise SystemExit(f"login refused: {self._exact(length).decode(errors='replace')}")
        self.sock.sendall(b"\x01")  # shared
        head = self._exact(24)
        self.width, self.height = struct.unpack(">HH", head[:4])
        self._exact(struct.unpack(">I", head[20:24])[0])  # the desktop's name
        self.stream = ServerStream(PixelFormat.parse(head[4:20]))
        self.sock.sendall(rfb.encode_set_encodings((RAW,)))

    def _exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise SystemExit("connection closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def redraw(self) -> int:
        """One full-screen, non-incremental update; the bytes it took on the wire."""
        self.sock.sendall(rfb.encode_update_request(False, 0, 0, self.width, self.height))
        got = 0
        pending, self.buf = self.buf, b""
        while True:
            if pending:
                got += len(pending)
                for message in self.stream.feed(pending):
                    if message.kind == "update":
                        return got
            pending = self.sock.recv(1 << 20)
            if not pending:
                raise SystemExit("connection closed")

    def close(self) -> None:
        self.sock.close()


def run(port: int, password: str, frames: int) -> tuple[float, float]:
    viewer = Viewer(port, password)
    try:
        viewer.redraw()  # warm-up: the first update may come before the Raw-only encodings apply
        began, total = time.perf_counter(), 0
        for _ in range(frames):
            total += viewer.redraw()
        elapsed = time.perf_counter() - began
    finally:
        viewer.close()
    return frames / elapsed, total / elapsed / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dbproxy-vnc-bench-"))
    desk = start_desktop(work / "desk")
    proxy = None
    try:
        dbproxy_cli("token", "keygen", "--algorithm", "EdDSA", "--key-file", str(work / "token.key"),
                    "--public-key-file", str(work / "token.pub"), check=True)
        (work / "desk.secret").write_text(desk.password + "\n")
        (work / "recordings").mkdir()
        cfg = {"identity": {"token": {"algorithm": "EdDSA", "key_file": "token.key", "public_key_file": "token.pub",
                                      "registry_file": "tokens.json", "codes_file": "codes.json"}},
               "roles": {"bench": {"routes": ["*"], "desktops": ["*"]}},
               "listeners": [{"name": "vnc", "protocol": "vnc", "listen": "127.0.0.1:0",
                              "auth": {"methods": ["token"]}, "recording": {"dir": "recordings"},
                              "routes": [{"match": {"target": "desk-1"},
                                          "backend": {"address": desk.address,
                                                      "auth": {"method": "vnc", "password_file": "desk.secret"}}}]}],
               "audit": {"sinks": [{"type": "jsonl", "path": "audit.jsonl"}]}}
        proxy = ProxyProcess(work, cfg).start()

        def code() -> str:
            return dbproxy_cli("token", "issue", "--config", str(proxy.config_path), "--user", "bench", "--roles",
                               "bench", "--vnc", "--target", "desk-1", check=True).stdout.strip()

        results: dict = {"direct": [], "proxy": []}
        print(f"full-screen Raw redraws, {args.frames} per run, one request in flight, {os.cpu_count()} CPU(s)",
              flush=True)
        for _ in range(args.rounds):
            for way in ("direct", "proxy"):
                port, password = (desk.port, desk.password) if way == "direct" else (proxy.port(), code())
                fps, mb_s = run(port, password, args.frames)
                results[way].append({"fps": fps, "mb_s": mb_s})
                print(f"{way:6} {fps:8.1f} frames/s {mb_s:8.1f} MB/s", flush=True)
        best = {w: max(r["fps"] for r in runs) for w, runs in results.items()}
        best_mb = {w: max(r["mb_s"] for r in runs) for w, runs in results.items()}
        summary = {"fps_ratio": best["proxy"] / best["direct"], "best_fps": best, "best_mb_s": best_mb,
                   "rounds": results}
        print(f"best: direct {best['direct']:.1f} frames/s ({best_mb['direct']:.1f} MB/s), proxy {best['proxy']:.1f} "
              f"frames/s ({best_mb['proxy']:.1f} MB/s); ratio proxy/direct {summary['fps_ratio']:.2f}")
        if args.json:
            Path(args.json).write_text(json.dumps(summary, indent=2))
    finally:
        if proxy is not None:
            proxy.stop()
        desk.stop()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    main()
