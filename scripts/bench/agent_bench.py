"""pgbench -S and bulk COPY through the outbound agent vs through the proxy alone.

Strategy: one private PostgreSQL 15 (``scripts.peers.postgres``, TLS off),
``pgbench -i``; one ``dbproxy serve`` with two Postgres listeners in front of
the same server and the same SCRAM backend login — ``direct`` (the proxy
dials PostgreSQL itself) and ``agent`` (the route says ``"via":
"agent:bench"``) — and one ``dbproxy agent`` process linked to the proxy's
agents listener over TLS (all on loopback: what is measured is the tunnel's
cost — TLS, HTTP/2 framing, flow control and one more process hop — not a
network).  Rounds are interleaved (direct, agent, direct, agent…) so drift on
a noisy machine hits both alike.

Reported: pgbench TPS per target (best and median), the ratio agent/direct,
the CPU seconds per transaction of the proxy and of the agent, and bulk
``COPY … TO STDOUT`` (download) and ``COPY … FROM STDIN`` (upload) MB/s
through each listener with psycopg.

Runnable: ``scripts/bench/agent [--clients 8 --threads 2 --duration 10 --rounds 2 --copy-mb 200 --json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from scripts.bench.pg_bench import _proc_cpu_seconds, pgbench, pgbench_init
from scripts.peers import free_port
from scripts.peers.certs import make_ca, make_cert
from scripts.peers.postgres import start_postgres

ROOT = Path(__file__).resolve().parents[2]
TARGETS = ("direct", "agent")


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _cli(*args: str) -> str:
    p = subprocess.run([sys.executable, "-m", "dbproxy.cli", *args], capture_output=True, text=True, env=_env(),
                       timeout=60)
    if p.returncode != 0:
        raise RuntimeError(f"dbproxy {' '.join(args[:2])} failed: {p.stderr}")
    return p.stdout.strip()


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(f"timed out waiting for {what}")


def start(workdir: Path, pg, user: str, password: str):
    _cli("token", "keygen", "--algorithm", "EdDSA", "--key-file", str(workdir / "token.key"),
         "--public-key-file", str(workdir / "token.pub"))
    ca = make_ca(workdir / "tls")
    cert, key = make_cert(workdir / "tls", ca, "dbproxy", sans=["127.0.0.1"])
    (workdir / "backend.secret").write_text(password + "\n")
    backend = {"address": f"{pg.host}:{pg.port}", "database": "app", "user": user,
               "auth": {"method": "scram-sha-256", "password_file": str(workdir / "backend.secret")}}
    admin = free_port()
    config = {
        "identity": {"token": {"algorithm": "EdDSA", "key_file": "token.key", "public_key_file": "token.pub"}},
        "roles": {"db": {"routes": ["*"], "databases": ["*"], "db_users": ["*"]}},
        "agents": {"listen": "127.0.0.1:0", "tls": {"cert_file": str(cert), "key_file": str(key)}},
        "admin": {"listen": f"127.0.0.1:{admin}"},
        "listeners": [
            {"name": "direct", "protocol": "postgres", "listen": "127.0.0.1:0", "auth": {"methods": ["anonymous"], "anonymous_roles": ["db"]},
             "routes": [{"name": "direct", "backend": backend}]},
            {"name": "agent", "protocol": "postgres", "listen": "127.0.0.1:0", "auth": {"methods": ["anonymous"], "anonymous_roles": ["db"]},
             "routes": [{"name": "agent", "backend": {**backend, "via": "agent:bench"}}]},
        ],
        "audit": {"sinks": [{"type": "jsonl", "path": "audit.jsonl"}]},
    }
    (workdir / "proxy.json").write_text(json.dumps(config, indent=2))
    log = open(workdir / "proxy.log", "wb")
    proxy = subprocess.Popen([sys.executable, "-m", "dbproxy.cli", "serve", "--config", "proxy.json"], cwd=workdir,
                             stdout=log, stderr=subprocess.STDOUT, env=_env())
    pattern = re.compile(r"dbproxy: (\S+) \([\w-]+\) listening on \S+:(\d+)")

    def ports() -> dict | None:
        found = {m.group(1): int(m.group(2)) for m in pattern.finditer((workdir / "proxy.log").read_text())}
        if proxy.poll() is not None:
            raise RuntimeError((workdir / "proxy.log").read_text())
        return found if {"direct", "agent", "agents"} <= found.keys() else None

    found = _wait(ports, 30, "the proxy")
    (workdir / "node.token").write_text(_cli("token", "issue", "--config", str(workdir / "proxy.json"), "--node",
                                             "bench", "--ttl", "1h") + "\n")
    alog = open(workdir / "agent.log", "wb")
    agent = subprocess.Popen([sys.executable, "-m", "dbproxy.cli", "agent", "--proxy", f"127.0.0.1:{found['agents']}",
                              "--name", "bench", "--token-file", str(workdir / "node.token"), "--ca-file", str(ca[0]),
                              "--allow", f"{pg.host}:{pg.port}"], stdout=alog, stderr=subprocess.STDOUT, env=_env())

    def linked() -> bool:
        if agent.poll() is not None:
            raise RuntimeError((workdir / "agent.log").read_text())
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/api/nodes", timeout=5) as r:
            return bool(json.loads(r.read())["nodes"])

    _wait(linked, 30, "the agent to link up")
    return proxy, agent, found


def copy_mb_s(port: int, mb: int, *, upload: bool) -> float:
    import psycopg

    with psycopg.connect(host="127.0.0.1", port=port, user="bench", dbname="app", password="x", sslmode="disable",
                         autocommit=True) as conn:
        with conn.cursor() as cur:
            began = time.monotonic()
            if upload:
                cur.execute("CREATE TEMP TABLE IF NOT EXISTS sink (t text)")
                row = b"z" * 1023 + b"\n"
                block = row * 256  # 256 KiB
                with cur.copy("COPY sink FROM STDIN") as copy:
                    for _ in range(mb * 4):
                        copy.write(block)
                cur.execute("TRUNCATE sink")
            else:
                got = 0
                with cur.copy(f"COPY (SELECT repeat('y', 1023) FROM generate_series(1, {mb * 1024})) TO STDOUT") as copy:
                    for data in copy:
                        got += len(data)
                assert got == mb * 1024 * 1024, got
            return mb / (time.monotonic() - began)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--scale", type=int, default=5)
    ap.add_argument("--copy-mb", type=int, default=200)
    ap.add_argument("--protocol", default="simple", choices=("simple", "extended", "prepared"))
    ap.add_argument("--json", help="write the figures here too")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="dbproxy-agent-bench-"))
    pg = proxy = agent = None
    try:
        pg = start_postgres(workdir / "pg", ssl=False)
        user, password = pg.users["scram-sha-256"]
        pgbench_init(pg, user, password, args.scale)
        proxy, agent, ports = start(workdir, pg, user, password)
        runs: dict[str, list[dict]] = {t: [] for t in TARGETS}
        for rnd in range(args.rounds):
            for target in TARGETS:
                cpu0 = (_proc_cpu_seconds(proxy.pid), _proc_cpu_seconds(agent.pid))
                tps, txns, latency, _, _ = pgbench(pg, ports[target], user, password, args, args.duration)
                cpu1 = (_proc_cpu_seconds(proxy.pid), _proc_cpu_seconds(agent.pid))
                run = {"round": rnd + 1, "tps": tps, "txns": txns, "latency_ms": latency,
                       "proxy_us_cpu_per_txn": (cpu1[0] - cpu0[0]) / txns * 1e6,
                       "agent_us_cpu_per_txn": (cpu1[1] - cpu0[1]) / txns * 1e6}
                runs[target].append(run)
                print(f"round {rnd + 1} {target:<6} {tps:9.0f} tps  latency {latency} ms  proxy "
                      f"{run['proxy_us_cpu_per_txn']:.0f} µs CPU/txn  agent {run['agent_us_cpu_per_txn']:.0f} µs CPU/txn",
                      flush=True)
        copies = {}
        for target in TARGETS:
            copies[target] = {"download_mb_s": copy_mb_s(ports[target], args.copy_mb, upload=False),
                              "upload_mb_s": copy_mb_s(ports[target], args.copy_mb, upload=True)}
            print(f"COPY {target:<6} download {copies[target]['download_mb_s']:6.1f} MB/s  "
                  f"upload {copies[target]['upload_mb_s']:6.1f} MB/s ({args.copy_mb} MB)", flush=True)
        summary = {t: {"best_tps": max(r["tps"] for r in runs[t]), "median_tps": statistics.median(r["tps"] for r in runs[t])}
                   for t in TARGETS}
        ratio = summary["agent"]["median_tps"] / summary["direct"]["median_tps"]
        print()
        print(f"pgbench -S -c {args.clients} -j {args.threads} -T {args.duration} x {args.rounds} rounds "
              f"(scale {args.scale}, {args.protocol}), {os.cpu_count()} CPUs")
        for t in TARGETS:
            print(f"  {t:<6} best {summary[t]['best_tps']:8.0f} tps   median {summary[t]['median_tps']:8.0f} tps")
        print(f"  agent/direct (median TPS): {ratio:.2f}")
        print(f"  bulk COPY through the agent: download {copies['agent']['download_mb_s']:.1f} MB/s "
              f"(direct {copies['direct']['download_mb_s']:.1f}), upload {copies['agent']['upload_mb_s']:.1f} MB/s "
              f"(direct {copies['direct']['upload_mb_s']:.1f})")
        if args.json:
            Path(args.json).write_text(json.dumps({"runs": runs, "summary": summary, "ratio_agent_direct": ratio,
                                                   "copy": copies, "args": vars(args)}, indent=2))
        return 0
    finally:
        for proc in (agent, proxy):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
        if pg is not None:
            pg.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
