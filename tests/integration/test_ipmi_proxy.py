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

from scripts.peers import free_port_tcp_udp
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
def ipmi(bmc, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ipmiproxy")
    token_keygen(workdir)
    down_port = free_port_tcp_udp()  # nothing listens there: that BMC is down

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
             "auth": {"methods": ["token"]},
             "routes": [
                 {"name": "down", "match": {"target": "bmc-down"}, "backend": backend(f"127.0.0.1:{down_port}")},
                 {"name": "wrong", "match": {"target": "bmc-wrong"},
                  "backend": {**backend(), "auth": {"method": "rakp", "username": bmc.username,
                                                    "password_env": "WRONG_BMC_PASSWORD"}}},
                 {"name": "sim", "match": {"target": "bmc-*"}, "backend": backend()},
             ]},
        ],
        "audit": {"sinks": [{"type": "jsonl", "path": "audit.jsonl"}]},
    }
    proc = ProxyProcess(workdir, config, env={"WRONG_BMC_PASSWORD": "not-the-password"}).start()
    proc.audit_path = workdir / "audit.jsonl"
    proc.bmc = bmc
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
                       and e["command"].startswith("chassis.power_o"), "power commands")
    assert [(e["command"], e["refused"]) for e in cmds] == [("chassis.power_on", False), ("chassis.power_off", False)]
    ends = wait_events(ipmi, lambda e: e["event"] == "bmc.ipmi.session.end" and e.get("user") == user,
                       "session ends", count=4)
    assert len(ends) == 4 and all(e["reason"] == "client closed the session" for e in ends), ends
