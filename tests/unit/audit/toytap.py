"""A toy length-prefixed protocol for the core tee and the worker's ``FrameTap`` (no engine involved).

A frame: Int16 (big-endian) length counting the whole frame (>= 3), one type byte, a body.
Type ``Q`` (a "query": its body must be ASCII) and ``R`` (a "result") are what the toy audit reads;
``Z`` is watched by the proxy; anything else (``D`` data…) is neither.  The worker-side tap names
its events with a ``prefix`` param, to show a session's params reach the worker.
"""

from __future__ import annotations

from typing import Any

from dbproxy.audit.frametap import FrameTap
from dbproxy.errors import MalformedMessage, RemoteProtocolError
from dbproxy.sansio import LengthPrefixed
from dbproxy.tee import FrameSide, TapPlan

Q, R, Z, D = b"QRZD"


def bad_length(length: int) -> RemoteProtocolError:
    return RemoteProtocolError(f"invalid toy length {length}", client_hint="invalid toy length")


TOY = LengthPrefixed(header_size=3, length_format=">h", length_offset=0, extra=0, min_length=3,
                     bad_length=bad_length, what=lambda data, pos: f"toy frame {chr(data[pos + 2])!r}")


def frame(t: bytes, body: bytes = b"") -> bytes:
    return (len(body) + 3).to_bytes(2, "big") + t + body


def check_ascii(data: Any, pos: int, size: int) -> None:
    """A "query" body must be ASCII (what the toy audit's parser needs)."""
    if not bytes(data[pos + 3:pos + size]).isascii():
        raise MalformedMessage("toy query is not ASCII", type_name="ToyQuery", type_code="Q",
                               raw=data[pos:pos + size])


CLIENT = FrameSide(TOY, interest=frozenset((Q,)), checks={Q: check_ascii}, type_offset=2, watch=frozenset((Z,)))
BACKEND = FrameSide(TOY, interest=frozenset((R,)), type_offset=2)


class ToyMessage:
    __slots__ = ("type", "raw")

    def __init__(self, mtype: int, raw: bytes) -> None:
        self.type, self.raw = mtype, raw


class ToyObserver:
    """Audits each message it is shown; a body ``boom`` makes it fail (a bug, for the tests)."""

    name = "toy-audit"

    def __init__(self, audit: Any, kind: str) -> None:
        self.audit, self.kind = audit, kind
        self.seen = 0

    def handle(self, msg: Any, ctx: Any) -> None:
        body = msg.raw[3:]
        if body == b"boom":
            raise ValueError("the toy observer broke")
        self.seen += 1
        self.audit.emit(self.kind, text=body.decode("ascii"))


class ToyTap(FrameTap):
    sides = (CLIENT, BACKEND)

    def __init__(self, audit: Any, prefix: str = "toy") -> None:
        self.client, self.backend = ToyObserver(audit, f"{prefix}.query"), ToyObserver(audit, f"{prefix}.result")
        super().__init__(audit, (self.client, self.backend))

    def message(self, direction: int, mtype: int, frame: bytes) -> ToyMessage:
        return ToyMessage(mtype, frame)

    def counts(self) -> dict:
        return {"toy_queries": self.client.seen, "toy_results": self.backend.seen}


PLAN = TapPlan(ToyTap, CLIENT, BACKEND)
