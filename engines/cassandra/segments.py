"""CQL protocol v5+ outer framing: CRC-protected segments (v5 spec section 2).

After the STARTUP handshake, v5+ connections wrap frames ("envelopes") in
segments (the spec calls them frames; we say segment to keep "frame" for the
CQL message).  All integers here are little-endian.

Uncompressed (2.1):  3-byte header = payload length (17 bits) | self-contained
flag (bit 17) | padding, then CRC24 of those 3 bytes (3 bytes), the payload
(at most 2**17 - 1 bytes), and the CRC32 of the payload (4 bytes).

LZ4 (2.2): 5-byte header = compressed length (17 bits) | uncompressed length
(17 bits) | self-contained flag (bit 34) | padding, CRC24 of those 5 bytes,
the payload (a raw LZ4 block) and the CRC32 of the *compressed* payload.  An
uncompressed length of 0 means the payload was sent as is, which Cassandra's
FrameEncoderLZ4 does whenever compression would not make it smaller.

A self-contained segment holds one or more whole frames; a frame larger than
the maximum payload is split across consecutive non-self-contained segments
holding nothing else.

CRCs are Cassandra's (org.apache.cassandra.net.Crc): CRC24 with initial value
0x875060 and polynomial 0x1974F0B, fed the header's bytes least significant
first; CRC32 is the standard CRC-32 (zlib) primed with the bytes
FA 2D 55 CA.  CRC24 runs over 3 or 5 bytes, with a 256-entry table.
"""

from __future__ import annotations

import struct
import zlib

import attrs
import lz4.block

from dbproxy.errors import LocalProtocolError, RemoteProtocolError

MAX_PAYLOAD = 128 * 1024 - 1  # 131071
UNCOMPRESSED_HEADER = 3
COMPRESSED_HEADER = 5
CRC24_SIZE = 3
CRC32_SIZE = 4

CRC24_INIT = 0x875060
CRC24_POLY = 0x1974F0B
CRC32_INIT = zlib.crc32(b"\xfa\x2d\x55\xca")

PAYLOAD_MASK = 0x1FFFF
_FRAME_LENGTH = struct.Struct(">I")
_U32_LE = struct.Struct("<I").unpack_from
_lz4_decompress = lz4.block.decompress
_FRAME_HEADER = 9


def _crc24_table() -> tuple[int, ...]:
    table = []
    for i in range(256):
        crc = i << 16
        for _ in range(8):
            crc <<= 1
            if crc & 0x1000000:
                crc ^= CRC24_POLY
        table.append(crc)
    return tuple(table)


_CRC24_TABLE = _crc24_table()


def crc24(value: int, nbytes: int) -> int:
    """Cassandra's Crc.crc24(bytes, len): over the ``nbytes`` low bytes of ``value``, LSB first."""
    crc = CRC24_INIT
    table = _CRC24_TABLE
    for _ in range(nbytes):
        crc = ((crc << 8) & 0xFFFFFF) ^ table[((crc >> 16) ^ value) & 0xFF]
        value >>= 8
    return crc


#: crc24 of the header values seen: a connection's segments repeat a few sizes, so the
#: five table steps per segment become one dict look-up (bounded: cleared when full).
CRC24_SEEN: dict[int, int] = {}
CRC24_SEEN_MAX = 4096


def crc24_of_header(value: int, nbytes: int) -> int:
    """``crc24(value, nbytes)``, remembered (the hot path of every segment header)."""
    key = value | (nbytes << 48)
    crc = CRC24_SEEN.get(key)
    if crc is None:
        if len(CRC24_SEEN) >= CRC24_SEEN_MAX:
            CRC24_SEEN.clear()
        crc = CRC24_SEEN[key] = crc24(value, nbytes)
    return crc


def crc32(data: bytes | bytearray | memoryview) -> int:
    return zlib.crc32(data, CRC32_INIT) & 0xFFFFFFFF


@attrs.frozen
class SegmentHeader:
    payload_length: int  # bytes on the wire (compressed length when compressed)
    uncompressed_length: int  # 0: payload not compressed (always 0 in the uncompressed format)
    self_contained: bool
    header_size: int  # header + its CRC24

    @property
    def total_size(self) -> int:
        return self.header_size + self.payload_length + CRC32_SIZE


def header_size(compressed: bool) -> int:
    return (COMPRESSED_HEADER if compressed else UNCOMPRESSED_HEADER) + CRC24_SIZE


def _crc_error(what: str, read: int, computed: int) -> RemoteProtocolError:
    return RemoteProtocolError(
        f"CQL segment {what} CRC mismatch (read {read:#x}, computed {computed:#x})",
        client_hint="CQL segment CRC mismatch: the connection corrupted data; reconnect",
    )


def parse_segment_header(data: bytes | bytearray | memoryview, compressed: bool) -> SegmentHeader:
    """Parse and CRC-check a segment header; ``data`` holds at least ``header_size(compressed)`` bytes."""
    return SegmentHeader(*parse_header_fields(data, compressed))


def parse_header_fields(data: bytes | bytearray | memoryview, compressed: bool) -> tuple[int, int, bool, int]:
    """``parse_segment_header`` as a tuple ``(payload_length, uncompressed_length, self_contained,
    header_size)``: the decoder's hot path builds no object per segment."""
    n = COMPRESSED_HEADER if compressed else UNCOMPRESSED_HEADER
    value = int.from_bytes(data[:n], "little")
    read_crc = int.from_bytes(data[n:n + CRC24_SIZE], "little")
    computed = crc24_of_header(value, n)
    if read_crc != computed:
        raise _crc_error("header", read_crc, computed)
    if compressed:
        return value & PAYLOAD_MASK, (value >> 17) & PAYLOAD_MASK, bool((value >> 34) & 1), n + CRC24_SIZE
    return value & PAYLOAD_MASK, 0, bool((value >> 17) & 1), n + CRC24_SIZE


def decode_payload(segment: bytes | bytearray | memoryview, header: SegmentHeader) -> bytes | bytearray | memoryview:
    """CRC-check and (if needed) decompress the payload of a whole segment.

    An uncompressed payload comes back as a slice of ``segment``: a copy of
    bytes or a bytearray, a view of a memoryview.
    """
    return decode_segment(segment, header.header_size, header.payload_length, header.uncompressed_length)


def decode_segment(segment: bytes | bytearray | memoryview, start: int, length: int,
                   uncompressed_length: int) -> bytes | bytearray | memoryview:
    """``decode_payload`` over the header's fields (``parse_header_fields``).  ``segment`` may be
    more than the segment — a receive buffer's data, ``start`` the payload's offset in it: only
    the payload and its CRC32 are read, and no view of it is made (a caller's buffer stays
    resizable, whatever an exception's traceback keeps)."""
    end = start + length
    payload = segment[start:end]
    read_crc = _U32_LE(segment, end)[0]
    computed = zlib.crc32(payload, CRC32_INIT)
    if read_crc != computed:
        raise _crc_error("payload", read_crc, computed)
    if not uncompressed_length:
        return payload
    try:
        out = _lz4_decompress(payload, uncompressed_size=uncompressed_length)
    except lz4.block.LZ4BlockError as exc:
        raise RemoteProtocolError(
            f"CQL segment LZ4 payload is corrupt: {exc}", client_hint="corrupt compressed CQL segment"
        ) from None
    if len(out) != uncompressed_length:
        raise RemoteProtocolError(
            "CQL segment uncompressed length mismatch", client_hint="corrupt compressed CQL segment"
        )
    return out


def encode_segment(payload: bytes | bytearray | memoryview, *, self_contained: bool, compress: bool) -> bytes:
    """One segment around ``payload`` (at most MAX_PAYLOAD bytes before compression)."""
    size = len(payload)
    if size > MAX_PAYLOAD:
        raise LocalProtocolError(f"segment payload of {size} bytes exceeds {MAX_PAYLOAD}")
    if compress:
        data: bytes | bytearray | memoryview = payload
        uncompressed = 0
        if size:
            packed = lz4.block.compress(payload, store_size=False)
            if len(packed) < size:
                data = packed
                uncompressed = size
        value = len(data) | (uncompressed << 17) | (int(self_contained) << 34)
        header = value.to_bytes(COMPRESSED_HEADER, "little") + crc24(value, COMPRESSED_HEADER).to_bytes(3, "little")
    else:
        data = payload
        value = size | (int(self_contained) << 17)
        header = value.to_bytes(UNCOMPRESSED_HEADER, "little") + crc24(value, UNCOMPRESSED_HEADER).to_bytes(3, "little")
    return b"".join((header, data, crc32(data).to_bytes(4, "little")))


def encode_segments(frames_bytes: bytes | bytearray | memoryview, *, compress: bool) -> bytes:
    """Wrap concatenated whole frames in segments.

    Whole frames are packed into self-contained segments of up to
    MAX_PAYLOAD bytes; a frame larger than that gets its own run of
    non-self-contained segments.
    """
    view = memoryview(frames_bytes)
    total = len(view)
    out: list[bytes] = []
    seg_start = pos = 0
    while pos < total:
        if total - pos < _FRAME_HEADER:
            raise LocalProtocolError("segment encoder given a partial CQL frame header")
        frame_len = _FRAME_HEADER + _FRAME_LENGTH.unpack_from(view, pos + 5)[0]
        if pos + frame_len > total:
            raise LocalProtocolError("segment encoder given a partial CQL frame")
        if frame_len > MAX_PAYLOAD:
            if pos > seg_start:
                out.append(encode_segment(view[seg_start:pos], self_contained=True, compress=compress))
            end = pos + frame_len
            for chunk in range(pos, end, MAX_PAYLOAD):
                out.append(encode_segment(view[chunk:min(chunk + MAX_PAYLOAD, end)], self_contained=False, compress=compress))
            pos = seg_start = end
            continue
        if pos + frame_len - seg_start > MAX_PAYLOAD:
            out.append(encode_segment(view[seg_start:pos], self_contained=True, compress=compress))
            seg_start = pos
        pos += frame_len
    if pos > seg_start:
        out.append(encode_segment(view[seg_start:pos], self_contained=True, compress=compress))
    return b"".join(out)
