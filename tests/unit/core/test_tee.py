"""The core audit tee (``dbproxy.tee.Tee``) and the core's inline-or-tap decision (``dbproxy.flow.assemble``).

On a toy length-prefixed protocol (``tests/unit/audit/toytap.py``: Int16 length, the type byte at
offset 2), not on an engine's, proven here:

- the Tee consumes exactly the whole frames ``LengthPrefixed.next_frame`` takes, however the stream is
  cut (hypothesis), returns no message, and hands the tap exactly the frames of the interest types,
  in order, once per batch, consecutive ones joined;
- a body check refuses a frame before it is consumed or tapped (``MalformedMessage``); the frames
  before it are consumed and tapped; without a tap nothing is checked or tapped;
- a bad or oversized header raises the layout's error after the frames before it;
- ``last_type`` (per batch) and ``seen`` (watched types, only once whole); ``type_of`` for a type
  that is not one byte; ``announced_length``;
- ``assemble``: with a ``TapPlan``, no active stage and an audit that can tap, each decoder is
  replaced by a Tee over its buffer and limit, no stage runs on the proxy, the tap opens with the
  plan's class and params and closes with ``close``; an active stage, an audit that cannot tap or no
  plan keep the observers inline — client side before the active stages, backend side after them.
"""

from __future__ import annotations

import struct

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dbproxy.buffer import ReceiveBuffer
from dbproxy.errors import FrameTooLarge, MalformedMessage, RemoteProtocolError
from dbproxy.flow import Wiring, assemble
from dbproxy.sansio import NEED_DATA
from dbproxy.tee import FrameSide, TapPlan, Tee
from tests.unit.audit.toytap import BACKEND, CLIENT, D, PLAN, R, TOY, Z, ToyTap, frame


def tee(side: FrameSide = CLIENT, limit: int = 1000, tapped: list | None = None) -> Tee:
    return Tee(ReceiveBuffer(), side, limit=limit, tap=tapped.append if tapped is not None else None)


def step(t: Tee, chunk: bytes) -> bytes:
    """One pump batch: feed, frame, return what the pump would forward."""
    t.feed(chunk)
    t.buffer.mark()
    assert t.next_message() is NEED_DATA
    out = t.buffer.consumed_since_mark()
    t.buffer.compact()
    return out


frames_st = st.lists(st.tuples(st.sampled_from([b"Q", b"R", b"D", b"Z", b"X"]), st.binary(max_size=12).map(
    lambda b: bytes(x & 0x7F for x in b))), max_size=10)


@settings(max_examples=200, deadline=None)
@given(frames=frames_st, cuts=st.lists(st.integers(0, 200), max_size=8))
def test_tee_consumes_whole_frames_and_taps_the_interest_ones(frames, cuts) -> None:
    stream = b"".join(frame(t, b) for t, b in frames)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {len(stream)})
    tapped: list[bytes] = []
    t = tee(tapped=tapped)
    ref = ReceiveBuffer()
    last = 0
    forwarded = b""
    for p in points:
        chunk = stream[last:p]
        last = p
        ref.feed(chunk)
        taken = b""
        while (f := TOY.next_frame(ref, 1000)) is not NEED_DATA:
            taken += f
        before = len(tapped)
        got = step(t, chunk)
        assert got == taken  # the pump forwards exactly the whole frames
        assert len(tapped) - before <= 1  # one tap per batch at most
        forwarded += got
        ref.compact()
    assert forwarded == stream and len(t.buffer) == 0
    assert t.frames == len(frames)
    assert b"".join(tapped) == b"".join(frame(ty, b) for ty, b in frames if ty == b"Q")
    assert (Z in t.seen) == any(ty == b"Z" for ty, _ in frames)


def test_runs_of_interest_frames_are_joined_in_one_tap() -> None:
    tapped: list[bytes] = []
    t = tee(BACKEND, tapped=tapped)
    r1, r2, r3 = frame(b"R", b"one"), frame(b"R", b"two"), frame(b"R", b"three")
    step(t, r1 + r2 + frame(b"D", b"row") + r3 + frame(b"D", b"x")[:2])
    assert tapped == [r1 + r2 + r3]
    assert type(tapped[0]) is bytes
    assert t.last_type == R and t.frames == 4


@pytest.mark.parametrize("split", [False, True])
def test_a_refused_body_is_neither_consumed_nor_tapped(split: bool) -> None:
    tapped: list[bytes] = []
    t = tee(tapped=tapped)
    good = frame(b"Q", b"select") + frame(b"D", b"data")
    bad = frame(b"Q", "sélect".encode())
    stream = good + bad + frame(b"Q", b"after")
    t.buffer.mark()
    chunks = [stream[i:i + 1] for i in range(len(stream))] if split else [stream]
    with pytest.raises(MalformedMessage) as info:
        for chunk in chunks:
            t.feed(chunk)
            t.next_message()
    assert t.buffer.consumed_since_mark() == good
    assert b"".join(tapped) == frame(b"Q", b"select")
    assert bytes(t.buffer.peek(len(bad))) == bad
    assert (info.value.type_name, info.value.length) == ("ToyQuery", len(bad))
    assert t.last_type == D  # the last frame consumed, not the refused one


def test_without_a_tap_nothing_is_checked_or_tapped() -> None:
    t = tee()
    bad = frame(b"Q", "sélect".encode())
    assert step(t, bad) == bad


@pytest.mark.parametrize("header,error", [(struct.pack(">h", 2) + b"Q", RemoteProtocolError),
                                          (struct.pack(">h", 101) + b"Q", FrameTooLarge)])
def test_a_bad_header_raises_after_the_frames_before_it(header: bytes, error) -> None:
    tapped: list[bytes] = []
    t = tee(limit=100, tapped=tapped)
    good = frame(b"Q", b"one") + frame(b"Z")
    t.feed(good + header)
    t.buffer.mark()
    with pytest.raises(error) as info:
        t.next_message()
    assert t.buffer.consumed_since_mark() == good and tapped == [frame(b"Q", b"one")]
    assert Z in t.seen and t.frames == 2
    if error is FrameTooLarge:
        assert "toy frame 'Q'" in str(info.value)


def test_watched_types_are_seen_only_once_whole() -> None:
    t = tee()
    z = frame(b"Z", b"bye")
    step(t, z[:-1])
    assert Z not in t.seen and t.last_type == 0
    step(t, z[-1:])
    assert Z in t.seen and t.last_type == Z
    assert Z not in tee(BACKEND).seen  # BACKEND watches nothing
    b = tee(BACKEND)
    step(b, z)
    assert not b.seen


def test_type_of_for_a_type_wider_than_a_byte() -> None:
    """Mongo-like: the type is an Int16 at offset 2 (``type_of``), not one byte."""
    side = FrameSide(TOY, interest=frozenset((0x5152,)), type_of=lambda d, p: struct.unpack_from(">H", d, p + 2)[0])
    tapped: list[bytes] = []
    t = tee(side, tapped=tapped)
    wanted, other = (len(b"QRx") + 2).to_bytes(2, "big") + b"QRx", (len(b"QQy") + 2).to_bytes(2, "big") + b"QQy"
    step(t, other + wanted + other)
    assert tapped == [wanted] and t.last_type == 0x5151


def test_announced_length() -> None:
    t = tee()
    t.feed(frame(b"Q", b"x" * 50)[:2])
    assert t.announced_length() is None
    t.feed(b"Q")
    assert t.announced_length() == 53


# --------------------------------------------------------------------------
# assemble: the core's decision.


class FakeAudit:
    """What ``assemble`` uses of a session's audit (``SessionAudit``: can_tap, tap_open, tap, tap_close)."""

    def __init__(self, can_tap: bool = True) -> None:
        self.can_tap = can_tap
        self.calls: list = []

    def tap_open(self, tap: type, params: dict | None = None) -> int:
        self.calls.append(("open", tap, params))
        return 7

    def tap(self, slot: int, direction: int, data: bytes) -> None:
        self.calls.append(("tap", slot, direction, data))

    def tap_close(self, slot: int) -> None:
        self.calls.append(("close", slot))


class Decoder:
    def __init__(self, limit: int) -> None:
        self.buffer = ReceiveBuffer()
        self.max_message_size = limit


OBSERVE_C, OBSERVE_B, POLICY_C, POLICY_B = "observe-client", "observe-backend", "policy-client", "policy-backend"


def wiring(*, stages: bool = False, plan: TapPlan | None = PLAN) -> Wiring:
    client, backend = Decoder(100), Decoder(200)
    client.buffer.feed(frame(b"Q", b"handed over"))  # bytes left by the handshake: framed first
    return Wiring(client, backend, [POLICY_C] if stages else [], [POLICY_B] if stages else [], None, bytes,
                  client_observers=[OBSERVE_C], backend_observers=[OBSERVE_B], tap=plan)


def test_assemble_taps_when_nothing_acts_on_messages() -> None:
    audit = FakeAudit()
    w = wiring()
    got = assemble(w, audit)
    assert w.tapped and (got.client_decoder, got.backend_decoder) == w.tees
    assert got.client_stages == got.backend_stages == []
    assert audit.calls == [("open", ToyTap, None)]
    client, backend = w.tees
    assert type(client) is Tee and client.buffer is w.client_decoder.buffer and client.limit == 100
    assert backend.buffer is w.backend_decoder.buffer and backend.limit == 200
    assert (client.side, backend.side) == (PLAN.client, PLAN.backend)
    assert client.next_message() is NEED_DATA
    backend.feed(frame(b"R", b"ok"))
    backend.next_message()
    got.close()
    assert audit.calls[1:] == [("tap", 7, 0, frame(b"Q", b"handed over")), ("tap", 7, 1, frame(b"R", b"ok")),
                               ("close", 7)]


def test_assemble_passes_the_plans_params_and_tee_class() -> None:
    class TaggingTee(Tee):
        pass

    audit = FakeAudit()
    w = wiring(plan=attrs.evolve(PLAN, params={"prefix": "v5"}, tee=TaggingTee))
    assemble(w, audit)
    assert audit.calls == [("open", ToyTap, {"prefix": "v5"})]
    assert all(type(t) is TaggingTee for t in w.tees)


@pytest.mark.parametrize("why", ["active stage", "cannot tap", "no plan"])
def test_assemble_keeps_observers_inline(why: str) -> None:
    audit = FakeAudit(can_tap=why != "cannot tap")
    w = wiring(stages=why == "active stage", plan=None if why == "no plan" else PLAN)
    got = assemble(w, audit)
    assert not w.tapped and audit.calls == [] and got.close is None
    assert (got.client_decoder, got.backend_decoder) == (w.client_decoder, w.backend_decoder)
    if why == "active stage":
        assert got.client_stages == [OBSERVE_C, POLICY_C]  # the attempt is recorded before a refusal
        assert got.backend_stages == [POLICY_B, OBSERVE_B]  # the audit sees what the client gets
    else:
        assert (got.client_stages, got.backend_stages) == ([OBSERVE_C], [OBSERVE_B])


def test_assemble_keeps_a_wiring_without_observers_as_it_was() -> None:
    """An engine that lists its audit stages among its stages (and declares no plan) runs as before."""
    w = Wiring(Decoder(1), Decoder(1), ["a", "b"], ["c"], None, bytes)
    got = assemble(w, FakeAudit())
    assert (got.client_stages, got.backend_stages) == (["a", "b"], ["c"]) and not w.tapped
