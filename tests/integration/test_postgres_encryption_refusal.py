"""A backend that answers the proxy's GSSENCRequest / SSLRequest with an ErrorResponse.

A server too old to know GSSENCRequest (before PostgreSQL 12), or one refusing
the connection before the startup packet, sends 'E' + an error instead of the
answer byte (§55.2.10, §55.2.11).  That error is not authenticated: libpq, since
CVE-2024-10977, never shows it, closes the connection, and for ``gssencmode=prefer``
retries on a new connection without GSS encryption.  The proxy must do the same:
log the text at info, keep it from the client, retry for ``prefer`` and fail
with a hint of its own for ``require`` / a TLS mode that requires TLS.

The PostgreSQL 15 started here answers 'G' or 'N', never 'E', so the 'E' comes
from ``RefusingFront``: a FAKE server for a fault the real one cannot produce.
It answers the first connection(s) with the error, then relays later ones to
the real, Kerberized PostgreSQL (the realm, kpg and routes of
``test_postgres_kerberos``), so the login that follows the retry is real:
real GSS authentication, real TLS, a real query through real psycopg.
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import time
from collections.abc import Container

import psycopg
import pytest
import trio

from dbproxy.engines.postgres import messages as m
from tests.integration.test_postgres_kerberos import (  # noqa: F401  (fixtures)
    STAT_SQL,
    client_without_kerberos,
    connect,
    gss_route,
    kpg,
    realm,
    session_starts,
    start_proxy,
    verify_full,
)
from tests.support import wait_until

pytestmark = pytest.mark.integration

PROTOCOL_3_0 = 196608
MARKER = "INJECTED-PRE-AUTH-TEXT"
V3_REFUSAL = m.encode_error("FATAL", "0A000", f"{MARKER}: unsupported frontend protocol 1234.5680")
# A pre-14 server's error before the startup packet (report_fork_failure_to_client): text + NUL.
V2_REFUSAL = f"E{MARKER}: could not fork new process for connection\n\0".encode()


class RefusingFront:
    """FAKE PostgreSQL front (a fault the real server cannot produce, see the module
    docstring).  The connections numbered in ``refuse`` (from 0) read one start-up
    packet and get ``refusal`` back; what the proxy still sends on them before it
    closes them (up to ``linger`` seconds) goes to ``after_refusal``.  Other
    connections are relayed to the real server at ``upstream_port``: byte for byte, or with
    ``tls_upstream`` over a TLS link the front opens itself (kpg's pg_hba admits the
    GSS role over TLS or GSS encryption only; the proxy side stays plaintext).
    ``codes`` records the code of each connection's first packet."""

    def __init__(self, refusal: bytes, upstream_port: int, *, refuse: Container[int] = range(1),
                 tls_upstream: bool = False, linger: float = 1.0) -> None:
        self.refusal = refusal
        self.linger = linger
        self.upstream_port = upstream_port
        self.refuse = refuse
        self.tls_upstream = tls_upstream
        self.codes: list[int] = []
        self.after_refusal: list[bytes] = []
        self.port = 0
        self._ready = threading.Event()
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)

    def __enter__(self) -> "RefusingFront":
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
        self._thread.join(10)

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as self._scope:
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            self.port = listeners[0].socket.getsockname()[1]
            self._ready.set()
            await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        n = len(self.codes)
        buf = bytearray()

        async def exactly(k: int) -> bytes:
            while len(buf) < k:
                data = await stream.receive_some(65536)
                if not data:
                    raise trio.BrokenResourceError
                buf.extend(data)
            out = bytes(buf[:k])
            del buf[:k]
            return out

        async with stream:
            with trio.move_on_after(60):
                head = await exactly(8)
                length, code = struct.unpack(">ii", head)
                self.codes.append(code)
                if n in self.refuse:
                    await stream.send_all(self.refusal)
                    rest = bytes(buf)
                    with trio.move_on_after(self.linger):
                        while data := await stream.receive_some(65536):
                            rest += data
                    self.after_refusal.append(rest)
                    return
                up: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", self.upstream_port)
                first = head
                if self.tls_upstream:
                    first = head + await exactly(length - 8)
                    await up.send_all(m.encode_ssl_request())
                    assert await up.receive_some(1) == b"S"
                    ctx = ssl.create_default_context()
                    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
                    up = trio.SSLStream(up, ctx, server_hostname="localhost")
                await up.send_all(first + bytes(buf))
                async with up:
                    async with trio.open_nursery() as nursery:
                        async def pump(src, dst) -> None:
                            try:
                                while data := await src.receive_some(65536):
                                    await dst.send_all(data)
                            except (trio.BrokenResourceError, trio.ClosedResourceError):
                                pass
                            nursery.cancel_scope.cancel()

                        nursery.start_soon(pump, stream, up)
                        nursery.start_soon(pump, up, stream)


@pytest.fixture(scope="module")
def fronts(kpg):
    with RefusingFront(V3_REFUSAL, kpg.port) as prefer_tls, \
            RefusingFront(V3_REFUSAL, kpg.port, tls_upstream=True) as prefer_plain, \
            RefusingFront(V2_REFUSAL, kpg.port, tls_upstream=True) as prefer_plain_v2, \
            RefusingFront(V3_REFUSAL, kpg.port, refuse=range(1 << 30)) as require, \
            RefusingFront(V3_REFUSAL, kpg.port, refuse=range(1 << 30)) as tls_require, \
            RefusingFront(V3_REFUSAL, kpg.port, refuse={1}) as cancel, \
            RefusingFront(V3_REFUSAL[:3], kpg.port, tls_upstream=True, linger=30) as stall:
        yield {"prefer-tls": prefer_tls, "prefer-plain": prefer_plain, "prefer-plain-v2": prefer_plain_v2,
               "require": require, "tls-require": tls_require, "cancel": cancel,
               "stall": stall}


@pytest.fixture(scope="module")
def proxy(realm, kpg, fronts, tmp_path_factory):
    def at(name: str) -> str:
        return f"127.0.0.1:{fronts[name].port}"

    routes = [
        gss_route("prefer-tls", realm, kpg, address=at("prefer-tls"), tls=verify_full(kpg), host="localhost",
                  gssencmode="prefer"),
        gss_route("prefer-plain", realm, kpg, address=at("prefer-plain"), host="localhost", gssencmode="prefer"),
        gss_route("prefer-plain-v2", realm, kpg, address=at("prefer-plain-v2"), host="localhost", gssencmode="prefer"),
        gss_route("require", realm, kpg, address=at("require"), host="localhost", gssencmode="require"),
        gss_route("tls-require", realm, kpg, address=at("tls-require"), tls={"mode": "require"}, host="localhost"),
        gss_route("stall", realm, kpg, address=at("stall"), host="localhost", gssencmode="prefer"),
        gss_route("cancel", realm, kpg, address=at("cancel"), tls={"mode": "require"}, host="localhost"),
    ]
    proc = start_proxy(tmp_path_factory.mktemp("refusal-proxy"), routes)
    yield proc
    proc.stop()


def raw_login(proxy, user: str) -> bytes:
    """Everything the proxy sends a client that starts a session by hand."""
    with socket.create_connection(("127.0.0.1", proxy.port()), timeout=30) as s:
        s.sendall(m.encode_startup({"user": user, "database": "app"}))
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def refusal_log_lines(proxy, front: RefusingFront, request: str) -> list[str]:
    return [line for line in proxy.log_text().splitlines()
            if f"backend 127.0.0.1:{front.port} answered the proxy's {request} with an error" in line]


@pytest.mark.parametrize("route, second_code, tls", [
    ("prefer-tls", m.SSL_REQUEST_CODE, True),  # v3 ErrorResponse; then TLS as the route says
    ("prefer-plain", PROTOCOL_3_0, False),  # v3 ErrorResponse; then the StartupMessage in plaintext
    ("prefer-plain-v2", PROTOCOL_3_0, False),  # a pre-3.0 error (text + NUL); then plaintext
])
def test_gssenc_prefer_error_answer_retries_on_a_new_connection(proxy, fronts, route, second_code, tls):
    """Before the fix the 'E' stayed in the decoder: the TLS route failed with
    "answered b'E'", the plaintext one decoded the unauthenticated error as the
    backend's answer to the StartupMessage and showed its text to the client
    (a pre-3.0 error: "invalid response")."""
    front = fronts[route]
    with connect(proxy, route) as conn:
        user, ssl_on, gss_auth, gss_enc, _principal = conn.execute(STAT_SQL).fetchone()
    assert (user, gss_auth, gss_enc) == ("dbproxy", True, False)
    assert ssl_on is True  # the proxy's TLS (prefer-tls) or the fake front's own (prefer-plain)
    # The refused connection was given up; the retry asked for no GSS encryption.
    assert front.codes == [m.GSSENC_REQUEST_CODE, second_code]
    (start,) = session_starts(proxy, route, success=True)
    assert start["backend_gssenc"] is False and start["backend_tls"] is tls
    assert MARKER not in str(start)
    # The server's text is in the proxy's log, at info, and nowhere else.
    (line,) = refusal_log_lines(proxy, front, "GSSENCRequest")
    assert " INFO " in line and MARKER in line
    assert "retrying the login without GSS encryption" in proxy.log_text()


def test_gssenc_prefer_error_that_stalls_still_retries_in_time(proxy, fronts):
    """'E' and two bytes of a length, then nothing, the connection left open: the
    text is only for the log, so the proxy gives it 2 s and retries; before the
    bound the read took the whole 15 s login deadline and the client got 08001."""
    front = fronts["stall"]
    t0 = time.monotonic()
    with connect(proxy, "stall") as conn:
        assert conn.execute("select current_user").fetchone() == ("dbproxy",)
    elapsed = time.monotonic() - t0
    assert 2.0 <= elapsed < 10, elapsed
    assert front.codes == [m.GSSENC_REQUEST_CODE, PROTOCOL_3_0]
    (line,) = refusal_log_lines(proxy, front, "GSSENCRequest")
    assert "not complete within 2.0s" in line


@pytest.mark.parametrize("route, request_code, request_name, hint", [
    ("require", m.GSSENC_REQUEST_CODE, "GSSENCRequest", "the backend database refused an encrypted connection from the proxy"),
    ("tls-require", m.SSL_REQUEST_CODE, "SSLRequest", "the backend database refused a TLS connection from the proxy"),
])
def test_error_answer_fails_a_required_encryption_without_its_text(proxy, fronts, route, request_code, request_name, hint):
    """Before the fix the login also failed, but the error was left unread and
    unlogged: nothing told the operator what the server said."""
    front = fronts[route]
    data = raw_login(proxy, route)
    assert data[:1] == b"E", data[:100]
    (n,) = struct.unpack(">i", data[1:5])
    fields = {chr(p[0]): p[1:].decode() for p in data[5:1 + n].split(b"\0") if p}
    assert fields["C"] == "08001" and fields["M"] == hint, fields
    assert MARKER.encode() not in data
    with pytest.raises(psycopg.OperationalError) as info:
        connect(proxy, route)
    assert hint in str(info.value) and MARKER not in str(info.value)
    # One connection per attempt, no retry: nothing to fall back to.
    assert front.codes == [request_code, request_code]
    events = session_starts(proxy, route, success=False, count=2)
    assert all(MARKER not in str(e) for e in events)
    wait_until(lambda: len(refusal_log_lines(proxy, front, request_name)) >= 2, what="the refusals logged")
    lines = refusal_log_lines(proxy, front, request_name)
    assert all(" INFO " in line and MARKER in line for line in lines), lines


def test_cancel_not_sent_after_an_error_answer_to_sslrequest(proxy, fronts):
    """The proxy's CancelRequest connection gets 'E' to its SSLRequest: the refusal is
    logged, and the cancel key never goes out on that (plaintext) link.  Before the
    fix the proxy sent the CancelRequest right behind the unread error."""
    front = fronts["cancel"]
    with connect(proxy, "cancel") as conn:
        assert conn.execute("select current_user").fetchone() == ("dbproxy",)
        # cancel_safe: the legacy conn.cancel() blocks in libpq holding the GIL, which
        # would stall this process's fake front until the proxy gave up.
        timer = threading.Timer(0.3, conn.cancel_safe)
        timer.start()
        t0 = time.monotonic()
        conn.execute("select pg_sleep(1.5)")  # the cancel cannot arrive: the query runs its course
        elapsed = time.monotonic() - t0
        timer.join()
    assert elapsed >= 1.4
    wait_until(lambda: len(front.after_refusal) == 1, what="the refused cancel connection closed")
    assert front.codes == [m.SSL_REQUEST_CODE, m.SSL_REQUEST_CODE]
    assert front.after_refusal == [b""]
    (line,) = refusal_log_lines(proxy, front, "SSLRequest")
    assert " INFO " in line and MARKER in line
    assert "cancel request to backend" in proxy.log_text() and "so the cancel was not sent" in proxy.log_text()
