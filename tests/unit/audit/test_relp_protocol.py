"""The RELP codec (audit/sinks/relp_protocol.py): frames whole, byte by byte, at any split, and broken ones.

Byte strings are as librelp 1.11 (rsyslog-relp, Debian 12) put them on the wire (captured):
the open answer carries the server's offers after ``200 OK``.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dbproxy.audit.sinks.relp_protocol import (
    MAX_TXNR, Frame, RelpClient, RelpDecoder, encode_frame, parse_response,
)
from dbproxy.errors import FrameTooLarge, LocalProtocolError, RemoteProtocolError
from dbproxy.sansio import NEED_DATA

OPEN_RSP = b"1 rsp 93 200 OK\nrelp_version=0\nrelp_software=librelp,1.11.0,http://librelp.adiscon.com\ncommands=syslog\n"


def frames_of(decoder: RelpDecoder) -> list[Frame]:
    out = []
    while (f := decoder.next_frame()) is not NEED_DATA:
        out.append(f)
    return out


def test_encode_frames():
    assert encode_frame(1, "open", b"relp_version=0") == b"1 open 14 relp_version=0\n"
    assert encode_frame(7, "close") == b"7 close 0\n"
    assert encode_frame(2, "syslog", b"<13>1 - h a - - - x") == b"2 syslog 19 <13>1 - h a - - - x\n"
    with pytest.raises(LocalProtocolError):
        encode_frame(MAX_TXNR + 1, "syslog", b"x")
    with pytest.raises(LocalProtocolError):
        encode_frame(1, "sys log", b"x")


def test_decode_whole_byte_by_byte_and_with_trailing_bytes():
    wire = OPEN_RSP + b"2 rsp 6 200 OK\n3 rsp 0\n0 serverclose 0\n"  # open, syslog, close: rsyslog 8.2302
    expected = [
        Frame(1, "rsp", OPEN_RSP[len(b"1 rsp 93 "):-1]),
        Frame(2, "rsp", b"200 OK"),
        Frame(3, "rsp", b""),
        Frame(0, "serverclose", b""),
    ]
    d = RelpDecoder()
    d.feed(wire)
    assert frames_of(d) == expected
    d = RelpDecoder()
    got = []
    for i in range(len(wire)):
        d.feed(wire[i : i + 1])
        got += frames_of(d)
    assert got == expected
    d = RelpDecoder()
    d.feed(wire + b"4 rsp 6 20")
    assert frames_of(d) == expected and d.buffered == len(b"4 rsp 6 20")


def test_data_may_hold_lf_and_the_datalen_decides():
    msg = b"line one\nline two\n"
    d = RelpDecoder()
    d.feed(encode_frame(5, "syslog", msg))
    assert d.next_frame() == Frame(5, "syslog", msg)


@pytest.mark.parametrize(
    "wire, what",
    [
        (b"1 rsp 6 200 OKX", "trailer"),  # DATALEN one short: the byte after DATA is not LF
        (b"x rsp 0\n", "TXNR"),
        (b"1234567890 rsp 0\n", "TXNR"),
        (b"1 r5p 0\n", "command"),
        (b"1 " + b"a" * 33 + b" 0\n", "command"),
        (b"1 rsp 0 \n", "LF"),
        (b"1 rsp\n", "after its command"),
        (b"1\n", "after its TXNR"),
        (b"1 rsp 6\n200 OK\n", "SP"),
        (b" rsp 0\n", "empty"),
    ],
)
def test_malformed_frames_raise(wire, what):
    d = RelpDecoder()
    d.feed(wire)
    with pytest.raises(RemoteProtocolError, match=what):
        d.next_frame()


def test_oversized_datalen_refused_before_buffering():
    d = RelpDecoder(max_data=100)
    d.feed(b"1 syslog 101 ")
    with pytest.raises(FrameTooLarge):
        d.next_frame()


def test_incomplete_headers_need_data_and_garbage_fails_early():
    for partial in (b"", b"1", b"12 ", b"12 sys", b"12 syslog ", b"12 syslog 5", b"12 syslog 5 abc"):
        d = RelpDecoder()
        d.feed(partial)
        assert d.next_frame() is NEED_DATA, partial
    d = RelpDecoder()
    d.feed(b"GET / HTTP/1.1")  # not RELP at all: fails on the first token, without waiting for more
    with pytest.raises(RemoteProtocolError):
        d.next_frame()


_commands = st.sampled_from(["rsp", "syslog", "open", "close", "serverclose"])
_frames = st.lists(st.tuples(st.integers(0, MAX_TXNR), _commands, st.binary(max_size=300)), min_size=1, max_size=8)


@settings(max_examples=300, deadline=None)
@given(frames=_frames, cuts=st.lists(st.integers(0, 4000), max_size=12))
def test_any_split_gives_the_same_frames(frames, cuts):
    wire = b"".join(encode_frame(t, c, data) for t, c, data in frames)
    expected = [Frame(t, c, data) for t, c, data in frames]
    points = sorted({c % (len(wire) + 1) for c in cuts} | {0, len(wire)})
    d = RelpDecoder()
    got = []
    for a, b in zip(points, points[1:]):
        d.feed(wire[a:b])
        got += frames_of(d)
    assert got == expected
    assert d.buffered == 0


@settings(max_examples=200, deadline=None)
@given(junk=st.binary(min_size=1, max_size=60))
def test_random_bytes_never_crash_the_decoder(junk):
    d = RelpDecoder(max_data=1000)
    d.feed(junk)
    try:
        while d.next_frame() is not NEED_DATA:
            pass
    except RemoteProtocolError:
        pass


def test_parse_response():
    r = parse_response(b"200 OK\nrelp_version=0\ncommands=syslog")
    assert r.ok and r.code == 200 and r.text == "OK" and r.extra == b"relp_version=0\ncommands=syslog"
    assert parse_response(b"500 not accepted").code == 500
    with pytest.raises(RemoteProtocolError):
        parse_response(b"")


def test_client_session_open_pipelined_acks_and_refusals():
    c = RelpClient()
    opened = c.open()
    assert opened == encode_frame(1, "open", b"relp_version=0\nrelp_software=dbproxy\ncommands=syslog")
    sent = [c.send(b"m%d" % i) for i in range(3)]
    assert [t for t, _ in sent] == [2, 3, 4] and sent[0][1] == b"2 syslog 2 m0\n"
    assert c.unacknowledged == 3
    # The open answer and the first ack arrive in one read, the rest split mid-frame.
    assert c.receive_data(OPEN_RSP + b"2 rsp 6 200 OK\n3 rsp 6 2") == [2]
    assert c.opened
    assert c.receive_data(b"00 OK\n") == [3]
    assert c.unacknowledged == 1
    with pytest.raises(RemoteProtocolError, match="refused syslog"):
        c.receive_data(encode_frame(4, "rsp", b"500 message too large"))


def test_client_rejects_answers_to_nothing_and_serverclose():
    c = RelpClient()
    c.open()
    c.receive_data(OPEN_RSP)
    with pytest.raises(RemoteProtocolError, match="no command outstanding"):
        c.receive_data(b"9 rsp 6 200 OK\n")
    c = RelpClient()
    c.open()
    c.receive_data(OPEN_RSP)
    c.send(b"x")
    with pytest.raises(RemoteProtocolError, match="serverclose"):
        c.receive_data(b"0 serverclose 0\n")


def test_txnr_wraps_to_one():
    c = RelpClient()
    c.open()
    c._next = MAX_TXNR
    assert c.send(b"a")[0] == MAX_TXNR
    assert c.send(b"b")[0] == 1


def test_codec_does_not_load_trio():
    probe = "import sys, dbproxy.audit.sinks.relp_protocol; print('trio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
