"""Legacy opcodes OP_QUERY (2004) and OP_REPLY (1): what a first handshake may still use.

Strategy: drivers and mongosh send their first ``hello`` / ``isMaster`` as an
OP_QUERY on ``admin.$cmd`` and expect an OP_REPLY (MongoDB manual, "Legacy
Opcodes"); a server older than 3.6 speaks nothing else.  ``parse_op_query``
reads the collection name, skip/return numbers and the query document
(unwrapping ``$query`` for commands), ``parse_op_reply`` the fixed fields
and the raw documents, which decode on access.  The encoders build the
handshake the proxy sends a backend and the OP_REPLY answers it gives an
OP_QUERY client.  The other legacy opcodes (OP_INSERT, OP_GET_MORE…) are
framed by the decoder and forwarded opaque; nothing here parses them.
"""

from __future__ import annotations

import struct
from typing import Any, Mapping, Sequence

import attrs
from bson.errors import BSONError
from bson.raw_bson import RawBSONDocument

from .wire import (
    HEADER_SIZE,
    I32,
    OP_QUERY,
    OP_REPLY,
    WireMessage,
    as_message,
    bad_message,
    document_size,
    encode_document,
    encode_header,
    raw_document,
    split_documents,
)

__all__ = [
    "QUERY_FLAG_SECONDARY_OK", "REPLY_FLAG_CURSOR_NOT_FOUND", "REPLY_FLAG_QUERY_FAILURE",
    "REPLY_FLAG_AWAIT_CAPABLE", "OpQuery", "parse_op_query", "encode_op_query", "OpReply", "parse_op_reply",
    "encode_op_reply",
]

# --- OP_QUERY / OP_REPLY flags (legacy opcodes) --------------------------------

QUERY_FLAG_SECONDARY_OK = 1 << 2
REPLY_FLAG_CURSOR_NOT_FOUND = 1 << 0
REPLY_FLAG_QUERY_FAILURE = 1 << 1
REPLY_FLAG_AWAIT_CAPABLE = 1 << 3


_OP_QUERY_NUMS = struct.Struct("<ii")
_OP_REPLY_FIXED = struct.Struct("<iqii")


@attrs.frozen
class OpQuery:
    flags: int
    full_collection_name: str
    number_to_skip: int
    number_to_return: int
    query_raw: bytes = attrs.field(repr=False)
    fields_raw: bytes | None = attrs.field(default=None, repr=False)

    @property
    def query(self) -> RawBSONDocument:
        return raw_document(self.query_raw)

    @property
    def fields(self) -> RawBSONDocument | None:
        return None if self.fields_raw is None else raw_document(self.fields_raw)

    @property
    def database(self) -> str:
        return self.full_collection_name.partition(".")[0]

    @property
    def is_command(self) -> bool:
        """True for ``<db>.$cmd`` queries (commands sent over OP_QUERY)."""
        return self.full_collection_name.endswith(".$cmd")

    def command(self) -> RawBSONDocument:
        """The command document, unwrapped from ``{$query: {...}}`` if needed."""
        q = self.query
        try:
            first = next(iter(q), None)
            inner = q[first] if first in ("$query", "query") else None
        except BSONError as exc:
            raise bad_message(f"invalid BSON document: {exc}") from None
        if isinstance(inner, RawBSONDocument):
            return raw_document(inner.raw)
        return q


def parse_op_query(msg: WireMessage | bytes) -> OpQuery:
    msg = as_message(msg)
    if msg.op_code != OP_QUERY:
        raise bad_message(f"opcode {msg.op_code} is not OP_QUERY")
    raw = msg.raw
    end = len(raw)
    pos = HEADER_SIZE
    if end < pos + 4 + 1 + 8 + 5:
        raise bad_message("OP_QUERY too short")
    flags = I32.unpack_from(raw, pos)[0]
    pos += 4
    nul = raw.find(b"\x00", pos, end)
    if nul < 0:
        raise bad_message("OP_QUERY fullCollectionName is not NUL-terminated")
    try:
        name = raw[pos:nul].decode("utf-8")
    except UnicodeDecodeError:
        raise bad_message("OP_QUERY fullCollectionName is not UTF-8") from None
    pos = nul + 1
    if pos + 8 > end:
        raise bad_message("OP_QUERY truncated before numberToSkip")
    skip, nreturn = _OP_QUERY_NUMS.unpack_from(raw, pos)
    pos += 8
    size = document_size(raw, pos, end, "OP_QUERY query")
    query = raw[pos:pos + size]
    pos += size
    fields = None
    if pos < end:
        size = document_size(raw, pos, end, "OP_QUERY returnFieldsSelector")
        fields = raw[pos:pos + size]
        pos += size
    if pos != end:
        raise bad_message("OP_QUERY has trailing bytes after its documents")
    return OpQuery(flags, name, skip, nreturn, query, fields)


def encode_op_query(
    full_collection_name: str,
    query: Mapping[str, Any] | bytes,
    *,
    request_id: int | None = None,
    response_to: int = 0,
    flags: int = 0,
    number_to_skip: int = 0,
    number_to_return: int = -1,
    fields: Mapping[str, Any] | bytes | None = None,
) -> bytes:
    """Encode an OP_QUERY (``numberToReturn=-1`` is what drivers send for commands)."""
    payload = (
        I32.pack(flags)
        + full_collection_name.encode("utf-8")
        + b"\x00"
        + _OP_QUERY_NUMS.pack(number_to_skip, number_to_return)
        + encode_document(query)
        + (b"" if fields is None else encode_document(fields))
    )
    return encode_header(HEADER_SIZE + len(payload), request_id, response_to, OP_QUERY) + payload


@attrs.frozen
class OpReply:
    response_flags: int
    cursor_id: int
    starting_from: int
    number_returned: int
    documents_raw: bytes = attrs.field(repr=False)

    @property
    def documents(self) -> list[RawBSONDocument]:
        return split_documents(self.documents_raw)


def parse_op_reply(msg: WireMessage | bytes) -> OpReply:
    msg = as_message(msg)
    if msg.op_code != OP_REPLY:
        raise bad_message(f"opcode {msg.op_code} is not OP_REPLY")
    raw = msg.raw
    if len(raw) < HEADER_SIZE + _OP_REPLY_FIXED.size:
        raise bad_message("OP_REPLY too short")
    flags, cursor_id, starting_from, number_returned = _OP_REPLY_FIXED.unpack_from(raw, HEADER_SIZE)
    docs = raw[HEADER_SIZE + _OP_REPLY_FIXED.size:]
    return OpReply(flags, cursor_id, starting_from, number_returned, docs)


def encode_op_reply(
    docs: Sequence[Mapping[str, Any] | bytes],
    request_id: int | None = None,
    response_to: int = 0,
    *,
    response_flags: int = 0,
    cursor_id: int = 0,
    starting_from: int = 0,
) -> bytes:
    encoded = b"".join(encode_document(d) for d in docs)
    payload = _OP_REPLY_FIXED.pack(response_flags, cursor_id, starting_from, len(docs)) + encoded
    return encode_header(HEADER_SIZE + len(payload), request_id, response_to, OP_REPLY) + payload
