"""Helpers for the CQL codec tests: real bytes from the official cassandra-driver.

The driver's own serializers (``ProtocolHandler.encode_message``, its
compressors and ``SegmentCodec``) produce the request bytes and segments, and
its decoder reads the responses and segments we produce: a cross-check
against an independent implementation of the same spec.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

from cassandra.connection import locally_supported_compressions, segment_codec_lz4
from cassandra.protocol import ProtocolHandler
from cassandra.segment import SegmentCodec

from dbproxy.sansio import NEED_DATA
from dbproxy.engines.cassandra.codec import CqlDecoder

DATA_DIR = Path(__file__).resolve().parents[2] / "data" / "cassandra"


def driver_frame(msg, version: int, stream: int = 0, compression: str | None = None, beta: bool = False) -> bytes:
    compressor = locally_supported_compressions[compression][0] if compression else None
    return ProtocolHandler.encode_message(msg, stream, version, compressor, beta)


def driver_decode(frame: bytes, compression: str | None = None):
    """Decode one response frame with the driver (what a real client would see)."""
    version = frame[0] & 0x7F
    if version >= 3:
        flags, stream, opcode, length = struct.unpack(">BhBi", frame[1:9])
        body = frame[9:]
    else:
        flags, stream, opcode, length = struct.unpack(">BbBi", frame[1:8])
        body = frame[8:]
    assert length == len(body)
    decompressor = locally_supported_compressions[compression][1] if compression else None
    return ProtocolHandler.decode_message(version, {}, stream, flags, opcode, body, decompressor, None)


def driver_segments(payload: bytes, compress: bool) -> bytes:
    """The driver's segment encoding of one message (split when over 128 KiB - 1)."""
    codec = segment_codec_lz4 if compress else SegmentCodec()
    out = io.BytesIO()
    codec.encode(out, payload)
    return out.getvalue()


def driver_decode_segments(data: bytes, compress: bool) -> list:
    codec = segment_codec_lz4 if compress else SegmentCodec()
    f = io.BytesIO(data)
    segments = []
    while f.tell() < len(data):
        header = codec.decode_header(f)
        segments.append(codec.decode(f, header))
    return segments


def decode_all(decoder: CqlDecoder, data: bytes, *, chunk: int | None = None) -> list:
    """Feed ``data`` (whole, or ``chunk`` bytes at a time) and collect every message."""
    out = []
    step = chunk or max(len(data), 1)
    for i in range(0, len(data), step):
        decoder.feed(data[i:i + step])
        while (msg := decoder.next_message()) is not NEED_DATA:
            out.append(msg)
    return out


def vector(name: str) -> bytes:
    return (DATA_DIR / name).read_bytes()


# --- hand-built response bodies (the driver has no encoder for responses) -------------

def _string(s: str) -> bytes:
    b = s.encode()
    return struct.pack(">H", len(b)) + b


def _bytes(b: bytes | None) -> bytes:
    return struct.pack(">i", -1) if b is None else struct.pack(">i", len(b)) + b


INT = struct.pack(">H", 0x0009)
TEXT = struct.pack(">H", 0x000D)
MAP_TEXT_LIST_INT = struct.pack(">H", 0x0021) + TEXT + struct.pack(">H", 0x0020) + INT
UDT = (
    struct.pack(">H", 0x0030) + _string("ks") + _string("addr")
    + struct.pack(">H", 2) + _string("street") + TEXT + _string("zip") + INT
)
TUPLE = struct.pack(">H", 0x0031) + struct.pack(">H", 2) + INT + TEXT
CUSTOM = struct.pack(">H", 0x0000) + _string("org.apache.cassandra.db.marshal.BytesType")


def rows_body(
    version: int,
    columns: list[tuple[str, bytes]],
    rows: list[list[bytes | None]],
    *,
    paging_state: bytes | None = None,
    global_spec: bool = True,
    new_metadata_id: bytes | None = None,
    no_metadata: bool = False,
) -> bytes:
    flags = 0
    if global_spec and not no_metadata:
        flags |= 0x0001
    if paging_state is not None:
        flags |= 0x0002
    if no_metadata:
        flags |= 0x0004
    if new_metadata_id is not None:
        flags |= 0x0008
    out = struct.pack(">iii", 0x0002, flags, len(columns))
    if paging_state is not None:
        out += _bytes(paging_state)
    if new_metadata_id is not None:
        out += struct.pack(">H", len(new_metadata_id)) + new_metadata_id
    if not no_metadata:
        if global_spec:
            out += _string("ks") + _string("tbl")
        for name, type_ in columns:
            if not global_spec:
                out += _string("ks") + _string("tbl")
            out += _string(name) + type_
    out += struct.pack(">i", len(rows))
    for row in rows:
        out += b"".join(_bytes(v) for v in row)
    return out


def prepared_body(version: int, query_id: bytes, metadata_id: bytes | None, bind: list[tuple[str, bytes]]) -> bytes:
    out = struct.pack(">i", 0x0004) + struct.pack(">H", len(query_id)) + query_id
    if version >= 5:
        out += struct.pack(">H", len(metadata_id)) + metadata_id
    out += struct.pack(">ii", 0x0001, len(bind))
    if version >= 4:
        out += struct.pack(">i", 1) + struct.pack(">H", 0)  # pk_count, pk_index
    out += _string("ks") + _string("tbl")
    for name, type_ in bind:
        out += _string(name) + type_
    out += struct.pack(">ii", 0x0004, 0)  # result metadata: No_metadata, 0 columns
    return out


def set_keyspace_body(keyspace: str) -> bytes:
    return struct.pack(">i", 0x0003) + _string(keyspace)


def schema_change_body(change: str, target: str, *options: str) -> bytes:
    return struct.pack(">i", 0x0005) + _string(change) + _string(target) + b"".join(_string(o) for o in options)


def event_body_status(change: str) -> bytes:
    return _string("STATUS_CHANGE") + _string(change) + bytes([4, 127, 0, 0, 1]) + struct.pack(">i", 9042)


def response_prefix(tracing_id: bytes | None, warnings: list[str] | None, custom_payload: dict | None) -> tuple[int, bytes]:
    flags = 0
    out = b""
    if tracing_id is not None:
        flags |= 0x02
        out += tracing_id
    if warnings is not None:
        flags |= 0x08
        out += struct.pack(">H", len(warnings)) + b"".join(_string(w) for w in warnings)
    if custom_payload is not None:
        flags |= 0x04
        out += struct.pack(">H", len(custom_payload)) + b"".join(_string(k) + _bytes(v) for k, v in custom_payload.items())
    return flags, out
