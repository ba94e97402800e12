"""HTTP/1.1 listeners: the core parses, the engine answers requests.

Strategy: one ``h11.Connection`` (sans-IO) per client connection, driven by
one loop that reads the socket only when h11 says ``NEED_DATA``.  Each
request becomes an ``HTTPRequest`` whose body is *streamed*: the engine
pulls it (``async for chunk in request.body()``, or ``await request.read()``
for the whole of it) — nothing is read ahead.  The engine returns an
``HTTPResponse``: status, headers, and a body of bytes (sent with
Content-Length) or an async iterator of chunks (chunked on HTTP/1.1,
close-delimited on 1.0: h11 chooses, RFC 9112 §6.1).  Keep-alive: after a
response the connection waits for the next request unless either side said
``Connection: close`` or a request's body could not be read to its end.

Bounds: the request head is at most ``max_header_bytes`` (h11 answers 431
past it); the body at most ``max_body_bytes`` (a larger Content-Length is
refused with 413 before any body byte is read; a chunked body that grows past
it gets 413 and the connection closes); ``request.read()`` charges what it
accumulates to the process's ``BufferBudget`` (503 when the budget is spent);
``request_timeout`` runs from a request's first byte to its last (408), and
``keepalive_timeout`` closes an idle connection quietly (a new connection
has ``request_timeout`` to begin its first request) and bounds each write to
a client that stopped reading.  The handler's own time is the engine's to
bound (its backend calls have their timeouts).

Errors the core produces are proper responses (``Connection: close``): 400
for a malformed request (h11's ``RemoteProtocolError`` and its status hint),
408, 413, 431, 503.  A handler's exception becomes 500 with a JSON error
body and a log line with the traceback; the connection survives for the next
request when the request's body was read to its end.  Engines may render the
core's errors in their own dialect (``render_http_error(status, message)``,
e.g. Redfish's error object); the default is ``{"error": {"code", "message"}}``.
"""

from __future__ import annotations

import logging
from typing import Any, AsyncIterable, AsyncIterator

import attrs
import h11
import orjson
import trio

from ..errors import BufferBudgetExceeded

log = logging.getLogger("dbproxy.listen.http")

READ_SIZE = 65536

REASONS = {400: b"Bad Request", 404: b"Not Found", 408: b"Request Timeout", 413: b"Content Too Large",
           431: b"Request Header Fields Too Large", 500: b"Internal Server Error", 503: b"Service Unavailable"}


class HTTPError(Exception):
    """An error the core answers itself (status + message); raised into a handler that reads the body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _Idle(Exception):
    """The connection stayed idle between requests past keepalive_timeout (closed without a response)."""


@attrs.frozen
class HTTPResponse:
    status: int
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes | AsyncIterable[bytes] = b""

    @classmethod
    def json(cls, status: int, value: Any, headers: tuple[tuple[str, str], ...] = ()) -> "HTTPResponse":
        return cls(status, (("content-type", "application/json"), *headers), orjson.dumps(value))


def default_error(status: int, message: str) -> HTTPResponse:
    return HTTPResponse.json(status, {"error": {"code": status, "message": message}})


@attrs.define(eq=False)
class HTTPRequest:
    """One request.  ``headers`` as received (names lower-cased by h11, values bytes → str latin-1)."""

    method: str
    target: str
    http_version: str
    headers: tuple[tuple[str, str], ...]
    session: Any
    transport: Any  # the stream: trio.SSLStream when the listener terminates TLS (getpeercert())
    tls: bool
    _conn: "_HTTPConnection"
    _body_done: bool = False
    _body_bytes: int = 0

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def query(self) -> str:
        return self.target.partition("?")[2]

    def header(self, name: str) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return None

    @property
    def peer_certificate(self) -> dict | None:
        from ..identity.mtls import peer_certificate

        return peer_certificate(self.transport)

    async def body(self) -> AsyncIterator[bytes]:
        """The body's chunks as they arrive (de-chunked), at most ``max_body_bytes`` in all."""
        conn = self._conn
        limit = conn.options.max_body_bytes
        while not self._body_done:
            if conn.h11.they_are_waiting_for_100_continue:
                await conn.send(h11.InformationalResponse(status_code=100, headers=[]))
            event = await conn.next_event()
            if isinstance(event, h11.Data):
                self._body_bytes += len(event.data)
                if self._body_bytes > limit:
                    conn.body_refused = True
                    raise HTTPError(413, f"request body larger than {limit} bytes")
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self._body_done = True
            else:  # ConnectionClosed mid-body
                raise trio.BrokenResourceError("client closed the connection during the request body")

    async def read(self) -> bytes:
        """The whole body, charged to the buffer budget while the request runs."""
        parts: list[bytes] = []
        account = self._conn.account
        held = 0
        async for chunk in self.body():
            parts.append(chunk)
            held += len(chunk)
            if account is not None:
                try:
                    account.hold(held)
                except BufferBudgetExceeded:
                    self._conn.body_refused = True
                    raise HTTPError(503, "the proxy's buffer budget is spent; retry later") from None
        return b"".join(parts)


@attrs.define(eq=False)
class _HTTPConnection:
    stream: Any
    options: Any  # dbproxy.config.HttpOptions
    account: Any  # BudgetAccount | None
    h11: h11.Connection = attrs.field(init=False)
    deadline: float = attrs.field(init=False, default=float("inf"))
    in_request: bool = False  # a byte of the current request has arrived: request_timeout runs
    body_refused: bool = False

    def __attrs_post_init__(self) -> None:
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=self.options.max_header_bytes)

    def begin_cycle(self, first: bool) -> None:
        # A new connection gets request_timeout to start its first request (a connection that
        # sends nothing holds a session slot); between requests the keep-alive timeout applies.
        self.in_request = False
        self.body_refused = False
        wait = self.options.request_timeout if first else self.options.keepalive_timeout
        self.deadline = trio.current_time() + wait

    async def next_event(self) -> Any:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            if not self.in_request and self.h11.trailing_data[0]:
                self._request_started()
            with trio.move_on_at(self.deadline):
                data = await self.stream.receive_some(READ_SIZE)
                if data and not self.in_request:
                    self._request_started()
                self.h11.receive_data(data)
                continue
            if self.in_request:
                self.body_refused = True  # what is left of the request stays unread: the connection closes
                raise HTTPError(408, f"request not received within {self.options.request_timeout:g} s")
            raise _Idle

    def _request_started(self) -> None:
        self.in_request = True
        self.deadline = trio.current_time() + self.options.request_timeout

    async def send(self, *events: Any) -> None:
        """Send events in one write (a response's head and a bytes body: one segment, not two)."""
        data = b"".join([self.h11.send(event) or b"" for event in events])
        if data:
            # A client that stops reading must not hold the session forever: each write has to
            # make progress within the keep-alive timeout.
            with trio.move_on_after(self.options.keepalive_timeout) as cs:
                await self.stream.send_all(data)
            if cs.cancelled_caught:
                raise trio.BrokenResourceError(f"client read nothing for {self.options.keepalive_timeout:g} s")


async def serve_http(engine: Any, session: Any, stream: Any, options: Any, *, budget: Any = None, tls: bool = False,
                     refuse: str | None = None) -> None:
    """Serve requests on one connection until it closes.  ``refuse``: answer the first request 503 and close."""
    conn = _HTTPConnection(stream, options, budget.account() if budget is not None else None)
    render = getattr(engine, "render_http_error", None) or default_error
    requests = 0
    try:
        while True:
            conn.begin_cycle(first=requests == 0)
            try:
                event = await conn.next_event()
            except _Idle:
                return
            except h11.RemoteProtocolError as exc:
                await _send_error(conn, render, exc.error_status_hint, f"malformed request: {exc}")
                return
            except HTTPError as exc:
                await _send_error(conn, render, exc.status, exc.message)
                return
            if not isinstance(event, h11.Request):
                return  # ConnectionClosed between requests
            requests += 1
            # h11's max_incomplete_event_size bounds a head that is still arriving; one that came
            # whole in a single read is measured here, so the limit does not depend on read sizes.
            head_size = len(event.method) + len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers)
            if head_size > options.max_header_bytes:
                await _send_error(conn, render, 431, f"request head larger than {options.max_header_bytes} bytes")
                return
            request = HTTPRequest(
                method=event.method.decode("ascii"),
                target=event.target.decode("latin-1"),
                http_version=event.http_version.decode("ascii"),
                headers=tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers),
                session=session,
                transport=stream,
                tls=tls,
                conn=conn,
            )
            if refuse is not None:
                await _send_error(conn, render, 503, refuse)
                return
            length = request.header("content-length")
            if length is not None and int(length) > options.max_body_bytes:
                # Refused before any body byte is read; the unread body means the connection closes.
                await _send_error(conn, render, 413, f"request body larger than {options.max_body_bytes} bytes")
                return
            response = await _call_handler(engine, session, request, render)
            try:
                await _send_response(conn, request, response)
            finally:
                if conn.account is not None:
                    conn.account.release()
            if not await _finish_body(conn, request):
                return
            if conn.h11.our_state is not h11.DONE or conn.h11.their_state is not h11.DONE:
                return  # MUST_CLOSE on either side (Connection: close, HTTP/1.0)
            conn.h11.start_next_cycle()
    except HTTPError as exc:  # a request timeout or refusal while draining an unread body
        await _send_error(conn, render, exc.status, exc.message)
    except h11.RemoteProtocolError as exc:
        await _send_error(conn, render, exc.error_status_hint, f"malformed request: {exc}")
    finally:
        if conn.account is not None:
            conn.account.release()
        session.details.setdefault("end_fields", {})["http_requests"] = requests
        closed = getattr(engine, "http_connection_closed", None)
        if closed is not None:
            # The engine's per-connection state (a backend connection it keeps alive) ends with
            # the client's connection, also when the session is being cancelled.
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await closed(session)


async def _call_handler(engine: Any, session: Any, request: HTTPRequest, render: Any) -> HTTPResponse:
    try:
        response = await engine.handle_http_request(session, request)
        if not isinstance(response, HTTPResponse):
            raise TypeError(f"handle_http_request returned {type(response).__name__}, not HTTPResponse")
        return response
    except HTTPError as exc:
        return _closing(render(exc.status, exc.message)) if request._conn.body_refused else render(exc.status, exc.message)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        raise  # the client is gone: nothing to answer
    except Exception as exc:
        log.exception("session %s: %s %s: handler failed", session.id, request.method, request.path)
        return default_error(500, f"internal error: {exc.__class__.__name__}")


def _closing(response: HTTPResponse) -> HTTPResponse:
    return attrs.evolve(response, headers=(*response.headers, ("connection", "close")))


async def _send_response(conn: _HTTPConnection, request: HTTPRequest, response: HTTPResponse) -> None:
    body = response.body
    headers = list(response.headers)
    if isinstance(body, (bytes, bytearray, memoryview)) and not any(k.lower() == "content-length" for k, _ in headers):
        headers.append(("content-length", str(len(body))))
    try:
        head = h11.Response(status_code=response.status, headers=headers, reason=REASONS.get(response.status, b""))
    except h11.LocalProtocolError as exc:  # the handler built an invalid response (status or header)
        log.error("session %s: %s %s: invalid response: %s", request.session.id, request.method, request.path, exc)
        head = _head(default_error(500, "internal error: invalid response"))
        body = default_error(500, "internal error: invalid response").body
    if request.method == "HEAD":
        await conn.send(head, h11.EndOfMessage())
    elif isinstance(body, (bytes, bytearray, memoryview)):
        events = (head, h11.Data(data=body), h11.EndOfMessage()) if body else (head, h11.EndOfMessage())
        await conn.send(*events)
    else:
        await conn.send(head)
        async for chunk in body:  # an exception here leaves the response unfinished: the connection closes
            if chunk:
                await conn.send(h11.Data(data=chunk))
        await conn.send(h11.EndOfMessage())


def _head(response: HTTPResponse) -> h11.Response:
    assert isinstance(response.body, bytes)
    return h11.Response(status_code=response.status,
                        headers=[*response.headers, ("content-length", str(len(response.body)))],
                        reason=REASONS.get(response.status, b""))


async def _finish_body(conn: _HTTPConnection, request: HTTPRequest) -> bool:
    """Read what the handler left of the body so the next request can be parsed; False: close instead."""
    if conn.body_refused or conn.h11.their_state is h11.ERROR:
        return False
    async for _ in request.body():
        pass
    return True


async def _send_error(conn: _HTTPConnection, render: Any, status: int, message: str) -> None:
    """Answer with a core error and ``Connection: close`` when h11 still lets us answer."""
    if conn.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return  # a response is already under way: closing is all that is left
    response = _closing(render(status, message))
    try:
        await conn.send(_head(response) if isinstance(response.body, bytes) else h11.Response(
            status_code=status, headers=list(response.headers)))
        if isinstance(response.body, bytes):
            if response.body:
                await conn.send(h11.Data(data=response.body))
        else:
            async for chunk in response.body:
                await conn.send(h11.Data(data=chunk))
        await conn.send(h11.EndOfMessage())
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
        pass
