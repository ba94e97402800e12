"""CQL v5+ segments: CRCs, encoder and the decoder in 'segments' framing.

Cross-implementation checks with the official driver's SegmentCodec: its
segments decode here, ours decode there, and for one frame the bytes are
identical (so the CRC24/CRC32 parameters agree with Cassandra's).
"""

from __future__ import annotations

import os

import pytest
from cassandra import ConsistencyLevel
from cassandra.protocol import PrepareMessage, QueryMessage
from cassandra.segment import CRC32_INITIAL, compute_crc24, compute_crc32
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.cassandra.cql_testutil import (
    decode_all,
    driver_decode_segments,
    driver_frame,
    driver_segments,
    rows_body,
    INT,
    vector,
)
from dbproxy.errors import FrameTooLarge, LocalProtocolError, ProtocolError, RemoteProtocolError
from dbproxy.sansio import NEED_DATA
from dbproxy.engines.cassandra import protocol as F
from dbproxy.engines.cassandra import segments as S
from dbproxy.engines.cassandra.codec import CqlDecoder, CqlEncoder, SegmentEncoder, frames_encoder


def seg_decoder(direction="client", compress=False, **kw) -> CqlDecoder:
    d = CqlDecoder(direction, **kw)
    d.set_framing("segments", "lz4" if compress else None)
    return d


def query(n: int, stream: int = 1) -> bytes:
    return driver_frame(QueryMessage(f"SELECT * FROM t WHERE k = {n}", ConsistencyLevel.ONE), 5, stream=stream)


def big_query(size: int, stream: int = 7) -> bytes:
    text = "SELECT * FROM t WHERE k IN (" + ",".join(str(i % 10) for i in range(size // 2)) + ")"
    return driver_frame(QueryMessage(text, ConsistencyLevel.ONE), 5, stream=stream)


# --- CRCs ------------------------------------------------------------------------------


@settings(max_examples=500)
@given(nbytes=st.sampled_from([3, 5]), value=st.integers(0, 2**40 - 1))
def test_crc24_matches_driver(nbytes, value):
    value &= (1 << (8 * nbytes)) - 1
    assert S.crc24(value, nbytes) == compute_crc24(value, nbytes)


@given(st.binary(max_size=1000))
def test_crc32_matches_driver(data):
    assert S.crc32(data) == compute_crc32(data, CRC32_INITIAL) & 0xFFFFFFFF


def test_crc_known_values():
    # Fixed points so a regression does not hide behind the driver sharing a bug.
    assert S.CRC32_INIT == 0x44777ED3
    assert (S.crc24(0, 3), S.crc24(0x12345, 3), S.crc24(0x123456789A, 5)) == (0x7DE777, 0x8BC640, 0x40D313)
    header = vector("v5_segments_plain.bin")[:6]
    value = int.from_bytes(header[:3], "little")
    assert S.crc24(value, 3) == int.from_bytes(header[3:6], "little")


# --- encoder vs driver -------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(payload=st.binary(max_size=3000) | st.builds(lambda n: b"abc" * n, st.integers(0, 1000)), compress=st.booleans())
def test_single_segment_identical_to_driver(payload, compress):
    ours = S.encode_segment(payload, self_contained=True, compress=compress)
    assert ours == driver_segments(payload, compress)
    [seg] = driver_decode_segments(ours, compress)
    assert seg.payload == payload and seg.is_self_contained


@pytest.mark.parametrize("compress", [False, True])
def test_encode_segments_packs_frames_and_driver_reads_them(compress):
    frames = [query(i, stream=i) for i in range(50)]
    data = b"".join(frames)
    wire = S.encode_segments(data, compress=compress)
    segs = driver_decode_segments(wire, compress)
    assert len(segs) == 1 and segs[0].is_self_contained and segs[0].payload == data
    # many frames: several self-contained segments, each a whole number of frames
    many = b"".join(query(i, stream=i % 1000) for i in range(3000))
    segs = driver_decode_segments(S.encode_segments(many, compress=compress), compress)
    assert len(segs) > 1 and all(s.is_self_contained for s in segs)
    assert all(len(s.payload) <= S.MAX_PAYLOAD for s in segs)
    assert b"".join(s.payload for s in segs) == many
    assert decode_all(seg_decoder(compress=compress), S.encode_segments(many, compress=compress)) == decode_all(
        CqlDecoder("client"), many
    )


@pytest.mark.parametrize("compress", [False, True])
def test_large_frame_split_into_non_self_contained_segments(compress):
    small = query(1, stream=1)
    big = big_query(300_000)
    assert len(big) > 2 * S.MAX_PAYLOAD
    wire = S.encode_segments(small + big + small, compress=compress)
    segs = driver_decode_segments(wire, compress)
    flags = [s.is_self_contained for s in segs]
    assert flags == [True, False, False, False, True]
    assert segs[0].payload == small and segs[-1].payload == small
    assert b"".join(s.payload for s in segs[1:4]) == big
    assert [len(s.payload) for s in segs[1:3]] == [S.MAX_PAYLOAD, S.MAX_PAYLOAD]
    # and the driver's own split of the same frame equals ours
    assert driver_segments(big, compress) == S.encode_segments(big, compress=compress)


def test_incompressible_payload_sent_raw_with_zero_uncompressed_length():
    noise = os.urandom(5000)
    frame = F.encode_frame(5, 0, 1, F.Opcode.QUERY, F.query_body(5, noise.hex()[:100]) + noise, response=False)
    seg = S.encode_segment(frame, self_contained=True, compress=True)
    header = S.parse_segment_header(seg, True)
    assert header.uncompressed_length == 0 and header.payload_length == len(frame)
    assert decode_all(seg_decoder(compress=True), seg)[0].raw == frame
    [dseg] = driver_decode_segments(seg, True)
    assert dseg.payload == frame


def test_encoder_rejects_partial_frames_and_oversize_payloads():
    with pytest.raises(LocalProtocolError):
        S.encode_segments(query(1)[:-1], compress=False)
    with pytest.raises(LocalProtocolError):
        S.encode_segments(query(1) + b"\x05\x00", compress=False)
    with pytest.raises(LocalProtocolError):
        S.encode_segment(b"x" * (S.MAX_PAYLOAD + 1), self_contained=False, compress=False)
    assert S.encode_segments(b"", compress=True) == b""


def test_encoders():
    frames = query(1) + query(2)
    assert frames_encoder(frames) == frames
    assert SegmentEncoder(compress=True)(frames) == S.encode_segments(frames, compress=True)
    enc = CqlEncoder()
    assert enc(frames) == frames and enc.framing == "frames"
    enc.set_framing("segments", "lz4")
    assert enc(frames) == S.encode_segments(frames, compress=True)
    enc.set_framing("segments")
    assert enc(frames) == S.encode_segments(frames, compress=False)
    enc.set_framing("frames", "lz4")
    assert enc(frames) == frames
    with pytest.raises(LocalProtocolError):
        enc.set_framing("segments", "snappy")
    with pytest.raises(LocalProtocolError):
        seg_decoder().set_framing("segments", "snappy")


# --- decoder -------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True])
def test_driver_segments_decode(compress):
    frames = [query(i, stream=i) for i in range(5)]
    wire = b"".join(driver_segments(f, compress) for f in frames)  # the driver: one frame per segment
    for chunk in (None, 1, 7):
        d = seg_decoder(compress=compress)
        got = decode_all(d, wire, chunk=chunk)
        assert [m.raw for m in got] == frames
        assert [m.stream for m in got] == list(range(5))
        assert d.buffer.position == len(wire)
    msgs = decode_all(seg_decoder(compress=compress), wire)
    assert F.parse_query(msgs[3]).query == "SELECT * FROM t WHERE k = 3"


@pytest.mark.parametrize("name,compress", [("v5_segments_plain.bin", False), ("v5_segments_lz4.bin", True)])
def test_saved_segment_vectors(name, compress):
    msgs = decode_all(seg_decoder(compress=compress), vector(name))
    assert [m.opcode for m in msgs] == [F.Opcode.QUERY, F.Opcode.PREPARE]
    assert F.parse_query(msgs[0]).params.keyspace == "system"
    assert F.parse_prepare(msgs[1]) == F.Prepare("SELECT * FROM t WHERE k = ?", "ks")


def test_saved_split_vector_consumed_only_when_complete():
    wire = vector("v5_segments_split.bin")
    d = seg_decoder()
    d.buffer.mark()
    for i in range(0, len(wire) - 1, 4096):
        d.feed(wire[i:min(i + 4096, len(wire) - 1)])
        assert d.next_message() is NEED_DATA
        assert d.buffer.position == 0  # nothing consumed while the frame is incomplete
        d.buffer.compact()
    d.feed(wire[-1:])
    msg = d.next_message()
    assert msg.stream == 5 and F.parse_query(msg).query.startswith("SELECT * FROM ks.t WHERE k IN (0, 1, 2")
    assert d.buffer.consumed_since_mark() == wire
    assert d.next_message() is NEED_DATA


def test_split_frame_byte_by_byte():
    big = big_query(140_000)
    wire = S.encode_segments(query(1) + big + query(2), compress=True)
    got = decode_all(seg_decoder(compress=True), wire, chunk=1)
    assert [m.raw for m in got] == [query(1), big, query(2)]


def test_batch_consumes_exactly_whole_segments():
    a = S.encode_segments(query(1) + query(2) + query(3), compress=False)
    b = S.encode_segments(query(4), compress=False)
    d = seg_decoder()
    d.buffer.mark()
    d.feed(a + b + b[:5])
    got = []
    while (m := d.next_message()) is not NEED_DATA:
        got.append(m.stream)
        # after the first frame of a segment, its whole segment is consumed
        assert d.buffer.position in (len(a), len(a) + len(b))
    assert got == [1, 1, 1, 1]
    assert d.buffer.consumed_since_mark() == a + b


def test_framing_switch_after_ready():
    """Server side of a v5 handshake: READY unframed, then segments, in one read."""
    ready = F.encode_ready(5, 0)
    result = F.encode_frame(5, 0, 1, F.Opcode.RESULT, rows_body(5, [("a", INT)], [[b"\x00\x00\x00\x01"]]), response=True)
    wire = ready + S.encode_segments(result, compress=True)
    d = CqlDecoder("server")
    d.buffer.mark()
    d.feed(wire)
    first = d.next_message()
    assert first.opcode == F.Opcode.READY and first.raw == ready
    d.set_framing("segments", "lz4")
    second = d.next_message()
    assert second.raw == result and F.parse_result(second).rows.row_count == 1
    assert d.next_message() is NEED_DATA
    assert d.buffer.consumed_since_mark() == wire


def test_v5_startup_is_unframed_then_requests_are_segments():
    startup = F.encode_startup(5, 0, {"CQL_VERSION": "3.0.0", "COMPRESSION": "lz4"})
    d = CqlDecoder("client")
    d.feed(startup)
    assert F.parse_startup(d.next_message())["COMPRESSION"] == "lz4"
    d.set_framing("segments", "lz4")
    d.feed(driver_segments(query(9, stream=9), True))
    assert d.next_message().stream == 9


def test_empty_self_contained_segment_is_skipped():
    wire = S.encode_segment(b"", self_contained=True, compress=False) + S.encode_segments(query(1), compress=False)
    assert [m.stream for m in decode_all(seg_decoder(), wire)] == [1]


# --- corruption and limits -----------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("where", ["header", "header_crc", "payload", "payload_crc"])
def test_crc_mismatch(compress, where):
    wire = bytearray(S.encode_segments(query(1) + query(2), compress=compress))
    hsize = S.header_size(compress)
    index = {"header": 1, "header_crc": hsize - 1, "payload": hsize + 3, "payload_crc": len(wire) - 2}[where]
    wire[index] ^= 0x10
    d = seg_decoder(compress=compress)
    d.feed(bytes(wire))
    with pytest.raises(RemoteProtocolError, match="CRC mismatch") as info:
        d.next_message()
    assert "CRC mismatch" in info.value.client_hint
    assert d.buffer.position == 0


def _lz4_segment(compressed: bytes, uncompressed_length: int) -> bytes:
    """A self-contained LZ4 segment around ``compressed`` as is, its header announcing
    ``uncompressed_length``; both CRCs right (what a broken peer, not a broken wire, sends)."""
    value = len(compressed) | uncompressed_length << 17 | 1 << 34
    header = value.to_bytes(5, "little") + S.crc24(value, 5).to_bytes(3, "little")
    return header + compressed + S.crc32(compressed).to_bytes(4, "little")


@pytest.mark.parametrize("case", ["garbage", "announced longer", "announced shorter"])
def test_lz4_payload_that_does_not_decompress_as_announced(case):
    """CRCs cover the compressed bytes: an LZ4 block that does not decompress to the
    announced length is refused on its own, nothing of the segment consumed."""
    import lz4.block

    frame = query(1) * 1  # one frame: the decoder's single-frame path
    block = lz4.block.compress(frame, store_size=False)
    wire = {"garbage": _lz4_segment(b"\xff" * 40, len(frame)),
            "announced longer": _lz4_segment(block, len(frame) + 5),
            "announced shorter": _lz4_segment(block, len(frame) - 5)}[case]
    # The same block with its true length decodes (so the refusal is the length's / the data's).
    assert decode_all(seg_decoder(compress=True), _lz4_segment(block, len(frame)))[0].raw == frame
    d = seg_decoder(compress=True)
    d.feed(wire)
    with pytest.raises(RemoteProtocolError, match="corrupt|uncompressed length mismatch") as info:
        d.next_message()
    assert "corrupt compressed CQL segment" in info.value.client_hint
    assert d.buffer.position == 0


@pytest.mark.parametrize("compress", [False, True])
def test_one_frame_segments_get_every_header_check(compress):
    """A segment holding exactly one frame (a driver's every request and answer): its header
    gets the same checks as a frame among others — size limit, direction, length."""
    with pytest.raises(FrameTooLarge):
        decode_all(seg_decoder(compress=compress, max_message_size=100), S.encode_segments(big_query(500), compress=compress))
    assert len(decode_all(seg_decoder(compress=compress, max_message_size=600),
                          S.encode_segments(big_query(500), compress=compress))) == 1
    with pytest.raises(F.CqlProtocolError):
        decode_all(seg_decoder("server", compress=compress), S.encode_segments(query(1), compress=compress))
    frame = query(1)
    longer = frame[:5] + (len(frame) - 9 + 1).to_bytes(4, "big") + frame[9:]  # one byte short of its length
    with pytest.raises(F.CqlProtocolError, match="crosses the end"):
        decode_all(seg_decoder(compress=compress), S.encode_segment(longer, self_contained=True, compress=compress))
    shorter = frame[:5] + (len(frame) - 9 - 1).to_bytes(4, "big") + frame[9:]  # one byte left after it
    with pytest.raises(F.CqlProtocolError, match="partial CQL frame header"):
        decode_all(seg_decoder(compress=compress), S.encode_segment(shorter, self_contained=True, compress=compress))
    wire = S.encode_segments(frame + query(2, stream=2), compress=compress) + S.encode_segments(frame, compress=compress)
    for chunk in (None, 7):  # whole (the buffer adopts the bytes), in pieces (it accumulates a bytearray)
        frames = decode_all(seg_decoder(compress=compress), wire, chunk=chunk)
        assert [(f.version, f.stream, f.opcode, f.raw) for f in frames] == [
            (5, 1, F.Opcode.QUERY, frame), (5, 2, F.Opcode.QUERY, query(2, stream=2)), (5, 1, F.Opcode.QUERY, frame)]
        assert all(type(f.raw) is bytes for f in frames)


def test_errors_do_not_pin_the_receive_buffer():
    """A caught error's traceback must not hold a view of the buffer (bytearray resize would fail)."""
    for where in (1, 10):
        wire = bytearray(S.encode_segments(query(1), compress=False))
        wire[where] ^= 0x01
        d = seg_decoder()
        d.feed(bytes(wire))
        try:
            d.next_message()
        except RemoteProtocolError as exc:
            kept = exc  # noqa: F841 - alive on purpose, as in pipeline.error
        d.feed(b"more bytes")  # BufferError if a memoryview export were still alive
        d.buffer.compact()
    d = CqlDecoder("client")
    d.feed(F.encode_ready(4, 1) + b"\x00" * 3)
    try:
        d.next_message()
    except F.CqlProtocolError as exc:
        kept = exc  # noqa: F841
    d.feed(b"more bytes")


def test_frame_crossing_a_self_contained_segment_is_refused():
    frame = query(1)
    seg = S.encode_segment(frame[:-3], self_contained=True, compress=False)
    with pytest.raises(F.CqlProtocolError):
        decode_all(seg_decoder(), seg)
    seg = S.encode_segment(frame + frame[:4], self_contained=True, compress=False)
    with pytest.raises(F.CqlProtocolError):
        decode_all(seg_decoder(), seg)


def test_self_contained_segment_inside_a_split_frame_is_refused():
    big = big_query(140_000)
    first = S.encode_segment(big[: S.MAX_PAYLOAD], self_contained=False, compress=False)
    wire = first + S.encode_segments(query(1), compress=False)
    with pytest.raises(F.CqlProtocolError):
        decode_all(seg_decoder(), wire)
    # segments of a split frame carrying more than the frame
    over = S.encode_segment(big[: S.MAX_PAYLOAD], self_contained=False, compress=False) + S.encode_segment(
        big[S.MAX_PAYLOAD:] + b"extra", self_contained=False, compress=False
    )
    with pytest.raises(F.CqlProtocolError):
        decode_all(seg_decoder(), over)


def test_oversize_frames_in_segments():
    with pytest.raises(FrameTooLarge):
        decode_all(seg_decoder(max_message_size=100), S.encode_segments(query(1) + big_query(500), compress=False))
    # a split frame is refused from its first segment, before the rest arrives
    wire = S.encode_segments(big_query(300_000), compress=False)
    d = seg_decoder(max_message_size=200_000)
    d.feed(wire[: S.MAX_PAYLOAD + 20])
    with pytest.raises(FrameTooLarge):
        d.next_message()


def test_wrong_direction_inside_segments():
    wire = S.encode_segments(F.encode_ready(5, 3), compress=False)
    with pytest.raises(F.CqlProtocolError) as info:
        decode_all(seg_decoder("client"), wire)
    assert info.value.stream == 3


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=400), compress=st.booleans())
def test_fuzz_segments_decoder(data, compress):
    d = seg_decoder(compress=compress, max_message_size=1 << 20)
    d.feed(data)
    try:
        while d.next_message() is not NEED_DATA:
            pass
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fuzz_corrupted_segment_streams(data):
    compress = data.draw(st.booleans())
    frames = query(1) + driver_frame(PrepareMessage("SELECT 1", keyspace="k"), 5, stream=2)
    wire = bytearray(S.encode_segments(frames, compress=compress))
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(wire) - 1))
        wire[i] ^= 1 << data.draw(st.integers(0, 7))
    corrupted = bytes(wire) != S.encode_segments(frames, compress=compress)
    d = seg_decoder(compress=compress)
    d.feed(bytes(wire))
    try:
        while d.next_message() is not NEED_DATA:
            pass
    except ProtocolError:
        return
    assert not corrupted, "a bit flip went unnoticed"
