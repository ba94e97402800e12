"""MongoDB wire protocol messages: parse lazily, encode what the proxy originates.

Strategy.  Every message on the wire is a 16-byte ``MsgHeader`` (four int32
little-endian: messageLength, requestID, responseTo, opCode) followed by an
opcode-specific body.  The decoder (``codec.py``) only frames: it turns bytes
into ``WireMessage`` objects that hold their exact wire bytes in ``raw`` and
the header fields.  Everything past the header is parsed on demand by the
functions here, because the proxy forwards most messages untouched:

* ``op_msg_body_raw`` slices the kind-0 body document out of an OP_MSG and
  nothing else (the audit hot path needs the command name and ``$db``).
* ``parse_op_msg`` walks the sections, verifies the optional CRC-32C and
  returns an ``OpMsg`` whose body / document sequences decode on access.
* ``parse_op_query`` / ``parse_op_reply`` for the legacy opcodes that drivers
  and mongosh still use for the first ``hello`` / ``isMaster``.
* ``decompress`` unwraps OP_COMPRESSED into the original message (rebuilt
  header, original opcode) only when a stage needs to look inside; the
  compressed bytes themselves are forwarded as received.

BSON is only ever read and written by pymongo's ``bson`` (``RawBSONDocument``
for lazy, validated-on-access documents; ``bson.decode_all`` to split a
document sequence); this module only frames sections.  Every malformed input
raises ``RemoteProtocolError`` (never ``struct.error``/``IndexError``/bson
errors), so callers handle one exception family.

Spec references: mongodb/specifications ``source/message/OP_MSG.md``,
``source/compression/OP_COMPRESSED.md``, and the legacy opcode reference of
the MongoDB manual ("Legacy Opcodes": OP_QUERY, OP_REPLY).
"""

from __future__ import annotations

import itertools
import os
import struct
import zlib
from typing import Any, Iterable, Mapping, Sequence

import attrs
import bson
import crc32c
from bson.codec_options import CodecOptions
from bson.errors import BSONError
from bson.raw_bson import RawBSONDocument

from dbproxy.errors import FrameTooLarge, LocalProtocolError, RemoteProtocolError

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

# --- OP_MSG flagBits (OP_MSG.md "flagBits") -----------------------------------

CHECKSUM_PRESENT = 1 << 0
MORE_TO_COME = 1 << 1
EXHAUST_ALLOWED = 1 << 16
# The low 16 bits are "required": a receiver MUST error on any it does not know.
_REQUIRED_BITS = 0xFFFF
_KNOWN_REQUIRED = CHECKSUM_PRESENT | MORE_TO_COME

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

# --- OP_QUERY / OP_REPLY flags (legacy opcodes) --------------------------------

QUERY_FLAG_SECONDARY_OK = 1 << 2
REPLY_FLAG_CURSOR_NOT_FOUND = 1 << 0
REPLY_FLAG_QUERY_FAILURE = 1 << 1
REPLY_FLAG_AWAIT_CAPABLE = 1 << 3

_I32 = struct.Struct("<i")
_U32 = struct.Struct("<I")
_U32_U8 = struct.Struct("<IB")
_OP_QUERY_NUMS = struct.Struct("<ii")
_OP_REPLY_FIXED = struct.Struct("<iqii")
_COMPRESSED_FIXED = struct.Struct("<iiB")
_COMPRESSED_HEADER_SIZE = HEADER_SIZE + _COMPRESSED_FIXED.size  # 25

_RAW_OPTIONS: CodecOptions = CodecOptions(document_class=RawBSONDocument)

_BAD_MESSAGE_HINT = "malformed MongoDB wire protocol message"

_request_ids = itertools.count(int.from_bytes(os.urandom(3), "little") + 1)


def next_request_id() -> int:
    """A fresh requestID for a message the proxy originates (positive int32)."""
    return next(_request_ids) & 0x7FFFFFFF


def _bad(message: str, hint: str = _BAD_MESSAGE_HINT) -> RemoteProtocolError:
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
            raise _bad(f"message of {len(data)} bytes is shorter than a header")
        length, request_id, response_to, op_code = HEADER.unpack_from(data)
        if length != len(data):
            raise _bad(f"messageLength {length} does not match {len(data)} bytes")
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
            return _I32.unpack_from(self.raw, HEADER_SIZE)[0]
        return self.op_code

    @property
    def op_msg_flags(self) -> int:
        """OP_MSG flagBits (0 for other opcodes or a truncated body)."""
        if self.op_code == OP_MSG and self.length >= HEADER_SIZE + 4:
            return _U32.unpack_from(self.raw, HEADER_SIZE)[0]
        return 0

    @property
    def more_to_come(self) -> bool:
        """OP_MSG moreToCome: no reply follows this request / more replies follow."""
        return bool(self.op_msg_flags & MORE_TO_COME)


def _as_message(msg: WireMessage | bytes | bytearray | memoryview) -> WireMessage:
    return msg if isinstance(msg, WireMessage) else WireMessage.from_bytes(msg)


def _header(length: int, request_id: int | None, response_to: int, op_code: int) -> bytes:
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
        raise _bad(f"invalid BSON document: {exc}") from None
    return doc


def decode_document(data: bytes | memoryview | RawBSONDocument) -> dict[str, Any]:
    """Fully decode a BSON document into plain Python objects."""
    if isinstance(data, RawBSONDocument):
        data = data.raw
    try:
        return bson.decode(bytes(data))
    except (BSONError, ValueError, TypeError, OverflowError) as exc:
        raise _bad(f"invalid BSON document: {exc}") from None


def _split_documents(data: bytes | memoryview) -> list[RawBSONDocument]:
    """Split concatenated BSON documents (a document sequence, OP_REPLY docs)."""
    try:
        docs = bson.decode_all(bytes(data), _RAW_OPTIONS)
    except (BSONError, ValueError, TypeError, OverflowError) as exc:
        raise _bad(f"invalid BSON document sequence: {exc}") from None
    return docs


def _encode_document(doc: Mapping[str, Any] | bytes | bytearray | memoryview | RawBSONDocument) -> bytes:
    if isinstance(doc, RawBSONDocument):
        return doc.raw
    if isinstance(doc, (bytes, bytearray, memoryview)):
        return bytes(doc)
    return bson.encode(doc)


def _doc_size(data: bytes, pos: int, end: int, what: str) -> int:
    """The int32 size prefix of a document at ``pos``, checked against ``end``."""
    if pos + 4 > end:
        raise _bad(f"{what}: truncated before the document size")
    size = _I32.unpack_from(data, pos)[0]
    if size < 5 or pos + size > end:
        raise _bad(f"{what}: document size {size} does not fit the message")
    return size


# --- OP_MSG --------------------------------------------------------------------


@attrs.frozen
class OpMsg:
    """A parsed OP_MSG.  Documents decode on access.

    ``body_raw`` is the kind-0 document; ``sequences_raw`` holds each kind-1
    section as ``(identifier, concatenated documents)`` in wire order.
    ``checksum`` is the received CRC-32C (already verified) or ``None``.
    """

    flags: int
    body_raw: bytes = attrs.field(repr=False)
    sequences_raw: tuple[tuple[str, bytes], ...] = attrs.field(repr=False)
    checksum: int | None = None

    @property
    def body(self) -> RawBSONDocument:
        return raw_document(self.body_raw)

    @property
    def sequences(self) -> dict[str, list[RawBSONDocument]]:
        return {ident: _split_documents(data) for ident, data in self.sequences_raw}

    @property
    def more_to_come(self) -> bool:
        return bool(self.flags & MORE_TO_COME)

    @property
    def exhaust_allowed(self) -> bool:
        return bool(self.flags & EXHAUST_ALLOWED)

    def command_name(self) -> str:
        return command_name(self.body)

    def database(self) -> str | None:
        return database_name(self.body)

    def collection(self) -> str | None:
        return collection_name(self.body)


def _check_flags(flags: int) -> None:
    unknown = flags & _REQUIRED_BITS & ~_KNOWN_REQUIRED
    if unknown:
        # OP_MSG.md: "MUST error if any unsupported or undefined required bits are set".
        raise _bad(
            f"OP_MSG has unknown required flag bits 0x{unknown:x}",
            "OP_MSG flagBits set a required bit the proxy does not support",
        )


def _verify_checksum(raw: bytes) -> int:
    if len(raw) < HEADER_SIZE + 4 + 4:
        raise _bad("OP_MSG with checksumPresent is too short to hold a checksum")
    expected = _U32.unpack_from(raw, len(raw) - 4)[0]
    actual = crc32c.crc32c(memoryview(raw)[:-4])
    if actual != expected:
        raise _bad(
            f"OP_MSG checksum mismatch (received 0x{expected:08x}, computed 0x{actual:08x})",
            "OP_MSG checksum mismatch: the message was corrupted in transit",
        )
    return expected


def verify_op_msg_checksum(msg: WireMessage) -> None:
    """Verify the CRC-32C of an OP_MSG that has checksumPresent (no-op otherwise)."""
    if msg.op_code == OP_MSG:
        verify_op_msg_checksum_raw(msg.raw)


def verify_op_msg_checksum_raw(raw: bytes | memoryview) -> None:
    """``verify_op_msg_checksum`` on the bytes of a whole OP_MSG (header included)."""
    if len(raw) >= HEADER_SIZE + 4 and _U32.unpack_from(raw, HEADER_SIZE)[0] & CHECKSUM_PRESENT:
        _verify_checksum(raw)


def parse_op_msg(msg: WireMessage | bytes) -> OpMsg:
    """Parse the sections of an OP_MSG (OP_MSG.md "sections"), verifying its checksum."""
    msg = _as_message(msg)
    if msg.op_code != OP_MSG:
        raise _bad(f"opcode {msg.op_code} is not OP_MSG")
    raw = msg.raw
    end = len(raw)
    if end < HEADER_SIZE + 4 + 1:
        raise _bad("OP_MSG too short for flagBits and a section")
    flags = _U32.unpack_from(raw, HEADER_SIZE)[0]
    _check_flags(flags)
    checksum = None
    if flags & CHECKSUM_PRESENT:
        checksum = _verify_checksum(raw)
        end -= 4
    pos = HEADER_SIZE + 4
    body: bytes | None = None
    sequences: list[tuple[str, bytes]] = []
    seen: set[str] = set()
    while pos < end:
        kind = raw[pos]
        pos += 1
        if kind == 0:
            size = _doc_size(raw, pos, end, "OP_MSG body section")
            if body is not None:
                raise _bad("OP_MSG has more than one kind-0 section")
            body = raw[pos:pos + size]
            pos += size
        elif kind == 1:
            if pos + 4 > end:
                raise _bad("OP_MSG document sequence: truncated size")
            size = _I32.unpack_from(raw, pos)[0]
            seq_end = pos + size
            if size < 5 or seq_end > end:
                raise _bad(f"OP_MSG document sequence size {size} does not fit the message")
            nul = raw.find(b"\x00", pos + 4, seq_end)
            if nul < 0:
                raise _bad("OP_MSG document sequence identifier is not NUL-terminated")
            try:
                ident = raw[pos + 4:nul].decode("utf-8")
            except UnicodeDecodeError:
                raise _bad("OP_MSG document sequence identifier is not UTF-8") from None
            if ident in seen:
                raise _bad(f"OP_MSG has two document sequences named {ident!r}")
            seen.add(ident)
            sequences.append((ident, raw[nul + 1:seq_end]))
            pos = seq_end
        else:
            # OP_MSG.md: "Any unknown Payload Types MUST result in an error".
            raise _bad(f"OP_MSG section of unknown payload type {kind}")
    if body is None:
        raise _bad("OP_MSG has no kind-0 body section")
    return OpMsg(flags, body, tuple(sequences), checksum)


def op_msg_body_raw(msg: WireMessage | bytes) -> bytes:
    """Only the bytes of the kind-0 body document of an OP_MSG.

    Drivers put the body first, so this is one slice in practice; it falls
    back to walking the sections when a document sequence comes first.  The
    checksum is not verified here (``parse_op_msg`` does that).
    """
    msg = _as_message(msg)
    raw = msg.raw
    end = len(raw)
    if msg.op_code != OP_MSG or end < HEADER_SIZE + 4 + 1:
        raise _bad("not an OP_MSG with a section")
    flags = _U32.unpack_from(raw, HEADER_SIZE)[0]
    if flags & CHECKSUM_PRESENT:
        end -= 4
    pos = HEADER_SIZE + 4
    while pos < end:
        kind = raw[pos]
        if kind == 0:
            size = _doc_size(raw, pos + 1, end, "OP_MSG body section")
            return raw[pos + 1:pos + 1 + size]
        if kind != 1 or pos + 5 > end:
            break
        size = _I32.unpack_from(raw, pos + 1)[0]
        if size < 5:
            break
        pos += 1 + size
    raise _bad("OP_MSG has no well-formed kind-0 body section")


def encode_op_msg(
    body: Mapping[str, Any] | bytes,
    *,
    request_id: int | None = None,
    response_to: int = 0,
    flags: int = 0,
    sequences: Mapping[str, Iterable[Mapping[str, Any] | bytes]] | None = None,
    checksum: bool = False,
) -> bytes:
    """Encode an OP_MSG.  ``body`` is a mapping or already-encoded BSON.

    ``checksum=True`` (or CHECKSUM_PRESENT in ``flags``) appends the CRC-32C
    over the whole message.  ``request_id=None`` takes ``next_request_id()``.
    """
    if flags & CHECKSUM_PRESENT:
        checksum = True
    if checksum:
        flags |= CHECKSUM_PRESENT
    if flags & _REQUIRED_BITS & ~_KNOWN_REQUIRED:
        raise LocalProtocolError(f"OP_MSG flagBits 0x{flags:x} set an undefined required bit")
    parts = [_U32_U8.pack(flags, 0), _encode_document(body)]
    for ident, docs in (sequences or {}).items():
        encoded = b"".join(_encode_document(d) for d in docs)
        name = ident.encode("utf-8")
        if b"\x00" in name:
            raise LocalProtocolError("document sequence identifier contains NUL")
        parts.append(b"\x01" + _I32.pack(4 + len(name) + 1 + len(encoded)) + name + b"\x00" + encoded)
    payload = b"".join(parts)
    length = HEADER_SIZE + len(payload) + (4 if checksum else 0)
    out = _header(length, request_id, response_to, OP_MSG) + payload
    if checksum:
        out += _U32.pack(crc32c.crc32c(out))
    return out


# --- OP_QUERY / OP_REPLY (legacy) -----------------------------------------------


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
            raise _bad(f"invalid BSON document: {exc}") from None
        if isinstance(inner, RawBSONDocument):
            return raw_document(inner.raw)
        return q


def parse_op_query(msg: WireMessage | bytes) -> OpQuery:
    msg = _as_message(msg)
    if msg.op_code != OP_QUERY:
        raise _bad(f"opcode {msg.op_code} is not OP_QUERY")
    raw = msg.raw
    end = len(raw)
    pos = HEADER_SIZE
    if end < pos + 4 + 1 + 8 + 5:
        raise _bad("OP_QUERY too short")
    flags = _I32.unpack_from(raw, pos)[0]
    pos += 4
    nul = raw.find(b"\x00", pos, end)
    if nul < 0:
        raise _bad("OP_QUERY fullCollectionName is not NUL-terminated")
    try:
        name = raw[pos:nul].decode("utf-8")
    except UnicodeDecodeError:
        raise _bad("OP_QUERY fullCollectionName is not UTF-8") from None
    pos = nul + 1
    if pos + 8 > end:
        raise _bad("OP_QUERY truncated before numberToSkip")
    skip, nreturn = _OP_QUERY_NUMS.unpack_from(raw, pos)
    pos += 8
    size = _doc_size(raw, pos, end, "OP_QUERY query")
    query = raw[pos:pos + size]
    pos += size
    fields = None
    if pos < end:
        size = _doc_size(raw, pos, end, "OP_QUERY returnFieldsSelector")
        fields = raw[pos:pos + size]
        pos += size
    if pos != end:
        raise _bad("OP_QUERY has trailing bytes after its documents")
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
        _I32.pack(flags)
        + full_collection_name.encode("utf-8")
        + b"\x00"
        + _OP_QUERY_NUMS.pack(number_to_skip, number_to_return)
        + _encode_document(query)
        + (b"" if fields is None else _encode_document(fields))
    )
    return _header(HEADER_SIZE + len(payload), request_id, response_to, OP_QUERY) + payload


@attrs.frozen
class OpReply:
    response_flags: int
    cursor_id: int
    starting_from: int
    number_returned: int
    documents_raw: bytes = attrs.field(repr=False)

    @property
    def documents(self) -> list[RawBSONDocument]:
        return _split_documents(self.documents_raw)


def parse_op_reply(msg: WireMessage | bytes) -> OpReply:
    msg = _as_message(msg)
    if msg.op_code != OP_REPLY:
        raise _bad(f"opcode {msg.op_code} is not OP_REPLY")
    raw = msg.raw
    if len(raw) < HEADER_SIZE + _OP_REPLY_FIXED.size:
        raise _bad("OP_REPLY too short")
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
    encoded = b"".join(_encode_document(d) for d in docs)
    payload = _OP_REPLY_FIXED.pack(response_flags, cursor_id, starting_from, len(docs)) + encoded
    return _header(HEADER_SIZE + len(payload), request_id, response_to, OP_REPLY) + payload


# --- command inspection -------------------------------------------------------


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
        raise _bad("empty command document", "empty command document") from None
    except BSONError as exc:
        raise _bad(f"invalid BSON document: {exc}") from None


def database_name(body: Mapping[str, Any] | bytes) -> str | None:
    """The ``$db`` global argument of an OP_MSG command (None if absent or not a string)."""
    doc = _as_document(body)
    try:
        db = doc.get("$db")
    except BSONError as exc:
        raise _bad(f"invalid BSON document: {exc}") from None
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
        raise _bad(f"invalid BSON document: {exc}") from None
    return value if isinstance(value, str) else None


@attrs.frozen
class Command:
    """What a stage needs to audit or police one request, whatever its opcode.

    ``op_code`` is the opcode the command travelled in (after decompression);
    ``compressed`` says whether it arrived inside OP_COMPRESSED.  ``body`` is
    the command document (lazy).  ``sequences`` holds the OP_MSG document
    sequences (empty for OP_QUERY).
    """

    name: str
    database: str | None
    collection: str | None
    body: RawBSONDocument = attrs.field(repr=False)
    op_code: int
    request_id: int
    compressed: bool
    message: WireMessage = attrs.field(repr=False)  # the uncompressed message
    more_to_come: bool = False

    @property
    def sequences(self) -> dict[str, list[RawBSONDocument]]:
        if self.op_code != OP_MSG:
            return {}
        return parse_op_msg(self.message).sequences


def inspect_command(msg: WireMessage, *, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> Command | None:
    """The command a client request carries, decompressing OP_COMPRESSED if needed.

    OP_MSG gives its body; OP_QUERY on ``<db>.$cmd`` gives the command
    (unwrapped from ``$query``); an OP_QUERY on a real collection (a legacy
    find) is reported as ``name="find"`` on that collection.  Other opcodes
    (replies, legacy OP_INSERT/OP_GET_MORE/...) carry no command: None.
    """
    compressed = msg.op_code == OP_COMPRESSED
    if compressed:
        msg = decompress(msg, max_message_size=max_message_size)
    if msg.op_code == OP_MSG:
        op = parse_op_msg(msg)
        body = op.body
        return Command(
            name=command_name(body),
            database=database_name(body),
            collection=collection_name(body),
            body=body,
            op_code=OP_MSG,
            request_id=msg.request_id,
            compressed=compressed,
            message=msg,
            more_to_come=op.more_to_come,
        )
    if msg.op_code == OP_QUERY:
        q = parse_op_query(msg)
        db, _, coll = q.full_collection_name.partition(".")
        if q.is_command:
            body = q.command()
            return Command(
                name=command_name(body),
                database=db,
                collection=collection_name(body),
                body=body,
                op_code=OP_QUERY,
                request_id=msg.request_id,
                compressed=compressed,
                message=msg,
            )
        return Command(
            name="find",
            database=db,
            collection=coll or None,
            body=q.query,
            op_code=OP_QUERY,
            request_id=msg.request_id,
            compressed=compressed,
            message=msg,
        )
    return None


# --- replies the proxy originates ----------------------------------------------

#: Server error code names for the codes the proxy uses (mongo's error_codes.yml).
ERROR_CODE_NAMES = {
    2: "BadValue",
    6: "HostUnreachable",
    7: "HostNotFound",
    8: "UnknownError",
    11: "UserNotFound",
    13: "Unauthorized",
    18: "AuthenticationFailed",
    59: "CommandNotFound",
    89: "NetworkTimeout",
    115: "CommandNotSupported",
    9001: "SocketException",
}


def error_document(code: int, errmsg: str, *, code_name: str | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {"ok": 0.0, "errmsg": errmsg, "code": int(code)}
    name = code_name if code_name is not None else ERROR_CODE_NAMES.get(code)
    if name is not None:
        doc["codeName"] = name
    return doc


def error_reply(
    request_id_of_request: int,
    code: int,
    errmsg: str,
    *,
    op_msg: bool = True,
    code_name: str | None = None,
    request_id: int | None = None,
) -> bytes:
    """A command error ``{ok: 0.0, errmsg, code, codeName}`` answering a request.

    ``op_msg=True`` answers in OP_MSG (the request was OP_MSG); ``False``
    answers in OP_REPLY (the request was OP_QUERY).
    """
    doc = error_document(code, errmsg, code_name=code_name)
    if op_msg:
        return encode_op_msg(doc, request_id=request_id, response_to=request_id_of_request)
    return encode_op_reply([doc], request_id, request_id_of_request)


def reply_to(request: WireMessage, document: Mapping[str, Any] | bytes, *, request_id: int | None = None) -> bytes:
    """A reply document in the style of ``request`` (OP_QUERY → OP_REPLY, else OP_MSG)."""
    if request.effective_op_code == OP_QUERY:
        return encode_op_reply([document], request_id, request.request_id)
    return encode_op_msg(document, request_id=request_id, response_to=request.request_id)


def error_reply_for(request: WireMessage, code: int, errmsg: str, *, code_name: str | None = None) -> bytes:
    """``error_reply`` choosing the opcode style from the request itself."""
    return reply_to(request, error_document(code, errmsg, code_name=code_name))


# --- OP_COMPRESSED -------------------------------------------------------------


@attrs.frozen
class CompressedHeader:
    original_op_code: int
    uncompressed_size: int
    compressor_id: int


def compressed_header(msg: WireMessage) -> CompressedHeader:
    if msg.op_code != OP_COMPRESSED:
        raise _bad(f"opcode {msg.op_code} is not OP_COMPRESSED")
    if msg.length < _COMPRESSED_HEADER_SIZE:
        raise _bad("OP_COMPRESSED too short")
    return CompressedHeader(*_COMPRESSED_FIXED.unpack_from(msg.raw, HEADER_SIZE))


def _snappy_decompress(data: memoryview, size: int) -> bytes:
    import cramjam  # python-snappy's backend; reads the declared length without decoding
    import snappy

    try:
        declared = cramjam.snappy.decompress_raw_len(data)
    except cramjam.DecompressionError as exc:
        raise _bad(f"invalid snappy data: {exc}") from None
    if declared != size:
        raise _bad(f"snappy data declares {declared} bytes, OP_COMPRESSED says {size}")
    try:
        return snappy.uncompress(bytes(data))
    except (snappy.UncompressError, cramjam.DecompressionError) as exc:
        raise _bad(f"invalid snappy data: {exc}") from None


def _zlib_decompress(data: memoryview, size: int) -> bytes:
    dc = zlib.decompressobj()
    try:
        # Bounded output: a zlib bomb cannot allocate past the announced size.
        out = dc.decompress(data, size + 1)
    except zlib.error as exc:
        raise _bad(f"invalid zlib data: {exc}") from None
    if len(out) == size and not dc.eof:
        raise _bad("zlib data is longer than the announced uncompressed size")
    if dc.unused_data:
        raise _bad("trailing bytes after the zlib stream")
    return out


def _zstd_decompress(data: memoryview, size: int) -> bytes:
    import zstandard

    try:
        declared = zstandard.frame_content_size(data)
        if declared not in (-1, size):
            raise _bad(f"zstd frame declares {declared} bytes, OP_COMPRESSED says {size}")
        # With no content size in the frame, max_output_size bounds the output.
        return zstandard.ZstdDecompressor().decompress(data, max_output_size=size)
    except zstandard.ZstdError as exc:
        raise _bad(f"invalid zstd data: {exc}") from None


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
        raise _bad(f"OP_COMPRESSED uncompressedSize {size} is negative")
    if size + HEADER_SIZE > max_message_size:
        raise FrameTooLarge(size + HEADER_SIZE, max_message_size, what="decompressed message")
    if hdr.original_op_code == OP_COMPRESSED:
        raise _bad("OP_COMPRESSED wraps another OP_COMPRESSED")
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
        raise _bad(f"OP_COMPRESSED uses unknown compressorId {cid}", f"unsupported compressorId {cid}")
    if len(body) != size:
        raise _bad(f"OP_COMPRESSED decompressed to {len(body)} bytes, announced {size}")
    length = HEADER_SIZE + size
    raw = HEADER.pack(length, msg.request_id, msg.response_to, hdr.original_op_code) + body
    return WireMessage(length, msg.request_id, msg.response_to, hdr.original_op_code, raw)


def compress(msg: WireMessage | bytes, compressor_id: int, *, level: int | None = None) -> bytes:
    """Wrap a message in OP_COMPRESSED with the given compressor (same requestID/responseTo).

    ``level`` applies to zlib (-1..9) and zstd.
    """
    msg = _as_message(msg)
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
