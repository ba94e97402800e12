"""CQL native protocol frames ("envelopes" in the v5 spec), versions 3 to 6.

Strategy: a frame is a 9-byte big-endian header (version|direction, flags,
stream int16, opcode, body length uint32) plus a body.  The decoder
(``codec.CqlDecoder``) only reads the header with ``struct`` and keeps the
frame's bytes in ``Frame.raw``; bodies are parsed lazily by the ``parse_*``
functions below, over a ``memoryview``, and only for the frames a stage
actually looks at.

Refusals mirror Cassandra 5.0 (``check_header``, verified byte for byte
against a real node): a header with an unsupported version raises
``UnsupportedProtocolVersion`` before its body arrives, and its
``error_frame()`` is the PROTOCOL_ERROR Cassandra sends, on the client's
stream, in the version a driver can read (``reply_version_for``).  v1/v2 used
an 8-byte header (stream int8); we read and answer in that format, which v2
drivers expect (Cassandra 5.0 itself waits for 9 bytes there).

Compression (spec v4 section 5): in v3/v4 each frame body may be compressed
on its own (header flag 0x01) with the algorithm agreed in STARTUP: LZ4 as
a 4-byte big-endian uncompressed length followed by a raw LZ4 block, or raw
Snappy.  From v5 on, compression belongs to the segment layer
(``segments.py``) and the frame flag is ignored (v5 spec section 2.4).

Layout of a body (v4 section 2.2, v5 section 4): responses start with a
tracing id [uuid] when the tracing flag is set, then a [string list] of
warnings when the warning flag is set; requests and responses then carry a
[bytes map] custom payload when flag 0x04 is set; then the message.
"""

from __future__ import annotations

import enum
import struct
from typing import Iterable, Mapping, Sequence

import attrs
import lz4.block
import snappy

from dbproxy.errors import FrameTooLarge, LocalProtocolError, RemoteProtocolError

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

_HEADER = struct.Struct(">BBhBI")
_LEGACY_HEADER = struct.Struct(">BBbBI")
_SHORT = struct.Struct(">H")
_INT = struct.Struct(">i")
_UINT = struct.Struct(">I")
_LONG = struct.Struct(">q")
_LZ4_PREFIX = struct.Struct(">I")

_MAX_TYPE_DEPTH = 64


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


class ErrorCode(enum.IntEnum):
    """Spec section 9 (v4) / 8 (v5)."""

    SERVER_ERROR = 0x0000
    PROTOCOL_ERROR = 0x000A
    AUTH_ERROR = 0x0100
    UNAVAILABLE = 0x1000
    OVERLOADED = 0x1001
    IS_BOOTSTRAPPING = 0x1002
    TRUNCATE_ERROR = 0x1003
    WRITE_TIMEOUT = 0x1100
    READ_TIMEOUT = 0x1200
    READ_FAILURE = 0x1300
    FUNCTION_FAILURE = 0x1400
    WRITE_FAILURE = 0x1500
    CDC_WRITE_FAILURE = 0x1600
    CAS_WRITE_UNKNOWN = 0x1700
    SYNTAX_ERROR = 0x2000
    UNAUTHORIZED = 0x2100
    INVALID = 0x2200
    CONFIG_ERROR = 0x2300
    ALREADY_EXISTS = 0x2400
    UNPREPARED = 0x2500


class Consistency(enum.IntEnum):
    ANY = 0x0000
    ONE = 0x0001
    TWO = 0x0002
    THREE = 0x0003
    QUORUM = 0x0004
    ALL = 0x0005
    LOCAL_QUORUM = 0x0006
    EACH_QUORUM = 0x0007
    SERIAL = 0x0008
    LOCAL_SERIAL = 0x0009
    LOCAL_ONE = 0x000A


class ResultKind(enum.IntEnum):
    VOID = 0x0001
    ROWS = 0x0002
    SET_KEYSPACE = 0x0003
    PREPARED = 0x0004
    SCHEMA_CHANGE = 0x0005


# QUERY / EXECUTE <query_parameters> flags (spec 4.1.4); [byte] before v5, [int] since.
QF_VALUES = 0x0001
QF_SKIP_METADATA = 0x0002
QF_PAGE_SIZE = 0x0004
QF_PAGING_STATE = 0x0008
QF_SERIAL_CONSISTENCY = 0x0010
QF_TIMESTAMP = 0x0020
QF_NAMES_FOR_VALUES = 0x0040
QF_KEYSPACE = 0x0080  # v5
QF_NOW_IN_SECONDS = 0x0100  # v5

PREPARE_WITH_KEYSPACE = 0x01  # v5 PREPARE flags

# Rows metadata flags (spec 4.2.5.2)
RF_GLOBAL_TABLES_SPEC = 0x0001
RF_HAS_MORE_PAGES = 0x0002
RF_NO_METADATA = 0x0004
RF_METADATA_CHANGED = 0x0008  # v5


class _Unset:
    __slots__ = ()

    def __repr__(self) -> str:
        return "UNSET"


UNSET = _Unset()
"""A bound value sent as ``not set`` ([value] length -2, v4+)."""


# --- errors ---------------------------------------------------------------------


class CqlProtocolError(RemoteProtocolError):
    """A CQL peer broke the protocol.

    ``stream`` and ``version`` are set when the frame header could be read, so
    the engine can answer a PROTOCOL_ERROR on the client's own stream id
    (``error_frame()``, or ``protocol_error_reply(exc)`` for any ProtocolError).
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

    def error_frame(self, *, compressor: str | None = None) -> bytes:
        """The ERROR (PROTOCOL_ERROR) frame Cassandra would send for this, unframed."""
        return protocol_error_reply(self, compressor=compressor)


class UnsupportedProtocolVersion(CqlProtocolError):
    """The client spoke a version Cassandra does not (v1/v2, v7+, DSE's 0x41/0x42, garbage).

    Raised as soon as the header is in, like Cassandra which answers before
    the body arrives.  Answer with ``error_frame()``: byte for byte what
    Cassandra 5.0 sends (drivers read "unsupported protocol version" in it,
    close, and retry a lower version on a new connection).
    """

    def __init__(self, version: int, stream: int) -> None:
        message = unsupported_version_message(version)
        super().__init__(message, client_hint=message, stream=stream, version=version)


def protocol_error_reply(exc: Exception, *, version: int | None = None, compressor: str | None = None) -> bytes:
    """A PROTOCOL_ERROR frame for a ProtocolError, on the offending stream when known.

    ``version`` is the connection's version when the engine knows it; else the
    version of the offending header picks the reply version (``reply_version_for``).
    """
    stream = getattr(exc, "stream", None) or 0
    if version is None:
        version = getattr(exc, "version", None)
        version = CURRENT_VERSION if version is None else reply_version_for(version)
    hint = getattr(exc, "client_hint", None) or str(exc)
    return encode_error(version, stream, ErrorCode.PROTOCOL_ERROR, hint, compressor=compressor)


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


def _truncated(what: str) -> CqlProtocolError:
    return CqlProtocolError(f"truncated CQL message body while reading {what}", client_hint="malformed CQL message body")


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
    _, flags, stream, opcode, length = _HEADER.unpack_from(data, 0)
    return version, flags, stream, opcode, length, HEADER_SIZE


def parse_envelope_header(data: bytes | bytearray | memoryview) -> tuple[int, int, int, int, int]:
    """``(version, flags, stream, opcode, body_length)`` of a 9-byte (v3+) header, as found inside segments."""
    first, flags, stream, opcode, length = _HEADER.unpack_from(data, 0)
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


# --- body reader ----------------------------------------------------------------


class _Reader:
    """Bounds-checked reads of the spec's notations (section 3) over a memoryview."""

    __slots__ = ("buf", "pos", "version")

    def __init__(self, buf: bytes | memoryview, version: int, pos: int = 0) -> None:
        self.buf = memoryview(buf)
        self.pos = pos
        self.version = version

    def _take(self, n: int, what: str) -> memoryview:
        start = self.pos
        end = start + n
        if n < 0 or end > len(self.buf):
            raise _truncated(what)
        self.pos = end
        return self.buf[start:end]

    def byte(self) -> int:
        return self._take(1, "[byte]")[0]

    def short(self) -> int:
        return _SHORT.unpack(self._take(2, "[short]"))[0]

    def int32(self) -> int:
        return _INT.unpack(self._take(4, "[int]"))[0]

    def uint32(self) -> int:
        return _UINT.unpack(self._take(4, "[int]"))[0]

    def int64(self) -> int:
        return _LONG.unpack(self._take(8, "[long]"))[0]

    def flags(self) -> int:
        """Query/batch flags: [byte] before v5, [int] from v5 (v5 spec section 9)."""
        if self.version >= 5:
            return self.uint32()
        return self.byte()

    def _text(self, raw: memoryview, what: str) -> str:
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError:
            raise CqlProtocolError(f"invalid UTF-8 in {what}", client_hint=f"invalid UTF-8 in {what}") from None

    def string(self) -> str:
        return self._text(self._take(self.short(), "[string]"), "[string]")

    def long_string(self) -> str:
        n = self.int32()
        if n < 0:
            raise CqlProtocolError("negative [long string] length", client_hint="malformed CQL message body")
        return self._text(self._take(n, "[long string]"), "[long string]")

    def bytes_(self) -> bytes | None:
        n = self.int32()
        if n < 0:
            return None
        return bytes(self._take(n, "[bytes]"))

    def short_bytes(self) -> bytes:
        return bytes(self._take(self.short(), "[short bytes]"))

    def value(self) -> bytes | None | _Unset:
        n = self.int32()
        if n >= 0:
            return bytes(self._take(n, "[value]"))
        if n == -1 or self.version < 4:
            return None
        if n == -2:
            return UNSET
        raise CqlProtocolError(f"invalid [value] length {n}", client_hint="malformed bound value")

    def uuid(self) -> bytes:
        return bytes(self._take(16, "[uuid]"))

    def string_list(self) -> tuple[str, ...]:
        return tuple(self.string() for _ in range(self.short()))

    def string_map(self) -> dict[str, str]:
        out = {}
        for _ in range(self.short()):
            k = self.string()
            out[k] = self.string()
        return out

    def string_multimap(self) -> dict[str, list[str]]:
        out = {}
        for _ in range(self.short()):
            k = self.string()
            out[k] = list(self.string_list())
        return out

    def bytes_map(self) -> dict[str, bytes | None]:
        out = {}
        for _ in range(self.short()):
            k = self.string()
            out[k] = self.bytes_()
        return out

    def consistency(self) -> int:
        return self.short()

    def option(self, depth: int = 0) -> int:
        """Skip an [option] type description (spec 4.2.5.2); returns its id."""
        if depth > _MAX_TYPE_DEPTH:
            raise CqlProtocolError("CQL type description nested too deeply", client_hint="malformed type description")
        type_id = self.short()
        if type_id == 0x0000:  # custom: class name
            self._take(self.short(), "[string]")
        elif type_id in (0x0020, 0x0022):  # list, set
            self.option(depth + 1)
        elif type_id == 0x0021:  # map
            self.option(depth + 1)
            self.option(depth + 1)
        elif type_id == 0x0030:  # UDT
            self._take(self.short(), "[string]")
            self._take(self.short(), "[string]")
            for _ in range(self.short()):
                self._take(self.short(), "[string]")
                self.option(depth + 1)
        elif type_id == 0x0031:  # tuple
            for _ in range(self.short()):
                self.option(depth + 1)
        return type_id


# --- body prefix (tracing id, warnings, custom payload) ---------------------------


@attrs.frozen
class BodyPrefix:
    tracing_id: bytes | None
    warnings: tuple[str, ...]
    custom_payload: dict[str, bytes | None] | None
    size: int


def body_prefix(frame: Frame) -> BodyPrefix:
    """The optional elements that precede the message in the body (v4 2.2 / v5 4)."""
    r = _Reader(frame.body(), frame.version)
    return _read_prefix(frame, r)


def _read_prefix(frame: Frame, r: _Reader) -> BodyPrefix:
    tracing_id = None
    warnings: tuple[str, ...] = ()
    payload = None
    response = frame.is_response
    if response and frame.flags & FLAG_TRACING:
        tracing_id = r.uuid()
    if response and frame.flags & FLAG_WARNING:
        warnings = r.string_list()
    if frame.flags & FLAG_CUSTOM_PAYLOAD:
        payload = r.bytes_map()
    return BodyPrefix(tracing_id, warnings, payload, r.pos)


def _message_reader(frame: Frame, *expected: int) -> _Reader:
    if expected and frame.opcode not in expected:
        names = "/".join(Opcode(o).name for o in expected)
        raise LocalProtocolError(f"frame opcode {frame.opcode:#04x} is not {names}")
    r = _Reader(frame.body(), frame.version)
    _read_prefix(frame, r)
    return r


def _guard(fn):
    """Body parsers raise only ProtocolError subclasses (the fuzz tests hold us to it)."""

    def wrapper(frame: Frame, *args, **kwargs):
        try:
            return fn(frame, *args, **kwargs)
        except (struct.error, IndexError, ValueError) as exc:
            raise CqlProtocolError(
                f"malformed {fn.__name__.removeprefix('parse_').upper()} body: {exc}",
                client_hint="malformed CQL message body",
                stream=frame.stream,
                version=frame.version,
            ) from None

    wrapper.__name__ = fn.__name__
    wrapper.__qualname__ = fn.__qualname__
    wrapper.__doc__ = fn.__doc__
    return wrapper


# --- request bodies ---------------------------------------------------------------


@attrs.frozen
class QueryParameters:
    """<query_parameters> of QUERY and EXECUTE (spec 4.1.4)."""

    consistency: int
    flags: int
    values: tuple[bytes | None | _Unset, ...] = ()
    names: tuple[str, ...] | None = None
    page_size: int | None = None
    paging_state: bytes | None = None
    serial_consistency: int | None = None
    timestamp: int | None = None
    keyspace: str | None = None
    now_in_seconds: int | None = None

    @property
    def skip_metadata(self) -> bool:
        return bool(self.flags & QF_SKIP_METADATA)


def _read_query_parameters(r: _Reader) -> QueryParameters:
    consistency = r.consistency()
    flags = r.flags()
    values: tuple = ()
    names = None
    if flags & QF_VALUES:
        n = r.short()
        if flags & QF_NAMES_FOR_VALUES:
            name_list = []
            value_list = []
            for _ in range(n):
                name_list.append(r.string())
                value_list.append(r.value())
            names = tuple(name_list)
            values = tuple(value_list)
        else:
            values = tuple(r.value() for _ in range(n))
    page_size = r.int32() if flags & QF_PAGE_SIZE else None
    paging_state = r.bytes_() if flags & QF_PAGING_STATE else None
    serial = r.consistency() if flags & QF_SERIAL_CONSISTENCY else None
    timestamp = r.int64() if flags & QF_TIMESTAMP else None
    keyspace = None
    now = None
    if r.version >= 5:
        if flags & QF_KEYSPACE:
            keyspace = r.string()
        if flags & QF_NOW_IN_SECONDS:
            now = r.int32()
    return QueryParameters(consistency, flags, values, names, page_size, paging_state, serial, timestamp, keyspace, now)


@attrs.frozen
class Query:
    query: str
    params: QueryParameters


@attrs.frozen
class Prepare:
    query: str
    keyspace: str | None = None


@attrs.frozen
class Execute:
    query_id: bytes
    result_metadata_id: bytes | None
    params: QueryParameters


@attrs.frozen
class BatchStatement:
    """One <query_i> of a BATCH: ``query`` for kind 0, ``query_id`` for kind 1 (prepared)."""

    kind: int
    query: str | None
    query_id: bytes | None
    values: tuple[bytes | None | _Unset, ...]


@attrs.frozen
class Batch:
    batch_type: int  # 0 logged, 1 unlogged, 2 counter
    statements: tuple[BatchStatement, ...]
    consistency: int
    flags: int
    serial_consistency: int | None = None
    timestamp: int | None = None
    keyspace: str | None = None
    now_in_seconds: int | None = None


@_guard
def parse_startup(frame: Frame) -> dict[str, str]:
    """STARTUP options [string map] (spec 4.1.1)."""
    return _message_reader(frame, Opcode.STARTUP).string_map()


@_guard
def parse_auth_response(frame: Frame) -> bytes | None:
    """The SASL token of an AUTH_RESPONSE (spec 4.1.2)."""
    return _message_reader(frame, Opcode.AUTH_RESPONSE).bytes_()


@_guard
def parse_query(frame: Frame) -> Query:
    r = _message_reader(frame, Opcode.QUERY)
    query = r.long_string()
    return Query(query, _read_query_parameters(r))


@_guard
def parse_prepare(frame: Frame) -> Prepare:
    r = _message_reader(frame, Opcode.PREPARE)
    query = r.long_string()
    keyspace = None
    # v5 4.1.5: <flags>[<keyspace>]; tolerate a v5 body that stops after the query.
    if frame.version >= 5 and r.pos < len(r.buf):
        flags = r.uint32()
        if flags & PREPARE_WITH_KEYSPACE:
            keyspace = r.string()
    return Prepare(query, keyspace)


@_guard
def parse_execute(frame: Frame) -> Execute:
    r = _message_reader(frame, Opcode.EXECUTE)
    query_id = r.short_bytes()
    result_metadata_id = r.short_bytes() if frame.version >= 5 else None
    return Execute(query_id, result_metadata_id, _read_query_parameters(r))


@_guard
def parse_batch(frame: Frame) -> Batch:
    r = _message_reader(frame, Opcode.BATCH)
    batch_type = r.byte()
    statements = []
    for _ in range(r.short()):
        kind = r.byte()
        if kind == 0:
            query, query_id = r.long_string(), None
        elif kind == 1:
            query, query_id = None, r.short_bytes()
        else:
            raise CqlProtocolError(
                f"invalid BATCH statement kind {kind}",
                client_hint="invalid BATCH statement kind",
                stream=frame.stream,
                version=frame.version,
            )
        values = tuple(r.value() for _ in range(r.short()))
        statements.append(BatchStatement(kind, query, query_id, values))
    consistency = r.consistency()
    flags = r.flags()
    serial = r.consistency() if flags & QF_SERIAL_CONSISTENCY else None
    timestamp = r.int64() if flags & QF_TIMESTAMP else None
    keyspace = None
    now = None
    if frame.version >= 5:
        if flags & QF_KEYSPACE:
            keyspace = r.string()
        if flags & QF_NOW_IN_SECONDS:
            now = r.int32()
    return Batch(batch_type, tuple(statements), consistency, flags, serial, timestamp, keyspace, now)


@_guard
def parse_register(frame: Frame) -> tuple[str, ...]:
    return _message_reader(frame, Opcode.REGISTER).string_list()


# --- response bodies ----------------------------------------------------------------


@_guard
def parse_authenticate(frame: Frame) -> str:
    """The IAuthenticator class name of an AUTHENTICATE (spec 4.2.3)."""
    return _message_reader(frame, Opcode.AUTHENTICATE).string()


@_guard
def parse_auth_token(frame: Frame) -> bytes | None:
    """The [bytes] token of AUTH_CHALLENGE / AUTH_SUCCESS / AUTH_RESPONSE."""
    r = _message_reader(frame, Opcode.AUTH_CHALLENGE, Opcode.AUTH_SUCCESS, Opcode.AUTH_RESPONSE)
    return r.bytes_()


@_guard
def parse_supported(frame: Frame) -> dict[str, list[str]]:
    return _message_reader(frame, Opcode.SUPPORTED).string_multimap()


@attrs.frozen
class CqlError:
    code: int
    message: str
    unprepared_id: bytes | None = None  # code 0x2500


@_guard
def parse_error(frame: Frame) -> CqlError:
    r = _message_reader(frame, Opcode.ERROR)
    code = r.int32()
    message = r.string()
    unprepared = r.short_bytes() if code == ErrorCode.UNPREPARED and r.pos < len(r.buf) else None
    return CqlError(code, message, unprepared)


@attrs.frozen
class ColumnSpec:
    keyspace: str
    table: str
    name: str
    type_id: int


@attrs.frozen
class Rows:
    """What the proxy reads of a Rows result (spec 4.2.5.2): metadata and the row count."""

    flags: int
    columns_count: int
    paging_state: bytes | None
    new_metadata_id: bytes | None
    columns: tuple[ColumnSpec, ...]
    row_count: int

    @property
    def has_more_pages(self) -> bool:
        return bool(self.flags & RF_HAS_MORE_PAGES)


@attrs.frozen
class SchemaChange:
    change_type: str
    target: str
    options: tuple[str, ...]


@attrs.frozen
class Result:
    kind: int
    rows: Rows | None = None
    keyspace: str | None = None  # Set_keyspace
    prepared_id: bytes | None = None  # Prepared
    result_metadata_id: bytes | None = None  # Prepared, v5
    bind_count: int | None = None  # Prepared: number of bind markers
    schema_change: SchemaChange | None = None


def _read_column_specs(r: _Reader, flags: int, count: int) -> tuple[ColumnSpec, ...]:
    if flags & RF_NO_METADATA:
        return ()
    ks = table = ""
    global_spec = bool(flags & RF_GLOBAL_TABLES_SPEC)
    if global_spec:
        ks = r.string()
        table = r.string()
    if count < 0:
        raise CqlProtocolError("negative column count", client_hint="malformed result metadata")
    cols = []
    for _ in range(count):
        if global_spec:
            cks, ctable = ks, table
        else:
            cks = r.string()
            ctable = r.string()
        name = r.string()
        cols.append(ColumnSpec(cks, ctable, name, r.option()))
    return tuple(cols)


def _read_schema_change(r: _Reader) -> SchemaChange:
    change_type = r.string()
    target = r.string()
    if target == "KEYSPACE":
        options: tuple[str, ...] = (r.string(),)
    elif target in ("FUNCTION", "AGGREGATE"):
        options = (r.string(), r.string(), *r.string_list())
    else:
        options = (r.string(), r.string())
    return SchemaChange(change_type, target, options)


@_guard
def parse_result(frame: Frame) -> Result:
    r = _message_reader(frame, Opcode.RESULT)
    kind = r.int32()
    if kind == ResultKind.ROWS:
        flags = r.int32()
        count = r.int32()
        paging_state = r.bytes_() if flags & RF_HAS_MORE_PAGES else None
        new_id = r.short_bytes() if frame.version >= 5 and flags & RF_METADATA_CHANGED else None
        columns = _read_column_specs(r, flags, count)
        row_count = r.int32()
        return Result(kind, rows=Rows(flags, count, paging_state, new_id, columns, row_count))
    if kind == ResultKind.SET_KEYSPACE:
        return Result(kind, keyspace=r.string())
    if kind == ResultKind.PREPARED:
        prepared_id = r.short_bytes()
        metadata_id = r.short_bytes() if frame.version >= 5 else None
        r.int32()  # metadata flags
        bind_count = r.int32()
        return Result(kind, prepared_id=prepared_id, result_metadata_id=metadata_id, bind_count=bind_count)
    if kind == ResultKind.SCHEMA_CHANGE:
        return Result(kind, schema_change=_read_schema_change(r))
    if kind == ResultKind.VOID:
        return Result(kind)
    raise CqlProtocolError(
        f"unknown RESULT kind {kind:#06x}",
        client_hint="unknown RESULT kind",
        stream=frame.stream,
        version=frame.version,
    )


@attrs.frozen
class Event:
    event_type: str
    change: str  # NEW_NODE/REMOVED_NODE, UP/DOWN, CREATED/UPDATED/DROPPED
    schema_change: SchemaChange | None = None


@_guard
def parse_event(frame: Frame) -> Event:
    r = _message_reader(frame, Opcode.EVENT)
    event_type = r.string()
    if event_type == "SCHEMA_CHANGE":
        sc = _read_schema_change(r)
        return Event(event_type, sc.change_type, sc)
    return Event(event_type, r.string())


# --- encoders -----------------------------------------------------------------------


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
        header = _HEADER.pack(first, flags, stream, opcode, len(body))
    return header + bytes(body)


def _string(s: str) -> bytes:
    b = s.encode("utf-8")
    if len(b) > 0xFFFF:
        raise LocalProtocolError("[string] longer than 65535 bytes")
    return _SHORT.pack(len(b)) + b


def _long_string(s: str) -> bytes:
    b = s.encode("utf-8")
    return _INT.pack(len(b)) + b


def _bytes(b: bytes | None) -> bytes:
    if b is None:
        return _INT.pack(-1)
    return _INT.pack(len(b)) + bytes(b)


def _value(v: bytes | None | _Unset) -> bytes:
    if v is UNSET:
        return _INT.pack(-2)
    return _bytes(v)  # type: ignore[arg-type]


def _string_list(items: Iterable[str]) -> bytes:
    items = list(items)
    return _SHORT.pack(len(items)) + b"".join(_string(s) for s in items)


def startup_body(options: Mapping[str, str]) -> bytes:
    return _SHORT.pack(len(options)) + b"".join(_string(k) + _string(v) for k, v in options.items())


def sasl_plain_token(username: str, password: str) -> bytes:
    """PasswordAuthenticator's SASL PLAIN initial response: ``\\0user\\0password``."""
    return b"\x00" + username.encode("utf-8") + b"\x00" + password.encode("utf-8")


def auth_token_body(token: bytes | None) -> bytes:
    """Body of AUTH_RESPONSE, AUTH_CHALLENGE and AUTH_SUCCESS: one [bytes]."""
    return _bytes(token)


def authenticate_body(authenticator: str) -> bytes:
    return _string(authenticator)


def error_body(code: int, message: str, extra: bytes = b"") -> bytes:
    return _INT.pack(code) + _string(message) + extra


def supported_body(options: Mapping[str, Sequence[str]]) -> bytes:
    return _SHORT.pack(len(options)) + b"".join(_string(k) + _string_list(v) for k, v in options.items())


def register_body(event_types: Iterable[str]) -> bytes:
    return _string_list(event_types)


def query_body(
    version: int,
    query: str,
    consistency: int = Consistency.ONE,
    *,
    values: Sequence[bytes | None | _Unset] = (),
    page_size: int | None = None,
    keyspace: str | None = None,
) -> bytes:
    """A QUERY body for queries the proxy itself runs (health checks, tests)."""
    flags = 0
    tail = b""
    if values:
        flags |= QF_VALUES
        tail += _SHORT.pack(len(values)) + b"".join(_value(v) for v in values)
    if page_size is not None:
        flags |= QF_PAGE_SIZE
        tail += _INT.pack(page_size)
    if keyspace is not None:
        if version < 5:
            raise LocalProtocolError("a per-query keyspace needs protocol v5")
        flags |= QF_KEYSPACE
        tail += _string(keyspace)
    flag_bytes = _UINT.pack(flags) if version >= 5 else bytes((flags,))
    return _long_string(query) + _SHORT.pack(consistency) + flag_bytes + tail


def encode_startup(version: int, stream: int, options: Mapping[str, str]) -> bytes:
    """STARTUP is never compressed (spec section 5)."""
    return encode_frame(version, 0, stream, Opcode.STARTUP, startup_body(options), response=False)


def encode_options(version: int, stream: int) -> bytes:
    return encode_frame(version, 0, stream, Opcode.OPTIONS, b"", response=False)


def encode_auth_response(version: int, stream: int, token: bytes | None, *, compressor: str | None = None) -> bytes:
    return encode_frame(version, 0, stream, Opcode.AUTH_RESPONSE, auth_token_body(token), response=False, compressor=compressor)


def encode_ready(version: int, stream: int, *, compressor: str | None = None) -> bytes:
    return encode_frame(version, 0, stream, Opcode.READY, b"", response=True, compressor=compressor)


def encode_authenticate(version: int, stream: int, authenticator: str, *, compressor: str | None = None) -> bytes:
    return encode_frame(
        version, 0, stream, Opcode.AUTHENTICATE, authenticate_body(authenticator), response=True, compressor=compressor
    )


def encode_auth_challenge(version: int, stream: int, token: bytes | None, *, compressor: str | None = None) -> bytes:
    return encode_frame(version, 0, stream, Opcode.AUTH_CHALLENGE, auth_token_body(token), response=True, compressor=compressor)


def encode_auth_success(version: int, stream: int, token: bytes | None = None, *, compressor: str | None = None) -> bytes:
    return encode_frame(version, 0, stream, Opcode.AUTH_SUCCESS, auth_token_body(token), response=True, compressor=compressor)


def encode_supported(version: int, stream: int, options: Mapping[str, Sequence[str]], *, compressor: str | None = None) -> bytes:
    return encode_frame(version, 0, stream, Opcode.SUPPORTED, supported_body(options), response=True, compressor=compressor)


def encode_error(
    version: int, stream: int, code: int, message: str, *, extra: bytes = b"", compressor: str | None = None
) -> bytes:
    """An ERROR frame.  Use ``ErrorCode.PROTOCOL_ERROR``, ``AUTH_ERROR`` (0x0100),
    ``UNAUTHORIZED`` (0x2100), ``SERVER_ERROR`` (0x0000), ``OVERLOADED`` (0x1001)...
    The message is for the client: never put secrets in it."""
    return encode_frame(version, 0, stream, Opcode.ERROR, error_body(code, message, extra), response=True, compressor=compressor)


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


def encode_unsupported_version_error(client_version: int, stream: int) -> bytes:
    """The PROTOCOL_ERROR Cassandra sends for a version it does not speak.

    The Python driver looks for "unsupported protocol version" in the message
    to downgrade and retry; never compressed, never framed in segments.
    """
    return encode_error(
        reply_version_for(client_version),
        stream,
        ErrorCode.PROTOCOL_ERROR,
        unsupported_version_message(client_version),
    )


def beta_flag_missing(frame: Frame) -> bool:
    """Cassandra refuses a beta version (v6) unless the frame sets USE_BETA."""
    return frame.version in BETA_VERSIONS and not frame.flags & FLAG_BETA
