"""Metrics and health on the admin listener (dbproxy.metrics, dbproxy.admin), in-process.

A real ``ProxyServer`` on loopback sockets (as ``listen_support`` runs it)
with a small line-protocol engine that uses the core session flow: its
backend is a real TCP echo server in the test, its refused login a real
refused connection (a closed port).  The admin listener is scraped over
HTTP and parsed with prometheus-client's own text parser.  The PostgreSQL
version, through ``dbproxy serve``, is tests/integration/test_metrics_pg.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from dbproxy import flow
from dbproxy.audit.sinks.spooled import DeliveryFailed, SpooledSink
from dbproxy.buffer import ReceiveBuffer
from dbproxy.channel import MessageStream
from dbproxy.config import load_config
from dbproxy.engine import Engine, EngineRegistry
from dbproxy.errors import ConfigErrors, ProxyError, RemoteProtocolError, UpstreamError
from dbproxy.sansio import NEED_DATA
from dbproxy.server import ProxyServer
from scripts.peers import refused_port

from .listen_support import wait_until


class Line:
    __slots__ = ("raw",)

    def __init__(self, raw: bytes) -> None:
        self.raw = raw


class LineDecoder:
    def __init__(self) -> None:
        self.buffer = ReceiveBuffer()

    def feed(self, data: Any) -> None:
        self.buffer.feed(data)

    def next_message(self) -> Any:
        end = bytes(self.buffer.peek(len(self.buffer))).find(b"\n")
        return NEED_DATA if end < 0 else Line(self.buffer.take(end + 1))


class EchoLineEngine(Engine):
    """``HELLO <user>`` routes by user to a TCP backend; then lines both ways."""

    protocol = "echoline"
    match_keys = ("user",)
    auth_methods = ("none",)

    def new_request(self, session: Any, stream: Any) -> flow.Request:
        return flow.Request(MessageStream(stream, LineDecoder()))

    async def handshake(self, session: Any, request: flow.Request) -> bool:
        words = bytes((await request.client.receive()).raw).split()
        if len(words) != 2 or words[0] != b"HELLO":
            raise RemoteProtocolError("no HELLO", client_hint="expected HELLO <user>")
        request.login = words[1].decode()
        request.keys = {"user": request.login}
        return True

    async def connect_backend(self, session: Any, request: flow.Request, route: Any, grant: Any) -> flow.Backend:
        try:
            stream = await trio.open_tcp_stream(route.backend.host, route.backend.port)
        except OSError as exc:
            raise UpstreamError(f"backend {route.backend.address}: {exc}", kind="connect",
                                client_hint="backend unreachable") from None
        return flow.Backend(stream, LineDecoder())

    async def ready(self, session: Any, request: flow.Request, backend: flow.Backend) -> None:
        await request.client.send(b"OK\n")

    def wiring(self, session: Any, request: flow.Request, backend: flow.Backend, grant: Any) -> flow.Wiring:
        return flow.Wiring(request.client.decoder, backend.decoder, [], [], None,
                           lambda exc: b"ERR " + str(exc).encode() + b"\n")

    def upstream_refused(self, request: flow.Request, exc: UpstreamError) -> flow.Refused:
        return flow.Refused(str(exc), client_message=exc.client_hint, code="E-UPSTREAM")

    def render_error(self, request: flow.Request, exc: ProxyError) -> bytes:
        if isinstance(exc, flow.Refused):
            return b"ERR " + exc.client_message.encode() + b"\n"
        return b"ERR protocol: " + getattr(exc, "client_hint", str(exc)).encode() + b"\n"


def registry() -> EngineRegistry:
    reg = EngineRegistry()
    reg.register(EchoLineEngine.protocol, EchoLineEngine)
    return reg


def config(tmp_path: Path, echo_port: int, **top: Any) -> dict:
    routes = [{"name": "up", "match": {"user": "alice"},
               "backend": {"address": f"127.0.0.1:{echo_port}", "auth": {"method": "none"}}},
              {"name": "down", "match": {"user": "dave"},
               "backend": {"address": f"127.0.0.1:{refused_port()}", "auth": {"method": "none"}}}]
    return {"listeners": [{"name": "lines", "protocol": "echoline", "listen": "127.0.0.1:0", "routes": routes}],
            "shutdown_grace_seconds": 1, "admin": {"listen": "127.0.0.1:0"},
            "audit": {"worker": False, "sinks": [{"type": "jsonl", "path": str(tmp_path / "audit.jsonl")}]}, **top}


async def echo_server(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    async def echo(stream: trio.SocketStream) -> None:
        try:
            while data := await stream.receive_some(65536):
                await stream.send_all(data)
        except trio.BrokenResourceError:
            pass

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(echo, listeners)


async def http_get(address: tuple[str, int], path: str) -> tuple[int, dict, bytes]:
    """One GET over a fresh connection (HTTP/1.0: the server closes after the response)."""
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream(*address)
        async with stream:
            await stream.send_all(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
            data = b""
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


async def scrape(address: tuple[str, int]) -> dict:
    """``{(sample name, frozenset(labels)): value}`` as prometheus-client's parser reads /metrics."""
    status, headers, body = await http_get(address, "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    """The sample's value; 0 when absent (a labelled counter appears at its first increment)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


LINE = {"protocol": "echoline", "listener": "lines"}


async def session(port: int, hello: bytes, lines: list[bytes] = ()) -> bytes:
    """A client: the hello, then each line echoed back through the proxy; returns what it read."""
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(hello)
            got = b""
            while b"\n" not in got:
                chunk = await stream.receive_some()
                if not chunk:
                    return got
                got += chunk
            for line in lines:
                await stream.send_all(line)
                echoed = b""
                while len(echoed) < len(line):
                    echoed += await stream.receive_some()
                assert echoed == line
                got += echoed
            return got


class Proxy:
    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self.port = server.bound[0].port
        self.admin = server.admin_address


async def finish(nursery: trio.Nursery, *servers: ProxyServer) -> None:
    """Stop the servers (their audit is written), then the echo backend."""
    for server in servers:
        server.stop()
    await wait_until(lambda: all(not s.listening for s in servers))
    nursery.cancel_scope.cancel()


async def start(nursery: trio.Nursery, tmp_path: Path, doc: dict) -> Proxy:
    path = tmp_path / "proxy.json"
    path.write_text(json.dumps(doc))
    server = ProxyServer(load_config(str(path), registry()), registry())
    await nursery.start(server.run)
    return Proxy(server)


async def test_sessions_bytes_messages_login_latency_and_errors_are_counted(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        echo_port = await nursery.start(echo_server)
        proxy = await start(nursery, tmp_path, config(tmp_path, echo_port))
        before = await scrape(proxy.admin)
        assert value(before, "dbproxy_sessions_active", state="running", **LINE) == 0

        lines = [b"one\n", b"two two\n", b"three three three\n"]
        for _ in range(3):
            assert await session(proxy.port, b"HELLO alice\n", lines) == b"OK\n" + b"".join(lines)
        assert await session(proxy.port, b"HELLO dave\n") == b"ERR backend unreachable\n"  # a real refused connect
        assert await session(proxy.port, b"HELLO bob\n") == b"ERR no route on listener lines for {'user': 'bob'}\n"
        assert (await session(proxy.port, b"GARBAGE\n")).startswith(b"ERR protocol")
        await wait_until(lambda: not proxy.server.sessions)
        after = await scrape(proxy.admin)

        def moved(name: str, **labels: str) -> float:
            return value(after, name, **labels) - value(before, name, **labels)

        assert moved("dbproxy_sessions_total", outcome="completed", **LINE) == 3
        assert moved("dbproxy_sessions_total", outcome="refused", **LINE) == 2
        assert moved("dbproxy_sessions_total", outcome="abandoned", **LINE) == 1  # the client protocol error
        assert value(after, "dbproxy_sessions_active", state="running", **LINE) == 0
        assert value(after, "dbproxy_sessions_active", state="starting", **LINE) == 0
        # What the pipeline received each way after the login: the lines, both ways (echoed).
        sent = 3 * sum(len(line) for line in lines)
        assert moved("dbproxy_bytes_total", direction="client_to_backend", **LINE) == sent
        assert moved("dbproxy_bytes_total", direction="backend_to_client", **LINE) == sent
        assert moved("dbproxy_messages_total", direction="client_to_backend", **LINE) == 9
        assert moved("dbproxy_messages_total", direction="backend_to_client", **LINE) == 9
        # Three logins that worked, one refused connection: the histogram has both, apart.
        assert moved("dbproxy_backend_login_seconds_count", outcome="ok", **LINE) == 3
        assert moved("dbproxy_backend_login_seconds_count", outcome="failed", **LINE) == 1
        assert 0 < moved("dbproxy_backend_login_seconds_sum", outcome="ok", **LINE) < 5
        assert moved("dbproxy_backend_login_seconds_bucket", outcome="ok", le="+Inf", **LINE) == 3
        # Errors by kind and the engine's own code.
        assert moved("dbproxy_errors_total", kind="backend", code="E-UPSTREAM", **LINE) == 1
        assert moved("dbproxy_errors_total", kind="refused", code="", **LINE) == 1  # no route
        assert moved("dbproxy_errors_total", kind="client_protocol", code="", **LINE) == 1
        # In-process audit: its queue drained, accepting.
        assert value(after, "dbproxy_audit_accepting") == 1 and value(after, "dbproxy_audit_worker_up") == 1
        assert value(after, "dbproxy_audit_events_submitted_total") > value(before, "dbproxy_audit_events_submitted_total")
        await finish(nursery, proxy.server)


async def test_a_running_session_shows_as_active_with_its_live_byte_count(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        echo_port = await nursery.start(echo_server)
        proxy = await start(nursery, tmp_path, config(tmp_path, echo_port))
        with trio.fail_after(5):
            stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
            await stream.send_all(b"HELLO alice\n")
            assert await stream.receive_some() == b"OK\n"
            await stream.send_all(b"x" * 999 + b"\n")
            got = b""
            while len(got) < 1000:
                got += await stream.receive_some()
        live = await scrape(proxy.admin)
        assert value(live, "dbproxy_sessions_active", state="running", **LINE) == 1
        # Counted while the session runs (read from its pumps at scrape time), not only at its end.
        assert value(live, "dbproxy_bytes_total", direction="client_to_backend", **LINE) == 1000
        assert value(live, "dbproxy_sessions_total", outcome="completed", **LINE) == 0
        await stream.aclose()
        await wait_until(lambda: not proxy.server.sessions)
        ended = await scrape(proxy.admin)
        assert value(ended, "dbproxy_sessions_active", state="running", **LINE) == 0
        assert value(ended, "dbproxy_bytes_total", direction="client_to_backend", **LINE) == 1000  # not twice
        assert value(ended, "dbproxy_sessions_total", outcome="completed", **LINE) == 1
        await finish(nursery, proxy.server)


async def test_healthz_readyz_and_unknown_paths(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        echo_port = await nursery.start(echo_server)
        proxy = await start(nursery, tmp_path, config(tmp_path, echo_port))
        status, headers, body = await http_get(proxy.admin, "/healthz")
        health = orjson.loads(body)
        assert status == 200 and health["status"] == "ok"
        assert health["listeners"] == [{"name": "lines", "protocol": "echoline", "kind": "tcp",
                                        "address": f"127.0.0.1:{proxy.port}"}]
        status, _, body = await http_get(proxy.admin, "/readyz")
        assert (status, orjson.loads(body)) == (200, {"ready": True, "reason": "ready"})
        status, _, body = await http_get(proxy.admin, "/nope")
        assert status == 404 and b"/metrics" in body
        await finish(nursery, proxy.server)


class DownSink(SpooledSink):
    """A spooled network sink (the real spool, fail_closed) whose SIEM is down while ``down``;
    its delivery is the test's — the real HTTP sink and SIEM are in tests/integration/test_metrics_pg.py."""

    def __init__(self, spool_dir: str) -> None:
        super().__init__(name="siem", spool_dir=spool_dir, spool_max_bytes=16 * 1024, on_full="fail_closed",
                         retry_initial_seconds=0.01, retry_max_seconds=0.05, shutdown_flush_seconds=0.5)
        self.down = True
        self.got = 0

    async def deliver(self, payloads: list) -> None:
        if self.down:
            raise DeliveryFailed("the SIEM is down")
        self.got += len(payloads)


async def test_readyz_fails_while_the_audit_fails_closed_and_recovers(tmp_path: Path) -> None:
    from dbproxy.audit.recorder import AuditRecorder, serialize

    sink = DownSink(str(tmp_path / "spool"))
    async with trio.open_nursery() as nursery:
        echo_port = await nursery.start(echo_server)
        path = tmp_path / "proxy.json"
        path.write_text(json.dumps(config(tmp_path, echo_port)))
        server = ProxyServer(load_config(str(path), registry()), registry(), recorder=AuditRecorder([sink]))
        await nursery.start(server.run)
        admin = server.admin_address
        assert (await http_get(admin, "/readyz"))[0] == 200
        for i in range(100):  # events the SIEM does not take fill the 16 KiB spool
            if not server.recorder.accepting:
                break
            assert server.recorder.submit_nowait(serialize({"event": "test.fill", "i": i, "pad": "x" * 1000}))
            await trio.sleep(0.01)
        assert not server.recorder.accepting
        status, headers, body = await http_get(admin, "/readyz")
        assert status == 503 and headers["content-type"] == "application/json"
        assert orjson.loads(body) == {"ready": False,
                                      "reason": "the audit fails closed (sink siem blocked): sessions are refused"}
        samples = await scrape(admin)
        assert value(samples, "dbproxy_audit_accepting") == 0
        assert value(samples, "dbproxy_audit_sink_blocked", sink="siem") == 1
        assert value(samples, "dbproxy_audit_sink_failing", sink="siem") == 1
        assert value(samples, "dbproxy_audit_sink_spool_bytes", sink="siem") == sink.spool.pending_bytes > 0
        assert value(samples, "dbproxy_audit_sink_spool_max_bytes", sink="siem") == 16 * 1024
        assert value(samples, "dbproxy_audit_sink_overflow_events", sink="siem") > 0
        assert value(samples, "dbproxy_audit_sink_delivery_lag_seconds", sink="siem") > 0
        # A session now is refused (audit unavailable) and counted as such.
        assert await session(server.bound[0].port, b"HELLO alice\n") == b"ERR " + \
            b"audit unavailable: the audit trail cannot be written, so the proxy accepts no sessions\n"
        await wait_until(lambda: not server.sessions)
        samples = await scrape(admin)
        assert value(samples, "dbproxy_errors_total", kind="audit_unavailable", code="", **LINE) == 1
        assert value(samples, "dbproxy_sessions_total", outcome="refused", **LINE) == 1
        # Healthy all along: the process runs and its listeners are bound.
        assert (await http_get(admin, "/healthz"))[0] == 200
        sink.down = False  # the SIEM is back: the spool drains
        await wait_until(lambda: server.recorder.accepting and not sink.spool.pending_events)
        status, _, body = await http_get(admin, "/readyz")
        assert (status, orjson.loads(body)["ready"]) == (200, True)
        samples = await scrape(admin)
        assert value(samples, "dbproxy_audit_sink_blocked", sink="siem") == 0
        assert value(samples, "dbproxy_audit_sink_delivery_lag_seconds", sink="siem") == 0
        assert value(samples, "dbproxy_audit_sink_delivered_total", sink="siem") == sink.got > 0
        await finish(nursery, server)


async def test_each_server_has_its_own_registry(tmp_path: Path) -> None:
    """Two in-process servers (prometheus-client's global registry would refuse the second's metrics)."""
    async with trio.open_nursery() as nursery:
        echo_port = await nursery.start(echo_server)
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        a = await start(nursery, tmp_path / "a", config(tmp_path / "a", echo_port))
        b = await start(nursery, tmp_path / "b", config(tmp_path / "b", echo_port))
        await session(a.port, b"HELLO alice\n", [b"hi\n"])
        await wait_until(lambda: not a.server.sessions)
        assert value(await scrape(a.admin), "dbproxy_sessions_total", outcome="completed", **LINE) == 1
        assert value(await scrape(b.admin), "dbproxy_sessions_total", outcome="completed", **LINE) == 0
        await finish(nursery, a.server, b.server)


def test_no_admin_section_means_no_admin_listener(tmp_path: Path) -> None:
    doc = config(tmp_path, 1)
    del doc["admin"]
    path = tmp_path / "proxy.json"
    path.write_text(json.dumps(doc))
    assert load_config(str(path), registry()).admin is None
    doc["admin"] = {}
    path.write_text(json.dumps(doc))
    admin = load_config(str(path), registry()).admin
    assert (admin.host, admin.port) == ("127.0.0.1", 9090)  # loopback by default


@pytest.mark.parametrize(("admin", "where", "expected"), [
    ({"listen": "nowhere"}, "admin.listen", "\"host:port\" with a port 0-65535, got 'nowhere'"),
    ({"listen": 9090}, "admin.listen", "a non-empty string, got a number"),
    ({"listen": "127.0.0.1:9090", "port": 1}, "admin.port", "no key 'port' here (allowed: listen)"),
    ("127.0.0.1:9090", "admin", "an object, got a string"),
    ({"listen": "127.0.0.1:7777"}, "admin.listen", "an address no listener uses, 127.0.0.1:7777 is listener 'lines''s"),
])
def test_admin_config_errors_name_file_path_and_expectation(tmp_path: Path, admin: Any, where: str, expected: str) -> None:
    doc = config(tmp_path, 1)
    doc["listeners"][0]["listen"] = "127.0.0.1:7777"
    doc["admin"] = admin
    path = tmp_path / "proxy.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigErrors) as info:
        load_config(str(path), registry())
    [error] = info.value.errors
    assert (error.file, error.path, error.expected) == (str(path), where, expected)


async def test_the_python_api_names_the_admin_address(tmp_path: Path) -> None:
    import functools

    import dbproxy

    async with trio.open_nursery() as nursery:
        echo_port = await nursery.start(echo_server)
        path = tmp_path / "proxy.json"
        path.write_text(json.dumps(config(tmp_path, echo_port)))
        running = await nursery.start(functools.partial(dbproxy.serve, str(path), registry=registry()))
        host, port = running.admin_address
        assert host == "127.0.0.1" and port > 0
        status, _, body = await http_get((host, port), "/healthz")
        assert status == 200 and orjson.loads(body)["listeners"][0]["name"] == "lines"
        running.stop()
        await wait_until(lambda: not running._server.listening)
        nursery.cancel_scope.cancel()


def test_relays_that_count_bytes_only_are_counted():
    """SSH and Telnet hand the core a relay whose statistics count bytes, not messages: their
    sessions' totals are counted, and the session's own end (its recordings' hashes) is not disturbed."""
    from types import SimpleNamespace

    from dbproxy.metrics import pipeline_counts

    class Relay:
        def statistics(self):
            return SimpleNamespace(bytes_in=10, bytes_out=12), SimpleNamespace(bytes_in=7, bytes_out=7)

    assert pipeline_counts(Relay()) == [(10, 0), (7, 0)]
