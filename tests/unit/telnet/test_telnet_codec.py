"""The Telnet codec (engines/telnet/codec.py) on literal bytes: whole, byte by byte, any split (hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dbproxy.engines.telnet import codec as t
from dbproxy.engines.telnet.codec import Command, Data, OptionChanged, Subnegotiation, TelnetProtocol
from dbproxy.errors import FrameTooLarge


def run(chunks, **kw) -> tuple[list, bytes]:
    """Feed ``chunks``; (events with adjacent Data merged, the answers to send)."""
    p = TelnetProtocol(**kw)
    out: list = []
    sent = b""
    for chunk in chunks:
        p.feed(chunk)
        out += p.events()
        sent += p.data_to_send()
    merged: list = []
    for e in out:
        if isinstance(e, Data) and merged and isinstance(merged[-1], Data):
            merged[-1] = Data(merged[-1].data + e.data)
        else:
            merged.append(e)
    return merged, sent


def splits(data: bytes) -> list[list[bytes]]:
    return [[data], [data[i:i + 1] for i in range(len(data))], [data[:3], data[3:]]]


SERVER_HELLO = (b"\xff\xfb%\xff\xfb&\xff\xfd\x18\xff\xfd \xff\xfd#\xff\xfd'\xff\xfd$"  # what inetutils telnetd sends
                b"\xff\xfa\x18\x01\xff\xf0")


@pytest.mark.parametrize("chunks", splits(SERVER_HELLO))
def test_inetutils_telnetd_hello_refused_but_ttype(chunks):
    events, sent = run(chunks, accept_local={t.TTYPE, t.NAWS}, accept_remote={t.ECHO, t.SGA})
    # AUTHENTICATION and ENCRYPT offered (WILL): DONT; TTYPE asked (DO): WILL; the rest: WONT.
    assert sent == b"\xff\xfe%\xff\xfe&\xff\xfb\x18\xff\xfc \xff\xfc#\xff\xfc'\xff\xfc$"
    assert events == [OptionChanged("local", t.TTYPE, True), Subnegotiation(t.TTYPE, b"\x01")]


@pytest.mark.parametrize("chunks", splits(b"ab\xff\xffc\r\x00d\r\ne\xff\xf4f\xff\xf1"))
def test_data_iac_escape_newlines_and_commands(chunks):
    events, sent = run(chunks)
    assert events == [Data(b"ab\xffc\rd\r\ne"), Command(t.IP), Data(b"f"), Command(t.NOP)]
    assert sent == b""


@pytest.mark.parametrize("chunks", splits(b"ls\r\nx\r\x00"))
def test_enter_side_takes_cr_lf_and_cr_nul_as_one_enter(chunks):
    events, _ = run(chunks, enter=True)
    assert events == [Data(b"ls\rx\r")]


@pytest.mark.parametrize("chunks", splits(b"\xff\xfa\x1f\x00\xff\xff\x00\x18\xff\xf0tail"))
def test_naws_subnegotiation_with_an_escaped_255(chunks):
    events, _ = run(chunks)
    assert events == [Subnegotiation(t.NAWS, b"\x00\xff\x00\x18"), Data(b"tail")]
    assert t.parse_naws(events[0].payload) == (255, 24)


def test_trailing_partial_command_waits():
    p = TelnetProtocol()
    p.feed(b"x\xff")
    assert p.events() == [Data(b"x")]
    assert not p.idle
    p.feed(b"\xf4")
    assert p.events() == [Command(t.IP)] and p.idle


def test_subnegotiation_cap():
    p = TelnetProtocol(max_subnegotiation=8)
    with pytest.raises(FrameTooLarge):
        p.feed(b"\xff\xfa\x18" + b"a" * 9)


def test_subnegotiation_missing_se_ends_at_the_next_command():
    events, _ = run([b"\xff\xfa\x18\x00vt100\xff\xf4x"])
    assert events == [Subnegotiation(t.TTYPE, b"\x00vt100"), Command(t.IP), Data(b"x")]


def test_encode_data_escapes_iac_and_bare_cr():
    assert TelnetProtocol.encode_data(b"plain") == b"plain"
    assert TelnetProtocol.encode_data(b"a\xffb\rc\r\n\r") == b"a\xff\xffb\r\x00c\r\n\r\x00"
    assert TelnetProtocol.encode_subnegotiation(t.NAWS, t.naws_payload(255, 24)) == b"\xff\xfa\x1f\x00\xff\xff\x00\x18\xff\xf0"
    assert t.ttype_is("xterm-256color") == b"\xff\xfa\x18\x00xterm-256color\xff\xf0"


# -- RFC 1143 Q method ---------------------------------------------------------------------------


def test_our_request_accepted_once_and_no_loop():
    p = TelnetProtocol(accept_local={t.ECHO})
    p.request_local(t.ECHO, True)
    assert p.data_to_send() == b"\xff\xfb\x01" and p.state("local", t.ECHO) == t.WANTYES
    p.feed(b"\xff\xfd\x01")  # DO ECHO answers our WILL: no reply (that would loop)
    assert p.data_to_send() == b"" and p.local_enabled(t.ECHO)
    assert p.events() == [OptionChanged("local", t.ECHO, True)]
    p.feed(b"\xff\xfd\x01")  # a repeated DO while YES: ignored
    assert p.data_to_send() == b"" and p.events() == []


def test_refused_request_settles_to_no():
    p = TelnetProtocol()
    p.request_remote(t.NAWS, True)
    assert p.data_to_send() == b"\xff\xfd\x1f"
    p.feed(b"\xff\xfc\x1f")  # WONT NAWS
    assert p.data_to_send() == b"" and not p.remote_enabled(t.NAWS) and p.state("remote", t.NAWS) == t.NO


def test_peer_disables_an_enabled_option():
    p = TelnetProtocol(accept_remote={t.SGA})
    p.feed(b"\xff\xfb\x03")
    assert p.data_to_send() == b"\xff\xfd\x03" and p.remote_enabled(t.SGA)
    p.feed(b"\xff\xfc\x03")
    assert p.data_to_send() == b"\xff\xfe\x03" and not p.remote_enabled(t.SGA)
    assert p.events() == [OptionChanged("remote", t.SGA, True), OptionChanged("remote", t.SGA, False)]


def test_queue_bit_request_while_negotiating():
    """We ask DO, then change our mind before the answer: the queue bit sends DONT after the WILL arrives."""
    p = TelnetProtocol(accept_remote={t.ECHO})
    p.request_remote(t.ECHO, True)
    p.request_remote(t.ECHO, False)
    assert p.data_to_send() == b"\xff\xfd\x01"
    p.feed(b"\xff\xfb\x01")
    assert p.data_to_send() == b"\xff\xfe\x01" and p.state("remote", t.ECHO) == t.WANTNO
    p.feed(b"\xff\xfc\x01")
    assert p.data_to_send() == b"" and p.state("remote", t.ECHO) == t.NO


def test_disable_then_reenable_queued():
    p = TelnetProtocol(accept_local={t.ECHO})
    p.feed(b"\xff\xfd\x01")
    assert p.data_to_send() == b"\xff\xfb\x01"
    p.request_local(t.ECHO, False)
    p.request_local(t.ECHO, True)
    assert p.data_to_send() == b"\xff\xfc\x01"
    p.feed(b"\xff\xfe\x01")  # DONT acknowledges our WONT, the queued WILL goes out
    assert p.data_to_send() == b"\xff\xfb\x01" and p.state("local", t.ECHO) == t.WANTYES


# -- any split ---------------------------------------------------------------------------------

_pieces = st.sampled_from([b"a", b"bc", b"\r", b"\n", b"\x00", b"\xff\xff", b"\xff\xf4", b"\xff\xf1",
                           b"\xff\xfd\x18", b"\xff\xfb\x01", b"\xff\xfe\x03", b"\xff\xfa\x1f\x00P\x00\x18\xff\xf0",
                           b"\xff\xfa\x18\x00xterm\xff\xf0", b"\xff\xfa\x18\x01\xff\xf0", b"\xe2\x82\xac"])


@settings(max_examples=300, deadline=None)
@given(st.lists(_pieces, max_size=30), st.data(), st.booleans())
def test_same_events_however_split(pieces, data, enter):
    whole = b"".join(pieces)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(whole)), max_size=8)))
    chunks = [whole[a:b] for a, b in zip([0, *cuts], [*cuts, len(whole)])]
    kw = dict(accept_local={t.TTYPE}, accept_remote={t.ECHO}, enter=enter)
    assert run(chunks, **kw) == run([whole], **kw)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_encoded_data_decodes_to_itself(data):
    """Data the proxy sends decodes back to the same bytes (bare CR as CR NUL, CR LF kept)."""
    events, _ = run([TelnetProtocol.encode_data(data)])
    assert b"".join(e.data for e in events) == data
