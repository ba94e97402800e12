"""IPMI command names and the per-role allow-list (sans-IO, no trio).

Strategy.  Deny by default.  Every request the client sends inside its
session gets a name from the table below (NetFn/command, IPMI v2.0 appendix
G; Chassis Control is named by its control byte, §28.3), and a role's
``ipmi`` key lists globs of the names it may run:

    "roles": {"viewer":   {"bmcs": ["bmc-*"], "ipmi": ["chassis.power_status", "sensor.*", "sel.read*",
                                                       "app.get_device_id"]},
              "operator": {"bmcs": ["bmc-*"], "ipmi": ["chassis.*", "sensor.*", "sel.*", "app.*"]}}

A request is allowed when any granting role has a glob matching its name
(``fnmatch``, case-sensitive).  Commands outside the table are named
``raw.<netfn>.<cmd>`` (two hex digits each), so ``raw.*`` is the explicit
way to allow anything.  A refused request is answered by the proxy with
completion code D4h ("insufficient privilege level", §5.2 table 5-2); an
unparsable one is dropped.

The proxy answers some requests itself (they are about the client's session
with the proxy, not the BMC): Get Channel Authentication Capabilities, Set
Session Privilege Level, Close Session.  Session-management commands that
would reach the BMC's own accounts or sessions (Set User Password/Access,
Activate Session…) are in the table too, under ``app.user.*`` /
``app.session.*``: no role grants them unless it names them.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Iterable

# NetFns (IPMI v2.0 §5.1, table 5-1)
NETFN_CHASSIS = 0x00
NETFN_BRIDGE = 0x02
NETFN_SENSOR = 0x04
NETFN_APP = 0x06
NETFN_FIRMWARE = 0x08
NETFN_STORAGE = 0x0A
NETFN_TRANSPORT = 0x0C
NETFN_GROUP = 0x2C

CMD_GET_CHANNEL_AUTH_CAPS = 0x38
CMD_SET_SESSION_PRIVILEGE = 0x3B
CMD_CLOSE_SESSION = 0x3C
CMD_GET_CHANNEL_CIPHER_SUITES = 0x54
CMD_ACTIVATE_PAYLOAD = 0x48
CMD_DEACTIVATE_PAYLOAD = 0x49
CMD_CHASSIS_CONTROL = 0x02

# Completion codes (§5.2, table 5-2)
CC_OK = 0x00
CC_NODE_BUSY = 0xC0
CC_INVALID_COMMAND = 0xC1
CC_TIMEOUT = 0xC3
CC_REQUEST_DATA_LENGTH = 0xC7
CC_INVALID_DATA = 0xCC
CC_CANNOT_RESPOND = 0xCE
CC_INSUFFICIENT_PRIVILEGE = 0xD4
CC_UNSPECIFIED = 0xFF

COMMANDS: dict[tuple[int, int], str] = {
    # Chassis (§28)
    (0x00, 0x00): "chassis.get_capabilities",
    (0x00, 0x01): "chassis.power_status",  # Get Chassis Status
    (0x00, 0x03): "chassis.reset_legacy",  # Chassis Reset (an IPMI v1.0 command)
    (0x00, 0x04): "chassis.identify",
    (0x00, 0x05): "chassis.set_capabilities",
    (0x00, 0x06): "chassis.set_power_restore_policy",
    (0x00, 0x07): "chassis.get_restart_cause",
    (0x00, 0x08): "chassis.set_boot_options",
    (0x00, 0x09): "chassis.get_boot_options",
    (0x00, 0x0A): "chassis.set_front_panel_buttons",
    (0x00, 0x0F): "chassis.get_poh_counter",
    # Sensor / event (§29, §35)
    (0x04, 0x02): "sensor.platform_event",
    (0x04, 0x20): "sensor.get_device_sdr_info",
    (0x04, 0x21): "sensor.get_device_sdr",
    (0x04, 0x22): "sensor.reserve_device_sdr",
    (0x04, 0x23): "sensor.read_factors",
    (0x04, 0x26): "sensor.set_thresholds",
    (0x04, 0x27): "sensor.read_thresholds",
    (0x04, 0x29): "sensor.read_event_enable",
    (0x04, 0x2B): "sensor.read_event_status",
    (0x04, 0x2D): "sensor.read",  # Get Sensor Reading
    (0x04, 0x2F): "sensor.read_type",
    # App (§20–§22)
    (0x06, 0x01): "app.get_device_id",
    (0x06, 0x02): "app.cold_reset",
    (0x06, 0x03): "app.warm_reset",
    (0x06, 0x04): "app.get_selftest",
    (0x06, 0x08): "app.get_device_guid",
    (0x06, 0x22): "app.watchdog_reset",
    (0x06, 0x24): "app.watchdog_set",
    (0x06, 0x25): "app.watchdog_get",
    (0x06, 0x2E): "app.set_bmc_global_enables",
    (0x06, 0x2F): "app.get_bmc_global_enables",
    (0x06, 0x34): "app.send_message",  # bridging to another channel: a way around the allow-list
    (0x06, 0x37): "app.get_system_guid",
    (0x06, 0x38): "app.get_channel_auth_caps",
    (0x06, 0x39): "app.session.get_challenge",
    (0x06, 0x3A): "app.session.activate",
    (0x06, 0x3B): "app.session.set_privilege",
    (0x06, 0x3C): "app.session.close",
    (0x06, 0x3D): "app.session.get_info",
    (0x06, 0x40): "app.channel.set_access",
    (0x06, 0x41): "app.channel.get_access",
    (0x06, 0x42): "app.channel.get_info",
    (0x06, 0x43): "app.user.set_access",
    (0x06, 0x44): "app.user.get_access",
    (0x06, 0x45): "app.user.set_name",
    (0x06, 0x46): "app.user.get_name",
    (0x06, 0x47): "app.user.set_password",
    (0x06, 0x48): "sol.activate_payload",
    (0x06, 0x49): "sol.deactivate_payload",
    (0x06, 0x4A): "sol.payload_activation_status",
    (0x06, 0x4B): "sol.payload_instance_info",
    (0x06, 0x4E): "app.get_payload_support",
    (0x06, 0x54): "app.get_channel_cipher_suites",
    # Storage: FRU, SDR repository, SEL (§31–§34)
    (0x0A, 0x10): "fru.get_inventory_area_info",
    (0x0A, 0x11): "fru.read",
    (0x0A, 0x12): "fru.write",
    (0x0A, 0x20): "sdr.get_repository_info",
    (0x0A, 0x21): "sdr.get_allocation_info",
    (0x0A, 0x22): "sdr.reserve",
    (0x0A, 0x23): "sdr.read",  # Get SDR
    (0x0A, 0x40): "sel.read_info",
    (0x0A, 0x41): "sel.read_allocation_info",
    (0x0A, 0x42): "sel.reserve",
    (0x0A, 0x43): "sel.read",  # Get SEL Entry
    (0x0A, 0x44): "sel.add",
    (0x0A, 0x46): "sel.delete",
    (0x0A, 0x47): "sel.clear",
    (0x0A, 0x48): "sel.read_time",
    (0x0A, 0x49): "sel.set_time",
    # Transport: LAN / SOL configuration (§23, §26)
    (0x0C, 0x01): "lan.set_config",
    (0x0C, 0x02): "lan.get_config",
    (0x0C, 0x21): "sol.set_config",
    (0x0C, 0x22): "sol.get_config",
    # Group extensions (§5.1: first data byte names the body): consoles probe them (PICMG, DCMI)
    (0x2C, 0x00): "group.get_properties",
    (0x2C, 0x01): "group.dcmi_capabilities",
    (0x2C, 0x3E): "group.hpm_capabilities",
}

# Chassis Control (§28.3): the control byte names the action.
CHASSIS_CONTROL = {0: "chassis.power_off", 1: "chassis.power_on", 2: "chassis.power_cycle",
                   3: "chassis.power_reset", 4: "chassis.power_diag_interrupt", 5: "chassis.power_soft"}


def command_name(netfn: int, cmd: int, data: bytes = b"") -> str:
    if (netfn, cmd) == (NETFN_CHASSIS, CMD_CHASSIS_CONTROL):
        if data:
            return CHASSIS_CONTROL.get(data[0] & 0x0F, f"chassis.control_{data[0] & 0x0F:#04x}")
        return "chassis.control"
    return COMMANDS.get((netfn, cmd)) or f"raw.{netfn:02x}.{cmd:02x}"


def data_summary(data: bytes, limit: int = 16) -> str:
    """The request data as the audit shows it: hex, cut at ``limit`` bytes (the length is a separate field)."""
    text = data[:limit].hex()
    return text + ("…" if len(data) > limit else "")


class Policy:
    """The allow-list of one session: the union of its granting roles' ``ipmi`` globs."""

    def __init__(self, globs: Iterable[str] | None) -> None:
        # None: no RBAC configured (an unrestricted listener): everything in the table, nothing raw.
        self.unrestricted = globs is None
        self.globs = tuple(globs or ())

    @classmethod
    def from_grant(cls, values: tuple | None) -> "Policy":
        if values is None:
            return cls(None)
        globs: list[str] = []
        for value in values:
            globs.extend(g for g in value if g not in globs)
        return cls(globs)

    def allows(self, name: str) -> bool:
        if self.unrestricted:
            return not name.startswith(("raw.", "app.user.", "app.session.", "app.channel.set", "lan.set"))
        return any(fnmatch.fnmatchcase(name, g) for g in self.globs)


def validate_role_key(key: str, v: Any, value: Any, path: str) -> Any:
    """A role's ``ipmi`` key: a list of command-name globs."""
    if not isinstance(value, list) or not all(isinstance(g, str) and g for g in value):
        v.err(path, "a list of IPMI command names or globs (e.g. [\"chassis.power_status\", \"sensor.*\"])")
        return ()
    known = set(COMMANDS.values()) | set(CHASSIS_CONTROL.values())
    for i, glob in enumerate(value):
        if not glob.startswith("raw.") and not any(fnmatch.fnmatchcase(n, glob) for n in known):
            v.err(f"{path}[{i}]", f"a glob matching a known IPMI command name or raw.<netfn>.<cmd> ({glob!r} "
                  "matches none: see docs/engines.md, IPMI)")
    return tuple(value)
