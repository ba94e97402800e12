"""Test support: run the real ``dbproxy serve`` in a subprocess and read its audit trail.

The proxy runs as its own process (the CLI users run), so tests exercise the
config loader, the listeners and signal handling exactly as deployed, and
blocking clients (psycopg, psql, cqlsh, pymongo) in the test process do not
share an event loop or a GIL with it.

Below the proxy runner: what several integration files need alike — the
``dbproxy`` CLI, the real peers started per module, proxy configs in front of
them, raw sockets for what a driver would not send, the proxy's children in
``/proc``, and the identity tests' token environment (one per engine).
Client libraries are imported inside the helpers that use them, so a test
file pays only for its own.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def peer_missing(what: str) -> None:
    """A real test peer is not available: fail under CI (a skip would hide a missing install), else skip."""
    if IN_CI:
        pytest.fail(f"test peer missing under CI: {what}")
    pytest.skip(f"test peer missing: {what}")


class ProxyProcess:
    def __init__(self, workdir: Path, config: dict, *, env: dict | None = None, name: str = "proxy") -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.config_path = self.workdir / f"{name}.json"
        self.log_path = self.workdir / f"{name}.log"
        self.config_path.write_text(json.dumps(config, indent=2))
        self.env = dict(os.environ, **(env or {}))
        self.env["PYTHONPATH"] = str(ROOT) + os.pathsep + self.env.get("PYTHONPATH", "")
        self.proc: subprocess.Popen | None = None
        self.ports: dict[str, int] = {}

    def start(self, timeout: float = 20.0) -> "ProxyProcess":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dbproxy.cli", "serve", "--config", str(self.config_path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=str(self.workdir),
        )
        deadline = time.monotonic() + timeout
        expected = len(self.config["listeners"])
        while time.monotonic() < deadline:
            text = self.log_text()
            found = dict(
                (m.group(1), int(m.group(2)))
                for m in re.finditer(r"dbproxy: (\S+) \([\w-]+\) listening on [\d.:\[\]a-f]+:(\d+)", text)
            )
            if len(found) >= expected:
                self.ports = found
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"proxy exited with {self.proc.returncode}:\n{text}")
            time.sleep(0.05)
        raise TimeoutError(f"proxy did not start:\n{self.log_text()}")

    def port(self, listener: str | None = None) -> int:
        if listener is None:
            (port,) = self.ports.values()
            return port
        return self.ports[listener]

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def read_audit(path: Path | str, *, wait_for: int = 0, timeout: float = 10.0) -> list[dict]:
    """Audit events of a JSONL file; waits until at least ``wait_for`` events are there."""
    deadline = time.monotonic() + timeout
    while True:
        events: list[dict] = []
        try:
            with open(path, "rb") as f:
                for line in f:
                    # The writer may be mid-line: only complete lines count.
                    if line.endswith(b"\n") and line.strip():
                        events.append(orjson.loads(line))
        except FileNotFoundError:
            pass
        if len(events) >= wait_for or time.monotonic() > deadline:
            return events
        time.sleep(0.05)


def wait_audit(path: Path | str, condition, *, timeout: float = 20.0, since: int = 0, what: str = "audit condition") -> list[dict]:
    """The audit events of ``path`` (from the ``since``-th on), once ``condition(events)`` holds: the
    sinks write asynchronously."""
    box: list[dict] = []

    def check():
        box[:] = read_audit(path)[since:]
        return condition(box)

    wait_until(check, timeout=timeout, what=what)
    return box


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


# --------------------------------------------------------------------------- the CLI


def dbproxy_cli(*args: str, check: bool = False, timeout: float = 60) -> subprocess.CompletedProcess:
    """``dbproxy <args>`` as an operator runs it, on this checkout's code; ``check``: a non-zero exit fails."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "dbproxy.cli", *args], capture_output=True, text=True, env=env, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"dbproxy {' '.join(args[:2])} failed: {p.stderr}")
    return p


# --------------------------------------------------------------------------- real peers, one per module


def require_ferret(*, mongosh: bool = False) -> None:
    """FerretDB (and ``mongosh``: the shell too) installed by ``scripts/install``, or ``peer_missing``."""
    from scripts.peers.ferretdb_server import ferretdb_path, mongosh_path

    try:
        ferretdb_path()
        if mongosh:
            mongosh_path()
    except FileNotFoundError as exc:
        peer_missing(f"{exc}")


def start_ferret(tmp_path_factory, name: str, *, mongosh: bool = False):
    """A FerretDB of its own (``scripts/peers``)."""
    from scripts.peers.ferretdb_server import start_ferretdb

    require_ferret(mongosh=mongosh)
    return start_ferretdb(tmp_path_factory.mktemp(name))


def require_cassandra() -> None:
    from scripts.peers.cassandra_server import lib_dir

    if not any(lib_dir().glob("cassandra-all-*.jar")):
        peer_missing(f"no Cassandra jars in {lib_dir()}: run scripts/install/cassandra.sh")


def start_cassandra_node(tmp_path_factory, name: str):
    """A Cassandra node of its own (``scripts/peers``)."""
    from scripts.peers.cassandra_server import start_cassandra

    require_cassandra()
    return start_cassandra(tmp_path_factory.mktemp(name))


def cassandra_direct(node, *statements: str):
    """(cluster, session) straight to ``node``, not through the proxy, after running ``statements``."""
    from cassandra.auth import PlainTextAuthProvider
    from cassandra.cluster import Cluster

    c = Cluster([node.host], port=node.port, auth_provider=PlainTextAuthProvider(node.user, node.password),
                protocol_version=5, connect_timeout=10)
    session = c.connect()
    for statement in statements:
        session.execute(statement)
    return c, session


def cql_keyspace(ks: str) -> str:
    return f"CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = {{'class': 'SimpleStrategy', 'replication_factor': 1}}"


# --------------------------------------------------------------------------- proxy configs


def jsonl_audit(workdir: Path, *, worker: bool | None = None, **options) -> dict:
    """An ``audit`` section with one JSONL sink at ``workdir/audit.jsonl``; ``worker``: set only when given."""
    audit: dict = {"sinks": [{"type": "jsonl", "path": str(workdir / "audit.jsonl")}], **options}
    if worker is not None:
        audit["worker"] = worker
    return audit


def password_backend(workdir: Path, address: str, user: str, password: str, method: str, **extra) -> dict:
    """A route's ``backend`` logging in with ``password`` (written to a secret file in ``workdir``)."""
    secret = workdir / f"{method}.secret"
    secret.write_text(password + "\n")
    return {"address": address, "user": user, "auth": {"method": method, "password_file": str(secret)}, **extra}


def pg_scram_config(pg, workdir: Path, audit: dict) -> dict:
    """One Postgres listener ``pg`` in front of ``pg``'s SCRAM user, database app; ``audit`` as given."""
    user, password = pg.users["scram-sha-256"]
    backend = password_backend(workdir, f"127.0.0.1:{pg.port}", user, password, "scram-sha-256", database="app")
    return {"listeners": [{"name": "pg", "protocol": "postgres", "listen": "127.0.0.1:0",
                           "routes": [{"name": "scram", "backend": backend}]}],
            "audit": audit, "shutdown_grace_seconds": 2}


def pg_connect(proxy: ProxyProcess, **kw):
    """psycopg through the proxy as alice to database app (the route's backend credentials apply)."""
    import psycopg

    return psycopg.connect(host="127.0.0.1", port=proxy.port(), user="alice", dbname="app", password="unused",
                           sslmode="disable", connect_timeout=10, autocommit=True, **kw)


# --------------------------------------------------------------------------- raw sockets


def recv_exact(sock: socket.socket, n: int) -> bytes | None:
    """``n`` bytes, or None when the peer closed first."""
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def read_until_close(s: socket.socket, timeout: float | None = None) -> bytes:
    """All the peer sends until it closes (a reset or a quiet ``timeout`` also ends it)."""
    if timeout is not None:
        s.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = s.recv(65536)
        except (ConnectionResetError, socket.timeout):
            break
        if not chunk:
            break
        data += chunk
    return data


def pg_startup(**params: str) -> bytes:
    """A Postgres StartupMessage, protocol 3.0 (protocol §55.7), with these parameters in this order."""
    body = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()) + b"\0"
    return struct.pack(">ii", 8 + len(body), 196608) + body


def pg_session(port: int, **params: str) -> tuple[socket.socket, bytes]:
    """A hand-rolled Postgres client logged in with ``params`` (user, database…): (the socket, all the
    proxy sent up to and including ReadyForQuery idle)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(pg_startup(**params))
    buf = b""
    while not buf.endswith(b"Z\x00\x00\x00\x05I"):
        chunk = s.recv(65536)
        assert chunk, f"proxy closed during startup: {buf!r}"
        buf += chunk
    return s, buf


# --------------------------------------------------------------------------- the proxy's children


def child_pids(pid: int) -> list[int]:
    """Live (not zombie) children of ``pid``, from ``/proc``."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(entry))
    return out


def cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode()


def audit_worker_pids(pid: int) -> list[int]:
    """The audit workers among ``pid``'s children."""
    out = []
    for child in child_pids(pid):
        try:
            if "dbproxy.audit.worker" in cmdline(child):
                out.append(child)
        except OSError:
            continue
    return out


# --------------------------------------------------------------------------- identity tests (every engine)


#: The ``identity.token`` section the identity tests share (files relative to the config; no leeway,
#: so a 1 s token is expired a second later).
TOKEN_IDENTITY = {
    "algorithm": "EdDSA",
    "key_file": "token.key",
    "public_key_file": "token.pub",
    "registry_file": "tokens.json",
    "revocation_file": "revoked.txt",
    "leeway_seconds": 0,
}


def token_keygen(workdir: Path) -> None:
    dbproxy_cli("token", "keygen", "--algorithm", "EdDSA", "--key-file", str(workdir / "token.key"),
                "--public-key-file", str(workdir / "token.pub"), check=True)


class TokenEnv:
    """A running identity proxy: tokens from the real ``dbproxy token`` CLI, its JSONL audit trail."""

    def __init__(self, proc: ProxyProcess, workdir: Path) -> None:
        self.proc = proc
        self.workdir = workdir
        self.config_path = proc.config_path
        self.audit_path = workdir / "audit.jsonl"
        self.tokens: list[str] = []  # every token handed out: none may appear in logs

    def issue(self, user: str, roles: str = "", ttl: str = "1h") -> tuple[str, str]:
        p = dbproxy_cli("token", "issue", "--config", str(self.config_path), "--user", user, "--roles", roles, "--ttl", ttl, check=True)
        token = p.stdout.strip()
        assert token.count(".") == 2 and "\n" not in token
        jti = p.stderr.split("token id ", 1)[1].split()[0]
        self.tokens.append(token)
        return token, jti

    def revoke(self, token_or_id: str) -> None:
        dbproxy_cli("token", "revoke", "--config", str(self.config_path), token_or_id, check=True)

    def port(self, listener: str) -> int:
        return self.proc.port(listener)

    def events(self) -> list[dict]:
        return read_audit(self.audit_path)

    def mark(self) -> int:
        """Where the audit trail ends now: ``wait_events(…, since=mark)`` looks only at later events."""
        return len(self.events())

    def wait_events(self, condition, timeout: float = 15.0, since: int = 0) -> list[dict]:
        return wait_audit(self.audit_path, condition, timeout=timeout, since=since)


def tamper_token(token: str) -> str:
    """The token with more roles in its claims and its old signature."""
    head, body, sig = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    claims["roles"] = ["writer", "analyst", "admin"]
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{head}.{forged}.{sig}"


BAD_TOKEN_CASES = ("expired", "tampered", "revoked", "revoked-by-id", "other-user", "not-a-token")


def issue_bad_tokens(env: TokenEnv, roles: str) -> dict[str, tuple[str, str, str | None]]:
    """case → (password, the refusal reason audited, the token id audited) for ``BAD_TOKEN_CASES``, alice's."""
    expired, expired_id = env.issue("alice", roles, ttl="1s")
    good, _ = env.issue("alice", roles)
    revoked, revoked_id = env.issue("alice", roles)
    revoked_by_id, revoked_by_id_id = env.issue("alice", roles)
    bobs, bob_id = env.issue("bob", roles)
    env.revoke(revoked)
    env.revoke(revoked_by_id_id)
    time.sleep(1.2)  # past the expired token's exp (leeway 0)
    return {
        "expired": (expired, "token_expired", expired_id),
        "tampered": (tamper_token(good), "token_bad_signature", None),
        "revoked": (revoked, "token_revoked", revoked_id),
        "revoked-by-id": (revoked_by_id, "token_revoked", revoked_by_id_id),
        "other-user": (bobs, "token_wrong_user", bob_id),
        "not-a-token": ("hunter2-plain-password", "token_malformed", None),
    }


def assert_no_token_secrets(blob: str, env: TokenEnv, bad_tokens: dict) -> None:
    """No token handed out (nor its signature) and no SCRAM key of the registry is in ``blob``."""
    for token in env.tokens + [t for t, _, _ in bad_tokens.values()]:
        assert token not in blob
        if token.count(".") == 2:
            assert token.split(".")[2] not in blob  # not even the signature
    registry = json.loads((env.workdir / "tokens.json").read_text())
    for entry in registry["tokens"].values():
        for v in entry["scram"].values():
            assert v["stored_key"] not in blob and v["server_key"] not in blob


# -- one audit sink, in-process (tests of a sink's batching against its real receiver) -----------

def sink_from_config(tmp_path: Path, spec: dict):
    """The sink ``spec`` (one ``audit.sinks`` entry) builds, through the real config loader."""
    from dbproxy.audit.sinks import build_sink
    from dbproxy.config import load_audit_config

    path = tmp_path / "sink.json"
    path.write_text(json.dumps({"audit": {"sinks": [spec]}}))
    return build_sink(load_audit_config(str(path)).sinks[0])


def chained_events(n: int, *, pad=lambda seq: 100) -> list[dict]:
    """``n`` stamped-looking events, seq 1..n with hash fields, each padded to ``pad(seq)`` bytes."""
    return [{"seq": i, "time": "2026-12-06T21:00:00.000000Z", "event": "test.bulk", "prev_hash": f"{i - 1:064x}",
             "hash": f"{i:064x}", "pad": "x" * pad(i)} for i in range(1, n + 1)]


def note_calls(obj, method: str, note=len) -> list:
    """Wrap ``obj.method`` (a sink's delivery step, called with one batch's payloads) so that each
    call first appends ``note(payloads)`` to the list returned; the real method still runs."""
    seen: list = []
    real = getattr(obj, method)

    def noting(payloads):
        seen.append(note(payloads))
        return real(payloads)

    setattr(obj, method, noting)
    return seen


def deliver_all(sink, events: list[dict], *, timeout: float = 60) -> None:
    """Spool ``events`` in one batch, run the sink until it has delivered them all, close it."""
    import trio

    async def main():
        await sink.write_batch(events)
        async with trio.open_nursery() as nursery:
            await nursery.start(sink.run)
            with trio.fail_after(timeout):
                await sink.wait_idle()
            nursery.cancel_scope.cancel()
        await sink.aclose()

    trio.run(main)
