"""RDP through the proxy with the real xfreerdp client and the real xrdp server.

The target is xrdp 0.9.21 (``scripts/peers/xrdp.py``), with xrdp-sesman
checking logins by PAM against a local user.  xrdp speaks TLS, not CredSSP:
``xfreerdp /auth-only`` exits 0 once the connection sequence completes,
before xrdp has checked the password (so it proves the passage, not the
credentials); whether a password was accepted is read from xrdp's own log
after a full xfreerdp connect (``Xrdp.wait_login``).  The refusals use
xfreerdp too (a routing token naming the target), the malformed case a raw
socket.  Every test checks the audit trail the proxy wrote.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.support import ProxyProcess, peer_missing, read_audit, wait_audit

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parents[1] / "unit" / "rdp" / "data"


@pytest.fixture(scope="module")
def xrdp(tmp_path_factory):
    from scripts.peers.xrdp import start_xrdp, xrdp_bin

    try:
        xrdp_bin()
    except FileNotFoundError as exc:
        peer_missing(str(exc))
    server = start_xrdp(tmp_path_factory.mktemp("xrdp"), with_sesman=True)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def display():
    from scripts.peers.xrdp import start_xvfb

    xvfb = start_xvfb()
    yield xvfb.display
    xvfb.stop()


class Capture:
    """A TCP listener that records the first bytes each connection sends and closes it: where the
    proxy's forwarded Connection Request is read byte for byte (xrdp does not log what it got).
    Not a fake RDP server: the session it ends is not under test."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                data = b""
                try:
                    while len(data) < 4 or len(data) < int.from_bytes(data[2:4], "big"):
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                except OSError:
                    pass
                self.received.append(data)


@pytest.fixture(scope="module")
def capture():
    c = Capture()
    yield c
    c.sock.close()


@pytest.fixture(scope="module")
def rproxy(xrdp, capture, tmp_path_factory):
    from scripts.peers import refused_port

    workdir = tmp_path_factory.mktemp("rdpproxy")
    backend = {"address": xrdp.address, "auth": {"method": "passthrough"}}
    config = {
        # RDP gives nothing to check before TLS: the listener's anonymous clients get the role "desk",
        # which grants the desktops web* and down* (not db*).
        "roles": {"desk": {"routes": ["*"], "desktops": ["web*", "down*"]}},
        "listeners": [{
            "name": "rdp", "protocol": "rdp", "listen": "127.0.0.1:0",
            "auth": {"methods": ["anonymous"], "anonymous_roles": ["desk"]},
            "routes": [
                {"name": "web", "match": {"target": "web[0-9]*"}, "backend": backend},
                {"name": "db", "match": {"target": "db*"}, "backend": backend},
                {"name": "down", "match": {"target": "down*"},
                 "backend": {**backend, "address": f"127.0.0.1:{refused_port()}"}},
                {"name": "capture", "match": {"target": "webcapture"},
                 "backend": {**backend, "address": f"127.0.0.1:{capture.port}"}},
                # A client that names no target: this route (the session's target is its name).
                {"name": "web-default", "backend": backend},
            ],
        }],
        "audit": {"sinks": [{"type": "jsonl", "path": "audit.jsonl"}]},
    }
    proc = ProxyProcess(workdir, config, name="proxy").start()
    proc.audit_path = workdir / "audit.jsonl"
    proc.address = f"127.0.0.1:{proc.port('rdp')}"
    yield proc
    proc.stop()


def _run(address: str, *args: str, display: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    from scripts.peers.xrdp import xfreerdp

    return xfreerdp(address, *args, display=display, timeout=timeout)


def _sessions(events: list[dict], kind: str) -> list[dict]:
    return [e for e in events if e["event"] == kind]


def _ended(proxy, since: int, n: int = 1) -> list[dict]:
    return wait_audit(proxy.audit_path, lambda ev: len(_sessions(ev, "desktop.session.end")) >= n, since=since,
                      what=f"{n} desktop.session.end")


def _xrdp_connections(xrdp) -> int:
    return xrdp.log_text().count("connection received from")


def test_auth_only_through_the_proxy_audited(xrdp, rproxy, display):
    direct = _run(xrdp.address, f"/u:{xrdp.login}", f"/p:{xrdp.password}", display=display)
    assert direct.returncode == 0, direct.stderr[-2000:]
    since = len(read_audit(rproxy.audit_path))
    began = time.time()
    via = _run(rproxy.address, f"/u:{xrdp.login}", f"/p:{xrdp.password}", display=display)
    assert via.returncode == 0, via.stderr[-2000:]
    assert "Authentication only, exit status 0" in via.stderr
    events = _ended(rproxy, since)
    (start,) = _sessions(events, "desktop.session.start")
    (end,) = _sessions(events, "desktop.session.end")
    assert start["success"] is True and start["sid"] == end["sid"]
    for e in (start, end):
        assert e["protocol"] == "rdp" and e["listener"] == "rdp"
        assert e["target"] == "web-default" and e["route"] == "web-default"
        assert e["target_addr"] == xrdp.address
        # The name the cookie announced (Cookie: mstshash=dbprdp), labelled as such; who the
        # proxy knows the client as is the listener's anonymous identity.
        assert e["announced_user"] == xrdp.login
        assert e["user"] == "anonymous" and e["auth_method"] == "anonymous" and e["roles"] == ["desk"]
        assert e["requested_protocols"] == ["SSL", "HYBRID"]
        assert e["selected_protocol"] == "SSL"
    # The whole connection sequence went through (TLS, MCS, capabilities): kilobytes each way.
    assert end["bytes_from_client"] > 1000 and end["bytes_to_client"] > 1000
    assert 0 < end["duration_ms"] < (time.time() - began) * 1000 + 1000
    assert "TLS connection established" in xrdp.log_text()


def _login_verdict(xrdp, address: str, password: str, display: str) -> str:
    """Full xfreerdp connect (no /auth-only) until xrdp logs its verdict on the login."""
    from scripts.peers.xrdp import xfreerdp_command

    mark = len(xrdp.log_text())
    proc = subprocess.Popen(["timeout", "60", *xfreerdp_command(address, f"/u:{xrdp.login}", f"/p:{password}",
                                                                auth_only=False)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                            env=dict(os.environ, DISPLAY=display), start_new_session=True)
    try:
        return xrdp.wait_login(xrdp.login, since=mark)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)


def test_credentials_pass_through_end_to_end(xrdp, rproxy, display):
    """The proxy holds no RDP credential: the client's, inside TLS, reach xrdp as they were typed —
    the right password is accepted through the proxy as directly, a wrong one refused."""
    assert _login_verdict(xrdp, xrdp.address, xrdp.password, display) == "successful"
    since = len(read_audit(rproxy.audit_path))
    assert _login_verdict(xrdp, rproxy.address, xrdp.password, display) == "successful"
    assert _login_verdict(xrdp, rproxy.address, "not-the-password", display) == "failed"
    events = _ended(rproxy, since, 2)
    assert [e["success"] for e in _sessions(events, "desktop.session.start")] == [True, True]
    blob = Path(rproxy.audit_path).read_text() + rproxy.log_text()
    assert xrdp.password not in blob and "not-the-password" not in blob


def test_routing_token_names_the_target(xrdp, rproxy, display):
    since = len(read_audit(rproxy.audit_path))
    r = _run(rproxy.address, f"/u:{xrdp.login}", f"/p:{xrdp.password}", "/load-balance-info:dbproxy:web1",
             display=display)
    assert r.returncode == 0, r.stderr[-2000:]
    (end,) = _sessions(_ended(rproxy, since), "desktop.session.end")
    assert end["target"] == "web1" and end["route"] == "web"
    # FreeRDP sends the routing token in place of the cookie: no name is announced.
    assert "announced_user" not in end


def test_forwarded_request_without_the_proxys_token(rproxy, capture, display):
    """What the target receives: the client's Connection Request as sent, minus the routing token
    that named the target to the proxy (it means nothing to the server)."""
    from dbproxy.engines.rdp import x224

    since = len(read_audit(rproxy.audit_path))
    r = _run(rproxy.address, "/u:someone", "/p:x", "/load-balance-info:dbproxy:webcapture", display=display)
    assert r.returncode != 0  # the capture point hangs up after the request
    events = wait_audit(rproxy.audit_path, lambda ev: _of(ev, "desktop.session.start", "webcapture"), since=since)
    (start,) = _of(events, "desktop.session.start", "webcapture")
    assert start["success"] is False and start["reason"] == "target_closed"
    (forwarded,) = capture.received
    cr = x224.parse_connection_request(forwarded)
    assert cr.token is None
    assert cr.negotiation == x224.parse_connection_request((DATA / "cr_token.bin").read_bytes()).negotiation
    # And a request with a cookie goes as received, byte for byte.
    with socket.create_connection(("127.0.0.1", rproxy.port("rdp")), timeout=10) as s:
        s.sendall(x224.encode_connection_request(cr, b"dbproxy:webcapture"))
        assert _read_until_close(s) == x224.encode_disconnect_request()
    wait_until = time.monotonic() + 10
    while len(capture.received) < 2 and time.monotonic() < wait_until:
        time.sleep(0.05)
    assert capture.received[1] == forwarded


def test_refused_target_audited_and_never_reached(xrdp, rproxy, display):
    before = _xrdp_connections(xrdp)
    since = len(read_audit(rproxy.audit_path))
    r = _run(rproxy.address, f"/u:{xrdp.login}", f"/p:{xrdp.password}", "/load-balance-info:dbproxy:db9",
             display=display)
    assert r.returncode != 0
    assert "expected X224_TPDU_CONNECTION_CONFIRM" in r.stderr, r.stderr[-2000:]
    events = wait_audit(rproxy.audit_path, lambda ev: _of(ev, "desktop.session.start", "db9"), since=since)
    (denied,) = _of(events, "desktop.session.access_denied", "db9")
    assert denied["success"] is False and denied["reason"] == "no_role_allows"
    (start,) = _of(events, "desktop.session.start", "db9")
    assert start["success"] is False and "db9" in start["error"]
    assert not _of(events, "desktop.session.end", "db9")
    assert _xrdp_connections(xrdp) == before  # nothing reached the target


def test_refusal_answer_is_an_x224_disconnect(rproxy):
    """What a refused client receives, byte for byte: an X.224 Disconnect Request, then the close."""
    from dbproxy.engines.rdp import x224

    cr = x224.parse_connection_request((DATA / "cr_token.bin").read_bytes())
    with socket.create_connection(("127.0.0.1", rproxy.port("rdp")), timeout=10) as s:
        s.sendall(x224.encode_connection_request(cr, b"dbproxy:db9"))
        reply = _read_until_close(s)
    assert reply == x224.encode_disconnect_request()


def test_bad_target_name_refused(xrdp, rproxy):
    """A routing token that names no valid target: a well-formed request, refused in X.224, audited."""
    from dbproxy.engines.rdp import x224

    before = _xrdp_connections(xrdp)
    since = len(read_audit(rproxy.audit_path))
    cr = x224.parse_connection_request((DATA / "cr_token.bin").read_bytes())
    with socket.create_connection(("127.0.0.1", rproxy.port("rdp")), timeout=10) as s:
        s.sendall(x224.encode_connection_request(cr, b"dbproxy:web1 rm -rf"))
        assert _read_until_close(s) == x224.encode_disconnect_request()
    events = wait_audit(rproxy.audit_path,
                        lambda ev: [e for e in _sessions(ev, "desktop.session.start") if e.get("reason") == "bad_target"],
                        since=since)
    (start,) = [e for e in _sessions(events, "desktop.session.start") if e.get("reason") == "bad_target"]
    assert start["success"] is False and "routing token names no valid target" in start["error"]
    assert _xrdp_connections(xrdp) == before


def test_backend_down(rproxy, display):
    since = len(read_audit(rproxy.audit_path))
    r = _run(rproxy.address, "/u:someone", "/p:x", "/load-balance-info:dbproxy:down1", display=display)
    assert r.returncode != 0
    # The proxy's X.224 Disconnect Request where the Connection Confirm belongs (not a bare close).
    assert "expected X224_TPDU_CONNECTION_CONFIRM" in r.stderr, r.stderr[-2000:]
    events = wait_audit(rproxy.audit_path, lambda ev: _of(ev, "desktop.session.start", "down1"), since=since)
    (start,) = _of(events, "desktop.session.start", "down1")
    assert start["success"] is False and start["reason"] == "target_connect"
    assert "could not connect to backend" in start["error"] and start["target"] == "down1"


def _client_hello() -> bytes:
    """A TLS ClientHello (what an RDP client sends after the Connection Confirm), from Python's ssl."""
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def _of(events: list[dict], kind: str, target: str) -> list[dict]:
    """The events of ``kind`` for ``target`` (an earlier test's session may still be ending)."""
    return [e for e in _sessions(events, kind) if e.get("target") == target]


def _read_until_close(s: socket.socket) -> bytes:
    data = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


@pytest.mark.parametrize("garbage", [
    bytes.fromhex("160301020001000000"),  # a TLS ClientHello straight at the RDP port
    b"\x03\x00\x00\x0b\x06\xd0\x00\x00\x00\x00\x00",  # a Connection Confirm where a Request belongs
    b"\x03\x00\x00\x14\x0f\xe0\x00\x00\x00\x00\x00Cookie: x",  # a cookie without its CR LF
], ids=["tls-hello", "confirm", "cookie-no-crlf"])
def test_malformed_x224_closed_audited_others_served(xrdp, rproxy, display, garbage):
    before = _xrdp_connections(xrdp)
    since = len(read_audit(rproxy.audit_path))
    # A session already running through the proxy, kept open across the bad one.
    other = socket.create_connection(("127.0.0.1", rproxy.port("rdp")), timeout=10)
    other.sendall((DATA / "cr_user.bin").read_bytes())
    confirm = other.recv(65536)
    assert confirm == (DATA / "cc_user.bin").read_bytes()  # xrdp's own answer, relayed as sent
    with socket.create_connection(("127.0.0.1", rproxy.port("rdp")), timeout=10) as s:
        s.sendall(garbage)
        assert _read_until_close(s) == b""  # nothing to answer bytes that are no Connection Request
    events = wait_audit(rproxy.audit_path,
                        lambda ev: any(e["event"] == "desktop.session.start" and not e["success"] for e in ev),
                        since=since)
    (bad,) = [e for e in _sessions(events, "desktop.session.start") if not e["success"]]
    assert bad["reason"] == "malformed_x224" and "malformed X.224 Connection Request" in bad["error"]
    assert _xrdp_connections(xrdp) == before + 1  # only the good session reached xrdp
    # The open session is still relayed (xrdp answers its TLS ClientHello), and new ones are served.
    other.sendall(_client_hello())
    assert other.recv(65536)[:1] == b"\x16"  # a TLS handshake record: xrdp's ServerHello
    other.close()
    r = _run(rproxy.address, f"/u:{xrdp.login}", f"/p:{xrdp.password}", display=display)
    assert r.returncode == 0, r.stderr[-2000:]


def test_ten_concurrent_sessions(xrdp, rproxy, display):
    since = len(read_audit(rproxy.audit_path))
    results: list = [None] * 10

    def one(i: int) -> None:
        results[i] = _run(rproxy.address, f"/u:{xrdp.login}", f"/p:{xrdp.password}", display=display, timeout=120)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(150)
    assert [r.returncode for r in results] == [0] * 10, [r.stderr[-500:] for r in results if r.returncode]
    starts = _sessions(read_audit(rproxy.audit_path)[since:], "desktop.session.start")
    assert len(starts) == 10 and all(e["success"] for e in starts)
    sids = {e["sid"] for e in starts}
    events = wait_audit(rproxy.audit_path,
                        lambda ev: len([e for e in _sessions(ev, "desktop.session.end") if e["sid"] in sids]) == 10,
                        since=since, what="the 10 sessions' ends")
    ends = [e for e in _sessions(events, "desktop.session.end") if e["sid"] in sids]
    assert all(e["bytes_from_client"] > 1000 and e["bytes_to_client"] > 1000 for e in ends)
