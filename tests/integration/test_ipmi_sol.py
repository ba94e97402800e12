"""Serial-over-LAN through the proxy: the real ``ipmitool -I lanplus sol activate`` (driven in tmux) in
front of OpenIPMI's ``ipmi_sim``, whose serial port is ``scripts/peers/serial_console.py``.

What is typed in ipmitool's terminal crosses both RMCP+ sessions (client ⇄ proxy ⇄ ipmi_sim), reaches
the serial console (its log), comes back as echo and output, and is in the proxy's asciicast recording;
the audit has ``bmc.ipmi.sol.start`` / ``.end`` with the recording's SHA-256.  A role without
``sol.activate_payload`` is refused (ipmitool prints the error), and a BMC that dies mid-session ends
the SOL activation with a reason.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import time
import uuid

import pytest

from dbproxy.terminal.recording import read_cast
from tests.support import TOKEN_IDENTITY, ProxyProcess, dbproxy_cli, peer_missing, read_audit, token_keygen, \
    wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SOL_ROLE = ["sol.*", "app.get_device_id", "chassis.power_status"]
NO_SOL_ROLE = ["chassis.power_status", "app.get_device_id"]


class Tmux:
    def __init__(self) -> None:
        self.socket = f"dbproxy-sol-{uuid.uuid4().hex[:8]}"

    def run(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True, check=True,
                              timeout=10).stdout

    def keys(self, *keys: str, literal: bool = False) -> None:
        self.run("send-keys", "-t", "t", *(("-l",) if literal else ()), *keys)

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", "t")

    def wait_for(self, text: str, timeout: float = 20.0, count: int = 1) -> str:
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if screen.count(text) >= count:
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} (x{count}) not on the screen:\n{screen}")
            time.sleep(0.1)

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=10)


def require_peers() -> None:
    for tool in ("ipmi_sim", "ipmitool", "tmux"):
        if shutil.which(tool) is None:
            peer_missing(f"{tool} (scripts/install/ipmi.sh; tmux)")


def start_bmc(base):
    """A serial console first (ipmi_sim connects to it when it starts), then ipmi_sim with SOL on it."""
    from scripts.peers.ipmi_sim import start_ipmi_sim
    from scripts.peers.serial_console import start_serial_console

    console = start_serial_console(base / "serial")
    try:
        sim = start_ipmi_sim(base / "bmc", sol_port=console.port)
    except Exception:
        console.stop()
        raise
    # ipmi_sim's serial connection is up when the console logged it.
    wait_until(lambda: console.connections() >= 2, timeout=15, what="ipmi_sim connected to the serial console")
    return sim, console


def proxy_config(sim, recordings) -> dict:
    backend = {"address": sim.address, "auth": {"method": "rakp", "username": sim.username,
                                                "password_file": str(sim.password_file)}}
    return {
        "identity": {"token": dict(TOKEN_IDENTITY)},
        "roles": {
            "console": {"routes": ["*"], "bmcs": ["bmc-*"], "ipmi": SOL_ROLE},
            "viewer": {"routes": ["*"], "bmcs": ["bmc-*"], "ipmi": NO_SOL_ROLE},
        },
        "listeners": [
            {"name": "ipmi", "protocol": "ipmi", "kind": "udp", "listen": "127.0.0.1:0",
             "auth": {"methods": ["token"]}, "recording": {"dir": str(recordings)},
             "routes": [{"name": "sim", "match": {"target": "bmc-*"}, "backend": backend}]},
        ],
        "audit": {"sinks": [{"type": "jsonl", "path": "audit.jsonl"}]},
    }


def make_env(base):
    """ipmi_sim with its serial console, and a proxy in front of it; stop with ``stop_env``."""
    require_peers()
    sim, console = start_bmc(base)
    workdir = base / "proxy"
    workdir.mkdir()
    recordings = workdir / "recordings"
    recordings.mkdir()
    token_keygen(workdir)
    try:
        proc = ProxyProcess(workdir, proxy_config(sim, recordings)).start()
    except Exception:
        sim.stop()
        console.stop()
        raise
    proc.audit_path = workdir / "audit.jsonl"
    proc.recordings = recordings
    proc.sim, proc.console = sim, console
    return proc


def stop_env(proc) -> None:
    proc.stop()
    proc.sim.stop()
    proc.console.stop()


@pytest.fixture(scope="module")
def sol_env(tmp_path_factory):
    proc = make_env(tmp_path_factory.mktemp("sol"))
    yield proc
    stop_env(proc)


@pytest.fixture
def own_env(tmp_path):
    """A BMC of the test's own: the test breaks it."""
    proc = make_env(tmp_path)
    yield proc
    if proc.sim.running():
        os.kill(proc.sim._proc.pid, signal.SIGCONT)    # a hung (SIGSTOPped) ipmi_sim cannot terminate
    stop_env(proc)


def issue(proc, user: str, role: str) -> str:
    p = dbproxy_cli("token", "issue", "--config", str(proc.config_path), "--ipmi", "--user", user, "--roles", role,
                    "--target", "bmc-1", check=True)
    code = p.stdout.strip()
    assert len(code) == 20, p.stdout
    return code


def ipmitool_args(proc, user: str, code: str, *args: str, suite: int = 3) -> list[str]:
    return ["ipmitool", "-I", "lanplus", "-C", str(suite), "-H", "127.0.0.1", "-p", str(proc.port("ipmi")), "-U", user,
            "-P", code, "-N", "1", "-R", "3", *args]


def open_sol(proc, user: str, role: str = "console", suite: int = 3) -> Tmux:
    tmux = Tmux()
    cmd = " ".join(ipmitool_args(proc, user, issue(proc, user, role), "sol", "activate", suite=suite)) + \
        "; echo IPMITOOL-EXIT=$?; sleep 120"
    tmux.run("new-session", "-d", "-s", "t", "-x", "120", "-y", "40", cmd)
    return tmux


def audit(proc, user: str | None = None) -> list[dict]:
    events = read_audit(proc.audit_path)
    return [e for e in events if user is None or e.get("user") == user]


def wait_event(proc, user: str, kind: str, timeout: float = 20.0) -> dict:
    found: list[dict] = []

    def check() -> bool:
        found[:] = [e for e in audit(proc, user) if e["event"] == kind]
        return bool(found)

    wait_until(check, timeout=timeout, what=f"{kind} for {user}")
    return found[-1]


def test_typed_text_comes_back_and_is_recorded(sol_env):
    proc, console = sol_env, sol_env.console
    user = "solana"
    seen_before = len(console.lines())
    tmux = open_sol(proc, user)
    try:
        tmux.wait_for("[SOL Session operational")
        tmux.keys("echo typed-through-the-proxy-$((6*7))", literal=True)
        tmux.keys("Enter")
        # the echo of the typed line, then the console's answer (the shell does not expand $((…)))
        tmux.wait_for("typed-through-the-proxy-$((6*7))", count=2)
        tmux.keys("hostname", "Enter")
        tmux.wait_for("\nsol-target-01")
        # A serial login's password: typed at a prompt that does not echo.
        tmux.keys("secret", "Enter")
        tmux.wait_for("Password:")
        tmux.keys("hunter2-on-the-serial-line", literal=True)
        tmux.keys("Enter")
        tmux.wait_for("authenticated")
        tmux.keys("Enter")
        tmux.keys("~.", literal=True)
        tmux.wait_for("IPMITOOL-EXIT=0")
    finally:
        tmux.kill()
    # The host got every line once, in order.
    assert console.lines()[seen_before:] == ["echo typed-through-the-proxy-$((6*7))", "hostname", "secret",
                                             "hunter2-on-the-serial-line", ""]
    start = wait_event(proc, user, "bmc.ipmi.sol.start")
    end = wait_event(proc, user, "bmc.ipmi.sol.end")
    assert start["instance"] == 1 and start["encrypted"] is True
    assert end["reason"] == "deactivated by the client" and end["success"] is True
    assert end["recording"] == start["recording"]
    path = proc.recordings / end["recording"]
    assert end["recording_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert end["recording_bytes"] == path.stat().st_size
    _, events = read_cast(str(path))
    shown = "".join(text for _, kind, text in events if kind == "o")
    assert "typed-through-the-proxy-$((6*7))" in shown and "sol-target-01" in shown and "authenticated" in shown
    commands = [e["command"] for e in audit(proc, user) if e["event"] == "bmc.ipmi.sol.shell.command"]
    assert commands[:2] == ["echo typed-through-the-proxy-$((6*7))", "hostname"]
    hidden = [e for e in audit(proc, user) if e["event"] == "bmc.ipmi.sol.shell.hidden_input"]
    assert [e["bytes"] for e in hidden] == [len("hunter2-on-the-serial-line")]
    session_end = wait_event(proc, user, "bmc.ipmi.session.end")
    assert [r["recording_sha256"] for r in session_end["recordings"]] == [end["recording_sha256"]]
    # The password typed at the serial console reached the host, and nothing of the proxy's.
    assert "hunter2" not in proc.audit_path.read_text()
    assert "hunter2" not in proc.log_text()
    for f in proc.recordings.iterdir():
        assert b"hunter2" not in f.read_bytes(), f
    commands_audited = [e["command"] for e in audit(proc, user) if e["event"] == "bmc.ipmi.command"]
    assert "sol.activate_payload" in commands_audited and "sol.deactivate_payload" in commands_audited


def test_sol_over_cipher_suite_17(sol_env):
    """HMAC-SHA256 and AES-CBC-128 toward the client (suite 17), suite 3 toward ipmi_sim: the SOL
    packets are re-sealed per leg."""
    proc = sol_env
    user = "sieben"
    tmux = open_sol(proc, user, suite=17)
    try:
        tmux.wait_for("[SOL Session operational")
        tmux.keys("echo suite-seventeen", "Enter")
        tmux.wait_for("suite-seventeen", count=2)
        tmux.keys("Enter")
        tmux.keys("~.", literal=True)
        tmux.wait_for("IPMITOOL-EXIT=0")
    finally:
        tmux.kill()
    start = wait_event(proc, user, "bmc.ipmi.session.start")
    assert start["cipher_suite"] == 17
    end = wait_event(proc, user, "bmc.ipmi.sol.end")
    assert end["reason"] == "deactivated by the client" and end["bytes_in"] == len("echo suite-seventeen\r\r")  # and the Enter before ~.


def test_multi_packet_output_arrives_whole(sol_env):
    """300 lines (~12 KB) from the host: dozens of SOL packets on each leg, each ACKed, in order."""
    proc = sol_env
    user = "florian"
    tmux = open_sol(proc, user)
    try:
        tmux.wait_for("[SOL Session operational")
        tmux.keys("flood 300", "Enter")
        tmux.wait_for("line 00300 of the flood")
        tmux.keys("Enter")
        tmux.keys("~.", literal=True)
        tmux.wait_for("IPMITOOL-EXIT=0")
    finally:
        tmux.kill()
    end = wait_event(proc, user, "bmc.ipmi.sol.end")
    _, events = read_cast(str(proc.recordings / end["recording"]))
    shown = "".join(text for _, kind, text in events if kind == "o")
    numbers = [int(line.split()[1]) for line in shown.splitlines() if line.startswith("line ")]
    assert numbers == list(range(1, 301))
    assert end["bytes_out"] >= 300 * len("line 00001 of the flood sol-target-01\r\n")


def test_role_without_sol_is_refused(sol_env):
    proc = sol_env
    user = "viktor"
    p = subprocess.run(ipmitool_args(proc, user, issue(proc, user, "viewer"), "sol", "activate"),
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert p.returncode != 0
    assert "Insufficient privilege level" in p.stderr, p.stderr
    wait_event(proc, user, "bmc.ipmi.session.end")
    [refused] = [e for e in audit(proc, user) if e["event"] == "bmc.ipmi.command"
                 and e["command"] == "sol.activate_payload"]
    assert refused["refused"] is True and refused["completion_code"] == 0xD4
    assert not [e for e in audit(proc, user) if e["event"].startswith("bmc.ipmi.sol.")]


@pytest.mark.parametrize("how", ["killed", "hung"])
def test_bmc_going_away_ends_the_sol_session_with_a_reason(own_env, how):
    """killed: ipmi_sim exits (its port answers ICMP unreachable: the IPMI session ends, SOL with it);
    hung: ipmi_sim stopped with SIGSTOP (nothing answers at all): the SOL leg toward the BMC
    retransmits the typed line and gives up — ``bmc_unresponsive``."""
    proc, sim = own_env, own_env.sim
    user = "bruno"
    tmux = open_sol(proc, user)
    try:
        tmux.wait_for("[SOL Session operational")
        tmux.keys("echo before-the-bmc-dies", "Enter")
        tmux.wait_for("before-the-bmc-dies", count=2)
        if how == "killed":
            sim.stop()
        else:
            os.kill(sim._proc.pid, signal.SIGSTOP)
        tmux.keys("echo after-the-bmc-died", "Enter")
        end = wait_event(proc, user, "bmc.ipmi.sol.end", timeout=30)
    finally:
        tmux.kill()
    assert end["success"] is False
    if how == "killed":
        assert end["reason"].startswith("BMC connection lost"), end
    else:
        assert end["reason"] == "bmc_unresponsive", end
        assert end["retransmits"] >= 5 and "not acknowledged" in end["error"]
    path = proc.recordings / end["recording"]
    assert end["recording_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    _, events = read_cast(str(path))
    assert "before-the-bmc-dies" in "".join(text for _, kind, text in events if kind == "o")


def test_serial_console_going_away_keeps_the_session_up(own_env):
    """The serial side hangs up mid-session.  ipmi_sim does not tell the console: it ACKs and drops
    what is typed (and, OpenIPMI 2.0.33, its reconnect timer is the SOL retransmit timer, which our
    ACK of the last output stops — it stays disconnected).  There is nothing in the protocol for the
    proxy to end on: the SOL session stays up, no ``bmc.ipmi.sol.end`` is written until the client
    deactivates, and what was typed into the void is in neither the console's log nor any output."""
    proc, console = own_env, own_env.console
    user = "hanna"
    tmux = open_sol(proc, user)
    try:
        tmux.wait_for("[SOL Session operational")
        tmux.keys("hangup", "Enter")
        tmux.wait_for("hanging up")
        wait_until(lambda: console.events()[-1].get("event") == "disconnect", timeout=10, what="the hangup")
        tmux.keys("echo into-the-void", "Enter")
        time.sleep(2.5)                                    # longer than the proxy's retry interval
        assert "into-the-void" not in tmux.screen()       # no echo: nobody at the serial port
        assert not [e for e in audit(proc, user) if e["event"] == "bmc.ipmi.sol.end"]
        tmux.keys("Enter")
        tmux.keys("~.", literal=True)
        tmux.wait_for("IPMITOOL-EXIT=0")
    finally:
        tmux.kill()
    end = wait_event(proc, user, "bmc.ipmi.sol.end")
    assert end["reason"] == "deactivated by the client" and end["success"] is True
    assert end["retransmits"] == 0                         # ipmi_sim ACKed what it dropped
    assert "echo into-the-void" not in console.lines()
    _, events = read_cast(str(proc.recordings / end["recording"]))
    shown = "".join(text for _, kind, text in events if kind == "o")
    assert "hanging up" in shown and "into-the-void" not in shown
