"""The RMCP+ codec (engines/ipmi/rmcp.py, rakp.py) on bytes: round trips in both roles, RAKP vectors
from real exchanges, malformed and replayed packets, the sequence window, and a Hypothesis fuzz that the
decoders raise nothing but ``IpmiError``.

Vectors: ``tests/data/ipmi/ipmitool_ipmisim_suite3.json`` is ipmitool 1.8.19 (``-C 3``) talking to
OpenIPMI's ipmi_sim, captured by a UDP relay: our code in the console role must compute what ipmitool
computed, and in the BMC role what ipmi_sim computed.  ``ipmitool_suite17_via_proxy.json`` is ipmitool
``-C 17`` talking to the proxy (ipmi_sim has no SHA-256 suite): ipmitool accepted the proxy's RAKP 2/4,
and its own RAKP 1/3 and session packets must verify with our code.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from dbproxy.engines.ipmi import rakp, rmcp
from dbproxy.engines.ipmi.rakp import (SUITE_3, SUITE_17, BmcHandshake, ConsoleHandshake, HandshakeFailed,
                                       OpenSessionRequest, OpenSessionResponse, Rakp1, Rakp2, Rakp3, Rakp4)
from dbproxy.engines.ipmi.rmcp import IpmiError, Request, Response, SequenceWindow

DATA = Path(__file__).resolve().parents[2] / "data" / "ipmi"


def establish(suite, password=b"s3cret-code", client_password=None, guid=b"G" * 16):
    bmc = BmcHandshake(guid)
    con = ConsoleHandshake(suite, b"alice", client_password if client_password is not None else password)
    resp = bmc.open_session(con.open_session_request())
    bmc.rakp1(con.rakp1(resp))
    rakp3 = con.rakp3(bmc.rakp2(password))
    bmc.rakp3(rakp3)
    keys = con.finish(bmc.rakp4())
    return bmc, con, keys


@pytest.mark.parametrize("suite", [SUITE_3, SUITE_17])
def test_handshake_both_roles_agree_on_keys(suite):
    bmc, con, keys = establish(suite)
    assert (bmc.keys.k1, bmc.keys.k2) == (keys.k1, keys.k2)
    assert len(keys.k1) == (20 if suite is SUITE_3 else 32)
    assert bmc.bmc_sid == con.bmc_sid and bmc.console_sid == con.console_sid
    # a packet each way: sealed by one role, opened by the other (integrity + AES-CBC-128)
    for sender, receiver, sid in ((keys, bmc.keys, con.bmc_sid), (bmc.keys, keys, con.console_sid)):
        wire = sender.seal(rmcp.PT_IPMI, b"\x20\x18\xc8\x81\x04\x01\x7a", session_id=sid, seq=1)
        pkt = rmcp.parse(wire, auth_code_size=suite.integrity.size)
        assert pkt.encrypted and pkt.authenticated and pkt.session_id == sid
        assert (len(wire) - 4 - suite.integrity.size) % 4 == 0  # the integrity pad (§13.6)
        assert receiver.open(pkt) == b"\x20\x18\xc8\x81\x04\x01\x7a"


@pytest.mark.parametrize("suite", [SUITE_3, SUITE_17])
def test_wrong_password_fails_in_both_roles(suite):
    # the console checks RAKP 2 with its password: a BMC keyed with another one is caught there
    bmc = BmcHandshake(b"G" * 16)
    con = ConsoleHandshake(suite, b"alice", b"right")
    bmc.rakp1(con.rakp1(bmc.open_session(con.open_session_request())))
    with pytest.raises(HandshakeFailed) as exc:
        con.rakp3(bmc.rakp2(b"wrong"))
    assert exc.value.status == rakp.STATUS_INVALID_INTEGRITY_CHECK
    # the BMC checks RAKP 3: a client that forged RAKP 3 without the password is refused with 0Fh
    bmc = BmcHandshake(b"G" * 16)
    con = ConsoleHandshake(suite, b"alice", b"right")
    bmc.rakp1(con.rakp1(bmc.open_session(con.open_session_request())))
    con.rakp3(bmc.rakp2(b"right"))
    forged = Rakp3(con.tag, 0, con.bmc_sid, os.urandom(suite.auth_code_size)).encode()
    with pytest.raises(HandshakeFailed) as exc:
        bmc.rakp3(forged)
    assert exc.value.status == rakp.STATUS_INVALID_INTEGRITY_CHECK
    assert Rakp4.decode(bmc.rakp4(exc.value.status)).status == 0x0F


def test_unknown_user_gets_unauthorized_name_and_suites_are_checked():
    bmc = BmcHandshake(b"G" * 16)
    con = ConsoleHandshake(SUITE_3, b"nobody", b"x")
    bmc.rakp1(con.rakp1(bmc.open_session(con.open_session_request())))
    assert Rakp2.decode(bmc.rakp2(None)).status == rakp.STATUS_UNAUTHORIZED_NAME
    with pytest.raises(HandshakeFailed) as exc:
        con.rakp3(bmc.rakp2(None))
    assert exc.value.status == 0x0D
    # a proposal of no supported suite (RAKP-none / no integrity): "no cipher suite match"
    weak = OpenSessionRequest(1, 4, 0x1234, 0x00, 0x00, 0x00).encode()
    assert OpenSessionResponse.decode(BmcHandshake(b"G" * 16).open_session(weak)).status == 0x11
    only17 = BmcHandshake(b"G" * 16, suites=(17,))
    suite3 = OpenSessionRequest(1, 4, 0x1234, 1, 1, 1).encode()
    assert OpenSessionResponse.decode(only17.open_session(suite3)).status == 0x11


def test_message_round_trips_and_checksums():
    req = Request(0x00, 0x02, b"\x01", rq_seq=17, rs_lun=0)
    wire = req.encode()
    assert Request.decode(wire) == req
    resp = req.response(0xD4)
    assert Response.decode(resp.encode()) == resp and resp.netfn == 0x01 and resp.rq_seq == 17
    bad = bytearray(wire)
    bad[-1] ^= 1
    with pytest.raises(IpmiError, match="checksum"):
        Request.decode(bytes(bad))
    with pytest.raises(IpmiError):
        Request.decode(resp.encode())  # a response netFn is no request
    with pytest.raises(IpmiError):
        Response.decode(wire)


def test_asf_ping_pong_and_v15_packets():
    ping = rmcp.asf_ping(7)
    assert rmcp.parse(ping) == rmcp.AsfPing(7)
    pong = rmcp.asf_pong(7)
    assert pong[:4] == b"\x06\x00\xff\x06" and pong[8] == 0x40 and pong[9] == 7 and pong[11] == 16
    msg = Request(0x06, 0x38, b"\x8e\x04").encode()
    pkt = rmcp.parse(rmcp.packet15(msg))
    assert isinstance(pkt, rmcp.Packet15) and pkt.message == msg and pkt.session_id == 0


def load(name):
    doc = json.loads((DATA / name).read_text())
    return doc, [(d, bytes.fromhex(h)) for d, h in doc["datagrams"]]


def setup_payloads(datagrams):
    """The session setup payloads of a capture, by payload type."""
    out = {}
    for _, data in datagrams:
        pkt = rmcp.parse(data)
        if isinstance(pkt, rmcp.Packet20) and not pkt.authenticated:
            out[pkt.payload_type] = pkt.payload
    return out


@pytest.mark.parametrize("name", ["ipmitool_ipmisim_suite3.json", "ipmitool_suite17_via_proxy.json"])
def test_rakp_vectors_from_real_exchanges(name):
    doc, datagrams = load(name)
    suite = rakp.SUITES[doc["suite"]]
    password, username = doc["password"].encode(), doc["username"].encode()
    p = setup_payloads(datagrams)
    osreq = OpenSessionRequest.decode(p[rmcp.PT_OPEN_SESSION_REQUEST])
    osresp = OpenSessionResponse.decode(p[rmcp.PT_OPEN_SESSION_RESPONSE])
    assert (osreq.auth, osreq.integrity, osreq.confidentiality) == (suite.auth, suite.integrity.number, 1)
    assert osresp.status == 0 and osresp.console_sid == osreq.console_sid
    r1, r2 = Rakp1.decode(p[rmcp.PT_RAKP1]), Rakp2.decode(p[rmcp.PT_RAKP2])
    r3, r4 = Rakp3.decode(p[rmcp.PT_RAKP3]), Rakp4.decode(p[rmcp.PT_RAKP4])
    assert r1.username == username and r2.status == r4.status == 0
    kuid = rakp.kuid(password)
    # the BMC role's computations reproduce what the real BMC (ipmi_sim / the proxy) sent
    assert rakp.rakp2_auth_code(suite, kuid, osreq.console_sid, osresp.bmc_sid, r1.console_random,
                                r2.bmc_random, r2.bmc_guid, r1.role, username) == r2.auth_code
    sik = rakp.sik(suite, kuid, r1.console_random, r2.bmc_random, r1.role, username)
    assert rakp.rakp4_icv(suite, sik, r1.console_random, osresp.bmc_sid, r2.bmc_guid) == r4.icv
    # the console role's computation reproduces what ipmitool sent in RAKP 3
    assert rakp.rakp3_auth_code(suite, kuid, r2.bmc_random, osreq.console_sid, r1.role, username) == r3.auth_code
    # and the session's keys open every packet of the session, both ways, in order
    keys = rakp.session_keys(suite, sik)
    windows = {"c2b": SequenceWindow(), "b2c": SequenceWindow()}
    opened = []
    for direction, data in datagrams:
        pkt = rmcp.parse(data, auth_code_size=suite.integrity.size)
        if isinstance(pkt, rmcp.Packet20) and pkt.authenticated:
            assert pkt.session_id == (osresp.bmc_sid if direction == "c2b" else osreq.console_sid)
            assert windows[direction].accept(pkt.seq)
            payload = keys.open(pkt)
            msg = Request.decode(payload) if direction == "c2b" else Response.decode(payload)
            opened.append((direction, msg.netfn, msg.cmd))
    assert ("c2b", 0x00, 0x01) in opened and ("b2c", 0x01, 0x01) in opened  # Get Chassis Status and its answer
    assert ("c2b", 0x06, 0x3C) in opened  # Close Session


def test_console_role_replays_ipmitool_against_the_captured_bmc_answers():
    """Our ConsoleHandshake, fed ipmi_sim's recorded answers with ipmitool's random number, builds the
    very RAKP 3 ipmitool sent (byte for byte)."""
    doc, datagrams = load("ipmitool_ipmisim_suite3.json")
    p = setup_payloads(datagrams)
    osreq = OpenSessionRequest.decode(p[rmcp.PT_OPEN_SESSION_REQUEST])
    r1 = Rakp1.decode(p[rmcp.PT_RAKP1])
    randoms = iter([struct.pack("<I", osreq.console_sid), r1.console_random])
    con = ConsoleHandshake(SUITE_3, doc["username"].encode(), doc["password"].encode(), privilege=r1.role & 0x0F,
                           random=lambda n: next(randoms))
    con.tag = osreq.tag - 1
    assert con.open_session_request()[8:] == p[rmcp.PT_OPEN_SESSION_REQUEST][8:]
    con.rakp1(p[rmcp.PT_OPEN_SESSION_RESPONSE])
    assert con.rm == r1.console_random
    rakp3 = con.rakp3(p[rmcp.PT_RAKP2])
    assert Rakp3.decode(rakp3).auth_code == Rakp3.decode(p[rmcp.PT_RAKP3]).auth_code
    keys = con.finish(p[rmcp.PT_RAKP4])
    assert len(keys.k1) == 20


def test_tampered_packets_are_refused():
    bmc, con, keys = establish(SUITE_17)
    wire = bytearray(keys.seal(rmcp.PT_IPMI, b"hello world", session_id=con.bmc_sid, seq=5))
    for i in (6, 10, 20, len(wire) - 1):  # payload type, seq, ciphertext, AuthCode
        bad = bytearray(wire)
        bad[i] ^= 0x40
        with pytest.raises(IpmiError):
            bmc.keys.open(rmcp.parse(bytes(bad), auth_code_size=16))
    # an unauthenticated packet claiming a session is refused by open()
    clear = rmcp.packet20_clear(rmcp.PT_IPMI, b"x", session_id=con.bmc_sid, seq=6)
    with pytest.raises(IpmiError, match="unauthenticated"):
        bmc.keys.open(rmcp.parse(clear))
    # another session's keys do not open it
    other, _, _ = establish(SUITE_17)
    with pytest.raises(IpmiError, match="AuthCode"):
        other.keys.open(rmcp.parse(bytes(wire), auth_code_size=16))


def test_sequence_window_refuses_replays_and_far_numbers():
    w = SequenceWindow()
    assert not w.accept(0)  # 0 is never a session packet's number
    assert w.accept(1) and not w.accept(1)  # a replay
    assert w.accept(3) and w.accept(2) and not w.accept(2)  # reordered once, then a replay
    assert w.accept(19)  # 16 ahead: lost datagrams in between
    assert not w.accept(36)  # 17 ahead: too far
    assert w.accept(4) and not w.accept(3)  # 15 behind, new; older than the window's 16: refused
    assert w.accept(35) and w.accept(20) and not w.accept(19)
    # wrapping past 2^32 like the sender's counter
    w = SequenceWindow()
    w.highest, w._seen = 0xFFFFFFFE, 1
    assert w.accept(0xFFFFFFFF) and w.accept(1) and not w.accept(0xFFFFFFFF)
    assert rmcp.next_seq(0xFFFFFFFF) == 1


def test_parse_rejects_what_it_cannot_read():
    good = rmcp.packet20_clear(rmcp.PT_OPEN_SESSION_REQUEST, b"x" * 32)
    for bad, match in [(b"", "shorter"), (b"\x05\x00\xff\x07\x06", "version"), (b"\x06\x00\xff\x08\x00", "class"),
                       (good[:-1], "shorter than its length"), (good + b"\x00", "trailing"),
                       (b"\x06\x00\xff\x07\x02" + bytes(20), "authentication type"),
                       (b"\x06\x00\xff\x07\x06\x40" + bytes(10) + b"\x00" * 3, "trailer")]:
        with pytest.raises(IpmiError, match=match):
            rmcp.parse(bad)
    with pytest.raises(IpmiError):
        OpenSessionRequest.decode(b"x" * 31)
    with pytest.raises(IpmiError):
        Rakp1.decode(bytes(27) + b"\x11" + bytes(17))  # a 17-byte user name


SESSION = establish(SUITE_3)


@settings(max_examples=1500, deadline=None)
@given(st.binary(max_size=120))
def test_fuzz_decoders_raise_only_ipmi_error(data):
    bmc_keys = SESSION[0].keys
    for decode in (rmcp.parse, lambda d: rmcp.parse(d, auth_code_size=12), Request.decode, Response.decode,
                   OpenSessionRequest.decode, OpenSessionResponse.decode, Rakp1.decode, Rakp2.decode,
                   Rakp3.decode, Rakp4.decode):
        try:
            decode(data)
        except IpmiError:
            pass
    try:
        pkt = rmcp.parse(b"\x06\x00\xff\x07" + data, auth_code_size=12)
        if isinstance(pkt, rmcp.Packet20):
            bmc_keys.open(pkt)
    except IpmiError:
        pass


@settings(max_examples=500, deadline=None)
@given(st.binary(min_size=1, max_size=200), st.integers(0, 2**32 - 1), st.sampled_from([SUITE_3, SUITE_17]),
       st.data())
def test_fuzz_mutated_session_packets(payload, seq, suite, data):
    """A real session packet with bytes flipped, cut or added: refused with IpmiError or, when the
    mutation left the authenticated range intact, opened to the original payload — never anything else."""
    bmc, con, keys = (SESSION if suite is SUITE_3 else establish(SUITE_17))
    wire = bytearray(keys.seal(rmcp.PT_IPMI, payload, session_id=con.bmc_sid, seq=seq or 1))
    op = data.draw(st.sampled_from(["flip", "cut", "add"]))
    if op == "flip":
        i = data.draw(st.integers(0, len(wire) - 1))
        wire[i] ^= data.draw(st.integers(1, 255))
    elif op == "cut":
        del wire[data.draw(st.integers(0, len(wire) - 1)):]
    else:
        wire += data.draw(st.binary(min_size=1, max_size=20))
    try:
        opened = bmc.keys.open(rmcp.parse(bytes(wire), auth_code_size=suite.integrity.size))
    except IpmiError:
        return
    assert opened == payload
