"""PostgreSQL sessions audited through a tap (see ``audit.link``).

Proxy side — ``Framer``: the decoder a session's pumps use when nothing in
the pipeline acts on messages (no statement rules): it checks every frame's
header exactly as the real decoders do (length >= 4, ``max_message_size``,
so a bad or oversized frame still ends the session with the same error
before it is forwarded), consumes whole frames without building message
objects, and taps the frames the audit stages read; the pump forwards the
chunk as received.  It notes the client's Terminate, and the type of the last
whole frame (``last_type``: did the backend say why before it closed?).

Worker side — ``Tap``: the real decoders and the engine's own audit stages
(``stages.FrontendAudit`` / ``BackendAudit``) over those bytes, so a tapped
session's trail is the one the in-process stages would write.
"""

from __future__ import annotations

import struct
from typing import Any, Callable

from dbproxy.buffer import ReceiveBuffer
from dbproxy.errors import FrameTooLarge
from dbproxy.pipeline import NEED_DATA

from .codec import DEFAULT_MAX_MESSAGE_SIZE, _bad_length
from .messages import FE, Message
from .stages import BackendAudit, FrontendAudit, PgSessionState

_LEN = struct.Struct(">i")
_TERMINATE = FE.TERMINATE


class Framer:
    """Consumes whole typed frames (header-checked); yields no messages.

    With ``tap``: every frame whose type is in ``interest`` (the types the
    audit stage of this direction acts on) is handed to ``tap`` as soon as it
    is framed — before the pump sends the batch, so a query reaches the audit
    before its answer can.  The rest (DataRow, CopyData, a password…) never
    leaves the proxy: a 100 MB result costs the audit worker nothing.
    """

    __slots__ = ("buffer", "max_message_size", "frames", "terminated", "tap", "interest", "last_type")

    def __init__(self, buffer: ReceiveBuffer, *, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
                 tap: Callable[[bytes], Any] | None = None, interest: frozenset = frozenset()) -> None:
        self.buffer = buffer
        self.max_message_size = max_message_size
        self.frames = 0
        self.terminated = False
        self.tap = tap
        self.interest = interest
        self.last_type = 0  # type byte of the last whole frame (0: none yet)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self.buffer.feed(data)

    def next_message(self) -> Any:
        data, start, end = self.buffer.span()
        pos = start
        unpack = _LEN.unpack_from
        limit = self.max_message_size
        tap = self.tap
        interest = self.interest
        run = -1  # start of the current run of frames for the tap
        mtype = 0
        parts: list = []
        frames = 0
        try:
            while end - pos >= 5:
                length = unpack(data, pos + 1)[0]
                if length < 4:
                    raise _bad_length(length)
                if length > limit:
                    raise FrameTooLarge(length, limit, what=f"message {chr(data[pos])!r}")
                if end - pos <= length:
                    break
                mtype = data[pos]
                if mtype == _TERMINATE:
                    self.terminated = True
                if tap is not None:
                    if mtype in interest:
                        if run < 0:
                            run = pos
                    elif run >= 0:
                        parts.append(data[run:pos])
                        run = -1
                pos += length + 1
                frames += 1
        finally:
            # Also on a refused frame: the frames before it are forwarded, so tapped first.
            if pos != start:
                self.buffer.skip(pos - start)
                self.frames += frames
                self.last_type = mtype  # set per batch, not per frame
            if run >= 0:
                parts.append(data[run:pos])
            if parts:
                payload = parts[0] if len(parts) == 1 else b"".join(parts)
                tap(bytes(payload) if type(payload) is not bytes else payload)
        return NEED_DATA

    def announced_length(self) -> int | None:
        """Wire length of the partly received frame (None: header incomplete); for the buffer budget."""
        buf = self.buffer
        if len(buf) < 5:
            return None
        return 1 + buf.i32_be(1)


class Tap:
    """One session's audit in the audit worker: frames in, the audit stages run on them.

    Only the message types a stage acts on (its ``interest``) become
    ``Message`` objects; any other frame is stepped over by its header (the
    proxy's ``Framer`` sends none, but a tap fed raw bytes works the same).
    """

    def __init__(self, audit: Any) -> None:
        self.state = PgSessionState()
        self.buffers = (ReceiveBuffer(), ReceiveBuffer())
        self.stages = (FrontendAudit(self.state, audit), BackendAudit(self.state, audit))

    def feed(self, direction: int, data: bytes) -> None:
        buf = self.buffers[direction]
        stage = self.stages[direction]
        interest = stage.interest
        handle = stage.handle
        buf.feed(data)
        raw, start, end = buf.span()
        pos = start
        unpack = _LEN.unpack_from
        while end - pos >= 5:
            length = unpack(raw, pos + 1)[0]
            if length < 4:  # the proxy's Framer refused these already
                buf.skip(pos - start)
                raise _bad_length(length)
            if end - pos <= length:
                break
            mtype = raw[pos]
            if mtype in interest:
                handle(Message(mtype, bytes(raw[pos:pos + length + 1])), None)
            pos += length + 1
        buf.skip(pos - start)
        buf.compact()

    def counts(self) -> dict:
        return {"queries": self.state.queries, "errors": self.state.errors}
