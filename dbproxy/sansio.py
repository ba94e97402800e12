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

from typing import Any, Protocol

import attrs


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
