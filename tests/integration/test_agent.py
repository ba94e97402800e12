"""The outbound agent with real isolation: targets the proxy cannot reach, reached through an agent.

A network namespace ``dbp-agent-<random>`` (``scripts/peers/netns.py``) holds
a real PostgreSQL, sshd, telnetd, an Xtigervnc desktop and xrdp, listening on
the namespace's own loopback only, and the agent (``dbproxy agent``, a real process inside the namespace);
a veth pair joins it to the root namespace, where the proxy runs.  The agent
dials the proxy's agents listener over the veth (TLS, the proxy's
certificate checked against a CA file); the proxy cannot reach the targets
itself (asserted).  Clients are the real psql, psycopg, ssh, vncdotool and
xfreerdp.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import require_binary
from tests.support import ROOT, ProxyProcess, dbproxy_cli, peer_missing, pg_session, read_audit, token_keygen, wait_until

pytestmark = pytest.mark.integration

NODE = "site-a"


class Site:
    """The namespace, its targets, the proxy and a way to start agents."""

    def __init__(self, ns, pg, sshd, proxy: ProxyProcess, workdir: Path) -> None:
        self.ns, self.pg, self.sshd, self.proxy, self.workdir = ns, pg, sshd, proxy, workdir
        self.agents: list[subprocess.Popen] = []
        self.audit_path = workdir / "audit.jsonl"

    @property
    def agents_port(self) -> int:
        return self.proxy.ports["agents"]

    def token(self, node: str = NODE) -> Path:
        path = self.workdir / f"{node}.token"
        if not path.exists():
            token = dbproxy_cli("token", "issue", "--config", str(self.proxy.config_path), "--node", node, "--ttl", "1h",
                                check=True).stdout.strip()
            path.write_text(token + "\n")
        return path

    def start_agent(self, *, token: Path | None = None, allow: list[str] | None = None, wait: bool = True,
                    name: str = NODE) -> subprocess.Popen:
        allow = allow if allow is not None else [f"127.0.0.1:{self.pg.port}", f"127.0.0.1:{self.sshd.port}",
                                                 f"127.0.0.1:{self.telnetd.port}", self.desktop.address,
                                                 self.xrdp.address]
        self.started = getattr(self, "started", 0) + 1
        log = open(self.workdir / f"agent-{self.started}.log", "wb")
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        argv = [sys.executable, "-m", "dbproxy.cli", "agent", "--proxy", f"{self.ns.host_addr}:{self.agents_port}",
                "--name", name, "--token-file", str(token or self.token()), "--ca-file", str(self.ca),
                "--backoff-initial", "0.2", "--backoff-max", "1"]
        for a in allow:
            argv += ["--allow", a]
        proc = self.ns.popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        proc.log_path = log.name
        log.close()
        self.agents.append(proc)
        if wait:
            count = len(self.agent_ids())
            wait_until(lambda: len(self.agent_ids()) > count or proc.poll() is not None, timeout=20,
                       what="the agent to link up")
            assert proc.poll() is None, Path(proc.log_path).read_text()
            proc.agent_id = max(self.agent_ids())
        return proc

    def agent_ids(self) -> list[int]:
        return [a["id"] for n in self.api("/api/nodes")["nodes"] for a in n["agents"]]

    def api(self, path: str) -> dict:
        host, port = self.admin
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=10) as r:
            return json.loads(r.read())

    def stop_agents(self) -> None:
        for proc in self.agents:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.agents.clear()
        wait_until(lambda: not self.agent_ids(), timeout=20, what="no agent linked")

    def psql(self, sql: str, *, database: str = "app", timeout: float = 60) -> subprocess.CompletedProcess:
        env = dict(os.environ, PGPASSWORD="unused", PGCONNECT_TIMEOUT="20")
        return subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(self.proxy.ports["pg"]), "-U", "alice", "-d",
                               database, "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql],
                              capture_output=True, text=True, env=env, timeout=timeout)

    def events(self) -> list[dict]:
        return read_audit(self.audit_path)


def _require_namespaces() -> None:
    from scripts.peers.netns import can_create

    why = can_create()
    if why is not None:
        peer_missing(why)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    from scripts.peers.certs import make_ca, make_cert
    from scripts.peers.netns import create_namespace
    from scripts.peers.postgres import pg_bindir, start_postgres
    from scripts.peers.sshd import sshd_bin, start_sshd
    from scripts.peers.telnetd import start_telnetd, telnetd_bin
    from scripts.peers.vnc import start_desktop, vnc_binaries
    from scripts.peers.xrdp import start_xrdp, xrdp_bin

    require_binary("psql")
    require_binary("ssh")
    try:
        pg_bindir()
        sshd_bin()
        telnetd_bin()
        vnc_binaries("tigervnc")
        xrdp_bin()
    except Exception as exc:
        peer_missing(str(exc))
    _require_namespaces()
    workdir = tmp_path_factory.mktemp("agent")
    ns = create_namespace()
    pg = sshd = telnetd = desktop = xrdp = proxy = site = None
    try:
        # The targets: started inside the namespace, listening on its loopback only.
        pg = ns.call(start_postgres, workdir / "pg")
        # 100 concurrent sessions and then some (the default 100 keeps 3 for superusers).
        pg.psql("-c", "ALTER SYSTEM SET max_connections = 150", db="postgres")
        ns.call(pg.kill)
        ns.call(pg.start)
        sshd = ns.call(start_sshd, workdir / "sshd")
        telnetd = ns.call(start_telnetd, workdir / "telnetd")
        (workdir / "telnet.secret").write_text(telnetd.password + "\n")
        # The desktops: Xtigervnc (its private /tmp by unshare works inside the namespace: the supervisor
        # inherits the namespace thread's network namespace) and xrdp (no sesman: /auth-only needs none).
        desktop = ns.call(start_desktop, workdir / "vnc")
        (workdir / "desk.secret").write_text(desktop.password + "\n")
        xrdp = ns.call(start_xrdp, workdir / "xrdp")
        token_keygen(workdir)
        config_token = {"algorithm": "EdDSA", "key_file": "token.key", "public_key_file": "token.pub",
                        "codes_file": "codes.json"}  # VNC one-time codes
        allowed = {pg.port, sshd.port, telnetd.port, desktop.port, xrdp.port}
        not_allowed = next(p for p in range(desktop.port + 1, desktop.port + 100) if p not in allowed)
        ca = make_ca(workdir / "tls")
        cert, key = make_cert(workdir / "tls", ca, "dbproxy", sans=[ns.host_addr])
        from scripts.peers import free_port

        admin_port = free_port()
        user, password = pg.users["scram-sha-256"]
        (workdir / "pg.secret").write_text(password + "\n")
        pg_backend = {"address": f"127.0.0.1:{pg.port}", "user": user, "database": "app", "via": f"agent:{NODE}",
                      "auth": {"method": "scram-sha-256", "password_file": "pg.secret"}}
        from scripts.peers.sshd import make_key

        make_key(workdir / "proxy_host_ed25519", "dbproxy-proxy-host")
        config = {
            "identity": {"token": config_token},
            "roles": {"ops": {"routes": ["*"], "targets": ["*"], "logins": [sshd.login, telnetd.login]},
                      "desk": {"routes": ["*"], "desktops": ["*"]},
                      "db": {"routes": ["*"], "databases": ["*"], "db_users": ["*"]}},
            "agents": {"listen": f"{ns.host_addr}:0", "tls": {"cert_file": str(cert), "key_file": str(key)},
                       "heartbeat_seconds": 1, "heartbeat_timeout_seconds": 4},
            "admin": {"listen": f"127.0.0.1:{admin_port}"},
            "listeners": [
                {"name": "pg", "protocol": "postgres", "listen": "127.0.0.1:0", "auth": {"methods": ["anonymous"], "anonymous_roles": ["db"]},
                 "routes": [
                     {"name": "ghost", "match": {"database": "ghost"},
                      "backend": {**pg_backend, "via": "agent:ghost-node"}},
                     # sshd's port is allowed, this one is not: the agent refuses to dial it.
                     {"name": "forbidden", "match": {"database": "forbidden"},
                      "backend": {**pg_backend, "address": f"127.0.0.1:{pg.port + 1 if pg.port < 65535 else 1}"}},
                     {"name": "app", "backend": pg_backend}]},
                {"name": "ssh", "protocol": "ssh", "listen": "127.0.0.1:0", "host_key_file": "proxy_host_ed25519",
                 "auth": {"methods": ["token"]},
                 "routes": [{"name": "web", "match": {"target": "web-*"},
                             "backend": {"address": sshd.address, "via": f"agent:{NODE}", "login": sshd.login,
                                         "auth": {"method": "publickey", "key_file": str(sshd.client_key)},
                                         "host_key": {"known_hosts_file": str(sshd.known_hosts)}}}]},
                {"name": "telnet", "protocol": "telnet", "listen": "127.0.0.1:0", "auth": {"methods": ["token"]},
                 "routes": [{"name": "hosts", "match": {"target": "host-*", "login": "deploy"},
                             "backend": {"address": telnetd.address, "via": f"agent:{NODE}", "login": telnetd.login,
                                         "auth": {"method": "password", "password_file": "telnet.secret"}}}]},
                {"name": "vnc", "protocol": "vnc", "listen": "127.0.0.1:0", "auth": {"methods": ["token"]},
                 "routes": [
                     {"name": "desk", "match": {"target": "desk-1"},
                      "backend": {"address": desktop.address, "via": f"agent:{NODE}",
                                  "auth": {"method": "vnc", "password_file": "desk.secret"}}},
                     {"name": "desk-forbidden", "match": {"target": "desk-forbidden"},
                      "backend": {"address": f"127.0.0.1:{not_allowed}", "via": f"agent:{NODE}",
                                  "auth": {"method": "vnc", "password_file": "desk.secret"}}}]},
                {"name": "rdp", "protocol": "rdp", "listen": "127.0.0.1:0",
                 "auth": {"methods": ["anonymous"], "anonymous_roles": ["desk"]},
                 "routes": [{"name": "win", "backend": {"address": xrdp.address, "via": f"agent:{NODE}",
                                                        "auth": {"method": "passthrough"}}}]},
            ],
            "audit": {"sinks": [{"type": "jsonl", "path": "audit.jsonl"}]},
            "shutdown_grace_seconds": 2,
        }
        proxy = ProxyProcess(workdir, config).start()
        wait_until(lambda: "agents" in _ports(proxy), timeout=20, what="the agents listener")
        proxy.ports.update(_ports(proxy))
        site = Site(ns, pg, sshd, proxy, workdir)
        site.telnetd = telnetd
        site.desktop, site.xrdp = desktop, xrdp
        site.ca = ca[0]
        site.admin = ("127.0.0.1", admin_port)
        yield site
    finally:
        if site is not None:
            for proc in site.agents:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        if proxy is not None:
            proxy.stop()
        if sshd is not None:
            sshd.stop()
        if telnetd is not None:
            telnetd.stop()
        if desktop is not None:
            desktop.stop()
        if xrdp is not None:
            xrdp.stop()
        if pg is not None:
            pg.stop()
        ns.delete()


def _ports(proxy: ProxyProcess) -> dict:
    import re

    return {m.group(1): int(m.group(2)) for m in
            re.finditer(r"dbproxy: (\S+) \([\w-]+\) listening on [\d.:\[\]a-f]+:(\d+)", proxy.log_text())}


@pytest.fixture
def agent(site):
    proc = site.start_agent()
    yield proc
    site.stop_agents()


# --------------------------------------------------------------------------- isolation


def test_proxy_cannot_reach_the_targets_directly(site):
    for host in ("127.0.0.1", site.ns.ns_addr):
        for port in (site.pg.port, site.sshd.port, site.desktop.port, site.xrdp.port):
            with pytest.raises(OSError):
                socket.create_connection((host, port), timeout=3).close()
    # …and with no agent linked, the route's client gets a native error naming the node.
    p = site.psql("select 1")
    assert p.returncode != 0
    assert f"no agent of node '{NODE}' is connected" in p.stderr


# --------------------------------------------------------------------------- real clients


def test_psql_through_the_agent(site, agent):
    p = site.psql("select 'through ' || host(inet_server_addr()), current_database()")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "through 127.0.0.1|app"
    evs = wait_until(lambda: [e for e in site.events() if e["event"] == "agent.stream.close"
                              and e["target"] == f"127.0.0.1:{site.pg.port}"], timeout=15, what="stream close")
    starts = [e for e in site.events() if e["event"] == "db.session.start" and e.get("success")]
    close = evs[-1]
    assert close["node"] == NODE and close["bytes_to_target"] > 0 and close["bytes_from_target"] > 0
    assert close["session_id"] in {e["sid"] for e in starts}
    opened = [e for e in site.events() if e["event"] == "agent.stream.open" and e["stream_id"] == close["stream_id"]
              and e["agent_id"] == close["agent_id"]]
    assert opened and opened[0]["session_id"] == close["session_id"]
    connects = [e for e in site.events() if e["event"] == "agent.connect" and e["agent_id"] == agent.agent_id]
    assert connects and connects[0]["node"] == NODE and connects[0]["agent_addr"].startswith(site.ns.ns_addr + ":")
    assert connects[0]["agent_version"]
    text = site.audit_path.read_text()
    assert site.token().read_text().strip() not in text  # the node token never reaches the trail


def test_ssh_through_the_agent(site, agent):
    token = dbproxy_cli("token", "issue", "--config", str(site.proxy.config_path), "--user", "alice", "--roles", "ops",
                        "--ttl", "1h", check=True).stdout.strip()
    kind, blob = (site.workdir / "proxy_host_ed25519.pub").read_text().split()[:2]
    known = site.workdir / "client_known_hosts"
    known.write_text(f"[127.0.0.1]:{site.proxy.ports['ssh']} {kind} {blob}\n")
    askpass = site.workdir / "askpass.sh"
    askpass.write_text('#!/bin/sh\nprintf "%s\\n" "$DBPROXY_TOKEN"\n')
    askpass.chmod(0o700)
    env = dict(os.environ, SSH_ASKPASS=str(askpass), SSH_ASKPASS_REQUIRE="force", DBPROXY_TOKEN=token)
    env.pop("SSH_AUTH_SOCK", None)
    p = subprocess.run(["ssh", "-F", "/dev/null", "-o", f"UserKnownHostsFile={known}", "-o", "StrictHostKeyChecking=yes",
                        "-o", "PubkeyAuthentication=no", "-o", "ConnectTimeout=20", "-p", str(site.proxy.ports["ssh"]),
                        f"{site.sshd.login}@web-1@127.0.0.1", "echo via-agent; cat /proc/net/dev | grep -c dbpa"],
                       capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=60)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.split()
    assert lines[0] == "via-agent"
    assert lines[1] == "1"  # the shell runs in the namespace: it sees only its own veth end
    wait_until(lambda: any(e["event"] == "agent.stream.close" and e["target"] == site.sshd.address
                           for e in site.events()), timeout=15, what="ssh stream close")


def test_telnet_through_the_agent(site, agent):
    from tests.integration.test_telnet_proxy import ScriptedTelnet

    token = dbproxy_cli("token", "issue", "--config", str(site.proxy.config_path), "--user", "alice", "--roles", "ops",
                        "--ttl", "1h", check=True).stdout.strip()
    c = ScriptedTelnet(site.proxy.ports["telnet"])
    try:
        c.login("deploy@host-1", token)
        c.expect(b"$ ")
        c.send("echo via-$((40+2)); grep -c dbpa /proc/net/dev\r")
        c.expect(b"via-42")
        c.expect(b"\n1\r")  # the shell is in the namespace: only its own veth end
        c.send("exit\r")
        c.until_closed()
    finally:
        c.close()
    wait_until(lambda: any(e["event"] == "agent.stream.close" and e["target"] == site.telnetd.address
                           for e in site.events()), timeout=15, what="telnet stream close")


# A vncdotool screenshot in a process of its own (a Twisted reactor cannot restart: this module's process
# keeps none running for test_vnc_proxy.py), the password from the environment rather than the command line.
_VNC_SHOT = """
import os, sys
from vncdotool import api
c = api.connect(sys.argv[1], password=os.environ["DBP_VNC_SECRET"], timeout=30)
c.refreshScreen()
c.captureScreen(sys.argv[2])
c.disconnect()
api.shutdown()
"""


def _vnc_screenshot(run, port: int, secret: str, path: Path):
    from PIL import Image

    p = run([sys.executable, "-c", _VNC_SHOT, f"127.0.0.1::{port}", str(path)], capture_output=True, text=True,
            timeout=90, env=dict(os.environ, DBP_VNC_SECRET=secret))
    assert p.returncode == 0, p.stderr[-2000:]
    return Image.open(path).convert("RGB")


def _vnc_code(site, user: str, target: str) -> str:
    return dbproxy_cli("token", "issue", "--config", str(site.proxy.config_path), "--user", user, "--roles", "desk",
                       "--vnc", "--target", target, check=True).stdout.strip()


def test_vnc_screenshot_through_the_agent(site, agent, tmp_path):
    """vncdotool through the proxy and the agent sees the very screen a viewer inside the namespace sees."""
    from PIL import ImageChops

    since = len(site.events())
    inside = _vnc_screenshot(site.ns.run, site.desktop.port, site.desktop.password, tmp_path / "inside.png")
    proxied = _vnc_screenshot(subprocess.run, site.proxy.ports["vnc"], _vnc_code(site, "vera", "desk-1"),
                              tmp_path / "proxied.png")
    assert proxied.size == inside.size == (640, 400)
    assert ImageChops.difference(inside, proxied).getbbox() is None, "the screen through the agent differs"
    events = wait_until(lambda: [e for e in site.events()[since:] if e["event"] == "agent.stream.close"
                                 and e["target"] == site.desktop.address], timeout=15, what="the desktop's stream close")
    close = events[-1]
    assert close["node"] == NODE and close["bytes_from_target"] > 640 * 400  # the screen came through the agent
    evs = site.events()[since:]
    start = next(e for e in evs if e["event"] == "desktop.session.start" and e.get("user") == "vera")
    end = next(e for e in evs if e["event"] == "desktop.session.end" and e.get("user") == "vera")
    assert start["success"] is True and (start["width"], start["height"]) == (640, 400)
    assert start["target_addr"] == site.desktop.address and start["backend_security"] == "VNC"
    assert start["sid"] == end["sid"] == close["session_id"]
    assert any(e["event"] == "agent.stream.open" and e["stream_id"] == close["stream_id"]
               and e["session_id"] == start["sid"] for e in evs)
    assert site.desktop.password not in site.audit_path.read_text()


def test_vnc_refusals_through_the_agent_keep_the_rfb_reason(site, agent):
    from tests.integration.test_vnc_proxy import _vnc_login

    ok, reason = _vnc_login(site.proxy.ports["vnc"], _vnc_code(site, "vera", "desk-forbidden"))
    assert not ok and reason.startswith("dbproxy: the desktop 'desk-forbidden' is unreachable (") and \
        "is not on the allow-list of this agent" in reason, reason
    site.stop_agents()
    ok, reason = _vnc_login(site.proxy.ports["vnc"], _vnc_code(site, "vera", "desk-1"))
    assert not ok and f"no agent of node '{NODE}' is connected" in reason and "unreachable" in reason, reason


def test_rdp_auth_only_through_the_agent(site, agent):
    """xfreerdp /auth-only through the proxy and the agent: the whole RDP connection sequence (X.224, TLS,
    MCS, licensing, capabilities) with xrdp inside the namespace."""
    from scripts.peers.xrdp import TEST_USER, start_xvfb, xfreerdp

    since = len(site.events())
    xvfb = start_xvfb()
    try:
        r = xfreerdp(f"127.0.0.1:{site.proxy.ports['rdp']}", f"/u:{TEST_USER}", "/p:unchecked", display=xvfb.display)
    finally:
        xvfb.stop()
    assert r.returncode == 0 and "Authentication only, exit status 0" in r.stderr, r.stderr[-2000:]
    events = wait_until(lambda: [e for e in site.events()[since:] if e["event"] == "agent.stream.close"
                                 and e["target"] == site.xrdp.address], timeout=15, what="the xrdp stream close")
    close = events[-1]
    assert close["node"] == NODE and close["bytes_to_target"] > 1000 and close["bytes_from_target"] > 1000
    evs = site.events()[since:]
    start = next(e for e in evs if e["event"] == "desktop.session.start" and e.get("protocol") == "rdp")
    assert start["success"] is True and start["selected_protocol"] == "SSL" and start["sid"] == close["session_id"]
    assert "TLS connection established" in site.xrdp.log_text()


# --------------------------------------------------------------------------- refusals


def test_address_outside_the_allow_list_is_refused(site, agent):
    p = site.psql("select 1", database="forbidden")
    assert p.returncode != 0
    assert "is not on the allow-list of this agent" in p.stderr, p.stderr
    wait_until(lambda: [e for e in site.events() if e["event"] == "db.session.start" and not e["success"]
                        and "refused by the agent (403" in e["error"]], timeout=15, what="the refused session's audit")


def test_no_agent_for_the_node(site, agent):
    p = site.psql("select 1", database="ghost")
    assert p.returncode != 0
    assert "no agent of node 'ghost-node' is connected" in p.stderr, p.stderr


def test_wrong_node_token_is_refused(site):
    other = site.token("another-node")
    proc = site.start_agent(token=other, wait=False)
    assert proc.wait(timeout=30) == 3
    log = Path(proc.log_path).read_text()
    assert "token_wrong_node" in log and "refused" in log
    # A user token is not a node token either.
    user_token = dbproxy_cli("token", "issue", "--config", str(site.proxy.config_path), "--user", "alice", "--roles",
                             "ops", "--ttl", "1h", check=True).stdout.strip()
    path = site.workdir / "user.token"
    path.write_text(user_token + "\n")
    proc = site.start_agent(token=path, wait=False)
    assert proc.wait(timeout=30) == 3
    assert "token_bad_issuer" in Path(proc.log_path).read_text()
    refused = [e for e in site.events() if e["event"] == "agent.refused"]
    assert {e["reason"] for e in refused} >= {"token_wrong_node", "token_bad_issuer"}
    assert user_token not in site.audit_path.read_text() and other.read_text().strip() not in site.audit_path.read_text()
    assert not site.agent_ids()


# --------------------------------------------------------------------------- failures and recovery


def test_agent_killed_mid_session_then_restarted(site):
    import psycopg

    first = site.start_agent()
    conn = psycopg.connect(host="127.0.0.1", port=site.proxy.ports["pg"], user="alice", dbname="app", password="x",
                           sslmode="disable", connect_timeout=20, autocommit=True)
    assert conn.execute("select 41 + 1").fetchone() == (42,)
    first.send_signal(signal.SIGKILL)
    first.wait()
    # The link's TCP connection is reset by the kernel (or, were the host gone, the heartbeat
    # notices): the session ends and the client gets its driver's native connection error.
    with pytest.raises(psycopg.OperationalError) as info:
        with conn.cursor() as cur:
            for _ in range(100):
                cur.execute("select 1")
                time.sleep(0.1)
    # The proxy's own ErrorResponse (SQLSTATE 08006), not a bare closed socket.
    assert info.value.sqlstate == "08006" and "connection to the backend database was lost" in str(info.value)
    conn.close()
    wait_until(lambda: not site.agent_ids(), timeout=20, what="the agent gone from /api/nodes")
    disconnect = wait_until(lambda: [e for e in site.events() if e["event"] == "agent.disconnect"
                                     and e["agent_id"] == first.agent_id], timeout=15, what="agent.disconnect")
    assert disconnect[0]["node"] == NODE and disconnect[0]["reason"]
    p = site.psql("select 1")
    assert p.returncode != 0 and "no agent of node" in p.stderr
    site.start_agent()
    p = site.psql("select 'back'")
    assert p.returncode == 0 and p.stdout.strip() == "back", p.stderr
    site.stop_agents()


def test_stalled_stream_does_not_slow_another(site, agent):
    """One client asks for 100 MB and reads none of it; another session keeps its throughput."""
    import psycopg

    def bulk(n_mb: int) -> float:
        began = time.monotonic()
        with psycopg.connect(host="127.0.0.1", port=site.proxy.ports["pg"], user="alice", dbname="app", password="x",
                             sslmode="disable", connect_timeout=20) as conn:
            with conn.cursor() as cur:
                got = 0
                with cur.copy(f"COPY (SELECT repeat('y', 1023) FROM generate_series(1, {n_mb * 1024})) TO STDOUT") as copy:
                    for block in copy:
                        got += len(block)
        assert got == n_mb * 1024 * 1024
        return n_mb / (time.monotonic() - began)

    baseline = bulk(20)
    sock, _ = pg_session(site.proxy.ports["pg"], user="alice", database="app")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    query = b"COPY (SELECT repeat('x', 1023) FROM generate_series(1, 102400)) TO STDOUT\0"
    sock.sendall(b"Q" + struct.pack(">i", 4 + len(query)) + query)  # 100 MB asked for, never read
    try:
        def stalled_stream() -> dict | None:
            rows = [c for c in site.api("/api/connections")["connections"] if c["bytes_from_target"] > 2 * 1024 * 1024]
            return rows[0] if rows else None

        row = wait_until(stalled_stream, timeout=30, what="the stalled stream to fill its window")
        time.sleep(1)
        during = bulk(20)
        again = [c for c in site.api("/api/connections")["connections"] if c["stream_id"] == row["stream_id"]][0]
        # Held back by its window (plus socket buffers on the way), far from 100 MB.
        assert again["bytes_from_target"] < 32 * 1024 * 1024, again
        assert during > 0.3 * baseline, (baseline, during)
    finally:
        sock.close()
    print(f"bulk COPY through the agent: {baseline:.1f} MB/s alone, {during:.1f} MB/s beside a stalled stream")


def test_hundred_concurrent_streams(site, agent):
    import psycopg

    errors: list[BaseException] = []
    peak = [0]
    barrier = threading.Barrier(100, timeout=60)

    def one(i: int) -> None:
        try:
            with psycopg.connect(host="127.0.0.1", port=site.proxy.ports["pg"], user="alice", dbname="app",
                                 password="x", sslmode="disable", connect_timeout=60, autocommit=True) as conn:
                barrier.wait()  # all 100 open at once
                assert conn.execute("select %s::int * 2", (i,)).fetchone() == (2 * i,)
                rows = site.api("/api/nodes")["nodes"][0]["agents"][0]["streams"] if i == 0 else 0
                peak[0] = max(peak[0], rows)
                barrier.wait()
        except BaseException as exc:  # noqa: BLE001 — reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:3]
    assert peak[0] >= 100


def test_status_api(site, agent):
    nodes = site.api("/api/nodes")["nodes"]
    assert [n["node"] for n in nodes] == [NODE]
    (a,) = nodes[0]["agents"]
    assert a["address"].startswith(site.ns.ns_addr + ":") and a["version"]
    wait_until(lambda: site.api("/api/nodes")["nodes"][0]["agents"][0]["rtt_ms"] is not None, timeout=10,
               what="a heartbeat answered")
    a = site.api("/api/nodes")["nodes"][0]["agents"][0]
    assert time.time() - a["last_heartbeat"] < 5
    assert site.api("/api/connections") == {"connections": []}
    health = site.api("/healthz")
    assert health
