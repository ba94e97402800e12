"""Interactive shells through the SSH proxy: commands observed on the terminal, line policy, input recording, replay.

Real OpenSSH ``sshd`` as the target and the real ``ssh`` client in tmux
(send-keys, capture-pane), as in ``test_ssh_proxy.py`` (its helpers are
reused).  This module's proxy records input too (``recording.input``), so
the no-echo test can look for the secret in every file the proxy wrote.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import pytest

from tests.conftest import require_binary
from tests.integration.test_ssh_proxy import (Tmux, _backend, _cli, client_env, events, prepare_client, session_events,
                                              ssh_options, start_of)
from tests.support import ROOT, ProxyProcess

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def shellproxy(sshd, tmp_path_factory):
    from scripts.peers.sshd import make_key

    require_binary("ssh")
    require_binary("tmux")
    workdir = tmp_path_factory.mktemp("sshshell")
    _cli("token", "keygen", "--algorithm", "EdDSA", "--key-file", str(workdir / "token.key"),
         "--public-key-file", str(workdir / "token.pub"))
    make_key(workdir / "proxy_host_ed25519", "dbproxy-proxy-host")
    config = {
        "identity": {"token": {"algorithm": "EdDSA", "key_file": "token.key", "public_key_file": "token.pub"}},
        "roles": {
            "ops": {"routes": ["*"], "targets": ["web-*"], "logins": [sshd.login]},
            "guarded": {"routes": ["*"], "targets": ["web-*"], "logins": [sshd.login],
                        "deny_commands": ["rm", "shutdown*"]},
        },
        "listeners": [{
            "name": "ssh", "protocol": "ssh", "listen": "127.0.0.1:0",
            "host_key_file": "proxy_host_ed25519",
            "recording": {"dir": "recordings", "input": True},
            "auth": {"methods": ["token"]},
            "routes": [{"name": "web", "match": {"target": "web-*"},
                        "backend": _backend(sshd, sshd.known_hosts, login=False)}],
        }],
        "audit": {"sinks": [{"type": "jsonl", "path": "audit.jsonl"}]},
    }
    (workdir / "recordings").mkdir()
    proc = ProxyProcess(workdir, config, name="proxy").start()
    proc.recordings = workdir / "recordings"
    proc.audit_path = workdir / "audit.jsonl"
    proc.login = sshd.login
    prepare_client(proc, workdir)
    proc.token = _cli("token", "issue", "--config", str(proc.config_path), "--user", "alice", "--roles", "ops",
                      "--ttl", "1h")
    proc.guarded_token = _cli("token", "issue", "--config", str(proc.config_path), "--user", "bob", "--roles",
                              "guarded", "--ttl", "1h")
    yield proc
    proc.stop()


def open_shell(proxy, target: str, token: str | None = None) -> Tmux:
    tmux = Tmux(uuid.uuid4().hex[:8])
    env = client_env(proxy, token)
    command = " ".join(["env", f"SSH_ASKPASS={env['SSH_ASKPASS']}", "SSH_ASKPASS_REQUIRE=force",
                        f"DBPROXY_TOKEN={env['DBPROXY_TOKEN']}", "ssh", *ssh_options(proxy), "-tt", "-p",
                        str(proxy.port()), f"{proxy.login}@{target}@127.0.0.1"])
    tmux.run("new-session", "-d", "-s", "t", "-x", "100", "-y", "30", command)
    # A fixed prompt, and no bracketed paste (readline would hold a pasted block until one more Enter).
    tmux.run("send-keys", "-t", "t",
             "bind 'set enable-bracketed-paste off'; export PS1='prompt$ '; echo ready-$((1+1))", "Enter")
    tmux.wait_for("\nready-2")
    time.sleep(0.3)  # the prompt after it: what is typed next starts on the screen after the prompt
    return tmux


def session_of(proxy, target: str, event: str = "ssh.session.end", **match) -> tuple[dict, list[dict]]:
    def ready(es):
        sids = {e["sid"] for e in es if e["event"] == "ssh.session.start" and e.get("requested_target") == target
                and e["success"]}
        return any(e["event"] == event and e.get("sid") in sids and all(e.get(k) == v for k, v in match.items())
                   for e in es)
    evs = events(proxy, ready)
    start = start_of(evs, target, True)
    return start, session_events(evs, start["sid"])


def every_file_text(proxy) -> str:
    texts = [proxy.audit_path.read_text(), proxy.log_text()]
    texts += [p.read_text(errors="replace") for p in proxy.recordings.iterdir()]
    return "\n".join(texts)


def test_shell_commands_observed_audited_and_input_recorded(shellproxy):
    tmux = open_shell(shellproxy, "web-obs")
    try:
        # Typed with a mistake and a backspace: the audit has the line as the screen shows it.
        tmux.run("send-keys", "-t", "t", "-l", "echo obs-$((40+3))X")
        tmux.run("send-keys", "-t", "t", "BSpace")
        tmux.run("send-keys", "-t", "t", "Enter")
        tmux.wait_for("obs-43")
        tmux.run("send-keys", "-t", "t", "seq 1 200 | tail -n 1", "Enter")
        # The next prompt drawn before "exit" is typed: a line typed ahead of its prompt, with its
        # echo late past the observer's echo wait on a loaded machine, is audited as the row shows it.
        tmux.wait_for("\n200\nprompt$")
        tmux.run("send-keys", "-t", "t", "exit", "Enter")
        start, mine = session_of(shellproxy, "web-obs")
    finally:
        tmux.kill()
    commands = [e for e in mine if e["event"] == "ssh.shell.command"]
    texts = [e["command"] for e in commands]
    assert "echo obs-$((40+3))" in texts and "seq 1 200 | tail -n 1" in texts and "exit" in texts
    first = commands[texts.index("echo obs-$((40+3))")]
    assert first["observed"] is True and first["source"] == "screen"
    assert first["recording"].startswith(start["sid"]) and first["recording_offset"] > 0
    # The recording offset points into the output recording: the command's echo is before it.
    cast = (shellproxy.recordings / first["recording"]).read_bytes()
    assert b"obs-$((40+3))" in cast[:first["recording_byte_offset"]]
    assert b"obs-43" not in cast[:first["recording_byte_offset"]]
    ends = {e["command"]: e for e in mine if e["event"] == "ssh.shell.command.end"}
    assert ends["echo obs-$((40+3))"]["output_bytes"] >= len("obs-43\r\n")
    assert ends["seq 1 200 | tail -n 1"]["line"] == commands[texts.index("seq 1 200 | tail -n 1")]["line"]
    assert ends["seq 1 200 | tail -n 1"]["output_bytes"] == len("\r\n200\r\nprompt$ ")

    # Input was recorded (this listener turns it on) in its own file, keys as typed.
    (chan_end,) = [e for e in mine if e["event"] == "ssh.channel.end"]
    inp = shellproxy.recordings / chan_end["input_recording"]
    header, *lines = inp.read_text().splitlines()
    assert json.loads(header)["version"] == 2
    typed = "".join(json.loads(x)[2] for x in lines)
    assert {json.loads(x)[1] for x in lines} == {"i"}
    assert "echo obs-$((40+3))X\x7f\r" in typed
    assert "obs-43" not in typed  # output is not in the input file
    (end,) = [e for e in mine if e["event"] == "ssh.session.end"]
    assert {r["recording"] for r in end["recordings"]} == {chan_end["recording"], chan_end["input_recording"]}


@pytest.mark.parametrize("prompt", ["Enter it> ", "Password: "])
def test_input_typed_without_echo_is_never_recorded(shellproxy, prompt):
    """``read -s`` turns the target pty's echo off: the secret typed there is in no audit, log or recording."""
    secret = f"S3cret-{uuid.uuid4().hex[:12]}"
    target = f"web-noecho-{uuid.uuid4().hex[:6]}"
    tmux = open_shell(shellproxy, target)
    try:
        tmux.run("send-keys", "-t", "t", f"read -rs -p '{prompt}' PW; echo; echo got-${{#PW}}-chars", "Enter")
        tmux.wait_for(prompt.strip())
        time.sleep(0.3)
        tmux.run("send-keys", "-t", "t", "-l", secret)
        tmux.run("send-keys", "-t", "t", "Enter")
        tmux.wait_for(f"got-{len(secret)}-chars")
        assert secret not in tmux.screen()
        tmux.run("send-keys", "-t", "t", "echo after-secret", "Enter")
        tmux.wait_for("\nafter-secret")
        tmux.run("send-keys", "-t", "t", "exit", "Enter")
        start, mine = session_of(shellproxy, target)
    finally:
        tmux.kill()
    hidden = [e for e in mine if e["event"] == "ssh.shell.hidden_input"]
    assert len(hidden) == 1 and hidden[0]["bytes"] == len(secret)
    assert "command" not in hidden[0]
    assert any(e["event"] == "ssh.shell.command" and e["command"] == "echo after-secret" for e in mine)
    (chan_end,) = [e for e in mine if e["event"] == "ssh.channel.end"]
    assert "echo after-secret" in (shellproxy.recordings / chan_end["input_recording"]).read_text()
    assert secret not in every_file_text(shellproxy)
    assert secret[:8] not in every_file_text(shellproxy)


def test_shell_line_policy_refuses_typed_and_pasted_lines(shellproxy, tmp_path):
    canary = tmp_path / "canary"
    canary.write_text("still here")
    tmux = open_shell(shellproxy, "web-pol", token=shellproxy.guarded_token)
    try:
        tmux.run("send-keys", "-t", "t", f"rm -f {canary}", "Enter")
        screen = tmux.wait_for("command refused by policy")
        assert "'rm'" in screen
        tmux.wait_for("^C")
        tmux.run("send-keys", "-t", "t", "echo still-$((1+1))", "Enter")
        tmux.wait_for("still-2")
        assert canary.read_text() == "still here"
        # A paste of three lines: the first runs, the second is refused, the third is never sent.
        tmux.run("send-keys", "-t", "t", "-l", f"echo pasted-$((0+1))\rrm -f {canary}\recho pasted-$((1+2))\r")
        tmux.wait_for("pasted-1")
        screen = tmux.wait_for("command refused by policy", timeout=10)
        time.sleep(1.0)
        tmux.run("send-keys", "-t", "t", "echo done-$((2+2))", "Enter")
        screen = tmux.wait_for("done-4")
        assert "pasted-3" not in screen and "pasted-$((1+2))" not in screen
        assert canary.read_text() == "still here"
        tmux.run("send-keys", "-t", "t", "exit", "Enter")
        start, mine = session_of(shellproxy, "web-pol")
    finally:
        tmux.kill()
    shell = [e for e in mine if e["event"] == "ssh.shell"]
    assert shell and shell[0].get("success", True) is not False  # a policed shell is granted now
    refused = [e for e in mine if e["event"] == "ssh.shell.command" and e.get("success") is False]
    assert [e["command"] for e in refused] == [f"rm -f {canary}"] * 2
    assert all(e["denied_pattern"] == "rm" for e in refused)
    denials = [e for e in mine if e["event"].endswith("access_denied")]
    assert len(denials) == 2 and all(d["stage"] == "shell" and d["reason"] == "command_denied" for d in denials)
    ran = [e["command"] for e in mine if e["event"] == "ssh.shell.command" and e.get("success") is not False]
    assert "echo pasted-$((0+1))" in ran and "echo done-$((2+2))" in ran
    assert not any("pasted-$((1+2))" in c for c in ran)


def test_recording_replays_to_what_the_client_saw(shellproxy):
    tmux = open_shell(shellproxy, "web-replay")
    try:
        tmux.run("send-keys", "-t", "t", "printf '\\033[1mbold\\033[0m %s\\n' replay-$((3*3)); seq 1 40 | paste -sd,",
                 "Enter")
        tmux.wait_for("replay-9")
        tmux.run("resize-window", "-t", "t", "-x", "80", "-y", "24")
        time.sleep(0.5)
        tmux.run("send-keys", "-t", "t", "clear; stty size; ls -d / /tmp", "Enter")
        tmux.wait_for("24 80")
        time.sleep(0.5)
        seen = tmux.screen()
        # The client goes away without another byte from the target: the recording ends on this screen.
        tmux.kill()
        start, mine = session_of(shellproxy, "web-replay")
    finally:
        tmux.kill()
    (chan_end,) = [e for e in mine if e["event"] == "ssh.channel.end"]
    cast = shellproxy.recordings / chan_end["recording"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "dbproxy.cli", "replay", "--text", str(cast)], capture_output=True,
                       text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    want = [row.rstrip() for row in seen.rstrip("\n").splitlines()]
    while want and not want[-1]:
        want.pop()
    assert p.stdout.rstrip("\n").splitlines() == want
    assert "24 80" in p.stdout
    # Played in time (fast) to a terminal-less pipe: the bytes the client got, in order.
    p = subprocess.run([sys.executable, "-m", "dbproxy.cli", "replay", "--speed", "50", "--idle-limit", "0.1",
                        str(cast)], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "replay-9" in p.stdout and "\x1b[1mbold" in p.stdout
    # --seek past the end draws it all at once.
    p = subprocess.run([sys.executable, "-m", "dbproxy.cli", "replay", "--seek", "1e9", str(cast)],
                       capture_output=True, text=True, env=env, timeout=10)
    assert p.returncode == 0 and "24 80" in p.stdout


def test_full_screen_editor_is_not_line_policed(shellproxy, tmp_path):
    """In vi (alternate screen) the keys are text, not commands: a line reading ``rm -f …`` is typed, not refused."""
    require_binary("vi")
    note = tmp_path / "note.txt"
    tmux = open_shell(shellproxy, "web-vi", token=shellproxy.guarded_token)
    try:
        tmux.run("send-keys", "-t", "t", f"vi -u NONE -N {note}", "Enter")
        # vi's status line for a new file ("~" alone would match the shell's first prompt, root@host:~#,
        # and keys typed before vi takes the terminal are shell type-ahead, policed as such).
        tmux.wait_for("[New")
        tmux.run("send-keys", "-t", "t", "-l", "i")
        time.sleep(0.3)
        tmux.run("send-keys", "-t", "t", "-l", "first line")
        tmux.run("send-keys", "-t", "t", "Enter")
        tmux.run("send-keys", "-t", "t", "-l", "rm -f /etc/important")
        tmux.run("send-keys", "-t", "t", "Enter")
        tmux.run("send-keys", "-t", "t", "Escape")
        time.sleep(0.3)
        tmux.run("send-keys", "-t", "t", "-l", ":wq")
        tmux.run("send-keys", "-t", "t", "Enter")
        tmux.wait_for("prompt$", timeout=10)
        assert "command refused" not in tmux.screen()
        tmux.run("send-keys", "-t", "t", "exit", "Enter")
        start, mine = session_of(shellproxy, "web-vi")
    finally:
        tmux.kill()
    assert note.read_text().splitlines()[:2] == ["first line", "rm -f /etc/important"]
    assert not any(e["event"].endswith("access_denied") for e in mine)
    commands = [e["command"] for e in mine if e["event"] == "ssh.shell.command"]
    assert f"vi -u NONE -N {note}" in commands and "rm -f /etc/important" not in commands
