"""Network namespaces for isolation tests: a namespace joined to the root one by a veth pair.

Strategy: ``create_namespace()`` makes ``dbp-agent-<random>`` (``ip netns
add``), a veth pair whose one end moves into it, and a /30 of 10.231.0.0/16
(random, checked unused) — ``host_addr`` on the root side, ``ns_addr``
inside — plus loopback up inside.  Nothing else is routed: from the root
namespace only ``ns_addr`` is reachable, and what listens on the namespace's
own 127.0.0.1 is reachable from nowhere but inside.

``ns.call(fn, *args)`` runs a Python function in a thread that joined the
namespace (``setns(2)`` on that thread only: a network namespace is per
thread in Linux, and processes it starts inherit it), so the project's own
peer starters (``scripts/peers/postgres.py``, ``sshd.py``) run unchanged
inside — their servers listen on the namespace's loopback, their readiness
checks connect there.  ``ns.popen(argv)`` / ``ns.run(argv)`` run a program
inside (``ip netns exec``).  ``ns.delete()`` removes the namespace (its veth
end goes with it); ``cleanup_stale()`` removes namespaces an interrupted run
left behind.  Needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN) and iproute2.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import os
import random
import secrets
import subprocess
from typing import Any, Callable

import attrs

__all__ = ["Namespace", "create_namespace", "cleanup_stale", "can_create"]

PREFIX = "dbp-agent"
CLONE_NEWNET = 0x40000000


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


@attrs.define(eq=False)
class Namespace:
    name: str
    host_if: str
    ns_if: str
    host_addr: str
    ns_addr: str
    _executor: concurrent.futures.ThreadPoolExecutor | None = None

    @property
    def path(self) -> str:
        return f"/var/run/netns/{self.name}"

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` on a thread inside the namespace (the same thread every time)."""
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=self.name,
                                                                   initializer=_join, initargs=(self.path,))
        return self._executor.submit(fn, *args, **kwargs).result()

    def argv(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def popen(self, argv: list[str], **kwargs: Any) -> subprocess.Popen:
        return subprocess.Popen(self.argv(argv), **kwargs)

    def run(self, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        kwargs.setdefault("timeout", 60)
        return subprocess.run(self.argv(argv), **kwargs)

    def delete(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None
        _ip("netns", "del", self.name, check=False)
        _ip("link", "del", self.host_if, check=False)  # gone with its peer already, normally


def _join(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def _used_subnets() -> set[str]:
    out = _ip("-o", "-4", "addr", "show", check=False).stdout
    return {word.split("/")[0] for line in out.splitlines() for word in line.split() if word.startswith("10.231.")}


def create_namespace(prefix: str = PREFIX) -> Namespace:
    tag = secrets.token_hex(3)
    name = f"{prefix}-{tag}"
    used = _used_subnets()
    for _ in range(100):
        third, fourth = random.randrange(256), random.randrange(0, 256, 4)
        host_addr, ns_addr = f"10.231.{third}.{fourth + 1}", f"10.231.{third}.{fourth + 2}"
        if host_addr not in used and ns_addr not in used:
            break
    else:
        raise RuntimeError("no free /30 in 10.231.0.0/16")
    ns = Namespace(name, f"dbpa{tag}h", f"dbpa{tag}n", host_addr, ns_addr)
    try:
        _ip("netns", "add", name)
        _ip("link", "add", ns.host_if, "type", "veth", "peer", "name", ns.ns_if)
        _ip("link", "set", ns.ns_if, "netns", name)
        _ip("addr", "add", f"{host_addr}/30", "dev", ns.host_if)
        _ip("link", "set", ns.host_if, "up")
        _ip("-n", name, "addr", "add", f"{ns_addr}/30", "dev", ns.ns_if)
        _ip("-n", name, "link", "set", ns.ns_if, "up")
        _ip("-n", name, "link", "set", "lo", "up")
    except BaseException:
        ns.delete()
        raise
    return ns


def can_create() -> str | None:
    """None when namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    try:
        ns = create_namespace(f"{PREFIX}-probe")
    except (OSError, subprocess.CalledProcessError) as exc:
        return f"cannot create a network namespace: {getattr(exc, 'stderr', '') or exc}"
    ns.delete()
    return None


def cleanup_stale(prefix: str = PREFIX) -> list[str]:
    """Delete namespaces named ``prefix-…`` whose processes are all gone (an interrupted run's)."""
    removed = []
    out = _ip("netns", "list", check=False).stdout
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(prefix + "-") and not _ip("netns", "pids", name, check=False).stdout.strip():
            _ip("netns", "del", name, check=False)
            removed.append(name)
    return removed
