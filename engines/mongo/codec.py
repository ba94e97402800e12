"""Sans-IO framing of the MongoDB wire protocol (the pipeline's decoder contract).

Strategy.  A MongoDB connection is a stream of self-delimiting messages: a
16-byte header whose first int32 (little-endian) is the whole message length.
``MongoDecoder`` waits for a full header, checks it, and only then waits for
the body, so an oversized or garbage length is refused before a single body
byte is buffered.  A complete message is consumed from the ``ReceiveBuffer``
as one ``WireMessage`` whose ``raw`` is its exact wire bytes: the pipeline can
forward ``buffer.consumed_since_mark()`` verbatim.

No body parsing happens here beyond one cheap check: an OP_MSG that sets
checksumPresent has its CRC-32C verified (C speed, and drivers rarely set
it), so corruption is caught before it is forwarded.  OP_COMPRESSED is *not*
decompressed: stages call ``compression.decompress`` when they need to look inside,
and the compressed bytes are forwarded as received.

Garbage detection: a length below 16 can never be a message; an opcode no
MongoDB server ever defined (``wire.KNOWN_OPCODES``) means the peer is not
speaking this protocol at all (TLS ClientHello, HTTP, a Postgres client on
the wrong port) and is refused with a hint instead of waiting for a body of
an arbitrary announced length.

One frame loop: the length checks (below 16, above ``max_message_size``) are
``FRAMING``'s, the core's ``LengthPrefixed`` (messageLength counts the whole
message: ``extra=0``), which the audit tee (``tee.py``) and the audit
worker's tap (``tap.py``) walk too, so every reader refuses a bad header
with the same error at the same byte.
"""

from __future__ import annotations

from typing import Any

import attrs

from dbproxy.buffer import ReceiveBuffer
from dbproxy.errors import MalformedMessage, RemoteProtocolError
from dbproxy.sansio import NEED_DATA, LengthPrefixed

from . import wire
from .opmsg import verify_op_msg_checksum_raw

_NOT_MONGO_HINT = "this port speaks the MongoDB wire protocol; the client sent something else"


def _bad_length(length: int) -> RemoteProtocolError:
    return RemoteProtocolError(f"messageLength {length} is smaller than the 16-byte header", client_hint=_NOT_MONGO_HINT)


def check_opcode(op_code: int, length: int) -> None:
    """An opcode no server ever defined: the peer speaks something else (checked before the length
    limit, so a TLS ClientHello or an HTTP request gets the hint, not "too large")."""
    if op_code not in wire.KNOWN_OPCODES:
        raise RemoteProtocolError(f"unknown opCode {op_code} (messageLength {length}): not a MongoDB client",
                                  client_hint=_NOT_MONGO_HINT)


def opcode_at(data: Any, pos: int) -> int:
    """The checked opCode of the header at ``pos`` (the whole 16-byte header is there)."""
    length, _request_id, _response_to, op_code = wire.HEADER.unpack_from(data, pos)
    check_opcode(op_code, length)
    return op_code


def _too_large(data: Any, pos: int) -> str:
    """What ``FrameTooLarge`` names; a header whose opCode no server defined is garbage instead."""
    opcode_at(data, pos)
    return "message"


def check_checksum(data: Any, pos: int, size: int) -> None:
    """The OP_MSG ``data[pos:pos + size]``: if it sets checksumPresent, its CRC-32C must match.
    It framed, its body is not what was sent: refused as malformed (issue 13 §1)."""
    view = memoryview(data)[pos:pos + size]
    try:
        verify_op_msg_checksum_raw(view)
    except RemoteProtocolError as exc:
        raise MalformedMessage(str(exc), client_hint=exc.client_hint, type_name="OP_MSG",
                               type_code=wire.OP_MSG, raw=view, length=size) from None
    finally:
        view.release()


def check_partial(data: Any, pos: int, end: int) -> None:
    """The frame at ``pos`` is partly received.  A length below 16 is refused as soon as its 4
    bytes are in (it can never be a message); a header that is all in is judged by its opCode
    (garbage is refused before its announced body arrives); the size limit waits for the whole
    header (``FRAMING``), so the refused request can be answered by its requestID."""
    if end - pos >= 4:
        length = wire.I32.unpack_from(data, pos)[0]
        if length < wire.HEADER_SIZE:
            raise _bad_length(length)
        if end - pos >= wire.HEADER_SIZE:
            opcode_at(data, pos)


#: MsgHeader.messageLength: the first int32 (little-endian), counting the whole message; a frame
#: is judged once its whole 16-byte header is in (the opCode tells garbage from "too large").
FRAMING = LengthPrefixed(header_size=wire.HEADER_SIZE, length_format="<i", length_offset=0, extra=0,
                         min_length=wire.HEADER_SIZE, bad_length=_bad_length, what=_too_large)


@attrs.define(eq=False)
class MongoDecoder:
    """Frames MongoDB messages: ``feed(bytes)``, then ``next_message()`` until NEED_DATA.

    ``max_message_size`` defaults to the 48 MB every server announces as
    ``maxMessageSizeBytes``; it is an attribute so an engine may lower it.
    ``allow_unknown_opcodes=True`` frames any opcode as opaque (for a future
    server) instead of treating it as garbage.
    """

    max_message_size: int = wire.DEFAULT_MAX_MESSAGE_SIZE
    verify_checksums: bool = True
    allow_unknown_opcodes: bool = False
    buffer: ReceiveBuffer = attrs.field(factory=ReceiveBuffer)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self.buffer.feed(data)

    def next_message(self) -> wire.WireMessage | object:
        buf = self.buffer
        data, start, end = buf.span()
        if end - start < wire.HEADER_SIZE:
            check_partial(data, start, end)
            return NEED_DATA
        length, request_id, response_to, op_code = wire.HEADER.unpack_from(data, start)
        # A length below 16 is refused first, as on a partial header: the error must not
        # depend on whether the opcode arrived in the same read.
        if length >= wire.HEADER_SIZE and not self.allow_unknown_opcodes:
            check_opcode(op_code, length)
        if end - start < FRAMING.size_at(data, start, end, self.max_message_size):
            return NEED_DATA
        if self.verify_checksums and op_code == wire.OP_MSG:
            # Verified before consuming, so a refused message is never part of the consumed span.
            check_checksum(data, start, length)
        return wire.WireMessage(length, request_id, response_to, op_code, buf.take(length))

    def announced_length(self) -> int | None:
        """messageLength of the partly received message (None: not yet in); for the buffer budget."""
        buf = self.buffer
        return buf.i32_le() if len(buf) >= 4 else None
