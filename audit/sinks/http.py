"""HTTP sink: batched JSON POSTs, Splunk-HEC style or newline-delimited JSON.

Formats (one spooled payload per event; a batch is the payloads joined by
newlines, as both receivers accept):

* ``hec`` — Splunk HTTP Event Collector (``/services/collector/event``):
  each event wrapped as ``{"time": <epoch seconds>, "host", "source",
  "sourcetype", "index"?, "event": {...}}``; ``Authorization: Splunk <token>``.
* ``ndjson`` — the bare event JSON per line (Elasticsearch-bulk-like
  ingest pipelines, Vector/Fluent Bit/Logstash ``http`` inputs, generic
  webhooks); ``Authorization: Bearer <token>`` when a token is set.

The body is gzip-compressed (``Content-Encoding: gzip``) unless ``gzip`` is
false.  HTTP/1.1 is spoken with h11 (sans-IO) over a trio stream, TLS
verified against ``ca_file`` or the system store.  Connections are kept
alive between batches, and up to ``max_in_flight`` batches are posted at
once, each on its own kept-alive connection from a small pool (the spooled
base's pipelined sender: batches are read from the spool in order and the
spool cursor moves in order, only as every earlier batch is confirmed).
With ``max_in_flight`` 1 (the default) batches arrive in ``seq`` order; with
more, a receiver may get a later batch before an earlier one (each event
carries its ``seq``), and after a failure the batches behind the failed one
are posted again, so a receiver may see those twice.  2xx commits the batch; 408, 429 and 5xx — and any
connection error — are retried by the spooled base with exponential backoff
(honouring ``Retry-After``); 413 splits the batch in halves; any other 4xx
is a configuration problem (bad token, wrong URL): logged as an error and
retried at the longest backoff, never dropped.  The token is never logged.
"""

from __future__ import annotations

import datetime as _dt
import gzip as _gzip
import logging
import socket
import ssl
from typing import Any
from urllib.parse import urlsplit

import h11
import orjson
import trio

from .spooled import DeliveryFailed, SpooledSink, reason

log = logging.getLogger("dbproxy.audit.http")

FORMATS = ("hec", "ndjson")
USER_AGENT = "dbproxy-audit/0.1"
MAX_RESPONSE = 1024 * 1024
RETRYABLE = {408, 429}


def _epoch(iso: str | None) -> float:
    if not iso:
        return _dt.datetime.now(_dt.timezone.utc).timestamp()
    return round(_dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp(), 6)


class HttpSink(SpooledSink):
    kind = "http"

    def __init__(
        self,
        *,
        url: str,
        format: str = "hec",
        token: Any = None,  # a SecretRef (read at each connect), or None
        gzip: bool = True,
        headers: dict[str, str] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        server_name: str | None = None,
        timeout_seconds: float = 10.0,
        hec_fields: dict[str, str] | None = None,
        max_in_flight: int = 1,
        **spool_kw: Any,
    ) -> None:
        super().__init__(**spool_kw)
        self.max_in_flight = max_in_flight
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.url = url
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.host_header = parts.netloc.rpartition("@")[2]
        self.format = format
        self.token = token
        self.gzip = gzip
        self.extra_headers = dict(headers or {})
        self.ssl_context = ssl_context or (ssl.create_default_context() if self.scheme == "https" else None)
        self.server_name = server_name or self.host
        self.timeout = timeout_seconds
        fields = dict(hec_fields or {})
        fields.setdefault("host", socket.gethostname())
        fields.setdefault("source", "dbproxy")
        fields.setdefault("sourcetype", "dbproxy:audit")
        self.hec_fields = fields
        self._pool: list[_Connection] = []  # idle kept-alive connections
        self._busy: set[_Connection] = set()
        self._slots: trio.Semaphore | None = None

    def encode(self, event: dict, line: bytes | None = None) -> bytes:
        raw = line.rstrip(b"\n") if line is not None else orjson.dumps(event)
        if self.format == "hec":
            # The event member is the stamped line itself (its hash covers these bytes).
            envelope = orjson.dumps({"time": _epoch(event.get("time")), **self.hec_fields})
            return b'%b,"event":%b}' % (envelope[:-1], raw)
        return raw

    # -- connections ---------------------------------------------------------------
    async def _connect(self) -> "_Connection":
        try:
            with trio.fail_after(self.timeout):
                stream = await trio.open_tcp_stream(self.host, self.port)
                if self.scheme == "https":
                    stream = trio.SSLStream(stream, self.ssl_context, server_hostname=self.server_name, https_compatible=True)
                    await stream.do_handshake()
        except trio.TooSlowError:
            raise DeliveryFailed(f"connect to {self.host}:{self.port} timed out") from None
        except (OSError, trio.BrokenResourceError) as exc:
            raise DeliveryFailed(f"connect to {self.host}:{self.port}: {reason(exc)}") from None
        return _Connection(stream, h11.Connection(h11.CLIENT))

    async def disconnect(self) -> None:
        conns, self._pool = self._pool + list(self._busy), []
        self._busy.clear()
        for conn in conns:
            await trio.aclose_forcefully(conn.stream)

    def _headers(self, body: bytes) -> list[tuple[str, str]]:
        headers = [
            ("Host", self.host_header),
            ("User-Agent", USER_AGENT),
            ("Content-Type", "application/json" if self.format == "hec" else "application/x-ndjson"),
            ("Content-Length", str(len(body))),
        ]
        if self.gzip:
            headers.append(("Content-Encoding", "gzip"))
        if self.token is not None:
            scheme = "Splunk" if self.format == "hec" else "Bearer"
            headers.append(("Authorization", f"{scheme} {self.token.reveal()}"))
        headers.extend(self.extra_headers.items())
        return headers

    # -- delivery --------------------------------------------------------------------
    pipelined = True

    async def submit(self, payloads: list[bytes], nursery: trio.Nursery) -> Any:
        if self._slots is None:
            self._slots = trio.Semaphore(self.max_in_flight)
        await self._slots.acquire()
        ticket = _Ticket()
        nursery.start_soon(self._post_task, payloads, ticket)
        return ticket

    async def _post_task(self, payloads: list[bytes], ticket: "_Ticket") -> None:
        try:
            await self.deliver(payloads)
        except Exception as exc:  # noqa: BLE001 - handed to confirm, which reports it like any failure
            ticket.error = exc
        finally:
            self._slots.release()
            ticket.done.set()

    async def confirm(self, ticket: Any) -> None:
        await ticket.done.wait()
        if ticket.error is not None:
            raise ticket.error

    async def deliver(self, payloads: list[bytes]) -> None:
        body = b"\n".join(payloads) + b"\n"
        if self.gzip:
            body = await trio.to_thread.run_sync(_gzip.compress, body, 6)
        status, reason, retry_after, text = await self._post(body)
        if 200 <= status < 300:
            return
        if status == 413 and len(payloads) > 1:
            half = len(payloads) // 2
            log.warning("audit sink %s: %d events too large for the receiver (413); splitting", self.name, len(payloads))
            await self.deliver(payloads[:half])
            try:
                await self.deliver(payloads[half:])
            except DeliveryFailed as exc:
                raise DeliveryFailed(str(exc), retry_after=exc.retry_after, delivered=half + exc.delivered) from None
            return
        detail = f"HTTP {status} {reason}" + (f": {text[:200]}" if text else "")
        if status >= 500 or status in RETRYABLE:
            raise DeliveryFailed(detail, retry_after=retry_after)
        log.error("audit sink %s: the receiver refused the batch (%s); check url/token; retrying", self.name, detail)
        raise DeliveryFailed(detail, retry_after=self.retry_max)

    async def _post(self, body: bytes) -> tuple[int, str, float | None, str]:
        for attempt in (1, 2):
            fresh = not self._pool
            conn = self._pool.pop() if self._pool else await self._connect()
            self._busy.add(conn)
            keep = False
            try:
                with trio.fail_after(self.timeout):
                    result, keep = await self._exchange(conn, body)
                    return result
            except trio.TooSlowError:
                raise DeliveryFailed(f"no answer from {self.url} within {self.timeout:.0f}s") from None
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, h11.ProtocolError) as exc:
                # A kept-alive connection the server closed meanwhile: one retry on a fresh one.
                if fresh or attempt == 2:
                    raise DeliveryFailed(f"POST {self.url}: {reason(exc)}") from None
            finally:
                self._busy.discard(conn)
                if keep:
                    self._pool.append(conn)
                else:
                    with trio.CancelScope(shield=True):
                        await trio.aclose_forcefully(conn.stream)
        raise AssertionError("unreachable")

    async def _exchange(self, c: "_Connection", body: bytes) -> tuple[tuple[int, str, float | None, str], bool]:
        """One request/response; returns the answer and whether the connection can be reused."""
        conn = c.h11
        stream = c.stream
        data = conn.send(h11.Request(method="POST", target=self.target, headers=self._headers(body)))
        data += conn.send(h11.Data(data=body))
        data += conn.send(h11.EndOfMessage())
        await stream.send_all(data)
        response = None
        chunks: list[bytes] = []
        size = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                received = await stream.receive_some(65536)
                conn.receive_data(received)
                continue
            if isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                if size < MAX_RESPONSE:
                    chunks.append(bytes(event.data))
                    size += len(event.data)
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise trio.BrokenResourceError("connection closed before the response ended")
            elif isinstance(event, h11.InformationalResponse):
                continue
        assert response is not None
        retry_after = None
        for name, value in response.headers:
            if name == b"retry-after":
                try:
                    retry_after = float(value)
                except ValueError:
                    pass
        keep = conn.our_state is h11.DONE and conn.their_state is h11.DONE
        if keep:
            conn.start_next_cycle()
        text = b"".join(chunks).decode("utf-8", "replace").strip()
        return (response.status_code, response.reason.decode("latin-1"), retry_after, text), keep


class _Connection:
    __slots__ = ("stream", "h11")

    def __init__(self, stream: Any, conn: h11.Connection) -> None:
        self.stream = stream
        self.h11 = conn


class _Ticket:
    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.error: Exception | None = None
