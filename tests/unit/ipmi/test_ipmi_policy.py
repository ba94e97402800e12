"""IPMI command names, the per-role allow-list and the engine's configuration (engines/ipmi/commands.py,
config.py)."""

from __future__ import annotations

import json

import pytest

from dbproxy.config import load_config
from dbproxy.errors import ConfigErrors
from dbproxy.registry import default_registry
from dbproxy.engines.ipmi.commands import Policy, command_name, data_summary


def test_command_names():
    assert command_name(0x00, 0x01) == "chassis.power_status"
    assert [command_name(0x00, 0x02, bytes((b,))) for b in range(6)] == [
        "chassis.power_off", "chassis.power_on", "chassis.power_cycle", "chassis.power_reset",
        "chassis.power_diag_interrupt", "chassis.power_soft"]
    assert command_name(0x04, 0x2D) == "sensor.read" and command_name(0x0A, 0x43) == "sel.read"
    assert command_name(0x06, 0x01) == "app.get_device_id" and command_name(0x06, 0x48) == "sol.activate_payload"
    assert command_name(0x30, 0x99) == "raw.30.99"
    assert data_summary(bytes(range(20))) == bytes(range(16)).hex() + "…"


def test_policy_is_an_allow_list():
    reader = Policy.from_grant((["chassis.power_status", "sensor.*"], ["sel.read*"]))
    assert reader.allows("chassis.power_status") and reader.allows("sensor.read") and reader.allows("sel.read_info")
    assert not reader.allows("chassis.power_on") and not reader.allows("raw.30.99")
    assert not Policy.from_grant(()).allows("chassis.power_status")  # roles granting the BMC but no commands
    unrestricted = Policy.from_grant(None)  # no RBAC configured: the table, but no raw or account commands
    assert unrestricted.allows("chassis.power_on")
    assert not unrestricted.allows("raw.30.99") and not unrestricted.allows("app.user.set_password")


def _config(tmp_path, **changes):
    (tmp_path / "pw").write_text("secret\n")
    listener = {"name": "ipmi", "protocol": "ipmi", "kind": "udp", "listen": "127.0.0.1:0",
                "auth": {"methods": ["token"]},
                "routes": [{"name": "r", "match": {"target": "bmc-*"},
                            "backend": {"address": "127.0.0.1:623", "cipher_suite": 17, "privilege": "operator",
                                        "auth": {"method": "rakp", "username": "admin",
                                                 "password_file": str(tmp_path / "pw")}}}]}
    listener.update(changes.pop("listener", {}))
    doc = {"identity": {"token": {"algorithm": "HS256", "key_file": str(tmp_path / "k"),
                                  "registry_file": str(tmp_path / "reg.json")}},
           "roles": {"op": {"routes": ["*"], "bmcs": ["bmc-*"], "ipmi": changes.pop("ipmi", ["chassis.*"])}},
           "listeners": [listener], "audit": {"sinks": [{"type": "jsonl", "path": str(tmp_path / "a.jsonl")}]}}
    (tmp_path / "k").write_text("a" * 43 + "\n")
    (tmp_path / "k").chmod(0o600)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(doc))
    return load_config(str(path), default_registry())


def test_config_accepts_a_valid_listener(tmp_path):
    cfg = _config(tmp_path)
    (lc,) = cfg.listeners
    assert lc.extra["cipher_suites"] == (3, 17)
    assert lc.routes[0].backend.extra == {"cipher_suite": 17, "privilege": 3}


@pytest.mark.parametrize("change, where", [
    ({"listener": {"kind": "tcp"}}, "listeners[0].kind"),
    ({"listener": {"cipher_suites": [3, 1]}}, "listeners[0].cipher_suites"),
    ({"ipmi": ["chassis.powr_*"]}, "roles.op.ipmi[0]"),
    ({"ipmi": "chassis.*"}, "roles.op.ipmi"),
])
def test_config_errors_name_the_place(tmp_path, change, where):
    with pytest.raises(ConfigErrors) as exc:
        _config(tmp_path, **change)
    assert any(where in str(e) for e in exc.value.errors), [str(e) for e in exc.value.errors]
