"""Real test peers, importable by tests as ``scripts.peers.X``.

Each module starts a private instance of a real server under a directory the
caller owns, on a free loopback port, and returns an object with its
connection info and ``stop()``.  This package only holds the small helpers
they share (stdlib only, so importing it is cheap); ``process.PeerProcess``
is the process life they share (spawn under a log, stop, kill, log tail,
leftovers killed at exit).
"""

from __future__ import annotations

import socket
import time

__all__ = ["free_port", "free_port_tcp_udp", "wait_for_tcp", "wait_for_interrupt"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port the kernel just handed out for *host* (bind port 0, read it back).

    The socket is closed before returning, so another process could take the
    port first; the window is short and the callers retry on a bind failure.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_port_tcp_udp(host: str = "127.0.0.1", tries: int = 50) -> int:
    """A port free for both TCP and UDP on *host* (a KDC listens on both)."""
    for _ in range(tries):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            t.bind((host, 0))
            port = t.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                try:
                    u.bind((host, port))
                except OSError:
                    continue
                return port
    raise OSError(f"no port free for both TCP and UDP on {host}")


def wait_for_tcp(host: str, port: int, timeout: float = 10.0, proc=None) -> None:
    """Block until *host*:*port* accepts a TCP connection.

    If *proc* (a ``subprocess.Popen``) exits meanwhile, fail at once instead
    of waiting out the timeout.
    """
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with code {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s") from None
            time.sleep(delay)
            delay = min(delay * 2, 0.1)


def wait_for_interrupt() -> None:
    """Block until Ctrl-C or SIGTERM (for the ``python -m scripts.peers.X`` demos)."""
    import signal

    def _raise(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _raise)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
