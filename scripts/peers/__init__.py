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

__all__ = ["HeldPort", "free_port", "free_port_tcp_udp", "refused_port", "wait_for_tcp", "wait_for_interrupt"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port the kernel just handed out for *host* (bind port 0, read it back).

    The socket is closed before returning, so another process could take the
    port first; the window is short and the callers retry on a bind failure.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class HeldPort:
    """A loopback TCP port that refuses every connection while this object holds it.

    The socket is bound but never listens: a connect gets ECONNREFUSED, as from
    a port nobody uses, and the kernel hands the port to no one else meanwhile
    (a ``free_port()`` is only free until the next bind to port 0 — a listener
    on ``127.0.0.1:0`` started right after may well get it, and then "nothing
    listens there" is a proxy's own listener).  ``release()`` closes it, for a
    test that later starts a real receiver on that very port.

    With ``udp=True`` the same port is held for UDP too, by a socket connected
    to itself: the kernel delivers it only its own datagrams, so anyone else's
    are answered "port unreachable", as from a port nobody uses.
    """

    def __init__(self, host: str = "127.0.0.1", udp: bool = False, tries: int = 50) -> None:
        self._socks: list[socket.socket] = []
        for _ in range(tries):
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.bind((host, 0))
            self.port: int = tcp.getsockname()[1]
            if not udp:
                self._socks = [tcp]
                return
            dgram = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                dgram.bind((host, self.port))
            except OSError:
                dgram.close()
                tcp.close()
                continue
            dgram.connect((host, self.port))
            self._socks = [tcp, dgram]
            return
        raise OSError(f"no port free for both TCP and UDP on {host}")

    def release(self) -> int:
        for sock in self._socks:
            sock.close()
        self._socks = []
        return self.port


_held_for_life: list[HeldPort] = []


def refused_port(host: str = "127.0.0.1", udp: bool = False) -> int:
    """A port on *host* that refuses connections (and, with *udp*, datagrams) for the rest of this process."""
    held = HeldPort(host, udp=udp)
    _held_for_life.append(held)
    return held.port


def free_port_tcp_udp(host: str = "127.0.0.1", tries: int = 50) -> int:
    """A port free for both TCP and UDP on *host* (a KDC listens on both); free as ``free_port()`` is."""
    return HeldPort(host, udp=True, tries=tries).release()


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
