"""Small Mongo operations through dbproxy vs direct: pymongo against one real FerretDB.

Strategy: start one private FerretDB 1.24 (``scripts.peers.ferretdb_server``,
SCRAM auth on, SQLite), seed a collection of ``SEED_DOCS`` documents (few:
FerretDB 1.24 on SQLite scans the collection even for a find by ``_id``, and
the benchmark wants the backend's cost per operation low so the proxy's share
shows), then start the two middlemen once,
each in its own process, pointing at the same server over loopback TCP:

    relay      ``scripts.bench.relay``: accept, connect, two byte pumps — the
               floor cost of any trio proxy (clients log in through it)
    dbproxy    ``python -m dbproxy.cli serve`` with one Mongo listener, the
               proxy's own SCRAM-SHA-256 backend login and a JSONL audit sink
               (clients send no credentials)

A run starts ``--clients`` worker *processes* (so the load generator is not
one GIL), each with its own ``MongoClient`` (one pooled connection).  After
connecting they wait for a common start instant, then loop for
``--duration`` seconds: ``find_one({_id: k})`` on the seeded collection,
then ``insert_one`` of a small document (into a database of its own: FerretDB's
SQLite backend locks per database file) — two operations per iteration —
and report how many operations they completed.  Rounds are interleaved so
machine drift hits every target alike, and each round runs the targets in
its own order (``scripts.bench.round_order``: no target always runs last, on
the fullest SQLite file).  We report best and median ops/s per target and the
ratios dbproxy/direct, dbproxy/relay and relay/direct, plus the CPU time
the middleman used per operation (``/proc/PID/stat``).

The audit claim is checked, not assumed: after each dbproxy run the
``db.session.query`` events for ``find``/``insert`` appended to the JSONL
file must be at least the operations the workers counted (in-flight ones at
the deadline are audited but not counted).

FerretDB on SQLite is itself slow (hundreds of µs per operation), so on a
2-core machine the proxy competes with it and the workers for CPU: read the
ratio together with the CPU column.

``--baseline DIR`` adds ``dbproxy-base``, the same proxy config run from another
checkout (``PYTHONPATH=DIR``), in every round: before/after under the same load.
CPU is reported for the middleman's processes together and, in brackets, for
the proxy's own process (its loop; dbproxy's audit worker excluded).

Runnable: ``scripts/bench/mongo [--clients 4 --duration 10 --rounds 2 --json out.json --baseline /work/main]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scripts.bench import describe_ratios, round_order, round_ratios

ROOT = Path(__file__).resolve().parents[2]
TARGETS = ("direct", "relay", "dbproxy")
SEED_DOCS = 100


def _cpu_seconds(pid: int) -> tuple[float, float]:
    """The middleman's CPU: (the process and its children — dbproxy's audit worker —, the
    process alone: the proxy's own loop, which every operation waits on)."""
    from scripts.bench.pg_bench import _CLK_TCK, _proc_cpu_seconds, _stat_fields

    fields = _stat_fields(pid)
    return _proc_cpu_seconds(pid), (int(fields[11]) + int(fields[12])) / _CLK_TCK


class Child:
    """A Python child process that prints a line with its port; output goes to a log file."""

    def __init__(self, name: str, argv: list[str], workdir: Path, pattern: str, root: Path = ROOT) -> None:
        self.name, self.argv, self.workdir, self.root = name, argv, workdir, root
        self.pattern = re.compile(pattern)
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def start(self, timeout: float = 30.0) -> "Child":
        env = dict(os.environ)
        env["PYTHONPATH"] = str(self.root) + os.pathsep + env.get("PYTHONPATH", "")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         cwd=self.workdir, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.pattern.search(self.log_path.read_text(errors="replace"))
            if found:
                self.port = int(found.group(1))
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"{self.name} did not start:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _audit_queries(path: Path, offset: int) -> tuple[int, int]:
    """(find/insert query events after ``offset``, new offset)."""
    count = 0
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1
    for line in data[:end].splitlines():
        if b'"event":"db.session.query"' in line and (b'"command":"find"' in line or b'"command":"insert"' in line):
            count += 1
    return count, offset + end


# --------------------------------------------------------------------------- worker


def worker(uri: str, start_at: float, duration: float, seed: int) -> None:
    """One load process: connect, wait for ``start_at``, loop find_one + insert_one, print a JSON line."""
    import pymongo

    rng = random.Random(seed)
    with pymongo.MongoClient(uri, maxPoolSize=1, serverSelectionTimeoutMS=20_000) as client:
        coll = client.bench.items
        # One database per worker: FerretDB keeps a SQLite file per database, and writers to one file serialise.
        sink = client[f"bench_w{seed}"].writes
        coll.find_one({"_id": 0})
        sink.insert_one({"warm": True})
        time.sleep(max(0.0, start_at - time.time()))
        ops = 0
        deadline = time.monotonic() + duration
        t0 = time.monotonic()
        while time.monotonic() < deadline:
            k = rng.randrange(SEED_DOCS)
            if coll.find_one({"_id": k})["_id"] != k:
                raise AssertionError("wrong document")
            sink.insert_one({"k": k, "w": seed})
            ops += 2
        elapsed = time.monotonic() - t0
    print(json.dumps({"ops": ops, "seconds": elapsed}), flush=True)


def run_load(uri: str, clients: int, duration: float) -> tuple[int, float]:
    start_at = time.time() + 3.0
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "scripts.bench.mongo_bench", "--worker", uri, str(start_at), str(duration), str(i)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
        )
        for i in range(clients)
    ]
    ops, seconds = 0, 0.0
    for p in procs:
        out, err = p.communicate(timeout=duration + 120)
        if p.returncode != 0:
            raise RuntimeError(f"worker failed: {err.strip()[-2000:]}")
        result = json.loads(out.strip().splitlines()[-1])
        ops += result["ops"]
        seconds = max(seconds, result["seconds"])
    return ops, seconds


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=4, help="worker processes (default 4)")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per run (default 10)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    ap.add_argument("--targets", default=",".join(TARGETS), help="comma-separated subset of direct,relay,dbproxy")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--baseline", metavar="DIR",
                    help="also run target dbproxy-base: dbproxy from another checkout (e.g. /work/main), same config")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, audit file)")
    ap.add_argument("--worker", nargs=4, metavar=("URI", "START_AT", "DURATION", "SEED"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        uri, start_at, duration, seed = args.worker
        worker(uri, float(start_at), float(duration), int(seed))
        return 0

    from scripts.peers.ferretdb_server import start_ferretdb

    targets = [t for t in args.targets.split(",") if t]
    workdir = Path(tempfile.mkdtemp(prefix="dbproxy-mongo-bench-"))
    children: list[Child] = []
    server = start_ferretdb(workdir / "ferretdb")
    try:
        with server.client() as c:
            c.bench.items.drop()
            c.bench.items.insert_many([{"_id": i, "name": f"item-{i}", "qty": i % 100} for i in range(SEED_DOCS)])
        secret = workdir / "backend.secret"
        secret.write_text(server.password + "\n")
        os.chmod(secret, 0o600)
        audit = workdir / "audit.jsonl"
        config = {
            "listeners": [{
                "name": "bench", "protocol": "mongo", "listen": "127.0.0.1:0",
                "routes": [{"name": "bench", "backend": {
                    "address": f"{server.host}:{server.port}", "user": server.user,
                    "auth": {"method": "scram-sha-256", "password_file": str(secret)},
                }}],
            }],
            "audit": {"sinks": [{"type": "jsonl", "path": str(audit)}]},
        }
        (workdir / "dbproxy.json").write_text(json.dumps(config, indent=2))
        relay = Child("relay", [sys.executable, "-m", "scripts.bench.relay", "--upstream", f"{server.host}:{server.port}"],
                      workdir, r"relay listening on \S+:(\d+)").start()
        children.append(relay)
        proxy = Child("dbproxy", [sys.executable, "-m", "dbproxy.cli", "serve", "--config", str(workdir / "dbproxy.json")],
                      workdir, r"dbproxy: \S+ \(mongo\) listening on \S+:(\d+)").start()
        children.append(proxy)
        audits = {"dbproxy": audit}
        middle = {"relay": relay, "dbproxy": proxy}
        if args.baseline:
            base_dir = workdir / "base"
            base_dir.mkdir()
            audits["dbproxy-base"] = base_dir / "audit.jsonl"
            config["audit"]["sinks"][0]["path"] = str(audits["dbproxy-base"])
            (base_dir / "dbproxy.json").write_text(json.dumps(config, indent=2))
            middle["dbproxy-base"] = Child("dbproxy", [sys.executable, "-m", "dbproxy.cli", "serve", "--config",
                                                       str(base_dir / "dbproxy.json")], base_dir,
                                           r"dbproxy: \S+ \(mongo\) listening on \S+:(\d+)",
                                           root=Path(args.baseline).resolve()).start()
            children.append(middle["dbproxy-base"])
            if "dbproxy-base" not in targets:
                targets.append("dbproxy-base")
        uris = {
            "direct": server.uri("admin"),
            "relay": server.uri("admin").replace(f":{server.port}/", f":{relay.port}/"),
            **{name: f"mongodb://127.0.0.1:{child.port}/" for name, child in middle.items() if name != "relay"},
        }
        print(f"FerretDB {server.host}:{server.port}; {args.clients} client processes, {args.duration:.0f} s per run, "
              f"{args.rounds} rounds; seeded {SEED_DOCS} documents", flush=True)
        runs: list[dict] = []
        audit_offsets = dict.fromkeys(audits, 0)
        for rnd in range(1, args.rounds + 1):
            for target in round_order(targets, rnd):
                child = middle.get(target)
                cpu0 = _cpu_seconds(child.proc.pid) if child else None
                ops, seconds = run_load(uris[target], args.clients, args.duration)
                cpu = own = None
                if child:
                    cpu1 = _cpu_seconds(child.proc.pid)
                    cpu, own = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
                run = {"target": target, "round": rnd, "ops": ops, "ops_per_s": ops / seconds,
                       "middle_cpu_s": cpu, "cpu_us_per_op": (cpu / ops * 1e6) if cpu is not None and ops else None,
                       "loop_cpu_us_per_op": (own / ops * 1e6) if own is not None and ops else None}
                if target in audits:
                    time.sleep(1.0)  # the drain task writes asynchronously
                    audited, audit_offsets[target] = _audit_queries(audits[target], audit_offsets[target])
                    run["audit_queries"] = audited
                    if audited < ops:
                        raise AssertionError(f"audit has {audited} find/insert queries for {ops} operations")
                runs.append(run)
                extra = (f"  middleman CPU {cpu:.2f} s ({run['cpu_us_per_op']:.0f} µs/op; "
                         f"its own loop {run['loop_cpu_us_per_op']:.0f} µs/op)") if cpu is not None else ""
                aud = f"  audited {run['audit_queries']}" if "audit_queries" in run else ""
                print(f"round {rnd} {target:8s} {run['ops_per_s']:9.0f} ops/s ({ops} ops){extra}{aud}", flush=True)
        summary: dict[str, dict] = {}
        for target in targets:
            rates = [r["ops_per_s"] for r in runs if r["target"] == target]
            summary[target] = {"best": max(rates), "median": statistics.median(rates)}
        for target in targets:
            cpus = [r["cpu_us_per_op"] for r in runs if r["target"] == target and r["cpu_us_per_op"] is not None]
            loops = [r["loop_cpu_us_per_op"] for r in runs if r["target"] == target and r["loop_cpu_us_per_op"] is not None]
            if cpus:
                summary[target].update(cpu_us_per_op=statistics.median(cpus), loop_cpu_us_per_op=statistics.median(loops))
        print("\ntarget        best ops/s   median ops/s   median CPU µs/op (own loop)")
        for target in targets:
            t = summary[target]
            cpu = f"{t['cpu_us_per_op']:10.0f} ({t['loop_cpu_us_per_op']:.0f})" if "cpu_us_per_op" in t else ""
            print(f"{target:12s} {t['best']:11.0f} {t['median']:14.0f}   {cpu}")
        ratios = {}
        for a, b in (("dbproxy", "direct"), ("dbproxy", "relay"), ("relay", "direct"), ("dbproxy-base", "relay"),
                     ("dbproxy", "dbproxy-base")):
            if a in summary and b in summary:
                ratios[f"{a}/{b}"] = summary[a]["median"] / summary[b]["median"]
                print(f"ratio {a}/{b} (median): {ratios[f'{a}/{b}']:.2f}")
        rates = {(r["target"], r["round"]): r["ops_per_s"] for r in runs}
        for a, b in (("dbproxy", "relay"), ("dbproxy-base", "relay")):
            if a in summary and b in summary:
                paired = round_ratios(lambda t, rnd: rates.get((t, rnd)), a, b, args.rounds)
                ratios[f"{a}/{b} by round"] = paired
                print(f"ratio {a}/{b} by round: {describe_ratios(paired)}")
        if args.json:
            Path(args.json).write_text(json.dumps({"runs": runs, "summary": summary, "ratios": ratios,
                                                   "clients": args.clients, "duration": args.duration}, indent=2))
    finally:
        for child in children:
            child.stop()
        server.stop()
        if args.keep:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
