"""The proxy's own login to an SSH target, with a route's credential: one place for the SSH engine's
sessions and the command-template runs (``commands.py``).

The route's ``auth`` says how: ``publickey`` (the key file), ``password`` (its secret, read when
used), or ``certificate`` (a short-lived OpenSSH user certificate for this session, signed with
the route's CA key — read once per engine).  The target's host key is always checked against the
route's known_hosts.  Failures raise ``TargetError`` with its ``kind``; ``hint`` words it for the
client.
"""

from __future__ import annotations

from typing import Any

from .bridge import TargetConnection, TargetError, session_certificate

__all__ = ["TargetError", "TargetLogins", "hint"]


def hint(kind: str, target: str | None, login: str | None) -> str:
    """What the client is told when the proxy's login to ``target`` failed with ``kind``."""
    return {
        "host_key": f"the host key of target {target!r} does not match the proxy's known_hosts: "
                    "refusing to connect (possible man-in-the-middle, or the host was re-keyed)",
        "auth": f"the target {target!r} refused the proxy's login as {login!r}",
        "connect": f"the target {target!r} is unreachable",
    }[kind]


class TargetLogins:
    def __init__(self) -> None:
        self._ca_keys: dict[str, Any] = {}

    def ca_key(self, path: str) -> Any:
        key = self._ca_keys.get(path)
        if key is None:
            import asyncssh

            key = self._ca_keys[path] = asyncssh.read_private_key(path)
        return key

    async def open(self, backend: Any, login: str, session: Any, nursery: Any = None) -> TargetConnection:
        """An authenticated connection to the route's target as ``login``; raises ``TargetError``
        (``UpstreamError`` when an agent cannot reach it: ``via``, bridged by a task in ``nursery``)."""
        auth = backend.auth
        target = TargetConnection()
        await target.open(
            backend.host, backend.port, login,
            known_hosts=backend.extra["known_hosts_file"],
            key_file=auth.params.get("key_file") if auth.method == "publickey" else None,
            password=auth.secret.reveal() if auth.method == "password" and auth.secret is not None else None,
            certificate=session_certificate(self.ca_key(auth.params["ca_key_file"]), session,
                                            auth.params["validity_seconds"])
            if auth.method == "certificate" else None,
            via=getattr(backend, "via", None), nursery=nursery,
        )
        return target
