"""Full-screen programs and bulk output in an interactive shell through the SSH proxy (tmux-driven).

The issue's interactive proofs that ``test_ssh_shell.py`` (typing, line
policy, no-echo input, replay, a policed ``vi``) and ``test_ssh_proxy.py``
(typing, resize, Ctrl-C) do not already give:

- ``vi`` as the ordinary user sees it: the full-screen UI drawn (the empty
  buffer's ``~`` rows, the mode line), text typed in insert mode, ``:wq``
  writing the file on the target, and the shell's screen back afterwards
  (the alternate screen left);
- 100 MB of output in an interactive shell: the proxy keeps up, the shell
  answers right after it, the observer counts every byte, the recording's
  size and SHA-256 in the end events match the file on disk, and the proxy's
  resident memory stays bounded while it relays (sampled from /proc).

Real OpenSSH ``sshd`` as the target and the real ``ssh`` client in tmux, on
``test_ssh_shell.py``'s proxy (recording on).
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import require_binary
from tests.integration.test_ssh_shell import open_shell, session_of, shellproxy  # noqa: F401 (fixture)

pytestmark = pytest.mark.integration

ROWS = 30  # open_shell's tmux window is 100x30


def test_vi_full_screen_edit_and_write(shellproxy, tmp_path):  # noqa: F811
    require_binary("vi")
    note = tmp_path / f"vi-{uuid.uuid4().hex[:6]}.txt"
    target = f"web-vi-{uuid.uuid4().hex[:6]}"
    tmux = open_shell(shellproxy, target)
    try:
        tmux.run("send-keys", "-t", "t", "echo before-vi-$((5*5))", "Enter")
        tmux.wait_for("\nbefore-vi-25")
        tmux.run("send-keys", "-t", "t", f"vi -u NONE -N -c 'set showmode' {note}", "Enter")
        screen = tmux.wait_for("[New")  # the status line (the file's name alone is on the command line too)
        # The full-screen UI: the shell's lines are gone (alternate screen), the empty buffer's rows
        # are "~" down to the status line, which names the new file.
        rows = screen.split("\n")[:ROWS]
        assert "before-vi-25" not in screen
        assert sum(1 for r in rows[1:ROWS - 1] if r.rstrip() == "~") == ROWS - 2, screen
        assert note.name in rows[ROWS - 1]
        tmux.run("send-keys", "-t", "t", "-l", "i")
        screen = tmux.wait_for("-- INSERT --")
        assert screen.split("\n")[ROWS - 1].startswith("-- INSERT --")
        tmux.run("send-keys", "-t", "t", "-l", "typed through the proxy")
        tmux.run("send-keys", "-t", "t", "Enter")
        tmux.run("send-keys", "-t", "t", "-l", "second line $((1+1))")
        screen = tmux.wait_for("second line $((1+1))")
        rows = screen.split("\n")
        assert rows[0].rstrip() == "typed through the proxy" and rows[1].rstrip() == "second line $((1+1))"
        tmux.run("send-keys", "-t", "t", "Escape")
        tmux.run("send-keys", "-t", "t", "-l", ":wq")
        tmux.run("send-keys", "-t", "t", "Enter")
        # vi left the alternate screen: the shell's own lines are back, with a prompt under them.
        screen = tmux.wait_for("before-vi-25", timeout=10)
        assert "~" not in screen.split("\n")[1]
        tmux.run("send-keys", "-t", "t", "echo after-vi-$((6*6))", "Enter")
        tmux.wait_for("\nafter-vi-36")
        tmux.run("send-keys", "-t", "t", "exit", "Enter")
        start, mine = session_of(shellproxy, target)
    finally:
        tmux.kill()
    assert note.read_text() == "typed through the proxy\nsecond line $((1+1))\n"
    commands = [e["command"] for e in mine if e["event"] == "ssh.shell.command"]
    assert any(c.startswith("vi -u NONE") for c in commands) and "echo after-vi-$((6*6))" in commands
    assert not any("typed through" in c for c in commands)  # text typed in vi is no command
    (chan_end,) = [e for e in mine if e["event"] == "ssh.channel.end"]
    cast = (shellproxy.recordings / chan_end["recording"]).read_text()
    assert "\\u001b[?1049h" in cast and "\\u001b[?1049l" in cast  # the alternate screen, entered and left


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` (/proc/PID/stat fields 14-15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


# base64 of 75,000,000 zero bytes in 100-column lines: 1,000,000 lines of 100 characters, which
# the target's pty turns into 102 bytes each (ONLCR: "\n" → "\r\n"); then a line that says it is over.
BULK_LINES = 1_000_000
BULK_COMMAND = "head -c 75000000 /dev/zero | base64 -w 100; echo bulk-done-$((3+4))"
BULK_BYTES = BULK_LINES * 102 + len("bulk-done-7\r\n")


def test_100_mb_of_shell_output(shellproxy):  # noqa: F811
    target = f"web-bulk-{uuid.uuid4().hex[:6]}"
    pid = shellproxy.proc.pid
    tmux = open_shell(shellproxy, target)
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], _rss_kib(pid))

    try:
        before, cpu0 = _rss_kib(pid), _cpu_s(pid)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.monotonic()
        tmux.run("send-keys", "-t", "t", BULK_COMMAND, "Enter")
        tmux.wait_for("\nbulk-done-7\nprompt$", timeout=600)
        elapsed, cpu = time.monotonic() - t0, _cpu_s(pid) - cpu0
        done.set()
        sampler.join(5)
        # The shell answers right after it.
        tmux.run("send-keys", "-t", "t", "echo MARK-$((40+2))", "Enter")
        tmux.wait_for("\nMARK-42", timeout=10)
        tmux.run("send-keys", "-t", "t", "exit", "Enter")
        start, mine = session_of(shellproxy, target)
    finally:
        done.set()
        tmux.kill()
    # For the record (tmux drawing 100 MB is the slow part: the proxy's CPU is a fraction of the time).
    print(f"100 MB shell output through the proxy: {BULK_BYTES / elapsed / 1e6:.1f} MB/s, proxy CPU {cpu:.1f} s "
          f"of {elapsed:.1f} s; proxy RSS {before} KiB before, peak {peak[0]} KiB")
    # Every byte went by the observer: the command's output is its Enter's echo, the lines, the prompt.
    ends = {e["command"]: e for e in mine if e["event"] == "ssh.shell.command.end"}
    assert ends[BULK_COMMAND]["output_bytes"] == len("\r\n") + BULK_BYTES + len("prompt$ ")
    (chan_end,) = [e for e in mine if e["event"] == "ssh.channel.end"]
    assert chan_end["bytes_to_client"] > BULK_BYTES
    # The recording on disk is the one the end events name, byte for byte.
    cast = shellproxy.recordings / chan_end["recording"]
    data = cast.read_bytes()
    assert len(data) == chan_end["recording_bytes"] > BULK_BYTES
    assert hashlib.sha256(data).hexdigest() == chan_end["recording_sha256"]
    (end,) = [e for e in mine if e["event"] == "ssh.session.end"]
    (rec,) = [r for r in end["recordings"] if r["recording"] == chan_end["recording"]]
    assert rec["recording_sha256"] == chan_end["recording_sha256"] and rec["recording_bytes"] == len(data)
    # Relayed, not held: 100 MB went through while the proxy grew by a few windows' worth at most.
    assert peak[0] - before < 64 * 1024, f"proxy RSS grew from {before} to {peak[0]} KiB"
