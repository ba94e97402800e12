"""PROXY protocol v1/v2 behind a real HAProxy: the audit trail names the real client, not the balancer.

HAProxy (scripts/peers/haproxy.py) connects to dbproxy from 127.0.0.2 — the
balancer's hop — and sends ``send-proxy`` (v1) or ``send-proxy-v2`` headers;
the clients connect to HAProxy from 127.0.0.1.  The listeners trust
127.0.0.2/32 only, so a client connecting directly is served as before, its
own address standing, and a header it sends is just bytes to the engine.
"""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from tests.conftest import require_binary
from tests.support import ProxyProcess, dbproxy_cli, jsonl_audit, pg_connect, pg_scram_config, read_audit, wait_until

pytestmark = pytest.mark.integration

BALANCER = "127.0.0.2"


@pytest.fixture(scope="module")
def stack(pg, sshd, tmp_path_factory):
    from scripts.peers.haproxy import Frontend, haproxy_bin, start_haproxy

    try:
        haproxy_bin()
    except FileNotFoundError as exc:
        from tests.support import peer_missing

        peer_missing(str(exc))
    require_binary("ssh-keygen")
    workdir = tmp_path_factory.mktemp("proxyproto")
    config = pg_scram_config(pg, workdir, jsonl_audit(workdir))
    trusted = {"trusted": [f"{BALANCER}/32"], "timeout_seconds": 2}
    config["listeners"][0]["proxy_protocol"] = trusted
    dbproxy_cli("token", "keygen", "--algorithm", "EdDSA", "--key-file", str(workdir / "token.key"),
                "--public-key-file", str(workdir / "token.pub"), check=True)
    from scripts.peers.sshd import make_key

    make_key(workdir / "proxy_host_ed25519", "dbproxy-proxy-host")
    config["identity"] = {"token": {"algorithm": "EdDSA", "key_file": "token.key", "public_key_file": "token.pub"}}
    config["roles"] = {"ops": {"routes": ["*"], "targets": ["web-*"], "logins": [sshd.login]},
                       "db": {"routes": ["*"], "databases": ["*"], "db_users": ["*"]}}
    # The Postgres listener stays open on loopback (the route's SCRAM login); SSH takes tokens.
    config["listeners"][0]["auth"] = {"methods": ["anonymous"], "anonymous_roles": ["db"]}
    config["listeners"].append({
        "name": "ssh", "protocol": "ssh", "listen": "127.0.0.1:0", "host_key_file": "proxy_host_ed25519",
        "auth": {"methods": ["token"]}, "proxy_protocol": trusted,
        "routes": [{"name": "web", "match": {"target": "web-*"},
                    "backend": {"address": sshd.address, "login": sshd.login,
                                "auth": {"method": "publickey", "key_file": str(sshd.client_key)},
                                "host_key": {"known_hosts_file": str(sshd.known_hosts)}}}],
    })
    proxy = ProxyProcess(workdir, config, name="proxy").start()
    proxy.audit_path = workdir / "audit.jsonl"
    proxy.login = sshd.login
    proxy.token = dbproxy_cli("token", "issue", "--config", str(proxy.config_path), "--user", "alice", "--roles", "ops",
                              "--ttl", "1h", check=True).stdout.strip()
    lb = start_haproxy(workdir / "haproxy", [
        Frontend("pg_v1", f"127.0.0.1:{proxy.port('pg')}", "v1"),
        Frontend("pg_v2", f"127.0.0.1:{proxy.port('pg')}", "v2"),
        Frontend("pg_none", f"127.0.0.1:{proxy.port('pg')}", "none"),
        Frontend("ssh_v2", f"127.0.0.1:{proxy.port('ssh')}", "v2"),
    ])
    proxy.lb = lb
    yield proxy
    lb.stop()
    proxy.stop()


class _Via:
    """``pg_connect``'s view of a port: HAProxy's frontend instead of the proxy's listener."""

    def __init__(self, port: int) -> None:
        self._port = port

    def port(self, name: str | None = None) -> int:
        return self._port


def _starts(proxy, listener: str = "pg") -> list[dict]:
    return [e for e in read_audit(proxy.audit_path) if e["event"].endswith("session.start")
            and e.get("listener") == listener]


def _start_of(proxy, addr: str, listener: str = "pg") -> dict:
    return wait_until(lambda: [e for e in _starts(proxy, listener) if e.get("addr.remote") == addr],
                      what=f"a session start from {addr}")[-1]


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_postgres_through_haproxy_audits_the_real_client(stack, version):
    with pg_connect(_Via(stack.lb.ports[f"pg_{version}"])) as conn:
        client_port = socket.socket(fileno=socket.dup(conn.pgconn.socket)).getsockname()[1]
        assert conn.execute("select 41 + 1").fetchone() == (42,)
    # The client's own socket (127.0.0.1:its port), not HAProxy's hop from 127.0.0.2.
    start = _start_of(stack, f"127.0.0.1:{client_port}")
    assert start["success"] is True
    assert start["addr.load_balancer"].startswith(f"{BALANCER}:")
    queries = wait_until(lambda: [e for e in read_audit(stack.audit_path)
                                  if e["event"] == "db.session.query" and e["sid"] == start["sid"]], what="the query")
    assert queries[0]["addr.remote"] == f"127.0.0.1:{client_port}"


def test_direct_clients_are_served_with_their_own_address(stack):
    """127.0.0.1 is not a trusted balancer: no header is expected from it, its address stands."""
    with pg_connect(_Via(stack.port("pg"))) as conn:
        client_port = socket.socket(fileno=socket.dup(conn.pgconn.socket)).getsockname()[1]
        assert conn.execute("select 1").fetchone() == (1,)
    start = _start_of(stack, f"127.0.0.1:{client_port}")
    assert "addr.load_balancer" not in start


def test_a_spoofed_header_from_an_untrusted_client_is_not_believed(stack):
    """A client writing its own PROXY header straight to the listener: the header is not read as
    one (the Postgres engine sees garbage and says so), and no address it names enters the trail."""
    from dbproxy.proxyproto import encode_v2

    before = len(read_audit(stack.audit_path))
    with socket.create_connection(("127.0.0.1", stack.port("pg")), timeout=10) as s:
        s.sendall(encode_v2(("203.0.113.9", 4444), ("127.0.0.1", stack.port("pg"))))
        s.settimeout(10)
        reply = b""
        try:
            while chunk := s.recv(65536):
                reply += chunk
        except (ConnectionResetError, socket.timeout):
            pass
    # A Postgres ErrorResponse ('E') before the close, not silence.
    assert reply[:1] == b"E", reply[:64]
    time.sleep(0.5)
    assert not any("203.0.113.9" in str(e) for e in read_audit(stack.audit_path)[before:])


def test_trusted_balancer_without_a_header_is_refused_and_audited(stack):
    """HAProxy configured without send-proxy in front of a listener that expects it: the
    connection is closed (never served as if the balancer were the client) and audited."""
    with socket.create_connection(("127.0.0.1", stack.lb.ports["pg_none"]), timeout=10) as s:
        s.sendall(b"\x00\x00\x00\x08\x04\xd2\x16\x2f")  # an SSLRequest: not a PROXY header
        s.settimeout(10)
        reply = b""
        try:
            while chunk := s.recv(65536):
                reply += chunk
        except (ConnectionResetError, socket.timeout):
            pass
    assert reply == b""
    failed = wait_until(lambda: [e for e in _starts(stack) if e["success"] is False and "does not start with a "
                                 "PROXY protocol header" in (e.get("error") or "")], what="the refused start")
    assert failed[-1]["addr.remote"].startswith(f"{BALANCER}:")
    assert failed[-1]["error"].startswith("PROXY protocol: ")
    wait_until(lambda: "a trusted load balancer" in stack.log_text(), what="the log line")
    # Everyone else keeps being served.
    with pg_connect(_Via(stack.lb.ports["pg_v2"])) as conn:
        assert conn.execute("select 2").fetchone() == (2,)


def test_health_checks_leave_no_audit_event(stack):
    """A TCP connect-and-close from the balancer (HAProxy's "check", and its start-up probes here)
    is a health check: no failed session start in the trail for it, every few seconds.

    The checks are told apart by their own source ports, not by counting starts: an earlier
    test's session may still be landing in the trail while this one begins."""
    checks = set()
    for _ in range(3):
        with socket.socket() as s:
            s.bind((BALANCER, 0))
            s.connect(("127.0.0.1", stack.port("pg")))
            checks.add(f"{BALANCER}:{s.getsockname()[1]}")
    with pg_connect(_Via(stack.lb.ports["pg_v2"])) as conn:  # a real session after them, for ordering
        client_port = socket.socket(fileno=socket.dup(conn.pgconn.socket)).getsockname()[1]
        conn.execute("select 1")
    real = _start_of(stack, f"127.0.0.1:{client_port}")
    assert real["success"] is True
    # The real session's start is in the trail, so anything the checks caused would be too.
    from_checks = [e for e in read_audit(stack.audit_path) if e.get("addr.remote") in checks]
    assert from_checks == [], from_checks


def test_trusted_balancer_silent_past_the_timeout_is_closed(stack):
    """A connection from the balancer's address that sends nothing: closed after timeout_seconds."""
    with socket.socket() as s:
        s.bind((BALANCER, 0))
        s.settimeout(15)
        s.connect(("127.0.0.1", stack.port("pg")))
        t0 = time.monotonic()
        assert s.recv(100) == b""
        assert time.monotonic() - t0 < 10  # the listener's 2 s
    wait_until(lambda: [e for e in _starts(stack) if "within 2 s" in (e.get("error") or "")], what="the timeout start")


def test_ssh_through_haproxy_v2_audits_the_real_client(stack):
    """SSH: both sides talk at once; the header is consumed exactly, the SSH banner behind it intact."""
    import asyncssh

    async def run() -> tuple[str, int]:
        async with asyncssh.connect("127.0.0.1", stack.lb.ports["ssh_v2"], username=f"{stack.login}@web-1",
                                    password=stack.token, known_hosts=None, client_keys=None,
                                    preferred_auth="password") as conn:
            port = conn.get_extra_info("sockname")[1]
            result = await conn.run("echo via-haproxy", check=True)
            return result.stdout, port

    out, client_port = asyncio.run(run())
    assert out == "via-haproxy\n"
    start = _start_of(stack, f"127.0.0.1:{client_port}", listener="ssh")
    assert start["event"] == "ssh.session.start" and start["success"] is True
    assert start["addr.load_balancer"].startswith(f"{BALANCER}:")
