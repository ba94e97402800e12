"""The Python API, one import: ``dbproxy.serve(config)``, ``dbproxy.Config.load(path)``, and
``dbproxy.audit.read`` / ``dbproxy.audit.verify`` (``audit/reader.py``).

``serve`` runs the proxy inside the caller's trio program, the same
``ProxyServer`` as ``dbproxy serve`` (listeners, audit worker, sinks), under
the caller's nursery: cancelling the caller's scope ends every session with
it, as trio's structured concurrency promises.  Started with
``nursery.start``, it hands back a ``Running`` handle naming the bound
ports (``"listen": "127.0.0.1:0"`` picks free ones) and a graceful ``stop()``::

    async with trio.open_nursery() as nursery:
        proxy = await nursery.start(dbproxy.serve, "proxy.json")
        print(proxy.port("pg"))
        ...
        proxy.stop()          # no new connections; sessions get shutdown_grace_seconds
"""

from __future__ import annotations

import os
from typing import Any

import attrs
import trio

from .config import Config
from .server import BoundListener, ProxyServer

__all__ = ["Running", "serve"]


@attrs.define(eq=False)
class Running:
    """A proxy started by ``serve``: its bound listeners, and ``stop()`` for a graceful shutdown."""

    listeners: tuple[BoundListener, ...]
    config: Config
    _server: ProxyServer = attrs.field(repr=False)

    def port(self, name: str) -> int:
        for b in self.listeners:
            if b.name == name:
                return b.port
        raise KeyError(f"no listener named {name!r} (listeners: {', '.join(b.name for b in self.listeners)})")

    @property
    def admin_address(self) -> tuple[str, int] | None:
        """The admin listener's bound (host, port) (/metrics, /healthz, /readyz); None without ``"admin"``."""
        return self._server.admin_address

    def stop(self) -> None:
        self._server.stop()

    async def reload(self) -> bool:
        """Re-read the config file (as SIGHUP does for ``dbproxy serve``); False: refused, the
        running config stays (the reasons are logged and audited)."""
        return await self._server.reload()


async def serve(config: Config | str | os.PathLike, *, registry: Any = None,
                task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Run the proxy of ``config`` (a ``Config`` or a config file's path) until ``stop()`` or
    cancellation; ``task_status.started(Running)`` once every listener is bound.  Raises
    ``dbproxy.errors.ConfigErrors`` for an invalid file, before binding anything.  In-process the
    proxy is this one process: ``"workers"`` applies to ``dbproxy serve`` (dbproxy.workers)."""
    if registry is None:
        from .registry import default_registry  # the composition root that names the engines

        registry = default_registry()
    if not isinstance(config, Config):
        config = Config.load(os.fspath(config), registry)
    server = ProxyServer(config, registry)

    async def run(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        await server.run(task_status=task_status)

    async with trio.open_nursery() as nursery:
        bound = await nursery.start(run)
        task_status.started(Running(tuple(bound), config, server))
