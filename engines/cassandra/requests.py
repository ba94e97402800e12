"""CQL request bodies (v4 spec section 4.1, v5 section 4.1): parse lazily, encode what the proxy sends.

Strategy: one ``parse_*`` per request opcode (STARTUP, AUTH_RESPONSE,
QUERY, PREPARE, EXECUTE, BATCH, REGISTER), each reading a frame's body with
``body.message_reader`` and returning a frozen attrs record; the audit and
policy stages call them only for the frames they look at.  Version
differences are handled where the spec puts them: query/batch flags are a
[byte] before v5 and an [int] since (v5 section 9), EXECUTE carries a
result metadata id from v5, PREPARE may name a keyspace from v5.  The
encoders build the requests the proxy itself sends to the backend (its own
login, health checks, tests).
"""

from __future__ import annotations

import enum
from typing import Iterable, Mapping, Sequence

import attrs

from dbproxy.errors import LocalProtocolError

from .body import (
    SHORT,
    UINT,
    INT,
    Reader,
    Unset,
    auth_token_body,
    guard,
    message_reader,
    pack_long_string,
    pack_string,
    pack_string_list,
    pack_value,
)
from .frames import CqlProtocolError, Frame, Opcode, encode_frame

__all__ = [
    "Consistency", "QF_VALUES", "QF_SKIP_METADATA", "QF_PAGE_SIZE", "QF_PAGING_STATE",
    "QF_SERIAL_CONSISTENCY", "QF_TIMESTAMP", "QF_NAMES_FOR_VALUES", "QF_KEYSPACE", "QF_NOW_IN_SECONDS",
    "PREPARE_WITH_KEYSPACE", "QueryParameters", "Query", "Prepare", "Execute", "BatchStatement", "Batch",
    "parse_startup", "parse_auth_response", "parse_query", "parse_prepare", "parse_execute", "parse_batch",
    "parse_register", "startup_body", "sasl_plain_token", "register_body", "query_body", "encode_startup",
    "encode_options", "encode_auth_response",
]


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


# --- request bodies ---------------------------------------------------------------


@attrs.frozen
class QueryParameters:
    """<query_parameters> of QUERY and EXECUTE (spec 4.1.4)."""

    consistency: int
    flags: int
    values: tuple[bytes | None | Unset, ...] = ()
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


def _read_query_parameters(r: Reader) -> QueryParameters:
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
    values: tuple[bytes | None | Unset, ...]


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


@guard
def parse_startup(frame: Frame) -> dict[str, str]:
    """STARTUP options [string map] (spec 4.1.1)."""
    return message_reader(frame, Opcode.STARTUP).string_map()


@guard
def parse_auth_response(frame: Frame) -> bytes | None:
    """The SASL token of an AUTH_RESPONSE (spec 4.1.2)."""
    return message_reader(frame, Opcode.AUTH_RESPONSE).bytes_()


@guard
def parse_query(frame: Frame) -> Query:
    r = message_reader(frame, Opcode.QUERY)
    query = r.long_string()
    return Query(query, _read_query_parameters(r))


@guard
def parse_prepare(frame: Frame) -> Prepare:
    r = message_reader(frame, Opcode.PREPARE)
    query = r.long_string()
    keyspace = None
    # v5 4.1.5: <flags>[<keyspace>]; tolerate a v5 body that stops after the query.
    if frame.version >= 5 and r.pos < len(r.buf):
        flags = r.uint32()
        if flags & PREPARE_WITH_KEYSPACE:
            keyspace = r.string()
    return Prepare(query, keyspace)


@guard
def parse_execute(frame: Frame) -> Execute:
    r = message_reader(frame, Opcode.EXECUTE)
    query_id = r.short_bytes()
    result_metadata_id = r.short_bytes() if frame.version >= 5 else None
    return Execute(query_id, result_metadata_id, _read_query_parameters(r))


@guard
def parse_batch(frame: Frame) -> Batch:
    r = message_reader(frame, Opcode.BATCH)
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


@guard
def parse_register(frame: Frame) -> tuple[str, ...]:
    return message_reader(frame, Opcode.REGISTER).string_list()


# --- encoders -----------------------------------------------------------------------

def startup_body(options: Mapping[str, str]) -> bytes:
    return SHORT.pack(len(options)) + b"".join(pack_string(k) + pack_string(v) for k, v in options.items())


def sasl_plain_token(username: str, password: str) -> bytes:
    """PasswordAuthenticator's SASL PLAIN initial response: ``\\0user\\0password``."""
    return b"\x00" + username.encode("utf-8") + b"\x00" + password.encode("utf-8")


def register_body(event_types: Iterable[str]) -> bytes:
    return pack_string_list(event_types)


def query_body(
    version: int,
    query: str,
    consistency: int = Consistency.ONE,
    *,
    values: Sequence[bytes | None | Unset] = (),
    page_size: int | None = None,
    keyspace: str | None = None,
) -> bytes:
    """A QUERY body for queries the proxy itself runs (health checks, tests)."""
    flags = 0
    tail = b""
    if values:
        flags |= QF_VALUES
        tail += SHORT.pack(len(values)) + b"".join(pack_value(v) for v in values)
    if page_size is not None:
        flags |= QF_PAGE_SIZE
        tail += INT.pack(page_size)
    if keyspace is not None:
        if version < 5:
            raise LocalProtocolError("a per-query keyspace needs protocol v5")
        flags |= QF_KEYSPACE
        tail += pack_string(keyspace)
    flag_bytes = UINT.pack(flags) if version >= 5 else bytes((flags,))
    return pack_long_string(query) + SHORT.pack(consistency) + flag_bytes + tail


def encode_startup(version: int, stream: int, options: Mapping[str, str]) -> bytes:
    """STARTUP is never compressed (spec section 5)."""
    return encode_frame(version, 0, stream, Opcode.STARTUP, startup_body(options), response=False)


def encode_options(version: int, stream: int) -> bytes:
    return encode_frame(version, 0, stream, Opcode.OPTIONS, b"", response=False)


def encode_auth_response(version: int, stream: int, token: bytes | None, *, compressor: str | None = None) -> bytes:
    return encode_frame(version, 0, stream, Opcode.AUTH_RESPONSE, auth_token_body(token), response=False, compressor=compressor)
