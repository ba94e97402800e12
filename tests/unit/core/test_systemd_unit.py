"""configs/systemd/dbproxy.service: systemd itself accepts the unit, and its commands are this CLI's.

``systemd-analyze verify`` parses the unit as systemd would at ``daemon-reload``
(unknown keys, bad values, commands that do not exist); the unit's
``/opt/dbproxy/venv/bin/dbproxy`` is pointed at this environment's ``dbproxy``
for the check.  Each Exec line is then parsed by the real argument parser.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support import peer_missing

ROOT = Path(__file__).resolve().parents[3]
UNIT = ROOT / "configs" / "systemd" / "dbproxy.service"


def _exec_lines() -> dict[str, list[str]]:
    out = {}
    for line in UNIT.read_text().splitlines():
        key, eq, value = line.partition("=")
        if eq and key in ("ExecStart", "ExecStartPre", "ExecReload"):
            out[key] = shlex.split(value)
    return out


def test_systemd_accepts_the_unit(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        peer_missing("systemd-analyze (Debian systemd) not installed: run scripts/install/haproxy.sh")
    dbproxy = shutil.which("dbproxy")
    assert dbproxy, "the dbproxy console script (pip install -e .)"
    unit = tmp_path / "dbproxy.service"
    unit.write_text(UNIT.read_text().replace("/opt/dbproxy/venv/bin/dbproxy", dbproxy))
    r = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, SYSTEMD_LOG_LEVEL="warning"))
    problems = [line for line in (r.stdout + r.stderr).splitlines() if "dbproxy.service" in line]
    assert r.returncode == 0 and not problems, r.stdout + r.stderr


@pytest.mark.parametrize("key, command", [("ExecStart", "serve"), ("ExecStartPre", "check-config"),
                                          ("ExecReload", "reload")])
def test_unit_commands_parse_with_this_cli(key, command):
    from dbproxy import cli

    argv = _exec_lines()[key][1:]
    args = cli.build_parser().parse_args(argv)  # SystemExit(2) on any option this CLI does not have
    assert args.command == command
    if command != "check-config":
        assert args.config == "/etc/dbproxy/proxy.json" and args.pid_file == "/run/dbproxy/dbproxy.pid"
