"""One HTTP/2 connection between the proxy and an agent, as trio streams: ``H2Link``.

Strategy: the h2 library (python-hyper, sans-IO) keeps the whole HTTP/2
state machine; this module is the only I/O around it, written once for both
roles.  The agent dials the proxy but is the h2 *server*; the proxy is the h2
*client* and opens one stream per backend connection with a CONNECT request
(RFC 9113 §8.5: ``:method CONNECT``, ``:authority host:port``, no ``:scheme``
or ``:path``); the agent answers ``:status 200`` and both sides then move raw
bytes as DATA frames, or answers 403/502 with a ``dbproxy-reason`` header.
Each stream is handed to its user as a ``trio.abc.HalfCloseableStream``
(``LinkStream``), so an engine uses it like a TCP socket.

Flow control is HTTP/2's own, credit based, per stream (RFC 9113 §5.2): a
stream's received bytes are acknowledged (``acknowledge_received_data``, which
lets h2 send WINDOW_UPDATE) only when its consumer takes them out of
``receive_some``.  A consumer that stops reading therefore stops its own
sender after ``STREAM_WINDOW`` bytes, and nothing else: the connection-level
window is opened to the maximum (2^31-1) at the start, so the sum of all
streams' windows never reaches it and a stalled stream cannot take credit
from the others.  A stream's buffer holds at most its window.

Tasks (``run``): a reader that never blocks on anything but the transport
(frames it produces — WINDOW_UPDATE, SETTINGS and PING acks — are written by
a writer task, so two peers both sending at full speed cannot deadlock with
both readers stuck in a write), the writer, and a heartbeat (PING, RFC 9113
§6.7) that declares the link lost when no ACK comes back in time.  Senders
(``LinkStream.send_all``) write their own frames under the one send lock, at
most the window h2 allows, and wait for WINDOW_UPDATE otherwise.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from typing import Any, Awaitable, Callable

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import trio

log = logging.getLogger("dbproxy.agent.link")

# Per stream: the most a stalled consumer makes its peer buffer, and what one stream may
# have in flight (throughput per stream ≈ STREAM_WINDOW / round trip).
STREAM_WINDOW = 4 * 1024 * 1024
# The connection window: the HTTP/2 maximum, so only stream windows ever limit a sender.
CONNECTION_WINDOW = 2**31 - 1
MAX_FRAME = 1024 * 1024 - 1  # fewer, larger DATA frames: less per-frame work in Python
MAX_STREAMS = 10000
READ_SIZE = 256 * 1024
HEARTBEAT_SECONDS = 10.0
HEARTBEAT_TIMEOUT = 30.0
REASON_HEADER = "dbproxy-reason"


class LinkLost(trio.BrokenResourceError):
    """The link under a stream went away (agent gone, heartbeat missed, TLS/TCP broken)."""


class StreamRefused(Exception):
    """The agent answered a CONNECT with another status than 200 (403: not allowed, 502: unreachable)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


# Sent right after the preface; h2 applies each once the peer acknowledges it (RFC 9113 §6.5.3).
SETTINGS = {
    h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
    h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME,
    h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
}


class LinkStream(trio.abc.HalfCloseableStream):
    """One h2 stream as a byte stream (one CONNECT tunnel)."""

    def __init__(self, link: "H2Link", stream_id: int, authority: str) -> None:
        self.link = link
        self.stream_id = stream_id
        self.authority = authority
        self._chunks: collections.deque[bytes] = collections.deque()
        self._offset = 0  # into _chunks[0]
        self._buffered = 0
        self._lot = trio.lowlevel.ParkingLot()  # receivers waiting for data/eof
        self.remote_ended = False
        self.local_ended = False
        self.reset: str | None = None  # why the stream (or its link) is gone
        self.closed = False
        self.response: tuple[int, str] | None = None  # client role: (status, reason)
        self.responded = trio.Event()
        self.bytes_in = 0
        self.bytes_out = 0
        self.opened_at = time.time()
        self.session_id: str | None = None  # proxy side: the session it serves (status API, audit)
        self.on_close: Callable[["LinkStream"], None] | None = None  # proxy side: the stream's close event

    # -- fed by the link's reader ------------------------------------------------------------
    def _data(self, data: bytes) -> None:
        if data:
            self._chunks.append(data)
            self._buffered += len(data)
            self.bytes_in += len(data)
        self._lot.unpark_all()

    def _wake(self) -> None:
        self._lot.unpark_all()
        self.responded.set()

    # -- trio.abc.Stream ---------------------------------------------------------------------
    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.closed:
            raise trio.ClosedResourceError("stream closed")
        while not self._buffered:
            if self.reset is not None:
                raise LinkLost(self.reset)
            if self.remote_ended:
                await trio.lowlevel.checkpoint()
                return b""
            await self._lot.park()
            if self.closed:
                raise trio.ClosedResourceError("stream closed")
        await trio.lowlevel.checkpoint_if_cancelled()
        limit = max_bytes or READ_SIZE
        head = self._chunks[0]
        take = head[self._offset:self._offset + limit]
        self._offset += len(take)
        if self._offset >= len(head):
            self._chunks.popleft()
            self._offset = 0
        self._buffered -= len(take)
        # Credit back only what the consumer took (RFC 9113 §6.9): a stalled reader stops its sender.
        self.link._acknowledge(self.stream_id, len(take))
        return bytes(take) if isinstance(take, memoryview) else take

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send within the stream's window (waiting for credit).  Like TCP, a stream whose peer or
        link is gone reports it on ``receive_some`` (``LinkLost``); here what cannot be delivered is
        dropped — so a proxy session learns of a lost agent on its backend side, whichever of its
        pumps touched the stream first, and tells its client so in the client's protocol."""
        if self.closed:
            raise trio.ClosedResourceError("stream closed")
        if self.local_ended:
            raise trio.ClosedResourceError("send_eof was called")
        view = memoryview(data)
        link = self.link
        while view:
            if self.reset is not None:
                break
            conn = link.conn
            try:
                window = min(conn.local_flow_control_window(self.stream_id), conn.max_outbound_frame_size)
            except h2.exceptions.StreamClosedError:
                self._gone("stream closed by the peer")
                break
            if window <= 0:
                await link._credit.park()  # a WINDOW_UPDATE, new SETTINGS, a reset or the link's end
                continue
            chunk = view[:window]
            try:
                conn.send_data(self.stream_id, chunk.tobytes())
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError) as exc:
                self._gone(f"stream closed: {exc}")
                break
            view = view[window:]
            self.bytes_out += len(chunk)
            link.bytes_out += len(chunk)
            try:
                await link._flush()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                link._broken(exc)
                break
        await trio.lowlevel.checkpoint()

    def _gone(self, reason: str) -> None:
        if self.reset is None:
            self.reset = reason
        self._wake()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        if self.closed:
            raise trio.ClosedResourceError("stream closed")
        if self.local_ended or self.reset is not None:
            await trio.lowlevel.checkpoint()
            return
        self.local_ended = True
        try:
            self.link.conn.end_stream(self.stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass
        try:
            await self.link._flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self.link._broken(exc)  # reported on receive_some, as for send_all

    async def aclose(self) -> None:
        if self.closed:
            await trio.lowlevel.checkpoint()
            return
        self.closed = True
        self._lot.unpark_all()
        self.link._forget(self)
        if self.on_close is not None:
            try:
                self.on_close(self)
            except Exception:  # an audit hiccup must not break the closing session
                log.exception("stream %d: close callback", self.stream_id)
        await trio.lowlevel.checkpoint()
        if self.link.alive:
            with trio.move_on_after(5) as scope:
                scope.shield = True
                try:
                    await self.link._flush()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass

    def __repr__(self) -> str:
        return f"<LinkStream {self.stream_id} {self.authority}>"


Handler = Callable[[LinkStream], Awaitable[None]]


class H2Link:
    """An HTTP/2 connection over ``transport`` in one role: ``client=True`` opens streams
    (the proxy), ``client=False`` accepts them and runs ``handler(stream)`` for each (the agent).
    ``run`` owns the link's tasks; when it returns or fails, every stream is broken."""

    def __init__(self, transport: trio.abc.Stream, *, client: bool, handler: Handler | None = None,
                 initial: bytes = b"", heartbeat: float = HEARTBEAT_SECONDS,
                 heartbeat_timeout: float = HEARTBEAT_TIMEOUT) -> None:
        self.transport = transport
        self.client = client
        self.handler = handler
        self.conn = h2.connection.H2Connection(config=h2.config.H2Configuration(
            client_side=client, header_encoding="utf-8"))
        self.streams: dict[int, LinkStream] = {}
        self.alive = True
        self.lost_reason: str | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.streams_opened = 0
        self.last_heartbeat = time.time()
        self.rtt: float | None = None
        self.heartbeat = heartbeat
        self.heartbeat_timeout = heartbeat_timeout
        self._initial = initial
        self._send_lock = trio.Lock()
        self._dirty = trio.Event()
        self._credit = trio.lowlevel.ParkingLot()
        self._pings: dict[bytes, float] = {}
        self._nursery: trio.Nursery | None = None
        self._started = trio.Event()

    # -- lifecycle -----------------------------------------------------------------------------
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run the link until the peer goes away or it breaks; then every stream is broken and
        ``lost_reason`` says why.  Returns (never raises for the link's end)."""
        self.conn.initiate_connection()
        self.conn.update_settings(SETTINGS)
        # Open the connection window to the maximum (RFC 9113 §6.9.2): stream windows alone limit senders.
        self.conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    await self._flush()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    self.lost_reason = f"link broken: {exc.__class__.__name__}: {exc}"
                    return
                nursery.start_soon(self._guard, self._writer)
                nursery.start_soon(self._guard, self._pinger)
                self._started.set()
                task_status.started(self)
                if self._initial and not self._receive(self._initial):
                    nursery.cancel_scope.cancel()
                    return
                await self._guard(self._reader)
        finally:
            self._lose(self.lost_reason or "link closed")

    async def _guard(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Run one of the link's tasks; whatever ends it ends the link."""
        try:
            await fn()
        except LinkLost as exc:
            self.lost_reason = self.lost_reason or str(exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self.lost_reason = self.lost_reason or f"link broken: {exc.__class__.__name__}: {exc}".rstrip(": ")
        finally:
            self._lose(self.lost_reason or "link closed")
            if self._nursery is not None:
                self._nursery.cancel_scope.cancel()

    def _broken(self, exc: BaseException) -> None:
        """A write to the transport failed: the link is over (its tasks are cancelled)."""
        if not isinstance(exc, LinkLost):
            self.lost_reason = self.lost_reason or f"link broken: {exc.__class__.__name__}: {exc}".rstrip(": ")
        self._lose(self.lost_reason or str(exc))
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def _lose(self, reason: str) -> None:
        if not self.alive:
            return
        self.alive = False
        self.lost_reason = reason
        log.debug("link (%s role) ended: %s", "client" if self.client else "server", reason)
        for stream in list(self.streams.values()):
            if stream.reset is None:
                stream.reset = reason
            stream._wake()
        self._credit.unpark_all()

    async def aclose(self, reason: str = "closed") -> None:
        """Say GOAWAY and stop (best effort)."""
        if self.alive:
            try:
                self.conn.close_connection()
            except h2.exceptions.ProtocolError:
                pass
            with trio.move_on_after(2) as scope:
                scope.shield = True
                try:
                    await self._flush()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
        self._lose(self.lost_reason or reason)
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
        await trio.aclose_forcefully(self.transport)

    # -- client role ---------------------------------------------------------------------------
    async def open_stream(self, host: str, port: int) -> LinkStream:
        """CONNECT ``host:port`` through the agent; ``StreamRefused`` when it says no, ``LinkLost``
        when the link goes away meanwhile.  The caller sets the deadline."""
        if not self.alive:
            raise LinkLost(self.lost_reason or "link closed")
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            stream_id = self.conn.get_next_available_stream_id()
        except h2.exceptions.NoAvailableStreamIDError:
            raise LinkLost("the link used up its stream ids (a new link is needed)") from None
        stream = LinkStream(self, stream_id, authority)
        self.streams[stream_id] = stream
        self.streams_opened += 1
        try:
            try:
                self.conn.send_headers(stream_id, [(":method", "CONNECT"), (":authority", authority)])
            except h2.exceptions.TooManyStreamsError:
                raise StreamRefused(503, "the agent's limit of concurrent streams is reached") from None
            try:
                await self._flush()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self._broken(exc)
                raise LinkLost(self.lost_reason or "link broken") from None
            await stream.responded.wait()
        except BaseException:
            await stream.aclose()
            raise
        if stream.response is None:
            await stream.aclose()
            raise LinkLost(stream.reset or self.lost_reason or "link closed")
        status, reason = stream.response
        if status != 200:
            await stream.aclose()
            raise StreamRefused(status, reason)
        return stream

    # -- server role ---------------------------------------------------------------------------
    async def respond(self, stream: LinkStream, status: int, reason: str = "") -> None:
        headers = [(":status", str(status))]
        if reason:
            headers.append((REASON_HEADER, reason[:500]))
        try:
            self.conn.send_headers(stream.stream_id, headers, end_stream=status != 200)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return
        if status != 200:
            stream.local_ended = True
        await self._flush()

    # -- I/O -----------------------------------------------------------------------------------
    def _kick(self) -> None:
        """Have the writer send what h2 queued; no task switch when nothing is (h2 has no public
        "bytes pending": data_to_send() drains; h2 is pinned to 4.x in pyproject)."""
        if self.conn._data_to_send:
            self._dirty.set()

    async def _flush(self) -> None:
        async with self._send_lock:
            data = self.conn.data_to_send()
            if not data:
                return
            if not self.alive:
                raise LinkLost(self.lost_reason or "link closed")
            # Shielded: senders are session tasks, and a session may be cancelled at any time; a
            # TLS write cut in the middle leaves the TLS stream unusable (trio.SSLStream), which
            # would break every other stream of the link.  Bounded instead: a peer that takes
            # nothing for heartbeat_timeout is gone.
            with trio.CancelScope(shield=True):
                with trio.move_on_after(self.heartbeat_timeout) as scope:
                    await self.transport.send_all(data)
            if scope.cancelled_caught:
                self.lost_reason = f"the peer took no data for {self.heartbeat_timeout:g}s"
                self._lose(self.lost_reason)
                if self._nursery is not None:
                    self._nursery.cancel_scope.cancel()
                raise LinkLost(self.lost_reason)

    async def _writer(self) -> None:
        """Writes what the reader produced (acks, WINDOW_UPDATE): the reader never waits on a write."""
        while True:
            await self._dirty.wait()
            self._dirty = trio.Event()
            await self._flush()

    async def _pinger(self) -> None:
        while True:
            await trio.sleep(self.heartbeat)
            now = time.monotonic()
            for sent in self._pings.values():
                if now - sent > self.heartbeat_timeout:
                    self.lost_reason = f"no heartbeat answer within {self.heartbeat_timeout:g}s"
                    raise LinkLost(self.lost_reason)
            payload = os.urandom(8)
            self._pings[payload] = now
            self.conn.ping(payload)
            await self._flush()

    async def _reader(self) -> None:
        while True:
            data = await self.transport.receive_some(READ_SIZE)
            if not data:
                self.lost_reason = self.lost_reason or "the peer closed the link"
                return
            if not self._receive(data):
                return

    def _receive(self, data: bytes) -> bool:
        """Feed h2 and dispatch its events; False when the connection ended (GOAWAY)."""
        self.bytes_in += len(data)
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self.lost_reason = f"HTTP/2 protocol error from the peer: {exc}"
            self._dirty.set()
            return False
        go_on = True
        for event in events:
            if isinstance(event, h2.events.DataReceived):
                stream = self.streams.get(event.stream_id)
                if stream is None or stream.closed:
                    # Nobody will read it: give the credit back at once.
                    self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                else:
                    pad = event.flow_controlled_length - len(event.data)
                    if pad:
                        self.conn.acknowledge_received_data(pad, event.stream_id)
                    stream._data(event.data)
                if event.stream_ended is not None:
                    self._ended(event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                self._ended(event.stream_id)
            elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
                self._credit.unpark_all()
            elif isinstance(event, h2.events.RequestReceived):
                self._request(event)
            elif isinstance(event, h2.events.ResponseReceived):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    headers = dict(event.headers)
                    stream.response = (int(headers.get(":status", "0")), headers.get(REASON_HEADER, ""))
                    stream.responded.set()
                if event.stream_ended is not None:
                    self._ended(event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.reset = stream.reset or f"stream reset by the peer ({_code(event.error_code)})"
                    stream._wake()
                self._credit.unpark_all()
            elif isinstance(event, h2.events.PingAckReceived):
                sent = self._pings.pop(event.ping_data, None)
                self.last_heartbeat = time.time()
                if sent is not None:
                    self.rtt = time.monotonic() - sent
            elif isinstance(event, h2.events.PingReceived):
                self.last_heartbeat = time.time()  # h2 queued the ACK
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.lost_reason = f"the peer closed the link (GOAWAY {_code(event.error_code)})"
                go_on = False
        self._kick()  # acks, WINDOW_UPDATE, a 405: the writer sends them
        return go_on

    def _ended(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream.remote_ended = True
            stream._wake()

    def _request(self, event: h2.events.RequestReceived) -> None:
        headers = dict(event.headers)
        sid = event.stream_id
        if self.client or self.handler is None or headers.get(":method") != "CONNECT" or not headers.get(":authority"):
            self.conn.send_headers(sid, [(":status", "405"), (REASON_HEADER, "only CONNECT host:port")], end_stream=True)
            return
        stream = LinkStream(self, sid, headers[":authority"])
        self.streams[sid] = stream
        self.streams_opened += 1
        assert self._nursery is not None
        self._nursery.start_soon(self._serve_stream, stream)

    async def _serve_stream(self, stream: LinkStream) -> None:
        try:
            assert self.handler is not None
            await self.handler(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:  # one stream's bug must not take the link (and every other stream) down
            log.exception("stream %d (%s) failed", stream.stream_id, stream.authority)
        finally:
            await stream.aclose()

    def _acknowledge(self, stream_id: int, size: int) -> None:
        if not self.alive or not size:
            return
        self.conn.acknowledge_received_data(size, stream_id)
        self._kick()  # h2 queues a WINDOW_UPDATE only once half a window was taken

    def _forget(self, stream: LinkStream) -> None:
        """A stream's user is done with it: reset it unless both sides ended, return its credit."""
        self.streams.pop(stream.stream_id, None)
        if not self.alive:
            return
        if stream._buffered:
            self.conn.acknowledge_received_data(stream._buffered, stream.stream_id)
            stream._chunks.clear()
            stream._buffered = 0
        if not (stream.local_ended and stream.remote_ended) and stream.reset is None:
            try:
                self.conn.reset_stream(stream.stream_id, h2.errors.ErrorCodes.CANCEL)
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                pass
        self._kick()

    def statistics(self) -> dict:
        return {"streams": len(self.streams), "streams_opened": self.streams_opened, "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out, "last_heartbeat": self.last_heartbeat, "rtt_ms":
                None if self.rtt is None else round(self.rtt * 1000, 3)}


def _code(code: Any) -> str:
    try:
        return h2.errors.ErrorCodes(code).name
    except ValueError:
        return str(code)
