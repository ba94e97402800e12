"""The proxy's HTTP/1.1 client toward one BMC, and its login (Basic, or a Redfish session it holds).

Strategy.  One ``BmcConnection`` per client session: an ``h11.Connection``
(CLIENT) over a trio stream (TLS per the route's ``tls``), kept alive
between requests and reopened when the BMC closed it (h11's
``MUST_CLOSE``, a reset, or a stale keep-alive connection failing before
any response byte: then the request is sent again once on a fresh
connection when its body can be replayed).  Bodies stream in both
directions: ``request(...)`` sends the head and the body chunks as they
come, ``Exchange.body()`` yields the response's.

Login (``BmcLogin``, one per route, shared by the route's sessions):
``basic`` adds ``Authorization: Basic`` to every request; ``session``
creates a Redfish session (DSP0266 §13.3.4: POST
``/redfish/v1/SessionService/Sessions`` with ``UserName``/``Password``;
the ``X-Auth-Token`` response header is the session's credential, its
``Location`` the session's URI), reuses it for every request of every
client session, and creates a new one when the BMC answers 401 (the
session timed out or was deleted) — under one lock, so concurrent sessions
make one login, not many.  The token and the password stay here: neither
is logged nor audited, and ``codec`` strips them from what the client sees.
"""

from __future__ import annotations

import base64
import logging
import ssl
from typing import Any, AsyncIterable, AsyncIterator

import attrs
import h11
import orjson
import trio

from dbproxy.errors import UpstreamError
from dbproxy.net import connect_backend
from dbproxy.tls import client_context

log = logging.getLogger("dbproxy.redfish")

READ_SIZE = 65536
MAX_RESPONSE_HEAD = 64 * 1024
SESSIONS_PATH = "/redfish/v1/SessionService/Sessions"


class BmcError(UpstreamError):
    """The BMC is unreachable, or broke the HTTP exchange (the client gets 502)."""


class _Stale(Exception):
    """The reused connection failed before any response byte: safe to retry on a new one."""


@attrs.define(eq=False)
class Exchange:
    """One request's response: ``status``, ``headers`` (as h11 gives them), then ``body()`` once."""

    conn: "BmcConnection"
    status: int
    headers: list[tuple[bytes, bytes]]

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    async def body(self) -> AsyncIterator[bytes]:
        async for chunk in self.conn._response_body():
            yield chunk

    async def read(self, limit: int) -> tuple[bytes, bool]:
        """Up to ``limit`` bytes of the body (all of it when it fits: True)."""
        parts, size = [], 0
        async for chunk in self.body():
            parts.append(chunk)
            size += len(chunk)
            if size > limit:
                return b"".join(parts), False
        return b"".join(parts), True

    async def discard(self) -> None:
        async for _ in self.body():
            pass


@attrs.define(eq=False)
class BmcConnection:
    host: str
    port: int
    tls: Any  # dbproxy.configtypes.BackendTLS
    ssl_context: ssl.SSLContext | None = None
    stream: Any = None
    h11: h11.Connection | None = None
    requests: int = 0
    reused: bool = False
    via: str | None = None  # "agent:NODE": dialled through an agent (dbproxy.net)

    @property
    def authority(self) -> str:
        return f"{self.host}:{self.port}"

    async def _open(self) -> None:
        await self.aclose()
        try:
            stream = await connect_backend(self.host, self.port, via=self.via)
        except UpstreamError as exc:
            raise BmcError(f"BMC {self.authority} unreachable: {exc}", kind="connect",
                           client_hint="the BMC is unreachable" if self.via is None else exc.client_hint) from None
        if self.tls.mode != "disable":
            ctx = self.ssl_context or client_context(self.tls)
            stream = trio.SSLStream(stream, ctx, server_hostname=self.tls.server_name or self.host,
                                    https_compatible=True)
            try:
                await stream.do_handshake()
            except (ssl.SSLError, ssl.CertificateError, trio.BrokenResourceError) as exc:
                raise BmcError(f"TLS handshake with BMC {self.authority} failed: {exc.__cause__ or exc}", kind="tls",
                               client_hint="the proxy could not establish a verified TLS connection to the BMC") from None
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD)
        self.reused = False

    async def aclose(self) -> None:
        if self.stream is not None:
            stream, self.stream, self.h11 = self.stream, None, None
            await trio.aclose_forcefully(stream)

    def _ready(self) -> bool:
        conn = self.h11
        if conn is None:
            return False
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        return conn.our_state is h11.IDLE and conn.their_state is h11.IDLE

    async def request(self, method: str, target: str, headers: list[tuple[str, str]],
                      body: bytes | AsyncIterable[bytes] | None, length: int | None = None) -> Exchange:
        """Send a request and read the response head.  ``body``: bytes (replayable: sent with
        Content-Length, retried once on a stale connection), an async iterator (streamed: with
        ``length`` as its Content-Length, else chunked), or None."""
        for attempt in (0, 1):
            if not self._ready():
                await self._open()
            reused = self.reused
            try:
                return await self._exchange(method, target, headers, body, reused, length)
            except _Stale:
                await self.aclose()
                if attempt or not isinstance(body, (bytes, type(None))):
                    raise BmcError(f"BMC {self.authority} closed the connection", kind="connect",
                                   client_hint="the BMC closed the connection") from None
        raise AssertionError("unreachable")

    async def _exchange(self, method: str, target: str, headers: list[tuple[str, str]],
                        body: bytes | AsyncIterable[bytes] | None, reused: bool, length: int | None) -> Exchange:
        conn = self.h11
        assert conn is not None
        hdrs = list(headers)
        if isinstance(body, bytes):
            hdrs.append(("content-length", str(len(body))))
        elif body is not None:
            hdrs.append(("content-length", str(length)) if length is not None else ("transfer-encoding", "chunked"))
        got_bytes = False
        try:
            data = conn.send(h11.Request(method=method, target=target, headers=hdrs))
            if isinstance(body, bytes):
                if body:
                    data += conn.send(h11.Data(data=body))
                data += conn.send(h11.EndOfMessage())
                await self.stream.send_all(data)
            elif body is None:
                await self.stream.send_all(data + conn.send(h11.EndOfMessage()))
            else:
                await self.stream.send_all(data)
                async for chunk in body:
                    if chunk:
                        await self.stream.send_all(conn.send(h11.Data(data=chunk)))
                await self.stream.send_all(conn.send(h11.EndOfMessage()))
            self.requests += 1
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    chunk = await self.stream.receive_some(READ_SIZE)
                    got_bytes = got_bytes or bool(chunk)
                    conn.receive_data(chunk)
                    continue
                if isinstance(event, h11.InformationalResponse):
                    continue  # 100 Continue and the like (RFC 9110 §15.2)
                if isinstance(event, h11.Response):
                    self.reused = True
                    return Exchange(self, event.status_code, list(event.headers))
                if isinstance(event, h11.ConnectionClosed):
                    if reused and not got_bytes:
                        raise _Stale()
                    raise BmcError(f"BMC {self.authority} closed the connection without a response", kind="protocol",
                                   client_hint="the BMC closed the connection without a response")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            await self.aclose()
            if reused and not got_bytes:
                raise _Stale() from None
            raise BmcError(f"BMC {self.authority}: connection lost: {exc.__cause__ or exc}", kind="connect",
                           client_hint="the connection to the BMC was lost") from None
        except h11.ProtocolError as exc:
            await self.aclose()
            if reused and not got_bytes:
                # h11 reports the BMC's close before any response byte as a protocol error (the peer
                # closed in SEND_RESPONSE): on a kept-alive connection that is the idle close race.
                raise _Stale() from None
            raise BmcError(f"BMC {self.authority} sent a malformed response: {exc}", kind="protocol",
                           client_hint="the BMC sent a malformed response") from None

    async def _response_body(self) -> AsyncIterator[bytes]:
        conn = self.h11
        if conn is None:
            return
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await self.stream.receive_some(READ_SIZE))
                elif isinstance(event, h11.Data):
                    yield bytes(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    return
                else:
                    raise BmcError(f"BMC {self.authority} ended the response early", kind="protocol",
                                   client_hint="the BMC ended the response early")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, h11.ProtocolError) as exc:
            await self.aclose()
            raise BmcError(f"BMC {self.authority}: response body lost: {exc}", kind="protocol",
                           client_hint="the BMC's response was cut off") from None


class BmcLogin:
    """The proxy's credential for one route's BMC (see the module docstring)."""

    def __init__(self, method: str, username: str, password: str) -> None:
        self.method = method
        self._username = username
        self._password = password
        self._token: str | None = None
        self._session_uri: str | None = None
        self._lock = trio.Lock()
        self.logins = 0  # sessions created (statistics; tests)

    def __repr__(self) -> str:  # never the secrets
        return f"BmcLogin({self.method!r}, user={self._username!r})"

    @property
    def username(self) -> str:
        return self._username

    def headers(self) -> list[tuple[str, str]]:
        if self.method == "basic":
            raw = f"{self._username}:{self._password}".encode()
            return [("authorization", "Basic " + base64.b64encode(raw).decode("ascii"))]
        if self._token is None:
            return []
        return [("x-auth-token", self._token)]

    @property
    def token(self) -> str | None:
        return self._token

    async def ensure(self, conn: BmcConnection, *, stale: str | None = None) -> None:
        """Have a session token (``session`` method); ``stale``: the token the BMC just refused —
        replaced unless another request already did."""
        if self.method != "session":
            return
        async with self._lock:
            if self._token is not None and self._token != stale:
                return
            self._token = None
            body = orjson.dumps({"UserName": self._username, "Password": self._password})
            exchange = await conn.request("POST", SESSIONS_PATH, [("host", conn.authority),
                                                                 ("content-type", "application/json"),
                                                                 ("accept", "application/json")], body)
            text, _ = await exchange.read(64 * 1024)
            token = exchange.header(b"x-auth-token")
            if exchange.status not in (200, 201) or not token:
                from .codec import bmc_message

                why = bmc_message(text) or f"HTTP {exchange.status}"
                raise BmcError(f"BMC {conn.authority} refused the proxy's session login as {self._username!r}: {why}",
                               kind="auth", client_hint="the BMC refused the proxy's login")
            self._token = token.decode("latin-1")
            location = exchange.header(b"location")
            self._session_uri = location.decode("latin-1") if location else None
            self.logins += 1
            log.info("BMC %s: the proxy opened a Redfish session as %r", conn.authority, self._username)
