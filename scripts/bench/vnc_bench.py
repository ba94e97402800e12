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

Rounds interleave direct and proxy (and ``--baseline DIR``: a second proxy
run from another checkout, e.g. ``git -C /work/main archive HEAD | tar -x -C
DIR``, same config, for before/after in the same rounds).  Each proxy's CPU
time (user + system, from /proc, its audit worker included) per frame is
reported beside frames/s.  Runnable:
``scripts/bench/vnc [--frames 200] [--rounds 2] [--baseline DIR] [--json F]``.
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


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # from field 3 (state) on


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its descendants still running (the audit worker), from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents.setdefault(int(_stat(int(entry.name))[1]), []).append(int(entry.name))
            except (FileNotFoundError, ProcessLookupError, IndexError):
                pass
    tick = os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            fields = _stat(p)
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime (proc(5) fields 14, 15)
        todo += parents.get(p, [])
    return total


def run(port: int, password: str, frames: int, pid: int | None = None) -> tuple[float, float, float | None]:
    """frames/s, MB/s, and the CPU milliseconds per frame of process ``pid`` (None: not measured)."""
    viewer = Viewer(port, password)
    try:
        viewer.redraw()  # warm-up: the first update may come before the Raw-only encodings apply
        cpu0 = cpu_seconds(pid) if pid is not None else 0.0
        began, total = time.perf_counter(), 0
        for _ in range(frames):
            total += viewer.redraw()
        elapsed = time.perf_counter() - began
        cpu = (cpu_seconds(pid) - cpu0) / frames * 1000 if pid is not None else None
    finally:
        viewer.close()
    return frames / elapsed, total / elapsed / 1e6, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--baseline", metavar="DIR", help="also run a proxy from this checkout (before/after)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    baseline_root = Path(args.baseline).resolve() if args.baseline else None
    if baseline_root is not None and not (baseline_root / "dbproxy" / "cli.py").is_file():
        raise SystemExit(f"--baseline {args.baseline}: not a dbproxy checkout (no dbproxy/cli.py)")
    work = Path(tempfile.mkdtemp(prefix="dbproxy-vnc-bench-"))
    desk = start_desktop(work / "desk")
    proxy = base = None
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
        proxies = {"proxy": proxy}
        if baseline_root is not None:
            # Same config and files (its own recordings folder), the other checkout's code.
            (work / "base").mkdir()
            for name in ("token.key", "token.pub", "desk.secret"):
                (work / "base" / name).write_bytes((work / name).read_bytes())
                (work / "base" / name).chmod(0o600)
            (work / "base" / "recordings").mkdir()
            base = ProxyProcess(work / "base", cfg)
            base.env["PYTHONPATH"] = str(baseline_root)
            proxies["baseline"] = base.start()

        def code(p: ProxyProcess) -> str:
            return dbproxy_cli("token", "issue", "--config", str(p.config_path), "--user", "bench", "--roles",
                               "bench", "--vnc", "--target", "desk-1", check=True).stdout.strip()

        ways = ["direct", *proxies]
        results: dict = {w: [] for w in ways}
        print(f"full-screen Raw redraws, {args.frames} per run, one request in flight, {os.cpu_count()} CPU(s)"
              + (f"; baseline: {baseline_root}" if baseline_root else ""), flush=True)
        for _ in range(args.rounds):
            for way in ways:
                p = proxies.get(way)
                port, password = (desk.port, desk.password) if p is None else (p.port(), code(p))
                fps, mb_s, cpu = run(port, password, args.frames, p.proc.pid if p is not None else None)
                results[way].append({"fps": fps, "mb_s": mb_s, "cpu_ms_per_frame": cpu})
                print(f"{way:8} {fps:8.1f} frames/s {mb_s:8.1f} MB/s"
                      + (f" {cpu:7.2f} ms proxy CPU/frame" if cpu is not None else ""), flush=True)
        best = {w: max(r["fps"] for r in runs) for w, runs in results.items()}
        best_mb = {w: max(r["mb_s"] for r in runs) for w, runs in results.items()}
        cpu_min = {w: min(r["cpu_ms_per_frame"] for r in runs) for w, runs in results.items() if w != "direct"}
        ratios = {w: best[w] / best["direct"] for w in proxies}
        summary = {"fps_ratio": ratios["proxy"], "fps_ratios": ratios, "best_fps": best, "best_mb_s": best_mb,
                   "min_cpu_ms_per_frame": cpu_min, "rounds": results}
        print(f"best: direct {best['direct']:.1f} frames/s ({best_mb['direct']:.1f} MB/s)"
              + "".join(f", {w} {best[w]:.1f} frames/s ({best_mb[w]:.1f} MB/s, ratio {ratios[w]:.2f}, "
                        f"{cpu_min[w]:.2f} ms CPU/frame)" for w in proxies))
        if args.json:
            Path(args.json).write_text(json.dumps(summary, indent=2))
    finally:
        for p in (proxy, base):
            if p is not None:
                p.stop()
        desk.stop()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    main()
