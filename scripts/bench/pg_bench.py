"""pgbench -S against one real PostgreSQL: direct, pgbouncer, a bare trio relay, dbproxy.

Strategy: start one private PostgreSQL 15 (``scripts.peers.postgres``, TLS off
so no path negotiates it), ``pgbench -i`` it directly as the SCRAM user, then
start the three middlemen once, each in its own process, all pointing at the
same server over loopback TCP:

    pgbouncer  session mode (the Debian package; ``scripts.peers.pgbouncer``)
    relay      ``scripts.bench.relay``: accept, connect, two byte pumps on
               trio's ``SocketStream`` (``receive_some``/``send_all``) — the
               floor cost of a trio proxy built on trio's streams
    relay-lean the same relay on dbproxy's own socket I/O (``--lean``): the
               floor for dbproxy's way of moving bytes, so dbproxy/relay-lean
               is what the pipeline and the audit cost on top of it
    dbproxy    ``python -m dbproxy.cli serve`` with one Postgres listener, a
               SCRAM backend login and a JSONL audit sink
    dbproxy-ack the same with ``"audit": {"durability": "ack"}``: every
               answer waits until its audit record is written and fsync'd
               (group commit in the audit worker), so dbproxy-ack/dbproxy is
               the price of that promise

Each round runs ``pgbench -n -S`` (same clients, threads, duration) against
direct, pgbouncer, relay, dbproxy in that order; rounds are interleaved so
drift on a noisy machine hits every target alike.  We report the best and the
median TPS per target and the ratios dbproxy/relay (the target: ≥ 0.8),
dbproxy/direct, dbproxy/pgbouncer, relay/direct.  For each run we also record
the CPU seconds the middleman used (``/proc/PID/stat`` of the process and
its children: dbproxy's audit worker is a child process) and the
machine's idle share, because on a 2-core box the proxy competes with
PostgreSQL and pgbench for the same cores.

The audit claim is checked, not assumed: after every dbproxy run we count the
``db.session.query`` events (``…statements.execute`` with ``-M
extended|prepared``) appended to the JSONL file and compare with the
transactions pgbench reports (one Query or Execute per ``-S`` transaction;
pgbench's in-flight queries at the deadline count in the audit but not in
pgbench's total, so audit ≥ transactions by at most the client count).

``--sink relp|syslog|syslog-close|http|kafka|pg_table`` adds a network audit
sink to the dbproxy target (in front of the JSONL file, the proxy's ground
truth): RELP or syslog over TCP to a private real rsyslog
(``scripts.peers.rsyslog``: ``syslog`` is the kept connection, ``confirm:
"none"``; ``syslog-close`` the connection per batch that confirms by
half-close), HTTP NDJSON to a local receiver (a threaded ``http.server`` in
this process, counting events; ``--http-in-flight`` batches at once), a
topic of a private real Apache Kafka (``scripts.peers.kafka_server``, KRaft,
one partition; counted by the partition's high watermark), or a table in a
second private PostgreSQL (``synchronous_commit`` on, as an audit database
keeps it; counted as the chain's highest ``seq`` in the table, whose rows
land in ``seq`` order, with ``count(*)`` checked against it at the end).
Every second of each run we sample the events the proxy recorded (JSONL
lines), the events the receiver has and the sink's spool backlog (bytes
behind the persisted cursor), and report two ratios: the *rate* ratio,
delivery rate / event rate over the steady window (from the first sample
``--sink-warmup`` seconds into the run to the last sample before pgbench
stopped: delivered and recorded deltas over that same window), and the
whole run's delivered/recorded (events received by the time pgbench
stopped / events recorded since the run began: below the rate ratio by the
events still on their way at the end); plus the spool's peak, end and
last-quarter trend, and how long the backlog took to drain after pgbench
stopped.

``--profile py-spy`` (``pip install py-spy``) or ``--profile cprofile`` adds
one run of ``--profile-target`` (dbproxy or the relay, to compare) under a
profiler after the measured rounds and prints the top functions by own and
inclusive time, also as µs per transaction; the measured figures never
include a profiler.  ``--dbproxy-module`` runs another entry module in place
of ``dbproxy.cli`` (A/B a patched build without touching the tree).

Runnable: ``scripts/bench/pg [--clients 8 --threads 2 --duration 15 --rounds 2 --json out.json]``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import attrs

from scripts.peers.pgbouncer import start_pgbouncer
from scripts.peers.postgres import PgServer, start_postgres

ROOT = Path(__file__).resolve().parents[2]
TARGETS = ("direct", "pgbouncer", "relay", "relay-lean", "dbproxy", "dbproxy-ack")
DEFAULT_TARGETS = ("direct", "pgbouncer", "relay", "relay-lean", "dbproxy")
# The event each pgbench transaction must produce: a Query (simple protocol) or an Execute (extended/prepared).
AUDIT_EVENT = {"simple": "db.session.query", "extended": "db.session.postgres.statements.execute",
               "prepared": "db.session.postgres.statements.execute"}
_CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- processes


def _stat_fields(pid: int) -> list[bytes]:
    with open(f"/proc/{pid}/stat", "rb") as f:
        # fields[0] is field 3 (state), fields[1] the parent pid; utime/stime are fields 14/15.
        return f.read().rsplit(b")", 1)[1].split()


def _descendants(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parents.setdefault(int(_stat_fields(int(entry))[1]), []).append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _proc_cpu_seconds(pid: int) -> float:
    """utime + stime of *pid* (all its threads) and of its live descendants (dbproxy's
    audit worker): the middleman's whole CPU, wherever it runs."""
    total = 0
    for p in (pid, *_descendants(pid)):
        try:
            fields = _stat_fields(p)
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / _CLK_TCK


def _machine_times() -> tuple[int, int]:
    """(idle, total) jiffies of all CPUs."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    return idle, sum(parts[:8])


class ChildProcess:
    """A Python child that prints a 'listening on HOST:PORT' line; stdout/stderr go to a log."""

    def __init__(self, name: str, argv: list[str], workdir: Path, pattern: str,
                 stop_signal: int = signal.SIGTERM) -> None:
        self.name = name
        self.stop_signal = stop_signal
        self.argv = argv
        self.workdir = workdir
        self.pattern = re.compile(pattern)
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def start(self, timeout: float = 30.0) -> "ChildProcess":
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         cwd=self.workdir, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.pattern.search(self.log_text())
            if found:
                self.port = int(found.group(1))
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"{self.name} did not start:\n{self.log_text()[-3000:]}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(self.stop_signal)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_relay(workdir: Path, pg: PgServer, *, name: str = "relay", wrap: list[str] = (),
                lean: bool = False) -> ChildProcess:
    return ChildProcess(
        name,
        [sys.executable, *wrap, "-m", "scripts.bench.relay", "--upstream", f"{pg.host}:{pg.port}",
         *(["--lean"] if lean else [])],
        workdir,
        r"relay listening on \S+:(\d+)",
        stop_signal=signal.SIGINT,
    ).start()


def proxy_config(workdir: Path, pg: PgServer, user: str, password: str, *,
                 name: str = "dbproxy", durability: str | None = None, sink: dict | None = None) -> tuple[Path, Path]:
    """Write the dbproxy config (and the backend password file); return (config, audit file)."""
    secret = workdir / "backend.secret"
    secret.write_text(password + "\n")
    os.chmod(secret, 0o600)
    audit = workdir / ("audit.jsonl" if name == "dbproxy" else f"audit-{name}.jsonl")
    config = {
        "listeners": [{
            "name": "bench",
            "protocol": "postgres",
            "listen": "127.0.0.1:0",
            "routes": [{
                "name": "bench",
                "match": {"user": user},
                "backend": {
                    "address": f"{pg.host}:{pg.port}",
                    "database": "app",
                    "user": user,
                    "auth": {"method": "scram-sha-256", "password_file": str(secret)},
                },
            }],
        }],
        "audit": {"sinks": [{"type": "jsonl", "path": str(audit)}]},
    }
    if durability is not None:
        config["audit"]["durability"] = durability
    if sink is not None:
        config["audit"]["sinks"].insert(0, sink)
    path = workdir / f"{name}.json"
    path.write_text(json.dumps(config, indent=2))
    return path, audit


def start_dbproxy(workdir: Path, config: Path, *, name: str = "dbproxy", wrap: list[str] = (),
                  module: str = "dbproxy.cli") -> ChildProcess:
    return ChildProcess(
        name,
        [sys.executable, *wrap, "-m", module, "serve", "--config", str(config)],
        workdir,
        r"dbproxy: \S+ \(postgres\) listening on \S+:(\d+)",
    ).start()


# --------------------------------------------------------------------------- network audit sinks


class LineCounter:
    """Newlines appended to a file since the start (rsyslog's output, the JSONL trail), read incrementally."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.lines = 0

    def count(self) -> int:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                while chunk := f.read(8 << 20):
                    self.lines += chunk.count(b"\n")
                    self.offset += len(chunk)
        except FileNotFoundError:
            pass
        return self.lines


class HttpCounter:
    """The HTTP sink's receiver: answers 200 to every POST and counts the NDJSON events in it."""

    def __init__(self) -> None:
        import gzip
        import http.server
        import threading

        self.events = 0
        self.requests = 0
        self.lock = threading.Lock()
        counter = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                n = body.count(b"\n")
                with counter.lock:
                    counter.events += n
                    counter.requests += 1
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def count(self) -> int:
        return self.events

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def spool_pending_bytes(spool: Path) -> int:
    """Bytes of spooled records behind the cursor (audit/sinks/spool.py's layout)."""
    try:
        cursor = json.loads((spool / "cursor.json").read_bytes())
    except (FileNotFoundError, ValueError):
        cursor = {"segment": 0, "offset": 0}
    total = 0
    try:
        names = os.listdir(spool)
    except FileNotFoundError:
        return 0
    for name in names:
        if name.startswith("seg-") and name.endswith(".spool"):
            n = int(name[4:-6])
            try:
                size = os.path.getsize(spool / name)
            except FileNotFoundError:
                continue
            if n > cursor["segment"]:
                total += size
            elif n == cursor["segment"]:
                total += max(0, size - cursor["offset"])
    return total


@attrs.define(eq=False)
class Delivery:
    """Watches one network sink: recorded (JSONL lines) vs received (at the SIEM) vs spooled."""

    kind: str
    recorded: LineCounter
    received: Any  # .count() -> int
    spool: Path
    receiver: Any = None  # rsyslog or HttpCounter, stopped at the end
    loads: list = attrs.field(factory=list)  # the machine's 1-minute load average at each sample
    walls: list = attrs.field(factory=list)  # wall-clock time of each sample (events carry wall-clock times)

    def sample(self) -> tuple[float, int, int, int]:
        self.loads.append(os.getloadavg()[0])
        self.walls.append(time.time())
        return time.monotonic(), self.recorded.count(), self.received.count(), spool_pending_bytes(self.spool)


KAFKA_TOPIC = "dbproxy-audit"


class KafkaCounter:
    """Records in the Kafka topic's one partition: its high watermark (duplicates from a retry count too)."""

    def __init__(self, server: Any) -> None:
        from confluent_kafka import Consumer

        self.server = server
        self.consumer = Consumer({"bootstrap.servers": server.bootstrap_servers, "group.id": "bench-probe",
                                  "enable.auto.commit": False, "log_level": 0})
        self.last = 0

    def count(self) -> int:
        from confluent_kafka import KafkaException, TopicPartition

        try:
            self.last = self.consumer.get_watermark_offsets(TopicPartition(KAFKA_TOPIC, 0), timeout=5)[1]
        except KafkaException:
            pass  # a slow answer: keep the last count (the next sample catches up)
        return self.last

    def check(self) -> dict:
        return {"high_watermark": self.count()}

    def stop(self) -> None:
        self.consumer.close()
        self.server.stop()


class TableCounter:
    """Rows of the pg_table sink's table: the chain's highest ``seq`` (cheap, by the primary key's
    index; rows land in seq order, repeats are dropped by ON CONFLICT); ``check`` counts them."""

    def __init__(self, server: Any, dsn: str) -> None:
        self.server = server
        self.dsn = dsn
        self.conn = None
        self.last = 0

    def _query(self, sql: str) -> int | None:
        import psycopg

        try:
            if self.conn is None:
                self.conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=5)
            return self.conn.execute(sql).fetchone()[0]
        except psycopg.errors.UndefinedTable:
            return 0  # the sink creates it with its first batch
        except psycopg.Error:
            self.conn = None
            return None

    def count(self) -> int:
        got = self._query("select coalesce(max(seq), 0) from dbproxy_audit where chain = 'bench'")
        if got is not None:
            self.last = got
        return self.last

    def check(self) -> dict:
        return {"max_seq": self.count(),
                "rows": self._query("select count(*) from dbproxy_audit where chain = 'bench'")}

    def stop(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.server.stop()


def start_sink(kind: str, base: Path, args: argparse.Namespace) -> tuple[dict, Any, Any]:
    """(the sink's config, a receiver with count(), the object to stop)."""
    spool = {"spool_dir": str(base / f"spool-{kind}")}
    if kind == "none":
        return None, None, None  # the reference: the JSONL file alone (main counts it as the receiver)
    if kind == "kafka":
        from scripts.peers.kafka_server import installed, lib_dir, start_kafka

        if not installed():
            raise SystemExit(f"--sink kafka: no Kafka jars in {lib_dir()}: run scripts/install/kafka.sh")
        t0 = time.monotonic()
        server = start_kafka(base / "kafka")
        server.create_topic(KAFKA_TOPIC)
        print(f"kafka: {time.monotonic() - t0:.1f}s", file=sys.stderr)
        counter = KafkaCounter(server)
        sink = {"type": "kafka", "name": "bench-kafka", "bootstrap_servers": server.bootstrap_servers,
                "topic": KAFKA_TOPIC, **spool}
        return sink, counter, counter
    if kind == "pg_table":
        auditdb = start_postgres(base / "auditdb", ssl=False)
        # The peer runs with synchronous_commit off for test speed; an audit database keeps the default.
        auditdb.psql("-c", "ALTER SYSTEM SET synchronous_commit = on")
        auditdb.psql("-c", "SELECT pg_reload_conf()")
        user, password = auditdb.users["scram-sha-256"]
        dsn = auditdb.dsn(user, password)
        dsn_file = base / "auditdb.dsn"
        dsn_file.write_text(dsn + "\n")
        counter = TableCounter(auditdb, dsn)
        sink = {"type": "pg_table", "name": "bench-pg", "dsn_file": str(dsn_file), "chain": "bench", **spool}
        return sink, counter, counter
    if kind == "http":
        receiver = HttpCounter()
        sink = {"type": "http", "name": "bench-http", "url": f"http://127.0.0.1:{receiver.port}/ingest", "format": "ndjson",
                "max_in_flight": args.http_in_flight, **spool}
        return sink, receiver, receiver
    from scripts.peers.rsyslog import relp_available, start_rsyslog

    if kind == "relp" and not relp_available():
        raise SystemExit("--sink relp needs rsyslog's imrelp: run scripts/install/rsyslog.sh")
    # rsyslog's usual in-memory queue (acknowledges on enqueue, as a production relay with a
    # disk-assisted queue does), not the tests' Direct queue that writes before acknowledging.
    rs = start_rsyslog(base / "rsyslog", relp_queue="LinkedList")
    if kind == "relp":
        sink = {"type": "relp", "name": "bench-relp", "address": rs.address("relp"), **spool}
        return sink, LineCounter(rs.file("relp")), rs
    confirm = "close" if kind == "syslog-close" else "none"
    sink = {"type": "syslog", "name": f"bench-{kind}", "address": rs.address("tcp"), "transport": "tcp", "confirm": confirm, **spool}
    return sink, LineCounter(rs.file("tcp")), rs


def receiver_pid(receiver: Any) -> int | None:
    """The receiving server's process (rsyslogd, Kafka's JVM, the audit database's postmaster), to
    measure the CPU it used; None for the HTTP receiver (threads of this process)."""
    server = getattr(receiver, "server", receiver)
    if hasattr(server, "data_dir") and (Path(server.data_dir) / "postmaster.pid").exists():
        return int((Path(server.data_dir) / "postmaster.pid").read_text().split()[0])
    proc = getattr(server, "_proc", None)
    return getattr(proc, "pid", None)


def watch_delivery(delivery: Delivery, stop: Any, samples: list) -> None:
    while not stop.wait(1.0):
        samples.append(delivery.sample())


def steady_window(samples: list, warmup: float) -> tuple[int, int] | None:
    """Indexes (first, last) of the steady window: the first sample *warmup* seconds into the
    run, the last one taken while pgbench ran (``samples[-1]`` is taken after it stopped)."""
    if len(samples) < 3:
        return None
    last = len(samples) - 2
    first = next((i for i, s in enumerate(samples) if s[0] - samples[0][0] >= warmup), None)
    if first is None or first >= last:
        return None
    return first, last


def _slope(xs: list[float], ys: list[float]) -> float:
    """The least-squares slope of ys over xs."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0


def delivery_report(samples: list, after: list, drained_s: float | None, warmup: float = 30.0) -> dict:
    """Rates over the steady window and over the run; the spool's peak and whether it still grew
    in the run's last quarter."""
    window = steady_window(samples, warmup)
    steady = None
    if window is not None:
        (ta, reca, gota, _), (tb, recb, gotb, _) = samples[window[0]], samples[window[1]]
        span = tb - ta
        steady = {
            "from_s": round(ta - samples[0][0], 1), "to_s": round(tb - samples[0][0], 1),
            "recorded": recb - reca, "delivered": gotb - gota,
            "event_rate": (recb - reca) / span, "delivery_rate": (gotb - gota) / span,
            "rate_ratio": (gotb - gota) / (recb - reca) if recb > reca else None,
            # Events recorded but not yet at the receiver, at the window's ends: a sink that keeps
            # up holds this steady (the ratio is 1 - its growth / recorded), one that falls behind grows it.
            "lag_from": reca - gota, "lag_to": recb - gotb,
        }
        # The same two rates as least-squares slopes over every sample in the window: the endpoint
        # deltas above swing by up to a batch in flight (pg_table, kafka: 5000 events) at either end;
        # the fit shows whether the lag *trends* up (falling behind) or only jitters.
        ts, recs, gots, _ = zip(*samples[window[0]:window[1] + 1])
        rec_fit, got_fit = _slope(ts, recs), _slope(ts, gots)
        steady["fit_rate_ratio"] = got_fit / rec_fit if rec_fit else None
        steady["fit_lag_per_s"] = rec_fit - got_fit
    (t0, rec0, got0, _), (t1, rec1, got1, _) = samples[0], samples[-1]
    recorded, delivered = rec1 - rec0, got1 - got0
    pend = [s[3] for s in samples]
    q = max(1, len(samples) * 3 // 4)
    tail = samples[q - 1 :]
    slope = (tail[-1][3] - tail[0][3]) / max(1e-9, tail[-1][0] - tail[0][0]) if len(tail) > 1 else 0.0
    return {
        "seconds": round(t1 - t0, 1),
        "recorded": recorded,
        "delivered": delivered,
        "event_rate": recorded / max(1e-9, t1 - t0),
        "delivery_rate": delivered / max(1e-9, t1 - t0),
        "ratio": delivered / recorded if recorded else None,
        "spool_peak_bytes": max(pend),
        "spool_end_bytes": pend[-1],
        "spool_last_quarter_bytes_per_s": slope,
        "drain_after_s": drained_s,
        "lag_events_end": rec1 - got1,
        "after": after,
        "steady": steady,
        # Every sample (seconds into the run, events recorded, delivered, spool bytes): the lag's path.
        "samples": [[round(s[0] - t0, 2), s[1], s[2], s[3]] for s in samples],
    }


# --------------------------------------------------------------------------- pgbench


@attrs.define
class Run:
    target: str
    round: int
    tps: float
    transactions: int
    latency_ms: float | None
    connect_ms: float | None
    middle_cpu_s: float | None  # CPU seconds of the middleman process during the run
    machine_idle: float  # share of all CPUs idle during the run
    wall_s: float
    audit_queries: int | None = None
    delivery: dict | None = None  # --sink: see delivery_report

    @property
    def cpu_us_per_txn(self) -> float | None:
        if self.middle_cpu_s is None or not self.transactions:
            return None
        return self.middle_cpu_s / self.transactions * 1e6


def _pg_env(password: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(PGPASSWORD=password, PGSSLMODE="disable", PGCONNECT_TIMEOUT="10", PGGSSENCMODE="disable")
    return env


def pgbench_init(pg: PgServer, user: str, password: str, scale: int) -> None:
    p = subprocess.run(
        [str(pg.bindir / "pgbench"), "-i", "-q", "-s", str(scale), "-h", pg.host, "-p", str(pg.port), "-U", user, "app"],
        env=_pg_env(password), capture_output=True, text=True, timeout=600,
    )
    if p.returncode != 0:
        raise RuntimeError(f"pgbench -i failed ({p.returncode}): {p.stderr.strip()}")


def _float(pattern: str, text: str) -> float | None:
    found = re.search(pattern, text)
    return float(found.group(1)) if found else None


def pgbench(pg: PgServer, port: int, user: str, password: str, args: argparse.Namespace,
            duration: int, allow_abort: bool = False) -> tuple[float, int, float | None, float | None, str]:
    """``allow_abort``: clients aborted (the proxy failed closed) is a result, not an error, as long
    as pgbench reported its figures."""
    cmd = [str(pg.bindir / "pgbench"), "-n", "-S", "-M", args.protocol,
           "-c", str(args.clients), "-j", str(args.threads), "-T", str(duration),
           "-h", "127.0.0.1", "-p", str(port), "-U", user, "app"]
    p = subprocess.run(cmd, env=_pg_env(password), capture_output=True, text=True, timeout=duration + 120)
    out = p.stdout + p.stderr
    tps = _float(r"tps = ([\d.]+) \(without initial connection time\)", out) or _float(r"tps = ([\d.]+)", out)
    txns = _float(r"number of transactions actually processed: (\d+)", out)
    if (p.returncode != 0 and not allow_abort) or tps is None or txns is None:
        raise RuntimeError(f"pgbench on port {port} failed ({p.returncode}):\n{out.strip()[-2000:]}")
    return (tps, int(txns), _float(r"latency average = ([\d.]+) ms", out),
            _float(r"initial connection time = ([\d.]+) ms", out), out)


class AuditCounter:
    """Counts events of one kind appended to the JSONL file since the last call."""

    def __init__(self, path: Path, event: str) -> None:
        self.path = path
        self.event = event
        self.mark = b'"event":"' + event.encode() + b'"'
        self.offset = 0
        self.total = 0
        self._tail = b""

    def _scan(self) -> int:
        found = 0
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            return 0
        with f:
            f.seek(self.offset)
            while True:
                chunk = f.read(8 << 20)
                if not chunk:
                    break
                data = self._tail + chunk
                # Only whole lines: a marker split across reads is counted next time.
                cut = data.rfind(b"\n") + 1
                found += data.count(self.mark, 0, cut)
                self._tail = data[cut:]
                self.offset += len(chunk)
        return found

    def settle(self, expect_at_least: int, timeout: float = 30.0) -> int:
        """Events since last call; waits for the drain task until the count reaches *expect_at_least* and stops growing."""
        count = 0
        deadline = time.monotonic() + timeout
        quiet_since = time.monotonic()
        while True:
            new = self._scan()
            now = time.monotonic()
            if new:
                count += new
                quiet_since = now
            if (count >= expect_at_least and now - quiet_since > 0.5) or now > deadline:
                break
            time.sleep(0.1)
        self.total += count
        return count


def run_target(target: str, rnd: int, port: int, pid: int | None, pg: PgServer, user: str, password: str,
               args: argparse.Namespace, audit: AuditCounter | None = None, delivery: Delivery | None = None) -> Run:
    import threading

    cpu0 = _proc_cpu_seconds(pid) if pid else None
    idle0, total0 = _machine_times()
    samples: list = []
    stop = threading.Event()
    watcher = None
    rpid = receiver_pid(delivery.receiver) if delivery is not None else None
    rcpu0 = _proc_cpu_seconds(rpid) if rpid else None
    if delivery is not None:
        delivery.loads.clear()
        delivery.walls.clear()
        samples.append(delivery.sample())
        watcher = threading.Thread(target=watch_delivery, args=(delivery, stop, samples), daemon=True)
        watcher.start()
    t0 = time.monotonic()
    tps, txns, lat, conn, out = pgbench(pg, port, user, password, args, args.duration, allow_abort=delivery is not None)
    wall = time.monotonic() - t0
    rcpu1 = _proc_cpu_seconds(rpid) if rcpu0 is not None else None
    idle1, total1 = _machine_times()
    cpu = _proc_cpu_seconds(pid) - cpu0 if pid and cpu0 is not None else None
    run = Run(target, rnd, tps, txns, lat, conn, cpu, (idle1 - idle0) / max(1, total1 - total0), wall)
    if watcher is not None:
        stop.set()
        watcher.join()
        samples.append(delivery.sample())
        # After the load: until the SIEM has everything the proxy recorded (or 120 s).
        after, drained = [], None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            s = delivery.sample()
            after.append(s)
            if s[2] >= s[1] and s[3] == 0:
                drained = s[0] - samples[-1][0]
                break
            time.sleep(0.25)
        run.delivery = delivery_report(samples, [list(a) for a in after[-3:]], drained, args.sink_warmup)
        fatal = re.search(r"FATAL:\s+(.*)", out)
        if fatal:
            # The proxy ended the sessions (a full spool: fail_closed): pgbench stopped early.
            run.delivery["failed_closed_after_s"] = round(wall, 1)
            run.delivery["failure"] = fatal.group(1).strip()
            print(f"sink {delivery.kind}: pgbench ended after {wall:.0f} s: {fatal.group(1).strip()}", file=sys.stderr)
        if rcpu0 is not None:
            # CPU the receiver used while pgbench ran, as a share of one core: a receiver starved of
            # CPU on a loaded machine limits delivery whatever the sink does.
            run.delivery["receiver_cpu_share"] = round((rcpu1 - rcpu0) / wall, 3)
        loads = delivery.loads[: len(samples)]
        run.delivery["load_average"] = {"mean": round(statistics.mean(loads), 2), "min": min(loads), "max": max(loads)}
        if hasattr(delivery.received, "check"):
            run.delivery["receiver_check"] = delivery.received.check()
    if audit is not None:
        run.audit_queries = audit.settle(txns)
    if run.delivery is not None and run.delivery["steady"] is not None:
        # Once the trail is settled: the events the *proxy* produced in the steady window, by their
        # own "time" — the JSONL count above is what the audit worker had written by then.
        st = run.delivery["steady"]
        window = steady_window(samples, args.sink_warmup)
        wa, wb = delivery.walls[window[0]], delivery.walls[window[1]]
        made, made_before_end = events_stamped_between(delivery.recorded.path, wa, wb)
        st["proxy_events"] = made
        st["proxy_event_rate"] = made / (wb - wa)
        st["proxy_rate_ratio"] = st["delivery_rate"] / st["proxy_event_rate"] if made else None
        # Events the proxy had produced by the window's end that the worker had not yet written.
        st["recorder_lag_to"] = made_before_end - samples[window[1]][1]
    return run


def events_stamped_between(path: Path, wa: float, wb: float) -> tuple[int, int]:
    """(events whose "time" is in [wa, wb), events whose "time" is before wb) in the JSONL trail."""
    import datetime

    def iso(t: float) -> bytes:
        return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ").encode()

    a, b = iso(wa), iso(wb)
    stamp = re.compile(rb'"time":"([^"]+)"')
    inside = before = 0
    with open(path, "rb") as f:
        for line in f:
            m = stamp.search(line)
            if m is None:
                continue
            t = m.group(1)  # RFC 3339 UTC with microseconds: compares as text
            if t < b:
                before += 1
                if t >= a:
                    inside += 1
    return inside, before


# --------------------------------------------------------------------------- profiling


def _frame_name(frame: str) -> str:
    # py-spy raw frames look like "function (path/to/file.py:123)"; group by function and file.
    m = re.match(r"(.*) \((.*?)(?::\d+)?\)$", frame)
    if not m:
        return frame
    func, path = m.groups()
    for prefix in (str(ROOT) + "/", "/root/.pyenv/versions/"):
        path = path.replace(prefix, "")
    path = re.sub(r".*site-packages/", "", path)
    return f"{func} ({path})"


def summarize_pyspy(raw: Path, top: int) -> dict:
    own: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        total += count
        frames = [_frame_name(f) for f in stack.split(";") if f and not f.startswith("process ") and not f.startswith("thread ")]
        if not frames:
            continue
        own[frames[-1]] += count
        for f in set(frames):
            incl[f] += count
    return {
        "samples": total,
        "own": [(f, c, c / total if total else 0.0) for f, c in own.most_common(top)],
        "inclusive": [(f, c, c / total if total else 0.0) for f, c in incl.most_common(top * 2)],
    }


PYSPY_RATE = 250


def profile_pyspy(child: ChildProcess, pg: PgServer, user: str, password: str, args: argparse.Namespace,
                  outdir: Path) -> dict:
    pyspy = shutil.which("py-spy")
    if pyspy is None:
        raise FileNotFoundError("py-spy not found: pip install py-spy")
    raw = outdir / f"{child.name}-pyspy.txt"
    spy = subprocess.Popen(
        [pyspy, "record", "--pid", str(child.pid), "--format", "raw", "--rate", str(PYSPY_RATE),
         "--duration", str(args.duration), "--nonblocking", "-o", str(raw)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    time.sleep(1.0)  # let py-spy attach before the load starts
    tps, txns, *_ = pgbench(pg, child.port, user, password, args, args.duration)
    _, err = spy.communicate(timeout=60)
    if spy.returncode != 0 or not raw.exists():
        raise RuntimeError(f"py-spy failed ({spy.returncode}): {err.decode(errors='replace')[-1000:]}")
    summary = summarize_pyspy(raw, args.profile_top)
    # Samples are taken every 1/rate s of wall time while the stack is not idle.
    summary.update(tool="py-spy", target=child.name, tps=tps, transactions=txns, raw=str(raw),
                   us_per_txn=summary["samples"] / PYSPY_RATE / max(1, txns) * 1e6)
    return summary


def profile_cprofile(start_child, pg: PgServer, user: str, password: str, args: argparse.Namespace,
                     outdir: Path) -> dict:
    """*start_child(wrap)* starts a fresh target under ``python -m cProfile -o FILE``."""
    import pstats

    out = outdir / f"{args.profile_target}.pstats"
    child = start_child(["-m", "cProfile", "-o", str(out)])
    try:
        tps, txns, *_ = pgbench(pg, child.port, user, password, args, args.duration)
    finally:
        child.stop()
    stats = pstats.Stats(str(out))
    total = stats.total_tt or 1.0

    def rows(key: int) -> list:
        items = sorted(stats.stats.items(), key=lambda kv: kv[1][key], reverse=True)[: args.profile_top]
        # (name, seconds, share, calls per transaction)
        return [(_frame_name(f"{fn} ({file}:{line})"), round(v[key], 3), v[key] / total, v[1] / max(1, txns))
                for (file, line, fn), v in items]

    return {"tool": "cprofile", "target": args.profile_target, "tps": tps, "transactions": txns,
            "pstats": str(out), "total_s": total, "us_per_txn": total / max(1, txns) * 1e6,
            "calls_per_txn": sum(v[1] for v in stats.stats.values()) / max(1, txns),
            "own": rows(2), "inclusive": rows(3)}


# --------------------------------------------------------------------------- report


def _versions(pg: PgServer) -> dict:
    def out(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            return "?"

    import trio

    return {
        "postgres": out([str(pg.bindir / "postgres"), "--version"]),
        "pgbench": out([str(pg.bindir / "pgbench"), "--version"]),
        "pgbouncer": out([shutil.which("pgbouncer", path="/usr/sbin:/usr/bin") or "pgbouncer", "--version"]),
        "python": platform.python_version(),
        "trio": trio.__version__,
        "cpus": os.cpu_count(),
    }


def summarize(runs: list[Run]) -> tuple[dict, dict]:
    summary: dict = {}
    for target in TARGETS:
        rs = [r for r in runs if r.target == target]
        if not rs:
            continue
        cpu = [r.cpu_us_per_txn for r in rs if r.cpu_us_per_txn is not None]
        summary[target] = {
            "tps": [round(r.tps, 1) for r in rs],
            "best": max(r.tps for r in rs),
            "median": statistics.median(r.tps for r in rs),
            "latency_ms_median": statistics.median(r.latency_ms for r in rs if r.latency_ms is not None)
            if any(r.latency_ms is not None for r in rs) else None,
            "middle_cpu_us_per_txn_median": statistics.median(cpu) if cpu else None,
            "machine_idle_median": statistics.median(r.machine_idle for r in rs),
        }
    ratios: dict = {}
    for name, a, b in (("dbproxy/relay", "dbproxy", "relay"), ("dbproxy/relay-lean", "dbproxy", "relay-lean"),
                       ("relay-lean/relay", "relay-lean", "relay"), ("dbproxy/direct", "dbproxy", "direct"),
                       ("dbproxy/pgbouncer", "dbproxy", "pgbouncer"), ("relay/direct", "relay", "direct"),
                       ("dbproxy-ack/dbproxy", "dbproxy-ack", "dbproxy"),
                       ("dbproxy-ack/relay-lean", "dbproxy-ack", "relay-lean"),
                       ("pgbouncer/direct", "pgbouncer", "direct")):
        if a in summary and b in summary:
            ratios[name] = {k: summary[a][k] / summary[b][k] for k in ("median", "best")}
    return summary, ratios


def print_report(args: argparse.Namespace, runs: list[Run], summary: dict, ratios: dict, audit: dict | None,
                 versions: dict) -> None:
    p = print
    p()
    p(f"pgbench -n -S -M {args.protocol} -c {args.clients} -j {args.threads} -T {args.duration}  "
      f"scale {args.scale}, {args.rounds} round(s), {versions['cpus']} CPUs")
    p(f"{versions['postgres']}; {versions['pgbouncer']}; Python {versions['python']}, trio {versions['trio']}")
    p()
    p(f"{'run':<16}{'tps':>10}{'txns':>10}{'lat ms':>9}{'mid CPU s':>11}{'µs CPU/txn':>12}{'idle':>7}")
    for r in runs:
        cpu = f"{r.middle_cpu_s:.2f}" if r.middle_cpu_s is not None else "-"
        per = f"{r.cpu_us_per_txn:.1f}" if r.cpu_us_per_txn is not None else "-"
        lat = f"{r.latency_ms:.3f}" if r.latency_ms is not None else "-"
        p(f"{r.target + ' #' + str(r.round):<16}{r.tps:>10.1f}{r.transactions:>10}{lat:>9}{cpu:>11}{per:>12}{r.machine_idle:>7.0%}")
    p()
    p(f"{'target':<12}{'median tps':>12}{'best tps':>12}{'µs CPU/txn':>12}")
    for target, s in summary.items():
        per = s["middle_cpu_us_per_txn_median"]
        p(f"{target:<12}{s['median']:>12.1f}{s['best']:>12.1f}{(f'{per:.1f}' if per is not None else '-'):>12}")
    p()
    p(f"{'ratio':<20}{'median':>8}{'best':>8}")
    for name, r in ratios.items():
        p(f"{name:<20}{r['median']:>8.3f}{r['best']:>8.3f}")
    if "dbproxy/relay" in ratios:
        got = ratios["dbproxy/relay"]["median"]
        p(f"target dbproxy/relay >= {args.target:.2f}: {'MET' if got >= args.target else 'NOT MET'} ({got:.3f}, median)")
    if "dbproxy/relay-lean" in ratios:
        got = ratios["dbproxy/relay-lean"]["median"]
        p(f"        dbproxy/relay-lean >= {args.target:.2f}: {'MET' if got >= args.target else 'NOT MET'} ({got:.3f}, median;"
          " against a relay moving bytes dbproxy's way)")
    for r in runs:
        d = r.delivery
        if d is None:
            continue
        p()
        st = d.get("steady")
        if st and st["rate_ratio"] is not None:
            p(f"sink {args.sink} ({r.target} #{r.round}) steady window {st['from_s']}-{st['to_s']} s: "
              f"events {st['event_rate']:.0f}/s, delivered {st['delivery_rate']:.0f}/s: "
              f"delivery rate / event rate {st['rate_ratio']:.4f} (lag {st['lag_from']} -> {st['lag_to']} events)")
            if st.get("fit_rate_ratio") is not None:
                p(f"  least-squares slopes over the window's samples: delivery rate / event rate {st['fit_rate_ratio']:.4f} "
                  f"(the lag's trend {st['fit_lag_per_s']:+.1f} events/s)")
            if st.get("proxy_rate_ratio") is not None:
                p(f"  against the proxy's own event rate (events stamped in the window: {st['proxy_event_rate']:.0f}/s): "
                  f"{st['proxy_rate_ratio']:.4f}; the audit worker had {st['recorder_lag_to']} of them not yet written at the window's end")
        p(f"sink {args.sink} ({r.target} #{r.round}) whole run: {d['recorded']} events recorded in {d['seconds']} s "
          f"({d['event_rate']:.0f}/s), {d['delivered']} delivered ({d['delivery_rate']:.0f}/s): "
          f"delivered/recorded {d['ratio']:.3f}" if d["ratio"] is not None else f"sink {args.sink}: no events")
        trend = d["spool_last_quarter_bytes_per_s"]
        p(f"  spool: peak {d['spool_peak_bytes'] / 1e6:.2f} MB, at the end {d['spool_end_bytes'] / 1e6:.2f} MB, "
          f"last quarter {trend / 1e3:+.1f} kB/s; lag at the end {d['lag_events_end']} events; "
          + (f"drained {d['drain_after_s']:.1f} s after the load" if d["drain_after_s"] is not None else "NOT drained within 120 s"))
        if d.get("failed_closed_after_s") is not None:
            p(f"  FAILED CLOSED: pgbench's sessions ended after {d['failed_closed_after_s']} s: {d['failure']}")
        la = d.get("load_average")
        if la:
            p(f"  machine load average (1 min) during the run: mean {la['mean']:.1f}, {la['min']:.1f}-{la['max']:.1f}")
        if d.get("receiver_cpu_share") is not None:
            p(f"  receiver process CPU while pgbench ran: {d['receiver_cpu_share']:.0%} of one core")
        if d.get("receiver_check"):
            p(f"  receiver: {d['receiver_check']}")
    if audit:
        p()
    for name, a in (audit or {}).items():
        p(f"audit: {a['query_events']} {a['event']} events for {a['transactions']} pgbench "
          f"transactions through {name} ({a['file_bytes'] / 1e6:.1f} MB JSONL) -> "
          f"{'OK' if a['ok'] else 'MISMATCH'}")


def print_profile(prof: dict) -> None:
    print()
    print(f"profile ({prof['tool']}): one extra {prof['target']} run at {prof['tps']:.1f} tps, "
          f"{prof['transactions']} transactions (profiler overhead included)")
    per = prof["us_per_txn"]
    if prof["tool"] == "py-spy":
        print(f"{prof['samples']} samples at {PYSPY_RATE} Hz of non-idle stacks (wall time, all threads; a thread "
              f"preempted inside a syscall still counts) = {per:.1f} µs/txn; raw: {prof['raw']}")
        cols = "  share  µs/txn  function"
        fmt = lambda row: f"  {row[2]:>5.1%} {row[2] * per:>7.1f}  {row[0]}"  # noqa: E731
    else:
        print(f"{prof['total_s']:.2f} s profiled = {per:.1f} µs/txn, {prof['calls_per_txn']:.0f} Python-level "
              f"calls/txn; pstats: {prof['pstats']}")
        cols = "  share  µs/txn  calls/txn  function"
        fmt = lambda row: f"  {row[2]:>5.1%} {row[2] * per:>7.1f} {row[3]:>10.2f}  {row[0]}"  # noqa: E731
    print("top by own time:")
    print(cols)
    for row in prof["own"]:
        print(fmt(row))
    print("top inclusive:")
    print(cols)
    for row in prof["inclusive"]:
        print(fmt(row))


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/bench/pg", description=__doc__.split("\n")[0])
    ap.add_argument("--clients", "-c", type=int, default=8)
    ap.add_argument("--threads", "-j", type=int, default=2)
    ap.add_argument("--duration", "-T", type=int, default=15, help="seconds per run")
    ap.add_argument("--scale", "-s", type=int, default=5, help="pgbench -i scale")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds of all targets")
    ap.add_argument("--warmup", type=int, default=3, help="seconds of a direct warm-up run (0: none)")
    ap.add_argument("--protocol", "-M", default="simple", choices=["simple", "extended", "prepared"])
    ap.add_argument("--targets", default=",".join(DEFAULT_TARGETS), help="comma list of " + ",".join(TARGETS))
    ap.add_argument("--target", type=float, default=0.8, help="required dbproxy/relay ratio")
    ap.add_argument("--json", type=Path, help="write the results as JSON here")
    ap.add_argument("--profile", choices=["py-spy", "cprofile"], help="one extra profiled run of --profile-target")
    ap.add_argument("--profile-target", choices=["dbproxy", "relay"], default="dbproxy")
    ap.add_argument("--profile-top", type=int, default=25)
    ap.add_argument("--profile-dir", type=Path, help="where profiles go (default: next to --json, else cwd)")
    ap.add_argument("--dbproxy-module", default="dbproxy.cli",
                    help="entry module run as 'python -m MOD serve --config FILE' (A/B a patched build; PYTHONPATH is passed on)")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs, audit file, configs)")
    ap.add_argument("--sink", choices=["relp", "syslog", "syslog-close", "http", "kafka", "pg_table", "none"],
                    help="add this network audit sink to the dbproxy target and measure its delivery "
                         "(none: the JSONL file alone, the reference for the audit worker's own rate)")
    ap.add_argument("--http-in-flight", type=int, default=4, help="--sink http: the sink's max_in_flight")
    ap.add_argument("--sink-warmup", type=float, default=30.0,
                    help="--sink: seconds into the run where the steady window (the rate ratio) begins")
    args = ap.parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(targets) - set(TARGETS)
    if unknown:
        ap.error(f"unknown target(s): {', '.join(sorted(unknown))}")

    base = Path(tempfile.mkdtemp(prefix="dbproxy-bench-"))
    os.chmod(base, 0o755)
    pg = bouncer = relay = lean_relay = proxy = proxy_ack = None
    runs: list[Run] = []
    try:
        pg = start_postgres(base, ssl=False)
        user, password = pg.users["scram-sha-256"]
        t0 = time.monotonic()
        pgbench_init(pg, user, password, args.scale)
        print(f"pgbench -i -s {args.scale}: {time.monotonic() - t0:.1f}s", file=sys.stderr)
        versions = _versions(pg)

        ports: dict[str, tuple[int, int | None]] = {"direct": (pg.port, None)}
        if "pgbouncer" in targets:
            bouncer = start_pgbouncer(base, pg, user, password, "session", client_tls=False,
                                      server_tls_sslmode="disable", pool_size=max(20, args.clients))
            ports["pgbouncer"] = (bouncer.port, bouncer._proc.pid)
        if "relay" in targets:
            relay = start_relay(base, pg)
            ports["relay"] = (relay.port, relay.pid)
        if "relay-lean" in targets:
            lean_relay = start_relay(base, pg, name="relay-lean", lean=True)
            ports["relay-lean"] = (lean_relay.port, lean_relay.pid)
        counters: dict[str, AuditCounter] = {}
        config = None
        delivery = None
        if args.sink:
            sink, received, receiver = start_sink(args.sink, base, args)
        if "dbproxy" in targets:
            config, audit_path = proxy_config(base, pg, user, password, sink=sink if args.sink else None)
            if args.sink == "none":
                delivery = Delivery(args.sink, LineCounter(audit_path), LineCounter(audit_path), base / "no-spool")
            elif args.sink:
                delivery = Delivery(args.sink, LineCounter(audit_path), received, Path(sink["spool_dir"]), receiver)
            proxy = start_dbproxy(base, config, module=args.dbproxy_module)
            ports["dbproxy"] = (proxy.port, proxy.pid)
            counters["dbproxy"] = AuditCounter(audit_path, AUDIT_EVENT[args.protocol])
            counters["dbproxy"].settle(0, timeout=1.0)
        if "dbproxy-ack" in targets:
            ack_config, ack_audit = proxy_config(base, pg, user, password, name="dbproxy-ack", durability="ack")
            proxy_ack = start_dbproxy(base, ack_config, name="dbproxy-ack", module=args.dbproxy_module)
            ports["dbproxy-ack"] = (proxy_ack.port, proxy_ack.pid)
            counters["dbproxy-ack"] = AuditCounter(ack_audit, AUDIT_EVENT[args.protocol])
            counters["dbproxy-ack"].settle(0, timeout=1.0)

        if args.warmup:
            pgbench(pg, pg.port, user, password, args, args.warmup)
        for rnd in range(1, args.rounds + 1):
            for target in targets:
                port, pid = ports[target]
                run = run_target(target, rnd, port, pid, pg, user, password, args, counters.get(target),
                                 delivery if target == "dbproxy" else None)
                runs.append(run)
                extra = f", audit {run.audit_queries} queries" if run.audit_queries is not None else ""
                if run.delivery and run.delivery["ratio"] is not None:
                    st = run.delivery.get("steady") or {}
                    if st.get("rate_ratio") is not None:
                        extra += f", sink rate ratio {st['rate_ratio']:.3f}"
                    extra += f", delivered/recorded {run.delivery['ratio']:.3f}"
                print(f"round {rnd} {target:<10} {run.tps:10.1f} tps{extra}", file=sys.stderr, flush=True)

        audit = {}
        for name, audit_counter in counters.items():
            proxy_runs = [r for r in runs if r.target == name]
            txns = sum(r.transactions for r in proxy_runs)
            queries = sum(r.audit_queries or 0 for r in proxy_runs)
            slack = args.clients * len(proxy_runs)
            audit[name] = {"event": audit_counter.event, "query_events": queries, "transactions": txns,
                           "file_bytes": audit_counter.path.stat().st_size if audit_counter.path.exists() else 0,
                           "ok": txns <= queries <= txns + slack, "path": str(audit_counter.path)}

        summary, ratios = summarize(runs)
        print_report(args, runs, summary, ratios, audit, versions)

        profile = None
        if args.profile:
            outdir = (args.profile_dir or (args.json.resolve().parent if args.json else Path.cwd())).resolve()
            outdir.mkdir(parents=True, exist_ok=True)
            running = {"dbproxy": proxy, "relay": relay}[args.profile_target]
            if running is None:
                raise SystemExit(f"--profile-target {args.profile_target} is not among --targets")
            if args.profile == "py-spy":
                profile = profile_pyspy(running, pg, user, password, args, outdir)
            else:
                if args.profile_target == "dbproxy":
                    def start_child(wrap):
                        return start_dbproxy(base, config, name="dbproxy-cprofile", wrap=wrap, module=args.dbproxy_module)
                else:
                    def start_child(wrap):
                        return start_relay(base, pg, name="relay-cprofile", wrap=wrap)
                profile = profile_cprofile(start_child, pg, user, password, args, outdir)
            print_profile(profile)

        if args.json:
            result = {
                "command": " ".join(["scripts/bench/pg", *(argv if argv is not None else sys.argv[1:])]),
                "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "versions": versions,
                "runs": [dict(attrs.asdict(r), cpu_us_per_txn=r.cpu_us_per_txn) for r in runs],
                "summary": summary,
                "ratios": ratios,
                "target_met": ratios["dbproxy/relay"]["median"] >= args.target if "dbproxy/relay" in ratios else None,
                "audit": audit.get("dbproxy"),
                "audit_ack": audit.get("dbproxy-ack"),
                "profile": profile,
            }
            args.json.write_text(json.dumps(result, indent=2) + "\n")
            print(f"\nresults: {args.json}")
        return 0
    finally:
        for child in (proxy, proxy_ack, relay, lean_relay):
            if child is not None:
                child.stop()
        if args.sink and locals().get("receiver") is not None:
            receiver.stop()
        if bouncer is not None:
            bouncer.stop()
        if pg is not None:
            pg.stop()
        if args.keep:
            print(f"work dir kept: {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
