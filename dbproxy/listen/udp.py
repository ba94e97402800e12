"""UDP datagram sessions: one socket per listener, one session per peer.

Strategy: UDP has no connections, so the listener makes them.  One task
reads the listener's socket; each datagram is keyed — by the peer address, or
by the engine's ``datagram_session_key(data, peer)`` (IPMI keys on the
RMCP+ session id as well; a key should include the peer, since replies go to
the address of the session's first datagram) — and handed to that key's
``DatagramSession``; an unknown key starts a new session, run in the
server's session nursery through the same accounting as a TCP connection.

UDP semantics, said plainly: each session's queue holds at most
``queue_datagrams`` datagrams; one arriving while it is full is **dropped and
counted** (``DatagramSession.statistics().dropped``), never buffered without
bound and never allowed to stall the other sessions.  A new peer past
``max_sessions`` is dropped and counted too (``refused``).  A datagram the
key function cannot key (it returns None or raises) is dropped and counted.
Queued datagrams are charged to the process's ``BufferBudget`` (the one
the stream sessions' partial messages use): a datagram that would take the
budget past its limit is dropped and counted like one meeting a full queue,
so many sessions with full queues cannot hold more memory than the budget.
A session ends when the engine returns, when it crashes (logged; the
listener goes on), or after ``idle_timeout`` seconds without a datagram from
its peer (the engine is cancelled; ``end_reason`` "idle timeout").  Sends do
not count as activity: a peer that stopped answering is gone.

When the listener stops (server shutdown), each session's ``receive()``
raises ``trio.EndOfChannel`` once its queue is drained — the datagram
equivalent of EOF — while sends keep working: the socket closes after the
last session ended.
"""

from __future__ import annotations

import logging
import socket as socket_module
from typing import Any, Awaitable, Callable, Hashable

import attrs
import trio

from ..errors import BufferBudgetExceeded

log = logging.getLogger("dbproxy.listen.udp")

Peer = tuple  # (host, port) or (host, port, flowinfo, scope_id)


@attrs.frozen
class DatagramSessionStatistics:
    received: int  # datagrams queued for the engine
    dropped: int  # datagrams dropped because the queue was full (or the buffer budget spent)
    sent: int
    queued: int  # waiting in the queue now


@attrs.frozen
class DatagramListenerStatistics:
    sessions: int  # running now
    sessions_started: int
    refused: int  # datagrams from new peers dropped at the session cap
    received: int
    dropped: int  # dropped because a session's queue was full
    unkeyed: int  # dropped because the key function returned None or raised


class DatagramSession:
    """One peer's datagrams (``receive``) and replies (``send``), bounded and timed out by the listener."""

    def __init__(self, listener: "DatagramListener", key: Hashable, peer: Peer, queue: int, idle_timeout: float,
                 account: Any = None) -> None:
        self.listener = listener
        self._account = account  # BudgetAccount | None: the queued bytes' charge
        self._queued_bytes = 0
        self.key = key
        self.peer = peer
        self.idle_timeout = idle_timeout
        self._in, self._out = trio.open_memory_channel[bytes](queue)
        # The engine runs inside this scope; every datagram from the peer pushes its deadline.
        self.idle_scope = trio.CancelScope(deadline=trio.current_time() + idle_timeout)
        self.closed = False
        self.received = 0
        self.dropped = 0
        self.sent = 0

    @property
    def client_addr(self) -> str:
        host, port = self.peer[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def _deliver(self, data: bytes) -> None:
        self.idle_scope.deadline = trio.current_time() + self.idle_timeout
        account = self._account
        if account is not None:
            try:
                account.hold(self._queued_bytes + len(data))
            except BufferBudgetExceeded:
                account.hold(self._queued_bytes)  # back to what is really queued (never past the limit)
                self.dropped += 1
                self.listener.dropped += 1
                return
        try:
            self._in.send_nowait(data)
        except trio.WouldBlock:
            self.dropped += 1
            self.listener.dropped += 1
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the engine stopped reading (session ending): the datagram goes nowhere
        else:
            self.received += 1
            self._queued_bytes += len(data)
            return
        if account is not None:
            account.hold(self._queued_bytes)

    def _end_input(self) -> None:
        self._in.close()

    async def receive(self) -> bytes:
        """The next datagram from the peer; ``trio.EndOfChannel`` when the listener stopped."""
        try:
            data = await self._out.receive()
        except trio.ClosedResourceError:
            raise trio.EndOfChannel from None
        self._queued_bytes -= len(data)
        if self._account is not None:
            self._account.hold(self._queued_bytes)  # a smaller charge never exceeds the budget
        return data

    def __aiter__(self) -> "DatagramSession":
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        """Send one datagram to the peer (``trio.ClosedResourceError`` once the session is closed)."""
        if self.closed:
            raise trio.ClosedResourceError("datagram session is closed")
        await self.listener._sendto(data, self.peer)
        self.sent += 1

    def statistics(self) -> DatagramSessionStatistics:
        return DatagramSessionStatistics(self.received, self.dropped, self.sent, self._out.statistics().current_buffer_used)

    def close(self) -> None:
        """End the session now: its key is free for a new session, queued datagrams are dropped."""
        if not self.closed:
            self.closed = True
            self._in.close()
            self._out.close()
            self._queued_bytes = 0
            if self._account is not None:
                self._account.release()
            self.listener._forget(self)

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()


KeyFunction = Callable[[bytes, Peer], Hashable]


class DatagramListener:
    """Reads one UDP socket and demultiplexes its datagrams into ``DatagramSession``s."""

    def __init__(self, sock: trio.socket.SocketType, *, max_sessions: int, queue_datagrams: int, idle_timeout: float,
                 max_datagram_size: int = 65535, key: KeyFunction | None = None, name: str = "udp",
                 budget: Any = None) -> None:
        self.sock = sock
        self.budget = budget  # dbproxy.buffer.BufferBudget | None
        self.name = name
        self.max_sessions = max_sessions
        self.queue_datagrams = queue_datagrams
        self.idle_timeout = idle_timeout
        self.max_datagram_size = max_datagram_size
        self.key = key
        self.sessions: dict[Hashable, DatagramSession] = {}
        self.closing = False
        self.sessions_started = self.refused = self.received = self.dropped = self.unkeyed = 0

    def statistics(self) -> DatagramListenerStatistics:
        return DatagramListenerStatistics(len(self.sessions), self.sessions_started, self.refused, self.received,
                                          self.dropped, self.unkeyed)

    async def serve(self, run_session: Callable[[DatagramSession], Awaitable[Any]], nursery: trio.Nursery) -> None:
        """Receive until cancelled; each new key's session runs as ``run_session(session)`` in ``nursery``."""
        try:
            while True:
                try:
                    # One byte more than allowed tells a truncated (oversized) datagram apart.
                    data, peer = await self.sock.recvfrom(self.max_datagram_size + 1)
                except (ConnectionResetError, ConnectionRefusedError, OSError) as exc:
                    # An ICMP error for an earlier send (some platforms report it here): not ours to end on.
                    log.debug("listener %s: recvfrom: %s", self.name, exc)
                    continue
                self.received += 1
                if len(data) > self.max_datagram_size:
                    self.unkeyed += 1
                    continue
                self._dispatch(data, peer, run_session, nursery)
        finally:
            self.closing = True
            for session in list(self.sessions.values()):
                session._end_input()
            if not self.sessions:
                self.sock.close()

    def _dispatch(self, data: bytes, peer: Peer, run_session: Callable, nursery: trio.Nursery) -> None:
        if self.key is None:
            key: Hashable = peer
        else:
            try:
                key = self.key(data, peer)
                hash(key)
            except Exception as exc:  # an engine's key function must not stop the listener
                log.debug("listener %s: datagram from %s not keyed: %r", self.name, peer, exc)
                key = None
            if key is None:
                self.unkeyed += 1
                return
        session = self.sessions.get(key)
        if session is None:
            if len(self.sessions) >= self.max_sessions:
                self.refused += 1
                if self.refused == 1 or self.refused % 1000 == 0:
                    log.warning("listener %s: %d sessions (the cap): datagram from %s dropped (%d so far)",
                                self.name, len(self.sessions), peer, self.refused)
                return
            account = self.budget.account() if self.budget is not None else None
            session = DatagramSession(self, key, peer, self.queue_datagrams, self.idle_timeout, account)
            self.sessions[key] = session
            self.sessions_started += 1
            nursery.start_soon(run_session, session)
        session._deliver(data)

    async def _sendto(self, data: Any, peer: Peer) -> None:
        try:
            await self.sock.sendto(data, peer)
        except OSError as exc:
            raise trio.BrokenResourceError(f"sendto {peer}: {exc}") from exc

    def _forget(self, session: DatagramSession) -> None:
        if self.sessions.get(session.key) is session:
            del self.sessions[session.key]
        if self.closing and not self.sessions:
            self.sock.close()


async def open_udp_socket(host: str, port: int, *, reuse_port: bool = False) -> trio.socket.SocketType:
    """A bound UDP socket for ``host:port`` (port 0: the kernel picks); ``reuse_port``: SO_REUSEPORT
    (several proxy processes; the kernel keeps each peer on one of them)."""
    infos = await trio.socket.getaddrinfo(host, port, type=socket_module.SOCK_DGRAM, flags=socket_module.AI_PASSIVE)
    family, type_, proto, _, addr = infos[0]
    sock = trio.socket.socket(family, type_, proto)
    try:
        if reuse_port:
            sock.setsockopt(socket_module.SOL_SOCKET, socket_module.SO_REUSEPORT, 1)
        await sock.bind(addr)
    except BaseException:
        sock.close()
        raise
    return sock
