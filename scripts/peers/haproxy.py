"""A private HAProxy (Debian's haproxy) in TCP mode in front of dbproxy: the real load balancer of the
PROXY protocol tests.

Strategy: HAProxy runs in the foreground (``-db``) as our child from a config
under a directory the caller owns.  Each frontend listens on a free loopback
port and forwards to one server, sending a PROXY protocol header (``send-proxy``
for v1, ``send-proxy-v2`` for v2, or none), from a chosen ``source`` address —
tests use 127.0.0.2 so the balancer's hop is distinguishable from the client's
own 127.0.0.1 on one machine.

Runnable: ``python -m scripts.peers.haproxy HOST:PORT`` puts a v2 frontend in
front of HOST:PORT, prints it as JSON and waits for Ctrl-C.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import attrs

from scripts.peers import free_port, wait_for_interrupt, wait_for_tcp

__all__ = ["Frontend", "HAProxy", "haproxy_bin", "start_haproxy"]

SEND = {"v1": " send-proxy", "v2": " send-proxy-v2", "none": ""}


def haproxy_bin() -> str:
    found = shutil.which("haproxy", path="/usr/sbin:/usr/bin")
    if found is None:
        raise FileNotFoundError("haproxy not found: run scripts/install/haproxy.sh")
    return found


@attrs.frozen
class Frontend:
    name: str
    server: str  # HOST:PORT
    proxy_protocol: str = "v2"  # v1, v2 or none
    source: str = "127.0.0.2"  # the address HAProxy connects from
    # More servers behind the same frontend (round robin, with health checks): ``server`` first.
    more_servers: tuple[str, ...] = ()


@attrs.define(eq=False)
class HAProxy:
    dir: Path
    ports: dict  # frontend name -> listening port
    proc: subprocess.Popen | None = None

    @property
    def conf_file(self) -> Path:
        return self.dir / "haproxy.cfg"

    def start(self) -> None:
        log = open(self.dir / "haproxy.log", "ab")
        self.proc = subprocess.Popen([haproxy_bin(), "-db", "-f", str(self.conf_file)], stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        try:
            for port in self.ports.values():
                wait_for_tcp("127.0.0.1", port, timeout=10, proc=self.proc)
        except Exception:
            self.stop()
            raise RuntimeError(f"haproxy failed to start: {self.log_text()[-2000:]}") from None

    def log_text(self) -> str:
        p = self.dir / "haproxy.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def info(self) -> dict:
        return {"dir": str(self.dir), "ports": self.ports}


def _config(frontends: list[Frontend], ports: dict) -> str:
    lines = [
        "global", "    maxconn 2000", "",
        "defaults", "    mode tcp", "    timeout connect 5s", "    timeout client 120s", "    timeout server 120s", "",
    ]
    for fe in frontends:
        lines += [f"frontend fe_{fe.name}", f"    bind 127.0.0.1:{ports[fe.name]}", f"    default_backend be_{fe.name}", "",
                  f"backend be_{fe.name}"]
        servers = (fe.server, *fe.more_servers)
        # Several servers: round robin, TCP health checks every 300 ms, and a connection refused by
        # a dead server tried again on another (redispatch) — the HA layout of docs/deploy.md.
        check = ""
        if len(servers) > 1:
            lines += ["    balance roundrobin", "    option redispatch", "    retries 2"]
            check = " check inter 300ms fall 1 rise 2"
        for i, server in enumerate(servers, 1):
            lines.append(f"    server s{i} {server}{SEND[fe.proxy_protocol]} source {fe.source}{check}")
        lines.append("")
    return "\n".join(lines)


def start_haproxy(base_dir: str | Path, frontends: list[Frontend]) -> HAProxy:
    """Write a config under *base_dir* and start HAProxy with one frontend per entry."""
    haproxy_bin()
    d = Path(base_dir)
    d.mkdir(parents=True, exist_ok=True)
    last_error: Exception | None = None
    for _ in range(3):
        ports = {fe.name: free_port() for fe in frontends}
        server = HAProxy(dir=d, ports=ports)
        server.conf_file.write_text(_config(frontends, ports))
        try:
            server.start()
            return server
        except RuntimeError as exc:  # a port taken between free_port() and HAProxy's bind
            last_error = exc
            time.sleep(0.2)
    raise RuntimeError(f"haproxy failed to start: {last_error}")


def _main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m scripts.peers.haproxy HOST:PORT", file=sys.stderr)
        return 2
    server = start_haproxy(Path(tempfile.mkdtemp(prefix="haproxy-")), [Frontend("v2", argv[0])])
    print(json.dumps(server.info(), indent=2), flush=True)
    try:
        wait_for_interrupt()
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
