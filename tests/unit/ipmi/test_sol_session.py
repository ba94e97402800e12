"""The SOL activation glue (engines/ipmi/sol_session.py) under trio, with both peers played by the
sans-IO ``SolEndpoint`` over in-memory queues: recording, audit start/end with the hash, typed input
kept out of the trail, retransmits across a lost packet, a BMC that stops answering.

The end-to-end run with the real ipmitool and ipmi_sim is tests/integration/test_ipmi_sol.py."""

from __future__ import annotations

import hashlib
import os

import pytest
import trio

from dbproxy.engines.ipmi import sol as s
from dbproxy.engines.ipmi.sol import SolEndpoint, SolPacket
from dbproxy.engines.ipmi.sol_session import PROXY_PAYLOAD_SIZE, SolSession
from dbproxy.terminal.recording import read_cast

ACTIVATE = bytes.fromhex("0101c6000000")
SIM_ANSWER = bytes.fromhex("00" "00000000" "2000" "0040" "9725" "ffff")   # ipmi_sim: inbound 32, port 9623


class Audit:
    def __init__(self):
        self.events: list[tuple[str, dict]] = []

    def emit(self, kind, **fields):
        self.events.append((kind, fields))
        return fields

    def kinds(self):
        return [k for k, _ in self.events]

    def one(self, kind):
        [f] = [f for k, f in self.events if k == kind]
        return f


class Session:
    id = "sess-sol-1"
    event_family = "bmc"

    def __init__(self):
        self.audit = Audit()


class Peer:
    """A SOL peer: an endpoint plus what arrived, with a switch to lose its outgoing packets."""

    def __init__(self, role, deliver):
        self.ep = SolEndpoint(role=role, retry_interval=0.05, max_retries=3)
        self.received = bytearray()
        self.flags = 0
        self.deliver = deliver
        self.dead = False
        self.drop_next = 0

    async def to_proxy(self, packets):
        for p in packets:
            if self.drop_next:
                self.drop_next -= 1
                continue
            await self.deliver(p.encode())

    async def got(self, raw, *, echo=False):
        if self.dead:
            return
        r = self.ep.receive(SolPacket.decode(raw), now=trio.current_time())
        self.received += r.data
        self.flags |= r.flags
        out = list(r.send)
        if echo and r.data:
            out += self.ep.send(r.data.replace(b"\r", b"\r\n"), now=trio.current_time())
        await self.to_proxy(out)


async def start(tmp_path, nursery, **kw):
    session = Session()
    box: dict = {}

    async def send_client(raw):
        nursery.start_soon(box["client"].got, raw)

    async def send_bmc(raw):
        nursery.start_soon(lambda: box["bmc"].got(raw, echo=True))

    sol = SolSession(session, send_client=send_client, send_bmc=send_bmc, listener_port=6230,
                     recording_dir=str(tmp_path), retry_interval=0.05, max_retries=3, **kw)
    box["client"] = Peer("console", sol.from_client)
    box["bmc"] = Peer("bmc", sol.from_bmc)
    nursery.start_soon(sol.run)
    assert sol.check_activate(ACTIVATE) is None
    answer = await sol.activated(ACTIVATE, SIM_ANSWER)
    return sol, session, box["client"], box["bmc"], answer


async def settle(sol, *peers, seconds=2.0):
    with trio.fail_after(seconds):
        while not (sol.relay is None or (sol.relay.client.idle and sol.relay.bmc.idle)) or \
                any(not p.ep.idle for p in peers):
            await trio.sleep(0.01)
            for p in peers:
                await p.to_proxy(p.ep.tick(trio.current_time()))
        await trio.sleep(0.05)


async def test_activation_answer_carries_the_proxys_port_and_sizes(tmp_path):
    async with trio.open_nursery() as n:
        sol, session, client, bmc, answer = await start(tmp_path, n)
        rsp = s.ActivatePayloadResponse.decode(answer)
        assert (rsp.port, rsp.inbound_size, rsp.outbound_size) == (6230, PROXY_PAYLOAD_SIZE, PROXY_PAYLOAD_SIZE)
        assert sol.relay.bmc.max_chunk == 28               # the BMC's 32-byte inbound size less the header
        assert sol.check_activate(ACTIVATE) == s.CC_PAYLOAD_ALREADY_ACTIVE
        start_ev = session.audit.one("bmc.ipmi.sol.start")
        assert start_ev["instance"] == 1 and start_ev["recording"] == "sess-sol-1.sol.cast"
        await sol.close("session closed")
        n.cancel_scope.cancel()


async def test_typed_text_echoed_recorded_and_audited_with_the_hash(tmp_path):
    async with trio.open_nursery() as n:
        sol, session, client, bmc, _ = await start(tmp_path, n)
        long_line = b"echo " + b"x" * 70 + b"\r"          # more than the BMC's 28 characters a packet
        await client.to_proxy(client.ep.send(b"hostname\r", now=trio.current_time()))
        await settle(sol, client, bmc)
        await client.to_proxy(client.ep.send(long_line, now=trio.current_time()))
        await settle(sol, client, bmc)
        assert bytes(bmc.received) == b"hostname\r" + long_line
        assert bytes(client.received) == b"hostname\r\n" + long_line.replace(b"\r", b"\r\n")
        await sol.close("deactivated by the client")
        n.cancel_scope.cancel()
    end = session.audit.one("bmc.ipmi.sol.end")
    assert end["reason"] == "deactivated by the client" and end["success"] is True
    path = tmp_path / end["recording"]
    assert end["recording_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    _, events = read_cast(str(path))
    assert "hostname" in "".join(text for _, kind, text in events if kind == "o")
    commands = [f["command"] for k, f in session.audit.events if k == "bmc.ipmi.sol.shell.command"]
    assert commands == ["hostname", long_line[:-1].decode()]
    assert sol.recordings and sol.recordings[0]["recording_sha256"] == end["recording_sha256"]


async def test_a_line_typed_without_echo_stays_out_of_audit_and_recording(tmp_path):
    async with trio.open_nursery() as n:
        sol, session, client, bmc, _ = await start(tmp_path, n, recording_input=True)
        # The BMC side shows a password prompt and does not echo what follows.
        await bmc.to_proxy(bmc.ep.send(b"Password: ", now=trio.current_time()))
        await settle(sol, client, bmc)

        async def no_echo(raw):
            r = bmc.ep.receive(SolPacket.decode(raw), now=trio.current_time())
            bmc.received += r.data
            await bmc.to_proxy(r.send)
        async def send_bmc(raw):
            n.start_soon(no_echo, raw)
        sol.send_bmc = send_bmc
        await client.to_proxy(client.ep.send(b"hunter2secret\r", now=trio.current_time()))
        await settle(sol, client, bmc)
        await trio.sleep(0.5)                               # the observer's echo wait runs out
        assert bytes(bmc.received).endswith(b"hunter2secret\r")
        await sol.close("session closed")
        n.cancel_scope.cancel()
    blob = repr(session.audit.events)
    assert "hunter2secret" not in blob
    hidden = session.audit.one("bmc.ipmi.sol.shell.hidden_input")
    assert hidden["bytes"] == len(b"hunter2secret")
    for name in os.listdir(tmp_path):
        assert b"hunter2secret" not in (tmp_path / name).read_bytes(), name


async def test_lost_packets_are_retransmitted_on_their_leg(tmp_path):
    async with trio.open_nursery() as n:
        sol, session, client, bmc, _ = await start(tmp_path, n)
        bmc.drop_next = 2                                   # the BMC's ACK and its echo get lost
        await client.to_proxy(client.ep.send(b"uname\r", now=trio.current_time()))
        await settle(sol, client, bmc)
        assert bytes(bmc.received) == b"uname\r"           # delivered once despite the retransmit
        assert bytes(client.received) == b"uname\r\n"
        assert sol.relay.bmc.retransmits >= 1 and bmc.ep.duplicates >= 1
        await sol.close("session closed")
        n.cancel_scope.cancel()


async def test_bmc_that_stops_answering_ends_the_sol_with_a_reason(tmp_path):
    failures = []
    async with trio.open_nursery() as n:
        sol, session, client, bmc, _ = await start(tmp_path, n, on_failure=failures.append)
        bmc.dead = True
        await client.to_proxy(client.ep.send(b"whoami\r", now=trio.current_time()))
        with trio.fail_after(3):
            while sol.active:
                await trio.sleep(0.02)
        await trio.sleep(0.1)
        n.cancel_scope.cancel()
    end = session.audit.one("bmc.ipmi.sol.end")
    assert end["reason"] == "bmc_unresponsive" and end["success"] is False
    assert "recording_sha256" in end
    assert failures == ["bmc_unresponsive"]
    assert client.flags & s.SolStatus.DEACTIVATING          # the client was told


async def test_bmc_refusal_is_passed_on_and_audited(tmp_path):
    session = Session()

    async def nothing(raw):
        pass
    sol = SolSession(session, send_client=nothing, send_bmc=nothing, listener_port=1)
    assert await sol.activated(ACTIVATE, b"\x80") == b"\x80"
    assert not sol.active
    assert session.audit.one("bmc.ipmi.sol.refused")["completion_code"] == 0x80
    assert sol.check_activate(b"\x01") == s.CC_REQUEST_LENGTH_INVALID


async def test_malformed_client_packet_ends_the_sol_and_frees_the_payload_at_the_bmc(tmp_path):
    failures = []
    async with trio.open_nursery() as n:
        sol, session, client, bmc, _ = await start(tmp_path, n, on_failure=failures.append)
        await sol.from_client(b"\x00\x00\x00")                  # shorter than the SOL header
        await trio.sleep(0.05)
        assert not sol.active
        await sol.from_client(SolPacket(seq=1, data=b"late").encode())   # dropped: nothing active
        n.cancel_scope.cancel()
    end = session.audit.one("bmc.ipmi.sol.end")
    assert end["reason"] == "client_protocol_error" and "shorter" in end["error"]
    assert failures == ["client_protocol_error"]
    assert client.flags & s.SolStatus.DEACTIVATING
    assert bytes(bmc.received) == b""


async def test_a_serial_break_is_relayed_and_audited(tmp_path):
    async with trio.open_nursery() as n:
        sol, session, client, bmc, _ = await start(tmp_path, n)
        await client.to_proxy(client.ep.send(now=trio.current_time(), flags=s.SolOperation.BREAK))
        await settle(sol, client, bmc)
        assert bmc.flags & s.SolOperation.BREAK
        await sol.close("session closed")
        n.cancel_scope.cancel()
    assert session.audit.one("bmc.ipmi.sol.operation")["operations"] == ["break"]
