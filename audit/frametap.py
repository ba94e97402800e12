"""A session's audit in the audit worker: tapped frames in, the engine's observers run on them.

The proxy's ``dbproxy.tee.Tee`` hands the worker the frames its audit
observers read (``audit.link`` T frames, per direction, in forwarding
order).  ``FrameTap`` keeps one ``ReceiveBuffer`` per direction and walks
them with the same frame loop the proxy used (``FrameSide.layout.frames``);
only a frame whose type is in the side's ``interest`` becomes the engine's
message (``message``) and goes through the engine's observer for that
direction, so the trail is the one the observer would write inline.  A
frame an observer fails on — the proxy checked it, so this means a bug or a
check out of step with its parser, or bytes that did not come through a
Tee — is audited as ``audit.malformed`` and the tap goes on with the next
frame: one frame never ends a session's audit.  A bad header (which a Tee
refuses before forwarding) raises, after the frames before it; the worker
then drops that session's tap (``audit.tap_failed``).

An engine subclasses it in its own package — ``sides`` (the two
``FrameSide`` objects its ``TapPlan`` declares), ``message``, ``describe``,
``counts`` — and names the subclass in its ``TapPlan``;  optionally ``fast``:
per direction, ``fast(data, pos, size) -> bool`` that audits the frame at
``data[pos:pos + size]`` in place (no copy, no message object) when it is a
common, simple case and returns False to leave it to the observer — it must
write exactly what the observer would (the frames a session carries by the
thousand: CQL's EXECUTE and RESULT); the worker learns it
from the frame that opens the tap (``audit.worker.tap_factory``) and
imports no engine by name.  Sans-IO: no trio.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from dbproxy.buffer import ReceiveBuffer
from dbproxy.errors import MalformedMessage, ProtocolError
from dbproxy.tee import FrameSide

from .events import MALFORMED

log = logging.getLogger("dbproxy.audit.tap")

_DIRECTIONS = ("client", "backend")  # tap direction 0: client→backend, 1: backend→client


class FrameTap:
    """Base of an engine's worker-side tap: ``Tap(audit)``, ``feed(direction, data)``, ``counts()``.

    A subclass sets ``sides`` and calls ``__init__(audit, (client observer,
    backend observer))``; it builds its messages in ``message``.
    """

    #: (client→backend, backend→client): the same ``FrameSide`` objects as the engine's ``TapPlan``.
    sides: tuple[FrameSide, FrameSide]
    #: (client→backend, backend→client): ``fast(data, pos, size) -> bool`` or None (see the module docstring).
    fast: tuple[Any, Any] = (None, None)

    def __init__(self, audit: Any, observers: tuple[Any, Any]) -> None:
        self.audit = audit
        self.observers = observers
        self.buffers = (ReceiveBuffer(), ReceiveBuffer())

    def message(self, direction: int, mtype: int, frame: bytes) -> Any:
        """The engine's message for one whole frame of an interest type."""
        raise NotImplementedError

    def describe(self, mtype: int) -> tuple[str, str]:
        """(name, code) of a frame type, for the ``audit.malformed`` event of a frame an observer
        failed on without saying what it was."""
        return f"type {mtype}", str(mtype)

    def counts(self) -> dict:
        """Fields the tap adds to the session's end event (statement and error counts…)."""
        return {}

    def feed(self, direction: int, data: bytes) -> None:
        buffer = self.buffers[direction]
        side = self.sides[direction]
        interest = side.interest
        handle = self.observers[direction].handle
        message = self.message
        fast = self.fast[direction]
        type_of = side.type_of
        type_offset = side.type_offset
        buffer.feed(data)
        raw, start, end = buffer.span()
        done = start
        try:
            # The proxy enforced the session's size limit: the worker takes what it was given.
            for pos, size in side.layout.frames(raw, start, end, sys.maxsize):
                mtype = raw[pos + type_offset] if type_of is None else type_of(raw, pos)
                if mtype in interest:
                    try:
                        if fast is None or not fast(raw, pos, size):
                            handle(message(direction, mtype, bytes(raw[pos:pos + size])), None)
                    except Exception as exc:  # one frame never ends the session's audit
                        self._malformed(direction, mtype, bytes(raw[pos:pos + size]), exc)
                done = pos + size
        finally:
            buffer.skip(done - start)
            buffer.compact()

    def _malformed(self, direction: int, mtype: int, frame: bytes, exc: Exception) -> None:
        if not isinstance(exc, MalformedMessage):
            name, code = self.describe(mtype)
            if not isinstance(exc, ProtocolError):
                log.exception("audit observer failed on a %s frame of %d bytes", name, len(frame))
            exc = MalformedMessage(f"audit stage failed: {exc.__class__.__name__}: {exc}",
                                   type_name=name, type_code=code, raw=frame)
        self.audit.emit(MALFORMED, direction=_DIRECTIONS[direction], success=False, **exc.audit_fields())


__all__ = ["FrameTap"]
