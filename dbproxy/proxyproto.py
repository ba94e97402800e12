"""PROXY protocol v1 and v2 headers (HAProxy's spec, "The PROXY protocol", versions 1 and 2): sans-IO.

A load balancer in front of the proxy (HAProxy ``send-proxy`` / ``send-proxy-v2``,
an AWS NLB with proxy protocol v2) opens each connection with one header naming
the real client; without it every audit event would show the balancer's address.

Strategy: ``parse(data)`` looks at the first bytes of a connection and returns
``NEED_DATA`` until a whole header is there, then a ``ProxyHeader`` whose
``length`` says how many bytes the header took — the caller consumes exactly
that many, so the protocol's own bytes behind it stay unread in the socket.
Anything that is not a well-formed header raises ``ProxyProtocolError``: a
listener that expects the header from a source must not guess (spec §2: "the
receiver MUST NOT try to guess whether the protocol header is present").

- v1 (§2.1): one text line ``PROXY TCP4|TCP6|UNKNOWN src dst sport dport\\r\\n``, at
  most 107 bytes.
- v2 (§2.2): the 12-byte signature, version/command, family/transport, a
  16-bit length, the addresses (IPv4 12 bytes, IPv6 36, UNIX 216), then TLVs.
  ``LOCAL`` (health checks) carries no client: the connection's own peer
  address stands.  TLVs are kept raw (``tlvs``), parsed on demand.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Any

import attrs

from .sansio import NEED_DATA

SIGNATURE_V2 = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
V1_MAX = 107  # §2.1: the longest possible v1 line, CRLF included
# v2's length field allows 65535 bytes of addresses and TLVs; real balancers send a few
# hundred at most.  Bounding it keeps a hostile trusted peer from parking 64 KiB per socket.
V2_MAX_PAYLOAD = 4096

_FAMILIES = {0x1: "TCP4", 0x2: "TCP6", 0x3: "UNIX"}
_ADDRESS_LENGTHS = {0x1: 12, 0x2: 36, 0x3: 216}


class ProxyProtocolError(ValueError):
    """The bytes are not a valid PROXY protocol header."""


class ClosedBeforeHeader(ProxyProtocolError):
    """The connection closed before sending a byte: a balancer's TCP health check, not an error."""


@attrs.frozen
class ProxyHeader:
    version: int
    command: str  # "PROXY" or "LOCAL"
    family: str  # "TCP4", "TCP6", "UNIX", "UNSPEC" (v2) or "UNKNOWN" (v1)
    source: tuple[str, int] | None  # the real client; None for LOCAL / UNKNOWN / UNSPEC / UNIX
    destination: tuple[str, int] | None
    length: int  # bytes the header took on the wire
    tlvs: tuple[tuple[int, bytes], ...] = ()

    @property
    def client_addr(self) -> str | None:
        if self.source is None:
            return None
        host, port = self.source
        return f"{host}:{port}"  # the form dbproxy.net.peer_address gives a direct client


def looks_like_header(data: bytes) -> bool | None:
    """True/False once the first bytes tell whether a header starts here; None: too few bytes yet."""
    if data.startswith(SIGNATURE_V2) or data.startswith(V1_PREFIX):
        return True
    if SIGNATURE_V2.startswith(data) or V1_PREFIX.startswith(data):
        return None
    return False


def parse(data: bytes) -> ProxyHeader | Any:
    """The header at the start of ``data``, or ``NEED_DATA``; raises ``ProxyProtocolError``."""
    seen = looks_like_header(data)
    if seen is None:
        return NEED_DATA
    if not seen:
        raise ProxyProtocolError("the connection does not start with a PROXY protocol header")
    if data.startswith(SIGNATURE_V2):
        return _parse_v2(data)
    return _parse_v1(data)


def _parse_v1(data: bytes) -> ProxyHeader | Any:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyProtocolError(f"PROXY v1 line longer than {V1_MAX} bytes")
        return NEED_DATA
    try:
        line = data[:end].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyProtocolError("PROXY v1 line is not ASCII") from None
    parts = line.split(" ")
    length = end + 2
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        # §2.1: UNKNOWN may be followed by anything up to CRLF; the receiver ignores it.
        return ProxyHeader(1, "PROXY", "UNKNOWN", None, None, length)
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ProxyProtocolError(f"malformed PROXY v1 line: {line[:64]!r}")
    family = parts[1]
    src = _v1_address(parts[2], family)
    dst = _v1_address(parts[3], family)
    return ProxyHeader(1, "PROXY", family, (src, _v1_port(parts[4])), (dst, _v1_port(parts[5])), length)


def _v1_address(text: str, family: str) -> str:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyProtocolError(f"PROXY v1: {text[:48]!r} is not an IP address") from None
    if address.version != (4 if family == "TCP4" else 6):
        raise ProxyProtocolError(f"PROXY v1: {text!r} is not an {family} address")
    return str(address)


def _v1_port(text: str) -> int:
    # §2.1: ports are decimal 0..65535 without leading zeroes or sign.
    if not text.isdigit() or (len(text) > 1 and text[0] == "0") or int(text) > 65535:
        raise ProxyProtocolError(f"PROXY v1: {text[:16]!r} is not a port")
    return int(text)


def _parse_v2(data: bytes) -> ProxyHeader | Any:
    if len(data) < 16:
        return NEED_DATA
    ver_cmd, fam, size = data[12], data[13], struct.unpack_from("!H", data, 14)[0]
    if ver_cmd >> 4 != 2:
        raise ProxyProtocolError(f"PROXY v2: version {ver_cmd >> 4}, expected 2")
    command = {0: "LOCAL", 1: "PROXY"}.get(ver_cmd & 0xF)
    if command is None:
        raise ProxyProtocolError(f"PROXY v2: unknown command {ver_cmd & 0xF}")
    if size > V2_MAX_PAYLOAD:
        raise ProxyProtocolError(f"PROXY v2: {size} bytes of addresses and TLVs, more than {V2_MAX_PAYLOAD}")
    length = 16 + size
    if len(data) < length:
        return NEED_DATA
    payload = data[16:length]
    family_code, transport = fam >> 4, fam & 0xF
    if family_code == 0 or command == "LOCAL":
        # §2.2: LOCAL (or UNSPEC): the receiver uses the real connection endpoints.
        return ProxyHeader(2, command, "UNSPEC" if family_code == 0 else _FAMILIES.get(family_code, "UNSPEC"),
                           None, None, length)
    family = _FAMILIES.get(family_code)
    if family is None:
        raise ProxyProtocolError(f"PROXY v2: unknown address family {family_code}")
    if transport not in (1, 2):
        raise ProxyProtocolError(f"PROXY v2: unknown transport {transport}")
    need = _ADDRESS_LENGTHS[family_code]
    if size < need:
        raise ProxyProtocolError(f"PROXY v2: {family} needs {need} address bytes, the header has {size}")
    tlvs = _tlvs(payload[need:])
    if family == "UNIX":
        return ProxyHeader(2, command, family, None, None, length, tlvs)
    width = 4 if family == "TCP4" else 16
    src = str(ipaddress.ip_address(payload[:width]))
    dst = str(ipaddress.ip_address(payload[width:2 * width]))
    sport, dport = struct.unpack_from("!HH", payload, 2 * width)
    return ProxyHeader(2, command, family, (src, sport), (dst, dport), length, tlvs)


def _tlvs(data: bytes) -> tuple[tuple[int, bytes], ...]:
    out = []
    i = 0
    while i < len(data):
        if len(data) - i < 3:
            raise ProxyProtocolError("PROXY v2: truncated TLV")
        kind, size = data[i], struct.unpack_from("!H", data, i + 1)[0]
        if i + 3 + size > len(data):
            raise ProxyProtocolError("PROXY v2: TLV longer than the header")
        out.append((kind, bytes(data[i + 3:i + 3 + size])))
        i += 3 + size
    return tuple(out)


def encode_v2(source: tuple[str, int], destination: tuple[str, int], tlvs: tuple[tuple[int, bytes], ...] = ()) -> bytes:
    """A PROXY v2 header (what a balancer sends): for tests and for the proxy as a client of another proxy."""
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    if src.version != dst.version:
        raise ValueError("source and destination must be the same IP version")
    fam = 0x11 if src.version == 4 else 0x21
    body = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1])
    body += b"".join(struct.pack("!BH", k, len(v)) + v for k, v in tlvs)
    return SIGNATURE_V2 + bytes([0x21, fam]) + struct.pack("!H", len(body)) + body


def encode_v1(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    fam = "TCP4" if ipaddress.ip_address(source[0]).version == 4 else "TCP6"
    return f"PROXY {fam} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n".encode()
