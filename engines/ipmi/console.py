"""The proxy's RMCP+ session with the real BMC (trio): an ordinary remote console.

Strategy.  One connected UDP socket per client session (the BMC sees one
console per client, so its own session limits and audit apply per
session).  ``open()`` runs the session setup (IPMI v2.0 §13.15: Get Channel
Authentication Capabilities, Open Session, RAKP 1–4 with the route's stored
user and password, Set Session Privilege Level) with ``rakp.ConsoleHandshake``;
every step is retried on timeout (UDP loses datagrams) a bounded number of
times.  Then ``run()`` is the one reader of the socket: responses to
requests (payload type 00h) wake the request waiting for that rqSeq;
other payload types of the session (SOL, 01h) go to
``payload_handlers[type]`` — the hook the SOL layer registers on.

``request(netfn, cmd, data)`` sends one IPMI request with the proxy's own
rqSeq (6 bits, §13.8) and session sequence number, and waits for the
matching response; on timeout it sends it again — a new session sequence
number, the same rqSeq, as a console must (§6.12.13) — at most
``retries`` times, then raises ``BmcTimeout``.  Inbound packets go through
the session's ``SequenceWindow`` and AuthCode check: a forged or replayed
datagram from anywhere is dropped.  ``close()`` sends Close Session
(§22.19) best effort.  The password and keys stay in this object: nothing
here logs them.
"""

from __future__ import annotations

import logging
import socket as socket_module
import struct
from typing import Any, Callable

import attrs
import trio

from dbproxy.errors import UpstreamError

from . import rmcp
from .commands import (CMD_CLOSE_SESSION, CMD_GET_CHANNEL_AUTH_CAPS, CMD_SET_SESSION_PRIVILEGE, NETFN_APP)
from .rakp import CipherSuite, ConsoleHandshake, HandshakeFailed
from .rmcp import IpmiError, Request, Response

log = logging.getLogger("dbproxy.ipmi")

# One try's wait for the BMC's answer, and how many times a request is sent again after it.
TRY_TIMEOUT = 1.0
RETRIES = 3


class BmcError(UpstreamError):
    """The BMC is unreachable, refused the proxy's login, or broke the protocol."""


class BmcTimeout(BmcError):
    """The BMC did not answer a request after every retry."""


class BmcSession:
    def __init__(self, host: str, port: int, suite: CipherSuite, username: bytes, password: bytes,
                 privilege: int = 4, *, try_timeout: float = TRY_TIMEOUT, retries: int = RETRIES) -> None:
        self.host, self.port = host, port
        self.handshake = ConsoleHandshake(suite, username, password, privilege)
        self.try_timeout = try_timeout
        self.retries = retries
        self.sock: Any = None
        self.keys: rmcp.SessionKeys | None = None
        self.window = rmcp.SequenceWindow()
        self.out_seq = 0
        self._rq_seq = 0
        self._waiting: dict[int, trio.MemorySendChannel] = {}
        # Payload types other than IPMI messages (SOL: 01h) → a callable taking the clear payload.
        self.payload_handlers: dict[int, Callable[[bytes], Any]] = {}
        self.dropped = 0
        self.retransmits = 0
        self.closed = False
        self.failed: BmcError | None = None  # set when the reader found the BMC gone

    @property
    def authority(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def bmc_sid(self) -> int:
        return self.handshake.bmc_sid

    @property
    def console_sid(self) -> int:
        return self.handshake.console_sid

    # -- setup -------------------------------------------------------------------------------
    async def open(self) -> None:
        infos = await trio.socket.getaddrinfo(self.host, self.port, type=socket_module.SOCK_DGRAM)
        family, type_, proto, _, addr = infos[0]
        self.sock = trio.socket.socket(family, type_, proto)
        await self.sock.connect(addr)
        hs = self.handshake
        try:
            # Get Channel Authentication Capabilities, IPMI v1.5 framing, channel Eh "this one",
            # bit 7: ask for the IPMI v2.0 extended data (§22.13).
            caps = Request(NETFN_APP, CMD_GET_CHANNEL_AUTH_CAPS, bytes((0x8E, hs.privilege)))
            reply = await self._exchange(rmcp.packet15(caps.encode()), self._expect15)
            resp = Response.decode(reply)
            if resp.cc != 0 or len(resp.data) < 4 or not resp.data[3] & 0x02:
                raise BmcError(f"BMC {self.authority} does not offer IPMI v2.0 sessions", kind="protocol",
                               client_hint="the BMC does not support IPMI v2.0")
            payload = await self._exchange(rmcp.packet20_clear(rmcp.PT_OPEN_SESSION_REQUEST,
                                                               hs.open_session_request()),
                                           self._expect20(rmcp.PT_OPEN_SESSION_RESPONSE))
            rakp1 = hs.rakp1(payload)
            payload = await self._exchange(rmcp.packet20_clear(rmcp.PT_RAKP1, rakp1), self._expect20(rmcp.PT_RAKP2))
            rakp3 = hs.rakp3(payload)
            payload = await self._exchange(rmcp.packet20_clear(rmcp.PT_RAKP3, rakp3), self._expect20(rmcp.PT_RAKP4))
            self.keys = hs.finish(payload)
        except HandshakeFailed as exc:
            raise BmcError(f"BMC {self.authority} refused the proxy's login: {exc}", kind="auth",
                           client_hint="the BMC refused the proxy's login") from None
        except IpmiError as exc:
            raise BmcError(f"BMC {self.authority} answered a malformed session setup message: {exc}",
                           kind="protocol", client_hint="the BMC broke the protocol") from None

    def _expect15(self, data: bytes) -> bytes | None:
        pkt = rmcp.parse(data)
        return pkt.message if isinstance(pkt, rmcp.Packet15) else None

    def _expect20(self, payload_type: int) -> Callable[[bytes], bytes | None]:
        def match(data: bytes) -> bytes | None:
            pkt = rmcp.parse(data)
            if isinstance(pkt, rmcp.Packet20) and pkt.payload_type == payload_type and not pkt.authenticated:
                return pkt.payload
            return None
        return match

    async def _exchange(self, packet: bytes, match: Callable[[bytes], bytes | None]) -> bytes:
        """Send a setup message and wait for its answer, again on timeout (bounded)."""
        for attempt in range(self.retries + 1):
            if attempt:
                self.retransmits += 1
            await self._send(packet)
            with trio.move_on_after(self.try_timeout):
                while True:
                    data = await self._recv()
                    try:
                        found = match(data)
                    except IpmiError:
                        found = None
                    if found is not None:
                        return found
                    self.dropped += 1
        raise BmcTimeout(f"BMC {self.authority} did not answer the session setup "
                         f"({self.retries + 1} tries of {self.try_timeout:g}s)", kind="timeout",
                         client_hint="the BMC did not answer")

    async def _send(self, data: bytes) -> None:
        try:
            await self.sock.send(data)
        except OSError as exc:
            raise BmcError(f"BMC {self.authority} unreachable: {exc}", kind="connect",
                           client_hint="the BMC is unreachable") from None

    async def _recv(self) -> bytes:
        try:
            return await self.sock.recv(65536)
        except OSError as exc:  # e.g. ICMP port unreachable on a connected socket: nobody listens there
            raise BmcError(f"BMC {self.authority} unreachable: {exc}", kind="connect",
                           client_hint="the BMC is unreachable") from None

    # -- the session -------------------------------------------------------------------------
    def seal(self, payload_type: int, payload: bytes) -> bytes:
        assert self.keys is not None
        self.out_seq = rmcp.next_seq(self.out_seq)
        return self.keys.seal(payload_type, payload, session_id=self.bmc_sid, seq=self.out_seq)

    async def send_payload(self, payload_type: int, payload: bytes) -> None:
        """Send one payload of the session (SOL packets: the SOL layer's retries are its own)."""
        await self._send(self.seal(payload_type, payload))

    def _open_inbound(self, data: bytes) -> rmcp.Packet20 | None:
        assert self.keys is not None
        try:
            pkt = rmcp.parse(data, auth_code_size=self.keys.integrity.size)
            if not isinstance(pkt, rmcp.Packet20) or pkt.session_id != self.console_sid:
                raise IpmiError("not a packet of this session")
            payload = self.keys.open(pkt)
        except IpmiError as exc:
            log.debug("BMC %s: datagram dropped: %s", self.authority, exc)
            self.dropped += 1
            return None
        if not self.window.accept(pkt.seq):
            self.dropped += 1  # a replayed or stale datagram (§6.12.13)
            return None
        return attrs.evolve(pkt, payload=payload, encrypted=False)

    async def run(self) -> None:
        """Read the BMC's datagrams until cancelled; raises BmcError when the BMC is gone (and every
        waiting ``request`` raises it too)."""
        while True:
            try:
                data = await self._recv()
            except BmcError as exc:
                self.failed = exc
                for waiter in self._waiting.values():
                    waiter.close()
                raise
            pkt = self._open_inbound(data)
            if pkt is None:
                continue
            if pkt.payload_type == rmcp.PT_IPMI:
                try:
                    resp = Response.decode(pkt.payload)
                except IpmiError:
                    self.dropped += 1
                    continue
                waiter = self._waiting.get(resp.rq_seq)
                if waiter is not None:
                    try:
                        waiter.send_nowait(resp)
                    except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
                continue
            handler = self.payload_handlers.get(pkt.payload_type)
            if handler is None:
                self.dropped += 1
                continue
            result = handler(pkt.payload)
            if hasattr(result, "__await__"):
                await result

    def next_rq_seq(self) -> int:
        self._rq_seq = (self._rq_seq + 1) & 0x3F
        return self._rq_seq

    async def request(self, netfn: int, cmd: int, data: bytes = b"", *, rs_lun: int = 0) -> Response:
        """One request to the BMC (``run()`` must be reading); retried on timeout, ``BmcTimeout`` at the end."""
        if self.failed is not None:
            raise self.failed
        rq_seq = self.next_rq_seq()
        message = Request(netfn, cmd, data, rq_seq, rs_lun=rs_lun).encode()
        send, receive = trio.open_memory_channel[Response](4)
        self._waiting[rq_seq] = send
        try:
            for attempt in range(self.retries + 1):
                if attempt:
                    self.retransmits += 1
                await self._send(self.seal(rmcp.PT_IPMI, message))
                with trio.move_on_after(self.try_timeout):
                    while True:
                        try:
                            resp = await receive.receive()
                        except trio.EndOfChannel:  # the reader found the BMC gone
                            raise BmcError(str(self.failed), kind="connect",
                                           client_hint="the BMC is unreachable") from None
                        if resp.cmd == cmd and resp.netfn == netfn | 1:
                            return resp
            raise BmcTimeout(f"BMC {self.authority} did not answer netFn {netfn:#04x} cmd {cmd:#04x} "
                             f"({self.retries + 1} tries of {self.try_timeout:g}s)", kind="timeout",
                             client_hint="the BMC did not answer")
        finally:
            if self._waiting.get(rq_seq) is send:
                del self._waiting[rq_seq]

    async def request_direct(self, netfn: int, cmd: int, data: bytes = b"") -> Response:
        """A request while nobody runs ``run()`` (during setup): reads the socket itself."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.run)
            try:
                return await self.request(netfn, cmd, data)
            finally:
                nursery.cancel_scope.cancel()

    async def set_privilege(self, privilege: int) -> None:
        resp = await self.request_direct(NETFN_APP, CMD_SET_SESSION_PRIVILEGE, bytes((privilege,)))
        if resp.cc != 0:
            raise BmcError(f"BMC {self.authority} refused privilege level {privilege}: completion code "
                           f"{resp.cc:#04x}", kind="auth", client_hint="the BMC refused the proxy's privilege level")

    async def close(self) -> None:
        """Close Session (best effort, one short try), then the socket."""
        if self.closed:
            return
        self.closed = True
        try:
            if self.keys is not None and self.sock is not None:
                with trio.move_on_after(self.try_timeout):
                    msg = Request(NETFN_APP, CMD_CLOSE_SESSION, struct.pack("<I", self.bmc_sid),
                                  self.next_rq_seq()).encode()
                    await self._send(self.seal(rmcp.PT_IPMI, msg))
        except (BmcError, OSError):
            pass
        finally:
            if self.sock is not None:
                self.sock.close()

