"""OP_MSG (opcode 2013): sections, document sequences and the optional CRC-32C.

Strategy (mongodb/specifications ``source/message/OP_MSG.md``): an OP_MSG is
flagBits, one kind-0 body section, any number of kind-1 document sequences,
and a CRC-32C of the whole message when checksumPresent is set.

* ``op_msg_body_raw`` slices the kind-0 body document out of an OP_MSG and
  nothing else (the audit hot path needs the command name and ``$db``).
* ``parse_op_msg`` walks the sections, verifies the optional CRC-32C and
  returns an ``OpMsg`` whose body / document sequences decode on access.
* ``verify_op_msg_checksum_raw`` lets the decoder check a checksum on bytes
  it forwards without parsing them.
* ``encode_op_msg`` builds the messages the proxy originates or rewrites.

Unknown required flag bits and unknown section kinds are errors, as the
spec demands of a receiver.
"""

from __future__ import annotations

import struct
from typing import Any, Iterable, Mapping

import attrs
import crc32c
from bson.raw_bson import RawBSONDocument

from dbproxy.errors import LocalProtocolError

from .wire import (
    CHECKSUM_PRESENT,
    EXHAUST_ALLOWED,
    HEADER_SIZE,
    I32,
    MORE_TO_COME,
    OP_MSG,
    U32,
    WireMessage,
    as_message,
    bad_message,
    collection_name,
    command_name,
    database_name,
    document_size,
    encode_document,
    encode_header,
    raw_document,
    split_documents,
)

__all__ = [
    "OpMsg", "verify_op_msg_checksum", "verify_op_msg_checksum_raw", "parse_op_msg", "op_msg_body_raw",
    "encode_op_msg",
]

# flagBits: the low 16 bits are "required": a receiver MUST error on any it does not know.
_REQUIRED_BITS = 0xFFFF
_KNOWN_REQUIRED = CHECKSUM_PRESENT | MORE_TO_COME
_U32_U8 = struct.Struct("<IB")

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
        return {ident: split_documents(data) for ident, data in self.sequences_raw}

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
        raise bad_message(
            f"OP_MSG has unknown required flag bits 0x{unknown:x}",
            "OP_MSG flagBits set a required bit the proxy does not support",
        )


def _verify_checksum(raw: bytes) -> int:
    if len(raw) < HEADER_SIZE + 4 + 4:
        raise bad_message("OP_MSG with checksumPresent is too short to hold a checksum")
    expected = U32.unpack_from(raw, len(raw) - 4)[0]
    actual = crc32c.crc32c(memoryview(raw)[:-4])
    if actual != expected:
        raise bad_message(
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
    if len(raw) >= HEADER_SIZE + 4 and U32.unpack_from(raw, HEADER_SIZE)[0] & CHECKSUM_PRESENT:
        _verify_checksum(raw)


def parse_op_msg(msg: WireMessage | bytes) -> OpMsg:
    """Parse the sections of an OP_MSG (OP_MSG.md "sections"), verifying its checksum."""
    msg = as_message(msg)
    if msg.op_code != OP_MSG:
        raise bad_message(f"opcode {msg.op_code} is not OP_MSG")
    raw = msg.raw
    end = len(raw)
    if end < HEADER_SIZE + 4 + 1:
        raise bad_message("OP_MSG too short for flagBits and a section")
    flags = U32.unpack_from(raw, HEADER_SIZE)[0]
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
            size = document_size(raw, pos, end, "OP_MSG body section")
            if body is not None:
                raise bad_message("OP_MSG has more than one kind-0 section")
            body = raw[pos:pos + size]
            pos += size
        elif kind == 1:
            if pos + 4 > end:
                raise bad_message("OP_MSG document sequence: truncated size")
            size = I32.unpack_from(raw, pos)[0]
            seq_end = pos + size
            if size < 5 or seq_end > end:
                raise bad_message(f"OP_MSG document sequence size {size} does not fit the message")
            nul = raw.find(b"\x00", pos + 4, seq_end)
            if nul < 0:
                raise bad_message("OP_MSG document sequence identifier is not NUL-terminated")
            try:
                ident = raw[pos + 4:nul].decode("utf-8")
            except UnicodeDecodeError:
                raise bad_message("OP_MSG document sequence identifier is not UTF-8") from None
            if ident in seen:
                raise bad_message(f"OP_MSG has two document sequences named {ident!r}")
            seen.add(ident)
            sequences.append((ident, raw[nul + 1:seq_end]))
            pos = seq_end
        else:
            # OP_MSG.md: "Any unknown Payload Types MUST result in an error".
            raise bad_message(f"OP_MSG section of unknown payload type {kind}")
    if body is None:
        raise bad_message("OP_MSG has no kind-0 body section")
    return OpMsg(flags, body, tuple(sequences), checksum)


def op_msg_body_raw(msg: WireMessage | bytes) -> bytes:
    """Only the bytes of the kind-0 body document of an OP_MSG.

    Drivers put the body first, so this is one slice in practice; it falls
    back to walking the sections when a document sequence comes first.  The
    checksum is not verified here (``parse_op_msg`` does that).
    """
    msg = as_message(msg)
    raw = msg.raw
    end = len(raw)
    if msg.op_code != OP_MSG or end < HEADER_SIZE + 4 + 1:
        raise bad_message("not an OP_MSG with a section")
    flags = U32.unpack_from(raw, HEADER_SIZE)[0]
    if flags & CHECKSUM_PRESENT:
        end -= 4
    pos = HEADER_SIZE + 4
    while pos < end:
        kind = raw[pos]
        if kind == 0:
            size = document_size(raw, pos + 1, end, "OP_MSG body section")
            return raw[pos + 1:pos + 1 + size]
        if kind != 1 or pos + 5 > end:
            break
        size = I32.unpack_from(raw, pos + 1)[0]
        if size < 5:
            break
        pos += 1 + size
    raise bad_message("OP_MSG has no well-formed kind-0 body section")


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
    parts = [_U32_U8.pack(flags, 0), encode_document(body)]
    for ident, docs in (sequences or {}).items():
        encoded = b"".join(encode_document(d) for d in docs)
        name = ident.encode("utf-8")
        if b"\x00" in name:
            raise LocalProtocolError("document sequence identifier contains NUL")
        parts.append(b"\x01" + I32.pack(4 + len(name) + 1 + len(encoded)) + name + b"\x00" + encoded)
    payload = b"".join(parts)
    length = HEADER_SIZE + len(payload) + (4 if checksum else 0)
    out = encode_header(length, request_id, response_to, OP_MSG) + payload
    if checksum:
        out += U32.pack(crc32c.crc32c(out))
    return out
