"""IPMI v2.0 / RMCP+ through the proxy: ``ipmitool -I lanplus`` in front of a real OpenIPMI ``ipmi_sim``.

The BMC is ipmi_sim (``scripts/peers/ipmi_sim.py``) with one admin account
only the proxy knows; its chassis_control script keeps the power state in a
file the tests read.  Clients log in with single-use codes from the real
``dbproxy token issue --ipmi`` CLI.  Every test checks the audit trail.
ipmi_sim speaks cipher suite 3 only: the proxy's BMC side is suite 3 while
clients use 3 or 17 toward the proxy.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time

import pytest

from scripts.peers import refused_port
from tests.support import TOKEN_IDENTITY, ProxyProcess, dbproxy_cli, peer_missing, read_audit, token_keygen, \
    wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

READER = ["chassis.power_status", "app.get_device_id", "sensor.*", "sel.read*", "group.*"]
OPERATOR = ["chassis.*", "app.get_device_id", "sensor.*", "sel.*", "group.*"]


@pytest.fixture(scope="module")
def bmc(tmp_path_factory):
    if shutil.which("ipmi_sim") is None or shutil.which("ipmitool") is None:
        peer_missing("ipmi_sim and ipmitool (scripts/install/ipmi.sh)")
    from scripts.peers.ipmi_sim import start_ipmi_sim

    sim = start_ipmi_sim(tmp_path_factory.mktemp("ipmisim"))
    yield sim
    sim.stop()


@pytest.fixture(scope="module")
def doomed(bmc, tmp_path_factory):
    """A second simulator, for the test that takes its BMC down mid-session."""
    from scripts.peers.ipmi_sim import start_ipmi_sim

    sim = start_ipmi_sim(tmp_path_factory.mktemp("doomed"))
    yield sim
    sim.stop()


@pytest.fixture(scope="module")
def ipmi(bmc, doomed, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ipmiproxy")
    token_keygen(workdir)
    down_port = refused_port(udp=True)  # nothing listens there (held, so no listener gets it): that BMC is down

    def backend(address: str = bmc.address, **extra) -> dict:
        return {"address": address, "auth": {"method": "rakp", "username": bmc.username,
                                             "password_file": str(bmc.password_file)}, **extra}

    config = {
        "identity": {"token": dict(TOKEN_IDENTITY)},
        "roles": {
            "reader": {"routes": ["*"], "bmcs": ["bmc-*"], "ipmi": READER},
            "operator": {"routes": ["*"], "bmcs": ["bmc-*"], "ipmi": OPERATOR},
            "other": {"routes": ["*"], "bmcs": ["other-*"], "ipmi": OPERATOR},
        },
        "listeners": [
            {"name": "ipmi", "protocol": "ipmi", "kind": "udp", "listen": "127.0.0.1:0",
             "auth": {"methods": ["token"]}, "handshake_timeout_seconds": 3,
             "routes": [
                 {"name": "down", "match": {"target": "bmc-down"}, "backend": backend(f"127.0.0.1:{down_port}")},
                 {"name": "wrong", "match": {"target": "bmc-wrong"},
                  "backend": {**backend(), "auth": {"method": "rakp", "username": bmc.username,
                                                    "password_env": "WRONG_BMC_PASSWORD"}}},
                 {"name": "doomed", "match": {"target": "bmc-doomed"},
                  "backend": {**backend(doomed.address),
                              "auth": {"method": "rakp", "username": doomed.username,
                                       "password_file": str(doomed.password_file)}}},
                 {"name": "sim", "match": {"target": "bmc-*"}, "backend": backend()},
             ]},
        ],
        "audit": {"sinks": [{"type": "jsonl", "path": "audit.jsonl"}]},
    }
    proc = ProxyProcess(workdir, config, env={"WRONG_BMC_PASSWORD": "not-the-password"}).start()
    proc.audit_path = workdir / "audit.jsonl"
    proc.bmc = bmc
    proc.doomed = doomed
    proc.codes: list[str] = []  # every code handed out: none may appear in logs or the audit
    yield proc
    proc.stop()


def issue(ipmi, user: str, role: str = "operator", target: str = "bmc-1", *extra: str) -> str:
    p = dbproxy_cli("token", "issue", "--config", str(ipmi.config_path), "--ipmi", "--user", user, "--roles", role,
                    "--target", target, *extra, check=True)
    code = p.stdout.strip()
    assert len(code) == 20 and code.isalnum(), p.stdout
    ipmi.codes.append(code)
    return code


def ipmitool(ipmi, user: str, code: str, *args: str, suite: int = 3, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["ipmitool", "-I", "lanplus", "-C", str(suite), "-H", "127.0.0.1", "-p",
                           str(ipmi.port("ipmi")), "-U", user, "-P", code, "-N", "1", "-R", "3", *args],
                          capture_output=True, text=True, timeout=timeout)


def events(ipmi) -> list[dict]:
    return read_audit(ipmi.audit_path)


def wait_events(ipmi, pred, what: str, timeout: float = 15.0, count: int = 1) -> list[dict]:
    found: list[dict] = []

    def check() -> bool:
        found[:] = [e for e in events(ipmi) if pred(e)]
        return len(found) >= count

    wait_until(check, timeout=timeout, what=what)
    return found


@pytest.mark.parametrize("suite", [3, 17])
def test_power_status_on_off_change_the_simulator(ipmi, suite):
    bmc = ipmi.bmc
    bmc.set_power(False)
    user = f"olga{suite}"
    p = ipmitool(ipmi, user, issue(ipmi, user), "chassis", "power", "status", suite=suite)
    assert p.returncode == 0, p.stderr
    assert "Chassis Power is off" in p.stdout
    before = len(bmc.actions())
    p = ipmitool(ipmi, user, issue(ipmi, user), "chassis", "power", "on", suite=suite)
    assert p.returncode == 0, p.stderr
    assert "Up/On" in p.stdout
    assert bmc.power_state() == "on"
    assert bmc.actions()[before:] == ["power 1"]  # exactly once
    p = ipmitool(ipmi, user, issue(ipmi, user), "chassis", "power", "status", suite=suite)
    assert "Chassis Power is on" in p.stdout, p.stdout + p.stderr
    p = ipmitool(ipmi, user, issue(ipmi, user), "chassis", "power", "off", suite=suite)
    assert p.returncode == 0, p.stderr
    assert bmc.power_state() == "off"
    starts = wait_events(ipmi, lambda e: e["event"] == "bmc.ipmi.session.start" and e.get("user") == user
                         and e.get("success"), "session starts", count=4)
    assert len(starts) == 4
    assert all(e["cipher_suite"] == suite and e["target"] == "bmc-1" and e["privilege"] == "administrator"
               for e in starts), starts
    cmds = wait_events(ipmi, lambda e: e["event"] == "bmc.ipmi.command" and e.get("user") == user
                       and e["command"].startswith("chassis.power_o"), "power commands", count=2)
    assert [(e["command"], e["refused"]) for e in cmds] == [("chassis.power_on", False), ("chassis.power_off", False)]
    ends = wait_events(ipmi, lambda e: e["event"] == "bmc.ipmi.session.end" and e.get("user") == user,
                       "session ends", count=4)
    assert len(ends) == 4 and all(e["reason"] == "client closed the session" for e in ends), ends


def test_refused_command_by_role_is_d4_and_audited(ipmi):
    bmc = ipmi.bmc
    bmc.set_power(False)
    before = len(bmc.actions())
    p = ipmitool(ipmi, "rita", issue(ipmi, "rita", "reader"), "chassis", "power", "on")
    assert p.returncode != 0
    assert "Insufficient privilege level" in p.stderr, p.stderr  # ipmitool's text for completion code D4h
    assert bmc.power_state() == "off" and bmc.actions()[before:] == []
    refused = wait_events(ipmi, lambda e: e["event"] == "bmc.ipmi.command" and e.get("user") == "rita"
                          and e["command"] == "chassis.power_on", "the refused command")
    (e,) = refused
    assert e["refused"] is True and e["completion_code"] == 0xD4 and e["netfn"] == 0 and e["cmd"] == 2
    assert e["data"] == "01" and e["reason"] == "not_allowed_by_role"
    # what the role allows still works in the same kind of session
    p = ipmitool(ipmi, "rita", issue(ipmi, "rita", "reader"), "chassis", "power", "status")
    assert p.returncode == 0 and "Chassis Power is off" in p.stdout, p.stderr


def test_used_expired_and_wrong_codes_are_refused(ipmi):
    code = issue(ipmi, "uma")
    assert ipmitool(ipmi, "uma", code, "chassis", "power", "status").returncode == 0
    # ipmitool prints the RAKP status codes with -v
    p = ipmitool(ipmi, "uma", code, "-v", "chassis", "power", "status")  # the same code again
    assert p.returncode != 0 and "unauthorized name" in p.stderr, p.stderr
    # a wrong code for a name with an outstanding one: RAKP 2 is keyed with the real code, so ipmitool's
    # check of it fails and ipmitool gives up without a RAKP 3; the proxy audits that at its handshake
    # timeout, and the code stays good (nobody proved holding it)
    good = issue(ipmi, "wanda")
    p = ipmitool(ipmi, "wanda", "W" * 20, "-v", "chassis", "power", "status")
    assert p.returncode != 0 and "RAKP 2 HMAC is invalid" in p.stderr, p.stderr
    assert ipmitool(ipmi, "wanda", good, "chassis", "power", "status").returncode == 0
    # an expired code
    short = issue(ipmi, "ella", "operator", "bmc-1", "--ttl", "1s")
    time.sleep(1.5)
    p = ipmitool(ipmi, "ella", short, "-v", "chassis", "power", "status")
    assert p.returncode != 0 and "unauthorized name" in p.stderr, p.stderr
    fails = wait_events(ipmi, lambda e: e["event"] == "bmc.ipmi.session.start" and not e.get("success")
                        and e.get("ipmi_user") in ("uma", "wanda", "ella"), "refused starts", count=3, timeout=20)
    by_user = {e["ipmi_user"]: e for e in fails}
    assert by_user["uma"]["reason"] == "unknown_or_used_code" and by_user["uma"]["rakp_status"] == 0x0D
    assert by_user["ella"]["reason"] == "unknown_or_used_code"
    assert by_user["wanda"]["reason"] == "no_rakp3" and "RAKP 3" in by_user["wanda"]["error"]
    denials = [e for e in events(ipmi) if e["event"] == "bmc.ipmi.session.access_denied"
               and e.get("ipmi_user") in ("uma", "wanda")]
    assert {e["stage"] for e in denials} == {"authenticate"}


def test_target_not_granted_is_refused(ipmi):
    p = ipmitool(ipmi, "otto", issue(ipmi, "otto", "other", "bmc-1"), "-v", "chassis", "power", "status")
    assert p.returncode != 0 and "unauthorized role" in p.stderr, p.stderr
    (e,) = wait_events(ipmi, lambda e: e["event"] == "bmc.ipmi.session.start" and e.get("ipmi_user") == "otto",
                       "the refused start")
    assert e["success"] is False and e["rakp_status"] == 0x0A


def test_bmc_down_or_refusing_the_proxy(ipmi):
    p = ipmitool(ipmi, "dora", issue(ipmi, "dora", "operator", "bmc-down"), "-v", "chassis", "power", "status")
    assert p.returncode != 0 and "insufficient resources" in p.stderr, p.stderr
    p = ipmitool(ipmi, "will", issue(ipmi, "will", "operator", "bmc-wrong"), "-v", "chassis", "power", "status")
    assert p.returncode != 0 and "insufficient resources" in p.stderr, p.stderr
    starts = wait_events(ipmi, lambda e: e["event"] == "bmc.ipmi.session.start" and e.get("ipmi_user")
                         in ("dora", "will"), "refused starts", count=2)
    by_user = {e["ipmi_user"]: e for e in starts}
    assert by_user["dora"]["success"] is False and by_user["dora"]["reason"] == "bmc_connect"
    assert "unreachable" in by_user["dora"]["error"]
    assert by_user["will"]["reason"] == "bmc_auth" and "refused the proxy's login" in by_user["will"]["error"]


def test_malformed_datagrams_do_not_disturb_a_running_session(ipmi):
    code = issue(ipmi, "mallory")
    shell = subprocess.Popen(["ipmitool", "-I", "lanplus", "-C", "17", "-H", "127.0.0.1", "-p", str(ipmi.port("ipmi")),
                              "-U", "mallory", "-P", code, "shell"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        shell.stdin.write("chassis power status\n")
        shell.stdin.flush()
        (start,) = wait_events(ipmi, lambda e: e["event"] == "bmc.ipmi.session.start" and e.get("user") == "mallory",
                               "the session start")
        # Garbage from other sockets: not RMCP, bad versions, truncated headers, a forged packet of some
        # session with a random AuthCode, an RMCP+ packet with a huge length field, an ASF ping.
        port = ipmi.port("ipmi")
        junk = [b"", b"\x00", b"hello", b"\x06\x00\xff\x07", b"\x06\x00\xff\x07\x06\xc0" + os.urandom(40),
                b"\x06\x00\xff\x07\x06\x00\x00\x00\x00\x00\x01\x00\x00\x00\xff\xff", os.urandom(300),
                b"\x06\x00\xff\x07\x00" + bytes(9) + b"\x09", b"\x06\x00\xff\x06\x00\x00\x11\xbe\x80\x09\x00\x00"]
        for _ in range(3):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                for j in junk:
                    s.sendto(j, ("127.0.0.1", port))
        time.sleep(0.5)
        shell.stdin.write("chassis power status\nexit\n")
        shell.stdin.flush()
        out, err = shell.communicate(timeout=30)
    finally:
        if shell.poll() is None:
            shell.kill()
    assert shell.returncode == 0, err
    assert out.count("Chassis Power is") == 2, out + err
    (end,) = wait_events(ipmi, lambda e: e["event"] == "bmc.ipmi.session.end" and e.get("user") == "mallory",
                         "the session end")
    assert end["reason"] == "client closed the session" and end["malformed"] == 0 and end["replayed"] == 0
    assert sum(e["event"] == "bmc.ipmi.command" and e.get("sid") == start["sid"] and
               e["command"] == "chassis.power_status" for e in events(ipmi)) == 2
    assert ipmi.proc.poll() is None
    # every junk datagram was dropped by the engine, none crashed the session it started
    assert "Traceback" not in ipmi.log_text()


def test_twenty_concurrent_sessions(ipmi):
    users = [f"c{i:02d}" for i in range(20)]
    codes: dict[str, str] = {}

    def issue_some(chunk):
        for u in chunk:
            codes[u] = issue(ipmi, u, "reader")

    threads = [threading.Thread(target=issue_some, args=(users[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    procs = {u: subprocess.Popen(["ipmitool", "-I", "lanplus", "-C", "3" if i % 2 else "17", "-H", "127.0.0.1",
                                  "-p", str(ipmi.port("ipmi")), "-U", u, "-P", codes[u], "-N", "2", "-R", "5",
                                  "chassis", "power", "status"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)
             for i, u in enumerate(users)}
    results = {u: p.communicate(timeout=120) for u, p in procs.items()}
    failed = {u: r for u, r in results.items() if procs[u].returncode != 0 or "Chassis Power is" not in r[0]}
    assert not failed, failed
    ends = wait_events(ipmi, lambda e: e["event"] == "bmc.ipmi.session.end" and e.get("user") in users,
                       "20 session ends", count=20, timeout=30)
    assert {e["user"] for e in ends} == set(users)
    assert len({e["sid"] for e in ends}) == 20


def test_no_code_or_bmc_password_in_audit_or_logs(ipmi):
    blob = ipmi.audit_path.read_text() + ipmi.log_text()
    assert ipmi.codes
    for code in ipmi.codes:
        assert code not in blob
    assert ipmi.bmc.password not in blob


# A hand-built console (the engine's own console role, engines/ipmi/console.py, pointed at the proxy):
# ipmitool cannot be made to lose an answer and send a request again, replay a datagram, or send a RAKP 3
# that does not match RAKP 2 — faults a real client produces only on a bad network or with a bad password.


def test_retransmitted_request_runs_once_replays_and_garbage_are_dropped(ipmi):
    import trio

    from dbproxy.engines.ipmi import rmcp
    from dbproxy.engines.ipmi.console import BmcSession
    from dbproxy.engines.ipmi.rakp import SUITE_17

    bmc = ipmi.bmc
    bmc.set_power(False)
    before = len(bmc.actions())
    code = issue(ipmi, "rex")
    answers: dict = {}

    async def main():
        s = BmcSession("127.0.0.1", ipmi.port("ipmi"), SUITE_17, b"rex", code.encode())
        await s.open()
        await s.set_privilege(4)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(s.run)
            send, receive = trio.open_memory_channel(10)
            # Chassis Control "power up" with rqSeq 40, sent twice: the second is a retransmission (the same
            # rqSeq, netFn, command and data under a new session sequence number, as ipmitool resends)
            s._waiting[40] = send
            power_on = rmcp.Request(0x00, 0x02, b"\x01", rq_seq=40).encode()
            await s._send(s.seal(rmcp.PT_IPMI, power_on))
            answers["first"] = await receive.receive()
            await s._send(s.seal(rmcp.PT_IPMI, power_on))
            answers["again"] = await receive.receive()
            # the very same datagram twice (same session sequence number): the copy is a replay, dropped
            s._waiting[41] = send
            wire = s.seal(rmcp.PT_IPMI, rmcp.Request(0x00, 0x01, b"", rq_seq=41).encode())
            await s._send(wire)
            answers["status"] = await receive.receive()
            await s._send(wire)
            with trio.move_on_after(1.5):
                answers["replayed"] = await receive.receive()
            # garbage and a forged packet from the session's own address
            await s._send(b"garbage")
            forged = bytearray(s.seal(rmcp.PT_IPMI, rmcp.Request(0x00, 0x02, b"\x00", rq_seq=42).encode()))
            forged[-1] ^= 1  # a wrong AuthCode: a power off nobody may run
            await s._send(bytes(forged))
            answers["after"] = await s.request(0x00, 0x01)
            nursery.cancel_scope.cancel()
        await s.close()

    trio.run(main)
    assert answers["first"].cc == 0 and answers["again"] == answers["first"]
    assert bmc.actions()[before:] == ["power 1"]  # the BMC ran it once
    assert answers["status"].cc == 0 and answers["status"].data[0] & 1 == 1  # power is on
    assert "replayed" not in answers
    assert answers["after"].cc == 0 and bmc.power_state() == "on"
    (end,) = wait_events(ipmi, lambda e: e["event"] == "bmc.ipmi.session.end" and e.get("user") == "rex",
                         "the session end")
    assert end["retransmits"] == 1 and end["replayed"] == 1 and end["malformed"] == 2, end
    cmds = [e for e in events(ipmi) if e["event"] == "bmc.ipmi.command" and e.get("user") == "rex"]
    assert [e["command"] for e in cmds] == ["chassis.power_on", "chassis.power_status", "chassis.power_status"]


def test_rakp3_with_a_wrong_code_gets_invalid_integrity_check(ipmi):
    from dbproxy.engines.ipmi import rakp, rmcp

    good = issue(ipmi, "fred")
    con = rakp.ConsoleHandshake(rakp.SUITE_3, b"fred", b"W" * 20)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.connect(("127.0.0.1", ipmi.port("ipmi")))

        def exchange(payload_type, payload):
            s.send(rmcp.packet20_clear(payload_type, payload))
            return rmcp.parse(s.recv(1024)).payload

        rakp1 = con.rakp1(exchange(rmcp.PT_OPEN_SESSION_REQUEST, con.open_session_request()))
        rakp2 = rakp.Rakp2.decode(exchange(rmcp.PT_RAKP1, rakp1))
        assert rakp2.status == 0
        # not checking RAKP 2 (it would fail: another password), answer with an HMAC of the wrong code
        forged = rakp.Rakp3(2, 0, con.bmc_sid, rakp.rakp3_auth_code(
            rakp.SUITE_3, rakp.kuid(b"W" * 20), rakp2.bmc_random, con.console_sid, con.role, b"fred")).encode()
        rakp4 = rakp.Rakp4.decode(exchange(rmcp.PT_RAKP3, forged))
    assert rakp4.status == rakp.STATUS_INVALID_INTEGRITY_CHECK
    (e,) = wait_events(ipmi, lambda e: e["event"] == "bmc.ipmi.session.start" and e.get("ipmi_user") == "fred",
                       "the refused start")
    assert e["success"] is False and e["reason"] == "wrong_code" and e["rakp_status"] == 0x0F
    # the code was not consumed by the failed attempt
    assert ipmitool(ipmi, "fred", good, "chassis", "power", "status").returncode == 0


def test_bmc_hung_mid_session_gets_timeout_then_recovers(ipmi):
    """ipmi_sim stopped (SIGSTOP) under a running session: the proxy retries its request to the BMC (1 s, 3
    more times), answers C3h (timeout) and audits it; once the BMC runs again, the same session goes on."""
    import signal

    bmc = ipmi.bmc
    code = issue(ipmi, "hank")
    shell = subprocess.Popen(["ipmitool", "-I", "lanplus", "-C", "3", "-H", "127.0.0.1", "-p", str(ipmi.port("ipmi")),
                              "-U", "hank", "-P", code, "-N", "3", "-R", "3", "shell"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        shell.stdin.write("chassis power status\n")
        shell.stdin.flush()
        wait_events(ipmi, lambda e: e["event"] == "bmc.ipmi.response" and e.get("user") == "hank"
                    and e["command"] == "chassis.power_status", "a first answer")
        os.kill(bmc._proc.pid, signal.SIGSTOP)
        try:
            shell.stdin.write("chassis power status\n")
            shell.stdin.flush()
            (timeout,) = wait_events(ipmi, lambda e: e["event"] == "bmc.ipmi.response" and e.get("user") == "hank"
                                     and e["completion_code"] == 0xC3, "the timed-out request", timeout=20)
        finally:
            os.kill(bmc._proc.pid, signal.SIGCONT)
        shell.stdin.write("chassis power status\nexit\n")
        shell.stdin.flush()
        out, err = shell.communicate(timeout=60)
    finally:
        if shell.poll() is None:
            shell.kill()
    assert timeout["success"] is False and "did not answer" in timeout["error"]
    assert timeout["command"] == "chassis.power_status"
    assert out.count("Chassis Power is") == 2, out + err
    (end,) = wait_events(ipmi, lambda e: e["event"] == "bmc.ipmi.session.end" and e.get("user") == "hank", "the end")
    assert end["bmc_timeouts"] == 1 and end["bmc_retransmits"] >= 3 and end["reason"] == "client closed the session"


def test_bmc_gone_mid_session(ipmi):
    """The BMC process ends under a running session: the request in flight is answered CEh ("response
    could not be provided"), the session ends, and the audit says why."""
    doomed = ipmi.doomed
    code = issue(ipmi, "gina", "operator", "bmc-doomed")
    shell = subprocess.Popen(["ipmitool", "-I", "lanplus", "-C", "3", "-H", "127.0.0.1", "-p", str(ipmi.port("ipmi")),
                              "-U", "gina", "-P", code, "shell"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        shell.stdin.write("chassis power status\n")
        shell.stdin.flush()
        wait_events(ipmi, lambda e: e["event"] == "bmc.ipmi.response" and e.get("user") == "gina"
                    and e["command"] == "chassis.power_status", "a first answer")
        doomed.stop()
        shell.stdin.write("chassis power status\nexit\n")
        shell.stdin.flush()
        out, err = shell.communicate(timeout=60)
    finally:
        if shell.poll() is None:
            shell.kill()
    assert out.count("Chassis Power is") == 1, out + err
    assert "Command response could not be provided" in err  # ipmitool's text for CEh
    (end,) = wait_events(ipmi, lambda e: e["event"] == "bmc.ipmi.session.end" and e.get("user") == "gina", "the end")
    assert end["reason"].startswith("BMC connection lost") and "unreachable" in end["reason"], end
    failed = [e for e in events(ipmi) if e["event"] == "bmc.ipmi.response" and e.get("user") == "gina"
              and not e["success"] and e["command"] == "chassis.power_status"]
    assert [e["completion_code"] for e in failed] == [0xCE]


def test_ipmitool_without_a_cipher_suite_asks_and_gets_17(ipmi):
    """Without -C, ipmitool asks for the channel's cipher suites first (Get Channel Cipher Suites,
    session-less); the proxy lists its own (3 and 17) and ipmitool takes 17 — no stall on a dropped question."""
    code = issue(ipmi, "nico")
    started = time.monotonic()
    p = subprocess.run(["ipmitool", "-I", "lanplus", "-H", "127.0.0.1", "-p", str(ipmi.port("ipmi")), "-U", "nico",
                        "-P", code, "chassis", "power", "status"], capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - started
    assert p.returncode == 0 and "Chassis Power is" in p.stdout, p.stderr
    assert "Unable to Get Channel Cipher Suites" not in p.stderr and elapsed < 8, (elapsed, p.stderr)
    (e,) = wait_events(ipmi, lambda e: e["event"] == "bmc.ipmi.session.start" and e.get("user") == "nico",
                       "the session start")
    assert e["cipher_suite"] == 17


def test_bmc_hung_at_login(ipmi):
    """ipmi_sim stopped before the session: the proxy's login to it times out after its retries, the client
    gets RAKP 4 "insufficient resources" and the audit says the BMC did not answer."""
    import signal

    bmc = ipmi.bmc
    code = issue(ipmi, "lena")
    os.kill(bmc._proc.pid, signal.SIGSTOP)
    try:
        p = ipmitool(ipmi, "lena", code, "-v", "chassis", "power", "status")
        starts = wait_events(ipmi, lambda e: e["event"] == "bmc.ipmi.session.start" and e.get("ipmi_user") == "lena",
                             "the refused start")
    finally:
        os.kill(bmc._proc.pid, signal.SIGCONT)
    # ipmitool gives up waiting for RAKP 4 (the proxy waits for the BMC longer than ipmitool for RAKP 4)
    assert p.returncode != 0 and "Unable to establish IPMI v2" in p.stderr, p.stderr
    assert all(e["success"] is False and e["reason"] == "bmc_timeout" and "did not answer" in e["error"]
               for e in starts), starts
    # the code was not spent by the failed start: it works once the BMC answers again
    assert ipmitool(ipmi, "lena", code, "chassis", "power", "status").returncode == 0
