"""RMCP / IPMI LAN packets, sans-IO: parse and build datagrams, no sockets, no trio.

Strategy.  One UDP datagram is one packet (IPMI v2.0 §13.1: RMCP over UDP
port 623), so the codec is a pair of pure functions per layer, not a stream
decoder:

    RMCP header (ASF 2.0 §3.2.2.1; IPMI v2.0 §13.1.3)   version 06h, reserved, sequence FFh (no ACK), class
      ├─ class 06h ASF: presence ping / pong (ASF 2.0 §3.2.4; IPMI v2.0 §13.2.3)
      └─ class 07h IPMI:
          ├─ auth type 00h: IPMI v1.5 session header (§13.6), session-less:
          │                 Get Channel Authentication Capabilities before RMCP+
          └─ auth type 06h: IPMI v2.0 / RMCP+ session header (§13.6, table 13-8):
                            payload type (bit 7 encrypted, bit 6 authenticated), session id,
                            session sequence, payload length, payload, then when authenticated the
                            integrity trailer: pad (FFh…) to a DWORD, pad length, next header 07h,
                            AuthCode (§13.28.4)

``parse(datagram)`` reads the headers only and never touches keys: the
engine learns which session a datagram belongs to before any cryptography
runs.  ``SessionKeys.open(packet)`` then checks the AuthCode (constant time)
and decrypts (AES-CBC-128, §13.29: IV, then ciphertext of payload + pad
01h,02h,… + pad length); ``SessionKeys.seal`` builds the reverse.  Both
roles use the same object: the proxy seals toward the client with the
client session's keys and toward the BMC with its own session's keys.

IPMI messages inside payload type 00h (§13.8, table 13-4): rsAddr,
netFn/rsLUN, checksum, rqAddr, rqSeq/rqLUN, cmd, data, checksum (two's
complement sums, §13.8).  ``Request``/``Response`` are the decoded forms.

Every malformed input raises ``IpmiError`` (a ``ValueError``) and nothing
else; the Hypothesis fuzz in tests/unit/ipmi holds the codec to that.  A
datagram that fails here is dropped by the engine (UDP: the client's own
retransmission is its recovery), never answered with a guess.
"""

from __future__ import annotations

import hmac
import os
import struct
from typing import Callable

import attrs
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

RMCP_VERSION = 0x06
RMCP_SEQ_NOACK = 0xFF
CLASS_ASF = 0x06
CLASS_IPMI = 0x07

AUTH_NONE = 0x00
AUTH_RMCPP = 0x06  # "format = RMCP+" (IPMI v2.0 §13.6)

# Payload types (IPMI v2.0 §13.27.3, table 13-16)
PT_IPMI = 0x00
PT_SOL = 0x01
PT_OEM = 0x02
PT_OPEN_SESSION_REQUEST = 0x10
PT_OPEN_SESSION_RESPONSE = 0x11
PT_RAKP1 = 0x12
PT_RAKP2 = 0x13
PT_RAKP3 = 0x14
PT_RAKP4 = 0x15

NEXT_HEADER = 0x07  # the integrity trailer's "next header" byte: always 07h (§13.6)
ASF_IANA = 4542  # 0x000011BE, ASF's enterprise number
ASF_PING = 0x80
ASF_PONG = 0x40

MAX_PAYLOAD = 0xFFFF


class IpmiError(ValueError):
    """A datagram or message this codec cannot accept (the only exception the decoders raise)."""


# -- RMCP / ASF ------------------------------------------------------------------------------


@attrs.frozen
class AsfPing:
    tag: int


@attrs.frozen
class Packet15:
    """An IPMI v1.5 session packet (only session-less, auth type none, is used by RMCP+ consoles)."""

    auth_type: int
    seq: int
    session_id: int
    message: bytes


@attrs.frozen
class Packet20:
    """An RMCP+ packet as received: headers parsed, payload still sealed (``open`` it with the keys)."""

    payload_type: int
    encrypted: bool
    authenticated: bool
    session_id: int
    seq: int
    payload: bytes  # as on the wire (IV + ciphertext when encrypted)
    signed: bytes = b""  # the integrity data range (auth type … next header), when authenticated
    auth_code: bytes = b""
    oem: tuple[int, int] | None = None  # (IANA, OEM payload id) for payload type 02h


def rmcp_header(cls: int) -> bytes:
    return bytes((RMCP_VERSION, 0, RMCP_SEQ_NOACK, cls))


def parse(data: bytes, *, auth_code_size: int | None = None) -> AsfPing | Packet15 | Packet20:
    """The headers of one datagram.  ``auth_code_size``: the AuthCode length of the session's integrity
    algorithm (12 or 16), needed to split an authenticated packet's trailer; None: take the trailer
    as it must be for the known sizes (the engine passes the session's)."""
    if len(data) < 4:
        raise IpmiError("datagram shorter than an RMCP header")
    if data[0] != RMCP_VERSION:
        raise IpmiError(f"RMCP version {data[0]:#04x} (expected 06h)")
    cls = data[3] & 0x1F  # bit 7 is the ACK flag; class in bits 4:0 (ASF 2.0 table 14)
    if data[3] & 0x80:
        raise IpmiError("RMCP ACK messages are not used by IPMI")
    if cls == CLASS_ASF:
        return _parse_asf(data)
    if cls != CLASS_IPMI:
        raise IpmiError(f"RMCP class {cls:#04x} (expected ASF 06h or IPMI 07h)")
    if len(data) < 5:
        raise IpmiError("IPMI packet without a session header")
    auth_type = data[4] & 0x0F
    if auth_type == AUTH_RMCPP:
        return _parse20(data, auth_code_size)
    if auth_type != AUTH_NONE:
        raise IpmiError(f"IPMI v1.5 authentication type {auth_type} (the proxy speaks RMCP+ only)")
    if len(data) < 14:
        raise IpmiError("IPMI v1.5 session header truncated")
    seq, sid = struct.unpack_from("<II", data, 5)
    length = data[13]
    message = bytes(data[14:14 + length])
    if len(message) != length:
        raise IpmiError("IPMI v1.5 message shorter than its length byte")
    # Some consoles add one legacy pad byte after the message (IPMI v2.0 §13.6, note on v1.5 packets).
    if len(data) - 14 - length > 1:
        raise IpmiError("trailing bytes after an IPMI v1.5 message")
    return Packet15(auth_type, seq, sid, message)


def _parse_asf(data: bytes) -> AsfPing:
    if len(data) < 12:
        raise IpmiError("ASF message truncated")
    iana, mtype, tag, _, length = struct.unpack_from(">IBBBB", data, 4)
    if iana != ASF_IANA:
        raise IpmiError(f"ASF IANA {iana} (expected {ASF_IANA})")
    if mtype != ASF_PING:
        raise IpmiError(f"ASF message type {mtype:#04x} (only a presence ping is answered)")
    if length != 0 or len(data) != 12:
        raise IpmiError("ASF presence ping with data")
    return AsfPing(tag)


def _parse20(data: bytes, auth_code_size: int | None) -> Packet20:
    pos = 5
    if len(data) < pos + 1:
        raise IpmiError("RMCP+ header truncated")
    ptype = data[pos]
    pos += 1
    encrypted, authenticated, payload_type = bool(ptype & 0x80), bool(ptype & 0x40), ptype & 0x3F
    oem = None
    if payload_type == PT_OEM:
        if len(data) < pos + 6:
            raise IpmiError("RMCP+ OEM payload header truncated")
        iana = int.from_bytes(data[pos:pos + 4], "little")
        oem = (iana, int.from_bytes(data[pos + 4:pos + 6], "little"))
        pos += 6
    if len(data) < pos + 10:
        raise IpmiError("RMCP+ session header truncated")
    sid, seq, length = struct.unpack_from("<IIH", data, pos)
    pos += 10
    payload = bytes(data[pos:pos + length])
    if len(payload) != length:
        raise IpmiError("RMCP+ payload shorter than its length field")
    end = pos + length
    if not authenticated:
        if end != len(data):
            raise IpmiError("trailing bytes after an unauthenticated RMCP+ payload")
        return Packet20(payload_type, encrypted, False, sid, seq, payload, oem=oem)
    sizes = (auth_code_size,) if auth_code_size is not None else (12, 16)
    for size in sizes:
        # The trailer: pad (FFh) so that auth type … next header is a multiple of 4, pad length, 07h, AuthCode.
        trailer_end = len(data) - size
        if trailer_end < end + 2:
            continue
        pad_length, next_header = data[trailer_end - 2], data[trailer_end - 1]
        if next_header != NEXT_HEADER or end + pad_length + 2 != trailer_end or (trailer_end - 4) % 4:
            continue
        if any(b != 0xFF for b in data[end:end + pad_length]):
            raise IpmiError("RMCP+ integrity pad bytes are not FFh")
        return Packet20(payload_type, encrypted, True, sid, seq, payload, bytes(data[4:trailer_end]),
                        bytes(data[trailer_end:]), oem)
    raise IpmiError("RMCP+ integrity trailer malformed (pad, pad length, next header 07h, AuthCode)")


def asf_pong(tag: int) -> bytes:
    """The presence pong (ASF 2.0 §3.2.4.3): IANA 4542, no OEM, entities 81h (IPMI supported, ASF 1.0)."""
    body = struct.pack(">IIBB6x", ASF_IANA, 0, 0x81, 0x00)
    return rmcp_header(CLASS_ASF) + struct.pack(">IBBBB", ASF_IANA, ASF_PONG, tag, 0, len(body)) + body


def asf_ping(tag: int) -> bytes:
    return rmcp_header(CLASS_ASF) + struct.pack(">IBBBB", ASF_IANA, ASF_PING, tag, 0, 0)


def packet15(message: bytes, *, seq: int = 0, session_id: int = 0) -> bytes:
    """A session-less IPMI v1.5 packet (auth type none)."""
    return rmcp_header(CLASS_IPMI) + struct.pack("<BIIB", AUTH_NONE, seq, session_id, len(message)) + message


def packet20_clear(payload_type: int, payload: bytes, *, session_id: int = 0, seq: int = 0) -> bytes:
    """An unauthenticated, unencrypted RMCP+ packet (the session setup messages, §13.17–13.23)."""
    if len(payload) > MAX_PAYLOAD:
        raise IpmiError("payload too large")
    return rmcp_header(CLASS_IPMI) + struct.pack("<BBIIH", AUTH_RMCPP, payload_type, session_id, seq,
                                                 len(payload)) + payload


# -- session keys: integrity (§13.28.4) and confidentiality (§13.29) ------------------------


@attrs.frozen
class Integrity:
    """An integrity algorithm: HMAC with ``digest``, truncated to ``size`` bytes."""

    number: int
    digest: str
    size: int


INTEGRITY_HMAC_SHA1_96 = Integrity(0x01, "sha1", 12)
INTEGRITY_HMAC_SHA256_128 = Integrity(0x04, "sha256", 16)
CONF_NONE = 0x00
CONF_AES_CBC_128 = 0x01
AES_BLOCK = 16


@attrs.define(eq=False)
class SessionKeys:
    """One RMCP+ session's K1 (integrity) and K2 (confidentiality: its first 16 bytes are the AES key)."""

    integrity: Integrity
    k1: bytes = attrs.field(repr=False)
    k2: bytes = attrs.field(repr=False)
    confidentiality: int = CONF_AES_CBC_128
    random: Callable[[int], bytes] = os.urandom  # the IVs; replaceable only in tests
    _cipher_key: bytes = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        self._cipher_key = self.k2[:16]  # AES-CBC-128's key: the first 16 bytes of K2 (§13.29)

    def auth_code(self, signed: bytes) -> bytes:
        return hmac.new(self.k1, signed, self.integrity.digest).digest()[:self.integrity.size]

    def seal(self, payload_type: int, payload: bytes, *, session_id: int, seq: int, encrypt: bool = True) -> bytes:
        """An authenticated (and, with ``encrypt`` and AES, encrypted) packet of this session."""
        body = self._encrypt(payload) if encrypt and self.confidentiality == CONF_AES_CBC_128 else payload
        encrypted = encrypt and self.confidentiality == CONF_AES_CBC_128
        if len(body) > MAX_PAYLOAD:
            raise IpmiError("payload too large")
        head = struct.pack("<BBIIH", AUTH_RMCPP, (0x80 if encrypted else 0) | 0x40 | payload_type, session_id, seq,
                           len(body))
        # The integrity pad makes auth type … next header a multiple of 4 bytes (§13.6, "Integrity PAD").
        pad = -(len(head) + len(body) + 2) % 4
        signed = head + body + b"\xff" * pad + bytes((pad, NEXT_HEADER))
        return rmcp_header(CLASS_IPMI) + signed + self.auth_code(signed)

    def open(self, packet: Packet20) -> bytes:
        """The clear payload of a packet of this session; raises IpmiError on a bad AuthCode or padding."""
        if not packet.authenticated:
            raise IpmiError("unauthenticated packet in an authenticated session")
        if len(packet.auth_code) != self.integrity.size or \
                not hmac.compare_digest(self.auth_code(packet.signed), packet.auth_code):
            raise IpmiError("invalid AuthCode (integrity check failed)")
        if not packet.encrypted:
            if self.confidentiality != CONF_NONE and packet.payload_type in (PT_IPMI, PT_SOL):
                raise IpmiError("unencrypted payload in a confidential session")
            return packet.payload
        if self.confidentiality != CONF_AES_CBC_128:
            raise IpmiError("encrypted payload in a session without confidentiality")
        return self._decrypt(packet.payload)

    def _encrypt(self, data: bytes) -> bytes:
        pad = -(len(data) + 1) % AES_BLOCK
        plain = data + bytes(range(1, pad + 1)) + bytes((pad,))
        iv = self.random(AES_BLOCK)
        enc = Cipher(algorithms.AES(self._cipher_key), modes.CBC(iv)).encryptor()
        return iv + enc.update(plain) + enc.finalize()

    def _decrypt(self, data: bytes) -> bytes:
        if len(data) < 2 * AES_BLOCK or len(data) % AES_BLOCK:
            raise IpmiError("AES-CBC-128 payload is not IV + whole blocks")
        dec = Cipher(algorithms.AES(self._cipher_key), modes.CBC(data[:AES_BLOCK])).decryptor()
        plain = dec.update(data[AES_BLOCK:]) + dec.finalize()
        pad = plain[-1]
        if pad >= AES_BLOCK or plain[len(plain) - 1 - pad:-1] != bytes(range(1, pad + 1)):
            raise IpmiError("AES-CBC-128 confidentiality pad malformed")
        return plain[:len(plain) - 1 - pad]


# -- the session sequence window (§6.12.13) --------------------------------------------------

SEQ_WINDOW = 16


class SequenceWindow:
    """Inbound session sequence numbers of one session: replay refusal with a sliding window.

    IPMI v2.0 §6.12.13: an RMCP+ session's sequence numbers start at 1 and
    increase by one per packet (0 is reserved for packets outside a session);
    the receiver accepts a number up to 16 behind the highest it has seen, once
    each (a late, reordered datagram), and one ahead of it by up to 16 (lost
    datagrams in between); anything else — a duplicate, older than the
    window, too far ahead — is dropped as a possible replay.
    """

    def __init__(self, size: int = SEQ_WINDOW) -> None:
        self.size = size
        self.highest = 0
        self._seen = 0  # bit i: highest - i was received

    def accept(self, seq: int) -> bool:
        """True (and remembered) when ``seq`` is new and inside the window; False to drop the packet."""
        if seq == 0:
            return False
        if self.highest == 0:
            if seq > self.size:
                return False
            self.highest, self._seen = seq, 1
            return True
        delta = (seq - self.highest) & 0xFFFFFFFF
        if 0 < delta <= self.size:  # ahead (wrapping past 2^32 like the sender's counter)
            self._seen = ((self._seen << delta) | 1) & ((1 << self.size) - 1)
            self.highest = seq
            return True
        back = (self.highest - seq) & 0xFFFFFFFF
        if back < self.size:
            bit = 1 << back
            if self._seen & bit:
                return False
            self._seen |= bit
            return True
        return False


def next_seq(seq: int) -> int:
    """The next outbound session sequence number (wraps past 0, which is never used in a session)."""
    seq = (seq + 1) & 0xFFFFFFFF
    return seq or 1


# -- IPMI messages (§13.8) ---------------------------------------------------------------------

BMC_ADDR = 0x20
CONSOLE_ADDR = 0x81  # the remote console's software ID (IPMI v2.0 §5.5)


def checksum(data: bytes) -> int:
    return -sum(data) & 0xFF


@attrs.frozen
class Request:
    netfn: int
    cmd: int
    data: bytes = b""
    rq_seq: int = 0
    rs_addr: int = BMC_ADDR
    rs_lun: int = 0
    rq_addr: int = CONSOLE_ADDR
    rq_lun: int = 0

    def encode(self) -> bytes:
        head = bytes((self.rs_addr, (self.netfn << 2) | self.rs_lun))
        body = bytes((self.rq_addr, (self.rq_seq << 2) | self.rq_lun, self.cmd)) + self.data
        return head + bytes((checksum(head),)) + body + bytes((checksum(body),))

    @classmethod
    def decode(cls, message: bytes) -> "Request":
        rs_addr, netfn_lun, rq_addr, seq_lun, cmd, data = _split(message)
        netfn = netfn_lun >> 2
        if netfn & 1:
            raise IpmiError(f"netFn {netfn:#04x} is a response netFn in a request")
        return cls(netfn, cmd, data, seq_lun >> 2, rs_addr, netfn_lun & 3, rq_addr, seq_lun & 3)

    def response(self, cc: int, data: bytes = b"") -> "Response":
        """The response to this request (netFn + 1, the request's addresses swapped)."""
        return Response(self.netfn | 1, self.cmd, cc, data, self.rq_seq, self.rq_addr, self.rq_lun, self.rs_addr,
                        self.rs_lun)


@attrs.frozen
class Response:
    netfn: int  # odd
    cmd: int
    cc: int
    data: bytes = b""
    rq_seq: int = 0
    rq_addr: int = CONSOLE_ADDR
    rq_lun: int = 0
    rs_addr: int = BMC_ADDR
    rs_lun: int = 0

    def encode(self) -> bytes:
        head = bytes((self.rq_addr, (self.netfn << 2) | self.rq_lun))
        body = bytes((self.rs_addr, (self.rq_seq << 2) | self.rs_lun, self.cmd, self.cc)) + self.data
        return head + bytes((checksum(head),)) + body + bytes((checksum(body),))

    @classmethod
    def decode(cls, message: bytes) -> "Response":
        rq_addr, netfn_lun, rs_addr, seq_lun, cmd, data = _split(message)
        netfn = netfn_lun >> 2
        if not netfn & 1:
            raise IpmiError(f"netFn {netfn:#04x} is a request netFn in a response")
        if not data:
            raise IpmiError("response without a completion code")
        return cls(netfn, cmd, data[0], data[1:], seq_lun >> 2, rq_addr, netfn_lun & 3, rs_addr, seq_lun & 3)


def _split(message: bytes) -> tuple[int, int, int, int, int, bytes]:
    if len(message) < 7:
        raise IpmiError("IPMI message shorter than its 7-byte frame")
    if checksum(message[:2]) != message[2]:
        raise IpmiError("IPMI message header checksum mismatch")
    if checksum(message[3:-1]) != message[-1]:
        raise IpmiError("IPMI message data checksum mismatch")
    return message[0], message[1], message[3], message[4], message[5], bytes(message[6:-1])
