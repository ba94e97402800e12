"""Audit shipping end to end: the real proxy CLI, a real PostgreSQL, a real rsyslog, an HTTP receiver.

Every test runs ``dbproxy serve`` with a JSONL sink beside the network sink
under test: the JSONL trail is the ground truth of what the proxy recorded,
and what reached the SIEM must be exactly that — each event once (by
``uid``), in ``seq`` order, with a hash chain that verifies.

* rsyslog (Debian package, ``scripts/peers/rsyslog.py``) receives RFC 5424
  over TCP (octet counting), TLS (gtls, cert verified by the proxy) and UDP;
  it is stopped mid-stream and started again while clients keep querying.
* The HTTP receiver is a ``ThreadingHTTPServer`` in the test: it is the
  test's SIEM (Splunk HEC / NDJSON shape), scripted to answer 503 to show
  retries; no real HEC server can be run here.
* The proxy is SIGKILLed while events sit in its spool and restarted.
* fail_closed and drop_oldest with the SIEM down and a tiny spool.
"""

from __future__ import annotations

import datetime
import gzip
import http.server
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson
import psycopg
import pytest

from dbproxy.audit.chain import ChainChecker, verify_files
from tests.support import (
    ROOT, ProxyProcess, dbproxy_cli, peer_missing, pg_connect, pg_scram_config, read_audit, wait_until,
)

pytestmark = pytest.mark.integration

FAST_RETRY = {"retry_initial_seconds": 0.05, "retry_max_seconds": 0.3, "shutdown_flush_seconds": 2}


# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture
def rsyslog(tmp_path):
    from scripts.peers.rsyslog import gtls_available, rsyslogd_bin, start_rsyslog

    try:
        rsyslogd_bin()
    except FileNotFoundError as exc:
        peer_missing(f"{exc}")
    if not gtls_available():
        peer_missing("rsyslog-gnutls (run scripts/install/rsyslog.sh)")
    server = start_rsyslog(tmp_path / "rsyslog")
    yield server
    server.stop()


def proxy_config(pg, workdir: Path, sinks: list[dict]) -> dict:
    # The network sink first: by the time an event is in audit.jsonl it is in the spool too.
    return pg_scram_config(pg, workdir, {"sinks": [*sinks, {"type": "jsonl", "path": str(workdir / "audit.jsonl"), "fsync": "always"}]})


def run_sessions(proxy: ProxyProcess, sessions: int, queries: int, *, tag: str = "q", pause: float = 0.0) -> int:
    for s in range(sessions):
        with pg_connect(proxy) as conn:
            for q in range(queries):
                conn.execute("SELECT %s::text", (f"{tag}-{s}-{q}",))
                if pause:
                    time.sleep(pause)
    return sessions


class Workload(threading.Thread):
    """Clients querying through the proxy in the background until told to stop."""

    def __init__(self, proxy: ProxyProcess, tag: str, queries_per_session: int = 5, pause: float = 0.003) -> None:
        super().__init__(daemon=True)
        self.proxy, self.tag, self.qps, self.pause = proxy, tag, queries_per_session, pause
        self.stop_flag = threading.Event()
        self.sessions = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop_flag.is_set():
                run_sessions(self.proxy, 1, self.qps, tag=f"{self.tag}{self.sessions}", pause=self.pause)
                self.sessions += 1
        except BaseException as exc:  # reported by finish()
            self.error = exc

    def finish(self) -> int:
        self.stop_flag.set()
        self.join(60)
        assert self.error is None, f"workload failed: {self.error!r}"
        return self.sessions


def trail(workdir: Path) -> list[dict]:
    return read_audit(workdir / "audit.jsonl")


def settled_trail(workdir: Path, sessions_ended: int, timeout: float = 20.0) -> list[dict]:
    """The JSONL trail once it holds the end event of *sessions_ended* sessions."""
    box: list[list[dict]] = []

    def check():
        box[:] = [trail(workdir)]
        return sum(1 for e in box[0] if e["event"] == "db.session.end") >= sessions_ended

    wait_until(check, timeout=timeout, what=f"{sessions_ended} session end events in the trail")
    return box[0]


def assert_exactly_once_in_order(received: list[dict], expected: list[dict], raws: list[bytes]) -> None:
    """``raws``: each received event's bytes as the SIEM got them (the chain hash is over them)."""
    uids = [e["uid"] for e in received]
    assert len(uids) == len(set(uids)), f"{len(uids) - len(set(uids))} duplicate events at the SIEM"
    missing = {e["uid"] for e in expected} - set(uids)
    assert not missing, f"{len(missing)} events never reached the SIEM"
    assert len(received) == len(expected)
    seqs = [e["seq"] for e in received]
    assert seqs == sorted(seqs) == [e["seq"] for e in expected]
    checker = ChainChecker()
    assert len(raws) == len(received)
    for e, raw in zip(received, raws):
        assert orjson.loads(raw) == e
        reason = checker.check(e, raw)
        assert reason is None, f"chain breaks at the SIEM at seq {e.get('seq')}: {reason}"
    assert received == expected  # byte-for-byte the same events


def siem_events(server, listener: str) -> list[dict]:
    return [orjson.loads(raw) for raw in siem_raws(server, listener)]


def siem_raws(server, listener: str) -> list[bytes]:
    """The JSON body of every syslog message rsyslog wrote, as bytes."""
    return [m["msg"].lstrip("\ufeff").encode() for m in server.received(listener)]


def wait_siem(server, listener: str, count: int, timeout: float = 40.0) -> list[dict]:
    box: list[list[dict]] = []

    def check():
        box[:] = [siem_events(server, listener)]
        return len(box[0]) >= count

    try:
        wait_until(check, timeout=timeout, what=f"{count} events at rsyslog/{listener}")
    except AssertionError:
        raise AssertionError(f"rsyslog/{listener} has {len(box[0]) if box else 0} of {count} events") from None
    time.sleep(0.3)  # a straggler duplicate would show up now
    return siem_events(server, listener)


def syslog_sink(rs, transport: str, workdir: Path, **extra) -> dict:
    sink = {"type": "syslog", "name": "siem", "address": rs.address("udp" if transport == "udp" else transport), "transport": transport, "spool_dir": str(workdir / "spool"), **FAST_RETRY}
    if transport == "tls":
        sink.update(ca_file=str(rs.ca_file), server_name="localhost")
    sink.update(extra)
    return sink


# --------------------------------------------------------------------------- syslog / rsyslog


@pytest.mark.parametrize("transport", ["tcp", "tls"])
def test_syslog_rsyslog_outage_mid_stream_exactly_once(pg, rsyslog, tmp_path, proxy_factory, transport):
    proxy = proxy_factory(proxy_config(pg, tmp_path, [syslog_sink(rsyslog, transport, tmp_path)]))
    work = Workload(proxy, "a")
    work.start()
    wait_siem(rsyslog, transport, 60, timeout=30)
    rsyslog.stop()  # mid-stream: the workload keeps querying
    during = len(trail(tmp_path))
    wait_until(lambda: len(trail(tmp_path)) > during + 60, timeout=30, what="queries while rsyslog is down")
    wait_until(lambda: "delivery failed" in proxy.log_text(), timeout=10, what="the sink noticing the outage")
    time.sleep(1.0)  # the workload goes on against a SIEM that is away
    rsyslog.start()
    time.sleep(1.0)
    sessions = work.finish()
    expected = settled_trail(tmp_path, sessions)
    received = wait_siem(rsyslog, transport, len(expected))
    raws = siem_raws(rsyslog, transport)
    assert_exactly_once_in_order(received, expected, raws)
    assert "delivering again" in proxy.log_text()
    raw = rsyslog.received(transport)[0]
    assert raw["app"] == "dbproxy" and raw["procid"] == str(proxy.proc.pid) and raw["pri"] == str(10 * 8 + 6)
    # The first event of a run is the proxy's own start marker, then the sessions' events.
    assert raw["msgid"] == "TAU02I" and raw["sd"].startswith('[dbproxy@32473 seq="1" uid="')
    assert rsyslog.received(transport)[1]["msgid"] == "TDB00I"
    assert verify_files([str(tmp_path / "audit.jsonl")]).ok


def test_syslog_confirm_none_streams_over_one_kept_connection(pg, rsyslog, tmp_path, proxy_factory):
    """``confirm: "none"``: no connection per batch; rsyslog still gets every event once, in order,
    and a connection rsyslog closed (restart while idle) is noticed and replaced."""
    proxy = proxy_factory(proxy_config(pg, tmp_path, [syslog_sink(rsyslog, "tcp", tmp_path, confirm="none")]))
    run_sessions(proxy, 3, 6, tag="keep", pause=0.02)
    expected = settled_trail(tmp_path, 3)
    received = wait_siem(rsyslog, "tcp", len(expected))
    assert_exactly_once_in_order(received, expected, siem_raws(rsyslog, "tcp"))
    out = subprocess.run(["ss", "-Htn", "state", "established", f"( dport = :{rsyslog.ports['tcp']} )"], capture_output=True, text=True, check=True)
    assert len(out.stdout.strip().splitlines()) == 1, out.stdout  # the one kept connection, idle now
    rsyslog.stop()  # graceful, while idle: rsyslog closes the kept connection
    rsyslog.start()
    run_sessions(proxy, 2, 4, tag="after", pause=0.02)
    expected = settled_trail(tmp_path, 5)
    received = wait_siem(rsyslog, "tcp", len(expected))
    assert_exactly_once_in_order(received, expected, siem_raws(rsyslog, "tcp"))


def test_syslog_udp_structured_data_parsed_by_rsyslog(pg, rsyslog, tmp_path, proxy_factory):
    proxy = proxy_factory(proxy_config(pg, tmp_path, [syslog_sink(rsyslog, "udp", tmp_path, format="structured", facility="local5", app_name="pam-proxy")]))
    run_sessions(proxy, 2, 3, tag="udp", pause=0.01)
    expected = settled_trail(tmp_path, 2)
    wait_until(lambda: len(rsyslog.received("udp")) >= len(expected), timeout=20, what="udp messages")
    got = rsyslog.received("udp")
    assert len(got) == len(expected)
    for msg, event in zip(got, expected):
        assert msg["app"] == "pam-proxy" and int(msg["pri"]) // 8 == 21
        assert msg["msgid"] == event["code"] and msg["time"].startswith(event["time"][:19])
        sd = msg["sd"]
        assert sd.startswith("[dbproxy@32473 ") and f'uid="{event["uid"]}"' in sd and f'hash="{event["hash"]}"' in sd
        if "db_query" in event:
            assert f'db_query="{event["db_query"]}"' in sd
            assert event["db_query"] in msg["msg"]


# --------------------------------------------------------------------------- proxy SIGKILL while spooling


def test_proxy_sigkill_while_spooling_loses_nothing(pg, rsyslog, tmp_path):
    config = proxy_config(pg, tmp_path, [syslog_sink(rsyslog, "tcp", tmp_path)])
    first = ProxyProcess(tmp_path, config, name="first").start()
    try:
        run_sessions(first, 2, 5, tag="before")
        delivered = settled_trail(tmp_path, 2)
        wait_siem(rsyslog, "tcp", len(delivered))
        rsyslog.stop()
        run_sessions(first, 3, 5, tag="spooled")
        spooled = settled_trail(tmp_path, 5)
        assert len(spooled) > len(delivered)
        wait_until(lambda: "delivery failed" in first.log_text(), timeout=10, what="the outage noticed")
    finally:
        first.kill()  # SIGKILL: no shutdown path runs
    rsyslog.start()
    second = ProxyProcess(tmp_path, config, name="second").start()
    try:
        run_sessions(second, 2, 5, tag="after")
        expected = settled_trail(tmp_path, 7)
        received = wait_siem(rsyslog, "tcp", len(expected))
        raws = siem_raws(rsyslog, "tcp")
    finally:
        second.stop()
    assert_exactly_once_in_order(received, expected, raws)
    assert expected[: len(spooled)] == spooled
    resumed = expected[len(spooled)]
    assert resumed["seq"] == spooled[-1]["seq"] + 1 and resumed["prev_hash"] == spooled[-1]["hash"]  # the chain runs on
    assert "undelivered events" in second.log_text() and "to replay" in second.log_text()
    out = dbproxy_cli("audit", "verify", str(tmp_path / "audit.jsonl"))
    # The chain is intact (the second run's stop marker is the one more event); the SIGKILL shows as
    # an unclean restart: the first run has no proxy.stop.
    n = len(expected) + 1
    assert out.returncode == 3 and f"GAPS: {n} events, seq 1-{n}, chain intact" in out.stdout, out.stdout
    assert "1 gaps" in out.stdout and "unclean restart" in out.stdout


# --------------------------------------------------------------------------- HTTP


class Receiver:
    """The test's SIEM over HTTP: records each request; ``statuses`` scripts the next answers."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.statuses: list[int] = []
        self.down = False
        self.lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.lock:
                    status = 503 if receiver.down else (receiver.statuses.pop(0) if receiver.statuses else 200)
                    receiver.requests.append({"path": self.path, "headers": dict(self.headers), "body": body, "status": status})
                reply = b'{"text":"Success","code":0}' if status == 200 else b'{"text":"Server is busy","code":9}'
                self.send_response(status)
                if status == 503:
                    self.send_header("Retry-After", "0")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def accepted(self) -> list[dict]:
        """Events of the 2xx-answered requests, in arrival order."""
        out = []
        with self.lock:
            requests = list(self.requests)
        for r in requests:
            if r["status"] != 200:
                continue
            body = gzip.decompress(r["body"]) if r["headers"].get("Content-Encoding") == "gzip" else r["body"]
            out.extend(orjson.loads(line) for line in body.splitlines() if line.strip())
        return out

    def accepted_raw(self) -> list[bytes]:
        """The audit line of every accepted event as sent: an NDJSON line, or a HEC
        payload's ``event`` member (the sink splices the stamped line in as is)."""
        out = []
        for r in [r for r in list(self.requests) if r["status"] == 200]:
            body = gzip.decompress(r["body"]) if r["headers"].get("Content-Encoding") == "gzip" else r["body"]
            for line in body.splitlines():
                if not line.strip():
                    continue
                if line.startswith(b'{"time":'):
                    line = line[line.index(b',"event":{') + len(b',"event":'):-1]
                out.append(line)
        return out

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def http_sink(receiver: Receiver, workdir: Path, fmt: str = "hec", **extra) -> dict:
    path = "/services/collector/event" if fmt == "hec" else "/ingest"
    sink = {"type": "http", "name": "siem", "url": f"http://127.0.0.1:{receiver.port}{path}", "format": fmt, "spool_dir": str(workdir / "spool"), **FAST_RETRY}
    token = workdir / "siem.token"
    token.write_text("hec-token-0123\n")
    sink["token_file"] = str(token)
    sink.update(extra)
    return sink


@pytest.mark.parametrize("fmt", ["hec", "ndjson"])
def test_http_batches_retries_after_5xx_and_gzip(pg, receiver, tmp_path, proxy_factory, fmt):
    receiver.statuses = [503, 503, 500]
    proxy = proxy_factory(proxy_config(pg, tmp_path, [http_sink(receiver, tmp_path, fmt, batch_max_events=50)]))
    run_sessions(proxy, 3, 10, tag="http")
    first_part = settled_trail(tmp_path, 3)
    wait_until(lambda: len(receiver.accepted()) >= len(first_part), timeout=15, what="delivery after the scripted 5xx")
    receiver.down = True
    run_sessions(proxy, 3, 10, tag="down")
    wait_until(lambda: sum(r["status"] == 503 for r in receiver.requests) >= 5, timeout=15, what="retries while down")
    receiver.down = False
    expected = settled_trail(tmp_path, 6)
    wait_until(lambda: len(receiver.accepted()) >= len(expected), timeout=30, what="all events at the receiver")
    time.sleep(0.3)
    got = receiver.accepted()
    if fmt == "hec":
        for wrapped in got:
            assert set(wrapped) >= {"time", "host", "source", "sourcetype", "event"} and wrapped["sourcetype"] == "dbproxy:audit"
            assert abs(wrapped["time"] - datetime.datetime.fromisoformat(wrapped["event"]["time"].replace("Z", "+00:00")).timestamp()) < 1e-3
        got = [w["event"] for w in got]
    assert_exactly_once_in_order(got, expected, receiver.accepted_raw())
    assert [r["status"] for r in receiver.requests[:3]] == [503, 503, 500]
    bodies = [gzip.decompress(r["body"]).splitlines() for r in receiver.requests[:4]]
    for earlier, later in zip(bodies, bodies[1:]):
        assert later[: len(earlier)] == earlier  # the same events again (the batch may have grown meanwhile)
    for r in receiver.requests:
        h = r["headers"]
        assert h["Content-Encoding"] == "gzip" and gzip.decompress(r["body"])
        assert h["Authorization"] == ("Splunk hec-token-0123" if fmt == "hec" else "Bearer hec-token-0123")
        assert h["Content-Type"] == ("application/json" if fmt == "hec" else "application/x-ndjson")
    sizes = [len(gzip.decompress(r["body"]).splitlines()) for r in receiver.requests if r["status"] == 200]
    assert max(sizes) > 1 and max(sizes) <= 50  # batched, and bounded by batch_max_events
    assert "hec-token-0123" not in proxy.log_text()


# --------------------------------------------------------------------------- full spool


def raw_startup_error(port: int) -> dict[str, str]:
    """Send a bare v3 StartupMessage and parse the ErrorResponse fields the server answers with."""
    params = b"user\0alice\0database\0app\0\0"
    body = struct.pack(">I", 196608) + params
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(struct.pack(">I", len(body) + 4) + body)
        data = b""
        while len(data) < 5 or len(data) < 1 + struct.unpack(">I", data[1:5])[0]:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    assert data[:1] == b"E", data[:40]
    fields = {}
    for part in data[5:].split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode()
    return fields


def test_fail_closed_refuses_sessions_with_a_native_error(pg, receiver, tmp_path, proxy_factory):
    receiver.down = True
    sink = http_sink(receiver, tmp_path, spool_max_bytes=16 * 1024, on_spool_full="fail_closed")
    proxy = proxy_factory(proxy_config(pg, tmp_path, [sink]))
    told = None
    with pg_connect(proxy) as conn:
        for i in range(2000):
            try:
                conn.execute("SELECT %s::text", (f"fill-{i}",))
            except psycopg.Error as exc:
                told = exc
                break
    assert told is not None, f"the running session was never told:\n{proxy.log_text()[-3000:]}"
    assert "audit unavailable" in str(told)
    with pytest.raises(psycopg.OperationalError, match="audit unavailable"):
        pg_connect(proxy)
    fields = raw_startup_error(proxy.port())
    assert fields["S"] == "FATAL" and fields["C"] == "53000" and "audit unavailable" in fields["M"]
    assert "refused: audit unavailable" in proxy.log_text() and "fail_closed" in proxy.log_text()
    # The SIEM comes back: the spool and the events held in memory drain, sessions are accepted again.
    receiver.down = False

    def accepted_again():
        try:
            with pg_connect(proxy) as conn:
                conn.execute("SELECT 'back'")
            return True
        except psycopg.OperationalError:
            return False

    wait_until(accepted_again, timeout=30, what="sessions accepted again")
    expected = settled_trail(tmp_path, 2)
    wait_until(lambda: len(receiver.accepted()) >= len(expected), timeout=30, what="held events delivered")
    got = [w["event"] for w in receiver.accepted()]
    assert_exactly_once_in_order(got, expected, receiver.accepted_raw())
    assert not any(e["event"] == "audit.loss" for e in expected)


def test_drop_oldest_counts_and_reports_the_loss(pg, receiver, tmp_path, proxy_factory):
    receiver.down = True
    sink = http_sink(receiver, tmp_path, spool_max_bytes=16 * 1024, on_spool_full="drop_oldest")
    proxy = proxy_factory(proxy_config(pg, tmp_path, [sink]))
    run_sessions(proxy, 4, 40, tag="drop")  # never refused
    settled_trail(tmp_path, 4)
    # The audit.loss event for the last batch's drops is written just after that batch: wait for it.
    box: list = [None]
    wait_until(lambda: box.__setitem__(0, trail(tmp_path)) or (time.sleep(0.5) or len(trail(tmp_path)) == len(box[0])),
               timeout=20, what="the trail to settle")
    expected = box[0]
    losses = [e for e in expected if e["event"] == "audit.loss"]
    assert losses, "no audit.loss event in the local trail"
    dropped = {s for e in losses for s in range(e["dropped_first_seq"], e["dropped_last_seq"] + 1)}
    assert len(dropped) == sum(e["dropped"] for e in losses) == losses[-1]["dropped_total"]
    log = proxy.log_text()
    assert "spool full, dropped" in log and f"{losses[-1]['dropped_total']} dropped since start" in log
    receiver.down = False
    survivors = [e for e in expected if e["seq"] not in dropped]
    wait_until(lambda: len(receiver.accepted()) >= len(survivors), timeout=30, what="surviving events delivered")
    time.sleep(0.3)
    got = [w["event"] for w in receiver.accepted()]
    assert [e["uid"] for e in got] == [e["uid"] for e in survivors]  # exactly the survivors, once, in order
    assert any(e["event"] == "audit.loss" for e in got)  # the SIEM learns what it missed
    assert verify_files([str(tmp_path / "audit.jsonl")]).ok


# --------------------------------------------------------------------------- verify / tail CLI


def test_cli_verify_tamper_and_tail_follow(pg, tmp_path, proxy_factory):
    proxy = proxy_factory(proxy_config(pg, tmp_path, []))
    path = tmp_path / "audit.jsonl"
    tail = subprocess.Popen(
        [sys.executable, "-m", "dbproxy.cli", "audit", "tail", str(path), "--follow", "--user", "anonymous"],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    try:
        run_sessions(proxy, 2, 3, tag="cli")
        events = [e for e in settled_trail(tmp_path, 2) if "sid" in e]  # --user: not the proxy.start marker
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(iter(tail.stdout.readline, "")), daemon=True)
        reader.start()
        wait_until(lambda: len(lines) >= len(events), timeout=15, what="tail --follow output")
    finally:
        tail.send_signal(signal.SIGINT)
        tail.wait(10)
    assert any("PARSE u_scram@app: SELECT $1::text" in line for line in lines), lines
    assert any("EXECUTE u_scram@app: SELECT $1::text params=[\"cli-1-2\"]" in line for line in lines), lines
    assert sum(" START " in line for line in lines) == 2
    sid = events[0]["sid"]
    out = dbproxy_cli("audit", "tail", str(path), "--session", sid)
    assert out.returncode == 0 and all(sid[:8] in line for line in out.stdout.splitlines())
    assert len(out.stdout.splitlines()) == sum(e["sid"] == sid for e in events)

    out = dbproxy_cli("audit", "verify", str(path))
    assert out.returncode == 0, out.stdout + out.stderr
    lines_ = path.read_bytes().splitlines(keepends=True)
    victim = 5
    event = orjson.loads(lines_[victim - 1])
    event["db_user"] = "somebody_else"
    lines_[victim - 1] = orjson.dumps(event) + b"\n"
    path.write_bytes(b"".join(lines_))
    out = dbproxy_cli("audit", "verify", str(path))
    assert out.returncode == 1
    assert f"{path}:{victim}: hash mismatch at seq {event['seq']}" in out.stdout
