"""Serial-over-LAN (IPMI v2.0 §15, payload type 01h): packets, one leg's state machine, the relay.

Sans-IO: nothing here touches a socket, a clock or trio.  Time comes in as
``now`` (any monotonic float, seconds); packets go out as return values.

Strategy
--------
An SOL packet (§15.9, "SOL Payload Data Format") is four header bytes and
the characters::

    byte 1  packet sequence number [3:0]      (0 = an ACK/NACK-only packet)
    byte 2  acked/nacked packet number [3:0]  (0 = this packet acks nothing)
    byte 3  accepted character count          (of the packet it acks)
    byte 4  operation (console->BMC) / status (BMC->console), see the flags
    5..N    character data

It is stop-and-wait in each direction (§15.10): a sender has at most one
packet outstanding, repeats it with the *same* sequence number until that
number is acknowledged (or it gives up), and sends whatever the receiver did
not accept (accepted count < characters sent) again under a *new* number.
Acknowledgements are never acknowledged.  Numbers run 1..15 and wrap to 1.
A receiver therefore only has to remember the last number it accepted: the
same number again is the peer repeating a packet whose ACK got lost — ACK it
again with the count accepted the first time, deliver nothing twice.

``SolEndpoint`` is one leg of that (both directions of one peer); the proxy
keeps two — toward the client it plays the BMC, toward the real BMC the
console — and ``SolRelay`` moves characters between them.  Each leg has its
own numbers, acknowledgements and retries, so a packet lost on one leg is
repeated on that leg only.  Backpressure crosses the relay through the
accepted character count: a leg accepts no more characters than the other
leg's bounded send buffer has room for, and NACKs a packet it has no room for
at all (the peer tries again after its retry interval).

A malformed packet, an acknowledgement claiming more characters than were
sent, or a peer that stops acknowledging raise ``SolError`` (the last one
``SolRetriesExhausted``): the only exception type this module raises on
peer input, so the engine can end the session with a reason.

Activate Payload (App 06h/48h), Deactivate Payload (49h) and Get Payload
Activation Status (4Ah) request/response bodies (§24.1-24.4) are at the end;
they are plain IPMI messages the engine sees on payload type 0.
"""

from __future__ import annotations

import contextlib
import enum
import struct
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import attrs

from dbproxy.errors import RemoteProtocolError

PAYLOAD_TYPE_SOL = 0x01

NETFN_APP = 0x06
CMD_ACTIVATE_PAYLOAD = 0x48
CMD_DEACTIVATE_PAYLOAD = 0x49
CMD_GET_PAYLOAD_ACTIVATION_STATUS = 0x4A

HEADER_SIZE = 4
# The accepted character count is one byte (§15.9), so no packet may carry more.
MAX_CHARACTERS = 255
SEQ_MAX = 15

# Completion codes of Activate/Deactivate Payload (§24.1, §24.2).
CC_OK = 0x00
CC_PAYLOAD_ALREADY_ACTIVE = 0x80      # activate: active on another session; deactivate: already inactive
CC_PAYLOAD_DISABLED = 0x81
CC_ACTIVATION_LIMIT = 0x82
CC_CANNOT_ACTIVATE_WITH_ENCRYPTION = 0x83
CC_CANNOT_ACTIVATE_WITHOUT_ENCRYPTION = 0x84
CC_INSUFFICIENT_PRIVILEGE = 0xD4
CC_INVALID_DATA_FIELD = 0xCC
CC_REQUEST_LENGTH_INVALID = 0xC7
CC_UNSPECIFIED = 0xFF


class SolError(RemoteProtocolError):
    """A peer broke the SOL protocol (or stopped answering it).

    ``leg`` is set by ``SolRelay``: ``"client"`` or ``"bmc"``, the side at fault.
    """

    leg: str | None = None


class SolRetriesExhausted(SolError):
    """The peer did not acknowledge a packet after every retry: it is gone or not listening."""

    def __init__(self, seq: int, attempts: int) -> None:
        super().__init__(f"SOL packet {seq} not acknowledged after {attempts} transmissions",
                         client_hint="the serial console stopped answering")
        self.seq = seq
        self.attempts = attempts


class SolOperation(enum.IntFlag):
    """Byte 4 from the remote console to the BMC (§15.9, table 15-2)."""

    NACK = 0x40               # this ACK is a NACK: the characters were not (all) taken, try later
    RING_WOR = 0x20           # assert Ring Indicator / wake on ring
    BREAK = 0x10              # generate a serial break
    DEASSERT_CTS = 0x08       # pause the baseboard's transmitter
    DEASSERT_DCD_DSR = 0x04
    FLUSH_INBOUND = 0x02      # drop what the BMC holds for the serial port
    FLUSH_OUTBOUND = 0x01     # drop what the BMC holds for the console


class SolStatus(enum.IntFlag):
    """Byte 4 from the BMC to the remote console (§15.9, table 15-2)."""

    NACK = 0x40
    TRANSFER_UNAVAILABLE = 0x20   # the BMC cannot take characters now
    DEACTIVATING = 0x10           # the payload is being deactivated (ipmitool: "SOL inactive")
    TRANSMIT_OVERRUN = 0x08       # characters toward the serial port were dropped
    BREAK_DETECTED = 0x04


NACK = 0x40  # the same bit in both directions


@attrs.frozen
class SolPacket:
    seq: int = 0
    ack_seq: int = 0
    accepted: int = 0
    flags: int = 0
    data: bytes = attrs.field(default=b"", repr=lambda d: f"<{len(d)} characters>")  # typed text stays out of logs

    @classmethod
    def decode(cls, raw: bytes | bytearray | memoryview) -> "SolPacket":
        raw = bytes(raw)
        if len(raw) < HEADER_SIZE:
            raise SolError(f"SOL packet of {len(raw)} bytes is shorter than its {HEADER_SIZE}-byte header",
                           client_hint="malformed SOL packet")
        if raw[0] & 0xF0 or raw[1] & 0xF0:
            # Bits 7:4 of bytes 1 and 2 are reserved (§15.9): a peer setting them speaks something else.
            raise SolError(f"SOL packet with reserved sequence bits set ({raw[0]:#04x} {raw[1]:#04x})",
                           client_hint="malformed SOL packet")
        data = raw[HEADER_SIZE:]
        if len(data) > MAX_CHARACTERS:
            raise SolError(f"SOL packet carries {len(data)} characters (at most {MAX_CHARACTERS})",
                           client_hint="SOL packet too large")
        if raw[0] == 0 and data:
            # §15.9: sequence number 0 marks an ACK-only packet — it carries no characters.
            raise SolError("SOL ACK-only packet (sequence number 0) carries characters",
                           client_hint="malformed SOL packet")
        return cls(raw[0], raw[1], raw[2], raw[3], data)

    def encode(self) -> bytes:
        if not (0 <= self.seq <= SEQ_MAX and 0 <= self.ack_seq <= SEQ_MAX and 0 <= self.accepted <= 255
                and 0 <= self.flags <= 255 and len(self.data) <= MAX_CHARACTERS):
            # Never the characters themselves: they are what someone typed.
            raise SolError(f"SOL packet field out of range (seq {self.seq}, ack {self.ack_seq}, accepted "
                           f"{self.accepted}, flags {self.flags}, {len(self.data)} characters)")
        if self.seq == 0 and self.data:
            raise SolError("an ACK-only SOL packet cannot carry characters")
        return bytes((self.seq, self.ack_seq, self.accepted, self.flags)) + self.data

    @property
    def is_ack(self) -> bool:
        return self.ack_seq != 0

    @property
    def is_nack(self) -> bool:
        return self.ack_seq != 0 and bool(self.flags & NACK)


class Received(NamedTuple):
    """What one received packet gave: characters to pass on (each delivered once), packets
    to send back (ACKs, the next data packet), and the operation/status flags it carried."""

    data: bytes
    send: list[SolPacket]
    flags: int


def _next(seq: int) -> int:
    return 1 if seq >= SEQ_MAX else seq + 1


@attrs.define(eq=False)
class SolEndpoint:
    """One SOL leg: sends characters reliably to its peer and acknowledges the peer's.

    ``role`` is ``"bmc"`` (the proxy toward the client) or ``"console"`` (toward the BMC);
    it only decides which flag set outgoing packets use.  ``max_chunk`` is the largest
    number of characters put in one packet (the peer's advertised inbound payload size
    less the header); ``max_buffer`` bounds the characters waiting to be sent.
    """

    role: str = "console"
    max_chunk: int = MAX_CHARACTERS
    retry_interval: float = 1.0
    max_retries: int = 5
    max_buffer: int = 64 * 1024

    _out: bytearray = attrs.field(factory=bytearray, init=False)
    _out_flags: int = attrs.field(default=0, init=False)
    _in_flight: SolPacket | None = attrs.field(default=None, init=False)
    _attempts: int = attrs.field(default=0, init=False)
    _deadline: float | None = attrs.field(default=None, init=False)
    _paused_until: float | None = attrs.field(default=None, init=False)
    _seq: int = attrs.field(default=0, init=False)
    _last_rx_seq: int = attrs.field(default=0, init=False)
    _last_rx_accepted: int = attrs.field(default=0, init=False)
    _refusals: int = attrs.field(default=0, init=False)
    retransmits: int = attrs.field(default=0, init=False)
    duplicates: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        if self.role not in ("bmc", "console"):
            raise ValueError(f"role must be 'bmc' or 'console', not {self.role!r}")
        if not 1 <= self.max_chunk <= MAX_CHARACTERS:
            raise ValueError(f"max_chunk must be 1..{MAX_CHARACTERS}")
        if self.max_retries < 0 or self.retry_interval <= 0:
            raise ValueError("max_retries must be >= 0 and retry_interval > 0")

    # -- sending -------------------------------------------------------------------------

    def room(self) -> int:
        """How many more characters :meth:`send` takes now."""
        return max(0, self.max_buffer - len(self._out))

    @property
    def idle(self) -> bool:
        """Nothing waiting and nothing unacknowledged."""
        return self._in_flight is None and not self._out and not self._out_flags

    def send(self, data: bytes = b"", *, now: float, flags: int = 0) -> list[SolPacket]:
        """Queue characters (and operation/status ``flags`` for the next packet); the packets to send now.

        :meth:`room` is what callers size their acceptance by; a little more is taken (keys an
        observer held back and released), but past twice ``max_buffer`` this raises ``SolError``.
        """
        if len(self._out) + len(data) > 2 * self.max_buffer:
            raise SolError(f"SOL send buffer full ({len(self._out)} of {self.max_buffer} characters held)")
        self._out += data
        self._out_flags |= flags
        return self._pump(now)

    def _pump(self, now: float) -> list[SolPacket]:
        if self._in_flight is not None or (not self._out and not self._out_flags):
            return []
        if self._paused_until is not None and now < self._paused_until:
            return []
        self._paused_until = None
        chunk = bytes(self._out[: self.max_chunk])
        del self._out[: len(chunk)]
        self._seq = _next(self._seq)
        packet = SolPacket(seq=self._seq, flags=self._out_flags, data=chunk)
        self._out_flags = 0
        self._in_flight = packet
        self._attempts = 1
        self._deadline = now + self.retry_interval
        return [packet]

    def tick(self, now: float) -> list[SolPacket]:
        """Retransmit what is overdue; raises ``SolRetriesExhausted`` when a packet with characters
        went unacknowledged ``max_retries`` times more than its first transmission."""
        packet = self._in_flight
        if packet is not None and self._deadline is not None and now >= self._deadline:
            if self._attempts > self.max_retries:
                if packet.data:
                    raise SolRetriesExhausted(packet.seq, self._attempts)
                # A control-only packet (a break, a keepalive) some BMCs never acknowledge
                # (OpenIPMI's ipmi_sim acknowledges only packets with characters): drop it.
                self._in_flight = None
                self._deadline = None
                return self._pump(now)
            self._attempts += 1
            self.retransmits += 1
            self._deadline = now + self.retry_interval
            return [packet]
        if packet is None:
            return self._pump(now)
        return []

    def next_deadline(self) -> float | None:
        """When :meth:`tick` next has something to do (``None``: only when something arrives)."""
        if self._in_flight is not None:
            return self._deadline
        if self._paused_until is not None and (self._out or self._out_flags):
            return self._paused_until
        return None

    def flush_outbound(self) -> None:
        """Drop characters not yet sent (a FLUSH_OUTBOUND request); the one in flight stays."""
        self._out.clear()

    # -- receiving -----------------------------------------------------------------------

    def receive(self, packet: SolPacket, *, now: float, room: int | None = None) -> Received:
        """Take one packet from the peer; ``room`` caps how many of its characters are accepted."""
        out: list[SolPacket] = []
        data = b""
        flags = 0
        if packet.seq == 0:
            # ACK-only (or status-only) packet: its status bits apply as they are.
            flags = packet.flags & ~NACK
        elif packet.seq == self._last_rx_seq:
            # The peer repeated a packet: our ACK was lost.  ACK it again with the count
            # accepted the first time; deliver neither its characters nor its operations twice.
            self.duplicates += 1
            out.append(self._ack(packet.seq, self._last_rx_accepted,
                                 self._last_rx_accepted == 0 and bool(packet.data)))
        else:
            take = len(packet.data) if room is None else max(0, min(room, len(packet.data)))
            data = packet.data[:take]
            flags = packet.flags & ~NACK
            self._last_rx_seq = packet.seq
            self._last_rx_accepted = take
            # NACK only when nothing fit: a partial ACK already makes the peer send the
            # rest under a new number (§15.10), and ipmitool drops characters on a NACK.
            out.append(self._ack(packet.seq, take, take == 0 and bool(packet.data)))
        if packet.is_ack:
            out += self._acked(packet, now)
        return Received(data, out, flags)

    def _ack(self, seq: int, accepted: int, nack: bool) -> SolPacket:
        return SolPacket(seq=0, ack_seq=seq, accepted=accepted, flags=NACK if nack else 0)

    def _acked(self, packet: SolPacket, now: float) -> list[SolPacket]:
        sent = self._in_flight
        if sent is None or packet.ack_seq != sent.seq:
            return []  # a late ACK of a packet already settled (we had retransmitted it)
        if packet.accepted > len(sent.data):
            raise SolError(f"SOL ACK of packet {sent.seq} accepts {packet.accepted} characters of {len(sent.data)}",
                           client_hint="malformed SOL acknowledgement")
        rest = sent.data[packet.accepted:]
        if rest:
            self._out[0:0] = rest
        self._in_flight = None
        self._deadline = None
        busy = packet.flags & NACK or (self.role == "console" and packet.flags & SolStatus.TRANSFER_UNAVAILABLE)
        if busy and rest:
            # The peer cannot take characters now and sends no "ready again" notice: send
            # the rest after one retry interval.  A peer that takes nothing, max_retries
            # times running, is as good as gone.
            self._refusals = self._refusals + 1 if packet.accepted == 0 else 0
            if self._refusals > self.max_retries:
                raise SolRetriesExhausted(sent.seq, self._refusals)
            self._paused_until = now + self.retry_interval
        else:
            self._refusals = 0
        return self._pump(now)


# -- the relay ---------------------------------------------------------------------------


@attrs.frozen
class RelayStep:
    """What one event asks the engine to do: packets per leg, and characters seen each way."""

    to_client: tuple[SolPacket, ...] = ()
    to_bmc: tuple[SolPacket, ...] = ()
    output: bytes = b""          # console output (BMC -> client): recorded
    input: bytes = b""           # typed by the client (client -> BMC): never logged
    client_flags: int = 0        # operations the client asked for (break, flush ...)
    bmc_flags: int = 0           # status bits the BMC reported (deactivating ...)


# Which console operations are relayed to the BMC as they are.  NACK never is: it
# belongs to one leg's acknowledgements.
_RELAYED_OPERATIONS = int(SolOperation.RING_WOR | SolOperation.BREAK | SolOperation.DEASSERT_CTS
                          | SolOperation.DEASSERT_DCD_DSR | SolOperation.FLUSH_INBOUND | SolOperation.FLUSH_OUTBOUND)
_RELAYED_STATUS = int(SolStatus.BREAK_DETECTED | SolStatus.TRANSMIT_OVERRUN)


@contextlib.contextmanager
def _leg(name: str) -> Iterator[None]:
    try:
        yield
    except SolError as exc:
        if exc.leg is None:
            exc.leg = name
        raise


@attrs.define(eq=False)
class SolRelay:
    """Two legs and the characters between them (sans-IO; the engine owns sockets and the clock)."""

    client: SolEndpoint
    bmc: SolEndpoint

    @classmethod
    def create(cls, *, client_chunk: int = MAX_CHARACTERS, bmc_chunk: int = MAX_CHARACTERS,
               retry_interval: float = 1.0, max_retries: int = 5, max_buffer: int = 64 * 1024) -> "SolRelay":
        return cls(SolEndpoint("bmc", client_chunk, retry_interval, max_retries, max_buffer),
                   SolEndpoint("console", bmc_chunk, retry_interval, max_retries, max_buffer))

    def from_client(self, packet: SolPacket, *, now: float, forward: bool = True) -> RelayStep:
        """``forward=False``: the characters are only returned (``input``) — the caller passes
        them through its terminal observer and sends what it releases with ``bmc.send``."""
        with _leg("client"):
            got = self.client.receive(packet, now=now, room=self.bmc.room())
        ops = got.flags & _RELAYED_OPERATIONS
        if ops & SolOperation.FLUSH_OUTBOUND:
            self.client.flush_outbound()   # what the proxy holds for the client is "outbound" too
        if ops & SolOperation.FLUSH_INBOUND:
            self.bmc.flush_outbound()
        with _leg("bmc"):
            data = got.data if forward else b""
            to_bmc = self.bmc.send(data, now=now, flags=ops) if (data or ops) else []
        return RelayStep(to_client=tuple(got.send), to_bmc=tuple(to_bmc), input=got.data, client_flags=got.flags)

    def from_bmc(self, packet: SolPacket, *, now: float) -> RelayStep:
        with _leg("bmc"):
            got = self.bmc.receive(packet, now=now, room=self.client.room())
        status = got.flags & _RELAYED_STATUS
        with _leg("client"):
            to_client = self.client.send(got.data, now=now, flags=status) if (got.data or status) else []
        return RelayStep(to_client=tuple(to_client), to_bmc=tuple(got.send), output=got.data, bmc_flags=got.flags)

    def tick(self, now: float) -> RelayStep:
        """Retransmissions due on both legs (``SolError.leg`` names the leg that gave up)."""
        with _leg("client"):
            to_client = self.client.tick(now)
        with _leg("bmc"):
            to_bmc = self.bmc.tick(now)
        return RelayStep(to_client=tuple(to_client), to_bmc=tuple(to_bmc))

    def next_deadline(self) -> float | None:
        times = [t for t in (self.client.next_deadline(), self.bmc.next_deadline()) if t is not None]
        return min(times) if times else None


# -- Activate / Deactivate Payload, Get Payload Activation Status (§24) -----------------


def _payload_type(b: int) -> int:
    return b & 0x3F


@attrs.frozen
class ActivatePayloadRequest:
    """App 48h request: payload type, instance (1-based), and the SOL auxiliary data (§24.1)."""

    payload_type: int = PAYLOAD_TYPE_SOL
    instance: int = 1
    encrypt: bool = True
    authenticate: bool = True
    aux: bytes = b"\x00\x00\x00\x00"   # byte 1 carries encrypt [7] / authenticate [6]; kept whole

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> "ActivatePayloadRequest":
        data = bytes(data)
        if len(data) != 6:
            raise SolError(f"Activate Payload request of {len(data)} bytes (expected 6)",
                           client_hint="invalid Activate Payload request length")
        instance = data[1] & 0x0F
        if instance == 0:
            raise SolError("Activate Payload for instance 0 (instances are 1-based)",
                           client_hint="invalid payload instance")
        aux = data[2:6]
        return cls(_payload_type(data[0]), instance, bool(aux[0] & 0x80), bool(aux[0] & 0x40), aux)

    def encode(self) -> bytes:
        first = (self.aux[0] & 0x3F) | (0x80 if self.encrypt else 0) | (0x40 if self.authenticate else 0)
        return bytes((self.payload_type & 0x3F, self.instance & 0x0F, first)) + self.aux[1:4]


@attrs.frozen
class ActivatePayloadResponse:
    """App 48h response: completion code, then (when 00h) 12 bytes (§24.1)."""

    completion_code: int = CC_OK
    aux: bytes = b"\x00\x00\x00\x00"
    inbound_size: int = HEADER_SIZE + MAX_CHARACTERS    # what the BMC accepts per packet (header included)
    outbound_size: int = HEADER_SIZE + MAX_CHARACTERS   # what the BMC sends per packet at most
    port: int = 623
    vlan: int = 0xFFFF                                  # FFFFh: no VLAN

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> "ActivatePayloadResponse":
        data = bytes(data)
        if not data:
            raise SolError("empty Activate Payload response", client_hint="malformed Activate Payload response")
        if data[0] != CC_OK:
            return cls(completion_code=data[0])
        if len(data) != 13:
            raise SolError(f"Activate Payload response of {len(data)} bytes (expected 13)",
                           client_hint="malformed Activate Payload response")
        inbound, outbound, port, vlan = struct.unpack_from("<HHHH", data, 5)
        return cls(CC_OK, data[1:5], inbound, outbound, port, vlan)

    def encode(self) -> bytes:
        if self.completion_code != CC_OK:
            return bytes((self.completion_code,))
        return bytes((CC_OK,)) + self.aux + struct.pack("<HHHH", self.inbound_size, self.outbound_size,
                                                        self.port, self.vlan)

    @property
    def characters_in(self) -> int:
        """Characters per packet the BMC takes (its inbound size less the SOL header), 1..255."""
        return max(1, min(MAX_CHARACTERS, self.inbound_size - HEADER_SIZE))


@attrs.frozen
class DeactivatePayloadRequest:
    """App 49h request (§24.2): payload type, instance, 4 bytes of (for SOL, reserved) aux data."""

    payload_type: int = PAYLOAD_TYPE_SOL
    instance: int = 1
    aux: bytes = b"\x00\x00\x00\x00"

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> "DeactivatePayloadRequest":
        data = bytes(data)
        # ipmitool sends 6 bytes; the aux bytes are optional for payloads that define none.
        if len(data) not in (2, 6):
            raise SolError(f"Deactivate Payload request of {len(data)} bytes (expected 6)",
                           client_hint="invalid Deactivate Payload request length")
        instance = data[1] & 0x0F
        if instance == 0:
            raise SolError("Deactivate Payload for instance 0 (instances are 1-based)",
                           client_hint="invalid payload instance")
        return cls(_payload_type(data[0]), instance, data[2:6] if len(data) == 6 else b"\x00\x00\x00\x00")

    def encode(self) -> bytes:
        return bytes((self.payload_type & 0x3F, self.instance & 0x0F)) + self.aux


@attrs.frozen
class PayloadActivationStatus:
    """App 4Ah response (§24.4): how many instances may be active, and which are."""

    completion_code: int = CC_OK
    capacity: int = 1
    active: frozenset[int] = frozenset()

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> "PayloadActivationStatus":
        data = bytes(data)
        if not data:
            raise SolError("empty Get Payload Activation Status response",
                           client_hint="malformed Get Payload Activation Status response")
        if data[0] != CC_OK:
            return cls(completion_code=data[0], capacity=0)
        if len(data) != 4:
            raise SolError(f"Get Payload Activation Status response of {len(data)} bytes (expected 4)",
                           client_hint="malformed Get Payload Activation Status response")
        bits = data[2] | data[3] << 8
        return cls(CC_OK, data[1] & 0x0F, frozenset(i + 1 for i in range(16) if bits >> i & 1))

    def encode(self) -> bytes:
        if self.completion_code != CC_OK:
            return bytes((self.completion_code,))
        bits = 0
        for i in self.active:
            if not 1 <= i <= 16:
                raise SolError(f"payload instance {i} out of range 1..16")
            bits |= 1 << (i - 1)
        return bytes((CC_OK, self.capacity & 0x0F, bits & 0xFF, bits >> 8))


def decode_status_request(data: bytes | bytearray | memoryview) -> int:
    """App 4Ah request: the payload type asked about."""
    data = bytes(data)
    if len(data) != 1:
        raise SolError(f"Get Payload Activation Status request of {len(data)} bytes (expected 1)",
                       client_hint="invalid Get Payload Activation Status request length")
    return _payload_type(data[0])


def describe_flags(flags: int, *, from_bmc: bool) -> list[str]:
    """Names of the set bits (for the audit), in the direction's vocabulary."""
    kind: Iterable[enum.IntFlag] = SolStatus if from_bmc else SolOperation
    return [f.name.lower() for f in kind if f & flags and f.name]

