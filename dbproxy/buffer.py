"""A receive buffer for sans-IO decoders.

Strategy (Netty's cumulation buffer, h11's ReceiveBuffer): one ``bytearray``
plus a read offset.  Decoders peek at headers through ``memoryview`` slices,
consume whole frames by advancing the offset, and the buffer compacts only
once per batch (``compact()``), never per frame, so a read that carried a
hundred small frames costs one ``del`` at the end.

``consumed_since_mark()`` lets the pipeline forward the exact received bytes
of all frames decoded since the last mark in one send (the hot path).

``BufferBudget`` bounds what all sessions together hold for *partly received*
messages (a decoder's buffer after a batch, when the batch did not end on a
message boundary).  ``compact()`` returns what stays, so a batch that ended on
a boundary — the common case — costs the caller one integer test; only a
session holding a partial message takes a ``BudgetAccount`` charge, and gives
it back when the message completes or the session ends.
"""

from __future__ import annotations

import struct

import attrs

from .errors import BufferBudgetExceeded

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

    def copy(self, n: int, offset: int = 0) -> bytes | bytearray:
        """A copy of ``n`` bytes at ``offset`` past the read position (caller checks length): one
        slice, no view — for a decoder that keeps or checks them where an exception's traceback
        may hold them (a view would pin the buffer and make the next ``feed`` fail)."""
        start = self._pos + offset
        return self._data[start:start + n]

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

    def clear(self) -> None:
        """Drop everything buffered (the session is over).

        The memory goes now: an ended session's decoder can stay reachable
        until the garbage collector breaks a cycle (an exception kept with its
        traceback), long after its budget charge was given back.
        """
        self._data = b""
        self._pos = self._mark = 0

    def take_rest(self) -> bytes:
        """Consume and return everything buffered (used when leaving a codec)."""
        return self.take(len(self))

    def compact(self) -> int:
        """Drop consumed bytes; return how many stay (a partly received message).

        Call after a batch of frames, not per frame.
        """
        pos = self._pos
        if not pos:
            return len(self._data)
        if pos == len(self._data):
            self._data = b""
            self._mark = self._pos = 0
            return 0
        if type(self._data) is bytes:
            self._data = bytearray(memoryview(self._data)[pos:])
        else:
            del self._data[:pos]
        self._mark = max(0, self._mark - pos)
        self._pos = 0
        return len(self._data)


# Default proxy-wide budget for partly received messages, and how long one may stay partial.
DEFAULT_BUFFER_BUDGET = 256 * 1024 * 1024
DEFAULT_MESSAGE_TIMEOUT = 60.0


@attrs.frozen
class BudgetStatistics:
    limit: int
    used: int
    peak: int
    refused: int
    timeouts: int


class BufferBudget:
    """The proxy-wide budget for bytes held in partly received messages (one per proxy process).

    Why: ``max_message_size`` bounds one connection; without an overall cap,
    N connections that each send a large header and trickle its body make the
    proxy hold N × max_message_size.  Sessions charge what their decoders hold
    between reads (``BudgetAccount``); a charge that would take ``used`` over
    ``limit`` raises ``BufferBudgetExceeded`` and the session ends with its
    protocol's error.  ``message_timeout`` is the progress deadline the pumps
    apply while a partial message is held (``MessageTimeout``).

    Plain integers, no locks: every session runs in the proxy's one trio thread.
    """

    __slots__ = ("limit", "message_timeout", "used", "peak", "refused", "timeouts")

    def __init__(self, limit: int = DEFAULT_BUFFER_BUDGET, *, message_timeout: float = DEFAULT_MESSAGE_TIMEOUT) -> None:
        self.limit = limit
        self.message_timeout = message_timeout
        self.used = 0
        self.peak = 0
        self.refused = 0
        self.timeouts = 0

    def account(self) -> "BudgetAccount":
        return BudgetAccount(self)

    def statistics(self) -> BudgetStatistics:
        return BudgetStatistics(self.limit, self.used, self.peak, self.refused, self.timeouts)


class BudgetAccount:
    """One buffer's charge against a ``BufferBudget``.

    ``hold(n, announced)`` sets the charge to ``n`` bytes (what the buffer holds
    now).  ``announced`` is the whole message's length when its header says so
    (PostgreSQL, CQL and Mongo headers do): a message that cannot fit in what
    the other sessions leave free is refused now, before its body arrives, so
    a client cannot hold budget by trickling a message that could never
    complete.  Only ``n`` is charged: a header alone reserves nothing.
    ``release()`` returns the charge (call it from a ``finally``; a refused
    account keeps its last charge until then).
    """

    __slots__ = ("budget", "held")

    def __init__(self, budget: BufferBudget) -> None:
        self.budget = budget
        self.held = 0

    def hold(self, n: int, announced: int | None = None) -> None:
        budget = self.budget
        others = budget.used - self.held
        need = n if announced is None or announced < n else announced
        if others + need > budget.limit:
            # The charge stays until the owner releases it: the bytes are held until the
            # session has sent its error and dropped its buffer.
            budget.refused += 1
            raise BufferBudgetExceeded(need, max(0, budget.limit - others), budget.limit)
        budget.used = others + n
        self.held = n
        if budget.used > budget.peak:
            budget.peak = budget.used

    def release(self) -> None:
        if self.held:
            self.budget.used -= self.held
            self.held = 0
