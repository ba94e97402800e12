"""TPKT + X.224 connection PDUs on bytes: real xfreerdp Connection Requests and xrdp Connection
Confirms (``data/*.bin``, recorded by ``capture.py``), whole, at every split point and with
trailing bytes; the proxy's own PDUs; malformed input; hypothesis: the parser raises only
``X224Error`` whatever it is fed."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dbproxy.engines.rdp import x224
from dbproxy.engines.rdp.x224 import X224Decoder, X224Error
from dbproxy.sansio import NEED_DATA

DATA = Path(__file__).parent / "data"
CAPTURES = sorted(p.name for p in DATA.glob("*.bin"))


def _read(name: str) -> bytes:
    return (DATA / name).read_bytes()


def _decode_all(data: bytes, *, client: bool, cuts: list[int] | None = None):
    """Feed ``data`` in pieces (cut at ``cuts``); the message and what stays after it."""
    decoder = X224Decoder(client=client)
    cuts = sorted(set(cuts or []))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
    message = NEED_DATA
    for piece in pieces:
        decoder.feed(piece)
        if message is NEED_DATA:
            message = decoder.next_message()
    return message, decoder.rest()


def test_captures_present():
    assert {"cr_user.bin", "cr_token.bin", "cr_tls.bin", "cr_rdp.bin", "cc_user.bin", "cc_rdp.bin"} <= set(CAPTURES)


def test_xfreerdp_request_with_cookie():
    cr, rest = _decode_all(_read("cr_user.bin"), client=True)
    assert rest == b""
    assert cr.raw == _read("cr_user.bin")
    assert cr.token == b"Cookie: mstshash=dbprdp" and cr.cookie_user == "dbprdp"
    assert cr.negotiation == x224.NegotiationRequest(flags=0, requested_protocols=3)
    assert cr.negotiation.protocols == ["SSL", "HYBRID"]


def test_xfreerdp_request_with_routing_token():
    cr, _ = _decode_all(_read("cr_token.bin"), client=True)
    assert cr.token == b"dbproxy:web1" and cr.cookie_user is None
    assert cr.requested_protocols == 3


def test_xfreerdp_tls_only_and_legacy_requests():
    tls, _ = _decode_all(_read("cr_tls.bin"), client=True)
    assert tls.negotiation.protocols == ["SSL"]
    legacy, _ = _decode_all(_read("cr_rdp.bin"), client=True)
    # /sec:rdp: no RDP_NEG_REQ at all (2.2.1.1: optional), Standard RDP Security.
    assert legacy.negotiation is None and legacy.requested_protocols == 0
    assert x224.protocol_names(legacy.requested_protocols) == ["RDP"]
    assert legacy.cookie_user == "dbprdp"


def test_xrdp_confirms():
    cc, _ = _decode_all(_read("cc_user.bin"), client=False)
    assert cc.selected_protocol == 1 and x224.selected_name(cc.selected_protocol) == "SSL"
    assert cc.flags == 1 and cc.failure is None  # EXTENDED_CLIENT_DATA_SUPPORTED
    legacy, _ = _decode_all(_read("cc_rdp.bin"), client=False)
    assert legacy.selected_protocol is None and legacy.failure is None


@pytest.mark.parametrize("name", CAPTURES)
def test_every_split_point_and_trailing_bytes(name):
    data = _read(name)
    client = name.startswith("cr_")
    whole, _ = _decode_all(data, client=client)
    for cut in range(1, len(data)):
        assert _decode_all(data, client=client, cuts=[cut]) == (whole, b"")
    assert _decode_all(data, client=client, cuts=list(range(1, len(data)))) == (whole, b"")
    # Bytes after the PDU (a TLS ClientHello sent early) stay for the relay, untouched.
    trailing = b"\x16\x03\x01\x00\x05hello"
    assert _decode_all(data + trailing, client=client) == (whole, trailing)
    # Short of the last byte: still waiting.
    assert _decode_all(data[:-1], client=client)[0] is NEED_DATA


def test_request_reencoded_byte_for_byte():
    for name in ("cr_user.bin", "cr_token.bin", "cr_tls.bin", "cr_rdp.bin"):
        cr = x224.parse_connection_request(_read(name))
        assert x224.encode_connection_request(cr, cr.token) == cr.raw


def test_request_without_the_proxys_token():
    """The proxy's routing token is dropped before the request goes to the server; the rest as sent."""
    cr = x224.parse_connection_request(_read("cr_token.bin"))
    forwarded = x224.encode_connection_request(cr, None)
    again = x224.parse_connection_request(forwarded)
    assert again.token is None and again.negotiation == cr.negotiation
    assert forwarded == bytes.fromhex("030000130ee00000000000") + bytes.fromhex("0100080003000000")


def test_correlation_info_kept():
    # 2.2.1.1.2: RDP_NEG_CORRELATION_INFO after RDP_NEG_REQ with CORRELATION_INFO_PRESENT.
    info = bytes([x224.TYPE_RDP_CORRELATION_INFO, 0]) + (36).to_bytes(2, "little") + bytes(range(1, 17)) + bytes(16)
    base = x224.parse_connection_request(_read("cr_user.bin"))
    cr_bytes = x224.encode_connection_request(
        x224.ConnectionRequest(raw=b"", src_ref=0, class_option=0, token=base.token,
                               negotiation=x224.NegotiationRequest(x224.CORRELATION_INFO_PRESENT, 0x0B), tail=info),
        base.token)
    cr = x224.parse_connection_request(cr_bytes)
    assert cr.tail == info and cr.negotiation.protocols == ["SSL", "HYBRID", "HYBRID_EX"]


def test_proxy_pdus():
    dr = x224.encode_disconnect_request()
    assert dr == bytes.fromhex("0300000b06800000000000")
    failure = x224.encode_negotiation_failure(5)
    cc = x224.parse_connection_confirm(failure)
    assert cc.failure == "HYBRID_REQUIRED_BY_SERVER" and cc.selected_protocol is None
    rsp = x224.parse_connection_confirm(x224.encode_connection_confirm(selected_protocol=2, flags=1))
    assert rsp.selected_protocol == 2 and x224.selected_name(2) == "HYBRID"
    assert x224.protocol_names(0x21) == ["SSL", "0x20"]


def _cr(variable: bytes, *, code: int = 0xE0, dst: int = 0, cls: int = 0) -> bytes:
    x = bytes([6 + len(variable), code]) + dst.to_bytes(2, "big") + b"\x00\x00" + bytes([cls]) + variable
    return b"\x03\x00" + (4 + len(x)).to_bytes(2, "big") + x


MALFORMED = {
    "tls-hello": (bytes.fromhex("160301020001000000"), "not a TPKT"),
    "tpkt-version": (b"\x02\x00\x00\x0b\x06\xe0\x00\x00\x00\x00\x00", "not a TPKT"),
    "tpkt-short": (b"\x03\x00\x00\x05\x00", "shorter than an X.224"),
    "li-mismatch": (b"\x03\x00\x00\x0b\x07\xe0\x00\x00\x00\x00\x00", "length indicator"),
    "confirm-as-request": (_cr(b"", code=0xD0), "expected an X.224 Connection Request"),
    "dst-ref": (_cr(b"", dst=7), "DST-REF"),
    "class-2": (_cr(b"", cls=0x20), "class 2"),
    "cookie-no-crlf": (_cr(b"Cookie: mstshash=bob"), "CR LF"),
    "neg-short": (_cr(b"Cookie: mstshash=bob\r\n\x01\x00\x08"), "stray bytes"),
    "neg-type": (_cr(b"\x02\x00\x08\x00\x01\x00\x00\x00"), "routing token or cookie without"),
    "neg-length": (_cr(b"Cookie: a\r\n\x01\x00\x09\x00\x01\x00\x00\x00"), "expected RDP_NEG_REQ"),
    "neg-trailing": (_cr(b"\x01\x00\x08\x00\x01\x00\x00\x00xyz"), "unexpected bytes after RDP_NEG_REQ"),
    "correlation-missing": (_cr(b"\x01\x08\x08\x00\x01\x00\x00\x00"), "CORRELATION_INFO_PRESENT"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_request(name):
    data, expected = MALFORMED[name]
    with pytest.raises(X224Error, match=expected) as info:
        decoder = X224Decoder(client=True)
        decoder.feed(data)
        decoder.next_message()
    assert info.value.client_hint.startswith("malformed RDP connection request")
    # The same error byte by byte (the first byte decides a TLS hello at once).
    decoder = X224Decoder(client=True)
    with pytest.raises(X224Error, match=expected):
        for b in data:
            decoder.feed(bytes([b]))
            if decoder.next_message() is not NEED_DATA:
                break
        else:
            raise AssertionError("no error on the whole input")


def test_oversized_tpkt_refused_before_its_body():
    decoder = X224Decoder(client=True, max_size=4096)
    decoder.feed(b"\x03\x00\x20\x00")
    with pytest.raises(X224Error, match="exceeds the 4096 bytes"):
        decoder.next_message()


def test_malformed_confirms():
    with pytest.raises(X224Error, match="expected an X.224 Connection Confirm"):
        x224.parse_connection_confirm(_read("cr_user.bin"))
    bad = bytearray(_read("cc_user.bin"))
    bad[11] = 9  # negotiation type 9
    with pytest.raises(X224Error, match="type 9"):
        x224.parse_connection_confirm(bytes(bad))
    with pytest.raises(X224Error, match="bytes of negotiation data"):
        x224.parse_connection_confirm(_read("cc_user.bin")[:-1].replace(b"\x03\x00\x00\x13\x0e", b"\x03\x00\x00\x12\x0d"))


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=120), st.booleans(), st.lists(st.integers(1, 119), max_size=4))
def test_fuzz_raises_only_its_own_error(data, client, cuts):
    try:
        _decode_all(data, client=client, cuts=[c for c in cuts if c < len(data)])
    except X224Error:
        pass


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(CAPTURES), st.integers(0, 60), st.integers(0, 255))
def test_fuzz_corrupted_captures(name, position, value):
    data = bytearray(_read(name))
    data[position % len(data)] = value
    try:
        _decode_all(bytes(data), client=name.startswith("cr_"))
    except X224Error:
        pass
