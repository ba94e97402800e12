"""pgbench -S through dbproxy with ``"workers": 1`` and ``"workers": N``: TPS and the ratio.

Strategy: one private PostgreSQL 15 (``scripts.peers.postgres``, TLS off),
``pgbench -i`` once, then two proxies started once each, same config but
``"workers"`` (1, and ``--workers N``, default 2), each on its own fixed port
(SO_REUSEPORT needs one).  Rounds are interleaved (1, N, 1, N…) so drift on
a noisy machine hits both alike; we print the best and median TPS of each
and best(N)/best(1).  Also reported: the CPU seconds each proxy used (the
supervisor and all its children: the N proxy processes and the audit
worker), the machine's idle share during each run, how pgbench's
connections were spread over the processes (from the audit's
``proxy_worker``), and the audit check of ``scripts/bench/pg`` (one query
event per transaction, at least).

Read the ratio with the machine in mind: the output says how many cores
there are, and PostgreSQL and pgbench run on the same ones.  When the
machine's idle share is near zero with one proxy process, a second one has
no core to run on and can only trade places with PostgreSQL and pgbench.

Runnable: ``scripts/bench/workers [--workers 2 --clients 16 --threads 2 --duration 15 --rounds 2]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import orjson

from scripts.bench.pg_bench import (AUDIT_EVENT, AuditCounter, ChildProcess, _descendants, _stat_fields, pgbench,
                                    pgbench_init, proxy_config, run_target)
from scripts.peers import free_port
from scripts.peers.postgres import start_postgres


def _spread(audit: Path) -> dict[int, int]:
    """Sessions per proxy process, from the audit's session start events."""
    counts: dict[int, int] = {}
    with open(audit, "rb") as f:
        for line in f:
            if b'"event":"db.session.start"' in line:
                event = orjson.loads(line)
                counts[event.get("proxy_worker", 0)] = counts.get(event.get("proxy_worker", 0), 0) + 1
    return dict(sorted(counts.items()))


def _audit_worker_cpu(pid: int) -> float:
    """CPU seconds of the proxy's audit worker (one per proxy, whatever the number of workers):
    the one serial part, so what bounds the scaling."""
    for child in _descendants(pid):
        try:
            with open(f"/proc/{child}/cmdline", "rb") as f:
                if b"dbproxy.audit.worker" not in f.read():
                    continue
            fields = _stat_fields(child)
        except OSError:
            continue
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/bench/workers", description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=2, help="proxy processes to compare with one")
    ap.add_argument("--clients", "-c", type=int, default=16)
    ap.add_argument("--threads", "-j", type=int, default=2)
    ap.add_argument("--duration", "-T", type=int, default=15, help="seconds per run")
    ap.add_argument("--scale", "-s", type=int, default=5, help="pgbench -i scale")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds of both")
    ap.add_argument("--protocol", "-M", default="simple", choices=["simple", "extended", "prepared"])
    ap.add_argument("--json", type=Path, help="write the results as JSON here")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs, audit files, configs)")
    args = ap.parse_args(argv)
    if args.workers < 2:
        ap.error("--workers: at least 2 (it is compared with 1)")

    base = Path(tempfile.mkdtemp(prefix="dbproxy-bench-workers-"))
    os.chmod(base, 0o755)
    pg = None
    proxies: dict[int, tuple] = {}
    runs = []
    audit_cpu: dict[int, float] = {}  # id(run) -> the audit worker's CPU seconds during it
    try:
        pg = start_postgres(base, ssl=False)
        user, password = pg.users["scram-sha-256"]
        pgbench_init(pg, user, password, args.scale)
        for n in (1, args.workers):
            config, audit = proxy_config(base, pg, user, password, name=f"dbproxy-w{n}")
            doc = json.loads(config.read_text())
            doc["listeners"][0]["listen"] = f"127.0.0.1:{free_port()}"
            doc["workers"] = n
            config.write_text(json.dumps(doc, indent=2))
            # N + 2 Python processes to start (supervisor, audit worker, proxies): give them time.
            child = ChildProcess(f"dbproxy-w{n}", [sys.executable, "-m", "dbproxy.cli", "serve", "--config", str(config)],
                                 base, r"dbproxy: \S+ \(postgres\) listening on \S+:(\d+)").start(timeout=120)
            counter = AuditCounter(audit, AUDIT_EVENT[args.protocol])
            counter.settle(0, timeout=1.0)
            proxies[n] = (child, counter, audit)
        pgbench(pg, pg.port, user, password, args, 3)  # warm the server's caches
        for rnd in range(1, args.rounds + 1):
            for n, (child, counter, _) in proxies.items():
                audit0 = _audit_worker_cpu(child.pid)
                run = run_target(f"workers={n}", rnd, child.port, child.pid, pg, user, password, args, counter)
                audit_cpu[id(run)] = _audit_worker_cpu(child.pid) - audit0
                runs.append(run)
                print(f"round {rnd} workers={n:<3} {run.tps:10.1f} tps  proxy CPU {run.middle_cpu_s:.1f}s "
                      f"(audit worker {audit_cpu[id(run)]:.1f}s)  machine idle {run.machine_idle:.0%}  "
                      f"audit {run.audit_queries} queries", file=sys.stderr, flush=True)
        summary = {}
        for n, (child, counter, audit) in proxies.items():
            mine = [r for r in runs if r.target == f"workers={n}"]
            txns = sum(r.transactions for r in mine)
            summary[n] = {
                "best_tps": max(r.tps for r in mine), "median_tps": statistics.median(r.tps for r in mine),
                "cpu_us_per_txn": statistics.median(r.cpu_us_per_txn for r in mine),
                "audit_worker_us_per_txn": statistics.median(audit_cpu[id(r)] / r.transactions * 1e6 for r in mine),
                "machine_idle": statistics.median(r.machine_idle for r in mine),
                "audit_ok": counter.total >= txns, "sessions_by_process": _spread(audit),
            }
        cores = os.cpu_count()
        print()
        print(f"pgbench -S -M {args.protocol} -c {args.clients} -j {args.threads} -T {args.duration}, "
              f"{args.rounds} rounds, scale {args.scale}")
        print(f"machine: {cores} cores, shared by PostgreSQL, pgbench and the proxy processes "
              f"(and whatever else runs here: load average {os.getloadavg()[0]:.1f})")
        for n, s in summary.items():
            print(f"  workers={n:<3} best {s['best_tps']:10.1f} tps  median {s['median_tps']:10.1f} tps  "
                  f"proxy {s['cpu_us_per_txn']:.0f} µs CPU/txn (audit worker {s['audit_worker_us_per_txn']:.0f})  "
                  f"machine idle {s['machine_idle']:.0%}  "
                  f"sessions by process {s['sessions_by_process']}  audit {'ok' if s['audit_ok'] else 'SHORT'}")
        ratio = summary[args.workers]["best_tps"] / summary[1]["best_tps"]
        print(f"  ratio workers={args.workers}/workers=1 (best): {ratio:.2f}")
        s1 = summary[1]
        per_process = s1["cpu_us_per_txn"] - s1["audit_worker_us_per_txn"]
        print(f"  a larger machine (a core per proxy process and one for the audit worker, PostgreSQL elsewhere): "
              f"a proxy process costs {per_process:.0f} µs CPU per transaction, the one audit worker "
              f"{s1['audit_worker_us_per_txn']:.0f} µs; N processes should give about N × {1e6 / per_process:,.0f} tps "
              f"until the audit worker's core is full at about {1e6 / max(1.0, s1['audit_worker_us_per_txn']):,.0f} tps")
        if summary[1]["machine_idle"] < 0.15:
            print(f"  note: with one proxy process the machine was {1 - summary[1]['machine_idle']:.0%} busy: "
                  f"a second process has no idle core here, so this ratio says little about a larger machine")
        if args.json:
            args.json.write_text(json.dumps({"cores": cores, "ratio": ratio, "summary": summary,
                                             "runs": [{"target": r.target, "round": r.round, "tps": r.tps,
                                                       "proxy_cpu_s": r.middle_cpu_s, "machine_idle": r.machine_idle}
                                                      for r in runs]}, indent=2, default=str))
        return 0
    finally:
        for child, _, _ in proxies.values():
            child.stop()
        if pg is not None:
            pg.stop()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
        else:
            print(f"kept {base}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
