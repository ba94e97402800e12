"""SSH through dbproxy vs direct: bulk throughput (``cat``, ``sftp``) and the round trip of one echoed keystroke.

Strategy: one private OpenSSH sshd (``scripts.peers.sshd``) as the target and
one dbproxy with an SSH listener (token auth, the proxy's key to the target,
JSONL audit, pty recording on) in front of it, both on loopback.  A file of
``--size`` random bytes is made once on the target's disk (page cache warm
after the first read).  Then, rounds interleaved so machine drift hits both
alike:

    cat     ``ssh HOST cat FILE > /dev/null`` with the real OpenSSH client (an
            exec channel, no pty: relayed, audited, not recorded)
    sftp    ``sftp -b`` ``get FILE /dev/null`` with the real OpenSSH sftp
            (the proxy's SFTP observer hashes every byte: SHA-256 in the audit)

each timed end to end (connection and login included; small next to the
transfer), direct against the sshd and through the proxy; reported as MB/s
and the ratio proxy/direct (target ≥ 0.8).

    keystroke  an asyncssh client opens a pty running ``cat`` (the tty echoes
            each byte at once) and sends one byte at a time, waiting for its
            echo, ``--keys`` times; the median round trip direct and through
            the proxy, and the difference: the latency the proxy adds to an
            echoed keystroke (target ≤ 1 ms).  Through the proxy each byte also
            goes through the terminal observer (``dbproxy.terminal.observer``)
            and the recording.

Both SSH legs of the proxy use asyncssh's channel window and packet size
(``engines/ssh/bridge.py`` CHANNEL_WINDOW / CHANNEL_PACKET); OpenSSH's client
and sshd their own.  The proxy decrypts and re-encrypts every byte: on a
2-core box it competes with ssh, sshd and the client for CPU.

Runnable: ``scripts/bench/ssh [--size 256M] [--rounds 2] [--keys 500] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from scripts.peers.sshd import make_key, start_sshd  # noqa: E402
from tests.support import ProxyProcess  # noqa: E402


def _cpu(pid: int) -> float:
    """User+system CPU seconds of ``pid`` and its reaped children (/proc/PID/stat fields 14-17)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().rstrip("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def _cli(*args: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "dbproxy.cli", *args], capture_output=True, text=True, env=env,
                       timeout=60, check=True)
    return p.stdout.strip()


class Setup:
    def __init__(self, workdir: Path, size: int) -> None:
        self.workdir = workdir
        self.sshd = start_sshd(workdir / "sshd")
        self.file = workdir / "payload.bin"
        with open(self.file, "wb") as f:
            chunk = os.urandom(1 << 20)
            left = size
            while left > 0:
                f.write(chunk[:min(left, len(chunk))])
                left -= len(chunk)
        self.size = size
        pw = workdir / "proxy"
        pw.mkdir()
        _cli("token", "keygen", "--algorithm", "EdDSA", "--key-file", str(pw / "token.key"),
             "--public-key-file", str(pw / "token.pub"))
        make_key(pw / "host_ed25519", "bench-proxy")
        (pw / "recordings").mkdir()
        config = {
            "identity": {"token": {"algorithm": "EdDSA", "key_file": "token.key", "public_key_file": "token.pub"}},
            "roles": {"ops": {"routes": ["*"], "targets": ["*"], "logins": [self.sshd.login]}},
            "listeners": [{"name": "ssh", "protocol": "ssh", "listen": "127.0.0.1:0", "host_key_file": "host_ed25519",
                           "recording": {"dir": "recordings"}, "auth": {"methods": ["token"]},
                           "routes": [{"name": "t", "match": {"target": "*"}, "backend": {
                               "address": self.sshd.address, "login": self.sshd.login,
                               "auth": {"method": "publickey", "key_file": str(self.sshd.client_key)},
                               "host_key": {"known_hosts_file": str(self.sshd.known_hosts)}}}]}],
            "audit": {"sinks": [{"type": "jsonl", "path": "audit.jsonl"}]},
        }
        self.proxy = ProxyProcess(pw, config, name="proxy").start()
        self.token = _cli("token", "issue", "--config", str(self.proxy.config_path), "--user", "bench",
                          "--roles", "ops", "--ttl", "2h")
        kind, blob = (pw / "host_ed25519.pub").read_text().split()[:2]
        self.known = workdir / "known_hosts"
        self.known.write_text(f"[127.0.0.1]:{self.proxy.port()} {kind} {blob}\n"
                              + Path(self.sshd.known_hosts).read_text())
        askpass = workdir / "askpass.sh"
        askpass.write_text('#!/bin/sh\nprintf "%s\\n" "$DBPROXY_TOKEN"\n')
        askpass.chmod(0o700)
        self.env = dict(os.environ, SSH_ASKPASS=str(askpass), SSH_ASKPASS_REQUIRE="force", DBPROXY_TOKEN=self.token)
        self.env.pop("SSH_AUTH_SOCK", None)

    def ssh_args(self, target: str) -> list[str]:
        common = ["-F", "/dev/null", "-o", f"UserKnownHostsFile={self.known}", "-o", "StrictHostKeyChecking=yes",
                  "-o", "BatchMode=no"]
        if target == "direct":
            return [*common, "-o", "PreferredAuthentications=publickey", "-i", str(self.sshd.client_key),
                    "-o", "IdentitiesOnly=yes"], self.sshd.port, f"{self.sshd.login}@127.0.0.1"
        return [*common, "-o", "PubkeyAuthentication=no"], self.proxy.port(), f"{self.sshd.login}@bench@127.0.0.1"

    def cat(self, target: str) -> float:
        opts, port, dest = self.ssh_args(target)
        t0 = time.perf_counter()
        with open(os.devnull, "wb") as out:
            p = subprocess.run(["ssh", *opts, "-p", str(port), dest, f"cat {self.file}"], stdout=out,
                               stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=self.env, timeout=3600)
        elapsed = time.perf_counter() - t0
        if p.returncode != 0:
            raise RuntimeError(f"cat via {target}: {p.stderr.decode(errors='replace')}")
        return elapsed

    def sftp(self, target: str) -> float:
        opts, port, dest = self.ssh_args(target)
        t0 = time.perf_counter()
        p = subprocess.run(["sftp", *opts, "-P", str(port), "-b", "-", dest], input=f"get {self.file} /dev/null\n",
                           capture_output=True, text=True, env=self.env, timeout=3600)
        elapsed = time.perf_counter() - t0
        if p.returncode != 0:
            raise RuntimeError(f"sftp via {target}: {p.stderr}")
        return elapsed

    def keystrokes(self, target: str, keys: int) -> list[float]:
        import asyncssh

        async def run() -> list[float]:
            if target == "direct":
                conn = await asyncssh.connect("127.0.0.1", self.sshd.port, username=self.sshd.login,
                                              client_keys=[str(self.sshd.client_key)],
                                              known_hosts=str(self.sshd.known_hosts), agent_path=None, config=None)
            else:
                conn = await asyncssh.connect("127.0.0.1", self.proxy.port(), username=f"{self.sshd.login}@bench",
                                              password=self.token, known_hosts=str(self.known), agent_path=None,
                                              client_keys=None, config=None, preferred_auth="password")
            async with conn:
                proc = await conn.create_process("cat", term_type="xterm", term_size=(80, 24), encoding=None)
                samples = []
                await asyncio.sleep(0.3)
                for i in range(keys + 20):
                    key = bytes([0x61 + i % 26])
                    t0 = time.perf_counter()
                    proc.stdin.write(key)
                    got = await proc.stdout.read(1)
                    dt = time.perf_counter() - t0
                    if got != key:
                        raise RuntimeError(f"keystroke via {target}: sent {key!r}, got {got!r}")
                    if i >= 20:  # warm-up
                        samples.append(dt)
                    if i % 60 == 59:  # a newline now and then so the tty's line buffer never fills
                        proc.stdin.write(b"\r")
                        await proc.stdout.readuntil(b"\n")  # echo of the Enter …
                        await proc.stdout.readuntil(b"\n")  # … and cat's copy of the line
                proc.stdin.write(b"\x04")
                proc.close()
                return samples

        return asyncio.run(run())

    def close(self) -> None:
        self.proxy.stop()
        self.sshd.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="256M", help="bytes to move per transfer (e.g. 1G, 256M)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--keys", type=int, default=500, help="echoed keystrokes timed per target")
    ap.add_argument("--tests", default="cat,sftp,keystroke")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--keep", action="store_true", help="keep the work dir")
    args = ap.parse_args(argv)
    tests = args.tests.split(",")
    size = _size(args.size)
    workdir = Path(tempfile.mkdtemp(prefix="dbproxy-ssh-bench-"))
    setup = Setup(workdir, size)
    results: dict = {"size": size, "rounds": args.rounds, "runs": {}}
    try:
        for test in ("cat", "sftp"):
            if test not in tests:
                continue
            for r in range(args.rounds):
                for target in ("direct", "proxy"):
                    cpu0 = _cpu(setup.proxy.proc.pid)
                    t = getattr(setup, test)(target)
                    cpu = _cpu(setup.proxy.proc.pid) - cpu0
                    results["runs"].setdefault(test, {}).setdefault(target, []).append(t)
                    if target == "proxy":
                        results["runs"].setdefault(f"{test}_proxy_cpu_s", []).append(cpu)
                    print(f"{test:5} {target:6} round {r + 1}: {size / t / 1e6:8.1f} MB/s ({t:.2f} s)"
                          + (f", proxy CPU {cpu:.2f} s = {cpu / size * 1e9:.1f} ns/byte" if target == "proxy" else ""),
                          flush=True)
        if "keystroke" in tests:
            for target in ("direct", "proxy"):
                samples = setup.keystrokes(target, args.keys)
                results["runs"].setdefault("keystroke", {})[target] = samples
                print(f"keys  {target:6}: median {statistics.median(samples) * 1e3:.3f} ms, "
                      f"p90 {sorted(samples)[int(len(samples) * 0.9)] * 1e3:.3f} ms", flush=True)
        summary = {}
        for test in ("cat", "sftp"):
            if test in results["runs"]:
                best = {t: size / min(v) / 1e6 for t, v in results["runs"][test].items()}
                summary[test] = {"direct_MBps": round(best["direct"], 1), "proxy_MBps": round(best["proxy"], 1),
                                 "ratio": round(best["proxy"] / best["direct"], 3),
                                 "proxy_cpu_ns_per_byte":
                                     round(min(results["runs"][f"{test}_proxy_cpu_s"]) / size * 1e9, 2)}
        if "keystroke" in results["runs"]:
            k = {t: statistics.median(v) * 1e3 for t, v in results["runs"]["keystroke"].items()}
            summary["keystroke"] = {"direct_ms": round(k["direct"], 3), "proxy_ms": round(k["proxy"], 3),
                                    "added_ms": round(k["proxy"] - k["direct"], 3)}
        results["summary"] = summary
        print(json.dumps(summary, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
    finally:
        setup.close()
        if args.keep:
            print(f"work dir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
