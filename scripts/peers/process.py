"""The life of a peer's server process, written once for every peer.

Each peer (``cassandra_server``, ``kafka_server``, ``ferretdb_server``,
``sshd``, ``telnetd``, ``sushy``, ``ipmi_sim``, ``serial_console``, ``vnc``,
``xrdp`` …) knows how to configure and probe its own server; starting it
under a log file, stopping it gently then firmly, killing it as in a crash
and reading its log's tail are the same everywhere and live here.  A run
that dies (an interrupted pytest, a failed fixture) must not leave a JVM or a
daemon behind: every process started here is killed at interpreter exit if
it still runs.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["PeerProcess", "run_in_foreground"]

_running: set["PeerProcess"] = set()


class PeerProcess:
    """A mixin for a peer class: ``_spawn`` it, then ``stop``/``kill``/``wait``/``running``.

    The class keeps its ``subprocess.Popen`` in ``_proc`` (an attrs field on the
    peer classes) and names its log with ``log_file``.  ``_stop_signal_group``:
    the process leads its own session and its children die with it (a
    supervisor that forks servers, like the telnetd accept loop, or a shell
    running an X server and its clients, like the VNC desktops).
    ``_kill_group_after_stop``: some of those children ignore SIGTERM and
    outlive the leader (xrdp-sesman's per-session children wait for an X
    server that never comes), so once the leader is gone ``stop`` sends
    SIGKILL to what is left of its group."""

    _proc: subprocess.Popen | None
    _stop_timeout: float = 10.0
    _stop_signal_group: bool = False
    _kill_group_after_stop: bool = False  # only with _stop_signal_group
    _log_files: tuple[str, ...] = ("log_file",)  # attributes naming the files log_tail reads

    def _spawn(self, argv: Sequence[str], *, log: Path | None, env: dict | None = None, cwd: Any = None,
               new_session: bool = False) -> subprocess.Popen:
        """Start *argv* with stdout and stderr appended to *log* (None: discarded), no stdin."""
        with open(os.devnull if log is None else log, "ab") as out:
            self._proc = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env=env, cwd=None if cwd is None else str(cwd),
                                          start_new_session=new_session)
        _running.add(self)
        return self._proc

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def wait(self) -> int:
        """Block until the process exits (on its own or by another hand)."""
        assert self._proc is not None, "not started"
        return self._proc.wait()

    def _signal(self, signum: int) -> None:
        assert self._proc is not None
        try:
            if self._stop_signal_group:
                os.killpg(self._proc.pid, signum)
            else:
                self._proc.send_signal(signum)
        except ProcessLookupError:
            pass

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM (every server here shuts down cleanly on it), SIGKILL if it hangs."""
        if self.running():
            self._signal(signal.SIGTERM)
            try:
                self._proc.wait(self._stop_timeout if timeout is None else timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self._proc.wait()
            else:
                if self._kill_group_after_stop:
                    self._signal(signal.SIGKILL)  # the group outlives its leader while a member is alive
        self._reaped()

    def kill(self) -> None:
        """SIGKILL: the server dies mid-session, as in a crash."""
        if self.running():
            self._signal(signal.SIGKILL)
            self._proc.wait()
        self._reaped()

    def _reaped(self) -> None:
        """After the process is gone; a peer that holds more (an open file) extends it."""
        _running.discard(self)

    def log_text(self) -> str:
        if not self._log_files:
            return ""
        path = getattr(self, self._log_files[0])
        try:
            return Path(path).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        parts = []
        for name in self._log_files:
            path = Path(getattr(self, name))
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path} (last {len(tail)} lines)\n" + "\n".join(tail))
        return "\n".join(parts)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def run_in_foreground(start: Callable[[Path], PeerProcess], base_dir: str | None, *, prefix: str,
                      indent: int | None = None) -> int:
    """``python -m scripts.peers.X [BASE_DIR]``: start the peer (under a temporary folder without
    BASE_DIR), print its ``info()`` as JSON and run until Ctrl-C or SIGTERM, then stop it."""
    cleanup = None
    if base_dir is None:
        cleanup = tempfile.TemporaryDirectory(prefix=prefix)
        base_dir = cleanup.name
    try:
        server = start(Path(base_dir))
        print(json.dumps(server.info(), indent=indent), flush=True)  # type: ignore[attr-defined]
        # SIGTERM ends the wait like Ctrl-C does, through the finally below.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        try:
            with contextlib.suppress(KeyboardInterrupt):
                server.wait()
        finally:
            server.stop()
    finally:
        if cleanup is not None:
            cleanup.cleanup()
    return 0


@atexit.register
def _kill_leftovers() -> None:
    for peer in list(_running):
        peer.kill()

