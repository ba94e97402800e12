"""Protocol engines.

Engines are registered explicitly here, never as an import side effect:
``default_registry()`` is the one place that says which protocols a proxy
process speaks.
"""

from __future__ import annotations

from dbproxy.engine import EngineRegistry


def default_registry() -> EngineRegistry:
    from .cassandra.engine import CassandraEngine
    from .ipmi.engine import IpmiEngine
    from .mongo.engine import MongoEngine
    from .postgres.engine import PostgresEngine
    from .rdp.engine import RDPEngine
    from .redfish.engine import RedfishEngine
    from .ssh.commands import SSHCommandsEngine
    from .ssh.engine import SSHEngine
    from .telnet.engine import TelnetEngine
    from .vnc.engine import VNCEngine

    registry = EngineRegistry()
    registry.register("postgres", PostgresEngine)
    registry.register("mongo", MongoEngine)
    registry.register("cassandra", CassandraEngine)
    registry.register("ssh", SSHEngine)
    registry.register("redfish", RedfishEngine)
    registry.register("telnet", TelnetEngine)
    registry.register("rdp", RDPEngine)
    registry.register("ipmi", IpmiEngine)
    registry.register("vnc", VNCEngine)
    # The command-template API (dbproxy.commands) running its templates over SSH.
    registry.register("ssh-commands", SSHCommandsEngine)
    return registry
