"""The audit tee: a session's pumps frame bytes and hand the audit its frames (Netty's tee handler).

When nothing in a session acts on messages (no policy stage, only read-only
audit observers), decoding every message on the proxy is wasted work: the
pipeline (``dbproxy.flow``) replaces the direction's decoder by a ``Tee``
and runs no stage.  The Tee walks the received bytes with the protocol's one
frame loop (``dbproxy.sansio.LengthPrefixed.frames``), so a bad or oversized
header ends the session with exactly the error the real decoder raises, at
the same byte; it builds no message objects and consumes whole frames only,
so the pump forwards the received chunk as it came (the hot path).  Frames
whose type the audit reads (``FrameSide.interest``) are handed to ``tap`` —
once per batch, consecutive frames joined — before the pump sends the batch,
so a query reaches the audit before its answer can.  Everything else (result
rows, bulk data, a password) never leaves the proxy.

Bodies the audit will parse are known to parse: before a frame of an
interest type is consumed, its ``checks`` entry (if any) looks at it in
place and raises ``MalformedMessage`` for a body the audit's parser would
refuse.  The frames before it are tapped and forwarded, it is not: the pump
audits it (``audit.malformed``) and ends the session with the protocol's
error — what the inline observer does with the same bytes.

The audit worker walks the tapped bytes again with the same loop
(``dbproxy.audit.frametap.FrameTap``) and runs the engine's observers on
them.  An engine declares what this takes — per direction a ``FrameSide``,
and the worker-side class — as a ``TapPlan`` in its ``Wiring``; it never
decides itself whether its observers run inline or in the worker.

Sans-IO: no trio here (``tests/unit/core/test_sansio_kit.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs

from .buffer import ReceiveBuffer
from .sansio import NEED_DATA, LengthPrefixed

#: A body check: ``check(data, pos, size)`` over one whole frame ``data[pos:pos + size]``
#: (its header included); returns None to accept it, raises ``MalformedMessage`` to refuse it.
Check = Callable[[Any, int, int], None]


@attrs.frozen
class FrameSide:
    """How one direction's frames are walked, and which of them the audit reads.

    layout: the protocol's ``LengthPrefixed`` (the one frame loop).
    type_offset: where a frame's type byte sits (PostgreSQL 0, CQL's opcode 4);
        ``type_of(data, pos)`` instead, for a type that is not one byte (Mongo's
        int32 opCode).
    interest: the types the audit observers of this direction act on: only
        these are tapped, and only these are turned into messages in the worker.
    checks: per interest type, a ``Check`` accepting exactly the bodies the
        observer's parser accepts (run before the frame is consumed).
    watch: types the proxy itself must notice even when untapped (a
        PostgreSQL Terminate): a consumed frame of one lands in ``Tee.seen``.
    """

    layout: LengthPrefixed
    interest: frozenset = frozenset()
    checks: Mapping[int, Check] = attrs.field(factory=dict)
    type_offset: int = 0
    type_of: Callable[[Any, int], int] | None = None
    watch: frozenset = frozenset()

    def frame_type(self, data: Any, pos: int) -> int:
        return data[pos + self.type_offset] if self.type_of is None else self.type_of(data, pos)


class Tee:
    """A direction's decoder in a tapped session: consumes whole frames, yields no messages.

    ``next_message`` consumes every whole frame in the buffer and returns
    ``NEED_DATA``; it raises the layout's errors for a bad header and a
    check's ``MalformedMessage`` for a refused body, after consuming (and
    tapping) the frames before it.  With no ``tap`` nothing is tapped and no
    check runs (the checks guard what the audit parses).

    ``frames``: whole frames consumed; ``last_type``: type of the last whole
    frame (0: none yet; set per batch), e.g. did the backend say why before
    it closed?; ``seen``: the ``watch`` types consumed so far.
    """

    __slots__ = ("buffer", "side", "limit", "tap", "frames", "last_type", "seen", "_loop")

    def __init__(self, buffer: ReceiveBuffer, side: FrameSide, *, limit: int,
                 tap: Callable[[bytes], Any] | None = None) -> None:
        self.buffer = buffer
        self.side = side
        self.limit = limit
        self.tap = tap
        self.frames = 0
        self.last_type = 0
        self.seen: set[int] = set()
        # What the loop reads of ``side``, looked up once per session rather than per batch.
        self._loop = (side.layout.frames, side.interest if tap is not None else frozenset(), side.checks,
                      side.watch, side.type_offset, side.type_of)

    @classmethod
    def over(cls, decoder: Any, side: FrameSide, tap: Callable[[bytes], Any] | None = None) -> "Tee":
        """A Tee in place of ``decoder``: its buffer (bytes it holds already are framed first) and
        its ``max_message_size``."""
        return cls(decoder.buffer, side, limit=decoder.max_message_size, tap=tap)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self.buffer.feed(data)

    def next_message(self) -> Any:
        buffer = self.buffer
        data, start, end = buffer.span()
        frames_of, interest, checks, watch, offset, type_of = self._loop
        done = start  # end of the last frame consumed
        run = -1  # start of the current run of frames for the tap
        mtype = last = 0
        parts: list = []
        frames = 0
        try:
            for pos, size in frames_of(data, start, end, self.limit):
                mtype = data[pos + offset] if type_of is None else type_of(data, pos)
                if mtype in interest:
                    check = checks.get(mtype)
                    if check is not None:
                        check(data, pos, size)  # raises MalformedMessage: not consumed, not tapped
                    if run < 0:
                        run = pos
                elif run >= 0:
                    parts.append(data[run:pos])
                    run = -1
                if mtype in watch:
                    self.seen.add(mtype)
                done = pos + size
                last = mtype
                frames += 1
        finally:
            # Also on a refused frame: the frames before it are forwarded, so tapped first.
            if done != start:
                buffer.skip(done - start)
                self.last_type = last  # per batch, not per frame
                self.frames += frames
            if run >= 0:
                parts.append(data[run:done])
            if parts:
                payload = parts[0] if len(parts) == 1 else b"".join(parts)
                self.tap(payload if type(payload) is bytes else bytes(payload))  # type: ignore[misc]
        return NEED_DATA

    def announced_length(self) -> int | None:
        """Wire size of the partly received frame (None: header incomplete); for the buffer budget."""
        return self.side.layout.announced(self.buffer)


@attrs.frozen
class TapPlan:
    """What tapping a session takes, declared by the engine (``Wiring.tap``).

    tap: the worker-side class (an ``audit.frametap.FrameTap`` subclass, built as
        ``tap(audit, **params)`` in the audit worker, which learns it from the
        frame that opens the tap); client / backend: each direction's
        ``FrameSide``; params: what this session learnt before its pipeline that
        the worker's tap needs (JSON values, e.g. a negotiated protocol version or
        compression); tee: the proxy-side class (``Tee`` or a subclass, e.g. one
        that tags its errors for the engine's ``client_error``), built with
        ``tee.over(decoder, side, tap)`` from each decoder of the ``Wiring``
        (which must have ``buffer`` and ``max_message_size``; a ``tee`` object of the
        engine's may read them otherwise).
    active_frames: the engine has active stages that act on some frames only (a
        Mongo hello, SASL, OP_COMPRESSED): its ``tee`` returns those frames as
        messages and only they go through the observers and active stages on the
        proxy; every other frame is tapped.  Without it, an active stage means
        the session runs inline.
    """

    tap: type
    client: FrameSide
    backend: FrameSide
    params: dict = attrs.field(factory=dict)
    tee: Any = Tee  # a Tee subclass, or a per-session object with the same over(decoder, side, tap)
    active_frames: bool = False


__all__ = ["Check", "FrameSide", "TapPlan", "Tee"]
