"""Telnet through the proxy with the real ``telnet`` client and the real inetutils ``telnetd``.

The target is inetutils-telnetd (``scripts/peers/telnetd.py``) with a real
``/bin/login`` and a local user whose password only the proxy holds.  The
interactive tests drive the real ``telnet`` client in tmux (send-keys,
capture-pane); the refusals use a scripted client (a raw socket speaking
Telnet with the project's codec, since ``telnetlib`` is gone from newer
Pythons).  Every test checks the audit trail the proxy wrote.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid

import pytest

from tests.conftest import require_binary
from tests.integration.test_ssh_proxy import Tmux
from tests.support import ROOT, ProxyProcess, dbproxy_cli, peer_missing, read_audit, wait_until

pytestmark = pytest.mark.integration


def _cli(*args: str) -> str:
    p = dbproxy_cli(*args, check=True)
    return p.stdout.strip()


@pytest.fixture(scope="module")
def telnetd(tmp_path_factory):
    from scripts.peers.telnetd import start_telnetd, telnetd_bin

    try:
        telnetd_bin()
    except FileNotFoundError as exc:
        peer_missing(f"{exc}")
    server = start_telnetd(tmp_path_factory.mktemp("telnetd"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tproxy(telnetd, tmp_path_factory):
    from scripts.peers import refused_port

    workdir = tmp_path_factory.mktemp("telnetproxy")
    _cli("token", "keygen", "--algorithm", "EdDSA", "--key-file", str(workdir / "token.key"),
         "--public-key-file", str(workdir / "token.pub"))
    (workdir / "target.secret").write_text(telnetd.password + "\n")
    (workdir / "wrong.secret").write_text("not-the-password\n")
    backend = {"address": telnetd.address, "login": telnetd.login,
               "auth": {"method": "password", "password_file": "target.secret"}}
    config = {
        "identity": {"token": {"algorithm": "EdDSA", "key_file": "token.key", "public_key_file": "token.pub",
                               "leeway_seconds": 0, "revocation_file": "revoked.txt"}},
        "roles": {
            "ops": {"routes": ["*"], "targets": ["host-*", "wrongpw-*", "down-*"], "logins": [telnetd.login]},
            "guarded": {"routes": ["*"], "targets": ["host-*"], "logins": [telnetd.login],
                        "deny_commands": ["rm", "shutdown*"]},
        },
        "limits": {"identities": {"frank": 1}},
        "listeners": [{
            "name": "idle", "protocol": "telnet", "listen": "127.0.0.1:0", "auth": {"methods": ["token"]},
            "idle_timeout_seconds": 1.5,
            "routes": [{"name": "hosts", "match": {"target": "host-*"}, "backend": backend}],
        }, {
            "name": "telnet", "protocol": "telnet", "listen": "127.0.0.1:0",
            "recording": {"dir": "recordings", "input": True},
            "auth": {"methods": ["token"]},
            "routes": [
                {"name": "hosts", "match": {"target": "host-*", "login": "deploy"}, "backend": backend},
                {"name": "wrongpw", "match": {"target": "wrongpw-*"},
                 "backend": {**backend, "auth": {"method": "password", "password_file": "wrong.secret"}}},
                {"name": "down", "match": {"target": "down-*"},
                 "backend": {**backend, "address": f"127.0.0.1:{refused_port()}"}},
            ],
        }],
        "audit": {"sinks": [{"type": "jsonl", "path": "audit.jsonl"}]},
    }
    (workdir / "recordings").mkdir()
    proc = ProxyProcess(workdir, config, name="proxy").start()
    proc.port = lambda name="telnet": proc.ports[name]
    proc.recordings = workdir / "recordings"
    proc.audit_path = workdir / "audit.jsonl"
    proc.telnetd = telnetd
    proc.issue = lambda user, roles="ops", ttl="1h": _cli("token", "issue", "--config", str(proc.config_path),
                                                        "--user", user, "--roles", roles, "--ttl", ttl)
    proc.token = proc.issue("alice")
    proc.guarded_token = proc.issue("bob", "guarded")
    yield proc
    proc.stop()


# --------------------------------------------------------------------------- helpers


class ScriptedTelnet:
    """A minimal Telnet client on a raw socket (the project's sans-IO codec answers the negotiation)."""

    def __init__(self, port: int, *, width: int = 100, height: int = 30, term: str = "xterm") -> None:
        from dbproxy.engines.telnet import codec as tn

        self.tn = tn
        self.proto = tn.TelnetProtocol(accept_local={tn.NAWS, tn.TTYPE}, accept_remote={tn.ECHO, tn.SGA})
        self.width, self.height, self.term = width, height, term
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.text = b""
        self.closed = False

    def _pump(self, timeout: float) -> None:
        tn = self.tn
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            return
        except ConnectionResetError:
            data = b""
        if not data:
            self.closed = True
            return
        self.proto.feed(data)
        out = b""
        for e in self.proto.events():
            if isinstance(e, tn.Data):
                self.text += e.data
            elif isinstance(e, tn.OptionChanged) and e.option == tn.NAWS and e.enabled and e.side == "local":
                out += tn.TelnetProtocol.encode_subnegotiation(tn.NAWS, tn.naws_payload(self.width, self.height))
            elif isinstance(e, tn.Subnegotiation) and e.option == tn.TTYPE:
                out += tn.ttype_is(self.term)
        self.sock.sendall(self.proto.data_to_send() + out)

    def expect(self, needle: bytes, timeout: float = 15.0) -> bytes:
        deadline = time.monotonic() + timeout
        while needle not in self.text:
            if self.closed or time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} not received; got {self.text[-2000:]!r}")
            self._pump(0.2)
        return self.text

    def until_closed(self, timeout: float = 20.0) -> bytes:
        deadline = time.monotonic() + timeout
        while not self.closed:
            if time.monotonic() > deadline:
                raise AssertionError(f"the proxy did not close; got {self.text[-2000:]!r}")
            self._pump(0.2)
        return self.text

    def send(self, text: str) -> None:
        self.sock.sendall(self.tn.TelnetProtocol.encode_data(text.encode()))

    def login(self, user: str, token: str) -> None:
        self.expect(b"login: ")
        self.send(user + "\r")
        self.expect(b"Password: ")
        self.send(token + "\r")

    def close(self) -> None:
        self.sock.close()


def events(proxy, condition, timeout: float = 20.0) -> list[dict]:
    box: list[dict] = []

    def check():
        box[:] = read_audit(proxy.audit_path)
        return condition(box)

    wait_until(check, timeout=timeout, what="audit condition")
    return box


def session_of(proxy, target: str, event: str = "telnet.session.end", **match) -> tuple[dict, list[dict]]:
    """(the session start, every event of the session) once the session to ``target`` has ``event``."""
    def ready(es):
        sids = {e["sid"] for e in es if e["event"] == "telnet.session.start" and e.get("requested_target") == target}
        return any(e["event"] == event and e.get("sid") in sids and all(e.get(k) == v for k, v in match.items())
                   for e in es)
    evs = events(proxy, ready)
    start = [e for e in evs if e["event"] == "telnet.session.start" and e.get("requested_target") == target][-1]
    return start, [e for e in evs if e.get("sid") == start["sid"]]


def every_file_text(proxy) -> str:
    texts = [proxy.audit_path.read_text(), proxy.log_text()]
    texts += [p.read_text(errors="replace") for p in proxy.recordings.iterdir()]
    return "\n".join(texts)


def open_telnet(proxy, target: str, token: str | None = None, width: int = 100, height: int = 30) -> Tmux:
    """The real ``telnet`` client in tmux, logged in through the proxy, at a fixed prompt."""
    require_binary("telnet")
    require_binary("tmux")
    tmux = Tmux(uuid.uuid4().hex[:8])
    tmux.run("new-session", "-d", "-s", "t", "-x", str(width), "-y", str(height),
             f"TERM=xterm telnet 127.0.0.1 {proxy.port()}")
    tmux.wait_for("login:")
    tmux.run("send-keys", "-t", "t", "-l", f"deploy@{target}")
    tmux.run("send-keys", "-t", "t", "Enter")
    tmux.wait_for("Password:")
    tmux.run("send-keys", "-t", "t", "-l", token or proxy.token)
    tmux.run("send-keys", "-t", "t", "Enter")
    # A fixed prompt, and no bracketed paste (readline would hold a pasted block until one more Enter).
    time.sleep(0.5)
    tmux.run("send-keys", "-t", "t", "-l",
             "bind 'set enable-bracketed-paste off'; export PS1='prompt$ '; echo ready-$((1+1))")
    tmux.run("send-keys", "-t", "t", "Enter")
    tmux.wait_for("\nready-2")
    time.sleep(0.3)
    return tmux


# --------------------------------------------------------------------------- interactive, the real client


def test_login_with_token_command_output_audited(tproxy):
    tmux = open_telnet(tproxy, "host-a")
    try:
        screen = tmux.screen()
        assert tproxy.token not in screen
        tmux.run("send-keys", "-t", "t", "-l", "echo hi-$((6*7)); whoami")
        tmux.run("send-keys", "-t", "t", "Enter")
        screen = tmux.wait_for("hi-42")
        assert tproxy.telnetd.login in screen
        tmux.run("send-keys", "-t", "t", "-l", "exit")
        tmux.run("send-keys", "-t", "t", "Enter")
        start, mine = session_of(tproxy, "host-a")
    finally:
        tmux.kill()
    assert start["success"] is True and start["user"] == "alice" and start["term"] == "xterm"
    assert (start["protocol"], start["target"], start["login"]) == ("telnet", "host-a", tproxy.telnetd.login)
    commands = [e for e in mine if e["event"] == "telnet.shell.command"]
    assert [e["command"] for e in commands][-2:] == ["echo hi-$((6*7)); whoami", "exit"]
    assert commands[-2]["observed"] is True and commands[-2]["recording"].startswith(start["sid"])
    (end,) = [e for e in mine if e["event"] == "telnet.session.end"]
    assert end["recordings"][0]["recording_sha256"]
    ends = {e["command"]: e for e in mine if e["event"] == "telnet.shell.command.end"}
    assert ends["echo hi-$((6*7)); whoami"]["output_bytes"] > len("hi-42\r\n")
    # Neither the token nor the target's password is anywhere the proxy writes.
    text = every_file_text(tproxy)
    assert tproxy.token not in text and tproxy.telnetd.password not in text


def test_resize_reaches_the_target_and_ctrl_c_interrupts(tproxy):
    tmux = open_telnet(tproxy, "host-b", width=100, height=30)
    try:
        tmux.run("send-keys", "-t", "t", "-l", "stty size")
        tmux.run("send-keys", "-t", "t", "Enter")
        tmux.wait_for("30 100")
        tmux.run("resize-window", "-t", "t", "-x", "90", "-y", "25")
        time.sleep(0.5)
        tmux.run("send-keys", "-t", "t", "-l", "clear; stty size")
        tmux.run("send-keys", "-t", "t", "Enter")
        tmux.wait_for("25 90")
        tmux.run("send-keys", "-t", "t", "-l", "sleep 100; echo not-interrupted")
        tmux.run("send-keys", "-t", "t", "Enter")
        time.sleep(0.8)
        tmux.run("send-keys", "-t", "t", "C-c", "")
        tmux.run("send-keys", "-t", "t", "-l", "echo after-$((1+1))")
        tmux.run("send-keys", "-t", "t", "Enter")
        screen = tmux.wait_for("after-2", timeout=10)  # long before sleep 100 ends
        assert "not-interrupted" not in [line.strip() for line in screen.splitlines()]
        # telnetd answers the interrupt with a Synch (IAC DM as TCP urgent data): read inline, parsed, no
        # stray byte reaches the client's screen or the recording.
        assert "\ufffd" not in screen
        tmux.run("send-keys", "-t", "t", "-l", "exit")
        tmux.run("send-keys", "-t", "t", "Enter")
        start, mine = session_of(tproxy, "host-b")
    finally:
        tmux.kill()
    commands = [e["command"] for e in mine if e["event"] == "telnet.shell.command"]
    assert "sleep 100; echo not-interrupted" in commands and "echo after-$((1+1))" in commands
    (end,) = [e for e in mine if e["event"] == "telnet.session.end"]
    (output,) = [r for r in end["recordings"] if not r.get("input")]
    assert "\ufffd" not in (tproxy.recordings / output["recording"]).read_text()


def test_shell_line_policy_refuses_typed_and_pasted_lines(tproxy, tmp_path):
    canary = tmp_path / "canary"
    canary.write_text("still here")
    os.chmod(tmp_path, 0o777)
    os.chmod(canary, 0o666)
    tmux = open_telnet(tproxy, "host-pol", token=tproxy.guarded_token)
    try:
        tmux.run("send-keys", "-t", "t", "-l", f"rm -f {canary}")
        tmux.run("send-keys", "-t", "t", "Enter")
        screen = tmux.wait_for("command refused by policy")
        assert "'rm'" in screen
        tmux.run("send-keys", "-t", "t", "-l", "echo still-$((1+1))")
        tmux.run("send-keys", "-t", "t", "Enter")
        tmux.wait_for("still-2")
        assert canary.read_text() == "still here"
        # A paste of three lines: the first runs, the second is refused, the third is never sent.
        tmux.run("send-keys", "-t", "t", "-l", f"echo pasted-$((0+1))\rrm -f {canary}\recho pasted-$((1+2))\r")
        tmux.wait_for("pasted-1")
        tmux.wait_for("command refused by policy", timeout=10)
        time.sleep(1.0)
        tmux.run("send-keys", "-t", "t", "-l", "echo done-$((2+2))")
        tmux.run("send-keys", "-t", "t", "Enter")
        screen = tmux.wait_for("done-4")
        assert "pasted-3" not in screen and "pasted-$((1+2))" not in screen
        assert canary.read_text() == "still here"
        tmux.run("send-keys", "-t", "t", "-l", "exit")
        tmux.run("send-keys", "-t", "t", "Enter")
        start, mine = session_of(tproxy, "host-pol")
    finally:
        tmux.kill()
    refused = [e for e in mine if e["event"] == "telnet.shell.command" and e.get("success") is False]
    assert [e["command"] for e in refused] == [f"rm -f {canary}"] * 2
    assert all(e["denied_pattern"] == "rm" for e in refused)
    denials = [e for e in mine if e["event"] == "telnet.session.access_denied"]
    assert len(denials) == 2 and all(d["stage"] == "shell" and d["reason"] == "command_denied" for d in denials)
    ran = [e["command"] for e in mine if e["event"] == "telnet.shell.command" and e.get("success") is not False]
    assert "echo pasted-$((0+1))" in ran and "echo done-$((2+2))" in ran
    assert not any("pasted-$((1+2))" in c for c in ran)


def test_recording_replays_to_what_the_client_saw_and_hides_no_echo_input(tproxy):
    secret = f"S3cret-{uuid.uuid4().hex[:12]}"
    tmux = open_telnet(tproxy, "host-replay")
    try:
        tmux.run("send-keys", "-t", "t", "-l", "read -rs -p 'Password: ' PW; echo; echo got-${#PW}-chars")
        tmux.run("send-keys", "-t", "t", "Enter")
        time.sleep(0.5)
        tmux.wait_for("Password:")
        tmux.run("send-keys", "-t", "t", "-l", secret)
        tmux.run("send-keys", "-t", "t", "Enter")
        tmux.wait_for(f"got-{len(secret)}-chars")
        tmux.run("send-keys", "-t", "t", "-l",
                 "printf '\\033[1mbold\\033[0m %s\\n' replay-$((3*3)); seq 1 40 | paste -sd,")
        tmux.run("send-keys", "-t", "t", "Enter")
        tmux.wait_for("replay-9")
        time.sleep(0.5)
        seen = tmux.screen()
        tmux.kill()  # the client goes away: the recording ends on this screen
        start, mine = session_of(tproxy, "host-replay")
    finally:
        tmux.kill()
    hidden = [e for e in mine if e["event"] == "telnet.shell.hidden_input"]
    assert len(hidden) == 1 and hidden[0]["bytes"] == len(secret) and "command" not in hidden[0]
    assert secret not in every_file_text(tproxy)
    (end,) = [e for e in mine if e["event"] == "telnet.session.end"]
    (output,) = [r for r in end["recordings"] if not r.get("input")]
    cast = tproxy.recordings / output["recording"]
    import hashlib

    assert hashlib.sha256(cast.read_bytes()).hexdigest() == output["recording_sha256"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "dbproxy.cli", "replay", "--text", str(cast)], capture_output=True,
                       text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    want = [row.rstrip() for row in seen.rstrip("\n").splitlines()]
    while want and not want[-1]:
        want.pop()
    got = p.stdout.rstrip("\n").splitlines()
    # The recording starts at the target's first prompt: the client's screen also shows the proxy's
    # login dialogue above it, so compare the rows from the first one the recording drew.
    assert got and want[-len(got):] == got, (got, want)
    assert "replay-9" in p.stdout


# --------------------------------------------------------------------------- refusals, scripted client


def test_wrong_token_refused_and_audited(tproxy):
    c = ScriptedTelnet(tproxy.port())
    try:
        c.login("deploy@host-wrong", "not-a-token")
        text = c.until_closed()
    finally:
        c.close()
    assert b"dbproxy: authentication failed: the dbproxy token was not accepted" in text
    evs = events(tproxy, lambda es: any(e["event"] == "telnet.session.access_denied"
                                        and e.get("requested_target") == "host-wrong" for e in es))
    (denial,) = [e for e in evs if e["event"] == "telnet.session.access_denied"
                 and e.get("requested_target") == "host-wrong"]
    assert denial["stage"] == "authenticate"
    assert b"not-a-token" not in text  # the token was not echoed


def test_expired_and_revoked_tokens_refused(tproxy):
    expired = tproxy.issue("grace", ttl="1s")
    revoked = tproxy.issue("henry")
    _cli("token", "revoke", "--config", str(tproxy.config_path), revoked)
    time.sleep(2.1)
    for target, token in (("host-exp", expired), ("host-rev", revoked)):
        c = ScriptedTelnet(tproxy.port())
        try:
            c.login(f"deploy@{target}", token)
            assert b"the dbproxy token was not accepted" in c.until_closed()
        finally:
            c.close()
    evs = events(tproxy, lambda es: {"host-exp", "host-rev"} <= {e.get("requested_target") for e in es
                                                                  if e["event"] == "telnet.session.access_denied"})
    reasons = {e["requested_target"]: e["reason"] for e in evs if e["event"] == "telnet.session.access_denied"
               and e["stage"] == "authenticate"}
    assert reasons["host-exp"] == "token_expired" and reasons["host-rev"] == "token_revoked"


def test_target_down_clear_message(tproxy):
    c = ScriptedTelnet(tproxy.port())
    try:
        c.login("deploy@down-1", tproxy.token)
        text = c.until_closed()
    finally:
        c.close()
    assert b"dbproxy: the target 'down-1' is unreachable" in text
    start, _ = session_of(tproxy, "down-1", event="telnet.session.start")
    assert start["success"] is False and start["reason"] == "target_connect"


def test_wrong_target_password_clear_message_audited(tproxy):
    c = ScriptedTelnet(tproxy.port())
    try:
        c.login("deploy@wrongpw-1", tproxy.token)
        text = c.until_closed(timeout=30)
    finally:
        c.close()
    assert f"dbproxy: the target 'wrongpw-1' refused the proxy's login as '{tproxy.telnetd.login}'".encode() in text
    start, _ = session_of(tproxy, "wrongpw-1", event="telnet.session.start")
    assert start["success"] is False and start["reason"] == "target_auth"
    assert "Login incorrect" in start["error"]
    assert "not-the-password" not in every_file_text(tproxy)


def test_scripted_session_window_and_terminal_type(tproxy):
    """A scripted client's NAWS and TTYPE reach the target (``stty size``, ``$TERM``)."""
    c = ScriptedTelnet(tproxy.port(), width=123, height=45, term="vt220")
    try:
        c.login("deploy@host-script", tproxy.token)
        c.expect(b"$ ")
        c.send("echo term=$TERM; stty size\r")
        c.expect(b"45 123")
        assert b"term=vt220" in c.text
        c.send("exit\r")
        c.until_closed()
    finally:
        c.close()
    start, mine = session_of(tproxy, "host-script")
    assert start["term"] == "vt220"


def test_idle_timeout_closes_a_quiet_session(tproxy):
    c = ScriptedTelnet(tproxy.port("idle"))
    try:
        c.login("deploy@host-idle", tproxy.token)
        c.expect(b"$ ")
        c.send("sleep 20; echo not-reached\r")
        started = time.monotonic()
        text = c.until_closed()
        assert time.monotonic() - started < 10
    finally:
        c.close()
    assert b"dbproxy: idle timeout: no traffic for 1.5s" in text and b"\nnot-reached" not in text
    start, mine = session_of(tproxy, "host-idle")
    (end,) = [e for e in mine if e["event"] == "telnet.session.end"]
    assert end["reason"].startswith("idle timeout")


def test_per_identity_session_limit(tproxy):
    token = tproxy.issue("frank")
    first = ScriptedTelnet(tproxy.port())
    try:
        first.login("deploy@host-lim1", token)
        first.expect(b"$ ")
        second = ScriptedTelnet(tproxy.port())
        try:
            second.login("deploy@host-lim2", token)
            assert b"the limit per identity" in second.until_closed()
        finally:
            second.close()
        first.send("echo first-$((2+3))\r")
        first.expect(b"first-5")
        first.send("exit\r")
        first.until_closed()
    finally:
        first.close()
    start, _ = session_of(tproxy, "host-lim2", event="telnet.session.start")
    assert start["success"] is False and start["reason"] == "too_many_connections_identity"
    third = ScriptedTelnet(tproxy.port())  # the slot is free again
    try:
        third.login("deploy@host-lim3", token)
        third.expect(b"$ ")
    finally:
        third.close()
