"""TPKT + X.224 connection setup of RDP, sans-IO: the one part of an RDP connection the proxy reads.

Strategy.  An RDP connection starts in the clear with one exchange ([MS-RDPBCGR] 1.3.1.1,
"Connection Initiation"): the client's X.224 Connection Request (2.2.1.1) and the server's
X.224 Connection Confirm (2.2.1.2), each in one TPKT (T.123 section 8 / RFC 1006: version 3, a
reserved byte, a 16-bit big-endian length counting the 4-byte header).  Everything after it is
TLS (then CredSSP, when HYBRID was selected) or Standard RDP Security, end to end between
client and server; the proxy does not read it.  So this module parses exactly these two PDUs
and builds the few the proxy sends itself:

- ``ConnectionRequest``: the optional routing token or cookie line (``Cookie: mstshash=USER``
  terminated by CR LF, 2.2.1.1), the optional ``RDP_NEG_REQ`` (2.2.1.1.1: flags, requested
  protocols) and the optional ``RDP_NEG_CORRELATION_INFO`` (2.2.1.1.2);
- ``ConnectionConfirm``: the optional ``RDP_NEG_RSP`` (2.2.1.2.1: selected protocol) or
  ``RDP_NEG_FAILURE`` (2.2.1.2.2: failure code);
- ``encode_connection_request`` (the CR re-encoded with another routing token or cookie line),
  ``encode_negotiation_failure`` and ``encode_disconnect_request`` (X.224 DR, ISO 8073 13.5) for
  the proxy's own answers.

``X224Decoder`` is h11-shaped: ``feed(bytes)``, ``next_message()`` → a message or ``NEED_DATA``;
the same result however the input is split.  Anything malformed raises ``X224Error`` (a
``RemoteProtocolError``) with a client hint; no other exception escapes (fuzzed).  Each message
keeps ``raw``, its exact bytes, so the proxy forwards what it received.
"""

from __future__ import annotations

import struct

import attrs

from dbproxy.buffer import ReceiveBuffer
from dbproxy.errors import RemoteProtocolError
from dbproxy.sansio import NEED_DATA

TPKT_VERSION = 3
TPKT_HEADER = 4
# The TPKT length field is 16 bits (T.123 8): no TPKT is longer.  A Connection Request is far
# shorter (a cookie of a few dozen bytes, 8 + 36 bytes of negotiation data); the engine may cap lower.
TPKT_MAX = 0xFFFF

# X.224 TPDU codes (ISO 8073 13.1, high nibble of the second byte; the low nibble is the credit).
TPDU_CONNECTION_REQUEST = 0xE0
TPDU_CONNECTION_CONFIRM = 0xD0
TPDU_DISCONNECT_REQUEST = 0x80
# LI + code + DST-REF(2) + SRC-REF(2) + class option(1): the fixed part of a CR/CC.
X224_FIXED = 7

# [MS-RDPBCGR] 2.2.1.1.1 RDP_NEG_REQ / 2.2.1.2.1 RDP_NEG_RSP / 2.2.1.2.2 RDP_NEG_FAILURE.
TYPE_RDP_NEG_REQ = 0x01
TYPE_RDP_NEG_RSP = 0x02
TYPE_RDP_NEG_FAILURE = 0x03
TYPE_RDP_CORRELATION_INFO = 0x06
NEG_LENGTH = 8
CORRELATION_INFO_LENGTH = 36
CORRELATION_INFO_PRESENT = 0x08

# requestedProtocols / selectedProtocol bits (2.2.1.1.1).  PROTOCOL_RDP is the value 0.
PROTOCOLS = (
    (0x01, "SSL"),
    (0x02, "HYBRID"),
    (0x04, "RDSTLS"),
    (0x08, "HYBRID_EX"),
    (0x10, "RDSAAD"),
)

# failureCode (2.2.1.2.2).
FAILURE_CODES = {
    1: "SSL_REQUIRED_BY_SERVER",
    2: "SSL_NOT_ALLOWED_BY_SERVER",
    3: "SSL_CERT_NOT_ON_SERVER",
    4: "INCONSISTENT_FLAGS",
    5: "HYBRID_REQUIRED_BY_SERVER",
    6: "SSL_WITH_USER_AUTH_REQUIRED_BY_SERVER",
}

COOKIE_PREFIX = b"Cookie: mstshash="
CRLF = b"\r\n"

_NEG = struct.Struct("<BBHI")


class X224Error(RemoteProtocolError):
    """The peer's TPKT / X.224 connection PDU is malformed (the message says where)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, client_hint=f"malformed RDP connection request: {message}")


def protocol_names(bits: int) -> list[str]:
    """``requestedProtocols`` as names; 0 is Standard RDP Security (``RDP``); unknown bits as hex."""
    if bits == 0:
        return ["RDP"]
    names = [name for bit, name in PROTOCOLS if bits & bit]
    known = 0
    for bit, _ in PROTOCOLS:
        known |= bit
    if bits & ~known:
        names.append(f"0x{bits & ~known:x}")
    return names


def selected_name(value: int) -> str:
    """A ``selectedProtocol`` (one value, 2.2.1.2.1) as a name."""
    return "+".join(protocol_names(value))


@attrs.frozen
class NegotiationRequest:
    """RDP_NEG_REQ (2.2.1.1.1)."""

    flags: int
    requested_protocols: int

    @property
    def protocols(self) -> list[str]:
        return protocol_names(self.requested_protocols)


@attrs.frozen
class ConnectionRequest:
    """A client's X.224 Connection Request (2.2.1.1).

    ``token``: the routing token or cookie line without its CR LF (None: none sent);
    ``cookie_user``: the IDENTIFIER of a ``Cookie: mstshash=IDENTIFIER`` line (what the client
    announces as its user name: unauthenticated, clients fill it from the login they will
    present inside TLS); ``negotiation``: the RDP_NEG_REQ (None: a legacy client offering
    Standard RDP Security only); ``tail``: the bytes after it (correlation info), kept as sent.
    """

    raw: bytes
    src_ref: int
    class_option: int
    token: bytes | None
    negotiation: NegotiationRequest | None
    tail: bytes = b""

    @property
    def cookie_user(self) -> str | None:
        if self.token is None or not self.token.startswith(COOKIE_PREFIX):
            return None
        return self.token[len(COOKIE_PREFIX):].decode("latin-1")

    @property
    def requested_protocols(self) -> int:
        return self.negotiation.requested_protocols if self.negotiation is not None else 0


@attrs.frozen
class ConnectionConfirm:
    """A server's X.224 Connection Confirm (2.2.1.2): ``selected_protocol`` from RDP_NEG_RSP
    (None: no negotiation data, i.e. Standard RDP Security for a legacy request), or
    ``failure_code`` from RDP_NEG_FAILURE."""

    raw: bytes
    flags: int = 0
    selected_protocol: int | None = None
    failure_code: int | None = None

    @property
    def failure(self) -> str | None:
        if self.failure_code is None:
            return None
        return FAILURE_CODES.get(self.failure_code, f"0x{self.failure_code:x}")


def _tpkt(buffer: ReceiveBuffer, limit: int) -> bytes | None:
    """One whole TPKT off ``buffer`` (None: incomplete), its header checked (T.123 8)."""
    if len(buffer) < TPKT_HEADER:
        # A first byte that cannot start a TPKT is an error now, not after 4 bytes: a TLS
        # ClientHello (0x16) sent straight at an RDP port is the common case.
        if len(buffer) and buffer.peek_byte() != TPKT_VERSION:
            raise X224Error(f"not a TPKT (version 3) header: first byte 0x{buffer.peek_byte():02x}")
        return None
    version, reserved, length = buffer.unpack(_TPKT)
    if version != TPKT_VERSION:
        raise X224Error(f"not a TPKT (version 3) header: first byte 0x{version:02x}")
    if length < TPKT_HEADER + X224_FIXED:
        raise X224Error(f"TPKT length {length} is shorter than an X.224 connection TPDU ({TPKT_HEADER + X224_FIXED})")
    if length > limit:
        raise X224Error(f"TPKT length {length} exceeds the {limit} bytes allowed for a connection PDU")
    if len(buffer) < length:
        return None
    return bytes(buffer.take(length))


_TPKT = struct.Struct(">BBH")


def _x224_fixed(pdu: bytes, code: int, what: str) -> int:
    """Check LI and the TPDU code of a CR/CC; return the offset of its variable part."""
    li = pdu[4]
    if li != len(pdu) - TPKT_HEADER - 1:
        raise X224Error(f"X.224 length indicator {li} does not match the TPKT ({len(pdu) - TPKT_HEADER - 1} bytes follow it)")
    if pdu[5] & 0xF0 != code:
        raise X224Error(f"expected an X.224 {what} (TPDU code 0x{code:02x}), got code 0x{pdu[5] & 0xF0:02x}")
    return TPKT_HEADER + X224_FIXED


def parse_connection_request(pdu: bytes) -> ConnectionRequest:
    pos = _x224_fixed(pdu, TPDU_CONNECTION_REQUEST, "Connection Request")
    dst_ref, src_ref, class_option = struct.unpack_from(">HHB", pdu, 6)
    # 2.2.1.1: class 0 without extended formats; DST-REF zero (ISO 8073 13.3.3).
    if dst_ref != 0:
        raise X224Error(f"X.224 Connection Request with DST-REF {dst_ref} (must be 0)")
    if class_option & 0xF0 != 0:
        raise X224Error(f"X.224 Connection Request asks for class {class_option >> 4} (RDP uses class 0)")
    token = None
    rest = pdu[pos:]
    # The routing token / cookie: text ending in CR LF, before the binary negotiation data.  A
    # first byte that is an RDP_NEG_REQ type with a length of 8 is negotiation data, not text.
    if rest and not (rest[0] == TYPE_RDP_NEG_REQ and len(rest) >= NEG_LENGTH and rest[2:4] == b"\x08\x00"):
        end = rest.find(CRLF)
        if end < 0:
            raise X224Error("X.224 Connection Request: routing token or cookie without its CR LF terminator")
        token = rest[:end]
        rest = rest[end + 2:]
    negotiation = None
    tail = b""
    if rest:
        if len(rest) < NEG_LENGTH:
            raise X224Error(f"X.224 Connection Request: {len(rest)} stray bytes after the cookie "
                            f"(an RDP_NEG_REQ is {NEG_LENGTH})")
        kind, flags, length, protocols = _NEG.unpack_from(rest)
        if kind != TYPE_RDP_NEG_REQ or length != NEG_LENGTH:
            raise X224Error(f"X.224 Connection Request: expected RDP_NEG_REQ (type 1, length 8), "
                            f"got type {kind}, length {length}")
        negotiation = NegotiationRequest(flags, protocols)
        tail = rest[NEG_LENGTH:]
        if tail:
            # 2.2.1.1.2: only RDP_NEG_CORRELATION_INFO may follow, announced by the flag.
            if not flags & CORRELATION_INFO_PRESENT or len(tail) != CORRELATION_INFO_LENGTH \
                    or tail[0] != TYPE_RDP_CORRELATION_INFO \
                    or struct.unpack_from("<H", tail, 2)[0] != CORRELATION_INFO_LENGTH:
                raise X224Error(f"X.224 Connection Request: {len(tail)} unexpected bytes after RDP_NEG_REQ")
        elif flags & CORRELATION_INFO_PRESENT:
            raise X224Error("X.224 Connection Request: CORRELATION_INFO_PRESENT without the correlation info")
    return ConnectionRequest(raw=pdu, src_ref=src_ref, class_option=class_option, token=token,
                             negotiation=negotiation, tail=tail)


def parse_connection_confirm(pdu: bytes) -> ConnectionConfirm:
    pos = _x224_fixed(pdu, TPDU_CONNECTION_CONFIRM, "Connection Confirm")
    rest = pdu[pos:]
    if not rest:
        return ConnectionConfirm(raw=pdu)
    if len(rest) != NEG_LENGTH:
        raise X224Error(f"X.224 Connection Confirm: {len(rest)} bytes of negotiation data (expected {NEG_LENGTH})")
    kind, flags, length, value = _NEG.unpack_from(rest)
    if length != NEG_LENGTH:
        raise X224Error(f"X.224 Connection Confirm: negotiation data of length {length} (expected {NEG_LENGTH})")
    if kind == TYPE_RDP_NEG_RSP:
        return ConnectionConfirm(raw=pdu, flags=flags, selected_protocol=value)
    if kind == TYPE_RDP_NEG_FAILURE:
        return ConnectionConfirm(raw=pdu, flags=flags, failure_code=value)
    raise X224Error(f"X.224 Connection Confirm: negotiation data of type {kind} (expected 2 or 3)")


class X224Decoder:
    """The connection PDU of one direction: ``client=True`` parses a Connection Request, else a
    Connection Confirm.  One message per connection; bytes after it stay in ``buffer``
    (``rest()``) for the relay."""

    def __init__(self, *, client: bool, max_size: int = TPKT_MAX) -> None:
        self.buffer = ReceiveBuffer()
        self.client = client
        self.max_size = min(max_size, TPKT_MAX)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self.buffer.feed(data)

    def next_message(self) -> ConnectionRequest | ConnectionConfirm | object:
        pdu = _tpkt(self.buffer, self.max_size)
        if pdu is None:
            return NEED_DATA
        return parse_connection_request(pdu) if self.client else parse_connection_confirm(pdu)

    def announced_length(self) -> int | None:
        """The TPKT's length while it is partly received (the buffer budget's question)."""
        if len(self.buffer) < TPKT_HEADER:
            return None
        return self.buffer.unpack(_TPKT)[2]

    def rest(self) -> bytes:
        """What the peer sent after the PDU (normally nothing: each side waits for the other)."""
        return self.buffer.take_rest()


def _wrap(x224: bytes) -> bytes:
    return struct.pack(">BBH", TPKT_VERSION, 0, TPKT_HEADER + len(x224)) + x224


def encode_connection_request(request: ConnectionRequest, token: bytes | None) -> bytes:
    """``request`` with its routing token / cookie line replaced by ``token`` (None: dropped); the
    negotiation data and correlation info as the client sent them."""
    variable = b""
    if token is not None:
        variable += token + CRLF
    if request.negotiation is not None:
        n = request.negotiation
        variable += _NEG.pack(TYPE_RDP_NEG_REQ, n.flags, NEG_LENGTH, n.requested_protocols) + request.tail
    fixed = struct.pack(">BBHHB", X224_FIXED - 1 + len(variable), TPDU_CONNECTION_REQUEST, 0, request.src_ref,
                        request.class_option)
    return _wrap(fixed + variable)


def encode_connection_confirm(*, selected_protocol: int | None = None, failure_code: int | None = None,
                              flags: int = 0, src_ref: int = 0x1234) -> bytes:
    """A Connection Confirm with RDP_NEG_RSP or RDP_NEG_FAILURE (or neither)."""
    variable = b""
    if failure_code is not None:
        variable = _NEG.pack(TYPE_RDP_NEG_FAILURE, 0, NEG_LENGTH, failure_code)
    elif selected_protocol is not None:
        variable = _NEG.pack(TYPE_RDP_NEG_RSP, flags, NEG_LENGTH, selected_protocol)
    fixed = struct.pack(">BBHHB", X224_FIXED - 1 + len(variable), TPDU_CONNECTION_CONFIRM, 0, src_ref, 0)
    return _wrap(fixed + variable)


def encode_negotiation_failure(code: int) -> bytes:
    """A Connection Confirm carrying RDP_NEG_FAILURE (2.2.1.2.2) with ``code``."""
    return encode_connection_confirm(failure_code=code)


def encode_disconnect_request(dst_ref: int = 0, reason: int = 0) -> bytes:
    """An X.224 Disconnect Request (ISO 8073 13.5: LI, 0x80, DST-REF, SRC-REF, reason): the
    transport's own "connection refused", sent in place of a Connection Confirm.  Reason 0 is
    "not specified"; 3 is "address unknown" (ISO 8073 13.5.3 e)."""
    return _wrap(struct.pack(">BBHHB", 6, TPDU_DISCONNECT_REQUEST, dst_ref, 0, reason))


__all__ = ["ConnectionConfirm", "ConnectionRequest", "NegotiationRequest", "X224Decoder", "X224Error",
           "encode_connection_confirm", "encode_connection_request", "encode_disconnect_request",
           "encode_negotiation_failure", "parse_connection_confirm", "parse_connection_request", "protocol_names",
           "selected_name"]
