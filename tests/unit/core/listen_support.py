"""Tiny engines for the listener-kind tests, and an in-process ProxyServer running them.

The engines use only the public entry points (``handle_connection``,
``handle_datagram_session``, ``handle_http_request``); the server is the real
``ProxyServer`` on real loopback sockets, with its audit trail in a JSONL file
so tests see the same session accounting as the database engines get.
"""

from __future__ import annotations

import json
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import trio

from dbproxy.config import load_config
from dbproxy.engine import Engine, EngineRegistry
from dbproxy.listen import HTTPResponse
from dbproxy.server import ProxyServer


class _TestEngine(Engine):
    auth_methods = ("none",)


class EchoDatagramEngine(_TestEngine):
    """UDP: answers each datagram with ``<session id> <n>:<datagram>``.

    ``crash`` raises; ``hold:<seconds>`` stops reading for that long; ``bye`` ends the session.
    """

    protocol = "udpecho"
    listener_kinds = ("udp",)

    async def handle_datagram_session(self, session: Any, channel: Any) -> None:
        session.audit.on_session_start(success=True)
        n = 0
        async for data in channel:
            n += 1
            if data == b"crash":
                raise RuntimeError("the test engine crashed on purpose")
            if data == b"bye":
                session.details["end_reason"] = "bye"
                return
            if data.startswith(b"hold:"):
                await trio.sleep(float(data[5:]))
            await channel.send(f"{session.id} {n}:".encode() + data)


class KeyedDatagramEngine(EchoDatagramEngine):
    """UDP keyed by the datagram's first byte as well as the peer (as IPMI keys on its session id)."""

    protocol = "udpkeyed"

    @staticmethod
    def datagram_session_key(data: bytes, peer: tuple) -> Any:
        if data == b"!":
            return [data]  # a buggy key function: unhashable
        return (peer, data[:1]) if data else None


class LineEngine(_TestEngine):
    """TCP/TLS: greets with the client certificate's CN (or "-") and echoes lines."""

    protocol = "line"
    listener_kinds = ("tcp", "tls")

    async def handle_connection(self, session: Any, stream: Any) -> None:
        session.audit.on_session_start(success=True)
        cert = stream.getpeercert() if hasattr(stream, "getpeercert") else None
        cn = "-"
        for rdn in (cert or {}).get("subject", ()):
            for key, value in rdn:
                if key == "commonName":
                    cn = value
        await stream.send_all(f"hello {cn} tls={bool(session.details.get('client_tls'))}\n".encode())
        while data := await stream.receive_some(65536):
            await stream.send_all(data)


class WebEngine(_TestEngine):
    """HTTP: a few paths exercising the request/response API."""

    protocol = "web"
    listener_kinds = ("http",)

    async def handle_http_request(self, session: Any, request: Any) -> HTTPResponse:
        if not session.started:
            session.audit.on_session_start(success=True)
        session.details["requests"] = session.details.get("requests", 0) + 1
        if request.path == "/echo":
            body = await request.read()
            return HTTPResponse.json(200, {
                "method": request.method, "length": len(body), "sha": __import__("hashlib").sha256(body).hexdigest(),
                "session": session.id, "n": session.details["requests"],
                "te": request.header("transfer-encoding"), "query": request.query,
            })
        if request.path == "/stream":
            async def chunks():
                for i in range(3):
                    yield f"part{i};".encode()
            return HTTPResponse(200, (("content-type", "text/plain"),), chunks())
        if request.path == "/big":  # 64 MiB, more than any socket buffer holds
            async def big():
                for _ in range(64):
                    yield bytes(1024 * 1024)
            return HTTPResponse(200, (), big())
        if request.path == "/boom":
            raise RuntimeError("the test handler failed on purpose")
        if request.path == "/cert":
            cert = request.peer_certificate or {}
            cn = [v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"]
            return HTTPResponse.json(200, {"tls": request.tls, "cn": cn[0] if cn else None, "session": session.id})
        return HTTPResponse.json(404, {"error": "no such path", "path": request.path})


class DialectWebEngine(WebEngine):
    """HTTP with its own error dialect for the core's errors (as Redfish renders its error object)."""

    protocol = "webdialect"

    @staticmethod
    def render_http_error(status: int, message: str) -> HTTPResponse:
        return HTTPResponse.json(status, {"error": {"code": "Base.1.0.GeneralError", "message": message,
                                                    "@Message.ExtendedInfo": [{"HttpStatus": status}]}})


def registry() -> EngineRegistry:
    reg = EngineRegistry()
    for cls in (EchoDatagramEngine, KeyedDatagramEngine, LineEngine, WebEngine, DialectWebEngine):
        reg.register(cls.protocol, cls)
    return reg


def listener(name: str, protocol: str, **extra: Any) -> dict:
    return {"name": name, "protocol": protocol, "listen": "127.0.0.1:0",
            "routes": [{"backend": {"address": "127.0.0.1:1", "auth": {"method": "none"}}}], **extra}


class Running:
    def __init__(self, server: ProxyServer, audit_path: Path) -> None:
        self.server = server
        self.audit_path = audit_path
        self.ports = {b.name: b.port for b in server.bound}

    def udp(self, name: str) -> Any:
        return self.server.services.extras["datagram_listeners"][name]

    def events(self) -> list[dict]:
        if not self.audit_path.exists():
            return []
        return [orjson.loads(line) for line in self.audit_path.read_bytes().splitlines() if line.strip()]


@asynccontextmanager
async def running(tmp_path: Path, listeners: list[dict], **top: Any):
    """A real ProxyServer with the test engines; stopped (and its audit written) on exit."""
    audit_path = tmp_path / "audit.jsonl"
    doc = {"listeners": listeners, "shutdown_grace_seconds": 1,
           "audit": {"worker": False, "sinks": [{"type": "jsonl", "path": str(audit_path)}]}, **top}
    path = tmp_path / "listen.json"
    path.write_text(json.dumps(doc))
    server = ProxyServer(load_config(str(path), registry()), registry())
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        # The listeners' tasks start just after run() reports its bound addresses.
        udp_names = {lst["name"] for lst in listeners if lst.get("kind") == "udp"}
        await wait_until(lambda: udp_names <= set(server.services.extras.get("datagram_listeners", {})))
        run = Running(server, audit_path)
        try:
            yield run
        finally:
            server.stop()


async def wait_until(predicate: Any, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)
