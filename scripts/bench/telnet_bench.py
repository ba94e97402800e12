"""Telnet through dbproxy vs direct: terminal output throughput and the round trip of one echoed keystroke.

Strategy: one inetutils telnetd (``scripts.peers.telnetd``, real ``/bin/login``)
as the target and one dbproxy with a Telnet listener (token at the proxy's
prompt, the route's password to the target, JSONL audit, recording on) in
front of it, on loopback.  A small client (a raw socket and the engine's own
sans-IO codec answering the negotiation) logs in either way, then:

    output     ``seq 1 N`` through the pty (about ``7 * N`` bytes, one CR LF per
               line: the codec's worst case is a line per few bytes), timed from
               the command's Enter to the marker after it; MB/s and the ratio
               proxy/direct.  The target's pty and telnetd are the bottleneck
               on a 2-core box: a ratio near 1 means the proxy keeps up.
    keystroke  ``cat`` on the pty, one byte sent at a time and its echo
               awaited, ``--keys`` times; the median round trip direct and
               through the proxy (each key passes the terminal observer and
               the recording) and the difference.

Rounds interleave direct and proxy.  Runnable:
``scripts/bench/telnet [--lines 2000000] [--keys 300] [--rounds 2]``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from dbproxy.engines.telnet import codec as tn  # noqa: E402
from scripts.peers.telnetd import start_telnetd  # noqa: E402
from tests.support import ProxyProcess, dbproxy_cli  # noqa: E402


class Client:
    def __init__(self, port: int) -> None:
        self.proto = tn.TelnetProtocol(accept_local={tn.NAWS, tn.TTYPE}, accept_remote={tn.ECHO, tn.SGA})
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.tail = b""

    def read(self) -> int:
        data = self.sock.recv(262144)
        if not data:
            raise SystemExit("connection closed")
        self.proto.feed(data)
        out = b""
        for e in self.proto.events():
            if isinstance(e, tn.Data):
                self.tail = (self.tail + e.data)[-256:]
            elif isinstance(e, tn.OptionChanged) and e.option == tn.NAWS and e.enabled and e.side == "local":
                out += tn.TelnetProtocol.encode_subnegotiation(tn.NAWS, tn.naws_payload(80, 24))
            elif isinstance(e, tn.Subnegotiation) and e.option == tn.TTYPE:
                out += tn.ttype_is("xterm")
        out = self.proto.data_to_send() + out
        if out:
            self.sock.sendall(out)
        return len(data)

    def expect(self, needle: bytes) -> int:
        n = 0
        while needle not in self.tail:
            n += self.read()
        self.tail = b""
        return n

    def send(self, text: bytes) -> None:
        self.sock.sendall(tn.TelnetProtocol.encode_data(text))


def login(port: int, user: str, secret: str) -> Client:
    c = Client(port)
    c.expect(b"login: ")
    c.send(user.encode() + b"\r")
    c.expect(b"assword: ")
    c.send(secret.encode() + b"\r")
    c.expect(b"$ ")
    return c


def output(c: Client, lines: int) -> tuple[int, float]:
    t0 = time.perf_counter()
    c.send(f"seq 1 {lines}; echo END-$((1+1))\r".encode())
    n = c.expect(b"END-2")
    return n, time.perf_counter() - t0


def keystrokes(c: Client, keys: int) -> float:
    c.send(b"stty -icanon; cat\r")
    time.sleep(0.5)
    while True:  # drain the echo of the command
        c.sock.settimeout(0.2)
        try:
            c.read()
        except socket.timeout:
            break
    c.sock.settimeout(30)
    times = []
    for i in range(keys + 20):
        key = b"abcdefghij"[i % 10:i % 10 + 1]
        c.tail = b""
        t0 = time.perf_counter()
        c.send(key)
        while key not in c.tail:
            c.read()
        if i >= 20:
            times.append(time.perf_counter() - t0)
    c.send(b"\x03")
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lines", type=int, default=2_000_000)
    ap.add_argument("--keys", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dbproxy-telnet-bench-"))
    peer = start_telnetd(work)
    proxy = None
    try:
        dbproxy_cli("token", "keygen", "--algorithm", "EdDSA", "--key-file", str(work / "token.key"),
                    "--public-key-file", str(work / "token.pub"), check=True)
        (work / "target.secret").write_text(peer.password + "\n")
        (work / "recordings").mkdir()
        cfg = {"identity": {"token": {"algorithm": "EdDSA", "key_file": "token.key", "public_key_file": "token.pub"}},
               "roles": {"bench": {"routes": ["*"], "targets": ["*"], "logins": [peer.login]}},
               "listeners": [{"name": "telnet", "protocol": "telnet", "listen": "127.0.0.1:0",
                              "auth": {"methods": ["token"]}, "recording": {"dir": "recordings"},
                              "routes": [{"backend": {"address": peer.address, "login": peer.login,
                                                      "auth": {"method": "password",
                                                               "password_file": "target.secret"}}}]}],
               "audit": {"sinks": [{"type": "jsonl", "path": "audit.jsonl"}]}}
        proxy = ProxyProcess(work, cfg).start()
        token = dbproxy_cli("token", "issue", "--config", str(proxy.config_path), "--user", "bench", "--roles",
                            "bench", "--ttl", "1h", check=True).stdout.strip()
        ways = {"direct": lambda: login(peer.port, peer.login, peer.password),
                "proxy": lambda: login(proxy.port(), f"{peer.login}@bench", token)}
        results: dict = {w: {"mb_s": [], "key_ms": []} for w in ways}
        for _ in range(args.rounds):
            for way, connect in ways.items():
                c = connect()
                n, dt = output(c, args.lines)
                results[way]["mb_s"].append(n / dt / 1e6)
                results[way]["key_ms"].append(keystrokes(c, args.keys) * 1000)
                c.sock.close()
                print(f"{way:6} output {n / 1e6:.1f} MB {n / dt / 1e6:6.2f} MB/s   keystroke median "
                      f"{results[way]['key_ms'][-1]:.3f} ms", flush=True)
        best = {w: max(r["mb_s"]) for w, r in results.items()}
        keys = {w: min(r["key_ms"]) for w, r in results.items()}
        summary = {"output_ratio": best["proxy"] / best["direct"], "added_keystroke_ms": keys["proxy"] - keys["direct"],
                   "rounds": results}
        print(f"output ratio proxy/direct {summary['output_ratio']:.2f}; keystroke latency added "
              f"{summary['added_keystroke_ms']:.3f} ms")
        if args.json:
            Path(args.json).write_text(json.dumps(summary, indent=2))
    finally:
        if proxy is not None:
            proxy.stop()
        peer.stop()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    main()
