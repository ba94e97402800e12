"""SSH through the proxy with the real OpenSSH client and server.

The target is a private OpenSSH sshd (``scripts/peers/sshd.py``) that only
accepts the proxy's key; the clients are OpenSSH's ``ssh`` and ``sftp`` (the
token typed by ``SSH_ASKPASS``, as a person's ssh would ask for it), and an
interactive shell is driven in tmux (send-keys, capture-pane).  Every test
checks the audit trail the proxy wrote.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import require_binary
from tests.support import ROOT, ProxyProcess, read_audit, wait_until

pytestmark = pytest.mark.integration


def _cli(*args: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "dbproxy.cli", *args], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip()


def _backend(sshd, known_hosts, *, login: bool = True) -> dict:
    backend = {"address": sshd.address, "auth": {"method": "publickey", "key_file": str(sshd.client_key)},
               "host_key": {"known_hosts_file": str(known_hosts)}}
    if login:
        backend["login"] = sshd.login
    return backend


@pytest.fixture(scope="module")
def sshproxy(sshd, tmp_path_factory):
    from scripts.peers.sshd import make_key

    require_binary("ssh")
    workdir = tmp_path_factory.mktemp("sshproxy")
    _cli("token", "keygen", "--algorithm", "EdDSA", "--key-file", str(workdir / "token.key"),
         "--public-key-file", str(workdir / "token.pub"))
    make_key(workdir / "proxy_host_ed25519", "dbproxy-proxy-host")
    # A known_hosts that names another key for the target's address: the proxy must refuse it.
    other = make_key(workdir / "impostor_ed25519", "impostor")
    kind, blob = Path(f"{other}.pub").read_text().split()[:2]
    wrong = workdir / "wrong_known_hosts"
    wrong.write_text(f"[127.0.0.1]:{sshd.port} {kind} {blob}\n")
    from scripts.peers import refused_port

    closed_port = refused_port()  # nothing listens there (held, so no listener gets it): the target is down
    # Client keys: erin's key is registered to her; dave has a certificate of the user CA naming him.
    make_key(workdir / "erin_ed25519", "erin")
    make_key(workdir / "stranger_ed25519", "stranger")
    make_key(workdir / "user_ca", "dbproxy-user-ca")
    make_key(workdir / "untrusted_ca", "a CA the target does not trust")
    config = {
        "identity": {"token": {"algorithm": "EdDSA", "key_file": "token.key", "public_key_file": "token.pub"},
                     "publickey": {"users": {"erin": {"roles": ["ops"], "authorized_keys_file": "erin_ed25519.pub"},
                                             "dave": {"roles": ["ops"]}},
                                   "user_ca_file": "user_ca.pub"}},
        "roles": {
            "ops": {"routes": ["*"], "targets": ["web-*", "rekeyed-*", "down-*", "cert-*"], "logins": [sshd.login]},
            "guarded": {"routes": ["*"], "targets": ["web-*"], "logins": [sshd.login],
                        "deny_commands": ["rm", "shutdown*"]},
            "forwarder": {"routes": ["*"], "targets": ["web-*"], "logins": [sshd.login],
                          "port_forwarding": ["local", "remote"]},
            # Database keys grant databases only: this role reaches no SSH target.
            "dbonly": {"routes": ["*"], "databases": ["*"], "db_users": ["*"]},
        },
        "listeners": [{
            "name": "ssh", "protocol": "ssh", "listen": "127.0.0.1:0",
            "host_key_file": "proxy_host_ed25519",
            "recording": {"dir": "recordings"},
            "env_allow": ["LANG", "LC_DBPROXY_OK*"],
            "auth": {"methods": ["token", "publickey"]},
            "routes": [
                # No backend login: the session logs in as the login the client named (if a role grants it).
                {"name": "web", "match": {"target": "web-*"}, "backend": _backend(sshd, sshd.known_hosts, login=False)},
                {"name": "db", "match": {"target": "db-*"}, "backend": _backend(sshd, sshd.known_hosts)},
                {"name": "rekeyed", "match": {"target": "rekeyed-*"}, "backend": _backend(sshd, wrong)},
                # The proxy signs a per-session certificate with a CA the target trusts (or, here, does not).
                {"name": "cert-untrusted", "match": {"target": "cert-untrusted-*"},
                 "backend": {**_backend(sshd, sshd.known_hosts),
                             "auth": {"method": "certificate", "ca_key_file": "untrusted_ca"}}},
                {"name": "cert", "match": {"target": "cert-*"},
                 "backend": {**_backend(sshd, sshd.known_hosts),
                             "auth": {"method": "certificate", "ca_key_file": str(sshd.user_ca), "validity_seconds": 120}}},
                {"name": "down", "match": {"target": "down-*"},
                 "backend": {**_backend(sshd, sshd.known_hosts), "address": f"127.0.0.1:{closed_port}"}},
            ],
        }],
        "audit": {"sinks": [{"type": "jsonl", "path": "audit.jsonl"}]},
    }
    (workdir / "recordings").mkdir()
    proc = ProxyProcess(workdir, config, name="proxy").start()
    proc.recordings = workdir / "recordings"
    proc.audit_path = workdir / "audit.jsonl"
    proc.login = sshd.login
    proc.sshd = sshd
    proc.workdir = workdir
    proc.target_addr = sshd.address
    prepare_client(proc, workdir)
    proc.token = _cli("token", "issue", "--config", str(proc.config_path), "--user", "alice", "--roles", "ops",
                      "--ttl", "1h")
    proc.forward_token = _cli("token", "issue", "--config", str(proc.config_path), "--user", "ivan", "--roles",
                              "forwarder", "--ttl", "1h")
    proc.dbonly_token = _cli("token", "issue", "--config", str(proc.config_path), "--user", "carol", "--roles", "dbonly",
                             "--ttl", "1h")
    proc.guarded_token = _cli("token", "issue", "--config", str(proc.config_path), "--user", "bob", "--roles",
                              "guarded", "--ttl", "1h")
    yield proc
    proc.stop()


def prepare_client(proc, workdir) -> None:
    """What the real ssh client needs: the proxy's host key in its known_hosts
    (StrictHostKeyChecking=yes) and an askpass program that types $DBPROXY_TOKEN."""
    kind, blob = (workdir / "proxy_host_ed25519.pub").read_text().split()[:2]
    proc.known_hosts = workdir / "client_known_hosts"
    proc.known_hosts.write_text(f"[127.0.0.1]:{proc.port()} {kind} {blob}\n")
    askpass = workdir / "askpass.sh"
    askpass.write_text('#!/bin/sh\nprintf "%s\\n" "$DBPROXY_TOKEN"\n')
    askpass.chmod(0o700)
    proc.askpass = askpass


def client_env(proxy, token: str | None = None) -> dict:
    env = dict(os.environ)
    env.update(SSH_ASKPASS=str(proxy.askpass), SSH_ASKPASS_REQUIRE="force", DBPROXY_TOKEN=token or proxy.token)
    env.pop("SSH_AUTH_SOCK", None)
    return env


def ssh_options(proxy, *, key=None) -> list[str]:
    """OpenSSH options: the token by SSH_ASKPASS, or (``key``) only that key (and its ``-cert.pub``)."""
    auth = ["-o", "PubkeyAuthentication=no"] if key is None else [
        "-o", "PubkeyAuthentication=yes", "-o", "IdentitiesOnly=yes", "-o", "PreferredAuthentications=publickey",
        "-o", "BatchMode=yes", "-i", str(key)]
    return ["-F", "/dev/null", "-o", f"UserKnownHostsFile={proxy.known_hosts}", "-o", "StrictHostKeyChecking=yes",
            *auth, "-o", "ConnectTimeout=10", "-o", "NumberOfPasswordPrompts=1"]


def key_ssh(proxy, target: str, key, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("SSH_AUTH_SOCK", None)
    return subprocess.run(["ssh", *ssh_options(proxy, key=key), "-p", str(proxy.port()), f"{proxy.login}@{target}@127.0.0.1",
                           *args], capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=30)


def sign_user_key(proxy, name: str, principal: str, validity: str, *options: str) -> Path:
    """A fresh key with an OpenSSH user certificate of the proxy's user CA (``ssh-keygen -s``)."""
    from scripts.peers.sshd import make_key

    key = make_key(proxy.workdir / name, name)
    subprocess.run(["ssh-keygen", "-q", "-s", str(proxy.workdir / "user_ca"), "-I", f"{name}-id", "-n", principal,
                    "-V", validity, *options, f"{key}.pub"], check=True, capture_output=True, timeout=10)
    return key


def ssh(proxy, target: str, *args: str, token: str | None = None, login: str | None = None,
        extra: tuple = (), timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["ssh", *ssh_options(proxy), "-p", str(proxy.port()), *extra, f"{login or proxy.login}@{target}@127.0.0.1",
         *args],
        capture_output=True, text=True, env=client_env(proxy, token), stdin=subprocess.DEVNULL, timeout=timeout)


def events(proxy, condition, timeout: float = 15.0) -> list[dict]:
    box: list[dict] = []

    def check():
        box[:] = read_audit(proxy.audit_path)
        return condition(box)

    wait_until(check, timeout=timeout, what="audit condition")
    return box


def for_target(proxy, target: str, event: str, **match) -> list[dict]:
    """The trail once the (successful) session to ``target`` has an ``event`` matching ``match``."""
    def ready(es: list[dict]) -> bool:
        sids = {e["sid"] for e in es if e["event"] == "ssh.session.start" and e.get("requested_target") == target
                and e["success"]}
        return any(e["event"] == event and e.get("sid") in sids and all(e.get(k) == v for k, v in match.items())
                   for e in es)
    return events(proxy, ready)


def session_events(evs: list[dict], sid: str) -> list[dict]:
    return [e for e in evs if e.get("sid") == sid]


def start_of(evs: list[dict], target: str, success: bool) -> dict:
    found = [e for e in evs if e["event"] == "ssh.session.start" and e.get("requested_target") == target
             and e.get("success") is success]
    assert found, f"no ssh.session.start for {target} success={success}"
    return found[-1]


# --------------------------------------------------------------------------- exec


def test_exec_output_and_exit_status_relayed_and_audited(sshproxy):
    marker = uuid.uuid4().hex
    command = f"echo hi-{marker}; echo err-{marker} >&2; exit 7"
    r = ssh(sshproxy, "web-1", command, extra=("-o", "PreferredAuthentications=password"))
    assert r.returncode == 7, r.stderr
    assert r.stdout == f"hi-{marker}\n"
    assert f"err-{marker}" in r.stderr

    evs = events(sshproxy, lambda es: any(e["event"] == "ssh.session.end" and any(
        x.get("command") == command and x.get("sid") == e.get("sid") for x in es) for e in es))
    (execd,) = [e for e in evs if e["event"] == "ssh.exec" and e.get("command") == command]
    mine = session_events(evs, execd["sid"])
    kinds = [e["event"] for e in mine]
    assert kinds.index("ssh.session.start") < kinds.index("ssh.exec") < kinds.index("ssh.channel.end") \
        < kinds.index("ssh.session.end")
    start = mine[kinds.index("ssh.session.start")]
    assert start["success"] is True
    assert start["user"] == "alice"
    assert start["requested_target"] == "web-1" and start["client_auth"] == "password"
    (end,) = [e for e in mine if e["event"] == "ssh.channel.end"]
    assert end["exit_status"] == 7 and end["channel_type"] == "exec"
    # ssh.* events carry the terminal's fields, none of the database ones.
    for e in mine:
        assert not {"db_protocol", "db_name", "db_user", "db_uri"} & set(e), e
        assert (e["protocol"], e["target"], e["login"], e["target_addr"]) == ("ssh", "web-1", sshproxy.login,
                                                                             sshproxy.target_addr), e
    text = sshproxy.audit_path.read_text() + sshproxy.log_text()
    assert sshproxy.token not in text


def test_client_leg_negotiates_aes_gcm_and_still_serves_others(sshproxy):
    """OpenSSH lists aes-ctr before aes-gcm and the client's order wins (RFC 4253 §7.1): the proxy reads the
    client's KEXINIT first and offers AES-GCM alone when the client lists it (cheaper per byte through the
    proxy: scripts/bench/README.md); a client without it still gets the full list, and one that waits for
    the server's KEXINIT before sending its own still gets it."""
    r = ssh(sshproxy, "web-kex-gcm", "echo ok", extra=("-v",))
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    chosen = [line for line in r.stderr.splitlines() if line.startswith("debug1: kex: ") and " cipher: " in line]
    assert len(chosen) == 2 and all(" cipher: aes128-gcm@openssh.com " in line for line in chosen), chosen

    r = ssh(sshproxy, "web-kex-ctr", "echo ok", extra=("-v", "-o", "Ciphers=chacha20-poly1305@openssh.com,aes256-ctr"))
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    chosen = [line for line in r.stderr.splitlines() if line.startswith("debug1: kex: ") and " cipher: " in line]
    assert len(chosen) == 2 and all(" cipher: aes256-ctr " in line for line in chosen), chosen

    with socket.create_connection(("127.0.0.1", sshproxy.port()), timeout=15) as sock:
        sock.sendall(b"SSH-2.0-WaitsForTheServer_1.0\r\n")  # and nothing more until the server's KEXINIT
        data = b""
        while b"\r\n" not in data or len(data) < data.index(b"\r\n") + 2 + 6:
            more = sock.recv(4096)
            assert more, f"connection closed after {data!r}"
            data += more
        packet = data[data.index(b"\r\n") + 2:]
        assert data.startswith(b"SSH-2.0-") and packet[5] == 20, data  # RFC 4253 §6, §7.1: SSH_MSG_KEXINIT


def test_keyboard_interactive_token(sshproxy):
    """OpenSSH prefers keyboard-interactive: the proxy's one prompt takes the token."""
    r = ssh(sshproxy, "web-2", "printf %s kbd-ok", extra=("-o", "PreferredAuthentications=keyboard-interactive"))
    assert r.returncode == 0, r.stderr
    assert r.stdout == "kbd-ok"
    evs = events(sshproxy, lambda es: any(e["event"] == "ssh.session.start" and e.get("requested_target") == "web-2"
                                          for e in es))
    assert start_of(evs, "web-2", True)["client_auth"] == "keyboard-interactive"


# --------------------------------------------------------------------------- client keys and certificates


def test_registered_public_key_is_an_identity(sshproxy):
    r = key_ssh(sshproxy, "web-k1", sshproxy.workdir / "erin_ed25519", "echo key-ok")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "key-ok\n"
    evs = for_target(sshproxy, "web-k1", "ssh.session.end")
    start = start_of(evs, "web-k1", True)
    assert (start["user"], start["auth_method"], start["client_auth"]) == ("erin", "publickey", "publickey")
    pub = subprocess.run(["ssh-keygen", "-lf", str(sshproxy.workdir / "erin_ed25519.pub")], capture_output=True,
                         text=True, check=True).stdout.split()[1]
    assert start["client_key"] == pub


def test_unregistered_public_key_refused(sshproxy):
    r = key_ssh(sshproxy, "web-k2", sshproxy.workdir / "stranger_ed25519", "echo should-not-run")
    assert r.returncode == 255
    assert "should-not-run" not in r.stdout and "Permission denied" in r.stderr


def test_user_certificate_is_an_identity(sshproxy):
    key = sign_user_key(sshproxy, "dave_cert", "dave", "-5m:+10m")
    r = key_ssh(sshproxy, "web-k3", key, "echo cert-ok")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "cert-ok\n"
    evs = for_target(sshproxy, "web-k3", "ssh.session.end")
    start = start_of(evs, "web-k3", True)
    assert (start["user"], start["auth_method"], start["certificate_key_id"]) == ("dave", "certificate", "dave_cert-id")


@pytest.mark.parametrize("principal, validity, options", [
    ("dave", "-20m:-10m", ()),  # expired
    ("mallory", "-5m:+10m", ()),  # a principal that is no configured identity
    ("dave", "-5m:+10m", ("-O", "force-command=true")),  # an option the proxy would not enforce
], ids=["expired", "unknown-principal", "force-command"])
def test_bad_user_certificates_refused(sshproxy, principal, validity, options):
    key = sign_user_key(sshproxy, f"bad_{uuid.uuid4().hex[:6]}", principal, validity, *options)
    r = key_ssh(sshproxy, "web-k4", key, "echo should-not-run")
    assert r.returncode == 255
    assert "should-not-run" not in r.stdout and "Permission denied" in r.stderr


# --------------------------------------------------------------------------- target auth: certificate


def test_target_login_with_a_per_session_certificate(sshproxy):
    """The route's auth is ``certificate``: the target's sshd (TrustedUserCAKeys) accepts the proxy's
    short-lived certificate and logs its key id, which names the identity and the session."""
    r = ssh(sshproxy, "cert-1", "echo cert-target-ok")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "cert-target-ok\n"
    evs = for_target(sshproxy, "cert-1", "ssh.session.end")
    start = start_of(evs, "cert-1", True)
    wait_until(lambda: f'Accepted certificate ID "dbproxy:alice:{start["sid"]}"' in sshproxy.sshd.log_text(),
               timeout=10, what="sshd accepting the certificate with the session's key id")


def test_target_refuses_a_certificate_of_an_untrusted_ca(sshproxy):
    r = ssh(sshproxy, "cert-untrusted-1", "echo should-not-run")
    assert r.returncode == 255
    assert "the target 'cert-untrusted-1' refused the proxy's login" in r.stderr
    evs = events(sshproxy, lambda es: any(e["event"] == "ssh.session.start" and e.get("requested_target") == "cert-untrusted-1"
                                          for e in es))
    assert start_of(evs, "cert-untrusted-1", False)["reason"] == "target_auth"


# --------------------------------------------------------------------------- refusals


def test_wrong_token_refused(sshproxy):
    r = ssh(sshproxy, "web-3", "echo should-not-run", token="not-a-token")
    assert r.returncode == 255
    assert "should-not-run" not in r.stdout
    assert "the dbproxy token was not accepted" in r.stderr
    evs = events(sshproxy, lambda es: any(e["event"] == "ssh.session.start" and e.get("requested_target") == "web-3"
                                          for e in es))
    start = start_of(evs, "web-3", False)
    (denial,) = [e for e in evs if e["event"].endswith("access_denied") and e.get("sid") == start["sid"]]
    assert denial["event"] == "ssh.session.access_denied" and denial["stage"] == "authenticate"
    assert denial["reason"] == "token_malformed" and "db_name" not in denial
    assert not any(e["event"] == "ssh.exec" and e.get("sid") == start["sid"] for e in evs)
    assert "not-a-token" not in sshproxy.audit_path.read_text()


def test_target_not_granted_refused(sshproxy):
    r = ssh(sshproxy, "db-1", "echo should-not-run")
    assert r.returncode == 255
    assert "should-not-run" not in r.stdout
    assert "access denied: you may not log in to 'db-1'" in r.stderr
    evs = events(sshproxy, lambda es: any(e["event"] == "ssh.session.start" and e.get("requested_target") == "db-1"
                                          for e in es))
    start = start_of(evs, "db-1", False)
    assert start["reason"] == "no_role_allows"


def test_database_role_grants_no_terminal(sshproxy):
    """A role granting every database and database user (``databases``/``db_users``) reaches no SSH target."""
    r = ssh(sshproxy, "web-1", "echo should-not-run", token=sshproxy.dbonly_token)
    assert r.returncode == 255
    assert "should-not-run" not in r.stdout
    assert "access denied: you may not log in to 'web-1'" in r.stderr
    evs = events(sshproxy, lambda es: any(e["event"] == "ssh.session.start" and e.get("user") == "carol" for e in es))
    (start,) = [e for e in evs if e["event"] == "ssh.session.start" and e.get("user") == "carol"]
    assert start["success"] is False and start["reason"] == "no_role_allows"


def test_login_not_granted_refused(sshproxy):
    r = ssh(sshproxy, "web-1", "echo should-not-run", login="nobody")
    assert r.returncode == 255
    assert "access denied: you may not log in to 'web-1' as 'nobody'" in r.stderr


def test_bad_user_name_refused(sshproxy):
    r = subprocess.run(["ssh", *ssh_options(sshproxy), "-p", str(sshproxy.port()), f"{sshproxy.login}@127.0.0.1", "true"],
                       capture_output=True, text=True, env=client_env(sshproxy), stdin=subprocess.DEVNULL, timeout=30)
    assert r.returncode == 255
    assert "LOGIN@TARGET" in r.stderr


def test_target_host_key_mismatch_refused(sshproxy):
    r = ssh(sshproxy, "rekeyed-1", "echo should-not-run")
    assert r.returncode == 255
    assert "should-not-run" not in r.stdout
    assert "does not match the proxy's known_hosts" in r.stderr
    evs = events(sshproxy, lambda es: any(e["event"] == "ssh.session.start" and e.get("requested_target") == "rekeyed-1"
                                          for e in es))
    start = start_of(evs, "rekeyed-1", False)
    assert start["reason"] == "target_host_key"


def test_target_down_refused(sshproxy):
    r = ssh(sshproxy, "down-1", "echo should-not-run")
    assert r.returncode == 255
    assert "the target 'down-1' is unreachable" in r.stderr
    evs = events(sshproxy, lambda es: any(e["event"] == "ssh.session.start" and e.get("requested_target") == "down-1"
                                          for e in es))
    assert start_of(evs, "down-1", False)["reason"] == "target_connect"


def test_agent_and_x11_forwarding_refused_and_audited(sshproxy, tmp_path):
    """``ssh -A`` with a running agent and ``ssh -X`` with a DISPLAY: both requests refused and audited; the
    command still runs, without an agent socket on the target."""
    agent_sock = tmp_path / "agent.sock"
    agent = subprocess.run(["ssh-agent", "-a", str(agent_sock)], capture_output=True, text=True, timeout=10)
    assert agent.returncode == 0, agent.stderr
    agent_pid = int(agent.stdout.split("SSH_AGENT_PID=")[1].split(";")[0])
    try:
        env = client_env(sshproxy)
        env.update(SSH_AUTH_SOCK=str(agent_sock), DISPLAY="127.0.0.1:93")
        r = subprocess.run(["ssh", *ssh_options(sshproxy), "-A", "-X", "-p", str(sshproxy.port()),
                            f"{sshproxy.login}@web-9@127.0.0.1", "echo agent=${SSH_AUTH_SOCK:-none}"],
                           capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=30)
    finally:
        os.kill(agent_pid, 15)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "agent=none\n"
    for_target(sshproxy, "web-9", "ssh.forward", request="x11")
    evs = for_target(sshproxy, "web-9", "ssh.forward", request="auth-agent")
    start = start_of(evs, "web-9", True)
    refused = {e["request"] for e in evs if e["event"] == "ssh.forward" and e.get("sid") == start["sid"]}
    assert refused == {"auth-agent", "x11"}
    assert all(e["verdict"] == "denied" for e in evs if e["event"] == "ssh.forward" and e.get("sid") == start["sid"])


def test_port_forwarding_refused_and_audited(sshproxy, sshd):
    """``ssh -W`` asks for a direct-tcpip channel (what -L and -D use): refused, audited, nothing connected."""
    r = ssh(sshproxy, "web-4", extra=("-W", f"127.0.0.1:{sshd.port}"))
    assert r.returncode == 255
    assert "administratively prohibited" in r.stderr
    assert "SSH-2.0-OpenSSH" not in r.stdout  # the target's banner never came through
    evs = for_target(sshproxy, "web-4", "ssh.forward")
    start = start_of(evs, "web-4", True)
    (fwd,) = [e for e in evs if e["event"] == "ssh.forward" and e.get("sid") == start["sid"]]
    assert fwd["request"] == "direct-tcpip" and fwd["verdict"] == "denied"
    assert fwd["dest_port"] == sshd.port


def test_remote_forwarding_refused_and_audited(sshproxy):
    r = ssh(sshproxy, "web-5", "true", extra=("-o", "ExitOnForwardFailure=yes", "-R", "127.0.0.1:0:127.0.0.1:9"))
    assert r.returncode == 255
    assert "remote port forwarding failed" in r.stderr.lower()
    evs = for_target(sshproxy, "web-5", "ssh.forward", request="tcpip-forward")
    start = start_of(evs, "web-5", True)
    assert any(e["event"] == "ssh.forward" and e.get("sid") == start["sid"] and e["verdict"] == "denied" for e in evs)


# --------------------------------------------------------------------------- sftp


def test_sftp_put_and_get(sshproxy, tmp_path):
    require_binary("sftp")
    payload = os.urandom(3 * 1024 * 1024 + 17)
    src = tmp_path / "up.bin"
    src.write_bytes(payload)
    remote = tmp_path / "remote.bin"  # the target is this machine: the file lands here
    back = tmp_path / "down.bin"
    # Commands on stdin, not ``-b``: batch mode makes sftp run ssh with BatchMode=yes (no password prompt).
    r = subprocess.run(["sftp", *ssh_options(sshproxy), "-P", str(sshproxy.port()), f"{sshproxy.login}@web-6@127.0.0.1"],
                       input=f"put {src} {remote}\nget {remote} {back}\nbye\n", capture_output=True, text=True,
                       env=client_env(sshproxy), timeout=60)
    assert r.returncode == 0, r.stderr
    assert remote.read_bytes() == payload
    assert back.read_bytes() == payload
    evs = for_target(sshproxy, "web-6", "ssh.subsystem")
    start = start_of(evs, "web-6", True)
    (sub,) = [e for e in evs if e["event"] == "ssh.subsystem" and e.get("sid") == start["sid"]]
    assert sub["subsystem"] == "sftp"
    # Per file: the open audited, then on close the bytes and the SHA-256 of what went each way.
    evs = for_target(sshproxy, "web-6", "ssh.session.end")
    mine = [e for e in evs if e.get("sid") == start["sid"]]
    opens = [e for e in mine if e["event"] == "ssh.sftp" and e["operation"] == "open"]
    assert [(e["path"], e["mode"]) for e in opens] == [(str(remote), "write"), (str(remote), "read")]
    upload, download = [e for e in mine if e["event"] == "ssh.sftp.file"]
    digest = hashlib.sha256(payload).hexdigest()
    assert (upload["path"], upload["mode"], upload["bytes_written"], upload["sha256_written"]) == \
        (str(remote), "write", len(payload), digest)
    assert (download["path"], download["mode"], download["bytes_read"], download["sha256_read"]) == \
        (str(remote), "read", len(payload), digest)
    kinds = [e["event"] for e in mine]
    assert kinds.index("ssh.sftp") < kinds.index("ssh.sftp.file") < kinds.index("ssh.channel.end")


# --------------------------------------------------------------------------- interactive shell


class Tmux:
    def __init__(self, name: str) -> None:
        self.socket = f"dbproxy-test-{name}"

    def run(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True, check=True,
                              timeout=10).stdout

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", "t")

    def wait_for(self, text: str, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if text in screen:
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not on the screen:\n{screen}")
            time.sleep(0.1)

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=10)


def test_interactive_shell_in_tmux(sshproxy):
    require_binary("tmux")
    tmux = Tmux(uuid.uuid4().hex[:8])
    env = client_env(sshproxy)
    command = " ".join(["env", f"SSH_ASKPASS={env['SSH_ASKPASS']}", "SSH_ASKPASS_REQUIRE=force",
                        f"DBPROXY_TOKEN={env['DBPROXY_TOKEN']}", "ssh", *ssh_options(sshproxy), "-tt", "-p",
                        str(sshproxy.port()), f"{sshproxy.login}@web-7@127.0.0.1"])
    try:
        tmux.run("new-session", "-d", "-s", "t", "-x", "120", "-y", "40", command)
        tmux.run("send-keys", "-t", "t", "export PS1='prompt$ '", "Enter")
        tmux.wait_for("prompt$")
        tmux.run("send-keys", "-t", "t", "echo $((6*7))-answer", "Enter")
        tmux.wait_for("42-answer")
        # The pty size went through, and a resize (window-change, RFC 4254 §6.7) follows.
        tmux.run("send-keys", "-t", "t", "stty size", "Enter")
        tmux.wait_for("40 120")
        tmux.run("resize-window", "-t", "t", "-x", "100", "-y", "30")
        time.sleep(0.3)
        tmux.run("send-keys", "-t", "t", "clear; stty size", "Enter")
        tmux.wait_for("30 100")
        # Ctrl-C reaches the remote foreground program through the pty.
        tmux.run("send-keys", "-t", "t", "sleep 30; echo not-interrupted", "Enter")
        time.sleep(0.5)
        tmux.run("send-keys", "-t", "t", "C-c", "")
        tmux.run("send-keys", "-t", "t", "echo after-$((1+1))", "Enter")
        # Within wait_for's 15 s, so the 30 s sleep was interrupted; its echo never ran.
        screen = tmux.wait_for("after-2")
        assert "not-interrupted" not in [line.strip() for line in screen.splitlines()]
        tmux.run("send-keys", "-t", "t", "exit", "Enter")
    finally:
        tmux.kill()
    evs = for_target(sshproxy, "web-7", "ssh.session.end")
    start = start_of(evs, "web-7", True)
    (shell,) = [e for e in evs if e["event"] == "ssh.shell" and e.get("sid") == start["sid"]]
    assert shell["pty"] is True and shell["term"]

    # The terminal output was recorded (asciicast v2) and the end event carries its SHA-256.
    (end,) = [e for e in evs if e["event"] == "ssh.session.end" and e.get("sid") == start["sid"]]
    (rec,) = end["recordings"]
    cast = sshproxy.recordings / rec["recording"]
    data = cast.read_bytes()
    assert hashlib.sha256(data).hexdigest() == rec["recording_sha256"]
    assert len(data) == rec["recording_bytes"]
    lines = data.decode().splitlines()
    header = json.loads(lines[0])
    assert header["version"] == 2 and (header["width"], header["height"]) == (120, 40)
    events_ = [json.loads(line) for line in lines[1:]]
    output = "".join(e[2] for e in events_ if e[1] == "o")
    assert "42-answer" in output and "after-2" in output
    assert [e[2] for e in events_ if e[1] == "r"] == ["100x30"]
    assert sshproxy.token not in data.decode()
    # The real player reads it back (``asciinema cat`` wants a terminal: util-linux ``script`` gives it one).
    require_binary("asciinema")
    played = subprocess.run([require_binary("script"), "-qec", f"asciinema cat {cast}", "/dev/null"],
                            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert played.returncode == 0, played.stderr
    assert "42-answer" in played.stdout


def test_exec_without_pty_is_not_recorded(sshproxy):
    r = ssh(sshproxy, "web-8", "echo plain")
    assert r.returncode == 0 and r.stdout == "plain\n"
    evs = for_target(sshproxy, "web-8", "ssh.session.end")
    start = start_of(evs, "web-8", True)
    (end,) = [e for e in evs if e["event"] == "ssh.session.end" and e.get("sid") == start["sid"]]
    assert "recordings" not in end
    assert not list(sshproxy.recordings.glob(f"{start['sid']}-*"))


def test_concurrent_sessions(sshproxy):
    """Ten clients at once (each session runs its own asyncio loop inside its trio task)."""
    procs = [subprocess.Popen(["ssh", *ssh_options(sshproxy), "-p", str(sshproxy.port()),
                               f"{sshproxy.login}@web-c{i}@127.0.0.1", f"sleep 0.5; echo done-{i}; exit {i}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=client_env(sshproxy),
                              stdin=subprocess.DEVNULL) for i in range(10)]
    for i, p in enumerate(procs):
        out, err = p.communicate(timeout=60)
        assert p.returncode == i, err
        assert out == f"done-{i}\n"
    def sids(es: list[dict]) -> set:
        return {e["sid"] for e in es if e["event"] == "ssh.session.start" and e["success"]
                and str(e.get("requested_target")).startswith("web-c")}

    evs = events(sshproxy, lambda es: len(sids(es)) == 10 and sum(
        1 for e in es if e["event"] == "ssh.session.end" and e.get("sid") in sids(es)) == 10)
    ends = [e for e in evs if e["event"] == "ssh.channel.end" and e.get("sid") in sids(evs)]
    assert sorted(e["exit_status"] for e in ends) == list(range(10))


# --------------------------------------------------------------------------- exec policy


@pytest.mark.parametrize("template", ["rm -f {canary}", "echo first; rm -f {canary}"])
def test_exec_denied_by_role_pattern(sshproxy, tmp_path, template):
    canary = tmp_path / "canary"
    canary.write_text("still here")
    command = template.format(canary=canary)
    r = ssh(sshproxy, "web-p", command, token=sshproxy.guarded_token)
    assert r.returncode == 126
    assert "command refused by policy" in r.stderr and "'rm'" in r.stderr
    assert r.stdout == ""  # not even the harmless first part ran: the line never reached the target
    assert canary.read_text() == "still here"
    evs = events(sshproxy, lambda es: any(e["event"] == "ssh.exec" and e.get("command") == command for e in es)
                 and any(e["event"].endswith("access_denied") and e.get("command") == command for e in es))
    (execd,) = [e for e in evs if e["event"] == "ssh.exec" and e.get("command") == command]
    assert execd["success"] is False and execd["denied_pattern"] == "rm"
    (denial,) = [e for e in evs if e["event"].endswith("access_denied") and e.get("command") == command]
    assert denial["stage"] == "exec" and denial["reason"] == "command_denied" and denial["sid"] == execd["sid"]


def test_exec_allowed_with_deny_patterns(sshproxy):
    r = ssh(sshproxy, "web-p", "echo allowed; echo rm", token=sshproxy.guarded_token)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "allowed\nrm\n"


def test_shell_refused_to_a_role_with_deny_patterns(sshproxy):
    """A shell without a pty (a script on stdin: no terminal to police) is refused to a role with deny patterns."""
    r = ssh(sshproxy, "web-q", token=sshproxy.guarded_token, extra=("-T",))
    assert r.returncode == 126
    assert "interactive shells are not available" in r.stderr
    evs = for_target(sshproxy, "web-q", "ssh.shell")
    start = start_of(evs, "web-q", True)
    (shell,) = [e for e in evs if e["event"] == "ssh.shell" and e.get("sid") == start["sid"]]
    assert shell["success"] is False
    assert any(e["event"].endswith("access_denied") and e.get("sid") == start["sid"] and e["stage"] == "shell"
               for e in evs)


# --------------------------------------------------------------------------- a client that never authenticates


def test_handshake_timeout_closes_and_audits(sshd, proxy_factory, tmp_path):
    """A client that opens SSH but never authenticates is cut off at the listener's handshake timeout."""
    import socket

    from scripts.peers.sshd import make_key

    _cli("token", "keygen", "--algorithm", "EdDSA", "--key-file", str(tmp_path / "token.key"),
         "--public-key-file", str(tmp_path / "token.pub"))
    make_key(tmp_path / "hk")
    proxy = proxy_factory({
        "identity": {"token": {"algorithm": "EdDSA", "key_file": "token.key", "public_key_file": "token.pub"}},
        "listeners": [{"name": "ssh", "protocol": "ssh", "listen": "127.0.0.1:0", "host_key_file": "hk",
                       "auth": {"methods": ["token"]}, "handshake_timeout_seconds": 1,
                       "routes": [{"backend": _backend(sshd, sshd.known_hosts)}]}],
        "audit": {"sinks": [{"type": "jsonl", "path": "audit.jsonl"}]},
    }, workdir=tmp_path)
    with socket.create_connection(("127.0.0.1", proxy.port()), timeout=10) as s:
        s.sendall(b"SSH-2.0-silent_client\r\n")  # then nothing: no key exchange, no authentication
        started = time.monotonic()
        received = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            received += chunk
        waited = time.monotonic() - started
    assert received.startswith(b"SSH-2.0-dbproxy")
    assert waited < 6, waited
    evs = read_audit(tmp_path / "audit.jsonl", wait_for=2)
    (start,) = [e for e in evs if e["event"] == "ssh.session.start"]
    assert start["success"] is False and start["error"] == "client SSH handshake timed out"


def test_environment_by_allow_list(sshproxy):
    """Only variables the listener's env_allow names reach the target (sshd accepts LANG and LC_* itself)."""
    env = client_env(sshproxy)
    env.update(LC_DBPROXY_OK_1="yes", LC_DBPROXY_NO="secret-value")
    r = subprocess.run(["ssh", *ssh_options(sshproxy), "-o", "SendEnv=LC_DBPROXY_OK_1 LC_DBPROXY_NO", "-p",
                        str(sshproxy.port()), f"{sshproxy.login}@web-e@127.0.0.1",
                        "echo ok=${LC_DBPROXY_OK_1:-unset} no=${LC_DBPROXY_NO:-unset}"],
                       capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "ok=yes no=unset\n"
    evs = for_target(sshproxy, "web-e", "ssh.env")
    start = start_of(evs, "web-e", True)
    (sent,) = [e for e in evs if e["event"] == "ssh.env" and e.get("sid") == start["sid"]]
    assert sent["forwarded"] == ["LC_DBPROXY_OK_1"] and sent["dropped"] == ["LC_DBPROXY_NO"]
    assert "secret-value" not in sshproxy.audit_path.read_text()


@pytest.mark.parametrize("legacy", [False, True], ids=["scp-over-sftp", "scp-legacy"])
def test_scp_both_ways(sshproxy, tmp_path, legacy):
    """OpenSSH 9's scp speaks SFTP; ``-O`` is the legacy protocol (an exec of ``scp -t``/``scp -f``)."""
    require_binary("scp")
    payload = os.urandom(1024 * 1024 + 3)
    src, remote, back = tmp_path / "src.bin", tmp_path / "remote.bin", tmp_path / "back.bin"
    src.write_bytes(payload)
    target = f"web-s{int(legacy)}"
    base = ["scp", *ssh_options(sshproxy), "-P", str(sshproxy.port()), *(["-O"] if legacy else [])]
    where = f"{sshproxy.login}@{target}@127.0.0.1:{remote}"
    for args in ([str(src), where], [where, str(back)]):
        r = subprocess.run([*base, *args], capture_output=True, text=True, env=client_env(sshproxy),
                           stdin=subprocess.DEVNULL, timeout=60)
        assert r.returncode == 0, r.stderr
    assert remote.read_bytes() == payload and back.read_bytes() == payload
    def sessions(es: list[dict]) -> set:
        return {e["sid"] for e in es if e["event"] == "ssh.session.start" and e.get("requested_target") == target}

    evs = events(sshproxy, lambda es: sum(1 for e in es if e["event"] == "ssh.session.end"
                                          and e.get("sid") in sessions(es)) == 2)
    sids = sessions(evs)
    mine = [e for e in evs if e.get("sid") in sids]
    if legacy:
        commands = [e["command"] for e in mine if e["event"] == "ssh.exec"]
        assert any(c.startswith("scp") and "-t" in c and str(remote) in c for c in commands), commands
        assert any(c.startswith("scp") and "-f" in c and str(remote) in c for c in commands), commands
    else:
        digest = hashlib.sha256(payload).hexdigest()
        files = [e for e in mine if e["event"] == "ssh.sftp.file"]
        assert {(e["mode"], e.get("sha256_written") or e.get("sha256_read")) for e in files} == \
            {("write", digest), ("read", digest)}


# --------------------------------------------------------------------------- idle timeout, keepalives, limits, tokens


class ListenerView:
    """One listener of a multi-listener proxy, shaped like the ``sshproxy`` fixture for the helpers above."""

    def __init__(self, proc, name: str) -> None:
        self._proc, self._name = proc, name

    def port(self) -> int:
        return self._proc.port(self._name)

    def __getattr__(self, attr: str):
        return getattr(self._proc, attr)


@pytest.fixture(scope="module")
def timeoutproxy(sshd, tmp_path_factory):
    """Listeners ``idle`` (idle_timeout_seconds 1.5) and ``ka`` (keepalives every second, two missed
    answers close); one session at a time for frank; tokens checked without leeway; a revocation file."""
    from scripts.peers.sshd import make_key

    require_binary("ssh")
    workdir = tmp_path_factory.mktemp("sshtimeouts")
    _cli("token", "keygen", "--algorithm", "EdDSA", "--key-file", str(workdir / "token.key"),
         "--public-key-file", str(workdir / "token.pub"))
    make_key(workdir / "hk", "dbproxy-proxy-host")
    route = [{"match": {"target": "web-*"}, "backend": _backend(sshd, sshd.known_hosts)}]
    config = {
        "identity": {"token": {"algorithm": "EdDSA", "key_file": "token.key", "public_key_file": "token.pub",
                               "leeway_seconds": 0, "revocation_file": "revoked.txt"}},
        "roles": {"ops": {"routes": ["*"], "targets": ["web-*"], "logins": [sshd.login]}},
        "limits": {"identities": {"frank": 1}},
        "listeners": [
            {"name": "idle", "protocol": "ssh", "listen": "127.0.0.1:0", "host_key_file": "hk",
             "auth": {"methods": ["token"]}, "idle_timeout_seconds": 1.5, "routes": route},
            {"name": "ka", "protocol": "ssh", "listen": "127.0.0.1:0", "host_key_file": "hk",
             "auth": {"methods": ["token"]}, "keepalive_seconds": 1, "keepalive_count_max": 2, "routes": route},
        ],
        "audit": {"sinks": [{"type": "jsonl", "path": "audit.jsonl"}]},
    }
    proc = ProxyProcess(workdir, config, name="proxy").start()
    proc.audit_path = workdir / "audit.jsonl"
    proc.login = sshd.login
    kind, blob = (workdir / "hk.pub").read_text().split()[:2]
    proc.known_hosts = workdir / "client_known_hosts"
    proc.known_hosts.write_text("".join(f"[127.0.0.1]:{proc.port(n)} {kind} {blob}\n" for n in ("idle", "ka")))
    askpass = workdir / "askpass.sh"
    askpass.write_text('#!/bin/sh\nprintf "%s\\n" "$DBPROXY_TOKEN"\n')
    askpass.chmod(0o700)
    proc.askpass = askpass

    def issue(user: str, ttl: str = "1h") -> str:
        return _cli("token", "issue", "--config", str(proc.config_path), "--user", user, "--roles", "ops", "--ttl", ttl)

    proc.issue = issue
    proc.token = issue("alice")
    yield proc
    proc.stop()


def test_idle_timeout_closes_a_quiet_session(timeoutproxy):
    idle = ListenerView(timeoutproxy, "idle")
    started = time.monotonic()
    r = ssh(idle, "web-idle", "sleep 20; echo not-reached")
    assert time.monotonic() - started < 12
    assert r.returncode == 255
    assert "not-reached" not in r.stdout and "idle timeout: no traffic for 1.5s" in r.stderr
    evs = for_target(idle, "web-idle", "ssh.session.end")
    start = start_of(evs, "web-idle", True)
    (end,) = [e for e in evs if e["event"] == "ssh.session.end" and e["sid"] == start["sid"]]
    assert end["reason"].startswith("idle timeout")


def test_idle_timeout_spares_a_session_with_traffic(timeoutproxy):
    r = ssh(ListenerView(timeoutproxy, "idle"), "web-busy", "for i in 1 2 3 4 5 6 7 8; do echo $i; sleep 0.5; done")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(i) for i in range(1, 9)]


def test_keepalive_drops_an_unresponsive_client(timeoutproxy):
    """A stopped client (SIGSTOP: its TCP still acknowledges, its SSH answers nothing) is disconnected after
    two unanswered keepalives, long before its command would end."""
    import signal

    ka = ListenerView(timeoutproxy, "ka")
    client = subprocess.Popen(["ssh", *ssh_options(ka), "-p", str(ka.port()), f"{ka.login}@web-ka@127.0.0.1",
                               "sleep 60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=client_env(ka),
                              stdin=subprocess.DEVNULL)
    try:
        for_target(ka, "web-ka", "ssh.exec")
        client.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        evs = for_target(ka, "web-ka", "ssh.session.end")
        assert time.monotonic() - stopped < 15
    finally:
        client.kill()
        client.send_signal(signal.SIGCONT)
        client.wait(10)
    start = start_of(evs, "web-ka", True)
    (end,) = [e for e in evs if e["event"] == "ssh.session.end" and e["sid"] == start["sid"]]
    assert end["reason"] == "client connection lost: Client not responding to keepalive", end


def test_per_identity_session_limit(timeoutproxy):
    ka = ListenerView(timeoutproxy, "ka")
    token = timeoutproxy.issue("frank")
    first = subprocess.Popen(["ssh", *ssh_options(ka), "-p", str(ka.port()), f"{ka.login}@web-lim1@127.0.0.1",
                              "sleep 4; echo first-done"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=client_env(ka, token), stdin=subprocess.DEVNULL)
    try:
        for_target(ka, "web-lim1", "ssh.exec")
        second = ssh(ka, "web-lim2", "echo should-not-run", token=token)
        assert second.returncode == 255
        assert "should-not-run" not in second.stdout and "the limit per identity" in second.stderr
        out, err = first.communicate(timeout=30)
    finally:
        first.kill()
    assert first.returncode == 0 and out == "first-done\n", err
    evs = events(ka, lambda es: any(e["event"] == "ssh.session.start" and e.get("requested_target") == "web-lim2"
                                    for e in es))
    assert start_of(evs, "web-lim2", False)["reason"] == "too_many_connections_identity"
    # The slot is free again once the first session ended.
    assert ssh(ka, "web-lim3", "echo third", token=token).stdout == "third\n"


def test_expired_token_refused(timeoutproxy):
    token = timeoutproxy.issue("grace", ttl="1s")
    time.sleep(2.1)
    r = ssh(ListenerView(timeoutproxy, "ka"), "web-exp", "echo should-not-run", token=token)
    assert r.returncode == 255
    assert "should-not-run" not in r.stdout and "the dbproxy token was not accepted" in r.stderr
    evs = events(timeoutproxy, lambda es: any(e["event"] == "ssh.session.access_denied" and e.get("requested_target") == "web-exp"
                                              for e in es))
    (denial,) = [e for e in evs if e["event"] == "ssh.session.access_denied" and e.get("requested_target") == "web-exp"]
    assert denial["reason"] == "token_expired" and denial["stage"] == "authenticate"


def test_revoked_token_refused(timeoutproxy):
    ka = ListenerView(timeoutproxy, "ka")
    token = timeoutproxy.issue("henry")
    assert ssh(ka, "web-rev1", "echo before").stdout == "before\n"  # alice's token, to warm up
    assert ssh(ka, "web-rev1", "echo henry-ok", token=token).stdout == "henry-ok\n"
    _cli("token", "revoke", "--config", str(timeoutproxy.config_path), token)
    r = ssh(ka, "web-rev2", "echo should-not-run", token=token)
    assert r.returncode == 255
    assert "should-not-run" not in r.stdout and "the dbproxy token was not accepted" in r.stderr
    evs = events(timeoutproxy, lambda es: any(e["event"] == "ssh.session.access_denied" and e.get("requested_target") == "web-rev2"
                                              for e in es))
    (denial,) = [e for e in evs if e["event"] == "ssh.session.access_denied" and e.get("requested_target") == "web-rev2"]
    assert denial["reason"] == "token_revoked" and denial["attempted_token_id"]


# --------------------------------------------------------------------------- port forwarding


@pytest.fixture
def echo_server():
    """A tiny TCP echo service on a loopback port (the forwarded connections' far end)."""
    import socket
    import socketserver
    import threading

    class Echo(socketserver.BaseRequestHandler):
        def handle(self):
            while True:
                data = self.request.recv(65536)
                if not data:
                    return
                self.request.sendall(data)

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _echo_through(port: int, payload: bytes, timeout: float = 15.0) -> bytes:
    """Connect to ``port`` (retrying while the forward comes up), send ``payload``, read it back."""
    import socket

    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(payload)
                got = b""
                while len(got) < len(payload):
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    got += chunk
                if got:
                    return got
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"nothing came back through port {port}")
        time.sleep(0.2)


def _forwarding_ssh(proxy, target: str, token: str, *spec: str) -> subprocess.Popen:
    return subprocess.Popen(["ssh", *ssh_options(proxy), "-N", "-o", "ExitOnForwardFailure=yes", *spec, "-p",
                             str(proxy.port()), f"{proxy.login}@{target}@127.0.0.1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=client_env(proxy, token),
                            stdin=subprocess.DEVNULL)


def test_local_forwarding_allowed_by_role(sshproxy, echo_server):
    """``ssh -L`` for a role with port_forwarding local: the target connects to the echo service."""
    from scripts.peers import free_port

    local = free_port()
    client = _forwarding_ssh(sshproxy, "web-fl", sshproxy.forward_token, "-L", f"{local}:127.0.0.1:{echo_server}")
    try:
        payload = os.urandom(200_000)
        assert _echo_through(local, payload) == payload
    finally:
        client.terminate()
        client.wait(10)
    evs = for_target(sshproxy, "web-fl", "ssh.forward")
    start = start_of(evs, "web-fl", True)
    (fwd,) = [e for e in evs if e["event"] == "ssh.forward" and e["sid"] == start["sid"]][:1]
    assert (fwd["request"], fwd["verdict"], fwd["dest_host"], fwd["dest_port"]) == \
        ("direct-tcpip", "allowed", "127.0.0.1", echo_server)


def test_local_forwarding_refused_by_default(sshproxy, echo_server):
    """The ops role names no port_forwarding: ``ssh -W`` (direct-tcpip) is refused and audited."""
    r = subprocess.run(["ssh", *ssh_options(sshproxy), "-W", f"127.0.0.1:{echo_server}", "-p", str(sshproxy.port()),
                        f"{sshproxy.login}@web-fr@127.0.0.1"], input="hello\n", capture_output=True, text=True,
                       env=client_env(sshproxy), timeout=30)
    assert r.returncode == 255 and "hello" not in r.stdout
    assert "administratively prohibited" in r.stderr
    evs = for_target(sshproxy, "web-fr", "ssh.forward")
    start = start_of(evs, "web-fr", True)
    (fwd,) = [e for e in evs if e["event"] == "ssh.forward" and e["sid"] == start["sid"]]
    assert (fwd["request"], fwd["verdict"], fwd["dest_port"]) == ("direct-tcpip", "denied", echo_server)


def test_remote_forwarding_allowed_by_role(sshproxy, echo_server):
    """``ssh -R``: the target (sshd) listens; connections to it reach the client's echo service."""
    from scripts.peers import free_port

    remote = free_port()
    client = _forwarding_ssh(sshproxy, "web-fR", sshproxy.forward_token, "-R", f"{remote}:127.0.0.1:{echo_server}")
    try:
        assert _echo_through(remote, b"through the target and back") == b"through the target and back"
    finally:
        client.terminate()
        client.wait(10)
    evs = for_target(sshproxy, "web-fR", "ssh.forward.connection")
    start = start_of(evs, "web-fR", True)
    mine = [e for e in evs if e.get("sid") == start["sid"]]
    (fwd,) = [e for e in mine if e["event"] == "ssh.forward"]
    assert (fwd["request"], fwd["verdict"], fwd["listen_port"], fwd["bound_port"]) == \
        ("tcpip-forward", "allowed", remote, remote)
    assert any(e["event"] == "ssh.forward.connection" and e["listen_port"] == remote for e in mine)


def test_remote_forwarding_refused_by_default(sshproxy, echo_server):
    from scripts.peers import free_port

    remote = free_port()
    client = _forwarding_ssh(sshproxy, "web-fRr", None, "-R", f"{remote}:127.0.0.1:{echo_server}")
    try:
        out, err = client.communicate(timeout=30)
    finally:
        client.kill()
    assert client.returncode == 255
    assert f"remote port forwarding failed for listen port {remote}" in err
    evs = for_target(sshproxy, "web-fRr", "ssh.forward")
    start = start_of(evs, "web-fRr", True)
    (fwd,) = [e for e in evs if e["event"] == "ssh.forward" and e["sid"] == start["sid"]]
    assert (fwd["request"], fwd["verdict"], fwd["listen_port"]) == ("tcpip-forward", "denied", remote)
