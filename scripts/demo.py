"""The demo: real servers behind one dbproxy config, a token already issued, the client lines to use.

Default: a private PostgreSQL and FerretDB (Mongo wire) behind the proxy.
``--all`` adds Apache Cassandra 5.0, OpenSSH sshd, a Redfish BMC emulator and
a VNC desktop (Xtigervnc; slower to start).  The proxy holds every backend credential; the person at
the client types only a proxy token, issued here for the demo user ``alice``
(role ``demo``: every target), and every session lands in ``audit.jsonl``.

``--smoke`` runs each printed client line once (psql, mongosh, cqlsh, ssh,
curl, a scripted VNC viewer with a one-time code), checks its output, then stops: the demo's own test
(tests/integration/test_demo.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scripts.peers.certs import make_ca, make_cert
from scripts.peers.postgres import start_postgres

ROOT = Path(__file__).resolve().parent.parent
USER = "alice"


# --smoke's VNC viewer: connect through the proxy with the one-time code, take a screenshot.
VNC_SMOKE = """
import sys
from vncdotool import api
port, code, path = sys.argv[1:]
client = api.connect(f"127.0.0.1::{port}", password=code, timeout=30)
try:
    client.refreshScreen()
    client.captureScreen(path)
finally:
    client.disconnect()
    api.shutdown()
from PIL import Image
print("vnc-ok", Image.open(path).size)
"""


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _cli(*args: str, env: dict) -> str:
    p = subprocess.run([sys.executable, "-m", "dbproxy.cli", *args], capture_output=True, text=True, env=env,
                       timeout=60)
    if p.returncode != 0:
        raise RuntimeError(f"dbproxy {' '.join(args[:2])}: {p.stderr}")
    return p.stdout.strip()


def _secret(workdir: Path, name: str, value: str) -> str:
    path = workdir / f"{name}.secret"
    path.write_text(value + "\n")
    path.chmod(0o600)
    return str(path)


class Demo:
    """The peers, the config and the client lines; ``stop()`` ends everything it started."""

    def __init__(self, workdir: Path, everything: bool) -> None:
        self.workdir = workdir
        self.everything = everything
        self.stops: list = []
        self.listeners: list[dict] = []
        self.lines: dict[str, str] = {}  # client -> the shell line to type
        self.env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))

    # -- peers --------------------------------------------------------------------------
    def start_peers(self) -> None:
        w = self.workdir
        self.ca = make_ca(w / "pki", name="dbproxy demo CA")
        self.cert, self.key = make_cert(w / "pki", self.ca, "proxy", sans=("localhost", "127.0.0.1", "*.demo.test"))
        self.tls = {"cert_file": str(self.cert), "key_file": str(self.key)}
        print("demo: starting PostgreSQL", flush=True)
        pg = start_postgres(w / "pg")
        self.stops.append(pg.stop)
        user, password = pg.users["scram-sha-256"]
        self.listeners.append({
            "name": "pg", "protocol": "postgres", "listen": "127.0.0.1:0", "auth": {"methods": ["token"]},
            "routes": [{"name": "app", "match": {"database": "app*"}, "backend": {
                "address": f"127.0.0.1:{pg.port}", "database": "app", "user": user,
                "auth": {"method": "scram-sha-256", "password_file": _secret(w, "pg", password)}}}]})
        self.pg_user = user
        print("demo: starting FerretDB", flush=True)
        from scripts.peers.ferretdb_server import start_ferretdb

        ferret = start_ferretdb(w / "ferret")
        self.stops.append(ferret.stop)
        self.listeners.append({
            "name": "mongo", "protocol": "mongo", "listen": "127.0.0.1:0", "auth": {"methods": ["token"]},
            "routes": [{"name": "ferret", "backend": {
                "address": f"127.0.0.1:{ferret.port}", "user": ferret.user,
                "auth": {"method": "scram-sha-256", "password_file": _secret(w, "ferret", ferret.password)}}}]})
        if not self.everything:
            return
        print("demo: starting Apache Cassandra 5.0 (about a minute)", flush=True)
        from scripts.peers.cassandra_server import start_cassandra

        node = start_cassandra(w / "cassandra")
        self.stops.append(node.stop)
        self.listeners.append({
            "name": "cql", "protocol": "cassandra", "listen": "127.0.0.1:0", "tls": self.tls,
            "auth": {"methods": ["token"]},
            "routes": [{"name": "node", "backend": {
                "address": f"127.0.0.1:{node.port}", "user": node.user,
                "auth": {"method": "password", "password_file": _secret(w, "cassandra", node.password)}}}]})
        print("demo: starting OpenSSH sshd", flush=True)
        from scripts.peers.sshd import make_key, start_sshd

        sshd = start_sshd(w / "sshd")
        self.stops.append(sshd.stop)
        make_key(w / "proxy_host_ed25519", "dbproxy-demo-host")
        self.sshd = sshd
        self.listeners.append({
            "name": "ssh", "protocol": "ssh", "listen": "127.0.0.1:0", "host_key_file": str(w / "proxy_host_ed25519"),
            "auth": {"methods": ["token"]}, "recording": {"dir": str(w / "recordings")},
            "routes": [{"name": "hosts", "match": {"target": "web-*"}, "backend": {
                "address": sshd.address, "login": sshd.login,
                "auth": {"method": "publickey", "key_file": str(sshd.client_key)},
                "host_key": {"known_hosts_file": str(sshd.known_hosts)}}}]})
        (w / "recordings").mkdir(exist_ok=True)
        print("demo: starting a Redfish BMC emulator", flush=True)
        from scripts.peers.sushy import start_sushy

        bmc = start_sushy(w / "bmc")
        self.stops.append(bmc.stop)
        self.listeners.append({
            "name": "redfish", "protocol": "redfish", "kind": "http", "listen": "127.0.0.1:0", "tls": self.tls,
            "auth": {"methods": ["token"]},
            "routes": [{"name": "bmcs", "match": {"target": "bmc-*"}, "backend": {
                "address": bmc.address, "auth": {"method": "session", "username": bmc.username,
                                                 "password_file": str(bmc.password_file)}}}]})
        print("demo: starting a VNC desktop (Xtigervnc with an xterm)", flush=True)
        from scripts.peers.vnc import start_desktop

        desk = start_desktop(w / "vnc")
        self.stops.append(desk.stop)
        self.listeners.append({
            "name": "vnc", "protocol": "vnc", "listen": "127.0.0.1:0", "tls": self.tls,
            "auth": {"methods": ["token"]}, "recording": {"dir": str(w / "recordings")},
            "routes": [{"name": "desks", "match": {"target": "desk-*"}, "backend": {
                "address": desk.address, "auth": {"method": "vnc", "password_file": _secret(w, "vnc", desk.password)}}}]})

    # -- the proxy ----------------------------------------------------------------------
    def config(self) -> dict:
        w = self.workdir
        roles = {"routes": ["*"], "databases": ["*"], "db_users": ["*"]}
        if self.everything:
            roles.update({"targets": ["web-*"], "logins": [self.sshd.login], "bmcs": ["bmc-*"], "desktops": ["desk-*"],
                          "redfish": [{"methods": ["GET", "HEAD"], "paths": ["/redfish/v1", "/redfish/v1/*"]},
                                      {"actions": {"ComputerSystem.Reset": {"ResetType": ["On", "GracefulShutdown",
                                                                                           "GracefulRestart"]}},
                                       "paths": ["/redfish/v1/Systems/*"]}]})
        return {
            "identity": {"token": {"algorithm": "EdDSA", "key_file": str(w / "token.key"),
                                   "public_key_file": str(w / "token.pub"), "registry_file": str(w / "tokens.json"),
                                   "revocation_file": str(w / "revoked.txt"), "codes_file": str(w / "codes.json"),
                                   "max_ttl_seconds": 43200}},
            "roles": {"demo": roles},
            "listeners": self.listeners,
            "audit": {"sinks": [{"type": "jsonl", "path": str(w / "audit.jsonl")}]},
            "shutdown_grace_seconds": 5,
        }

    def start_proxy(self) -> dict[str, int]:
        w = self.workdir
        _cli("token", "keygen", "--algorithm", "EdDSA", "--key-file", str(w / "token.key"),
             "--public-key-file", str(w / "token.pub"), env=self.env)
        self.config_path = w / "dbproxy.json"
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        self.proxy = subprocess.Popen([sys.executable, "-m", "dbproxy.cli", "serve", "--config", str(self.config_path)],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env)
        self.stops.insert(0, self._stop_proxy)  # the proxy stops first, then the servers behind it
        ports: dict[str, int] = {}
        assert self.proxy.stdout is not None
        for line in self.proxy.stdout:
            sys.stdout.write(line)
            if "listening on" in line and line.startswith("dbproxy: "):
                ports[line.split()[1]] = int(line.rsplit(":", 1)[1].split()[0])
                if len(ports) == len(self.listeners):
                    break
        if len(ports) != len(self.listeners):
            raise RuntimeError("the proxy did not start (its output is above)")
        self.token = _cli("token", "issue", "--config", str(self.config_path), "--user", USER, "--roles", "demo",
                          "--ttl", "12h", env=self.env)
        return ports

    def _stop_proxy(self) -> None:
        if self.proxy.poll() is None:
            self.proxy.send_signal(signal.SIGTERM)
            try:
                self.proxy.wait(15)
            except subprocess.TimeoutExpired:
                self.proxy.kill()

    # -- the client lines ---------------------------------------------------------------
    def client_lines(self, ports: dict[str, int]) -> None:
        from scripts.peers.ferretdb_server import mongosh_path

        ca = str(self.ca[0])
        self.lines["psql"] = (f"PGPASSWORD=$DBPROXY_TOKEN psql \"host=127.0.0.1 port={ports['pg']} dbname=app "
                              f"user={USER} sslmode=disable\"")
        self.lines["mongosh"] = f"{mongosh_path()} mongodb://127.0.0.1:{ports['mongo']}/app -u {USER} -p $DBPROXY_TOKEN"
        if self.everything:
            self.lines["cqlsh"] = f"SSL_CERTFILE={ca} cqlsh 127.0.0.1 {ports['cql']} --ssl -u {USER} -p $DBPROXY_TOKEN"
            self.lines["ssh"] = f"ssh -p {ports['ssh']} {self.sshd.login}@web-1@127.0.0.1   # password: the token"
            self.lines["curl"] = (f"curl --cacert {ca} --resolve bmc-1.demo.test:{ports['redfish']}:127.0.0.1 "
                                  f"-H \"Authorization: Bearer $DBPROXY_TOKEN\" "
                                  f"https://bmc-1.demo.test:{ports['redfish']}/redfish/v1/Systems")
            self.lines["vncviewer"] = (f"vncviewer -SecurityTypes X509Plain -X509CA {ca} 127.0.0.1::{ports['vnc']}"
                                       f"   # user name desk-1, password: the token")
            self.lines["vncviewer (one-time code)"] = (
                f"vncviewer 127.0.0.1::{ports['vnc']}   # password: $(python -m dbproxy.cli token issue --config "
                f"{self.config_path} --user {USER} --roles demo --vnc --target desk-1)")
        self.ports = ports

    def show(self) -> None:
        w = self.workdir
        print()
        print(f"dbproxy is in front of {', '.join(lc['name'] for lc in self.listeners)}; it holds every backend "
              "credential.")
        print(f"  config: {self.config_path}")
        print(f"  audit:  {w / 'audit.jsonl'}   (python -m dbproxy.cli audit tail {w / 'audit.jsonl'} --follow)")
        print(f"A token for {USER} (role demo, 12 h):")
        print(f"  export DBPROXY_TOKEN={self.token}")
        print("Connect with:")
        for line in self.lines.values():
            print(f"  {line}")
        print("Ctrl-C stops the demo.", flush=True)

    # -- --smoke: each client once ------------------------------------------------------
    def smoke(self) -> int:
        from scripts.peers.ferretdb_server import mongosh_path

        t, p, ca = self.token, self.ports, str(self.ca[0])
        runs = {
            "psql": (["psql", f"host=127.0.0.1 port={p['pg']} dbname=app user={USER} sslmode=disable", "-Atc",
                      "select 'psql-ok'"], dict(os.environ, PGPASSWORD=t), "psql-ok"),
            "mongosh": ([str(mongosh_path()), "--quiet", f"mongodb://127.0.0.1:{p['mongo']}/app", "-u", USER, "-p", t,
                         "--eval", "print('mongo-' + db.runCommand({ping: 1}).ok)"],
                        dict(os.environ, HOME=str(self.workdir)), "mongo-1"),
        }
        if self.everything:
            runs["cqlsh"] = (["cqlsh", "127.0.0.1", str(p["cql"]), "--ssl", "-u", USER, "-p", t, "--connect-timeout",
                              "30", "-e", "SELECT release_version FROM system.local"],
                             dict(os.environ, SSL_CERTFILE=ca, SSL_VALIDATE="true"), "5.0")
            askpass = self.workdir / "askpass.sh"
            askpass.write_text('#!/bin/sh\nprintf "%s\\n" "$DBPROXY_TOKEN"\n')
            askpass.chmod(0o700)
            runs["ssh"] = (["ssh", "-F", "/dev/null", "-o", "StrictHostKeyChecking=no", "-o",
                            f"UserKnownHostsFile={self.workdir / 'client_known_hosts'}", "-o", "PubkeyAuthentication=no",
                            "-p", str(p["ssh"]), f"{self.sshd.login}@web-1@127.0.0.1", "echo ssh-ok"],
                           dict(os.environ, SSH_ASKPASS=str(askpass), SSH_ASKPASS_REQUIRE="force", DBPROXY_TOKEN=t),
                           "ssh-ok")
            runs["curl"] = (["curl", "-sS", "--cacert", ca, "--resolve", f"bmc-1.demo.test:{p['redfish']}:127.0.0.1",
                             "-H", f"Authorization: Bearer {t}", f"https://bmc-1.demo.test:{p['redfish']}/redfish/v1/Systems"],
                            dict(os.environ), "Members@odata.count")
            # A scripted viewer (vncdotool: classic VNC authentication) with a one-time code.
            code = _cli("token", "issue", "--config", str(self.config_path), "--user", USER, "--roles", "demo",
                        "--vnc", "--target", "desk-1", env=self.env)
            shot = self.workdir / "vnc-smoke.png"
            runs["vncviewer"] = ([sys.executable, "-c", VNC_SMOKE, str(p["vnc"]), code, str(shot)], dict(self.env),
                                 "vnc-ok")
        failed = 0
        for name, (argv, env, expected) in runs.items():
            try:
                r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=180,
                                   stdin=subprocess.DEVNULL)
            except FileNotFoundError as exc:  # a client not installed: scripts/setup installs them all
                r = subprocess.CompletedProcess(argv, 127, "", str(exc))
            ok = r.returncode == 0 and expected in r.stdout
            failed += not ok
            print(f"smoke: {name}: {'ok' if ok else 'FAILED'}" + ("" if ok else f"\n{r.stdout}\n{r.stderr}"), flush=True)
        print(f"smoke: {'all ok' if not failed else f'{failed} failed'}", flush=True)
        return 1 if failed else 0

    def stop(self) -> None:
        for stop in self.stops:
            with contextlib.suppress(Exception):
                stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--all", action="store_true", help="also Cassandra, sshd, a Redfish BMC and a VNC desktop (slower)")
    parser.add_argument("--smoke", action="store_true", help="run each client line once, check it, stop")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    workdir = Path(os.environ.get("DBPROXY_DEMO_DIR") or tempfile.mkdtemp(prefix="dbproxy-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    demo = Demo(workdir, args.all)
    try:
        demo.start_peers()
        demo.client_lines(demo.start_proxy())
        demo.show()
        if args.smoke:
            return demo.smoke()
        while demo.proxy.poll() is None:
            line = demo.proxy.stdout.readline()
            if line:
                sys.stdout.write(line)
            else:
                time.sleep(0.2)
        return demo.proxy.returncode or 0
    except KeyboardInterrupt:
        return 0
    finally:
        demo.stop()


if __name__ == "__main__":
    sys.exit(main())
