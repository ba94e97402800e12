"""SOL packets, one leg's acknowledgements and retransmits, the relay, and the payload commands
(engines/ipmi/sol.py) on literal bytes — IPMI v2.0 §15.9-15.10, §24.1-24.4."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dbproxy.engines.ipmi import sol as s
from dbproxy.engines.ipmi.sol import (ActivatePayloadRequest, ActivatePayloadResponse, DeactivatePayloadRequest,
                                      PayloadActivationStatus, SolEndpoint, SolError, SolPacket, SolRelay,
                                      SolRetriesExhausted)

# What ipmitool 1.8.19 sends: typed "ls\r" as packet 1, and its ACK of a BMC packet 3 of 5 characters.
IPMITOOL_DATA = bytes.fromhex("01000000") + b"ls\r"
IPMITOOL_ACK = bytes.fromhex("00030500")
# What OpenIPMI's ipmi_sim sends: its ACK of packet 1 (3 accepted) and 5 characters as its packet 2.
SIM_ACK = bytes.fromhex("00010300")
SIM_DATA = bytes.fromhex("02000000") + b"hello"


@pytest.mark.parametrize("raw", [IPMITOOL_DATA, IPMITOOL_ACK, SIM_ACK, SIM_DATA, bytes.fromhex("0f0aff7f") + b"x" * 255])
def test_packet_round_trip(raw):
    assert SolPacket.decode(raw).encode() == raw
    assert SolPacket.decode(memoryview(raw)) == SolPacket.decode(raw)


def test_packet_fields():
    p = SolPacket.decode(IPMITOOL_DATA)
    assert (p.seq, p.ack_seq, p.accepted, p.flags, p.data) == (1, 0, 0, 0, b"ls\r")
    assert not p.is_ack
    a = SolPacket.decode(IPMITOOL_ACK)
    assert (a.seq, a.ack_seq, a.accepted) == (0, 3, 5) and a.is_ack and not a.is_nack
    n = SolPacket.decode(bytes.fromhex("00020040"))
    assert n.is_nack
    # Operation bits, console -> BMC (§15.9): break is 10h, flush outbound 01h.
    assert SolPacket.decode(bytes.fromhex("05000011")).flags == s.SolOperation.BREAK | s.SolOperation.FLUSH_OUTBOUND
    assert s.describe_flags(0x14, from_bmc=True) == ["deactivating", "break_detected"]
    assert s.describe_flags(0x14, from_bmc=False) == ["break", "deassert_dcd_dsr"]


@pytest.mark.parametrize("raw, why", [
    (b"", "shorter"), (b"\x01\x00\x00", "shorter"),
    (b"\x11\x00\x00\x00", "reserved"), (b"\x01\x20\x00\x00", "reserved"),
    (b"\x00\x01\x01\x00x", "carries characters"),
    (b"\x01\x00\x00\x00" + b"x" * 256, "256 characters"),
])
def test_packet_decode_errors(raw, why):
    with pytest.raises(SolError, match=why):
        SolPacket.decode(raw)


def test_packet_encode_refuses_out_of_range():
    with pytest.raises(SolError):
        SolPacket(seq=16).encode()
    with pytest.raises(SolError):
        SolPacket(seq=0, data=b"x").encode()


# -- one leg ------------------------------------------------------------------------------


def test_send_then_ack_goes_idle_and_numbers_wrap_1_to_15():
    e = SolEndpoint(max_chunk=10)
    seen = []
    for i in range(17):
        [p] = e.send(b"x", now=0.0)
        seen.append(p.seq)
        got = e.receive(SolPacket(ack_seq=p.seq, accepted=1), now=0.0)
        assert got == (b"", [], 0)
        assert e.idle
    assert seen == list(range(1, 16)) + [1, 2]


def test_one_packet_in_flight_rest_waits_for_the_ack():
    e = SolEndpoint(max_chunk=4)
    [p1] = e.send(b"abcdefghij", now=0.0)
    assert p1.data == b"abcd"
    assert e.send(b"k", now=0.0) == []                    # stop-and-wait: nothing more until acked
    [p2] = e.receive(SolPacket(ack_seq=p1.seq, accepted=4), now=0.1).send
    assert (p2.seq, p2.data) == (2, b"efgh")
    [p3] = e.receive(SolPacket(ack_seq=2, accepted=4), now=0.2).send
    assert p3.data == b"ijk"
    assert e.receive(SolPacket(ack_seq=3, accepted=3), now=0.3).send == []
    assert e.idle


def test_lost_packet_is_retransmitted_with_the_same_number_then_gives_up():
    e = SolEndpoint(retry_interval=1.0, max_retries=2)
    [p] = e.send(b"hi", now=10.0)
    assert e.next_deadline() == 11.0
    assert e.tick(10.5) == []
    assert e.tick(11.0) == [p]                            # same seq, same characters
    assert e.tick(12.0) == [p]
    assert e.retransmits == 2
    with pytest.raises(SolRetriesExhausted) as info:
        e.tick(13.0)
    assert info.value.seq == p.seq and info.value.attempts == 3


def test_ack_after_a_retransmit_settles_and_late_duplicate_ack_is_ignored():
    e = SolEndpoint()
    [p] = e.send(b"hi", now=0.0)
    e.tick(1.0)
    assert e.receive(SolPacket(ack_seq=p.seq, accepted=2), now=1.1).send == []
    assert e.idle and e.next_deadline() is None
    assert e.receive(SolPacket(ack_seq=p.seq, accepted=2), now=1.2).send == []   # the second ACK
    assert e.tick(5.0) == []


def test_control_only_packet_unacknowledged_is_dropped_not_fatal():
    """ipmi_sim never ACKs a packet without characters (a break): the leg drops it after the retries."""
    e = SolEndpoint(max_retries=1)
    [p] = e.send(now=0.0, flags=s.SolOperation.BREAK)
    assert p.data == b"" and p.flags == s.SolOperation.BREAK and p.seq == 1
    assert e.tick(1.0) == [p]
    assert e.tick(2.0) == []
    assert e.idle
    [q] = e.send(b"x", now=2.0)
    assert q.seq == 2


def test_duplicate_packet_is_acked_again_but_delivered_once():
    e = SolEndpoint(role="bmc")
    first = e.receive(SolPacket(seq=1, data=b"ls\r"), now=0.0)
    assert first.data == b"ls\r"
    assert first.send == [SolPacket(ack_seq=1, accepted=3)]
    again = e.receive(SolPacket(seq=1, data=b"ls\r"), now=0.5)      # our ACK was lost
    assert again.data == b""
    assert again.send == [SolPacket(ack_seq=1, accepted=3)]
    assert e.duplicates == 1
    nxt = e.receive(SolPacket(seq=2, data=b"x"), now=0.6)
    assert nxt.data == b"x"


def test_duplicate_operations_are_not_repeated():
    e = SolEndpoint(role="bmc")
    assert e.receive(SolPacket(seq=4, flags=s.SolOperation.BREAK), now=0).flags == s.SolOperation.BREAK
    assert e.receive(SolPacket(seq=4, flags=s.SolOperation.BREAK), now=0).flags == 0


def test_partial_acceptance_sends_the_rest_under_a_new_number():
    """§15.10: accepted count < characters sent -> the remainder goes again, new sequence number."""
    e = SolEndpoint()
    [p] = e.send(b"0123456789", now=0.0)
    [rest] = e.receive(SolPacket(ack_seq=p.seq, accepted=3), now=0.1).send
    assert rest.seq == p.seq + 1 and rest.data == b"3456789"
    assert e.receive(SolPacket(ack_seq=rest.seq, accepted=7), now=0.2).send == []
    assert e.idle


def test_receiver_accepts_only_what_fits():
    e = SolEndpoint(role="bmc")
    got = e.receive(SolPacket(seq=1, data=b"abcdef"), now=0, room=4)
    assert got.data == b"abcd"
    assert got.send == [SolPacket(ack_seq=1, accepted=4)]          # partial ACK, not a NACK
    none = e.receive(SolPacket(seq=2, data=b"ef"), now=0, room=0)
    assert none.data == b"" and none.send == [SolPacket(ack_seq=2, accepted=0, flags=s.NACK)]


def test_nack_pauses_for_one_interval_then_resends():
    e = SolEndpoint(retry_interval=1.0, max_retries=2)
    [p] = e.send(b"abc", now=0.0)
    assert e.receive(SolPacket(ack_seq=p.seq, accepted=0, flags=s.NACK), now=0.1).send == []
    assert e.next_deadline() == pytest.approx(1.1)
    assert e.tick(0.5) == []
    [again] = e.tick(1.1)
    assert again.data == b"abc" and again.seq == p.seq + 1
    # a peer that keeps refusing everything is given up on
    e.receive(SolPacket(ack_seq=again.seq, accepted=0, flags=s.NACK), now=1.2)
    [third] = e.tick(2.2)
    with pytest.raises(SolRetriesExhausted):
        e.receive(SolPacket(ack_seq=third.seq, accepted=0, flags=s.NACK), now=2.3)


def test_ipmi_sim_style_nack_with_accepted_characters_keeps_them():
    """ipmi_sim sets the NACK bit when its 32-byte buffer filled, with the count it did take."""
    e = SolEndpoint(retry_interval=1.0)
    [p] = e.send(b"x" * 40, now=0.0)
    assert e.receive(SolPacket(ack_seq=p.seq, accepted=32, flags=s.NACK), now=0.1).send == []
    [rest] = e.tick(1.1)
    assert rest.data == b"x" * 8


def test_transfer_unavailable_pauses_only_toward_a_bmc():
    console = SolEndpoint(role="console")
    [p] = console.send(b"ab", now=0)
    assert console.receive(SolPacket(ack_seq=p.seq, accepted=1, flags=s.SolStatus.TRANSFER_UNAVAILABLE),
                           now=0).send == []
    bmc = SolEndpoint(role="bmc")
    [p] = bmc.send(b"ab", now=0)
    [rest] = bmc.receive(SolPacket(ack_seq=p.seq, accepted=1, flags=s.SolOperation.RING_WOR), now=0).send
    assert rest.data == b"b"


def test_ack_claiming_more_than_sent_is_an_error():
    e = SolEndpoint()
    [p] = e.send(b"ab", now=0)
    with pytest.raises(SolError, match="accepts 3 characters of 2"):
        e.receive(SolPacket(ack_seq=p.seq, accepted=3), now=0)


def test_send_beyond_room_is_bounded():
    e = SolEndpoint(max_buffer=4, max_chunk=1)
    e.send(b"abcd", now=0)                       # one in flight, three held
    assert e.room() == 1
    e.send(b"xyzab", now=0)                      # room is advisory up to twice max_buffer
    assert e.room() == 0
    with pytest.raises(SolError, match="buffer full"):
        e.send(b"c", now=0)


def test_status_only_packet_reports_its_bits():
    e = SolEndpoint(role="console")
    got = e.receive(SolPacket(flags=s.SolStatus.DEACTIVATING), now=0)
    assert got == (b"", [], s.SolStatus.DEACTIVATING)


# -- two legs over a lossy line (property) ------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(chunks=st.lists(st.binary(min_size=1, max_size=60), min_size=1, max_size=8),
       losses=st.lists(st.sampled_from(["ok", "drop", "dup"]), max_size=200),
       room=st.integers(1, 50))
def test_two_legs_deliver_everything_once_in_order_despite_loss_and_duplication(chunks, losses, room):
    a = SolEndpoint(role="console", max_chunk=16, retry_interval=1.0, max_retries=1000)
    b = SolEndpoint(role="bmc", max_chunk=16, retry_interval=1.0, max_retries=1000)
    fate = iter(losses)
    got = bytearray()
    wire: list[tuple[SolEndpoint, SolPacket]] = []
    now = 0.0

    def post(dst, packets):
        for p in packets:
            f = next(fate, "ok")
            if f != "drop":
                wire.append((dst, p))
            if f == "dup":
                wire.append((dst, p))

    sent = b"".join(chunks)
    for c in chunks:
        post(b, a.send(c, now=now))
    for _ in range(5000):
        while wire:
            dst, p = wire.pop(0)
            r = dst.receive(SolPacket.decode(p.encode()), now=now, room=room if dst is b else None)
            if dst is b:
                got += r.data
            post(a if dst is b else b, r.send)
        if a.idle:
            break
        now += 1.0
        post(b, a.tick(now))
    assert bytes(got) == sent


# -- the relay ----------------------------------------------------------------------------


def test_relay_types_through_and_echo_comes_back_as_recorded_output():
    r = SolRelay.create(bmc_chunk=28)
    step = r.from_client(SolPacket.decode(IPMITOOL_DATA), now=0.0)
    assert step.to_client == (SolPacket(ack_seq=1, accepted=3),)
    assert step.to_bmc == (SolPacket(seq=1, data=b"ls\r"),)
    assert step.input == b"ls\r" and step.output == b""
    step = r.from_bmc(SolPacket.decode(SIM_ACK), now=0.1)          # BMC took all 3
    assert step.to_bmc == () and step.to_client == ()
    step = r.from_bmc(SolPacket.decode(SIM_DATA), now=0.2)
    assert step.output == b"hello"
    assert step.to_bmc == (SolPacket(ack_seq=2, accepted=5),)
    assert step.to_client == (SolPacket(seq=1, data=b"hello"),)
    step = r.from_client(SolPacket(ack_seq=1, accepted=5), now=0.3)
    assert step == s.RelayStep()
    assert r.client.idle and r.bmc.idle and r.next_deadline() is None


def test_relay_names_the_leg_that_gave_up():
    r = SolRelay.create(max_retries=0)
    r.from_client(SolPacket(seq=1, data=b"a"), now=0.0)
    with pytest.raises(SolRetriesExhausted) as info:
        r.tick(1.0)
    assert info.value.leg == "bmc"
    r = SolRelay.create(max_retries=0)
    r.from_bmc(SolPacket(seq=1, data=b"a"), now=0.0)
    with pytest.raises(SolRetriesExhausted) as info:
        r.tick(1.0)
    assert info.value.leg == "client"


def test_relay_backpressure_client_gets_partial_ack_when_bmc_leg_is_full():
    r = SolRelay.create(max_buffer=8, bmc_chunk=4)
    step = r.from_client(SolPacket(seq=1, data=b"0123456789"), now=0)
    assert step.to_client == (SolPacket(ack_seq=1, accepted=8),)
    assert step.input == b"01234567"


def test_relay_passes_break_and_flush_but_not_nack():
    r = SolRelay.create()
    step = r.from_client(SolPacket(seq=1, flags=s.SolOperation.BREAK | s.NACK), now=0)
    assert step.to_bmc == (SolPacket(seq=1, flags=s.SolOperation.BREAK),)
    assert step.client_flags == s.SolOperation.BREAK


# -- payload commands ----------------------------------------------------------------------


def test_activate_payload_request_as_ipmitool_sends_it():
    raw = bytes.fromhex("0101c6000000")           # SOL, instance 1, encrypt+auth, alerts deferred, no CTS
    req = ActivatePayloadRequest.decode(raw)
    assert (req.payload_type, req.instance, req.encrypt, req.authenticate) == (1, 1, True, True)
    assert req.encode() == raw
    assert ActivatePayloadRequest(encrypt=False, authenticate=False).encode() == bytes.fromhex("010100000000")


@pytest.mark.parametrize("raw", [b"", b"\x01\x01", bytes.fromhex("0100c6000000"), bytes(7)])
def test_activate_payload_request_errors(raw):
    with pytest.raises(SolError):
        ActivatePayloadRequest.decode(raw)


def test_activate_payload_response_as_ipmi_sim_sends_it():
    # cc 0, aux 0, inbound 32, outbound 16384, port 9623, no VLAN
    raw = bytes.fromhex("00" "00000000" "2000" "0040" "9725" "ffff")
    rsp = ActivatePayloadResponse.decode(raw)
    assert (rsp.inbound_size, rsp.outbound_size, rsp.port, rsp.vlan) == (32, 16384, 9623, 0xFFFF)
    assert rsp.characters_in == 28
    assert rsp.encode() == raw
    assert len(ActivatePayloadResponse().encode()) == 13     # ipmitool insists on 12 data bytes
    busy = ActivatePayloadResponse.decode(b"\x80")
    assert busy.completion_code == s.CC_PAYLOAD_ALREADY_ACTIVE and busy.encode() == b"\x80"
    with pytest.raises(SolError):
        ActivatePayloadResponse.decode(b"\x00\x00")
    with pytest.raises(SolError):
        ActivatePayloadResponse.decode(b"")


def test_deactivate_payload_request():
    raw = bytes.fromhex("010100000000")
    req = DeactivatePayloadRequest.decode(raw)
    assert (req.payload_type, req.instance) == (1, 1) and req.encode() == raw
    assert DeactivatePayloadRequest.decode(b"\x01\x02").instance == 2
    for bad in (b"\x01", b"\x01\x00", bytes(5)):
        with pytest.raises(SolError):
            DeactivatePayloadRequest.decode(bad)


def test_payload_activation_status():
    assert s.decode_status_request(b"\x01") == 1
    with pytest.raises(SolError):
        s.decode_status_request(b"")
    st_ = PayloadActivationStatus(capacity=2, active=frozenset({1, 10}))
    raw = st_.encode()
    assert raw == bytes((0, 2, 0x01, 0x02))
    assert PayloadActivationStatus.decode(raw) == st_
    assert PayloadActivationStatus.decode(b"\xc1").completion_code == 0xC1
    with pytest.raises(SolError):
        PayloadActivationStatus.decode(b"\x00\x01")


# -- fuzz: peer bytes raise SolError and nothing else --------------------------------------


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_decoders_raise_only_sol_error(raw):
    for decode in (SolPacket.decode, ActivatePayloadRequest.decode, ActivatePayloadResponse.decode,
                   DeactivatePayloadRequest.decode, PayloadActivationStatus.decode, s.decode_status_request):
        try:
            decode(raw)
        except SolError:
            pass


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(min_size=4, max_size=40), max_size=30), st.booleans())
def test_fuzz_relay_raises_only_sol_error(packets, from_client_first):
    r = SolRelay.create(max_retries=2, bmc_chunk=8)
    now = 0.0
    for i, raw in enumerate(packets):
        now += 0.4
        try:
            p = SolPacket.decode(raw)
            if (i % 2 == 0) == from_client_first:
                r.from_client(p, now=now)
            else:
                r.from_bmc(p, now=now)
            r.tick(now)
        except SolError:
            return


def test_sol_module_is_sans_io():
    import subprocess
    import sys
    code = "import sys, dbproxy.engines.ipmi.sol; assert 'trio' not in sys.modules, 'trio loaded'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_relay_without_forward_leaves_the_characters_to_the_caller():
    r = SolRelay.create()
    step = r.from_client(SolPacket(seq=1, data=b"ab"), now=0, forward=False)
    assert step.input == b"ab" and step.to_bmc == ()
    assert step.to_client == (SolPacket(ack_seq=1, accepted=2),)
