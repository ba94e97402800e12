"""The worker-side tap base (``dbproxy.audit.frametap.FrameTap``), on the toy protocol of ``toytap``.

Proven here:

- fed the bytes of a session in any cuts, per direction, a FrameTap shows its observers exactly the
  frames of the interest types, in order, as the subclass's messages, and steps over the others
  (hypothesis); the result is the same as one whole feed;
- a frame an observer fails on is audited as ``audit.malformed`` (the observer's own
  ``MalformedMessage`` fields, else the subclass's ``describe``) and the next frames are audited;
- a bad header raises after the frames before it were audited;
- for real, through ``AuditLink`` and the worker process: a tap opened with the plan's ``params``
  is built in the worker as ``Tap(audit, **params)`` (an engine the worker never imported), its
  events join the session's trail and its counts the end event.
"""

from __future__ import annotations

import orjson
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from dbproxy.audit import events as ev
from dbproxy.audit.link import AuditLink
from dbproxy.audit.recorder import AuditRecorder, TemplateAudit
from dbproxy.errors import RemoteProtocolError
from tests.support import read_audit
from tests.unit.audit.test_link import new_session, write_config
from tests.unit.audit.toytap import ToyTap, frame


def events(recorder: AuditRecorder) -> list[dict]:
    return [orjson.loads(body) for body in recorder._queue]


def new_tap(**params) -> tuple[ToyTap, AuditRecorder]:
    recorder = AuditRecorder(sinks=[])
    return ToyTap(TemplateAudit(recorder, {"sid": "s-1"}), **params), recorder


CLIENT_FRAMES = [(b"Q", b"select 1"), (b"D", b"copy data"), (b"Q", b"select 2"), (b"Z", b"")]
BACKEND_FRAMES = [(b"D", b"row"), (b"R", b"one"), (b"X", b"other"), (b"R", b"two")]


@settings(max_examples=100, deadline=None)
@given(cuts=st.lists(st.integers(1, 30), max_size=8))
def test_observers_see_the_interest_frames_in_order_whatever_the_cuts(cuts) -> None:
    tap, recorder = new_tap()
    for direction, frames in ((0, CLIENT_FRAMES), (1, BACKEND_FRAMES)):
        data = b"".join(frame(t, b) for t, b in frames)
        pos, i = 0, 0
        while pos < len(data):
            n = cuts[i % len(cuts)] if cuts else len(data)
            tap.feed(direction, data[pos:pos + n])
            pos += n
            i += 1
        assert len(tap.buffers[direction]) == 0
    got = [(e["event"], e["text"]) for e in events(recorder)]
    assert got == [("toy.query", "select 1"), ("toy.query", "select 2"), ("toy.result", "one"), ("toy.result", "two")]
    assert tap.counts() == {"toy_queries": 2, "toy_results": 2}


@pytest.mark.parametrize("step", [None, 1])
def test_a_frame_an_observer_fails_on_is_audited_and_the_tap_goes_on(step) -> None:
    tap, recorder = new_tap()
    data = frame(b"Q", b"select 1") + frame(b"Q", b"boom") + frame(b"Q", "sé".encode()) + frame(b"Q", b"select 3")
    chunks = [data[i:i + 1] for i in range(len(data))] if step else [data]
    for chunk in chunks:
        tap.feed(0, chunk)
    got = events(recorder)
    assert [e["event"] for e in got] == ["toy.query", ev.MALFORMED, ev.MALFORMED, "toy.query"]
    boom, not_ascii = got[1], got[2]
    # A bug (ValueError): named by the tap's ``describe``.
    assert (boom["direction"], boom["message_type"], boom["message_code"]) == ("client", f"type {ord('Q')}", str(ord("Q")))
    assert boom["prefix_hex"] == frame(b"Q", b"boom").hex() and boom["success"] is False
    # The observer's own error (UnicodeDecodeError is a ValueError too: described the same way).
    assert not_ascii["length"] == len(frame(b"Q", "sé".encode()))
    assert got[3]["text"] == "select 3"


def test_a_bad_header_raises_after_the_frames_before_it() -> None:
    tap, recorder = new_tap()
    with pytest.raises(RemoteProtocolError):
        tap.feed(1, frame(b"R", b"one") + b"\x00\x01R")
    assert [e["text"] for e in events(recorder)] == ["one"]
    assert len(tap.buffers[1]) == 3  # the bad header stays: nothing after it is taken


async def test_a_tap_is_built_in_the_worker_with_its_params(tmp_path) -> None:
    link = AuditLink(write_config(tmp_path))
    async with trio.open_nursery() as nursery:
        await nursery.start(link.run)
        session = new_session()
        audit = link.session(session)
        audit.on_session_start(success=True)
        slot = audit.tap_open(ToyTap, {"prefix": "toy.v5"})
        audit.tap(slot, 0, frame(b"Q", b"select 1")[:3])
        audit.tap(slot, 0, frame(b"Q", b"select 1")[3:])
        audit.tap(slot, 1, frame(b"R", b"one"))
        audit.tap_close(slot)
        audit.on_session_end(reason="done")
        await link.aclose()
    trail = read_audit(tmp_path / "audit.jsonl")
    assert [e["event"] for e in trail] == ["db.session.start", "toy.v5.query", "toy.v5.result", "db.session.end"]
    assert trail[1]["text"] == "select 1" and all(e["sid"] == session.id for e in trail)
    assert trail[-1]["toy_queries"] == 1 and trail[-1]["toy_results"] == 1
