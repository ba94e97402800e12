"""The CQL decoder's fast paths against the checks they stand for.

Inside v5 segments the decoder checks a frame header with one set look-up
(``codec._GOOD_*_HEADERS``) and calls ``frames.check_header`` only for what
that set does not hold; segment headers' CRC24 is remembered
(``segments.crc24_of_header``); the tee reads envelopes (``next_envelope``)
and checks request bodies through ``checks.envelope_parses``.  Hypothesis
holds each to the full check: the same frames, the same errors (type,
message, stream, version), in the same order as ``check_header`` and the
size limit raise them.
"""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from dbproxy.sansio import NEED_DATA
from dbproxy.engines.cassandra import protocol as F
from dbproxy.engines.cassandra import segments as S
from dbproxy.engines.cassandra.checks import envelope_parses, parses
from dbproxy.engines.cassandra.codec import CqlDecoder
from tests.unit.cassandra.test_cql_checks import request


def _outcome_of_error(exc: Exception) -> tuple:
    return type(exc), str(exc), getattr(exc, "stream", None), getattr(exc, "version", None)


def _reference(first: int, flags: int, stream: int, opcode: int, length: int, from_client: bool, limit: int):
    """What the full checks say of a header: the error, or None."""
    version = first & F.VERSION_MASK
    try:
        F.check_header(first, version, flags, stream, opcode, from_client=from_client)
        if length > limit:
            raise F.frame_too_large(length, limit, stream=stream, version=version)
    except Exception as exc:  # noqa: BLE001 - compared as data
        return _outcome_of_error(exc)
    return None


@settings(max_examples=3000, deadline=None)
@given(first=st.integers(0, 255) | st.sampled_from([3, 4, 5, 6, 0x83, 0x84, 0x85, 0x86]),
       flags=st.integers(0, 255), stream=st.integers(-32768, 32767),
       opcode=st.integers(0, 255) | st.sampled_from(list(F.Opcode)),
       length=st.integers(0, 80), limit=st.integers(0, 60), client=st.booleans(), compress=st.booleans())
def test_segment_frame_header_check_is_check_header(first, flags, stream, opcode, length, limit, client, compress):
    decoder = CqlDecoder("client" if client else "server", max_message_size=limit)
    decoder.set_framing("segments", "lz4" if compress else None)
    frame = struct.pack(">BBhBI", first, flags, stream, opcode, length) + b"x" * length
    decoder.feed(S.encode_segment(frame, self_contained=True, compress=compress))
    expected = _reference(first, flags, stream, opcode, length, client, limit)
    try:
        got = decoder.next_message()
    except Exception as exc:  # noqa: BLE001
        assert _outcome_of_error(exc) == expected
        return
    assert expected is None
    assert got == F.Frame(first & F.VERSION_MASK, flags, stream, opcode, frame, F.HEADER_SIZE, None)
    assert decoder.next_message() is NEED_DATA


@settings(max_examples=2000)
@given(nbytes=st.sampled_from([3, 5]), value=st.integers(0, 2**40 - 1))
def test_remembered_crc24_is_crc24(nbytes, value):
    value &= (1 << (8 * nbytes)) - 1
    assert S.crc24_of_header(value, nbytes) == S.crc24(value, nbytes)
    assert S.crc24_of_header(value, nbytes) == S.crc24(value, nbytes)  # now from the table


def test_remembered_crc24_table_is_bounded():
    for value in range(S.CRC24_SEEN_MAX + 10):
        assert S.crc24_of_header(value, 5) == S.crc24(value, 5)
    assert len(S.CRC24_SEEN) <= S.CRC24_SEEN_MAX


@settings(max_examples=300, deadline=None)
@given(payload=st.binary(max_size=300), compress=st.booleans())
def test_header_fields_are_the_segment_header(payload, compress):
    seg = S.encode_segment(payload, self_contained=True, compress=compress)
    header = S.parse_segment_header(seg, compress)
    assert S.parse_header_fields(seg, compress) == (header.payload_length, header.uncompressed_length,
                                                   header.self_contained, header.header_size)
    assert bytes(S.decode_segment(seg, header.header_size, header.payload_length, header.uncompressed_length)) == payload


@settings(max_examples=500, deadline=None)
@given(frame=request())
def test_envelope_parses_is_parses(frame):
    assert envelope_parses(frame.opcode, frame.flags, frame.raw, frame.body_offset, frame.version) == parses(frame)


@settings(max_examples=200, deadline=None)
@given(bodies=st.lists(st.binary(max_size=200), min_size=1, max_size=6), compress=st.booleans())
def test_next_envelope_is_next_message(bodies, compress):
    wire = S.encode_segments(b"".join(F.encode_frame(5, 0, i, F.Opcode.RESULT, b, response=True)
                                      for i, b in enumerate(bodies)), compress=compress)
    decoders = [CqlDecoder("server"), CqlDecoder("server")]
    for d in decoders:
        d.set_framing("segments", "lz4" if compress else None)
        d.feed(wire)
    while True:
        envelope = decoders[0].next_envelope()
        frame = decoders[1].next_message()
        if frame is NEED_DATA:
            assert envelope is NEED_DATA
            break
        assert F.Frame(*envelope) == frame


@given(value=st.integers(-(2**15), 2**16) | st.none())
def test_consistency_name_is_the_enum_name(value):
    from dbproxy.engines.cassandra.values import consistency_name

    if value is None:
        expected = None
    else:
        try:
            expected = F.Consistency(value).name
        except ValueError:
            expected = str(value)
    assert consistency_name(value) == expected
