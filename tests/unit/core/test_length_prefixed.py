"""``dbproxy.sansio.LengthPrefixed``: the one frame loop decoders, the tee and the worker share.

Checked on the three layouts the engines use (PostgreSQL, CQL v4, Mongo) with
hypothesis: whatever way a stream of frames is cut, ``frames`` yields exactly
the whole frames in order and ``next_frame`` takes the same ones; bad and
oversized lengths raise at the frame that carries them, after the frames
before it.
"""

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dbproxy.buffer import ReceiveBuffer
from dbproxy.errors import FrameTooLarge, RemoteProtocolError
from dbproxy.sansio import NEED_DATA, LengthPrefixed


def _bad(length):
    return RemoteProtocolError(f"invalid length {length}")


PG = LengthPrefixed(header_size=5, length_format=">i", length_offset=1, extra=1, min_length=4, bad_length=_bad,
                    what=lambda data, pos: f"message {chr(data[pos])!r}")
CQL = LengthPrefixed(header_size=9, length_format=">i", length_offset=5, extra=9, min_length=0, bad_length=_bad)
MONGO = LengthPrefixed(header_size=16, length_format="<i", length_offset=0, extra=0, min_length=16, bad_length=_bad)


def pg_frame(body: bytes, t: bytes = b"Q") -> bytes:
    return t + struct.pack(">i", len(body) + 4) + body


def cql_frame(body: bytes) -> bytes:
    return bytes([4, 0, 0, 1, 7]) + struct.pack(">i", len(body)) + body


def mongo_frame(body: bytes) -> bytes:
    return struct.pack("<iiii", len(body) + 16, 1, 0, 2013) + body


LAYOUTS = [(PG, pg_frame), (CQL, cql_frame), (MONGO, mongo_frame)]


@pytest.mark.parametrize("layout,make", LAYOUTS)
@settings(max_examples=60, deadline=None)
@given(bodies=st.lists(st.binary(max_size=40), max_size=8), cuts=st.lists(st.integers(0, 400), max_size=6))
def test_frames_and_next_frame_agree_on_any_split(layout, make, bodies, cuts):
    frames = [make(b) for b in bodies]
    stream = b"".join(frames)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {len(stream)})
    seen_loop, seen_take = [], []
    loop_buf, take_buf = ReceiveBuffer(), ReceiveBuffer()
    last = 0
    for p in points:
        chunk = stream[last:p]
        last = p
        loop_buf.feed(chunk)
        data, start, end = loop_buf.span()
        consumed = start
        for pos, size in layout.frames(data, start, end, 1 << 20):
            seen_loop.append(bytes(data[pos:pos + size]))
            consumed = pos + size
        loop_buf.skip(consumed - start)
        take_buf.feed(chunk)
        while (f := layout.next_frame(take_buf, 1 << 20)) is not NEED_DATA:
            seen_take.append(f)
    assert seen_loop == frames
    assert seen_take == frames
    assert len(loop_buf) == 0 and len(take_buf) == 0


def test_bad_length_raises_after_the_frames_before_it():
    good = pg_frame(b"select 1\0")
    bad = b"Q" + struct.pack(">i", 3)
    data = good + bad + b"xxxx"
    walked = []
    with pytest.raises(RemoteProtocolError, match="invalid length 3"):
        for pos, size in PG.frames(data, 0, len(data), 1 << 20):
            walked.append((pos, size))
    assert walked == [(0, len(good))]


def test_oversized_frame_names_its_type_and_the_limit():
    data = pg_frame(b"x" * 100, b"P")
    with pytest.raises(FrameTooLarge) as info:
        list(PG.frames(data, 0, len(data), 50))
    assert info.value.size == 104 and info.value.limit == 50
    assert "message 'P'" in str(info.value)
    buf = ReceiveBuffer()
    buf.feed(data[:5])
    with pytest.raises(FrameTooLarge):
        PG.next_frame(buf, 50)


def test_incomplete_header_and_announced_size():
    buf = ReceiveBuffer()
    buf.feed(mongo_frame(b"abcd")[:10])
    assert MONGO.next_frame(buf, 1 << 20) is NEED_DATA
    assert MONGO.announced(buf) is None
    buf.feed(mongo_frame(b"abcd")[10:17])
    assert MONGO.announced(buf) == 20
    assert MONGO.next_frame(buf, 1 << 20) is NEED_DATA
    assert MONGO.size_at(*buf.span(), 1 << 20) == 20
    with pytest.raises(RemoteProtocolError):
        MONGO.size_at(struct.pack("<iiii", 15, 0, 0, 0), 0, 16, 1 << 20)
