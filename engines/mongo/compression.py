"""OP_COMPRESSED (opcode 2012): unwrap and wrap messages, with bounded decompression.

Strategy (mongodb/specifications ``source/compression/OP_COMPRESSED.md``):
an OP_COMPRESSED carries originalOpcode, uncompressedSize and compressorId,
then the compressed message without its header.  ``decompress`` unwraps it
into the original message (rebuilt header, original opcode) only when a
stage needs to look inside; the compressed bytes themselves are forwarded
as received.  The announced size is checked against the message size limit
before anything is decompressed, and every decompressor is bounded by it
(a zlib or zstd bomb cannot allocate past it; snappy's declared length is
read first).  snappy and zstd are imported on first use.
"""

from __future__ import annotations

import struct
import zlib

import attrs

from dbproxy.errors import FrameTooLarge, LocalProtocolError

from .wire import (
    DEFAULT_MAX_MESSAGE_SIZE,
    HEADER,
    HEADER_SIZE,
    OP_COMPRESSED,
    WireMessage,
    as_message,
    bad_message,
)

__all__ = [
    "COMPRESSOR_NOOP", "COMPRESSOR_SNAPPY", "COMPRESSOR_ZLIB", "COMPRESSOR_ZSTD", "COMPRESSOR_IDS",
    "COMPRESSOR_NAMES", "UNCOMPRESSIBLE_COMMANDS", "CompressedHeader", "compressed_header", "decompress",
    "compress",
]

# --- OP_COMPRESSED compressor ids (OP_COMPRESSED.md "Compressor IDs") ---------

COMPRESSOR_NOOP = 0
COMPRESSOR_SNAPPY = 1
COMPRESSOR_ZLIB = 2
COMPRESSOR_ZSTD = 3
COMPRESSOR_IDS = {"noop": 0, "snappy": 1, "zlib": 2, "zstd": 3}
COMPRESSOR_NAMES = {v: k for k, v in COMPRESSOR_IDS.items()}

#: Commands whose messages MUST NOT be compressed (OP_COMPRESSED.md
#: "Messages not allowed to be compressed").
UNCOMPRESSIBLE_COMMANDS = frozenset(
    {
        "hello",
        "ismaster",
        "isMaster",
        "saslStart",
        "saslContinue",
        "getnonce",
        "authenticate",
        "createUser",
        "updateUser",
        "copydbSaslStart",
        "copydbgetnonce",
        "copydb",
    }
)


_COMPRESSED_FIXED = struct.Struct("<iiB")
_COMPRESSED_HEADER_SIZE = HEADER_SIZE + _COMPRESSED_FIXED.size  # 25


@attrs.frozen
class CompressedHeader:
    original_op_code: int
    uncompressed_size: int
    compressor_id: int


def compressed_header(msg: WireMessage) -> CompressedHeader:
    if msg.op_code != OP_COMPRESSED:
        raise bad_message(f"opcode {msg.op_code} is not OP_COMPRESSED")
    if msg.length < _COMPRESSED_HEADER_SIZE:
        raise bad_message("OP_COMPRESSED too short")
    return CompressedHeader(*_COMPRESSED_FIXED.unpack_from(msg.raw, HEADER_SIZE))


def _snappy_decompress(data: memoryview, size: int) -> bytes:
    import cramjam  # python-snappy's backend; reads the declared length without decoding
    import snappy

    try:
        declared = cramjam.snappy.decompress_raw_len(data)
    except cramjam.DecompressionError as exc:
        raise bad_message(f"invalid snappy data: {exc}") from None
    if declared != size:
        raise bad_message(f"snappy data declares {declared} bytes, OP_COMPRESSED says {size}")
    try:
        return snappy.uncompress(bytes(data))
    except (snappy.UncompressError, cramjam.DecompressionError) as exc:
        raise bad_message(f"invalid snappy data: {exc}") from None


def _zlib_decompress(data: memoryview, size: int) -> bytes:
    dc = zlib.decompressobj()
    try:
        # Bounded output: a zlib bomb cannot allocate past the announced size.
        out = dc.decompress(data, size + 1)
    except zlib.error as exc:
        raise bad_message(f"invalid zlib data: {exc}") from None
    if len(out) == size and not dc.eof:
        raise bad_message("zlib data is longer than the announced uncompressed size")
    if dc.unused_data:
        raise bad_message("trailing bytes after the zlib stream")
    return out


def _zstd_decompress(data: memoryview, size: int) -> bytes:
    import zstandard

    try:
        declared = zstandard.frame_content_size(data)
        if declared not in (-1, size):
            raise bad_message(f"zstd frame declares {declared} bytes, OP_COMPRESSED says {size}")
        # With no content size in the frame, max_output_size bounds the output.
        return zstandard.ZstdDecompressor().decompress(data, max_output_size=size)
    except zstandard.ZstdError as exc:
        raise bad_message(f"invalid zstd data: {exc}") from None


def decompress(msg: WireMessage, *, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> WireMessage:
    """Unwrap an OP_COMPRESSED into the original message (other messages are returned as is).

    The rebuilt header keeps requestID/responseTo, takes ``originalOpcode``
    and ``uncompressedSize + 16`` as its length (OP_COMPRESSED.md: the
    compressed message excludes the MsgHeader).  The announced size is
    checked against ``max_message_size`` before anything is decompressed.
    """
    if msg.op_code != OP_COMPRESSED:
        return msg
    hdr = compressed_header(msg)
    size = hdr.uncompressed_size
    if size < 0:
        raise bad_message(f"OP_COMPRESSED uncompressedSize {size} is negative")
    if size + HEADER_SIZE > max_message_size:
        raise FrameTooLarge(size + HEADER_SIZE, max_message_size, what="decompressed message")
    if hdr.original_op_code == OP_COMPRESSED:
        raise bad_message("OP_COMPRESSED wraps another OP_COMPRESSED")
    data = memoryview(msg.raw)[_COMPRESSED_HEADER_SIZE:]
    cid = hdr.compressor_id
    if cid == COMPRESSOR_NOOP:
        body = bytes(data)
    elif cid == COMPRESSOR_SNAPPY:
        body = _snappy_decompress(data, size)
    elif cid == COMPRESSOR_ZLIB:
        body = _zlib_decompress(data, size)
    elif cid == COMPRESSOR_ZSTD:
        body = _zstd_decompress(data, size)
    else:
        raise bad_message(f"OP_COMPRESSED uses unknown compressorId {cid}", f"unsupported compressorId {cid}")
    if len(body) != size:
        raise bad_message(f"OP_COMPRESSED decompressed to {len(body)} bytes, announced {size}")
    length = HEADER_SIZE + size
    raw = HEADER.pack(length, msg.request_id, msg.response_to, hdr.original_op_code) + body
    return WireMessage(length, msg.request_id, msg.response_to, hdr.original_op_code, raw)


def compress(msg: WireMessage | bytes, compressor_id: int, *, level: int | None = None) -> bytes:
    """Wrap a message in OP_COMPRESSED with the given compressor (same requestID/responseTo).

    ``level`` applies to zlib (-1..9) and zstd.
    """
    msg = as_message(msg)
    if msg.op_code == OP_COMPRESSED:
        raise LocalProtocolError("message is already OP_COMPRESSED")
    body = msg.body
    if compressor_id == COMPRESSOR_NOOP:
        data = bytes(body)
    elif compressor_id == COMPRESSOR_SNAPPY:
        import snappy

        data = snappy.compress(bytes(body))
    elif compressor_id == COMPRESSOR_ZLIB:
        data = zlib.compress(body, -1 if level is None else level)
    elif compressor_id == COMPRESSOR_ZSTD:
        import zstandard

        data = zstandard.ZstdCompressor(level=3 if level is None else level).compress(body)
    else:
        raise LocalProtocolError(f"unknown compressorId {compressor_id}")
    length = _COMPRESSED_HEADER_SIZE + len(data)
    return (
        HEADER.pack(length, msg.request_id, msg.response_to, OP_COMPRESSED)
        + _COMPRESSED_FIXED.pack(msg.op_code, len(body), compressor_id)
        + data
    )
