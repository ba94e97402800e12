"""A private OpenIPMI ``ipmi_sim`` as the BMC of the IPMI tests (Debian openipmi, scripts/install/ipmi.sh).

Strategy: ``start_ipmi_sim(dir)`` writes, in a fresh directory of its own,

- ``lan.conf``: one LAN channel on a loopback UDP port (RMCP+), privilege
  limit admin, one BMC account (``username``/``password``, admin) — the
  credential only the proxy holds — and optionally ``sol
  "telnet:127.0.0.1:PORT" 115200`` (``sol_port=``: the SOL helper's serial
  program listens there);
- ``sim.emu``: the emulator commands; it must begin with ``mc_setbmc 0x20``
  (else ipmi_sim exits silently), then one MC with chassis support;
- ``chassis_control``: the power control script ipmi_sim runs for Chassis
  Control / Get Chassis Status (``<dev> get power`` / ``<dev> set power 1``):
  it keeps the power state in ``power`` and appends every action to
  ``actions`` — what the tests read (``power_state()``, ``actions()``) to see
  that a command reached the BMC, and how often.

and runs ``ipmi_sim -c lan.conf -f sim.emu -s state -n`` (no stdio console).
ipmi_sim of OpenIPMI 2.0.33 speaks cipher suites 0–3 (RAKP-HMAC-SHA1) but not
17: the proxy talks suite 3 to it whatever the client uses.  Its process
life (``stop()`` terminates it) is ``scripts.peers.process.PeerProcess``.
Runnable: ``python -m scripts.peers.ipmi_sim [DIR]`` prints the connection
info as JSON and waits for Ctrl-C.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import attrs

from scripts.peers import free_port_tcp_udp
from scripts.peers.process import PeerProcess, run_in_foreground

__all__ = ["IpmiSim", "start_ipmi_sim"]

CHASSIS_CONTROL = r"""#!/bin/sh
# ipmi_sim's chassis control (see OpenIPMI's ipmi_sim_chassiscontrol): <device> get|set parm [val]…
dir=$(dirname "$0")
shift
op=$1
shift
case $op in
get)
    for p in "$@"; do
        case $p in
            power) echo "power:$(cat "$dir/power" 2>/dev/null || echo 0)" ;;
            boot) echo "boot:default" ;;
            *) echo "Invalid parameter: $p"; exit 1 ;;
        esac
    done ;;
set)
    while [ $# -gt 1 ]; do
        p=$1; v=$2; shift 2
        echo "$p $v" >> "$dir/actions"
        case $p in
            power) echo "$v" > "$dir/power" ;;
            reset|boot|identify) ;;
            *) echo "Invalid parameter: $p"; exit 1 ;;
        esac
    done ;;
*) exit 1 ;;
esac
"""


@attrs.define(eq=False)
class IpmiSim(PeerProcess):
    dir: Path
    port: int
    username: str
    password: str
    sol_port: int | None = None
    host: str = "127.0.0.1"
    _proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def password_file(self) -> Path:
        return self.dir / "bmc-password"

    @property
    def log_file(self) -> Path:
        return self.dir / "ipmi_sim.log"

    def write_config(self) -> None:
        d = self.dir
        (d / "state").mkdir(exist_ok=True)
        control = d / "chassis_control"
        control.write_text(CHASSIS_CONTROL)
        control.chmod(0o755)
        lines = [
            'name "dbproxytest"',
            "set_working_mc 0x20",
            "  startlan 1",
            f"    addr {self.host} {self.port}",
            "    priv_limit admin",
            "    allowed_auths_callback none md5 straight",
            "    allowed_auths_user none md5 straight",
            "    allowed_auths_operator none md5 straight",
            "    allowed_auths_admin none md5 straight",
            "    guid a123456789abcdefa123456789abcdef",
            "  endlan",
            f'  chassis_control "{control} 0x20"',
            f'  user 2 true "{self.username}" "{self.password}" admin 10 none md5 straight',
        ]
        if self.sol_port is not None:
            lines.append(f'  sol "telnet:127.0.0.1:{self.sol_port}" 115200')
        (d / "lan.conf").write_text("\n".join(lines) + "\n")
        # ipmi_sim exits silently unless the emulator file begins with mc_setbmc (TESTENV.md).
        (d / "sim.emu").write_text("mc_setbmc 0x20\n"
                                   "mc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02 persist_sdr\n"
                                   "mc_enable 0x20\n")

    def start(self, timeout: float = 10.0) -> "IpmiSim":
        exe = shutil.which("ipmi_sim")
        if exe is None:
            raise RuntimeError("ipmi_sim not installed (scripts/install/ipmi.sh)")
        self._spawn([exe, "-c", str(self.dir / "lan.conf"), "-f", str(self.dir / "sim.emu"), "-s", str(self.dir / "state"),
                     "-n"], log=self.log_file, cwd=self.dir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"ipmi_sim exited ({self._proc.returncode}):\n{self.log_text()}")
            if self.answers_ping():
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"ipmi_sim did not answer an RMCP presence ping on {self.address}:\n{self.log_text()}")

    def answers_ping(self) -> bool:
        """An ASF presence ping (RMCP class 06h) answered: the LAN channel is up."""
        ping = bytes((0x06, 0x00, 0xFF, 0x06, 0x00, 0x00, 0x11, 0xBE, 0x80, 0x01, 0x00, 0x00))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.2)
            try:
                s.sendto(ping, (self.host, self.port))
                data = s.recv(512)
            except OSError:
                return False
        return len(data) >= 12 and data[8] == 0x40

    # -- the tests' view of the BMC ------------------------------------------------------------
    def power_state(self) -> str:
        try:
            return "on" if (self.dir / "power").read_text().strip() == "1" else "off"
        except FileNotFoundError:
            return "off"

    def set_power(self, on: bool) -> None:
        (self.dir / "power").write_text("1\n" if on else "0\n")

    def actions(self) -> list[str]:
        """Every chassis control action the simulator ran (``power 1``, ``reset 1``…), in order."""
        try:
            return (self.dir / "actions").read_text().splitlines()
        except FileNotFoundError:
            return []

    def info(self) -> dict:
        return {"address": self.address, "username": self.username, "password_file": str(self.password_file),
                "dir": str(self.dir), "sol_port": self.sol_port}


def start_ipmi_sim(base_dir: str | Path, *, port: int | None = None, username: str = "bmcadmin",
                   sol_port: int | None = None) -> IpmiSim:
    """lan.conf, sim.emu, chassis_control and a running ipmi_sim under *base_dir* on a free loopback port."""
    base = Path(base_dir)
    base.mkdir(parents=True, exist_ok=True)
    dir = Path(tempfile.mkdtemp(prefix="ipmisim-", dir=base))
    # The BMC secret (≤ 20 bytes, IPMI v2.0): it must never reach a client or the audit.
    password = "bmc" + secrets.token_hex(8)
    (dir / "bmc-password").write_text(password + "\n")
    os.chmod(dir / "bmc-password", 0o600)
    for _ in range(5):
        sim = IpmiSim(dir=dir, port=port or free_port_tcp_udp(), username=username, password=password, sol_port=sol_port)
        sim.write_config()
        try:
            return sim.start()
        except RuntimeError:
            if port is not None:
                raise
            time.sleep(0.1)
    raise RuntimeError("ipmi_sim: no free port after 5 tries")


if __name__ == "__main__":
    sys.exit(run_in_foreground(start_ipmi_sim, sys.argv[1] if len(sys.argv) > 1 else None, prefix="ipmisim-"))
