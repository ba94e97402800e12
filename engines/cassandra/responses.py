"""CQL response bodies (v4 spec section 4.2, v5 section 4.2): parse lazily, encode what the proxy answers.

Strategy: one ``parse_*`` per response opcode (ERROR, AUTHENTICATE,
AUTH_CHALLENGE/AUTH_SUCCESS, SUPPORTED, RESULT, EVENT), each reading a
frame's body with ``body.message_reader``.  A RESULT is read only as far as
the audit needs: its kind, and for Rows the metadata and the row count —
column types are skipped, never decoded (``Reader.option``), and rows are
not read.  The encoders build the frames the proxy answers with itself
(READY, AUTHENTICATE, AUTH_*, SUPPORTED, ERROR); ``protocol_error_reply``
renders any ProtocolError as the PROTOCOL_ERROR Cassandra would send, on
the offending stream.  Error codes: v4 section 9, v5 section 8.
"""

from __future__ import annotations

import enum
from typing import Mapping, Sequence

import attrs

from .body import (
    SHORT,
    INT,
    Reader,
    auth_token_body,
    guard,
    message_reader,
    pack_string,
    pack_string_list,
)
from .frames import (
    CURRENT_VERSION,
    CqlProtocolError,
    Frame,
    Opcode,
    encode_frame,
    reply_version_for,
    unsupported_version_message,
)

__all__ = [
    "ErrorCode", "ResultKind", "RF_GLOBAL_TABLES_SPEC", "RF_HAS_MORE_PAGES", "RF_NO_METADATA",
    "RF_METADATA_CHANGED", "parse_authenticate", "parse_auth_token", "parse_supported", "CqlError",
    "parse_error", "ColumnSpec", "Rows", "SchemaChange", "Result", "parse_result", "Event", "parse_event",
    "authenticate_body", "error_body", "supported_body", "encode_ready", "encode_authenticate",
    "encode_auth_challenge", "encode_auth_success", "encode_supported", "encode_error",
    "protocol_error_reply", "encode_unsupported_version_error",
]


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


class ResultKind(enum.IntEnum):
    VOID = 0x0001
    ROWS = 0x0002
    SET_KEYSPACE = 0x0003
    PREPARED = 0x0004
    SCHEMA_CHANGE = 0x0005


# Rows metadata flags (spec 4.2.5.2)
RF_GLOBAL_TABLES_SPEC = 0x0001
RF_HAS_MORE_PAGES = 0x0002
RF_NO_METADATA = 0x0004
RF_METADATA_CHANGED = 0x0008  # v5


# --- response bodies ----------------------------------------------------------------


@guard
def parse_authenticate(frame: Frame) -> str:
    """The IAuthenticator class name of an AUTHENTICATE (spec 4.2.3)."""
    return message_reader(frame, Opcode.AUTHENTICATE).string()


@guard
def parse_auth_token(frame: Frame) -> bytes | None:
    """The [bytes] token of AUTH_CHALLENGE / AUTH_SUCCESS / AUTH_RESPONSE."""
    r = message_reader(frame, Opcode.AUTH_CHALLENGE, Opcode.AUTH_SUCCESS, Opcode.AUTH_RESPONSE)
    return r.bytes_()


@guard
def parse_supported(frame: Frame) -> dict[str, list[str]]:
    return message_reader(frame, Opcode.SUPPORTED).string_multimap()


@attrs.frozen
class CqlError:
    code: int
    message: str
    unprepared_id: bytes | None = None  # code 0x2500


@guard
def parse_error(frame: Frame) -> CqlError:
    r = message_reader(frame, Opcode.ERROR)
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
    end: int = 0  # body offset just past the row count: what the audit reads of the result ends here

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


def _read_column_specs(r: Reader, flags: int, count: int) -> tuple[ColumnSpec, ...]:
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


def _read_schema_change(r: Reader) -> SchemaChange:
    change_type = r.string()
    target = r.string()
    if target == "KEYSPACE":
        options: tuple[str, ...] = (r.string(),)
    elif target in ("FUNCTION", "AGGREGATE"):
        options = (r.string(), r.string(), *r.string_list())
    else:
        options = (r.string(), r.string())
    return SchemaChange(change_type, target, options)


@guard
def parse_result(frame: Frame) -> Result:
    r = message_reader(frame, Opcode.RESULT)
    kind = r.int32()
    if kind == ResultKind.ROWS:
        flags = r.int32()
        count = r.int32()
        paging_state = r.bytes_() if flags & RF_HAS_MORE_PAGES else None
        new_id = r.short_bytes() if frame.version >= 5 and flags & RF_METADATA_CHANGED else None
        columns = _read_column_specs(r, flags, count)
        row_count = r.int32()
        return Result(kind, rows=Rows(flags, count, paging_state, new_id, columns, row_count, r.pos))
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


@guard
def parse_event(frame: Frame) -> Event:
    r = message_reader(frame, Opcode.EVENT)
    event_type = r.string()
    if event_type == "SCHEMA_CHANGE":
        sc = _read_schema_change(r)
        return Event(event_type, sc.change_type, sc)
    return Event(event_type, r.string())


# --- encoders -----------------------------------------------------------------------

def authenticate_body(authenticator: str) -> bytes:
    return pack_string(authenticator)


def error_body(code: int, message: str, extra: bytes = b"") -> bytes:
    return INT.pack(code) + pack_string(message) + extra


def supported_body(options: Mapping[str, Sequence[str]]) -> bytes:
    return SHORT.pack(len(options)) + b"".join(pack_string(k) + pack_string_list(v) for k, v in options.items())


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
