"""Metrics and health through the real ``dbproxy serve``: real PostgreSQL 15, psql, psycopg, curl.

The admin listener (``"admin": {"listen": "127.0.0.1:0"}``) is scraped with
curl and read with prometheus-client's text parser; the counters must move
by exactly what the clients did.  ``/readyz`` must answer 503 while the audit
fails closed — an HTTP sink whose SIEM is down and whose tiny spool fills
(the test's SIEM is the HTTP receiver of test_audit_shipping, no real HEC
server runs here) — or while the audit worker is dead (SIGKILL), and 200
again once the SIEM takes events / a new worker runs.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import orjson
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.test_audit_shipping import Receiver, http_sink
from tests.support import (
    ProxyProcess, audit_worker_pids, jsonl_audit, password_backend, pg_scram_config, wait_until,
)

pytestmark = pytest.mark.integration

PG = {"protocol": "postgres", "listener": "pg"}
BAD = {"protocol": "postgres", "listener": "pgbad"}


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def config(pg, workdir: Path, audit: dict) -> dict:
    doc = pg_scram_config(pg, workdir, audit)
    # A second listener whose route logs in with a wrong password: PostgreSQL refuses the proxy's login.
    user, _ = pg.users["scram-sha-256"]
    (workdir / "bad").mkdir(exist_ok=True)
    bad = password_backend(workdir / "bad", f"127.0.0.1:{pg.port}", user, "wrong-password", "scram-sha-256",
                           database="app")
    doc["listeners"].append({"name": "pgbad", "protocol": "postgres", "listen": "127.0.0.1:0",
                             "routes": [{"name": "bad", "backend": bad}]})
    doc["admin"] = {"listen": "127.0.0.1:0"}
    return doc


def admin_url(proxy: ProxyProcess) -> str:
    wait_until(lambda: "admin listening on" in proxy.log_text(), timeout=10, what="the admin listener")
    host, port = re.search(r"dbproxy: admin listening on ([\d.]+):(\d+)", proxy.log_text()).groups()
    return f"http://{host}:{port}"


def curl(url: str) -> tuple[int, bytes]:
    """GET with curl: (status, body)."""
    out = subprocess.run(["curl", "-s", "-m", "10", "-w", "\n%{http_code}", url], capture_output=True, timeout=20,
                         check=True).stdout
    body, _, status = out.rpartition(b"\n")
    return int(status), body


def scrape(base: str) -> dict:
    status, body = curl(base + "/metrics")
    assert status == 200, body
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def ready(base: str) -> tuple[int, dict]:
    status, body = curl(base + "/readyz")
    return status, orjson.loads(body)


def connect(proxy: ProxyProcess) -> psycopg.Connection:
    return psycopg.connect(host="127.0.0.1", port=proxy.port("pg"), user="alice", dbname="app", password="unused",
                           sslmode="disable", connect_timeout=10, autocommit=True)


def psql(proxy: ProxyProcess, sql: str, listener: str = "pg") -> subprocess.CompletedProcess:
    dsn = f"host=127.0.0.1 port={proxy.port(listener)} user=alice dbname=app sslmode=disable connect_timeout=10"
    return subprocess.run(["psql", dsn, "-X", "-v", "ON_ERROR_STOP=1", "-Atc", sql], capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, PGPASSWORD="client-password-not-used"))


def test_counters_move_by_what_psql_and_psycopg_did(pg, tmp_path, proxy_factory):
    proxy = proxy_factory(config(pg, tmp_path, jsonl_audit(tmp_path)))
    base = admin_url(proxy)
    assert curl(base + "/healthz")[0] == 200
    wait_until(lambda: ready(base)[0] == 200, timeout=10, what="ready")
    before = scrape(base)
    for i in range(3):
        with connect(proxy) as conn:
            for q in range(5):
                assert conn.execute("SELECT %s::text", (f"s{i}-q{q}",)).fetchone() == (f"s{i}-q{q}",)
    out = psql(proxy, "SELECT 40 + 2")
    assert out.returncode == 0 and out.stdout.strip() == "42", out.stderr
    refused = psql(proxy, "SELECT 1", listener="pgbad")  # the backend refuses the proxy's login
    assert refused.returncode != 0 and "password authentication failed" in refused.stderr, refused.stderr

    def settled():
        s = scrape(base)
        return value(s, "dbproxy_sessions_total", outcome="completed", **PG) - \
            value(before, "dbproxy_sessions_total", outcome="completed", **PG) >= 4 and \
            value(s, "dbproxy_sessions_active", state="running", **PG) == 0

    wait_until(settled, timeout=10, what="the sessions counted")
    after = scrape(base)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("dbproxy_sessions_total", outcome="completed", **PG) == 4
    assert value(after, "dbproxy_sessions_active", state="running", **PG) == 0
    assert value(after, "dbproxy_sessions_active", state="starting", **PG) == 0
    assert moved("dbproxy_sessions_total", outcome="refused", **BAD) == 1
    assert moved("dbproxy_sessions_total", outcome="completed", **BAD) == 0
    # Bytes and messages each way, from the pipelines' own counts.
    for direction in ("client_to_backend", "backend_to_client"):
        assert moved("dbproxy_bytes_total", direction=direction, **PG) > 0
        assert moved("dbproxy_messages_total", direction=direction, **PG) >= 16  # 15 queries + psql's
    # The proxy's login to PostgreSQL: four that worked, one refused (28P01: invalid password).
    assert moved("dbproxy_backend_login_seconds_count", outcome="ok", **PG) == 4
    assert 0 < moved("dbproxy_backend_login_seconds_sum", outcome="ok", **PG) < 4 * 15
    assert moved("dbproxy_backend_login_seconds_count", outcome="failed", **BAD) == 1
    assert moved("dbproxy_errors_total", kind="backend", code="28P01", **BAD) == 1
    # The audit worker: up, accepting, its acks caught up; its own stats arrive once a second.
    assert value(after, "dbproxy_audit_worker_up") == 1 and value(after, "dbproxy_audit_accepting") == 1
    assert moved("dbproxy_audit_events_submitted_total") > 0
    wait_until(lambda: value(scrape(base), "dbproxy_audit_events_written_total") > 0, timeout=10,
               what="the worker's statistics")
    wait_until(lambda: value(scrape(base), "dbproxy_audit_unacked_frames") == 0, timeout=10, what="acks")
    assert value(scrape(base), "dbproxy_audit_lag_seconds") == 0


def test_readyz_is_503_while_the_audit_fails_closed_and_200_when_the_siem_returns(pg, receiver, tmp_path,
                                                                                   proxy_factory):
    receiver.down = True
    sink = http_sink(receiver, tmp_path, spool_max_bytes=16 * 1024, on_spool_full="fail_closed")
    proxy = proxy_factory(config(pg, tmp_path, {"sinks": [sink, {"type": "jsonl", "path": str(tmp_path / "audit.jsonl")}]}))
    base = admin_url(proxy)
    wait_until(lambda: ready(base)[0] == 200, timeout=10, what="ready")
    with connect(proxy) as conn:
        with pytest.raises(psycopg.Error, match="audit unavailable"):
            for i in range(2000):
                conn.execute("SELECT %s::text", (f"fill-{i}",))
    status, body = ready(base)
    assert status == 503 and body["ready"] is False
    assert body["reason"] == "the audit fails closed (sink siem blocked): sessions are refused"
    assert curl(base + "/healthz")[0] == 200  # alive all the same
    wait_until(lambda: value(scrape(base), "dbproxy_audit_sink_blocked", sink="siem") == 1, timeout=5,
               what="the worker's sink statistics")
    s = scrape(base)
    assert value(s, "dbproxy_audit_accepting") == 0
    assert value(s, "dbproxy_audit_sink_spool_max_bytes", sink="siem") == 16 * 1024
    assert value(s, "dbproxy_audit_sink_spool_bytes", sink="siem") > 0
    assert value(s, "dbproxy_audit_sink_pending_events", sink="siem") > 0
    assert value(s, "dbproxy_audit_sink_failing", sink="siem") == 1
    assert value(s, "dbproxy_audit_sink_delivery_lag_seconds", sink="siem") > 0
    with pytest.raises(psycopg.OperationalError, match="audit unavailable"):
        connect(proxy)
    wait_until(lambda: value(scrape(base), "dbproxy_errors_total", kind="audit_unavailable", code="", **PG) == 1,
               timeout=5, what="the refusal counted")
    receiver.down = False
    wait_until(lambda: ready(base)[0] == 200, timeout=30, what="ready again")
    assert ready(base)[1] == {"ready": True, "reason": "ready"}

    def drained():
        s = scrape(base)
        return value(s, "dbproxy_audit_sink_blocked", sink="siem") == 0 and \
            value(s, "dbproxy_audit_sink_pending_events", sink="siem") == 0 and \
            value(s, "dbproxy_audit_sink_delivered_total", sink="siem") > 0

    wait_until(drained, timeout=30, what="the spool drained")
    assert value(scrape(base), "dbproxy_audit_sink_delivery_lag_seconds", sink="siem") == 0


def test_readyz_is_503_while_the_audit_worker_is_dead(pg, tmp_path, proxy_factory):
    proxy = proxy_factory(config(pg, tmp_path, jsonl_audit(tmp_path)))
    base = admin_url(proxy)
    wait_until(lambda: ready(base)[0] == 200, timeout=10, what="ready")
    [first] = audit_worker_pids(proxy.proc.pid)
    os.kill(first, signal.SIGKILL)
    seen: list[tuple[int, dict]] = []

    def not_ready():
        seen.append(ready(base))
        return seen[-1][0] == 503

    wait_until(not_ready, timeout=10, interval=0.02, what="readyz 503 once the worker died")
    assert seen[-1][1] == {"ready": False,
                           "reason": "the audit worker is down (sessions are refused until it is back)"}
    assert value(scrape(base), "dbproxy_audit_worker_up") == 0
    wait_until(lambda: ready(base)[0] == 200, timeout=30, what="ready with a new worker")
    s = scrape(base)
    assert value(s, "dbproxy_audit_worker_up") == 1 and value(s, "dbproxy_audit_worker_starts_total") == 2
    with connect(proxy) as conn:
        assert conn.execute("SELECT 'after'").fetchone() == ("after",)
