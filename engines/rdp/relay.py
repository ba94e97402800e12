"""The pass-through decoder of an RDP session after the X.224 exchange (sans-IO, no trio).

Strategy: what follows the Connection Confirm is TLS (or Standard RDP Security's encrypted
PDUs) between client and server; the proxy reads none of it.  The core's ``Pipeline`` still
runs the session (its byte counts, the buffer budget, both directions ending together, the
audit's end), so each direction gets a decoder that frames nothing: every batch of received
bytes is one message, consumed whole.  With no stages, the pump forwards
``buffer.consumed_since_mark()`` — the received chunk itself, in one send, no copy.
"""

from __future__ import annotations

from dbproxy.buffer import ReceiveBuffer
from dbproxy.sansio import NEED_DATA


class Chunk:
    """What the pass-through decoder hands out: a batch consumed whole.  No stage looks at it,
    so the pump forwards the buffer's bytes; ``raw`` is empty on purpose (nothing rebuilds it)."""

    __slots__ = ()
    raw = b""


CHUNK = Chunk()


class PassThrough:
    __slots__ = ("buffer",)

    def __init__(self) -> None:
        self.buffer = ReceiveBuffer()

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self.buffer.feed(data)

    def next_message(self) -> Chunk | object:
        n = len(self.buffer)
        if not n:
            return NEED_DATA
        self.buffer.skip(n)
        return CHUNK
