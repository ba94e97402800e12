"""``engines/vnc/server.py``: the relay's streaming framer of the desktop's stream, and what it records.

The decoder hands out framed bytes as they arrive (``Span`` s) and holds only a field cut by a read
and a ServerCutText (whole, for the clipboard policy).  Checked here:

- a Raw update goes on piece by piece, each piece the received chunk itself (no copy), and through
  the core's pipeline the viewer has the first half of an update before the desktop sends the rest;
- at any split of real servers' captured streams (every encoding the framer knows) and of built
  messages, the forwarded bytes are the stream, cut texts come whole where they were, the
  recording's server bytes are the stream and it replays to the same screen;
- a stream that cannot be framed: the bytes before the bad field go on, then ``RfbError`` with the
  reason — the same bytes at every split; nothing of a refused or oversized cut text goes on.
"""

from __future__ import annotations

import struct
import tempfile

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dbproxy.engines.vnc import rfb
from dbproxy.engines.vnc.recording import DesktopRecorder, read_recording
from dbproxy.engines.vnc.render import DesktopReplay
from dbproxy.engines.vnc.server import ServerDecoder
from dbproxy.engines.vnc.stages import ClientStage, DesktopPolicy, DesktopState, ServerStage
from dbproxy.engines.vnc.updates import RfbError, ServerStream
from dbproxy.pipeline import Pipeline
from dbproxy.sansio import NEED_DATA
from tests.unit.vnc.test_updates import ALL_PF, FIXTURES, PF32, built_messages, fixture, update
from tests.unit.vnc.test_vnc_policy import _Session

PF32_RAW = PF32.encode()


def cut_text(text: bytes) -> bytes:
    return struct.pack(">B3xI", 3, len(text)) + text


def relay(dec: ServerDecoder, stream: bytes, cuts: list[int], stage: ServerStage | None = None,
          errors: list | None = None):
    """Feed ``stream`` cut at ``cuts`` as the pipeline does: returns (the forwarded bytes, the cut texts
    as (offset in the forwarded bytes, raw)); the stage sees every message.  An RfbError ends it (into
    ``errors`` when given)."""
    out = bytearray()
    texts = []
    prev = 0
    try:
        for c in sorted(set(cuts)) + [len(stream)]:
            dec.feed(stream[prev:c])
            prev = c
            while (msg := dec.next_message()) is not NEED_DATA:
                if stage is not None:
                    stage.handle(msg, None)
                if msg.kind == "cut_text":
                    texts.append((len(out), msg.raw))
                out += msg.raw
            dec.buffer.compact()
    except RfbError as exc:
        if errors is None:
            raise
        errors.append(exc)
    return bytes(out), texts


def expected_texts(pf, stream: bytes) -> list[tuple[int, bytes]]:
    off, texts = 0, []
    for m in ServerStream(pf).feed(stream):
        if m.kind == "cut_text":
            texts.append((off, m.raw))
        off += len(m.raw)
    return texts


# -- streaming ---------------------------------------------------------------------------------

def test_a_raw_update_goes_on_as_its_bytes_arrive_without_a_copy():
    big = update((0, 0, 512, 512, 0, bytes(range(256)) * 4096))  # 1 MiB of pixels
    dec = ServerDecoder(PF32_RAW)
    quarter = len(big) // 4
    for i in range(4):
        chunk = big[i * quarter:] if i == 3 else big[i * quarter:(i + 1) * quarter]
        dec.feed(chunk)
        span = dec.next_message()
        assert span is not NEED_DATA and span.raw == chunk  # the old framer held the update to its last byte
        assert span.view() is chunk  # all of it, as the received object itself: no copy
        assert dec.next_message() is NEED_DATA
        assert dec.at_boundary == (i == 3)
        dec.buffer.compact()
        assert len(dec.buffer) == 0  # nothing held between reads


def test_a_field_cut_by_a_read_waits_for_the_rest():
    msg = update((0, 0, 2, 1, 0, bytes(8)), (2, 0, 2, 1, 0, bytes(8)))
    dec = ServerDecoder(PF32_RAW)
    dec.feed(msg[:4 + 12 + 8 + 5])  # the second rect header cut after 5 of its 12 bytes
    assert dec.next_message().raw == msg[:4 + 12 + 8]
    assert dec.next_message() is NEED_DATA
    assert dec.buffer.compact() == 5  # held, so the forwarded bytes do not depend on the split
    dec.feed(msg[4 + 12 + 8 + 5:])
    assert dec.next_message().raw == msg[4 + 12 + 8:]


async def test_through_the_pipeline_the_viewer_gets_half_an_update_before_the_rest_is_sent(tmp_path):
    big = update((0, 0, 256, 256, 0, bytes(range(256)) * 1024))  # 256 KiB
    half = len(big) // 2
    refused = cut_text(b"not for the viewer")
    recorder = DesktopRecorder(str(tmp_path / "s.vncrec"), width=256, height=256, pixel_format=PF32_RAW, name="d")
    session = _Session()
    state = DesktopState(session, DesktopPolicy(), recorder=recorder)  # no clipboard to the client
    client_side, proxy_client = trio.testing.memory_stream_pair()
    proxy_backend, backend_side = trio.testing.memory_stream_pair()
    p = Pipeline(session=None, client=proxy_client, backend=proxy_backend,
                 client_decoder=rfb.ClientMessageDecoder(), backend_decoder=ServerDecoder(PF32_RAW),
                 client_stages=[ClientStage(state)], backend_stages=[ServerStage(state)], state=state)

    async def receive(n: int) -> bytes:
        got = b""
        with trio.fail_after(5):
            while len(got) < n:
                got += await client_side.receive_some()
        return got

    async with trio.open_nursery() as nursery:
        nursery.start_soon(p.run)
        await backend_side.send_all(big[:half])
        assert await receive(half) == big[:half]  # the old framer held it until the last byte
        await backend_side.send_all(big[half:] + refused + big)  # a refused cut text between two updates
        assert await receive(len(big) * 2 - half) == big[half:] + big
        await backend_side.aclose()
    assert [f["success"] for k, f in session.audit.events if k == "desktop.clipboard"] == [False]
    assert p.statistics()[1].rewritten_batches == 1  # only the batch with the dropped cut text was rebuilt
    recorder.close()
    assert b"".join(d for _, k, d in read_recording(str(tmp_path / "s.vncrec")).events if k == "s") == big + big


# -- any split: forwarded bytes, cut texts, recording ---------------------------------------------

def _stream(stem: str) -> tuple:
    pf, captured = fixture(stem)
    # Cut texts inside the captured stream, at message boundaries: each one comes out whole only if the
    # framer stands there.
    msgs = ServerStream(pf).feed(captured)
    stream = cut_text(b"first") + b"".join(m.raw + (cut_text(b"x%d" % i) if i % 3 == 0 else b"")
                                           for i, m in enumerate(msgs))
    return pf, stream


def _record(stem: str, pf, stream: bytes, cuts: list[int], path: str) -> tuple:
    info = FIXTURES[stem]
    recorder = DesktopRecorder(path, width=info["width"], height=info["height"], pixel_format=pf.encode(), name="d")
    state = DesktopState(_Session(), DesktopPolicy(to_client=True), recorder=recorder)
    forwarded, texts = relay(ServerDecoder(pf.encode()), stream, cuts, ServerStage(state))
    recorder.close()
    return forwarded, texts, read_recording(path)


@pytest.mark.parametrize("stem", sorted(FIXTURES))
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_captured_streams_any_split_same_bytes_texts_and_recording(stem: str, data) -> None:
    pf, stream = _stream(stem)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=40))
    with tempfile.TemporaryDirectory() as folder:
        whole_fwd, whole_texts, whole_rec = _record(stem, pf, stream, [], f"{folder}/whole.vncrec")
        forwarded, texts, rec = _record(stem, pf, stream, cuts, f"{folder}/split.vncrec")
    assert whole_fwd == forwarded == stream
    assert whole_texts == texts == expected_texts(pf, stream)
    assert b"".join(d for _, k, d in rec.events if k == "s") == stream
    assert not rec.truncated
    # The replay draws the same screen from either recording, and the one the whole stream draws.
    assert DesktopReplay(rec).last().tobytes() == DesktopReplay(whole_rec).last().tobytes()


@pytest.mark.parametrize("pfname,pf", ALL_PF)
def test_built_messages_every_cut(pfname: str, pf) -> None:
    """Every message the framer knows, byte by byte, and cut in two at every byte (the small ones)."""
    msgs = built_messages(pf).values()
    stream = b"".join(m + cut_text(b"|") for m in msgs)
    small = b"".join(m + cut_text(b"|") for m in msgs if len(m) < 2000)
    expected = {stream: expected_texts(pf, stream), small: expected_texts(pf, small)}
    for data, cuts in [(stream, list(range(len(stream))))] + [(small, [c]) for c in range(len(small))]:
        dec = ServerDecoder(pf.encode())
        assert relay(dec, data, cuts) == (data, expected[data]), cuts
        assert dec.at_boundary and len(dec.buffer) == 0


# -- a stream that cannot be framed ----------------------------------------------------------------

GOOD = update((0, 0, 2, 2, 0, bytes(16)))
BAD_HEAD = struct.pack(">BxH", 0, 2) + struct.pack(">HHHHi", 0, 0, 1, 1, 0) + bytes(4)  # one good rect
BAD = BAD_HEAD + struct.pack(">HHHHi", 0, 0, 4, 4, 99) + bytes(40)  # then encoding 99


def test_a_malformed_stream_forwards_the_framed_bytes_then_ends_with_the_reason():
    stream = GOOD + cut_text(b"ok") + BAD
    for cuts in [[]] + [[c] for c in range(len(stream))]:
        dec = ServerDecoder(PF32_RAW)
        errors: list = []
        forwarded, texts = relay(dec, stream, cuts, errors=errors)
        # The same bytes at every split: a header cut by a read is held, not sent, until it is whole.
        assert forwarded == GOOD + cut_text(b"ok") + BAD_HEAD, cuts
        assert texts == [(len(GOOD), cut_text(b"ok"))]
        (exc,) = errors
        assert "unsupported encoding 99 rectangle in a FramebufferUpdate" in str(exc)
        with pytest.raises(RfbError):
            dec.next_message()  # and it stays failed


def test_the_bytes_before_the_bad_field_are_handed_out_first():
    dec = ServerDecoder(PF32_RAW)
    dec.feed(GOOD + BAD)
    assert dec.next_message().raw == GOOD + BAD_HEAD
    with pytest.raises(RfbError, match="encoding 99"):
        dec.next_message()


@pytest.mark.parametrize("cut", [0, 1, 5, 8, 9, 20])
def test_an_unknown_message_type_and_an_oversized_cut_text(cut):
    dec = ServerDecoder(PF32_RAW)
    assert relay(dec, GOOD, []) == (GOOD, [])
    stream = struct.pack(">B3xI", 3, 1000) + bytes(100)
    dec.max_message = 64
    dec.feed(stream[:cut])
    if cut < 8:
        assert dec.next_message() is NEED_DATA
        dec.feed(stream[cut:])
    with pytest.raises(RfbError, match="1000 bytes exceeds the maximum of 64"):
        dec.next_message()
    assert dec.buffer.position == 0  # nothing of the cut text went on
    dec = ServerDecoder(PF32_RAW)
    dec.feed(GOOD + b"\x07rest")
    assert dec.next_message().raw == GOOD
    with pytest.raises(RfbError, match="unknown server message type 7"):
        dec.next_message()


async def test_through_the_pipeline_a_malformed_stream_ends_the_session_with_the_reason():
    state = DesktopState(_Session(), DesktopPolicy())
    client_side, proxy_client = trio.testing.memory_stream_pair()
    proxy_backend, backend_side = trio.testing.memory_stream_pair()
    p = Pipeline(session=None, client=proxy_client, backend=proxy_backend,
                 client_decoder=rfb.ClientMessageDecoder(), backend_decoder=ServerDecoder(PF32_RAW),
                 client_stages=[ClientStage(state)], backend_stages=[ServerStage(state)], state=state)
    await backend_side.send_all(GOOD + BAD)
    with trio.fail_after(5):
        await p.run()  # ends by itself
    got = b""
    with trio.move_on_after(0.5):
        while True:
            got += await client_side.receive_some()
    assert got == GOOD + BAD_HEAD  # the framed bytes before the bad rect header, then the end
    assert p.end_reason.startswith("backend protocol error: unsupported encoding 99 rectangle")
