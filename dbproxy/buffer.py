"""A receive buffer for sans-IO decoders.

Strategy (Netty's cumulation buffer, h11's ReceiveBuffer): one ``bytearray``
plus a read offset.  Decoders peek at headers through ``memoryview`` slices,
consume whole frames by advancing the offset, and the buffer compacts only
once per batch (``compact()``), never per frame, so a read that carried a
hundred small frames costs one ``del`` at the end.

``consumed_since_mark()`` lets the pipeline forward the exact received bytes
of all frames decoded since the last mark in one send (the hot path).
"""

from __future__ import annotations

import struct

_U32_BE = struct.Struct(">I")
_I32_BE = struct.Struct(">i")
_I32_LE = struct.Struct("<i")


class ReceiveBuffer:
    __slots__ = ("_data", "_pos", "_mark")

    def __init__(self) -> None:
        # ``bytes`` while it holds exactly one received chunk (adopted without a
        # copy), ``bytearray`` once bytes must accumulate across reads.
        self._data: bytes | bytearray = b""
        self._pos = 0
        self._mark = 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._mark == self._pos == len(self._data) and type(data) is bytes:
            # Nothing pending: adopt the chunk itself.  If every frame in it is
            # forwarded unchanged, ``consumed_since_mark`` hands this very object
            # back for the send — received bytes out, no copy in between.
            self._data = data
            self._pos = self._mark = 0
            return
        if type(self._data) is bytes:
            self._data = bytearray(self._data)
        self._data += data

    def __len__(self) -> int:
        """Bytes available to decode."""
        return len(self._data) - self._pos

    def __bool__(self) -> bool:
        return len(self._data) > self._pos

    @property
    def position(self) -> int:
        return self._pos

    def peek(self, n: int, offset: int = 0) -> memoryview:
        """A view of ``n`` bytes at ``offset`` past the read position (caller checks length)."""
        start = self._pos + offset
        return memoryview(self._data)[start:start + n]

    def peek_byte(self, offset: int = 0) -> int:
        return self._data[self._pos + offset]

    def u32_be(self, offset: int = 0) -> int:
        return _U32_BE.unpack_from(self._data, self._pos + offset)[0]

    def i32_be(self, offset: int = 0) -> int:
        return _I32_BE.unpack_from(self._data, self._pos + offset)[0]

    def i32_le(self, offset: int = 0) -> int:
        return _I32_LE.unpack_from(self._data, self._pos + offset)[0]

    def unpack(self, st: struct.Struct, offset: int = 0) -> tuple:
        """``st.unpack_from`` at ``offset`` past the read position, without a view object."""
        return st.unpack_from(self._data, self._pos + offset)

    def span(self) -> tuple[bytes | bytearray, int, int]:
        """(underlying data, read position, end): for framers that scan headers in
        place and then ``skip`` past whole frames.  Read only; valid until the next feed."""
        return self._data, self._pos, len(self._data)

    def take(self, n: int) -> bytes:
        """Consume ``n`` bytes and return them as an immutable copy.

        Messages keep their bytes after the buffer compacts, so frames own a
        ``bytes`` copy; it is one memcpy per frame, not per-byte Python.
        Small frames copy through a slice (cheaper than building a view);
        large ones through a memoryview (one copy instead of two).
        """
        start = self._pos
        end = start + n
        self._pos = end
        if n <= 8192:
            return bytes(self._data[start:end])
        return bytes(memoryview(self._data)[start:end])

    def skip(self, n: int) -> None:
        self._pos += n

    def mark(self) -> None:
        """Remember the current read position (start of a forwarding batch)."""
        self._mark = self._pos

    def consumed_since_mark(self) -> bytes:
        """The exact bytes consumed since ``mark()``: what was received, as received."""
        data = self._data
        if self._mark == 0 and self._pos == len(data) and type(data) is bytes:
            return data
        return bytes(memoryview(data)[self._mark:self._pos])

    def take_rest(self) -> bytes:
        """Consume and return everything buffered (used when leaving a codec)."""
        return self.take(len(self))

    def compact(self) -> None:
        """Drop consumed bytes.  Call after a batch of frames, not per frame."""
        pos = self._pos
        if not pos:
            return
        if pos == len(self._data):
            self._data = b""
        elif type(self._data) is bytes:
            self._data = bytearray(memoryview(self._data)[pos:])
        else:
            del self._data[:pos]
        self._mark = max(0, self._mark - pos)
        self._pos = 0
