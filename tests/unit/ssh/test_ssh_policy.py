"""Exec policy: a role's deny patterns on each simple command of an exec line (engines/ssh/policy.py)."""

from __future__ import annotations

import pytest

from dbproxy.engines.ssh.policy import denied_exec, simple_commands
from dbproxy.roles import Grant

GRANT = Grant(roles=("ops",), deny_commands=("rm", "shutdown*", "systemctl stop*"), restricted=True)


@pytest.mark.parametrize("line, pieces", [
    ("ls -l", ["ls -l"]),
    ("echo a; rm -rf x", ["echo a", "rm -rf x"]),
    ("true && rm x || reboot", ["true", "rm x", "reboot"]),
    ("cat f | sudo rm x", ["cat f", "rm x"]),
    ("echo $(rm x) `shutdown now`", ["echo", "rm x", "shutdown now"]),
    ("LANG=C FOO=1 env rm x", ["rm x"]),
    ("sleep 1 & rm x\nuptime", ["sleep 1", "rm x", "uptime"]),
    ("(cd /tmp; rm x)", ["cd /tmp", "rm x"]),
])
def test_simple_commands(line, pieces):
    assert simple_commands(line) == pieces


@pytest.mark.parametrize("line, piece, pattern", [
    ("rm -rf /srv", "rm -rf /srv", "rm"),
    ("echo ok; rm x", "rm x", "rm"),
    ("sudo shutdown -h now", "shutdown -h now", "shutdown*"),
    ("RM x", "RM x", "rm"),  # the core's patterns are case-insensitive
    ("systemctl stop nginx", "systemctl stop nginx", "systemctl stop*"),
])
def test_denied(line, piece, pattern):
    assert denied_exec(GRANT, line) == (piece, pattern)


@pytest.mark.parametrize("line", ["ls", "echo rm", "systemctl status nginx", "rmdir x", "grep rm f"])
def test_allowed(line):
    assert denied_exec(GRANT, line) is None


def test_no_rules_no_refusal():
    assert denied_exec(None, "rm x") is None
    assert denied_exec(Grant(), "rm x") is None
