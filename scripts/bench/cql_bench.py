"""CQL load against one real Cassandra 5.0: direct, a bare trio relay, dbproxy.

Strategy: start one private Cassandra node (``scripts.peers.cassandra_server``;
or ``--node HOST:PORT`` for one already running), create ``bench.kv`` and
preload ``--keys`` rows directly, then start the two middlemen once, each in
its own process, both pointing at the node over loopback TCP:

    relay      ``scripts.bench.relay``: accept, connect, two byte pumps — the
               floor cost of any trio proxy
    dbproxy    ``python -m dbproxy.cli serve`` with one Cassandra listener, the
               proxy's own SASL PLAIN login and a JSONL audit sink; no
               statement rules, so its sessions are tapped: the proxy frames,
               checks and tees, the audit worker runs the CQL audit
               (``engines/cassandra/tap.py``) — its CPU is in ``cpu/kop``

Every target is driven by the same cassandra-driver load at protocol v5 with
LZ4 segments: ``--concurrency`` requests kept in flight with
``execute_async`` for ``--duration`` seconds, after a short warm-up.
Workloads: ``select`` (prepared ``SELECT v FROM bench.kv WHERE k = ?`` on
random preloaded keys) and ``insert`` (prepared ``INSERT`` of new rows).
Rounds interleave the targets so drift on a noisy machine hits all alike,
each round in its own order (``scripts.bench.round_order``: no target always
runs last, behind the same neighbour's memtable flushes and compactions);
we report the best and median ops/s per target and workload, p50/p99
latency, the ratios dbproxy/direct and dbproxy/relay (best over best, and
dbproxy/relay within each round with their median), and the CPU seconds
the middleman used per 1000 operations.

The audit claim is checked, not assumed: after each dbproxy run the
``db.session.cassandra.execute`` events added to the JSONL file are counted
and compared with the operations the driver completed.

The load generator is one Python process using the driver's C extensions;
on a small machine it competes with Cassandra and the proxy for the same
cores (the machine's idle share is printed), so read the ratios, not the
absolute numbers.

``--baseline DIR`` adds ``dbproxy-base``: the same proxy from another checkout
(``PYTHONPATH=DIR``) in every round, before/after under the same load.  CPU is
printed for the middleman's processes together (``cpu/kop``) and, for the
proxies, for the proxy's own process (``proxy loop``: its audit worker excluded).

Runnable: ``scripts/bench/cql [--duration 10 --concurrency 64 --rounds 2 --workloads select,insert --json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import attrs

from scripts.bench import describe_ratios, round_order, round_ratios

ROOT = Path(__file__).resolve().parents[2]
TARGETS = ("direct", "relay", "dbproxy")
WORKLOADS = ("select", "insert")
EXECUTE_MARK = b'"event":"db.session.cassandra.execute"'


# --------------------------------------------------------------------------- processes


def _proc_cpu_seconds(pid: int) -> float:
    """The middleman's CPU: the process and its children (dbproxy's audit worker)."""
    from scripts.bench.pg_bench import _proc_cpu_seconds as tree_cpu_seconds

    return tree_cpu_seconds(pid)


def _own_cpu_seconds(pid: int) -> float:
    """The process alone (dbproxy's proxy loop, without its audit worker)."""
    from scripts.bench.pg_bench import _CLK_TCK, _stat_fields

    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def _wakeups(pid: int) -> int:
    """Times the middleman's processes (every thread, dbproxy's audit worker too) blocked and were
    woken again (voluntary context switches): on a VM a wake-up costs ~100-200 µs of CPU, more than
    most per-operation work, so this is what CPU per operation mostly follows."""
    from scripts.bench.pg_bench import _descendants

    total = 0
    for p in (pid, *_descendants(pid)):
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{p}/task/{task}/status") as f:
                    for line in f:
                        if line.startswith("voluntary_ctxt_switches:"):
                            total += int(line.split()[1])
            except OSError:
                continue
    return total


def _machine_times() -> tuple[int, int]:
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    return parts[3] + parts[4], sum(parts[:8])


class Child:
    """A Python child that prints a 'listening on HOST:PORT' line; output goes to a log."""

    def __init__(self, name: str, argv: list[str], workdir: Path, pattern: str, stop_signal: int = signal.SIGTERM,
                 root: Path = ROOT) -> None:
        self.root = root
        self.name = name
        self.argv = argv
        self.workdir = workdir
        self.pattern = re.compile(pattern)
        self.stop_signal = stop_signal
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def start(self, timeout: float = 90.0) -> "Child":  # a loaded 2-core machine starts dbproxy slowly
        env = dict(os.environ, PYTHONPATH=str(self.root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.workdir,
                                         stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.pattern.search(self.log_path.read_text(errors="replace"))
            if found:
                self.port = int(found.group(1))
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"{self.name} did not start:\n{self.log_path.read_text()[-3000:]}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(self.stop_signal)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_relay(workdir: Path, host: str, port: int) -> Child:
    return Child("relay", [sys.executable, "-m", "scripts.bench.relay", "--upstream", f"{host}:{port}"], workdir,
                 r"relay listening on \S+:(\d+)", stop_signal=signal.SIGINT).start()


def start_dbproxy(workdir: Path, host: str, port: int, user: str, password: str, *, name: str = "dbproxy",
                  root: Path = ROOT) -> tuple[Child, Path]:
    workdir = workdir / name
    workdir.mkdir(exist_ok=True)
    secret = workdir / "backend.secret"
    secret.write_text(password + "\n")
    os.chmod(secret, 0o600)
    audit = workdir / "audit.jsonl"
    config = {
        "listeners": [{
            "name": "bench",
            "protocol": "cassandra",
            "listen": "127.0.0.1:0",
            "routes": [{"name": "bench", "backend": {"address": f"{host}:{port}", "user": user,
                                                     "auth": {"method": "password", "password_file": str(secret)}}}],
        }],
        "audit": {"sinks": [{"type": "jsonl", "path": str(audit)}]},
    }
    path = workdir / "dbproxy.json"
    path.write_text(json.dumps(config, indent=2))
    child = Child(name, [sys.executable, "-m", "dbproxy.cli", "serve", "--config", str(path)], workdir,
                  r"dbproxy: \S+ \(cassandra\) listening on \S+:(\d+)", root=root).start()
    return child, audit


# --------------------------------------------------------------------------- load


def connect(port: int, user: str, password: str):
    from cassandra.auth import PlainTextAuthProvider
    from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
    from cassandra.policies import RoundRobinPolicy

    profile = ExecutionProfile(load_balancing_policy=RoundRobinPolicy(), request_timeout=30)
    cluster = Cluster(["127.0.0.1"], port=port, auth_provider=PlainTextAuthProvider(user, password), protocol_version=5,
                      compression="lz4", execution_profiles={EXEC_PROFILE_DEFAULT: profile}, connect_timeout=15)
    return cluster, cluster.connect()


@attrs.define
class LoadResult:
    ops: int
    errors: int
    seconds: float
    latencies: list

    @property
    def rate(self) -> float:
        return self.ops / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return 0.0
        data = sorted(self.latencies)
        return data[min(len(data) - 1, int(q * len(data)))] * 1000


def run_load(session, statement, make_params, duration: float, concurrency: int, rate: float = 0.0) -> LoadResult:
    """Keep ``concurrency`` requests in flight until ``duration`` is up (the driver's own pattern);
    with ``rate``: start ``rate`` requests a second instead (paced, at most ``concurrency`` in flight)."""
    lock = threading.Lock()
    done = threading.Event()
    state = {"ops": 0, "errors": 0, "inflight": 0, "pacing": bool(rate)}
    latencies: list[float] = []
    deadline = time.monotonic() + duration
    perf = time.perf_counter

    def launch() -> None:
        started = perf()
        future = session.execute_async(statement, make_params())
        future.add_callbacks(finished, failed, callback_args=(started,), errback_args=(started,))

    def finished(_rows, started) -> None:
        latencies.append(perf() - started)
        state["ops"] += 1
        again()

    def failed(_exc, started) -> None:
        state["errors"] += 1
        again()

    def again() -> None:
        if not rate and time.monotonic() < deadline:
            launch()
            return
        with lock:
            state["inflight"] -= 1
            if state["inflight"] == 0 and not state["pacing"]:
                done.set()

    t0 = time.monotonic()
    if rate:
        # Paced: the same operations a second for every target, so CPU per operation compares
        # like with like on a machine whose load swings (the per-wake-up costs depend on the rate).
        due = t0
        while due < deadline:
            with lock:
                room = state["inflight"] < concurrency
                if room:
                    state["inflight"] += 1
            if room:
                launch()
            due += 1.0 / rate
            pause = due - time.monotonic()
            if pause > 0:
                time.sleep(pause)
        with lock:
            state["pacing"] = False
            if state["inflight"] == 0:
                done.set()
    else:
        with lock:
            state["inflight"] = concurrency
        for _ in range(concurrency):
            launch()
    done.wait(duration + 60)
    return LoadResult(state["ops"], state["errors"], time.monotonic() - t0, latencies)


class Workload:
    def __init__(self, name: str, session, keys: int) -> None:
        self.name = name
        self.keys = keys
        if name == "select":
            self.statement = session.prepare("SELECT v FROM bench.kv WHERE k = ?")
            self.params = lambda: (random.randrange(keys),)
        else:
            self.statement = session.prepare("INSERT INTO bench.kv_w (k, v) VALUES (?, ?)")
            counter = iter(range(random.randrange(1 << 40) << 20, 1 << 62))  # new keys every run
            self.params = lambda: (next(counter), "w" * 100)


def prepare_schema(port: int, user: str, password: str, keys: int) -> None:
    from cassandra.concurrent import execute_concurrent_with_args

    cluster, session = connect(port, user, password)
    try:
        session.execute("CREATE KEYSPACE IF NOT EXISTS bench WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1}")
        session.execute("CREATE TABLE IF NOT EXISTS bench.kv (k int PRIMARY KEY, v text)")
        session.execute("CREATE TABLE IF NOT EXISTS bench.kv_w (k bigint PRIMARY KEY, v text)")
        have = session.execute("SELECT count(*) FROM bench.kv").one().count
        if have < keys:
            insert = session.prepare("INSERT INTO bench.kv (k, v) VALUES (?, ?)")
            execute_concurrent_with_args(session, insert, [(k, f"value-{k}" * 4) for k in range(keys)], concurrency=64)
    finally:
        cluster.shutdown()


# --------------------------------------------------------------------------- main


@attrs.define
class Run:
    target: str
    workload: str
    round: int
    rate: float
    ops: int
    errors: int
    p50_ms: float
    p99_ms: float
    cpu_per_kop: float | None
    machine_idle: float
    proxy_cpu_per_kop: float | None = None
    audited: int | None = None
    wakeups_per_op: float | None = None


def _count_marks(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for line in f if EXECUTE_MARK in line)
    except FileNotFoundError:
        return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--rate", type=float, default=0.0,
                    help="start this many requests a second (paced; default: as many as --concurrency allows)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--keys", type=int, default=10_000)
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--node", help="HOST:PORT of a running node (default: start a private one)")
    ap.add_argument("--user", default="cassandra")
    ap.add_argument("--password", default="cassandra")
    ap.add_argument("--json", help="write the runs and the summary here")
    ap.add_argument("--baseline", metavar="DIR",
                    help="add dbproxy-base: the same proxy run from another checkout (PYTHONPATH=DIR), every round")
    args = ap.parse_args(argv)
    workloads = [w for w in args.workloads.split(",") if w]
    targets = [t for t in args.targets.split(",") if t]
    if args.baseline:
        targets.append("dbproxy-base")
    for w in workloads:
        if w not in WORKLOADS:
            ap.error(f"unknown workload {w!r}")
    for t in targets:
        if t not in TARGETS and t != "dbproxy-base":
            ap.error(f"unknown target {t!r}")

    import logging

    logging.getLogger("cassandra").setLevel(logging.ERROR)
    tmp = tempfile.TemporaryDirectory(prefix="dbproxy-cql-bench-")
    workdir = Path(tmp.name)
    node = None
    children: list[Child] = []
    try:
        if args.node:
            host, _, port_text = args.node.rpartition(":")
            host, port = host or "127.0.0.1", int(port_text)
        else:
            from scripts.peers.cassandra_server import start_cassandra

            print("starting a private Cassandra node…", flush=True)
            node = start_cassandra(workdir / "node")
            host, port = node.host, node.port
            print(f"Cassandra {node.release_version} on {host}:{port} (started in {node.start_seconds}s)", flush=True)
        prepare_schema(port, args.user, args.password, args.keys)
        ports = {"direct": port}
        pids: dict[str, int] = {}
        audit_path = None
        audit_paths: dict[str, Path] = {}
        if "relay" in targets:
            relay = start_relay(workdir, host, port)
            children.append(relay)
            ports["relay"], pids["relay"] = relay.port, relay.pid
        if "dbproxy" in targets:
            proxy, audit_path = start_dbproxy(workdir, host, port, args.user, args.password)
            children.append(proxy)
            ports["dbproxy"], pids["dbproxy"] = proxy.port, proxy.pid
            audit_paths["dbproxy"] = audit_path
        if args.baseline:
            base, audit_paths["dbproxy-base"] = start_dbproxy(workdir, host, port, args.user, args.password,
                                                              name="dbproxy-base", root=Path(args.baseline).resolve())
            children.append(base)
            ports["dbproxy-base"], pids["dbproxy-base"] = base.port, base.pid

        proxied = ("dbproxy", "dbproxy-base")
        sessions = {t: connect(ports[t], args.user if t not in proxied else "bench",
                               args.password if t not in proxied else "ignored")
                    for t in targets}
        runs: list[Run] = []
        print(f"v5 + LZ4, concurrency {args.concurrency}, {args.duration:.0f}s per run, {args.rounds} round(s), "
              f"{os.cpu_count()} CPU(s)", flush=True)
        for rnd in range(1, args.rounds + 1):
            for workload_name in workloads:
                for target in round_order(targets, rnd):
                    _, session = sessions[target]
                    wl = Workload(workload_name, session, args.keys)
                    if args.warmup:
                        run_load(session, wl.statement, wl.params, args.warmup, args.concurrency, args.rate)
                    audit_path = audit_paths.get(target)
                    if audit_path:
                        time.sleep(1.0)  # let the warm-up's events reach the file first
                    marks_before = _count_marks(audit_path) if audit_path else 0
                    cpu0 = _proc_cpu_seconds(pids[target]) if target in pids else None
                    own0 = _own_cpu_seconds(pids[target]) if target in pids else None
                    wake0 = _wakeups(pids[target]) if target in pids else None
                    idle0, total0 = _machine_times()
                    result = run_load(session, wl.statement, wl.params, args.duration, args.concurrency, args.rate)
                    idle1, total1 = _machine_times()
                    cpu = (_proc_cpu_seconds(pids[target]) - cpu0) if cpu0 is not None else None
                    own = (_own_cpu_seconds(pids[target]) - own0) if own0 is not None else None
                    wakes = (_wakeups(pids[target]) - wake0) if wake0 is not None else None
                    audited = None
                    if audit_path:
                        time.sleep(1.0)  # the drain task writes asynchronously
                        audited = _count_marks(audit_path) - marks_before
                    run = Run(target, workload_name, rnd, round(result.rate, 1), result.ops, result.errors,
                              round(result.percentile(0.5), 2), round(result.percentile(0.99), 2),
                              round(cpu / result.ops * 1000, 3) if cpu is not None and result.ops else None,
                              round((idle1 - idle0) / max(1, total1 - total0), 3),
                              round(own / result.ops * 1000, 3) if own is not None and result.ops else None, audited,
                              round(wakes / result.ops, 2) if wakes is not None and result.ops else None)
                    runs.append(run)
                    extra = f"  cpu/kop {run.cpu_per_kop:.3f}s" if run.cpu_per_kop is not None else ""
                    if target in proxied and run.proxy_cpu_per_kop is not None:
                        extra += f" (proxy loop {run.proxy_cpu_per_kop:.3f}s)"
                    if run.wakeups_per_op is not None:
                        extra += f"  wake-ups/op {run.wakeups_per_op:.2f}"
                    if audited is not None:
                        extra += f"  audited {audited} (ops {result.ops}, errors {result.errors})"
                    print(f"round {rnd} {workload_name:6s} {target:12s} {run.rate:9.0f} ops/s  p50 {run.p50_ms:6.2f} ms  "
                          f"p99 {run.p99_ms:7.2f} ms  idle {run.machine_idle:.0%}{extra}", flush=True)
        for cluster, _ in sessions.values():
            cluster.shutdown()

        summary: dict = {}

        def rate_of(workload: str):
            rates = {(r.target, r.round): r.rate for r in runs if r.workload == workload}
            return lambda target, rnd: rates.get((target, rnd))

        print("\nsummary (best / median ops/s)")
        for workload_name in workloads:
            best = {}
            for target in targets:
                rates = [r.rate for r in runs if r.target == target and r.workload == workload_name]
                best[target] = max(rates)
                summary.setdefault(workload_name, {})[target] = {"best": max(rates), "median": statistics.median(rates)}
                print(f"  {workload_name:6s} {target:8s} {max(rates):9.0f} / {statistics.median(rates):9.0f}")
            if "dbproxy" in best and "direct" in best:
                ratio = best["dbproxy"] / best["direct"]
                summary[workload_name]["dbproxy/direct"] = round(ratio, 3)
                print(f"  {workload_name:6s} dbproxy/direct = {ratio:.2f}")
            for proxied in ("dbproxy", "dbproxy-base"):
                if proxied in best and "relay" in best:
                    ratio = best[proxied] / best["relay"]
                    summary[workload_name][f"{proxied}/relay"] = round(ratio, 3)
                    print(f"  {workload_name:6s} {proxied}/relay = {ratio:.2f}")
                    paired = round_ratios(rate_of(workload_name), proxied, "relay", args.rounds)
                    summary[workload_name][f"{proxied}/relay by round"] = [round(r, 3) for r in paired]
                    print(f"  {workload_name:6s} {proxied}/relay by round: {describe_ratios(paired)}")
        audited_runs = [r for r in runs if r.audited is not None]
        if audited_runs:
            ok = all(r.audited >= r.ops for r in audited_runs)
            print(f"\naudit: every completed EXECUTE audited: {'yes' if ok else 'NO'} "
                  f"({sum(r.audited for r in audited_runs)} events for {sum(r.ops for r in audited_runs)} operations)")
        if args.json:
            Path(args.json).write_text(json.dumps({"runs": [attrs.asdict(r) for r in runs], "summary": summary}, indent=2))
        return 0
    finally:
        for child in children:
            child.stop()
        if node is not None:
            node.stop()
        tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
