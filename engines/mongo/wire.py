"""MongoDB wire protocol framing: the message header, opcodes, and the BSON documents messages carry.

Strategy.  Every message on the wire is a 16-byte ``MsgHeader`` (four int32
little-endian: messageLength, requestID, responseTo, opCode) followed by an
opcode-specific body.  The decoder (``codec.py``) only frames: it turns bytes
into ``WireMessage`` objects that hold their exact wire bytes in ``raw`` and
the header fields.  Everything past the header is parsed on demand, because
the proxy forwards most messages untouched, by the module of its opcode:

* ``opmsg.py``       — OP_MSG sections, document sequences, CRC-32C
  (mongodb/specifications ``source/message/OP_MSG.md``);
* ``legacy.py``      — OP_QUERY / OP_REPLY, which drivers and mongosh still
  use for the first ``hello`` / ``isMaster`` (MongoDB manual, "Legacy Opcodes");
* ``compression.py`` — OP_COMPRESSED and its compressors
  (``source/compression/OP_COMPRESSED.md``);
* ``commands.py``    — the command a request carries, whatever its opcode,
  and the replies the proxy originates;
* ``protocol.py``    — one namespace over all of them.

``WireMessage`` peeks at a few body fields without parsing (OP_MSG flagBits,
OP_COMPRESSED's originalOpcode), so the hot path reads no further.

BSON is only ever read and written by pymongo's ``bson`` (``RawBSONDocument``
for lazy, validated-on-access documents; ``bson.decode_all`` to split a
document sequence); these modules only frame.  Every malformed input raises
``RemoteProtocolError`` (never ``struct.error``/``IndexError``/bson errors),
so callers handle one exception family.
"""

from __future__ import annotations

import itertools
import os
import struct
from typing import Any, Mapping

import attrs
import bson
from bson.codec_options import CodecOptions
from bson.errors import BSONError
from bson.raw_bson import RawBSONDocument

from dbproxy.errors import RemoteProtocolError

__all__ = [
    "OP_REPLY", "OP_UPDATE", "OP_INSERT", "OP_RESERVED", "OP_QUERY", "OP_GET_MORE", "OP_DELETE",
    "OP_KILL_CURSORS", "OP_COMMAND", "OP_COMMANDREPLY", "OP_COMPRESSED", "OP_MSG", "KNOWN_OPCODES",
    "DEFAULT_MAX_MESSAGE_SIZE", "HEADER", "HEADER_SIZE", "CHECKSUM_PRESENT", "MORE_TO_COME",
    "EXHAUST_ALLOWED", "I32", "U32", "next_request_id", "bad_message", "WireMessage", "as_message",
    "encode_header", "raw_document", "decode_document", "split_documents", "encode_document", "document_size",
    "command_name", "database_name", "collection_name",
]

# --- opcodes -----------------------------------------------------------------

OP_REPLY = 1
OP_UPDATE = 2001
OP_INSERT = 2002
OP_RESERVED = 2003
OP_QUERY = 2004
OP_GET_MORE = 2005
OP_DELETE = 2006
OP_KILL_CURSORS = 2007
OP_COMMAND = 2010  # internal, removed in 4.2
OP_COMMANDREPLY = 2011  # internal, removed in 4.2
OP_COMPRESSED = 2012
OP_MSG = 2013

#: Every opcode a MongoDB server has ever defined.  The decoder frames all of
#: them; only OP_MSG / OP_QUERY / OP_REPLY / OP_COMPRESSED are parsed, the
#: rest are forwarded opaque.
KNOWN_OPCODES = frozenset(
    {
        OP_REPLY,
        OP_UPDATE,
        OP_INSERT,
        OP_RESERVED,
        OP_QUERY,
        OP_GET_MORE,
        OP_DELETE,
        OP_KILL_CURSORS,
        OP_COMMAND,
        OP_COMMANDREPLY,
        OP_COMPRESSED,
        OP_MSG,
    }
)

# Default maxMessageSizeBytes a server reports in its hello reply.
DEFAULT_MAX_MESSAGE_SIZE = 48_000_000

HEADER = struct.Struct("<iiii")
HEADER_SIZE = HEADER.size

# --- OP_MSG flagBits (OP_MSG.md "flagBits"): peeked here, the rest is opmsg.py --

CHECKSUM_PRESENT = 1 << 0
MORE_TO_COME = 1 << 1
EXHAUST_ALLOWED = 1 << 16

I32 = struct.Struct("<i")
U32 = struct.Struct("<I")

_RAW_OPTIONS: CodecOptions = CodecOptions(document_class=RawBSONDocument)

_BAD_MESSAGE_HINT = "malformed MongoDB wire protocol message"

_request_ids = itertools.count(int.from_bytes(os.urandom(3), "little") + 1)


def next_request_id() -> int:
    """A fresh requestID for a message the proxy originates (positive int32)."""
    return next(_request_ids) & 0x7FFFFFFF


def bad_message(message: str, hint: str = _BAD_MESSAGE_HINT) -> RemoteProtocolError:
    return RemoteProtocolError(message, client_hint=hint)


# --- the framed message --------------------------------------------------------


@attrs.frozen
class WireMessage:
    """One framed message: the header fields plus its exact wire bytes."""

    length: int
    request_id: int
    response_to: int
    op_code: int
    raw: bytes = attrs.field(repr=False)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> "WireMessage":
        """Frame one complete message (exactly ``messageLength`` bytes)."""
        data = bytes(data)
        if len(data) < HEADER_SIZE:
            raise bad_message(f"message of {len(data)} bytes is shorter than a header")
        length, request_id, response_to, op_code = HEADER.unpack_from(data)
        if length != len(data):
            raise bad_message(f"messageLength {length} does not match {len(data)} bytes")
        return cls(length, request_id, response_to, op_code, data)

    @property
    def body(self) -> memoryview:
        """The bytes after the header (a view, no copy)."""
        return memoryview(self.raw)[HEADER_SIZE:]

    @property
    def is_compressed(self) -> bool:
        return self.op_code == OP_COMPRESSED

    @property
    def effective_op_code(self) -> int:
        """The opcode of the wrapped message for OP_COMPRESSED, else ``op_code``.

        Reads ``originalOpcode`` without decompressing.
        """
        if self.op_code == OP_COMPRESSED and self.length >= HEADER_SIZE + 4:
            return I32.unpack_from(self.raw, HEADER_SIZE)[0]
        return self.op_code

    @property
    def op_msg_flags(self) -> int:
        """OP_MSG flagBits (0 for other opcodes or a truncated body)."""
        if self.op_code == OP_MSG and self.length >= HEADER_SIZE + 4:
            return U32.unpack_from(self.raw, HEADER_SIZE)[0]
        return 0

    @property
    def more_to_come(self) -> bool:
        """OP_MSG moreToCome: no reply follows this request / more replies follow."""
        return bool(self.op_msg_flags & MORE_TO_COME)


def as_message(msg: WireMessage | bytes | bytearray | memoryview) -> WireMessage:
    return msg if isinstance(msg, WireMessage) else WireMessage.from_bytes(msg)


def encode_header(length: int, request_id: int | None, response_to: int, op_code: int) -> bytes:
    if request_id is None:
        request_id = next_request_id()
    return HEADER.pack(length, request_id, response_to, op_code)


# --- BSON helpers (pymongo's bson does all the work) ----------------------------


def raw_document(data: bytes | memoryview) -> RawBSONDocument:
    """A ``RawBSONDocument`` over ``data`` whose top level has been validated.

    Nested documents stay raw until accessed.  Malformed BSON raises
    ``RemoteProtocolError``.
    """
    try:
        doc = RawBSONDocument(bytes(data))
        len(doc)  # inflates (and validates) the top level once
    except (BSONError, ValueError, TypeError, OverflowError) as exc:
        raise bad_message(f"invalid BSON document: {exc}") from None
    return doc


def decode_document(data: bytes | memoryview | RawBSONDocument) -> dict[str, Any]:
    """Fully decode a BSON document into plain Python objects."""
    if isinstance(data, RawBSONDocument):
        data = data.raw
    try:
        return bson.decode(bytes(data))
    except (BSONError, ValueError, TypeError, OverflowError) as exc:
        raise bad_message(f"invalid BSON document: {exc}") from None


def split_documents(data: bytes | memoryview) -> list[RawBSONDocument]:
    """Split concatenated BSON documents (a document sequence, OP_REPLY docs)."""
    try:
        docs = bson.decode_all(bytes(data), _RAW_OPTIONS)
    except (BSONError, ValueError, TypeError, OverflowError) as exc:
        raise bad_message(f"invalid BSON document sequence: {exc}") from None
    return docs


def encode_document(doc: Mapping[str, Any] | bytes | bytearray | memoryview | RawBSONDocument) -> bytes:
    if isinstance(doc, RawBSONDocument):
        return doc.raw
    if isinstance(doc, (bytes, bytearray, memoryview)):
        return bytes(doc)
    return bson.encode(doc)


def document_size(data: bytes, pos: int, end: int, what: str) -> int:
    """The int32 size prefix of a document at ``pos``, checked against ``end``."""
    if pos + 4 > end:
        raise bad_message(f"{what}: truncated before the document size")
    size = I32.unpack_from(data, pos)[0]
    if size < 5 or pos + size > end:
        raise bad_message(f"{what}: document size {size} does not fit the message")
    return size


# --- command documents: name, $db, collection ----------------------------------


def _as_document(body: Mapping[str, Any] | bytes | memoryview) -> Mapping[str, Any]:
    if isinstance(body, (bytes, bytearray, memoryview)):
        return raw_document(body)
    return body


def command_name(body: Mapping[str, Any] | bytes) -> str:
    """The command name: the first key of the command document."""
    doc = _as_document(body)
    try:
        return next(iter(doc))
    except StopIteration:
        raise bad_message("empty command document", "empty command document") from None
    except BSONError as exc:
        raise bad_message(f"invalid BSON document: {exc}") from None


def database_name(body: Mapping[str, Any] | bytes) -> str | None:
    """The ``$db`` global argument of an OP_MSG command (None if absent or not a string)."""
    doc = _as_document(body)
    try:
        db = doc.get("$db")
    except BSONError as exc:
        raise bad_message(f"invalid BSON document: {exc}") from None
    return db if isinstance(db, str) else None


def collection_name(body: Mapping[str, Any] | bytes) -> str | None:
    """The collection a command targets: the first key's value when it is a string
    (``{find: "coll"}``), or ``collection`` for ``getMore``; else None."""
    doc = _as_document(body)
    try:
        name = next(iter(doc), None)
        if name is None:
            return None
        value = doc[name]
        if name == "getMore":
            value = doc.get("collection")
    except BSONError as exc:
        raise bad_message(f"invalid BSON document: {exc}") from None
    return value if isinstance(value, str) else None
