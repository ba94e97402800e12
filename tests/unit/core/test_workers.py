"""``"workers": N`` (dbproxy.workers): the config key, the shared connection counts, the merged
/metrics, and the audit worker's routing of checkpoints to several links.  The processes
themselves run in tests/integration/test_workers.py (real PostgreSQL, psycopg)."""

from __future__ import annotations

import json

import attrs
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dbproxy.audit.recorder import Checkpoint
from dbproxy.audit.worker import Hub
from dbproxy.config import load_config
from dbproxy.engines import default_registry
from dbproxy.errors import AccessDenied, ConfigErrors
from dbproxy.limits import ConnectionLimits, LimitsConfig, SharedCounts
from dbproxy.workers import merge_metrics

REG = default_registry()


def _load(tmp_path, listen="127.0.0.1:6432", **top):
    doc = {"listeners": [{"name": "pg", "protocol": "postgres", "listen": listen,
                          "routes": [{"backend": {"address": "db:5432", "auth": {"method": "trust"}}}]}], **top}
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(doc))
    return load_config(str(path), REG)


def test_workers_default_and_configured(tmp_path):
    assert _load(tmp_path).workers == 1
    assert _load(tmp_path, workers=4).workers == 4
    assert _load(tmp_path, listen="127.0.0.1:0", workers=1).workers == 1  # one process: port 0 is fine


@pytest.mark.parametrize("value", [0, -2, "2", True, 1.5])
def test_workers_must_be_a_positive_integer(tmp_path, value):
    with pytest.raises(ConfigErrors) as info:
        _load(tmp_path, workers=value)
    (err,) = info.value.errors
    assert err.path == "workers" and err.file.endswith("cfg.json") and "an integer >= 1" in err.expected


def test_workers_need_fixed_ports_and_the_audit_worker(tmp_path):
    with pytest.raises(ConfigErrors) as info:
        _load(tmp_path, listen="127.0.0.1:0", workers=2, audit={"worker": False})
    by_path = {e.path: e.expected for e in info.value.errors}
    assert set(by_path) == {"listeners[0].listen", "audit.worker"}
    assert "a fixed port" in by_path["listeners[0].listen"] and "one audit chain" in by_path["audit.worker"]


@attrs.define
class _Identity:
    user: str


@attrs.define
class _Session:
    id: str
    listener: str
    identity: _Identity


def _limits(path, index: int, cfg: LimitsConfig, workers: int = 2) -> ConnectionLimits:
    limits = ConnectionLimits(cfg)
    limits.shared = SharedCounts(str(path), workers, index)
    return limits


def test_shared_counts_hold_a_limit_across_processes(tmp_path):
    """Two processes' views of one table (as two ``ConnectionLimits`` on the same file): a listener
    limit of 3 admits 3 sessions in all, wherever they land; a dead process's slots come back."""
    path = tmp_path / "limits"
    SharedCounts.create(str(path), 2)
    cfg = LimitsConfig(listeners={"pg": 3}, per_identity=2)
    a, b = _limits(path, 0, cfg), _limits(path, 1, cfg)
    s = [_Session(f"s{i}", "pg", _Identity("alice" if i < 2 else f"u{i}")) for i in range(6)]
    a.admit(s[0])
    b.admit(s[1])
    with pytest.raises(AccessDenied) as info:  # alice's third, on either process
        b.admit(_Session("x", "pg", _Identity("alice")))
    assert info.value.reason == "too_many_connections_identity"
    a.admit(s[2])
    with pytest.raises(AccessDenied) as info:
        b.admit(s[3])
    assert info.value.reason == "too_many_connections_listener"
    b.release(s[1])
    b.admit(s[3])  # a slot freed by one process serves the other
    with pytest.raises(AccessDenied):
        b.admit(s[4])
    # Process 0 dies: the supervisor drops its counts (s0, s2), two slots are free again.
    SharedCounts(str(path), 2, 0).clear_worker(0)
    b.admit(s[4])
    b.admit(s[5])
    with pytest.raises(AccessDenied):
        b.admit(_Session("y", "pg", _Identity("carol")))


def test_shared_counts_reuse_slots_of_keys_nobody_counts(tmp_path):
    path = tmp_path / "limits"
    SharedCounts.create(str(path), 1)
    counts = SharedCounts(str(path), 1, 0)
    with counts.locked():
        for i in range(SharedCounts.SLOTS * 2):  # twice the table's size, one at a time
            key = counts.key("identity", f"user{i}")
            counts.add(key, 1)
            assert counts.total(key) == 1
            counts.add(key, -1)
        key = counts.key("identity", "held")
        counts.add(key, 2)
        assert counts.total(key) == 2 and counts.total(counts.key("identity", "other")) == 0


def _registry(sessions: float, errors: float) -> bytes:
    registry = CollectorRegistry()
    Gauge("dbproxy_sessions_active", "now", ["listener"], registry=registry).labels("pg").set(sessions)
    Counter("dbproxy_errors", "errors", registry=registry).inc(errors)
    return generate_latest(registry)


def test_merged_metrics_label_each_process_and_parse():
    text = merge_metrics({0: _registry(3, 1).decode(), 1: _registry(5, 2).decode()})
    families = {f.name: f for f in text_string_to_metric_families(text)}
    active = {(s.labels["worker"], s.labels["listener"]): s.value for s in families["dbproxy_sessions_active"].samples}
    assert active == {("0", "pg"): 3.0, ("1", "pg"): 5.0}
    totals = {s.labels["worker"]: s.value for s in families["dbproxy_errors"].samples if s.name == "dbproxy_errors_total"}
    assert totals == {"0": 1.0, "1": 2.0}
    assert text.count("# TYPE dbproxy_sessions_active gauge") == 1 and text.count("# HELP dbproxy_errors_total") == 1


class _Recorder:
    on_checkpoint = None

    def track_changes(self) -> None:
        pass


def _mark(frames: int, owner, seqs: dict) -> Checkpoint:
    mark = Checkpoint(frames, owner)
    mark.seqs = seqs
    return mark


def test_hub_acks_each_link_with_counters_up_to_its_own_checkpoint():
    """The audit worker's links share one recorder: a written checkpoint acks its own link, and the
    session counters changed before it reach every link, each with its next ack, never ahead of it."""
    hub = Hub(_Recorder())
    a, b = hub.add(None), hub.add(None)
    hub.on_checkpoint([_mark(5, a, {b"sa": 1, b"sb": 1})])
    assert (a.acked, b.acked) == (5, 0)
    assert a._seqs == {b"sa": 1, b"sb": 1} and b._seqs == {}
    # b's events before a's next checkpoint, b's own checkpoint after: b's ack carries both.
    hub.on_checkpoint([_mark(9, a, {b"sb": 2}), _mark(3, b, {b"sb": 3})])
    assert (a.acked, b.acked) == (9, 3)
    assert b._seqs == {b"sa": 1, b"sb": 3}
    # Changes after b's last checkpoint wait for b's next one.
    hub.on_checkpoint([_mark(12, a, {b"sb": 4})])
    assert b._seqs == {b"sa": 1, b"sb": 3} and b._pending == {b"sb": 4}


@pytest.mark.parametrize("kind", ["tcp", "udp"])
def test_listeners_share_a_port_with_reuse_port(kind):
    """Each proxy process binds the same listener address (SO_REUSEPORT); without it the second fails."""
    import trio

    from dbproxy.config import ListenerConfig
    from dbproxy.listen import bound_address, open_listener

    async def main() -> None:
        first = await open_listener(ListenerConfig(name="a", protocol="x", host="127.0.0.1", port=0, tls=None, routes=(), kind=kind),
                                    reuse_port=True)
        port = bound_address(first[0])[1]
        lc = ListenerConfig(name="a", protocol="x", host="127.0.0.1", port=port, tls=None, routes=(), kind=kind)
        second = await open_listener(lc, reuse_port=True)
        assert bound_address(second[0]) == ("127.0.0.1", port)
        with pytest.raises(OSError):
            await open_listener(lc)
        for sock in first + second:
            (sock.socket if hasattr(sock, "socket") else sock).close()

    trio.run(main)


async def test_a_process_that_dies_is_restarted_even_when_its_output_ends_before_it_can_be_reaped(
        tmp_path, monkeypatch):
    """A process that dies closes its stdout a moment before the kernel lets it be reaped.  The
    supervisor must take that end of output for a death to restart, not for a cancellation that
    stops every process.  The real race (``SIGKILL`` of a serving process) is caught by
    tests/integration/test_workers.py only now and then; a stand-in child that closes its stdout,
    then lives on for half a second, makes it happen every time (a real proxy process cannot be
    made to do that on purpose)."""
    import shutil
    import sys
    import types

    import trio

    from dbproxy import workers

    config = _load(tmp_path, workers=2)
    supervisor = workers.Supervisor(config, REG)
    SharedCounts.create(workers.limits_file(supervisor.state_dir), supervisor.count)
    events: list[bytes] = []
    supervisor.link = types.SimpleNamespace(submit_nowait=lambda body: events.append(body) or True)
    monkeypatch.setattr(workers, "RESTART_DELAY", 0.0)
    real_open_process = trio.lowlevel.open_process
    started: list[int] = []

    async def open_stand_in(argv, **kwargs):
        started.append(len(started) + 1)
        if len(started) == 1:
            script = ("import os, time; os.write(1, b'{\"ready\": true}\\n'); os.close(1); "
                      "time.sleep(0.5); os._exit(3)")
        else:  # the restart: the supervisor then stops
            supervisor.stopping = True
            script = "import os; os.write(1, b'{\"ready\": true}\\n'); os._exit(0)"
        return await real_open_process([sys.executable, "-c", script], **kwargs)

    monkeypatch.setattr(workers.trio.lowlevel, "open_process", open_stand_in)
    try:
        with trio.fail_after(20):
            await supervisor._run_proc(supervisor.procs[1])
    finally:
        shutil.rmtree(supervisor.state_dir, ignore_errors=True)
    assert started == [1, 2], "the process was not started again"
    (exit_event,) = [json.loads(body) for body in events]
    assert exit_event["event"] == "proxy.worker.exit"
    assert (exit_event["worker"], exit_event["status"], exit_event["restarting"]) == (1, 3, True)
