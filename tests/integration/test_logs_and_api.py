"""Production surface: JSON logs with the session id on every line, per-module levels, and the
Python API (``dbproxy.serve``, ``dbproxy.Config.load``, ``dbproxy.audit.read`` / ``verify``) —
through the real ``dbproxy serve`` / an in-process server in front of the real PostgreSQL."""

from __future__ import annotations

import json
import socket
import time

import pytest
import trio

import dbproxy
from tests.support import ProxyProcess, jsonl_audit, pg_connect, pg_scram_config, read_audit, wait_until

pytestmark = pytest.mark.integration


def _json_lines(text: str) -> list[dict]:
    # The listeners' "dbproxy: NAME (...) listening on" announcements go to stdout for scripts;
    # the log itself (stderr) is JSON, every line of it.
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("dbproxy: ")]
    return [json.loads(line) for line in lines]


def test_json_logs_carry_the_session_on_every_line_of_a_session(pg, tmp_path):
    config = pg_scram_config(pg, tmp_path, jsonl_audit(tmp_path))
    config["listeners"][0]["handshake_timeout_seconds"] = 1
    # DEBUG for the flow only: the per-module level; the root stays at WARNING.
    config["logging"] = {"format": "json", "level": "WARNING", "levels": {"dbproxy.flow": "DEBUG",
                                                                         "dbproxy.engine": "INFO"}}
    proxy = ProxyProcess(tmp_path, config).start()
    try:
        with pg_connect(proxy) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
        # A stalled client: the engine logs its timeout from inside that session's task.
        with socket.create_connection(("127.0.0.1", proxy.port()), timeout=10) as s:
            s.sendall(b"\x00\x00\x00\x20\x00\x03")
            s.settimeout(10)
            while s.recv(100):
                pass
        starts = wait_until(lambda: [e for e in read_audit(tmp_path / "audit.jsonl") if e["event"] == "db.session.start"
                                     and e.get("error") == "client handshake timed out"], what="the timeout's audit")
        stalled = starts[-1]["sid"]
        lines = wait_until(lambda: [r for r in _json_lines(proxy.log_text()) if "client handshake timed out" in r["message"]],
                           what="the timeout's log line")
    finally:
        proxy.stop()
    records = _json_lines(proxy.log_text())
    assert lines[0]["session"] == stalled and lines[0]["level"] == "INFO" and lines[0]["logger"] == "dbproxy.engine"
    assert lines[0]["process"] == "proxy" and lines[0]["time"].endswith("Z")
    # Every line that names a session in its text carries that session in its "session" field.
    named = [r for r in records if stalled in r["message"]]
    assert named and all(r.get("session") == stalled for r in named), named
    # Levels: nothing below WARNING from modules left at the root level.
    low = [r for r in records if r["level"] in ("INFO", "DEBUG") and not r["logger"].startswith(("dbproxy.flow", "dbproxy.engine"))]
    assert not low, low


def test_log_level_flag_is_checked():
    from tests.support import dbproxy_cli

    r = dbproxy_cli("--log-level", "LOUD", "check-config", "/dev/null")
    assert r.returncode == 2 and "'LOUD' is not a log level" in r.stderr


def test_config_logging_errors_name_the_path(tmp_path):
    from dbproxy.errors import ConfigErrors

    path = tmp_path / "c.json"
    path.write_text(json.dumps({"listeners": [{"name": "pg", "protocol": "postgres", "listen": "127.0.0.1:0",
                                               "routes": [{"backend": {"address": "127.0.0.1:1", "database": "d",
                                                                       "user": "u", "auth": {"method": "trust"}}}]}],
                                "logging": {"format": "xml", "levels": {"dbproxy.flow": "LOUD"}}}))
    with pytest.raises(ConfigErrors) as info:
        dbproxy.Config.load(str(path))
    got = [f"{e.path}: {e.expected}" for e in info.value.errors]
    assert "logging.format: one of text, json, got 'xml'" in got, got
    assert any(g.startswith("logging.levels['dbproxy.flow']: one of CRITICAL") for g in got), got


async def test_python_api_serves_in_process_and_reads_the_trail(pg, tmp_path):
    config = pg_scram_config(pg, tmp_path, jsonl_audit(tmp_path))
    path = tmp_path / "proxy.json"
    path.write_text(json.dumps(config))
    loaded = dbproxy.Config.load(str(path))
    assert [lc.name for lc in loaded.listeners] == ["pg"]
    async with trio.open_nursery() as nursery:
        proxy = await nursery.start(dbproxy.serve, str(path))
        port = proxy.port("pg")
        assert port > 0 and [b.name for b in proxy.listeners] == ["pg"]

        def client() -> None:
            class _P:
                def port(self, name=None):
                    return port
            with pg_connect(_P()) as conn:
                assert conn.execute("select 'api'").fetchone() == ("api",)

        await trio.to_thread.run_sync(client)
        proxy.stop()  # graceful: serve returns once the sessions and the audit are done
    trail = str(tmp_path / "audit.jsonl")
    queries = list(dbproxy.audit.read(trail, event="db.session.query"))
    assert [q["db_query"] for q in queries] == ["select 'api'"]
    sid = queries[0]["sid"]
    mine = list(dbproxy.audit.read(trail, session=sid[:8]))
    assert [e["event"] for e in mine][0] == "db.session.start" and mine[-1]["event"] == "db.session.end"
    assert list(dbproxy.audit.read(trail, event=["db.session.start", "db.session.end"], success=True))[0]["sid"] == sid
    assert list(dbproxy.audit.read(trail, event="db.*", limit=2)) == mine[:2]
    first = mine[0]["time"]
    assert all(e["time"] >= first for e in dbproxy.audit.read(trail, since=first))
    assert list(dbproxy.audit.read(trail, until=first, session=sid)) == []
    assert list(dbproxy.audit.read(trail, user="nobody")) == []
    result = dbproxy.audit.verify(trail)
    assert result.ok and result.events >= len(mine) and result.sessions >= 1
    # A tampered line breaks the chain, and verify says where.
    lines = open(trail, "rb").read().splitlines(keepends=True)
    (at,) = [i for i, line in enumerate(lines) if b"select 'api'" in line]
    lines[at] = lines[at].replace(b"select 'api'", b"select 'xyz'")
    tampered = tmp_path / "tampered.jsonl"
    tampered.write_bytes(b"".join(lines))
    bad = dbproxy.audit.verify(str(tampered))
    assert not bad.ok and bad.error is not None and "modified" in bad.error.reason
    with pytest.raises(ValueError, match="an ISO 8601 time"):
        list(dbproxy.audit.read(trail, since="yesterday"))
