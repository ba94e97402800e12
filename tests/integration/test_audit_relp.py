"""The RELP audit sink end to end: real ``dbproxy serve``, real PostgreSQL, real rsyslog with imrelp.

Every test keeps a JSONL sink beside the RELP sink: the JSONL trail is what
the proxy recorded, and rsyslog's ``relp.jsonl`` (one line per message it
took, written before it acknowledged: the peer's RELP ruleset is a Direct
queue) must hold every one of those events in ``seq`` order with the hash
chain intact.  RELP is at-least-once: after a broken connection the frames
that were not acknowledged are sent again, so a repeat may appear — but only
right after the break, never more than the window, and dropping repeats by
``seq`` gives exactly the trail.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import orjson
import pytest

from dbproxy.audit.chain import verify_files
from scripts.peers import HeldPort
from tests.integration.test_audit_shipping import (
    FAST_RETRY, Workload, assert_exactly_once_in_order, proxy_config, run_sessions, settled_trail, trail,
)
from tests.support import dbproxy_cli, peer_missing, wait_until

pytestmark = pytest.mark.integration

WINDOW = 64


def _require_relp():
    from scripts.peers.rsyslog import relp_available, rsyslogd_bin

    try:
        rsyslogd_bin()
    except FileNotFoundError as exc:
        peer_missing(f"{exc}")
    if not relp_available():
        peer_missing("rsyslog's imrelp (rsyslog-relp; run scripts/install/rsyslog.sh)")


@pytest.fixture
def rsyslog(tmp_path):
    from scripts.peers.rsyslog import start_rsyslog

    _require_relp()
    server = start_rsyslog(tmp_path / "rsyslog")
    yield server
    server.stop()


def relp_sink(address: str, workdir: Path, **extra) -> dict:
    return {"type": "relp", "name": "siem", "address": address, "window": WINDOW, "spool_dir": str(workdir / "spool"), **FAST_RETRY, **extra}


def relp_raws(server) -> list[bytes]:
    return [m["msg"].encode() for m in server.received("relp")]


def relp_events(server) -> list[dict]:
    return [orjson.loads(raw) for raw in relp_raws(server)]


def wait_relp(server, count: int, timeout: float = 40.0) -> list[dict]:
    """Until rsyslog has *count* distinct events (by seq)."""
    wait_until(lambda: len({e["seq"] for e in relp_events(server)}) >= count, timeout=timeout, what=f"{count} events at rsyslog/relp")
    time.sleep(0.3)  # a straggler would show up now
    return relp_events(server)


def established_to(port: int) -> int:
    out = subprocess.run(["ss", "-Htn", "state", "established", f"( dport = :{port} )"], capture_output=True, text=True, check=True)
    return len([line for line in out.stdout.splitlines() if line.strip()])


def test_relp_delivers_every_event_in_order_over_one_connection(pg, rsyslog, tmp_path, proxy_factory):
    proxy = proxy_factory(proxy_config(pg, tmp_path, [relp_sink(rsyslog.address("relp"), tmp_path)]))
    run_sessions(proxy, 3, 6, tag="relp", pause=0.02)
    expected = settled_trail(tmp_path, 3)
    received = wait_relp(rsyslog, len(expected))
    assert_exactly_once_in_order(received, expected, relp_raws(rsyslog))
    # One kept RELP session, not a connection per batch: it is still open while idle.
    assert established_to(rsyslog.ports["relp"]) == 1
    run_sessions(proxy, 2, 4, tag="more", pause=0.02)
    expected = settled_trail(tmp_path, 5)
    assert_exactly_once_in_order(wait_relp(rsyslog, len(expected)), expected, relp_raws(rsyslog))
    assert established_to(rsyslog.ports["relp"]) == 1
    msg = rsyslog.received("relp")[0]
    assert msg["app"] == "dbproxy" and msg["msgid"] == "TAU02I" and msg["sd"].startswith('[dbproxy@32473 seq="1" uid="')
    out = dbproxy_cli("audit", "verify", str(tmp_path / "audit.jsonl"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "delivery failed" not in proxy.log_text()


def assert_repeats_only_at_breaks(received: list[dict], expected: list[dict], breaks: int) -> None:
    """Dropping repeats by seq gives the trail; repeats are re-sends of at most WINDOW unacknowledged
    frames, right after a break (the seq steps back there, and only there)."""
    seqs = [e["seq"] for e in received]
    firsts: dict[int, dict] = {}
    for e in received:
        firsts.setdefault(e["seq"], e)
    assert [firsts[s] for s in sorted(firsts)] == expected, "some events never reached rsyslog, or differ"
    assert sorted(firsts) == [e["seq"] for e in expected]
    steps_back = [(a, b) for a, b in zip(seqs, seqs[1:]) if b <= a]
    assert len(steps_back) <= breaks, f"seq went back {len(steps_back)} times: {steps_back[:5]}"
    for a, b in steps_back:
        assert a - b < WINDOW, f"re-sent {a - b + 1} events, more than the window of {WINDOW}"
    for e in received:  # a repeat is the same bytes
        assert e == firsts[e["seq"]]


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_relp_rsyslog_down_mid_stream_loses_nothing(pg, rsyslog, tmp_path, proxy_factory, how):
    """SIGKILL (nothing drained: only what rsyslog acknowledged is in its file) or SIGTERM (serverclose)."""
    proxy = proxy_factory(proxy_config(pg, tmp_path, [relp_sink(rsyslog.address("relp"), tmp_path)]))
    work = Workload(proxy, "r", pause=0.001)
    work.start()
    wait_relp(rsyslog, 80, timeout=30)
    getattr(rsyslog, how)()
    during = len(trail(tmp_path))
    wait_until(lambda: len(trail(tmp_path)) > during + 60, timeout=30, what="queries while rsyslog is down")
    wait_until(lambda: "delivery failed" in proxy.log_text(), timeout=15, what="the sink noticing the outage")
    rsyslog.start()
    time.sleep(1.0)
    sessions = work.finish()
    expected = settled_trail(tmp_path, sessions)
    received = wait_relp(rsyslog, len(expected))
    assert_repeats_only_at_breaks(received, expected, breaks=1)
    assert "delivering again" in proxy.log_text()
    assert verify_files([str(tmp_path / "audit.jsonl")]).ok


def spool_pending_bytes(spool: Path) -> int:
    from dbproxy.audit.sinks.spool import Spool  # noqa: F401 - the format: header + payload per record

    cursor = orjson.loads((spool / "cursor.json").read_bytes()) if (spool / "cursor.json").exists() else {"segment": 0, "offset": 0}
    total = 0
    for name in os.listdir(spool):
        if name.startswith("seg-") and name.endswith(".spool"):
            n = int(name[4:-6])
            size = os.path.getsize(spool / name)
            if n > cursor["segment"]:
                total += size
            elif n == cursor["segment"]:
                total += size - cursor["offset"]
    return total


def test_relp_wrong_port_spools_then_drains_when_the_receiver_appears(pg, tmp_path, proxy_factory):
    _require_relp()
    from scripts.peers.rsyslog import start_rsyslog

    nowhere = HeldPort()  # nobody listens here yet, and no listener of the proxy can take it meanwhile
    port = nowhere.port
    proxy = proxy_factory(proxy_config(pg, tmp_path, [relp_sink(f"127.0.0.1:{port}", tmp_path)]))
    run_sessions(proxy, 2, 5, tag="early")
    first = settled_trail(tmp_path, 2)
    wait_until(lambda: "delivery failed" in proxy.log_text(), timeout=10, what="the refused connection noticed")
    assert "Connection refused" in proxy.log_text()
    wait_until(lambda: spool_pending_bytes(tmp_path / "spool") > 0, timeout=10, what="events held in the spool")
    held = spool_pending_bytes(tmp_path / "spool")
    run_sessions(proxy, 2, 5, tag="still")
    settled_trail(tmp_path, 4)
    wait_until(lambda: spool_pending_bytes(tmp_path / "spool") > held, timeout=10, what="the spool growing")
    nowhere.release()
    server = start_rsyslog(tmp_path / "late-rsyslog", ports={"relp": port})
    try:
        expected = settled_trail(tmp_path, 4)
        assert len(expected) > len(first)
        received = wait_relp(server, len(expected))
        assert_exactly_once_in_order(received, expected, relp_raws(server))
        wait_until(lambda: spool_pending_bytes(tmp_path / "spool") == 0, timeout=10, what="the spool drained")
        assert "delivering again" in proxy.log_text()
    finally:
        server.stop()
