"""PROXY protocol v1/v2: the sans-IO parser on bytes, the listener config, and the core reading the
header before TLS and before an engine (real sockets, the in-process ProxyServer).

HAProxy itself sends the headers in tests/integration/test_proxy_protocol.py; here the header
bytes are the spec's (HAProxy's "The PROXY protocol" §2.1, §2.2), written by ``encode_v1/v2``
and by hand for the malformed cases.
"""

from __future__ import annotations

import socket
import ssl
import struct

import pytest
import trio
from hypothesis import given, strategies as st

from dbproxy.proxyproto import (
    SIGNATURE_V2, ProxyProtocolError, encode_v1, encode_v2, parse,
)
from dbproxy.sansio import NEED_DATA
from scripts.peers.certs import make_ca, make_cert

from .listen_support import listener, running
from .test_listener_kinds_config import _errors, _load

# -- the parser -----------------------------------------------------------------------------


def test_v1_tcp4_and_tcp6():
    h = parse(b"PROXY TCP4 192.0.2.10 198.51.100.1 56324 5432\r\nrest")
    assert (h.version, h.command, h.family, h.source, h.destination, h.length) == (
        1, "PROXY", "TCP4", ("192.0.2.10", 56324), ("198.51.100.1", 5432), 47)
    assert h.client_addr == "192.0.2.10:56324"
    h6 = parse(b"PROXY TCP6 2001:db8::1 ::1 1 65535\r\n")
    assert h6.source == ("2001:db8::1", 1) and h6.destination == ("::1", 65535)


def test_v1_unknown_keeps_the_connection_address():
    h = parse(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n")
    assert h.family == "UNKNOWN" and h.source is None and h.client_addr is None


def test_v2_tcp4_tcp6_with_tlvs():
    raw = encode_v2(("192.0.2.10", 40000), ("10.0.0.1", 22), tlvs=((0x04, b"\x00\x00"), (0x05, b"uid-1")))
    h = parse(raw + b"SSH-2.0-x")
    assert (h.version, h.command, h.family, h.client_addr, h.length) == (2, "PROXY", "TCP4", "192.0.2.10:40000",
                                                                         len(raw))
    assert h.tlvs == ((0x04, b"\x00\x00"), (0x05, b"uid-1"))
    h6 = parse(encode_v2(("2001:db8::7", 1234), ("2001:db8::8", 5432)))
    assert h6.family == "TCP6" and h6.source == ("2001:db8::7", 1234)


def test_v2_local_is_a_health_check_without_a_client():
    raw = SIGNATURE_V2 + bytes([0x20, 0x00]) + struct.pack("!H", 0)
    h = parse(raw)
    assert h.command == "LOCAL" and h.client_addr is None and h.length == 16


def test_v2_unix_addresses_carry_no_ip_client():
    raw = SIGNATURE_V2 + bytes([0x21, 0x31]) + struct.pack("!H", 216) + bytes(216)
    h = parse(raw)
    assert h.family == "UNIX" and h.client_addr is None


@pytest.mark.parametrize("raw, why", [
    (b"GET / HTTP/1.1\r\n", "does not start with a PROXY protocol header"),
    (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", "does not start with a PROXY protocol header"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "malformed PROXY v1 line"),
    (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "malformed PROXY v1 line"),
    (b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", "is not an IP address"),
    (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "is not an TCP4 address"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "is not a port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", "is not a port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "is not a port"),
    (b"PROXY TCP4 " + b"1" * 100, "longer than 107 bytes"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.\xff 1 2\r\n", "not ASCII"),
    (SIGNATURE_V2 + bytes([0x11, 0x11]) + struct.pack("!H", 12) + bytes(12), "version 1, expected 2"),
    (SIGNATURE_V2 + bytes([0x22, 0x11]) + struct.pack("!H", 12) + bytes(12), "unknown command 2"),
    (SIGNATURE_V2 + bytes([0x21, 0x41]) + struct.pack("!H", 12) + bytes(12), "unknown address family 4"),
    (SIGNATURE_V2 + bytes([0x21, 0x13]) + struct.pack("!H", 12) + bytes(12), "unknown transport 3"),
    (SIGNATURE_V2 + bytes([0x21, 0x21]) + struct.pack("!H", 12) + bytes(12), "TCP6 needs 36 address bytes"),
    (SIGNATURE_V2 + bytes([0x21, 0x11]) + struct.pack("!H", 5000), "5000 bytes of addresses and TLVs"),
    (SIGNATURE_V2 + bytes([0x21, 0x11]) + struct.pack("!H", 14) + bytes(12) + b"\x04\x00", "truncated TLV"),
    (SIGNATURE_V2 + bytes([0x21, 0x11]) + struct.pack("!H", 15) + bytes(12) + b"\x04\x00\x09", "TLV longer"),
])
def test_malformed_headers_are_refused_with_the_reason(raw, why):
    with pytest.raises(ProxyProtocolError, match=why):
        parse(raw)


_ADDR4 = st.tuples(st.ip_addresses(v=4).map(str), st.integers(0, 65535))
_ADDR6 = st.tuples(st.ip_addresses(v=6).map(str), st.integers(0, 65535))
_PAIR = st.one_of(st.tuples(_ADDR4, _ADDR4), st.tuples(_ADDR6, _ADDR6))


@given(pair=_PAIR, v2=st.booleans(), tail=st.binary(max_size=40),
       tlvs=st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=30)), max_size=3))
def test_any_header_parses_whole_and_needs_data_before(pair, v2, tail, tlvs):
    src, dst = pair
    raw = encode_v2(src, dst, tuple(tlvs)) if v2 else encode_v1(src, dst)
    data = raw + tail
    for cut in range(len(raw)):  # every prefix of the header: more is needed, never an error
        assert parse(data[:cut]) is NEED_DATA
    h = parse(data)
    assert h.length == len(raw)
    assert h.source == (str(__import__("ipaddress").ip_address(src[0])), src[1])
    if v2:
        assert list(h.tlvs) == tlvs


# -- config ---------------------------------------------------------------------------------


def test_config_trusted_networks(tmp_path):
    (lc,) = _load(tmp_path, [listener("p", "line", proxy_protocol={"trusted": ["10.0.0.0/24", "::1"],
                                                                    "timeout_seconds": 0.5})]).listeners
    pp = lc.proxy_protocol
    assert pp.timeout == 0.5
    assert pp.trusts("10.0.0.9") and pp.trusts("::1") and pp.trusts("::ffff:10.0.0.3")
    assert not pp.trusts("10.0.1.1") and not pp.trusts("127.0.0.1") and not pp.trusts("garbage")
    (plain,) = _load(tmp_path, [listener("q", "line")]).listeners
    assert plain.proxy_protocol is None


@pytest.mark.parametrize("section, expected", [
    ({}, "listeners[0].proxy_protocol: a key 'trusted'"),
    ({"trusted": []}, "listeners[0].proxy_protocol.trusted: a non-empty array"),
    ({"trusted": "10.0.0.0/8"}, "listeners[0].proxy_protocol.trusted: a non-empty array"),
    ({"trusted": ["10.0.0.0/33"]}, "listeners[0].proxy_protocol.trusted[0]: an IP network in CIDR form"),
    ({"trusted": [7]}, "listeners[0].proxy_protocol.trusted[0]: an IP network in CIDR form"),
    ({"trusted": ["::1"], "timeout_seconds": 0}, "listeners[0].proxy_protocol.timeout_seconds: a number >= 0.01"),
    ({"trusted": ["::1"], "send": True}, "listeners[0].proxy_protocol.send: no key 'send' here"),
])
def test_config_errors_name_the_path(tmp_path, section, expected):
    errors = _errors(tmp_path, [listener("p", "line", proxy_protocol=section)])
    assert any(e.startswith(expected) for e in errors), errors


def test_config_refuses_proxy_protocol_on_udp(tmp_path):
    errors = _errors(tmp_path, [listener("u", "udpecho", kind="udp", proxy_protocol={"trusted": ["127.0.0.1"]})])
    assert any("listeners[0].proxy_protocol: no \"proxy_protocol\" on a listener of kind \"udp\"" in e for e in errors)


# -- the core reads the header: tcp and tls kinds, in process --------------------------------


def _exchange(port: int, header: bytes, ctx: ssl.SSLContext | None, *, split: bool = False) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        if split:  # the header in two segments: the peek loop waits for the rest
            raw.sendall(header[:7])
            __import__("time").sleep(0.2)
            raw.sendall(header[7:])
        else:
            raw.sendall(header)
        s = ctx.wrap_socket(raw, server_hostname="localhost") if ctx else raw
        greeting = b""
        while not greeting.endswith(b"\n"):
            greeting += s.recv(100)
        s.sendall(b"ping\n")
        return greeting + s.recv(100)


async def test_header_read_before_tls_and_before_the_engine(tmp_path):
    ca = make_ca(tmp_path / "pki")
    cert, key = make_cert(tmp_path / "pki", ca, "proxy")
    tls = {"cert_file": str(cert), "key_file": str(key)}
    trusted = {"trusted": ["127.0.0.1/32"], "timeout_seconds": 1}
    lsts = [listener("t", "line", kind="tls", tls=tls, proxy_protocol=trusted),
            listener("p", "line", proxy_protocol=trusted)]
    async with running(tmp_path, lsts) as run:
        ctx = ssl.create_default_context(cafile=str(ca[0]))
        v2 = encode_v2(("198.51.100.7", 50001), ("127.0.0.1", run.ports["t"]))
        out = await trio.to_thread.run_sync(_exchange, run.ports["t"], v2, ctx)
        assert out == b"hello - tls=True\nping\n"  # the TLS handshake behind the header, intact
        v1 = encode_v1(("198.51.100.8", 50002), ("127.0.0.1", run.ports["p"]))
        out = await trio.to_thread.run_sync(lambda: _exchange(run.ports["p"], v1, None, split=True))
        assert out == b"hello - tls=False\nping\n"  # the engine's first read starts at "ping"
        # A trusted source sending no header: closed, audited, never served as that source.
        out = await trio.to_thread.run_sync(_no_header, run.ports["p"])
        assert out == b""
    starts = [e for e in run.events() if e["event"] == "db.session.start"]
    by_addr = {e["addr.remote"]: e for e in starts}
    assert by_addr["198.51.100.7:50001"]["addr.load_balancer"].startswith("127.0.0.1:")
    assert by_addr["198.51.100.8:50002"]["success"] is True
    (refused,) = [e for e in starts if e["success"] is False]
    assert refused["addr.remote"].startswith("127.0.0.1:") and "addr.load_balancer" not in refused
    assert refused["error"] == "PROXY protocol: the connection does not start with a PROXY protocol header"


def _no_header(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"ping\n")
        out = b""
        while chunk := s.recv(100):
            out += chunk
        return out
