"""Which side broke the Mongo protocol, and the answer the client gets for it.

The pipeline hands every ``ProtocolError`` to one ``client_error`` callback;
the engine needs to know whether the client broke the protocol (answer that
request ``ok: 0``, code 17 ProtocolError or 10334 BSONObjectTooLarge) or the
backend did (answer the client's waiting requests), and the bad message's
header.  ``AttributingDecoder`` wraps a session's decoder (the codec's
``MongoDecoder``, or a tapped session's ``tee.MongoTee``) and tags its errors.
"""

from __future__ import annotations

from typing import Any

import attrs

from dbproxy.errors import ProtocolError

from . import protocol as wire
from .stages.session import REQUEST_OPCODES, protocol_error_reply


@attrs.frozen
class _BadHeader:
    request_id: int
    op_code: int  # the opcode the request travelled in (originalOpcode for OP_COMPRESSED)


class AttributingDecoder:
    """A ``MongoDecoder`` whose protocol errors say which side sent the bad bytes.

    The pipeline hands every ProtocolError to one ``client_error`` callback;
    the engine needs to know whether the client broke the protocol (answer
    that request) or the backend did (answer the client's waiting requests),
    and the bad message's header, which the decoder leaves unconsumed.
    """

    def __init__(self, inner: Any, side: str) -> None:
        self.inner = inner
        self.side = side
        self.buffer = inner.buffer

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self.inner.feed(data)

    def next_message(self) -> Any:
        try:
            return self.inner.next_message()
        except ProtocolError as exc:
            exc.mongo_side = self.side  # type: ignore[attr-defined]
            exc.mongo_header = self._header()  # type: ignore[attr-defined]
            raise

    def announced_length(self) -> int | None:
        return self.inner.announced_length()

    def _header(self) -> _BadHeader | None:
        """The refused request's header — only from bytes the decoder judged, so the
        answer does not depend on how the stream was split into reads."""
        buf = self.buffer
        if len(buf) < wire.HEADER_SIZE:
            return None
        length, request_id, _response_to, op_code = wire.HEADER.unpack_from(buf.peek(wire.HEADER_SIZE))
        if length < wire.HEADER_SIZE or op_code not in REQUEST_OPCODES:
            # A length below 16 is refused from its first 4 bytes: what follows is no header.
            return None
        if op_code == wire.OP_COMPRESSED:
            # Refused from its 16-byte header alone (FrameTooLarge), before originalOpcode
            # may have arrived: answer as OP_MSG, the opcode every driver compresses
            # (hello, the one OP_QUERY of modern drivers, is never compressed).
            op_code = wire.OP_MSG
        return _BadHeader(request_id, op_code)


def client_protocol_error_reply(exc: ProtocolError) -> bytes:
    """ok:0 for the request whose header the client decoder could read, else nothing (just close)."""
    hdr = getattr(exc, "mongo_header", None)
    if hdr is None:
        return b""
    style = wire.OP_QUERY if hdr.op_code == wire.OP_QUERY else wire.OP_MSG
    request = wire.WireMessage(wire.HEADER_SIZE, hdr.request_id, 0, style, wire.HEADER.pack(16, hdr.request_id, 0, style))
    return protocol_error_reply(request, exc)
