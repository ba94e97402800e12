"""Handshake timeouts and resets in every engine, through the real ``dbproxy serve``.

A client that opens a connection and never finishes its handshake held a
connection slot for the whole timeout: it must leave one log line and a
failed ``db.session.start``.  No backend is involved (the proxy never gets
that far), so the routes point at a port nothing listens on.
"""

from __future__ import annotations

import socket
import struct
import time

import pytest

from scripts.peers import refused_port
from tests.support import read_audit, wait_until

pytestmark = pytest.mark.integration

NOWHERE = f"127.0.0.1:{refused_port()}"


def _config(tmp_path) -> dict:
    route = {"backend": {"address": NOWHERE, "auth": {"method": "none"}}}
    pg_route = {"backend": {"address": NOWHERE, "database": "app", "user": "x", "auth": {"method": "trust"}}}
    return {
        "listeners": [
            {"name": "pg", "protocol": "postgres", "listen": "127.0.0.1:0", "handshake_timeout_seconds": 1, "routes": [pg_route]},
            {"name": "cql", "protocol": "cassandra", "listen": "127.0.0.1:0", "handshake_timeout_seconds": 1,
             "options": {"client_auth": "none"}, "routes": [route]},
            {"name": "mongo", "protocol": "mongo", "listen": "127.0.0.1:0", "handshake_timeout_seconds": 1, "routes": [route]},
        ],
        "audit": {"sinks": [{"type": "jsonl", "path": str(tmp_path / "audit.jsonl")}]},
    }


@pytest.fixture
def proxy(tmp_path, proxy_factory):
    p = proxy_factory(_config(tmp_path))
    p.audit_path = tmp_path / "audit.jsonl"
    return p


# Something that is not a whole first message in each protocol: the handshake stalls.
PARTIAL = {
    "pg": b"\x00\x00\x00\x20\x00\x03",  # a StartupMessage's first bytes
    "cql": b"\x04\x00\x00\x01",  # a CQL v4 frame header cut short
    "mongo": b"\x40\x00\x00\x00",  # an OP_MSG's length, then nothing
}
WHAT = {"pg": "client handshake timed out", "cql": "client handshake timed out", "mongo": "client sent no request in time"}


@pytest.mark.parametrize("listener", ["pg", "cql", "mongo"])
def test_stalled_handshake_is_logged_and_audited(proxy, listener):
    s = socket.create_connection(("127.0.0.1", proxy.port(listener)), timeout=10)
    s.sendall(PARTIAL[listener])
    t0 = time.monotonic()
    s.settimeout(10)
    try:
        while s.recv(65536):
            pass
    except (ConnectionResetError, socket.timeout):
        pass
    s.close()
    assert time.monotonic() - t0 < 5  # the listener's 1 s, not the default 30 s
    evs = wait_until(lambda: [e for e in read_audit(proxy.audit_path) if e["event"] == "db.session.start" and e.get("listener", listener) == listener and e.get("error") == WHAT[listener]],
                     what="the audit event")
    assert evs[-1]["success"] is False and evs[-1]["timeout_seconds"] == 1
    wait_until(lambda: [line for line in proxy.log_text().splitlines() if WHAT[listener] in line and "after 1s" in line], what="the log line")


@pytest.mark.parametrize("listener", ["pg", "cql", "mongo"])
def test_reset_during_handshake_is_not_a_traceback(proxy, listener):
    s = socket.create_connection(("127.0.0.1", proxy.port(listener)), timeout=10)
    s.sendall(PARTIAL[listener])
    time.sleep(0.3)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()  # RST while the proxy waits for the rest
    time.sleep(0.5)
    # Another client is still served up to its handshake (then times out, as above).
    with socket.create_connection(("127.0.0.1", proxy.port(listener)), timeout=10):
        pass
    time.sleep(0.3)
    assert "Traceback" not in proxy.log_text()
