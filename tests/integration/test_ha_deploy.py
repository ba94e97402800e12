"""The highly available layout of docs/deploy.md, as far as one machine allows: two stateless
``dbproxy serve`` processes behind a real HAProxy (round robin, health checks, PROXY v2), one
shared config directory (token keys, the SCRAM token registry, the revocation list).

What it shows: sessions spread over both proxies and each trail names the real client; a
token issued once works on both, and revoking it once refuses it on both; a proxy killed
outright costs new sessions nothing (HAProxy redispatches, then marks it down); brought back,
it serves again.
"""

from __future__ import annotations

import signal
import socket

import psycopg
import pytest

from scripts.peers import free_port
from tests.support import TOKEN_IDENTITY, ProxyProcess, dbproxy_cli, read_audit, token_keygen, wait_until

pytestmark = pytest.mark.integration

BALANCER = "127.0.0.2"


def _config(pg, port: int, audit: str) -> dict:
    user = pg.users["trust"][0]
    return {
        "identity": {"token": TOKEN_IDENTITY},
        "roles": {"analyst": {"routes": ["*"], "databases": ["app"], "db_users": ["*"]}},
        "listeners": [{
            "name": "pg", "protocol": "postgres", "listen": f"127.0.0.1:{port}", "auth": {"methods": ["token"]},
            "proxy_protocol": {"trusted": [f"{BALANCER}/32"]},
            "routes": [{"backend": {"address": f"127.0.0.1:{pg.port}", "database": "app", "user": user,
                                    "auth": {"method": "trust"}}}],
        }],
        "audit": {"sinks": [{"type": "jsonl", "path": audit}]},
        "shutdown_grace_seconds": 2,
    }


@pytest.fixture(scope="module")
def ha(pg, tmp_path_factory):
    from scripts.peers.haproxy import Frontend, haproxy_bin, start_haproxy

    try:
        haproxy_bin()
    except FileNotFoundError as exc:
        from tests.support import peer_missing

        peer_missing(str(exc))
    shared = tmp_path_factory.mktemp("ha")  # the config directory both proxies read
    token_keygen(shared)
    ports = {"a": free_port(), "b": free_port()}
    proxies = {name: ProxyProcess(shared, _config(pg, ports[name], f"audit-{name}.jsonl"), name=f"proxy-{name}").start()
               for name in ("a", "b")}
    lb = start_haproxy(shared / "haproxy", [Frontend("pg", f"127.0.0.1:{ports['a']}", "v2",
                                                     more_servers=(f"127.0.0.1:{ports['b']}",))])

    class HA:
        pass

    h = HA()
    h.shared, h.ports, h.proxies, h.lb, h.pg = shared, ports, proxies, lb, pg
    yield h
    lb.stop()
    for p in proxies.values():
        p.stop()


def _issue(ha, user: str) -> str:
    return dbproxy_cli("token", "issue", "--config", str(ha.proxies["a"].config_path), "--user", user,
                       "--roles", "analyst", "--ttl", "1h", check=True).stdout.strip()


def _connect(ha, user: str, token: str):
    return psycopg.connect(host="127.0.0.1", port=ha.lb.ports["pg"], user=user, dbname="app", password=token,
                           sslmode="disable", connect_timeout=10, autocommit=True)


def _sessions(ha, name: str, user: str) -> list[dict]:
    return [e for e in read_audit(ha.shared / f"audit-{name}.jsonl")
            if e["event"] == "db.session.start" and e.get("user") == user and e["success"]]


def test_sessions_spread_over_both_proxies_with_the_real_client(ha):
    token = _issue(ha, "spread")
    ports = []
    for _ in range(6):
        with _connect(ha, "spread", token) as conn:
            ports.append(socket.socket(fileno=socket.dup(conn.pgconn.socket)).getsockname()[1])
            assert conn.execute("select 1").fetchone() == (1,)
    a = wait_until(lambda: _sessions(ha, "a", "spread") or None, what="sessions on proxy a")
    b = wait_until(lambda: _sessions(ha, "b", "spread") or None, what="sessions on proxy b")
    wait_until(lambda: len(_sessions(ha, "a", "spread")) + len(_sessions(ha, "b", "spread")) == 6, what="all six")
    seen = {e["addr.remote"] for e in _sessions(ha, "a", "spread") + _sessions(ha, "b", "spread")}
    assert seen == {f"127.0.0.1:{p}" for p in ports}  # the clients, not HAProxy's hop
    assert a and b


def test_one_revocation_refuses_the_token_on_every_proxy(ha):
    token = _issue(ha, "revoked")
    for _ in range(2):  # round robin: one session on each proxy
        with _connect(ha, "revoked", token) as conn:
            conn.execute("select 1")
    wait_until(lambda: _sessions(ha, "a", "revoked") and _sessions(ha, "b", "revoked"), what="a session on each")
    dbproxy_cli("token", "revoke", "--config", str(ha.proxies["b"].config_path), token, check=True)
    for _ in range(4):
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            _connect(ha, "revoked", token)
    for name in ("a", "b"):
        wait_until(lambda: [e for e in read_audit(ha.shared / f"audit-{name}.jsonl")
                            if e["event"] == "db.session.access_denied" and e.get("requested_user") == "revoked"],
                   what=f"the refusal on proxy {name}")


def test_a_proxy_killed_outright_costs_new_sessions_nothing(ha):
    token = _issue(ha, "failover")
    a = ha.proxies["a"]
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait(10)
    try:
        for i in range(8):  # HAProxy redispatches a refused connection, then marks a down
            with _connect(ha, "failover", token) as conn:
                assert conn.execute("select %s::int", (i,)).fetchone() == (i,)
        wait_until(lambda: len(_sessions(ha, "b", "failover")) == 8, what="all eight on proxy b")
    finally:
        a.start()  # the same config, the same port: back in the pool once its checks pass
    wait_until(lambda: _serves(ha, "failover", token, "a"), timeout=30, what="proxy a back in the pool")


def _serves(ha, user: str, token: str, name: str) -> bool:
    with _connect(ha, user, token) as conn:
        conn.execute("select 1")
    return any(e for e in _sessions(ha, name, user))
