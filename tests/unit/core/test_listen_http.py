"""HTTP listeners (dbproxy.listen.http) with real clients: curl and python's http.client, plain and TLS."""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import ssl
import subprocess

import pytest
import trio

from scripts.peers.certs import make_ca, make_cert
from tests.support import peer_missing

from .listen_support import listener, running, wait_until

pytestmark = pytest.mark.timeout(60)


def _curl() -> str:
    import shutil

    path = shutil.which("curl")
    if path is None:
        peer_missing("curl (scripts/install/http.sh)")
    return path


async def _curl_run(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess:
    return await trio.run_process([_curl(), "-sS", *args], stdin=input, capture_stdout=True, capture_stderr=True,
                                  check=False)


def _raw(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes, read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


async def test_keepalive_two_requests_on_one_connection(tmp_path):
    async with running(tmp_path, [listener("w", "web", kind="http")]) as run:
        port = run.ports["w"]

        def two() -> list[dict]:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            out = []
            for body in (b"one", b"second"):
                conn.request("POST", "/echo?x=1", body=body)
                resp = conn.getresponse()
                assert resp.status == 200 and resp.getheader("content-type") == "application/json"
                out.append(json.loads(resp.read()))
            conn.close()
            return out

        first, second = await trio.to_thread.run_sync(two)
        assert (first["length"], second["length"]) == (3, 6)
        assert first["session"] == second["session"] and (first["n"], second["n"]) == (1, 2)
        assert first["query"] == "x=1"
    (end,) = [e for e in run.events() if e["event"].endswith("session.end")]
    assert end["http_requests"] == 2 and end["sid"] == first["session"]


async def test_curl_reuses_the_connection_and_streams_a_chunked_body(tmp_path):
    body = bytes(range(256)) * 1000  # 256 kB, several reads
    (tmp_path / "body.bin").write_bytes(body)
    async with running(tmp_path, [listener("w", "web", kind="http")]) as run:
        url = f"http://127.0.0.1:{run.ports['w']}"
        r = await _curl_run("-H", "Transfer-Encoding: chunked", "--data-binary", f"@{tmp_path / 'body.bin'}",
                            "-w", "\n%{num_connects}\n", f"{url}/echo",
                            "--next", "-w", "\n%{num_connects}", f"{url}/stream")
        assert r.returncode == 0, r.stderr
        first, connects1, streamed, connects2 = r.stdout.split(b"\n")
        echoed = json.loads(first)
        assert echoed["te"] == "chunked" and echoed["length"] == len(body)
        assert echoed["sha"] == hashlib.sha256(body).hexdigest()
        assert streamed == b"part0;part1;part2;"
        assert (connects1, connects2) == (b"1", b"0")  # the second transfer reused the first one's connection


async def test_too_large_body_is_refused_with_413(tmp_path):
    limits = {"max_body_bytes": 1000}
    async with running(tmp_path, [listener("w", "web", kind="http", http=limits)]) as run:
        url = f"http://127.0.0.1:{run.ports['w']}/echo"
        # Announced by Content-Length: refused before the body is read.
        r = await _curl_run("--data-binary", "x" * 1001, "-w", "\n%{http_code}", url)
        text, code = r.stdout.rsplit(b"\n", 1)
        assert code == b"413" and json.loads(text)["error"]["code"] == 413
        # A head alone announcing too much is answered at once: no body byte is waited for.
        out = await trio.to_thread.run_sync(
            _raw, run.ports["w"], b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1001\r\n\r\n", 2.0)
        assert out.startswith(b"HTTP/1.1 413 ")
        # Chunked: refused when it grows past the limit, through the handler's read().
        r = await _curl_run("-H", "Transfer-Encoding: chunked", "--data-binary", "y" * 5000, "-w", "\n%{http_code}", url)
        assert r.stdout.rsplit(b"\n", 1)[1] == b"413"
        # Exactly the limit passes.
        r = await _curl_run("--data-binary", "z" * 1000, url)
        assert json.loads(r.stdout)["length"] == 1000


async def test_malformed_request_line_gets_400_and_the_listener_goes_on(tmp_path):
    async with running(tmp_path, [listener("w", "web", kind="http")]) as run:
        port = run.ports["w"]
        out = await trio.to_thread.run_sync(_raw, port, b"GARBAGE\r\n\r\n")
        head, _, body = out.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400 ") and b"connection: close" in head.lower()
        assert json.loads(body)["error"]["code"] == 400
        r = await _curl_run(f"http://127.0.0.1:{port}/echo")
        assert json.loads(r.stdout)["method"] == "GET"


async def test_oversized_head_gets_431(tmp_path):
    async with running(tmp_path, [listener("w", "web", kind="http", http={"max_header_bytes": 2048})]) as run:
        r = await _curl_run("-H", "X-Big: " + "a" * 4000, "-w", "\n%{http_code}", f"http://127.0.0.1:{run.ports['w']}/echo")
        text, code = r.stdout.rsplit(b"\n", 1)
        assert code == b"431" and json.loads(text)["error"]["code"] == 431
        r = await _curl_run("-H", "X-Small: " + "a" * 1000, f"http://127.0.0.1:{run.ports['w']}/echo")
        assert json.loads(r.stdout)["method"] == "GET"


async def test_handler_exception_is_500_and_the_connection_survives(tmp_path, caplog):
    async with running(tmp_path, [listener("w", "web", kind="http")]) as run:
        port = run.ports["w"]

        def boom_then_echo() -> tuple:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("POST", "/boom", body=b"unread body")  # the handler never reads it
            resp = conn.getresponse()
            boom = (resp.status, resp.getheader("content-type"), json.loads(resp.read()))
            conn.request("GET", "/echo")
            resp = conn.getresponse()
            return boom, resp.status, json.loads(resp.read())

        (status, ctype, body), status2, echoed = await trio.to_thread.run_sync(boom_then_echo)
    assert (status, ctype) == (500, "application/json")
    assert body == {"error": {"code": 500, "message": "internal error: RuntimeError"}}
    assert status2 == 200 and echoed["n"] == 2  # same connection, same session
    assert "the test handler failed on purpose" in caplog.text


async def test_slow_request_gets_408(tmp_path):
    async with running(tmp_path, [listener("w", "web", kind="http", http={"request_timeout_seconds": 0.3})]) as run:
        out = await trio.to_thread.run_sync(_raw, run.ports["w"], b"GET /echo HTTP/1.1\r\nHost: x\r\n")
        assert out.startswith(b"HTTP/1.1 408 ")


async def test_silent_connection_is_closed_after_request_timeout_without_a_response(tmp_path):
    opts = {"request_timeout_seconds": 0.3, "keepalive_timeout_seconds": 30}
    async with running(tmp_path, [listener("w", "web", kind="http", http=opts)]) as run:
        start = trio.current_time()
        out = await trio.to_thread.run_sync(_raw, run.ports["w"], b"")
        assert out == b"" and trio.current_time() - start < 5


async def test_client_that_stops_reading_loses_its_session(tmp_path):
    opts = {"keepalive_timeout_seconds": 0.5}
    async with running(tmp_path, [listener("w", "web", kind="http", http=opts)]) as run:
        stream = await trio.open_tcp_stream("127.0.0.1", run.ports["w"])
        await stream.send_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        await wait_until(lambda: len(run.server.sessions) == 1)
        await wait_until(lambda: not run.server.sessions, timeout=10)  # never read a byte
        await stream.aclose()
    (end,) = [e for e in run.events() if e["event"].endswith("session.end")]
    assert end["reason"].startswith("connection lost")


async def test_https_with_curl_cacert_and_client_certificate(tmp_path):
    ca = make_ca(tmp_path / "pki")
    cert, key = make_cert(tmp_path / "pki", ca, "proxy")
    ccert, ckey = make_cert(tmp_path / "pki", ca, "alice", client=True)
    tls = {"cert_file": str(cert), "key_file": str(key), "client_ca_file": str(ca[0])}
    async with running(tmp_path, [listener("w", "web", kind="http", tls=tls)]) as run:
        url = f"https://localhost:{run.ports['w']}"
        r = await _curl_run("--cacert", str(ca[0]), f"{url}/cert", "--next", "--cacert", str(ca[0]), f"{url}/echo")
        assert r.returncode == 0, r.stderr
        first, second = r.stdout.split(b"}", 1)
        assert json.loads(first + b"}") == {"tls": True, "cn": None, "session": json.loads(second)["session"]}
        r = await _curl_run("--cacert", str(ca[0]), "--cert", str(ccert), "--key", str(ckey), f"{url}/cert")
        assert json.loads(r.stdout)["cn"] == "alice"
        # Plain HTTP to the TLS port: the handshake fails, no response, the listener goes on.
        r = await _curl_run(f"http://127.0.0.1:{run.ports['w']}/echo")
        assert r.returncode != 0
        r = await _curl_run("--cacert", str(ca[0]), f"{url}/echo")
        assert json.loads(r.stdout)["method"] == "GET"


async def test_http_client_over_tls(tmp_path):
    ca = make_ca(tmp_path / "pki")
    cert, key = make_cert(tmp_path / "pki", ca, "proxy")
    tls = {"cert_file": str(cert), "key_file": str(key)}
    async with running(tmp_path, [listener("w", "web", kind="http", tls=tls)]) as run:
        port = run.ports["w"]

        def two() -> list[dict]:
            ctx = ssl.create_default_context(cafile=str(ca[0]))
            conn = http.client.HTTPSConnection("localhost", port, context=ctx, timeout=5)
            out = []
            for _ in range(2):
                conn.request("POST", "/echo", body=b"abc")
                out.append(json.loads(conn.getresponse().read()))
            conn.close()
            return out

        a, b = await trio.to_thread.run_sync(two)
        assert a["session"] == b["session"] and (a["n"], b["n"]) == (1, 2)


async def test_body_read_whole_is_charged_to_the_buffer_budget(tmp_path):
    # One MiB for the whole proxy; a 1.5 MiB body within max_body_bytes still cannot be held: 503.
    lst = listener("w", "web", kind="http", http={"max_body_bytes": 4 * 1024 * 1024})
    body = b"b" * (1536 * 1024)
    (tmp_path / "body.bin").write_bytes(body)
    async with running(tmp_path, [lst], buffers={"budget_bytes": 1024 * 1024}) as run:
        url = f"http://127.0.0.1:{run.ports['w']}/echo"
        r = await _curl_run("--data-binary", f"@{tmp_path / 'body.bin'}", "-w", "\n%{http_code}", url)
        text, code = r.stdout.rsplit(b"\n", 1)
        assert code == b"503" and json.loads(text)["error"]["code"] == 503
        budget = run.server.services.buffers
        assert budget.refused == 1 and budget.used == 0  # refused, and the charge given back
        r = await _curl_run("--data-binary", "small", url)
        assert json.loads(r.stdout)["length"] == 5


async def test_audit_unavailable_is_a_503(tmp_path):
    async with running(tmp_path, [listener("w", "web", kind="http")]) as run:
        # Stands in for a fail-closed sink whose spool is full (what `accepting` reads).
        (sink,) = run.server.recorder.sinks
        sink.blocked = True
        r = await _curl_run("-w", "\n%{http_code}", f"http://127.0.0.1:{run.ports['w']}/echo")
        text, code = r.stdout.rsplit(b"\n", 1)
        assert code == b"503" and json.loads(text)["error"]["message"].startswith("audit")
        sink.blocked = False
        r = await _curl_run(f"http://127.0.0.1:{run.ports['w']}/echo")
        assert json.loads(r.stdout)["n"] == 1


async def test_engine_renders_the_core_errors_in_its_dialect(tmp_path):
    async with running(tmp_path, [listener("w", "webdialect", kind="http", http={"max_body_bytes": 10})]) as run:
        r = await _curl_run("--data-binary", "x" * 11, "-w", "\n%{http_code}", f"http://127.0.0.1:{run.ports['w']}/echo")
        text, code = r.stdout.rsplit(b"\n", 1)
        assert code == b"413"
        assert json.loads(text)["error"] == {"code": "Base.1.0.GeneralError",
                                             "message": "request body larger than 10 bytes",
                                             "@Message.ExtendedInfo": [{"HttpStatus": 413}]}
