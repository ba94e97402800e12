"""The trio-free sans-IO kit every codec and stage builds on (h11's shape).

Codecs and stages never touch a socket and never import trio: a decoder is
fed bytes and hands out messages (``NEED_DATA`` when a frame is incomplete);
a stage looks at one message and returns ``None`` (forward) or a
``Verdict``.  The pieces they share live here and in ``dbproxy.buffer``
(``ReceiveBuffer``) and ``dbproxy.errors`` (``ProtocolError`` and its
family), none of which loads trio; ``dbproxy.pipeline`` owns the I/O.
A test imports every codec and stage module in a fresh interpreter and
asserts trio stays unloaded.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import attrs

from .buffer import ReceiveBuffer
from .errors import FrameTooLarge


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()


class Decoder(Protocol):
    buffer: Any

    def feed(self, data: bytes | bytearray | memoryview) -> None: ...

    def next_message(self) -> Any: ...


class Stage(Protocol):
    name: str

    def handle(self, message: Any, ctx: Any) -> "Verdict | None": ...


@attrs.frozen
class Verdict:
    """What a stage decided about one message.

    replace: ``None`` forwards the original; a tuple (possibly empty) of
        message-layer byte strings is sent instead (empty = drop it).
    reply: bytes sent back toward the sender of this message.
    close: end the session once the batch (and reply) is sent.
    """

    replace: tuple[bytes, ...] | None = None
    reply: bytes = b""
    close: bool = False


FORWARD = None


def replace(*parts: bytes) -> Verdict:
    return Verdict(replace=tuple(parts))


def drop() -> Verdict:
    return Verdict(replace=())


def reply(data: bytes, *, close: bool = False) -> Verdict:
    """Answer the sender and do not forward the message."""
    return Verdict(replace=(), reply=data, close=close)


def identity_encoder(data: bytes) -> bytes:
    return data


class LengthPrefixed:
    """The frame loop of a length-prefixed wire format, written once.

    Every frame starts with a fixed header holding a signed length field;
    the frame's size on the wire is ``length + extra`` (PostgreSQL: a type
    byte, then a big-endian length that counts itself, ``extra=1``; CQL: a
    9-byte header whose length counts the body, ``extra=9``; Mongo: a
    little-endian length that counts the whole message, ``extra=0``).  The
    same loop serves the three readers of a byte stream:

    - a decoder takes one frame at a time (``size_at``, then
      ``ReceiveBuffer.take``);
    - the proxy's tee consumes a batch of whole frames and picks those the
      audit reads (``frames``), forwarding the chunk as it came;
    - the audit worker walks the tapped bytes again (``frames``).

    A length below ``min_length`` raises ``bad_length(length)``; above the
    session's ``limit``, ``FrameTooLarge`` naming ``what(data, pos)`` -- the
    same errors, at the same byte, whichever reader meets the frame first.
    """

    __slots__ = ("header_size", "length_offset", "extra", "min_length", "_length", "_bad_length", "_what")

    def __init__(self, *, header_size: int, length_format: str, length_offset: int, extra: int, min_length: int,
                 bad_length: Callable[[int], Exception], what: Callable[[Any, int], str] = lambda data, pos: "message") -> None:
        self.header_size = header_size
        self.length_offset = length_offset
        self.extra = extra
        self.min_length = min_length
        self._length = struct.Struct(length_format).unpack_from
        self._bad_length = bad_length
        self._what = what

    def size_at(self, data: Any, pos: int, end: int, limit: int) -> int | None:
        """Wire size of the frame starting at ``pos`` (checked), or None while its header is
        incomplete.  The frame itself may still be incomplete (``pos + size > end``)."""
        if end - pos < self.header_size:
            return None
        length = self._length(data, pos + self.length_offset)[0]
        if length < self.min_length:
            raise self._bad_length(length)
        if length > limit:
            raise FrameTooLarge(length, limit, what=self._what(data, pos))
        return length + self.extra

    def frames(self, data: Any, pos: int, end: int, limit: int) -> Iterator[tuple[int, int]]:
        """(start, size) of every whole frame in ``data[pos:end]``, in order; stops at the first
        incomplete one.  A bad header raises when the loop reaches it, after the frames
        before it were yielded."""
        header = self.header_size
        at = self.length_offset
        extra = self.extra
        low = self.min_length
        unpack = self._length
        while end - pos >= header:
            length = unpack(data, pos + at)[0]
            if length < low:
                raise self._bad_length(length)
            if length > limit:
                raise FrameTooLarge(length, limit, what=self._what(data, pos))
            size = length + extra
            if end - pos < size:
                return
            yield pos, size
            pos += size

    def next_frame(self, buffer: ReceiveBuffer, limit: int) -> bytes | _NeedData:
        """Take one whole frame off ``buffer`` (a decoder's step), or ``NEED_DATA``."""
        data, start, end = buffer.span()
        size = self.size_at(data, start, end, limit)
        if size is None or end - start < size:
            return NEED_DATA
        return buffer.take(size)

    def announced(self, buffer: ReceiveBuffer) -> int | None:
        """Wire size the partly received frame announces (None: header incomplete); for the
        buffer budget, never on the hot path."""
        data, start, end = buffer.span()
        if end - start < self.header_size:
            return None
        return self._length(data, start + self.length_offset)[0] + self.extra
