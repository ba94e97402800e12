"""CQL native protocol frames ("envelopes" in the v5 spec), versions 3 to 6: the envelope layer.

Strategy: a frame is a 9-byte big-endian header (version|direction, flags,
stream int16, opcode, body length uint32) plus a body (v4 spec section 2,
v5 section 2.3-2.4 / 3).  The decoder (``codec.CqlDecoder``) only reads the
header with ``struct`` and keeps the frame's bytes in ``Frame.raw``; bodies
are parsed lazily by ``requests.py`` / ``responses.py`` (over ``body.py``'s
reader), and only for the frames a stage actually looks at.  This module
knows nothing of what a body says: header, opcodes, versions, the per-frame
compression of v3/v4, and the protocol errors a header can cause.

Refusals mirror Cassandra 5.0 (``check_header``, verified byte for byte
against a real node): a header with an unsupported version raises
``UnsupportedProtocolVersion`` before its body arrives, and its
``responses.protocol_error_reply(exc)`` is the PROTOCOL_ERROR Cassandra sends, on the client's
stream, in the version a driver can read (``reply_version_for``).  v1/v2 used
an 8-byte header (stream int8); we read and answer in that format, which v2
drivers expect (Cassandra 5.0 itself waits for 9 bytes there).

Compression (spec v4 section 5): in v3/v4 each frame body may be compressed
on its own (header flag 0x01) with the algorithm agreed in STARTUP: LZ4 as
a 4-byte big-endian uncompressed length followed by a raw LZ4 block, or raw
Snappy.  From v5 on, compression belongs to the segment layer
(``segments.py``) and the frame flag is ignored (v5 spec section 2.4).

Where the rest lives: ``body.py`` (the spec's notations, section 3, and the
body prefix), ``requests.py`` (section 4.1), ``responses.py`` (section 4.2,
ERROR codes of section 9 / v5 section 8), ``protocol.py`` (one namespace
over all four for callers that use the whole protocol).
"""

from __future__ import annotations

import enum
import struct

import attrs
import lz4.block
import snappy

from dbproxy.errors import FrameTooLarge, LocalProtocolError, RemoteProtocolError

__all__ = [
    "HEADER_SIZE", "LEGACY_HEADER_SIZE", "RESPONSE_BIT", "VERSION_MASK", "SUPPORTED_VERSIONS",
    "BETA_VERSIONS", "LEGACY_VERSIONS", "CURRENT_VERSION", "FIRST_SEGMENT_VERSION",
    "DEFAULT_MAX_MESSAGE_SIZE", "FLAG_COMPRESSION", "FLAG_TRACING", "FLAG_CUSTOM_PAYLOAD", "FLAG_WARNING",
    "FLAG_BETA", "HEADER", "Opcode", "REQUEST_OPCODES", "RESPONSE_OPCODES", "CqlProtocolError",
    "UnsupportedProtocolVersion", "frame_too_large", "check_header", "supported_versions_text",
    "unsupported_version_message", "reply_version_for", "beta_flag_missing", "Frame", "parse_header",
    "parse_envelope_header", "header_size_for", "compress_body", "decompress_body", "encode_frame",
]

# --- constants ------------------------------------------------------------------

HEADER_SIZE = 9
LEGACY_HEADER_SIZE = 8  # protocol v1/v2: stream is a single byte
RESPONSE_BIT = 0x80
VERSION_MASK = 0x7F

SUPPORTED_VERSIONS: tuple[int, ...] = (3, 4, 5, 6)
BETA_VERSIONS = frozenset({6})
LEGACY_VERSIONS = frozenset({1, 2})
CURRENT_VERSION = 5  # what Cassandra 4/5 answer with when the client's version is unknown
FIRST_SEGMENT_VERSION = 5  # v5+ wrap frames in CRC-protected segments after the handshake

DEFAULT_MAX_MESSAGE_SIZE = 256 * 1024 * 1024  # v5 spec 2.4.1.5: "limited to 256MB"

FLAG_COMPRESSION = 0x01
FLAG_TRACING = 0x02
FLAG_CUSTOM_PAYLOAD = 0x04
FLAG_WARNING = 0x08
FLAG_BETA = 0x10

HEADER = struct.Struct(">BBhBI")
_LEGACY_HEADER = struct.Struct(">BBbBI")

_LZ4_PREFIX = struct.Struct(">I")


class Opcode(enum.IntEnum):
    ERROR = 0x00
    STARTUP = 0x01
    READY = 0x02
    AUTHENTICATE = 0x03
    OPTIONS = 0x05
    SUPPORTED = 0x06
    QUERY = 0x07
    RESULT = 0x08
    PREPARE = 0x09
    EXECUTE = 0x0A
    REGISTER = 0x0B
    EVENT = 0x0C
    BATCH = 0x0D
    AUTH_CHALLENGE = 0x0E
    AUTH_RESPONSE = 0x0F
    AUTH_SUCCESS = 0x10


REQUEST_OPCODES = frozenset(
    {
        Opcode.STARTUP,
        Opcode.OPTIONS,
        Opcode.QUERY,
        Opcode.PREPARE,
        Opcode.EXECUTE,
        Opcode.REGISTER,
        Opcode.BATCH,
        Opcode.AUTH_RESPONSE,
    }
)
RESPONSE_OPCODES = frozenset(
    {
        Opcode.ERROR,
        Opcode.READY,
        Opcode.AUTHENTICATE,
        Opcode.SUPPORTED,
        Opcode.RESULT,
        Opcode.EVENT,
        Opcode.AUTH_CHALLENGE,
        Opcode.AUTH_SUCCESS,
    }
)


# --- errors ---------------------------------------------------------------------


class CqlProtocolError(RemoteProtocolError):
    """A CQL peer broke the protocol.

    ``stream`` and ``version`` are set when the frame header could be read, so
    the engine can answer a PROTOCOL_ERROR on the client's own stream id
    (``responses.protocol_error_reply(exc)``, for any ProtocolError).
    """

    def __init__(
        self,
        message: str,
        *,
        client_hint: str | None = None,
        stream: int | None = None,
        version: int | None = None,
    ) -> None:
        super().__init__(message, client_hint=client_hint)
        self.stream = stream
        self.version = version


class UnsupportedProtocolVersion(CqlProtocolError):
    """The client spoke a version Cassandra does not (v1/v2, v7+, DSE's 0x41/0x42, garbage).

    Raised as soon as the header is in, like Cassandra which answers before
    the body arrives.  Answer with ``responses.protocol_error_reply(exc)``: byte for byte what
    Cassandra 5.0 sends (drivers read "unsupported protocol version" in it,
    close, and retry a lower version on a new connection).
    """

    def __init__(self, version: int, stream: int) -> None:
        message = unsupported_version_message(version)
        super().__init__(message, client_hint=message, stream=stream, version=version)


def frame_too_large(size: int, limit: int, *, stream: int | None = None, version: int | None = None) -> FrameTooLarge:
    exc = FrameTooLarge(size, limit, what="CQL frame")
    exc.stream = stream  # type: ignore[attr-defined]
    exc.version = version  # type: ignore[attr-defined]
    return exc


def _direction_error(expected: str, got: str, opcode: int, stream: int, version: int) -> CqlProtocolError:
    message = f"Wrong protocol direction (expected {expected}, got {got}) for opcode {opcode} ({Opcode(opcode).name})"
    return CqlProtocolError(message, client_hint=message, stream=stream, version=version)


def check_header(first: int, version: int, flags: int, stream: int, opcode: int, *, from_client: bool) -> None:
    """The checks Cassandra's Envelope.Decoder makes on a header, in its order.

    Unsupported version; (requests) a beta version without USE_BETA; unknown
    opcode; an opcode whose direction contradicts the direction bit
    (Message.Type.fromOpcode).  Then ours: a well-formed frame coming from the
    wrong side.  Messages are Cassandra's, so a client reads what a real
    server would tell it.
    """
    if version not in SUPPORTED_VERSIONS:
        raise UnsupportedProtocolVersion(version, stream)
    if from_client and version in BETA_VERSIONS and not flags & FLAG_BETA:
        message = f"Beta version of the protocol used ({version}/v{version}-beta), but USE_BETA flag is unset"
        raise CqlProtocolError(message, client_hint=message, stream=stream, version=version)
    if opcode in REQUEST_OPCODES:
        opcode_response = False
    elif opcode in RESPONSE_OPCODES:
        opcode_response = True
    else:
        message = f"Unknown opcode {opcode}"
        raise CqlProtocolError(message, client_hint=message, stream=stream, version=version)
    bit_response = bool(first & RESPONSE_BIT)
    names = ("REQUEST", "RESPONSE")
    if opcode_response != bit_response:
        raise _direction_error(names[opcode_response], names[bit_response], opcode, stream, version)
    if bit_response == from_client:
        raise _direction_error(names[not from_client], names[bit_response], opcode, stream, version)


# --- versions -------------------------------------------------------------------

def supported_versions_text() -> str:
    """As Cassandra's ProtocolVersion.supportedVersions(): ``3/v3, 4/v4, 5/v5, 6/v6-beta``."""
    return ", ".join(f"{v}/v{v}-beta" if v in BETA_VERSIONS else f"{v}/v{v}" for v in SUPPORTED_VERSIONS)


def unsupported_version_message(client_version: int) -> str:
    return f"Invalid or unsupported protocol version ({client_version}); supported versions are ({supported_versions_text()})"


def reply_version_for(client_version: int) -> int:
    """The header version Cassandra uses when answering a client's first frame.

    Supported versions are answered in kind; v1/v2 too (ProtocolVersion.decode
    forces the old version so an old driver can read the error); anything else
    (0, 7+, DSE's 0x41/0x42) gets the server's current version (v5 spec 2.4.1.1).
    """
    if client_version in SUPPORTED_VERSIONS or client_version in LEGACY_VERSIONS:
        return client_version
    return CURRENT_VERSION


def beta_flag_missing(frame: Frame) -> bool:
    """Cassandra refuses a beta version (v6) unless the frame sets USE_BETA."""
    return frame.version in BETA_VERSIONS and not frame.flags & FLAG_BETA


# --- the frame ------------------------------------------------------------------


@attrs.frozen
class Frame:
    """One CQL frame.

    ``raw`` is the frame at the message layer: exactly its wire bytes in
    'frames' framing (a v3/v4 compressed body stays compressed), or its
    uncompressed bytes inside v5+ segments.  ``compression`` is the legacy
    per-frame algorithm agreed for this connection (``None``/``'lz4'``/
    ``'snappy'``); it only matters when the compression flag is set and the
    version is below 5.
    """

    version: int
    flags: int
    stream: int
    opcode: int
    raw: bytes = attrs.field(repr=lambda raw: f"<{len(raw)} bytes>")
    body_offset: int = HEADER_SIZE
    compression: str | None = None

    @property
    def is_response(self) -> bool:
        return bool(self.raw[0] & RESPONSE_BIT)

    @property
    def body_length(self) -> int:
        return len(self.raw) - self.body_offset

    @property
    def supported(self) -> bool:
        return self.version in SUPPORTED_VERSIONS

    @property
    def compressed(self) -> bool:
        return bool(self.flags & FLAG_COMPRESSION) and self.version < FIRST_SEGMENT_VERSION

    def body(self, *, max_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> bytes | memoryview:
        """The body, decompressed when the (pre-v5) compression flag is set."""
        view = memoryview(self.raw)[self.body_offset:]
        if not self.compressed:
            return view
        if self.compression is None:
            raise CqlProtocolError(
                "compressed CQL frame but no compression was negotiated",
                client_hint="compressed frame without negotiated compression",
                stream=self.stream,
                version=self.version,
            )
        return decompress_body(view, self.compression, max_size=max_size)

    def with_stream(self, stream: int) -> "Frame":
        """The same frame on another stream id (header rewritten, body untouched)."""
        raw = bytearray(self.raw)
        if self.body_offset == LEGACY_HEADER_SIZE:
            struct.pack_into(">b", raw, 2, stream)
        else:
            struct.pack_into(">h", raw, 2, stream)
        return attrs.evolve(self, stream=stream, raw=bytes(raw))


def parse_header(data: bytes | bytearray | memoryview) -> tuple[int, int, int, int, int, int]:
    """``(version, flags, stream, opcode, body_length, header_size)`` of a frame header.

    ``data`` must hold at least the header (8 bytes for v1/v2, else 9).
    """
    first = data[0]
    version = first & VERSION_MASK
    if version in LEGACY_VERSIONS:
        _, flags, stream, opcode, length = _LEGACY_HEADER.unpack_from(data, 0)
        return version, flags, stream, opcode, length, LEGACY_HEADER_SIZE
    _, flags, stream, opcode, length = HEADER.unpack_from(data, 0)
    return version, flags, stream, opcode, length, HEADER_SIZE


def parse_envelope_header(data: bytes | bytearray | memoryview) -> tuple[int, int, int, int, int]:
    """``(version, flags, stream, opcode, body_length)`` of a 9-byte (v3+) header, as found inside segments."""
    first, flags, stream, opcode, length = HEADER.unpack_from(data, 0)
    return first & VERSION_MASK, flags, stream, opcode, length


def header_size_for(first_byte: int) -> int:
    return LEGACY_HEADER_SIZE if (first_byte & VERSION_MASK) in LEGACY_VERSIONS else HEADER_SIZE


# --- legacy (v3/v4) per-frame compression ----------------------------------------


def compress_body(body: bytes | memoryview, compression: str) -> bytes:
    if compression == "lz4":
        return _LZ4_PREFIX.pack(len(body)) + lz4.block.compress(body, store_size=False)
    if compression == "snappy":
        return snappy.compress(bytes(body))
    raise LocalProtocolError(f"unknown CQL compression {compression!r}")


def _snappy_length(data: memoryview) -> int:
    # Raw snappy starts with the uncompressed length as a little-endian base-128 varint (<= 5 bytes).
    result = 0
    for i in range(min(5, len(data))):
        b = data[i]
        result |= (b & 0x7F) << (7 * i)
        if not b & 0x80:
            return result
    raise CqlProtocolError("frame body does not look Snappy compressed", client_hint="invalid Snappy body")


def decompress_body(body: bytes | memoryview, compression: str, *, max_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> bytes:
    """Decompress a v3/v4 frame body; the announced size is bounded before allocating."""
    view = memoryview(body)
    if compression == "lz4":
        if len(view) < 4:
            raise CqlProtocolError("frame body does not look LZ4 compressed", client_hint="invalid LZ4 body")
        size = _LZ4_PREFIX.unpack_from(view, 0)[0]
        if size > max_size:
            raise frame_too_large(size, max_size)
        if size == 0:
            return b""
        try:
            out = lz4.block.decompress(view[4:], uncompressed_size=size)
        except lz4.block.LZ4BlockError as exc:
            raise CqlProtocolError(f"LZ4 frame body is corrupt: {exc}", client_hint="corrupt LZ4 frame body") from None
        if len(out) != size:
            raise CqlProtocolError("LZ4 frame body length mismatch", client_hint="corrupt LZ4 frame body")
        return out
    if compression == "snappy":
        size = _snappy_length(view)
        if size > max_size:
            raise frame_too_large(size, max_size)
        try:
            out = snappy.decompress(bytes(view))
        except Exception as exc:  # cramjam raises its own DecompressionError type
            raise CqlProtocolError(f"Snappy frame body is corrupt: {exc}", client_hint="corrupt Snappy frame body") from None
        return bytes(out)
    raise CqlProtocolError(f"unknown CQL compression {compression!r}", client_hint="unsupported compression")


# --- encoder --------------------------------------------------------------------

def encode_frame(
    version: int,
    flags: int,
    stream: int,
    opcode: int,
    body: bytes | bytearray | memoryview,
    *,
    response: bool,
    compressor: str | None = None,
) -> bytes:
    """One frame.  ``compressor`` (``'lz4'``/``'snappy'``) compresses a non-empty
    body for versions below 5 and sets flag 0x01; from v5 on compression is the
    segment layer's job and ``compressor`` is ignored.  Beta versions get the
    USE_BETA flag, as Cassandra sets it on its own beta responses."""
    flags &= ~FLAG_COMPRESSION
    if compressor is not None and version < FIRST_SEGMENT_VERSION and len(body):
        body = compress_body(body, compressor)
        flags |= FLAG_COMPRESSION
    if version in BETA_VERSIONS:
        flags |= FLAG_BETA
    first = (version & VERSION_MASK) | (RESPONSE_BIT if response else 0)
    if version in LEGACY_VERSIONS:
        header = _LEGACY_HEADER.pack(first, flags, stream, opcode, len(body))
    else:
        header = HEADER.pack(first, flags, stream, opcode, len(body))
    return header + bytes(body)
