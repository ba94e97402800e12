"""The core session flow (dbproxy.flow) with a tiny line-protocol engine that uses only the public hooks.

The worked example of "adding a protocol": ``LineEngine`` below is a whole
engine — a codec (lines), a handshake (``HELLO <user> <target>``), a backend
login, a stage, its errors in its own wire format (``ERR …``).  The core does
the rest: timeouts, routing, refusals audited and rendered, the pipeline and
the end statistics.  There is no real server for this toy protocol, so its
"backend" is the other end of an in-memory stream.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from dbproxy import flow
from dbproxy.buffer import ReceiveBuffer
from dbproxy.channel import MessageStream
from dbproxy.config import AuthConfig, BackendConfig, BackendTLS, ListenerConfig, RouteConfig
from dbproxy.engine import Engine, Services
from dbproxy.errors import ProxyError, RemoteProtocolError, UpstreamError
from dbproxy.sansio import NEED_DATA
from dbproxy.session import Session


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


class CountLines:
    name = "count-lines"

    def __init__(self) -> None:
        self.count = 0

    def handle(self, msg: Any, ctx: Any) -> None:
        self.count += 1


class LineEngine(Engine):
    protocol = "line"
    match_keys = ("user", "target")

    def __init__(self, listener: Any, services: Any, backends: dict) -> None:
        super().__init__(listener, services)
        self.backends = backends  # backend address -> the proxy's end of an in-memory stream

    def new_request(self, session: Any, stream: Any) -> flow.Request:
        return flow.Request(MessageStream(stream, LineDecoder()))

    async def handshake(self, session: Any, request: flow.Request) -> bool:
        words = bytes((await request.client.receive()).raw).split()
        if len(words) != 3 or words[0] != b"HELLO":
            raise RemoteProtocolError("no HELLO", client_hint="expected HELLO <user> <target>")
        request.login, request.target = words[1].decode(), words[2].decode()
        request.keys = {"user": request.login, "target": request.target}
        request.start_fields = {"greeting": "HELLO"}
        return True

    async def connect_backend(self, session: Any, request: flow.Request, route: Any, grant: Any) -> flow.Backend:
        if route.backend.host == "down":
            raise UpstreamError("backend down:1 refused the connection", kind="connect", client_hint="backend unreachable")
        if route.backend.host == "slow":
            await trio.sleep_forever()
        return flow.Backend(self.backends[route.backend.address], LineDecoder(), start_fields={"backend_ok": True})

    async def ready(self, session: Any, request: flow.Request, backend: flow.Backend) -> None:
        await request.client.send(b"OK\n")

    def wiring(self, session: Any, request: flow.Request, backend: flow.Backend, grant: Any) -> flow.Wiring:
        # A read-only observer, no active stage; no TapPlan, so the core runs it inline.
        request.extra = CountLines()
        return flow.Wiring(request.client.decoder, backend.decoder, [], [], None,
                           lambda exc: b"ERR " + str(exc).encode() + b"\n", client_observers=[request.extra])

    async def session_ended(self, session: Any, request: flow.Request, backend: flow.Backend, wiring: Any, pipeline: Any) -> dict:
        return {"lines": request.extra.count}

    def render_error(self, request: flow.Request, exc: ProxyError) -> bytes:
        if isinstance(exc, flow.Refused):
            return b"ERR " + exc.client_message.encode() + b"\n"
        return b"ERR protocol: " + getattr(exc, "client_hint", str(exc)).encode() + b"\n"


class ListAudit:
    """A session's audit surface, collecting events (the recorder is tested elsewhere)."""

    can_tap = False

    def __init__(self, session: Session) -> None:
        self.session = session
        self.events: list[dict] = []
        self._pending: list = []

    def emit(self, kind: str, **fields: Any) -> dict:
        self.events.append({"event": kind, **fields})
        return fields

    def on_session_start(self, *, success: bool, error: str | None = None, **fields: Any) -> dict:
        if success:
            self.session.started = True
        return self.emit("db.session.start", success=success, error=error, **fields)

    async def flush(self) -> None:
        pass


def route(name: str, host: str, **match: str) -> RouteConfig:
    backend = BackendConfig(host=host, port=1, database=None, user=None, auth=AuthConfig("none"), tls=BackendTLS())
    return RouteConfig(name=name, match=match, backend=backend)


ROUTES = (route("up", "up", user="alice"), route("down", "down", user="dave"), route("slow", "slow", user="sam"))


async def converse(sent: bytes, *, handshake_timeout: float | None = None, backend_talk=None) -> tuple[bytes, Session]:
    """Run one session of the line engine: the client sends ``sent`` (then, with a backend, a ping
    after the proxy's OK); returns what it received."""
    listener = ListenerConfig(name="lines", protocol="line", host="127.0.0.1", port=0, tls=None, routes=ROUTES,
                              handshake_timeout=handshake_timeout)
    proxy_side, backend_side = trio.testing.memory_stream_pair()
    engine = LineEngine(listener, Services(recorder=None), {"up:1": proxy_side})
    client, server = trio.testing.memory_stream_pair()
    session = Session(listener="lines", protocol="line", client_addr="test")
    session.audit = ListAudit(session)
    received = b""

    async def serve() -> None:  # as the server does: the client stream closes after the session
        await engine.handle_connection(session, server)
        await server.aclose()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            if backend_talk is not None:
                nursery.start_soon(backend_talk, backend_side)
            await client.send_all(sent)
            if backend_talk is not None:
                while b"OK\n" not in received:
                    received += await client.receive_some()
                await client.send_all(b"ping\n")
                while b"pong" not in received:
                    received += await client.receive_some()
                await client.aclose()
            else:
                while chunk := await client.receive_some():
                    received += chunk
    return received, session


async def test_a_session_runs_through_the_core_flow() -> None:
    async def backend(stream: Any) -> None:
        assert await stream.receive_some() == b"ping\n"
        await stream.send_all(b"pong\n")

    received, session = await converse(b"HELLO alice db1\n", backend_talk=backend)
    assert received == b"OK\npong\n"
    assert (session.family, session.target, session.login, session.route_name) == ("database", "db1", "alice", "up")
    assert (session.db_name, session.db_user) == ("db1", "alice")
    [start] = session.audit.events
    assert start == {"event": "db.session.start", "success": True, "error": None, "greeting": "HELLO", "backend_ok": True}
    end = session.details["end_fields"]
    assert end == {"bytes_from_client": len(b"ping\n"), "bytes_to_client": len(b"pong\n"), "lines": 1}


@pytest.mark.parametrize(
    ("hello", "answer", "error"),
    [
        (b"HELLO bob db1\n", b"ERR no route on listener lines for {'user': 'bob', 'target': 'db1'}\n",
         "no route on listener lines for {'user': 'bob', 'target': 'db1'}"),
        (b"HELLO dave db1\n", b"ERR backend unreachable\n", "backend down:1 refused the connection"),
        (b"HELLO sam db1\n", b"ERR the backend database at slow:1 did not answer in time\n",
         "backend slow:1 did not complete login within 0s"),
    ],
)
async def test_refusals_are_audited_and_answered_in_the_engines_wire_format(monkeypatch, hello, answer, error) -> None:
    monkeypatch.setattr(flow, "CONNECT_TIMEOUT", 0.2)
    received, session = await converse(hello)
    assert received == answer
    [start] = session.audit.events
    assert start["success"] is False and start["error"] == error and start["greeting"] == "HELLO"
    assert not session.started


async def test_a_protocol_error_in_the_handshake_is_answered_not_audited() -> None:
    received, session = await converse(b"GARBAGE\n")
    assert received == b"ERR protocol: expected HELLO <user> <target>\n"
    assert session.audit.events == []


async def test_a_stalled_handshake_is_audited_as_timed_out() -> None:
    received, session = await converse(b"HEL", handshake_timeout=0.1)
    assert received == b""
    [start] = session.audit.events
    assert start["success"] is False and start["error"] == "client handshake timed out"
    assert start["timeout_seconds"] == 0.1
