"""scripts.peers.process: the one start/stop/kill/log life every real test peer shares."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import attrs

from scripts.peers import process
from scripts.peers.process import PeerProcess


@attrs.define(eq=False)
class _Peer(PeerProcess):
    dir: Path
    _proc: subprocess.Popen | None = None
    _stop_timeout = 5.0

    @property
    def log_file(self) -> Path:
        return self.dir / "peer.log"

    def start(self, script: str, *, group: bool = False, leftovers: bool = False, log: bool = True) -> "_Peer":
        self._stop_signal_group = group
        self._kill_group_after_stop = leftovers
        self._spawn([sys.executable, "-c", script], log=self.log_file if log else None, new_session=group)
        return self


def _wait_for(path: Path) -> str:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text()
        time.sleep(0.02)
    raise AssertionError(f"{path} never written")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_stop_terminates_and_the_log_holds_the_output(tmp_path):
    peer = _Peer(tmp_path).start("import time; print('ready', flush=True); time.sleep(60)")
    _wait_for(peer.log_file)
    assert peer.running() and peer.pid is not None
    assert peer in process._running
    peer.stop()
    assert not peer.running()
    assert peer._proc.returncode == -15  # SIGTERM, not the SIGKILL fallback
    assert peer not in process._running
    assert "ready" in peer.log_text() and "last 1 lines" in peer.log_tail()


def test_stop_falls_back_to_sigkill_for_a_process_that_ignores_sigterm(tmp_path):
    peer = _Peer(tmp_path).start("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                                 "print('ready', flush=True); time.sleep(60)")
    _wait_for(peer.log_file)
    began = time.monotonic()
    peer.stop(timeout=0.5)
    assert peer._proc.returncode == -9
    assert time.monotonic() - began < 5


def test_a_group_stop_takes_the_children_too(tmp_path):
    """A supervisor peer (the telnetd accept loop) leads its own session: its children die with it."""
    child_pid = tmp_path / "child.pid"
    script = ("import subprocess, sys, time; "
              "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
              f"open({str(child_pid)!r}, 'w').write(str(c.pid)); time.sleep(60)")
    peer = _Peer(tmp_path).start(script, group=True)
    pid = int(_wait_for(child_pid))
    assert _alive(pid)
    peer.stop()
    deadline = time.monotonic() + 5
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    # Reaped by init once orphaned and killed: gone, or at most a zombie.
    assert not _alive(pid) or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


def _gone(pid: int) -> bool:
    """Dead, or at most a zombie (an orphan is reaped by init once killed)."""
    deadline = time.monotonic() + 5
    while _alive(pid) and time.monotonic() < deadline:
        if "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]:
            return True
        time.sleep(0.02)
    return not _alive(pid)


def _start_with_a_stubborn_child(tmp_path: Path, *, leftovers: bool) -> tuple["_Peer", list[int]]:
    """A group leader that exits on SIGTERM, with a child that ignores it."""
    ready = tmp_path / "ready"
    child = tmp_path / "child.py"
    child.write_text("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                     f"open({str(ready)!r}, 'w').write('ready')\ntime.sleep(60)\n")
    peer = _Peer(tmp_path).start(f"import subprocess, sys, time; subprocess.Popen([sys.executable, {str(child)!r}]); "
                                 "time.sleep(60)", group=True, leftovers=leftovers)
    _wait_for(ready)
    members = _group_members(peer.pid)
    assert members
    return peer, members


def test_a_group_stop_kills_the_members_that_outlive_the_leader(tmp_path):
    """xrdp-sesman's per-session children ignore SIGTERM: with ``_kill_group_after_stop`` the leader's
    exit on SIGTERM is followed by a SIGKILL to what is left of its group."""
    peer, child = _start_with_a_stubborn_child(tmp_path, leftovers=True)
    began = time.monotonic()
    peer.stop()
    assert peer._proc.returncode == -15  # the leader went on SIGTERM: no stop timeout waited out
    assert time.monotonic() - began < 5
    assert all(_gone(pid) for pid in child)


def test_without_it_a_member_that_ignores_sigterm_survives_the_stop(tmp_path):
    peer, child = _start_with_a_stubborn_child(tmp_path, leftovers=False)
    peer.stop()
    try:
        assert all(_alive(pid) for pid in child)
    finally:
        os.killpg(peer.pid, 9)


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != pgid:
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(entry.name))
    return members


def test_a_peer_without_a_log_runs_with_its_output_discarded(tmp_path):
    """An X server for clients (xrdp.start_xvfb) has no folder of its own."""
    peer = _Peer(tmp_path).start("import time; print('x' * 100, flush=True); time.sleep(60)", log=False)
    assert peer.running()
    peer.stop()
    assert peer._proc.returncode == -15 and not peer.log_file.exists()


def test_kill_is_sigkill_and_the_leftover_hook_kills_what_still_runs(tmp_path):
    crashed = _Peer(tmp_path).start("import time; time.sleep(60)")
    crashed.kill()
    assert crashed._proc.returncode == -9
    leftover = _Peer(tmp_path / "x").start("import time; time.sleep(60)") if (tmp_path / "x").mkdir() is None else None
    assert leftover is not None and leftover.running()
    process._kill_leftovers()  # what atexit runs when a test run dies with peers up
    assert not leftover.running() and leftover._proc.returncode == -9
