"""The tee's in-place request checks (``engines.cassandra.checks``) against the audit's parsers.

A check may only accept what the parser accepts (else the proxy would
forward a request the audit cannot read); and it must accept the requests
drivers send (else it saves nothing).  Hypothesis builds EXECUTE and QUERY
bodies from every field of <query_parameters> (v3, v4, v5), then cuts and
corrupts them.
"""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from dbproxy.errors import ProtocolError
from dbproxy.engines.cassandra import protocol as F
from dbproxy.engines.cassandra.checks import parses


def _string(s: bytes) -> bytes:
    return struct.pack(">H", len(s)) + s


@st.composite
def parameters(draw, version: int) -> bytes:
    flags = draw(st.integers(0, 0x1FF if version >= 5 else 0x7F))
    out = struct.pack(">H", draw(st.integers(0, 0xFFFF)))
    out += struct.pack(">I", flags) if version >= 5 else bytes([flags])
    if flags & F.QF_VALUES:
        n = draw(st.integers(0, 4))
        out += struct.pack(">H", n)
        for _ in range(n):
            if flags & F.QF_NAMES_FOR_VALUES:
                out += _string(draw(st.sampled_from([b"k", b"v", "é".encode(), b"\xff"])))
            size = draw(st.sampled_from([-3, -2, -1, 0, 1, 4, 20]))
            out += struct.pack(">i", size) + (b"x" * size if size > 0 else b"")
    if flags & F.QF_PAGE_SIZE:
        out += struct.pack(">i", draw(st.integers(-1, 5000)))
    if flags & F.QF_PAGING_STATE:
        size = draw(st.sampled_from([-1, 0, 8]))
        out += struct.pack(">i", size) + b"p" * max(size, 0)
    if flags & F.QF_SERIAL_CONSISTENCY:
        out += struct.pack(">H", 8)
    if flags & F.QF_TIMESTAMP:
        out += struct.pack(">q", 1)
    if version >= 5 and flags & F.QF_KEYSPACE:
        out += _string(draw(st.sampled_from([b"ks", b"\xc3", b""])))
    if version >= 5 and flags & F.QF_NOW_IN_SECONDS:
        out += struct.pack(">i", 7)
    return out


@st.composite
def request(draw) -> F.Frame:
    version = draw(st.sampled_from([3, 4, 5, 6]))
    opcode = draw(st.sampled_from([F.Opcode.EXECUTE, F.Opcode.QUERY]))
    if opcode == F.Opcode.EXECUTE:
        body = _string(b"\x11" * draw(st.sampled_from([0, 16]))) + (_string(b"m" * 16) if version >= 5 else b"")
    else:
        text = draw(st.sampled_from([b"SELECT 1", "SELECT 'é'".encode(), b"\xfe", b""]))
        body = struct.pack(">i", draw(st.sampled_from([len(text), len(text) + 3, -1]))) + text
    body += draw(parameters(version))
    mutation = draw(st.sampled_from(["none", "cut", "flip", "extra"]))
    if mutation == "cut" and body:
        body = body[:draw(st.integers(0, len(body) - 1))]
    elif mutation == "flip" and body:
        i = draw(st.integers(0, len(body) - 1))
        body = body[:i] + bytes([body[i] ^ draw(st.integers(1, 255))]) + body[i + 1:]
    elif mutation == "extra":
        body += draw(st.binary(max_size=8))
    flags = F.FLAG_BETA if version == 6 else 0
    raw = F.encode_frame(version, flags, 1, opcode, body, response=False)
    return F.Frame(version, raw[1], 1, opcode, raw)


def _parser_accepts(frame: F.Frame) -> bool:
    parse = F.parse_execute if frame.opcode == F.Opcode.EXECUTE else F.parse_query
    try:
        parse(frame)
    except ProtocolError:
        return False
    return True


@settings(max_examples=3000, deadline=None)
@given(frame=request())
def test_a_check_accepts_only_what_the_parser_accepts(frame: F.Frame) -> None:
    if parses(frame):
        assert _parser_accepts(frame), frame.raw.hex()


@settings(max_examples=1000, deadline=None)
@given(frame=request())
def test_what_the_parser_accepts_whole_the_check_accepts(frame: F.Frame) -> None:
    """Not a check that refuses everything: on bodies the parser reads, it agrees (the parser
    stops at the last field it reads; so does the check)."""
    assert parses(frame) == _parser_accepts(frame), frame.raw.hex()


def test_driver_requests_are_accepted_by_the_check() -> None:
    for version in (3, 4, 5):
        q = F.encode_frame(version, 0, 2, F.Opcode.QUERY, F.query_body(version, "SELECT * FROM t", values=[b"1", None],
                                                                        page_size=100), response=False)
        assert parses(F.Frame(version, 0, 2, F.Opcode.QUERY, q))


def test_compressed_or_custom_payload_goes_to_the_parser() -> None:
    body = F.query_body(4, "SELECT 1")
    for flags in (F.FLAG_COMPRESSION, F.FLAG_CUSTOM_PAYLOAD):
        raw = bytearray(F.encode_frame(4, 0, 2, F.Opcode.QUERY, body, response=False))
        raw[1] = flags
        assert not parses(F.Frame(4, flags, 2, F.Opcode.QUERY, bytes(raw)))
