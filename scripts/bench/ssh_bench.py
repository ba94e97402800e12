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
transfer) against each target (``--targets``; direct always):

    direct       OpenSSH's client to the sshd
    openssh-hop  through a second sshd (the middle host) whose session runs
                 OpenSSH's ``ssh`` to the target (for sftp: its ``Subsystem
                 sftp`` is ``ssh -s target sftp``): a terminating relay made of
                 OpenSSH's C, the same ciphers on its legs as the proxy's
    dbproxy      through the proxy;  dbproxy-ctr: the client asking for
                 aes128-ctr on its leg;  dbproxy-b: a second proxy process
                 with ``--b-env`` settings (an A/B of engines/ssh)

reported as MB/s and the ratio to the same round's direct (target ≥ 0.8),
with the CPU per byte of the middle (the proxy's process tree; the hop's sshd
with its sessions and their ssh), of the target's sshd and of the client, the
ratio of direct's total CPU per byte to the target's (with both cores busy, an
upper bound of the throughput ratio that other load moves far less), the
share of the CPUs left idle and the load average.

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
import resource
import shlex
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


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _cpu(pid: int) -> float:
    """CPU seconds (user + system) of ``pid``, its reaped children (/proc/PID/stat fields 14-17) and its
    live descendants: the proxy with its audit worker; an sshd with its sessions (and what they run)."""
    try:
        total = sum(int(x) for x in _stat(pid)[11:15]) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return 0.0
    return total + sum(_cpu(c) for c in _children(pid))


def _settle(pid: int, timeout: float = 3.0) -> None:
    """Wait until an sshd listener has reaped its session processes (their CPU then is in its cutime)."""
    deadline = time.monotonic() + timeout
    while _children(pid) and time.monotonic() < deadline:
        time.sleep(0.02)


def _idle() -> tuple[int, int]:
    """(idle + iowait, total) jiffies of all CPUs so far (/proc/stat)."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return f[3] + f[4], sum(f[:8])


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


# The ciphers of the proxy's two legs (engines/ssh/bridge.py): aes128-gcm on both with OpenSSH's client
# (offer_gcm_only; the proxy is the client of the target leg and lists GCM first).  The openssh-hop
# target uses the same on its two legs; ``--hop-client-leg ctr`` makes its client leg aes128-ctr +
# umac-64-etm, what OpenSSH's client picks from the proxy's full list (CLIENT_LEG, dbproxy-ctr).
CLIENT_LEG = ["-o", "Ciphers=aes128-ctr", "-o", "MACs=umac-64-etm@openssh.com"]
TARGET_LEG = ["-o", "Ciphers=aes128-gcm@openssh.com"]
TARGETS = ("direct", "openssh-hop", "dbproxy", "dbproxy-ctr", "dbproxy-b")
# dbproxy-ctr: the same proxy, the client asking for aes128-ctr (+ umac-64-etm) on its leg: what OpenSSH
# negotiated before the proxy offered AES-GCM alone to clients that list it (bridge.offer_gcm_only).
# dbproxy-b: a second proxy process with the --b-env settings, for an A/B of engines/ssh.


class Setup:
    def __init__(self, workdir: Path, size: int, targets: tuple[str, ...], b_env: dict | None = None,
                 hop_client_leg: str = "gcm") -> None:
        self.workdir = workdir
        self.hop_leg = CLIENT_LEG if hop_client_leg == "ctr" else TARGET_LEG
        self.sshd = start_sshd(workdir / "sshd")
        self.file = workdir / "payload.bin"
        with open(self.file, "wb") as f:
            chunk = os.urandom(1 << 20)
            left = size
            while left > 0:
                f.write(chunk[:min(left, len(chunk))])
                left -= len(chunk)
        self.size = size
        known = Path(self.sshd.known_hosts).read_text()
        # openssh-hop: a second sshd, the middle host, whose sessions run OpenSSH's ssh to the target —
        # a terminating relay (decrypt the client leg, re-encrypt the target leg) made of OpenSSH's C.
        ssh = shutil.which("ssh") or "/usr/bin/ssh"
        self.onward = [ssh, "-F", "/dev/null", "-i", str(self.sshd.client_key), "-o", "IdentitiesOnly=yes",
                       "-o", f"UserKnownHostsFile={self.sshd.known_hosts}", "-o", "StrictHostKeyChecking=yes",
                       "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", *TARGET_LEG, "-p", str(self.sshd.port)]
        dest = f"{self.sshd.login}@127.0.0.1"
        self.hop = None
        if "openssh-hop" in targets:
            self.hop = start_sshd(workdir / "hop", sftp=" ".join([*self.onward, "-s", dest, "sftp"]))
            known += Path(self.hop.known_hosts).read_text()
        self.proxies: dict[str, tuple[ProxyProcess, str]] = {}
        for name, env in (("dbproxy", None), ("dbproxy-b", b_env)):
            if name in targets or (name == "dbproxy" and "dbproxy-ctr" in targets):
                self.proxies[name] = self._start_proxy(workdir / name, env)
                kind, blob = (workdir / name / "host_ed25519.pub").read_text().split()[:2]
                known += f"[127.0.0.1]:{self.proxies[name][0].port()} {kind} {blob}\n"
        self.known = workdir / "known_hosts"
        self.known.write_text(known)
        askpass = workdir / "askpass.sh"
        askpass.write_text('#!/bin/sh\nprintf "%s\\n" "$DBPROXY_TOKEN"\n')
        askpass.chmod(0o700)
        self.env = dict(os.environ, SSH_ASKPASS=str(askpass), SSH_ASKPASS_REQUIRE="force")
        self.env.pop("SSH_AUTH_SOCK", None)

    def _proxy(self, target: str) -> tuple[ProxyProcess, str]:
        return self.proxies["dbproxy" if target == "dbproxy-ctr" else target]

    def _start_proxy(self, pw: Path, env: dict | None) -> tuple[ProxyProcess, str]:
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
        proxy = ProxyProcess(pw, config, name="proxy", env=env).start(timeout=120)  # a loaded machine
        return proxy, _cli("token", "issue", "--config", str(proxy.config_path), "--user", "bench",
                           "--roles", "ops", "--ttl", "2h")

    def middle_pid(self, target: str) -> int | None:
        """The process (tree) between client and target whose CPU is the relay's cost."""
        if target.startswith("dbproxy"):
            return self._proxy(target)[0].proc.pid
        if target == "openssh-hop":
            return self.hop.pid
        return None

    def ssh_args(self, target: str) -> tuple[list[str], int, str]:
        common = ["-F", "/dev/null", "-o", f"UserKnownHostsFile={self.known}", "-o", "StrictHostKeyChecking=yes",
                  "-o", "BatchMode=no"]
        if target == "direct":
            return [*common, "-o", "PreferredAuthentications=publickey", "-i", str(self.sshd.client_key),
                    "-o", "IdentitiesOnly=yes"], self.sshd.port, f"{self.sshd.login}@127.0.0.1"
        if target == "openssh-hop":
            return [*common, *self.hop_leg, "-o", "PreferredAuthentications=publickey", "-i", str(self.hop.client_key),
                    "-o", "IdentitiesOnly=yes"], self.hop.port, f"{self.hop.login}@127.0.0.1"
        ctr = CLIENT_LEG if target == "dbproxy-ctr" else []
        return ([*common, *ctr, "-o", "PubkeyAuthentication=no"], self._proxy(target)[0].port(),
                f"{self.sshd.login}@bench@127.0.0.1")

    def command(self, target: str, command: str, *, tty: bool = False) -> str:
        """The remote command line: on the hop, the middle host's ssh to the target running it."""
        if target != "openssh-hop":
            return command
        return " ".join([*self.onward, *(["-tt"] if tty else []), f"{self.sshd.login}@127.0.0.1", shlex.quote(command)])

    def env_for(self, target: str) -> dict:
        return dict(self.env, DBPROXY_TOKEN=self._proxy(target)[1]) if target.startswith("dbproxy") else self.env

    def cat(self, target: str) -> float:
        opts, port, dest = self.ssh_args(target)
        t0 = time.perf_counter()
        with open(os.devnull, "wb") as out:
            p = subprocess.run(["ssh", *opts, "-p", str(port), dest, self.command(target, f"cat {self.file}")],
                               stdout=out, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=self.env_for(target),
                               timeout=3600)
        elapsed = time.perf_counter() - t0
        if p.returncode != 0:
            raise RuntimeError(f"cat via {target}: {p.stderr.decode(errors='replace')}")
        return elapsed

    def sftp(self, target: str) -> float:
        opts, port, dest = self.ssh_args(target)
        t0 = time.perf_counter()
        p = subprocess.run(["sftp", *opts, "-P", str(port), "-b", "-", dest], input=f"get {self.file} /dev/null\n",
                           capture_output=True, text=True, env=self.env_for(target), timeout=3600)
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
            elif target == "openssh-hop":
                conn = await asyncssh.connect("127.0.0.1", self.hop.port, username=self.hop.login,
                                              client_keys=[str(self.hop.client_key)],
                                              known_hosts=str(self.hop.known_hosts), agent_path=None, config=None)
            else:
                proxy, token = self._proxy(target)
                conn = await asyncssh.connect("127.0.0.1", proxy.port(), username=f"{self.sshd.login}@bench",
                                              password=token, known_hosts=str(self.known), agent_path=None,
                                              client_keys=None, config=None, preferred_auth="password")
            async with conn:
                # On the hop the middle's pty is put in raw mode by its ssh -tt: only the target's tty echoes.
                hop = target == "openssh-hop"
                # On the hop, keys typed before the middle's ssh put its pty in raw mode would be echoed
                # twice: wait for the target's first output, which that ssh relays only once raw.
                proc = await conn.create_process(self.command(target, "echo READY; exec cat" if hop else "cat",
                                                              tty=True), term_type="xterm", term_size=(80, 24),
                                                 encoding=None)
                samples = []
                if hop:
                    await proc.stdout.readuntil(b"READY\r\n")
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
        for peer in (*(p for p, _ in self.proxies.values()), self.hop, self.sshd):
            if peer is not None:
                peer.stop()


def measure(setup: Setup, test: str, target: str) -> dict:
    """One timed transfer with the CPU it cost: the relay in the middle (the proxy's process tree, or the
    hop's sshd with its sessions and their ssh), the target's sshd, the client; and the machine's idle share."""
    middle = setup.middle_pid(target)
    size = setup.size
    load = os.getloadavg()[0]
    cpu0 = {"middle": _cpu(middle) if middle else 0.0, "target": _cpu(setup.sshd.pid)}
    client0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    idle0, total0 = _idle()
    t = getattr(setup, test)(target)
    idle1, total1 = _idle()
    for pid in (setup.sshd.pid, middle if target == "openssh-hop" else None):  # sshd listeners: sessions reaped
        if pid:
            _settle(pid)
    client1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = {"middle": (_cpu(middle) - cpu0["middle"]) if middle else 0.0,
           "target": _cpu(setup.sshd.pid) - cpu0["target"],
           "client": client1.ru_utime + client1.ru_stime - client0.ru_utime - client0.ru_stime}
    return {"s": t, "MBps": size / t / 1e6, "load1": load, "idle": (idle1 - idle0) / max(1, total1 - total0),
            **{f"{k}_ns_per_byte": v / size * 1e9 for k, v in cpu.items()}}


def _total(m: dict) -> float:
    """All the CPU one byte cost: client, relay, target.  When the CPUs are the bottleneck (2 cores, all
    busy), direct's total over a relayed run's total bounds the throughput ratio from above, and it moves
    much less with the machine's load than the wall-clock ratio."""
    return m["middle_ns_per_byte"] + m["target_ns_per_byte"] + m["client_ns_per_byte"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="256M", help="bytes to move per transfer (e.g. 1G, 256M)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--keys", type=int, default=500, help="echoed keystrokes timed per target")
    ap.add_argument("--tests", default="cat,sftp,keystroke")
    ap.add_argument("--targets", default="direct,openssh-hop,dbproxy",
                    help=f"some of {','.join(TARGETS)} (direct always runs)")
    ap.add_argument("--b-env", action="append", default=[], metavar="VAR=VALUE",
                    help="environment of the dbproxy-b target's proxy process (an A/B of engines/ssh settings)")
    ap.add_argument("--hop-client-leg", choices=("gcm", "ctr"), default="gcm",
                    help="cipher of the openssh-hop client leg: aes128-gcm, or aes128-ctr + umac-64-etm")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--keep", action="store_true", help="keep the work dir")
    args = ap.parse_args(argv)
    tests = args.tests.split(",")
    targets = tuple(t for t in TARGETS if t == "direct" or t in args.targets.split(","))
    b_env = dict(kv.split("=", 1) for kv in args.b_env)
    size = _size(args.size)
    workdir = Path(tempfile.mkdtemp(prefix="dbproxy-ssh-bench-"))
    setup = Setup(workdir, size, targets, b_env, args.hop_client_leg)
    results: dict = {"size": size, "rounds": args.rounds, "targets": targets, "b_env": b_env, "runs": {}}
    print(f"{'test':5} {'target':11} rnd {'MB/s':>7} {'ratio':>5} {'middle':>7} {'target':>7} {'client':>7}"
          f" {'cpu-r':>5} {'idle':>5} {'load':>5}   (CPU in ns/byte; cpu-r: direct's CPU/byte over this one's)",
          flush=True)
    try:
        for test in ("cat", "sftp"):
            if test not in tests:
                continue
            for r in range(args.rounds):
                for target in targets:
                    m = measure(setup, test, target)
                    runs = results["runs"].setdefault(test, {}).setdefault(target, [])
                    runs.append(m)
                    ratio = m["MBps"] / results["runs"][test]["direct"][r]["MBps"]
                    m["cpu_ratio"] = _total(results["runs"][test]["direct"][r]) / _total(m)
                    print(f"{test:5} {target:11} {r + 1:3} {m['MBps']:7.1f} {ratio:5.2f} {m['middle_ns_per_byte']:7.2f}"
                          f" {m['target_ns_per_byte']:7.2f} {m['client_ns_per_byte']:7.2f} {m['cpu_ratio']:5.2f}"
                          f" {m['idle']:5.0%}"
                          f" {m['load1']:5.1f}", flush=True)
        if "keystroke" in tests:
            for target in targets:
                samples = setup.keystrokes(target, args.keys)
                results["runs"].setdefault("keystroke", {})[target] = samples
                print(f"keys  {target:11}: median {statistics.median(samples) * 1e3:.3f} ms, "
                      f"p90 {sorted(samples)[int(len(samples) * 0.9)] * 1e3:.3f} ms", flush=True)
        summary: dict = {}
        for test in ("cat", "sftp"):
            if test not in results["runs"]:
                continue
            runs = results["runs"][test]
            summary[test] = {}
            for target in targets:
                best = max(m["MBps"] for m in runs[target])
                row = {"MBps": round(best, 1),
                       "round_ratios": [round(m["MBps"] / d["MBps"], 3) for m, d in zip(runs[target], runs["direct"])],
                       "middle_ns_per_byte": round(min(m["middle_ns_per_byte"] for m in runs[target]), 2),
                       "idle": round(min(m["idle"] for m in runs[target]), 3),
                       "cpu_ratios": [round(m["cpu_ratio"], 3) for m in runs[target]]}
                if target != "direct":
                    row["ratio"] = round(best / max(m["MBps"] for m in runs["direct"]), 3)
                summary[test][target] = row
        if "keystroke" in results["runs"]:
            k = {t: statistics.median(v) * 1e3 for t, v in results["runs"]["keystroke"].items()}
            summary["keystroke"] = {t: {"median_ms": round(v, 3), "added_ms": round(v - k["direct"], 3)}
                                    for t, v in k.items()}
        summary["loadavg_end"] = os.getloadavg()
        results["summary"] = summary
        print(f"summary, best of {args.rounds} round(s); ratio = best / best direct; per-round ratios; least CPU")
        for test in ("cat", "sftp"):
            for target, row in summary.get(test, {}).items():
                print(f"  {test:5} {target:11} {row['MBps']:7.1f} MB/s  ratio {row.get('ratio', 1.0):.2f}"
                      f"  rounds {'/'.join(f'{x:.2f}' for x in row['round_ratios'])}"
                      f"  middle {row['middle_ns_per_byte']:.2f} ns/byte"
                      f"  cpu-r {'/'.join(f'{x:.2f}' for x in row['cpu_ratios'])}", flush=True)
        for target, row in summary.get("keystroke", {}).items():
            print(f"  keys  {target:11} median {row['median_ms']:.3f} ms  added {row['added_ms']:+.3f} ms")
        print(f"  load average at the end: {' '.join(f'{x:.1f}' for x in summary['loadavg_end'])}", flush=True)
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
