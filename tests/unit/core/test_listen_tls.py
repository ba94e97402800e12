"""The "tls" listener kind: TLS terminated by the core, the engine gets the TLS stream and the peer certificate."""

from __future__ import annotations

import socket
import ssl

import pytest
import trio

from scripts.peers.certs import make_ca, make_cert

from .listen_support import listener, running

pytestmark = pytest.mark.timeout(60)


def _pki(tmp_path):
    ca = make_ca(tmp_path / "pki")
    cert, key = make_cert(tmp_path / "pki", ca, "proxy")
    client = make_cert(tmp_path / "pki", ca, "alice", client=True)
    return ca, {"cert_file": str(cert), "key_file": str(key), "client_ca_file": str(ca[0])}, client


def _talk(port: int, ctx: ssl.SSLContext | None) -> tuple[bytes, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        s = ctx.wrap_socket(raw, server_hostname="localhost") if ctx else raw
        greeting = b""
        while not greeting.endswith(b"\n"):
            greeting += s.recv(100)
        s.sendall(b"ping\n")
        return greeting, s.recv(100)


async def test_tls_kind_hands_the_engine_a_tls_stream_with_the_client_certificate(tmp_path):
    ca, tls, (ccert, ckey) = _pki(tmp_path)
    async with running(tmp_path, [listener("t", "line", kind="tls", tls=tls), listener("p", "line")]) as run:
        ctx = ssl.create_default_context(cafile=str(ca[0]))
        greeting, echo = await trio.to_thread.run_sync(_talk, run.ports["t"], ctx)
        assert (greeting, echo) == (b"hello - tls=True\n", b"ping\n")
        ctx.load_cert_chain(str(ccert), str(ckey))
        greeting, _ = await trio.to_thread.run_sync(_talk, run.ports["t"], ctx)
        assert greeting == b"hello alice tls=True\n"
        # The same engine on a tcp listener: the plain stream, as today.
        greeting, echo = await trio.to_thread.run_sync(_talk, run.ports["p"], None)
        assert (greeting, echo) == (b"hello - tls=False\n", b"ping\n")


async def test_tls_handshake_timeout_ends_and_audits_the_session(tmp_path):
    ca, tls, _ = _pki(tmp_path)
    lst = listener("t", "line", kind="tls", tls=tls, handshake_timeout_seconds=0.3)
    async with running(tmp_path, [lst]) as run:
        with trio.fail_after(5):
            stream = await trio.open_tcp_stream("127.0.0.1", run.ports["t"])
            assert await stream.receive_some(100) == b""  # closed by the proxy after the timeout, no bytes
        # A plaintext client gets nothing either, and the listener goes on serving TLS.
        with trio.fail_after(5):
            stream = await trio.open_tcp_stream("127.0.0.1", run.ports["t"])
            await stream.send_all(b"ping\n")
            try:
                assert await stream.receive_some(100) == b""
            except trio.BrokenResourceError:
                pass  # a reset is as good as a close here
        greeting, _ = await trio.to_thread.run_sync(_talk, run.ports["t"], ssl.create_default_context(cafile=str(ca[0])))
        assert greeting == b"hello - tls=True\n"
    starts = [e for e in run.events() if e["event"].endswith("session.start") and not e["success"]]
    assert [e["error"] for e in starts] == ["client TLS handshake timed out"]
