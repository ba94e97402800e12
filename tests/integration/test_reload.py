"""Reload (SIGHUP / ``dbproxy reload``) through the real ``dbproxy serve`` in front of the real PostgreSQL.

New sessions use the re-read config, running sessions keep theirs; an invalid
file keeps the old config and says why (log, audit, the CLI's own check);
listeners are added, removed, moved and changed without dropping the others.
The two routes log in as different PostgreSQL users, so ``select current_user``
shows which config generation a session belongs to.
"""

from __future__ import annotations

import json
import os
import signal
import socket

import psycopg
import pytest

from scripts.peers import free_port
from tests.support import ProxyProcess, dbproxy_cli, password_backend, read_audit, wait_until

pytestmark = pytest.mark.integration


def _listener(pg, workdir, name: str, port: int, method: str, **extra) -> dict:
    user, password = pg.users[method]
    backend = password_backend(workdir, f"127.0.0.1:{pg.port}", user, password, method, database="app")
    return {"name": name, "protocol": "postgres", "listen": f"127.0.0.1:{port}", "routes": [{"backend": backend}], **extra}


def _connect(port: int):
    return psycopg.connect(host="127.0.0.1", port=port, user="alice", dbname="app", password="unused",
                           sslmode="disable", connect_timeout=10, autocommit=True)


def _whoami(port: int) -> str:
    with _connect(port) as conn:
        return conn.execute("select current_user").fetchone()[0]


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def _reloads(proxy) -> list[dict]:
    return [e for e in read_audit(proxy.workdir / "audit.jsonl") if e["event"] == "proxy.reload"]


@pytest.fixture
def proxy(pg, tmp_path):
    ports = {"a": free_port(), "b": free_port(), "c": free_port()}
    config = {"listeners": [_listener(pg, tmp_path, "pg1", ports["a"], "scram-sha-256")],
              "audit": {"sinks": [{"type": "jsonl", "path": str(tmp_path / "audit.jsonl")}]},
              "shutdown_grace_seconds": 2}
    p = ProxyProcess(tmp_path, config).start()
    p.workdir, p.free, p.base = tmp_path, ports, config
    p.scram, p.md5 = pg.users["scram-sha-256"][0], pg.users["md5"][0]
    yield p
    p.stop()


def _write(proxy, listeners: list[dict]) -> None:
    doc = dict(proxy.base, listeners=listeners)
    proxy.config_path.write_text(json.dumps(doc, indent=2))


def _reload(proxy, n: int) -> dict:
    r = dbproxy_cli("reload", "--config", str(proxy.config_path))
    assert r.returncode == 0, r.stderr
    assert f"reload signalled to process {proxy.proc.pid}" in r.stdout
    return wait_until(lambda: _reloads(proxy)[n:] or None, what="the proxy.reload event")[0]


def test_reload_changes_new_sessions_and_keeps_running_ones(proxy, pg):
    a, b = proxy.free["a"], proxy.free["b"]
    assert _whoami(a) == proxy.scram
    running = _connect(a)  # a session of the first config, open across the reload
    try:
        _write(proxy, [_listener(pg, proxy.workdir, "pg1", a, "md5"),
                       _listener(pg, proxy.workdir, "pg2", b, "scram-sha-256")])
        event = _reload(proxy, 0)
        assert event["success"] is True and event["added"] == ["pg2"] and event["changed"] == ["pg1"]
        assert event["removed"] == []
        # New sessions on the kept socket: the new route; the new listener serves too.
        assert _whoami(a) == proxy.md5
        assert _whoami(b) == proxy.scram
        # The running session still is what it was, and still works.
        assert running.execute("select current_user").fetchone()[0] == proxy.scram
    finally:
        running.close()
    assert "reloaded" in proxy.log_text()


def test_invalid_config_keeps_the_running_one_and_says_why(proxy, pg):
    a = proxy.free["a"]
    proxy.config_path.write_text(json.dumps(dict(proxy.base, listeners=[{"name": "pg1", "protocol": "postgres",
                                                                           "listen": "nowhere", "routes": []}])))
    # The CLI checks first: nothing is signalled, every error named.
    r = dbproxy_cli("reload", "--config", str(proxy.config_path))
    assert r.returncode == 2
    assert "listeners[0].listen" in r.stderr and "listeners[0].routes" in r.stderr
    assert "not reloading" in r.stderr and not _reloads(proxy)
    # A SIGHUP sent anyway (kill -HUP): the proxy checks too, keeps its config, logs and audits.
    os.kill(proxy.proc.pid, signal.SIGHUP)
    event = wait_until(lambda: _reloads(proxy) or None, what="the refused reload")[0]
    assert event["success"] is False and "config error" in event["error"]
    assert "listeners[0].listen" in event["error_paths"]
    wait_until(lambda: "reload refused, the running config stays" in proxy.log_text(), what="the log line")
    assert _whoami(a) == proxy.scram  # still served, by the old config
    assert proxy.proc.poll() is None


def test_listeners_removed_and_moved_without_dropping_others(proxy, pg):
    a, b, c = proxy.free["a"], proxy.free["b"], proxy.free["c"]
    _write(proxy, [_listener(pg, proxy.workdir, "pg1", a, "scram-sha-256"),
                   _listener(pg, proxy.workdir, "pg2", b, "md5")])
    _reload(proxy, 0)
    on_b = _connect(b)
    try:
        # pg2 removed, pg1 moved from a to c.
        _write(proxy, [_listener(pg, proxy.workdir, "pg1", c, "scram-sha-256")])
        event = _reload(proxy, 1)
        assert event["success"] is True and event["removed"] == ["pg2"] and event["changed"] == ["pg1"]
        assert wait_until(lambda: _refused(b) and _refused(a), what="the old sockets closed")
        assert _whoami(c) == proxy.scram
        # The session on the removed listener goes on.
        assert on_b.execute("select current_user").fetchone()[0] == proxy.md5
    finally:
        on_b.close()


def test_a_port_in_use_refuses_the_whole_reload(proxy, pg):
    a = proxy.free["a"]
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        _write(proxy, [_listener(pg, proxy.workdir, "pg1", a, "md5"),
                       _listener(pg, proxy.workdir, "pg2", taken, "md5")])
        event = _reload(proxy, 0)
    assert event["success"] is False and "pg2" in event["error"]
    assert _whoami(a) == proxy.scram  # nothing changed, pg1 included
