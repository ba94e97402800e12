"""A private pgbouncer in front of a ``PgServer`` (the benchmark's reference pooler).

Strategy: pgbouncer refuses to run as root, so like the server it runs as the
``postgres`` OS user from a temp dir that user owns (config, auth_file, log,
pid — a root-owned log left behind would block a later start).  It runs in
the foreground as our child process, listens on a free loopback port and
forwards every database to the server over TCP.  The auth_file holds the one
user's password in plaintext, which lets pgbouncer answer the client's
SCRAM/md5 exchange and log in to the server with whatever method the server's
pg_hba asks for.  With ``client_tls`` (default when the server has a CA)
clients may also connect over TLS (``client_tls_sslmode=allow``) with a cert
from the server's CA.

Runnable: ``python -m scripts.peers.pgbouncer`` starts a server plus a
pgbouncer for its scram user, prints both as JSON and waits for Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import attrs

from scripts.peers import free_port, wait_for_interrupt, wait_for_tcp
from scripts.peers.certs import make_cert
from scripts.peers.postgres import (
    PgServer,
    _chown_tree,
    _conninfo_quote,
    _reachable_by_owner,
    _user_kwargs,
    start_postgres,
)

__all__ = ["PgBouncer", "start_pgbouncer"]


def _pgbouncer_bin() -> str:
    found = shutil.which("pgbouncer", path="/usr/sbin:/usr/bin:" + os.environ.get("PATH", ""))
    if found is None:
        raise FileNotFoundError("pgbouncer not found: run scripts/install/postgres.sh")
    return found


@attrs.define(eq=False)
class PgBouncer:
    host: str
    port: int
    dir: Path
    user: str
    password: str = attrs.field(repr=False)
    pool_mode: str
    ca_file: Path | None
    _proc: subprocess.Popen | None = None

    @property
    def log_file(self) -> Path:
        return self.dir / "pgbouncer.log"

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    def dsn(self, db: str = "app", **kw) -> str:
        """Conninfo for the pooled user; ``db='pgbouncer'`` is the admin console."""
        params: dict[str, object] = {"host": self.host, "port": self.port, "dbname": db,
                                     "user": self.user, "password": self.password}
        params.update(kw)
        return " ".join(f"{k}={_conninfo_quote(str(v))}" for k, v in params.items() if v is not None)

    def stop(self) -> None:
        """Stop pgbouncer and remove its files."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # SIGINT: immediate shutdown, SIGTERM waits for clients
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PgBouncer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_pgbouncer(base_dir: str | Path, pg: PgServer, user: str, password: str,
                    pool_mode: str = "session", *, auth_type: str = "scram-sha-256",
                    server_tls_sslmode: str = "prefer", client_tls: bool | None = None,
                    pool_size: int = 20, max_client_conn: int = 500) -> PgBouncer:
    """Start pgbouncer for *user* in front of *pg*; returns once it listens."""
    t0 = time.monotonic()
    base = Path(base_dir)
    base.mkdir(parents=True, exist_ok=True)
    if _reachable_by_owner(base):
        workdir = Path(tempfile.mkdtemp(prefix="pgbouncer-", dir=base))
    else:
        workdir = Path(tempfile.mkdtemp(prefix="dbproxy-pgbouncer-"))
    port = free_port()
    if client_tls is None:
        client_tls = pg.ca is not None
    bouncer = PgBouncer(host="127.0.0.1", port=port, dir=workdir, user=user, password=password,
                        pool_mode=pool_mode, ca_file=pg.ca_file if client_tls else None)
    try:
        auth_file = workdir / "userlist.txt"
        auth_file.write_text(f'"{user}" "{password}"\n')
        os.chmod(auth_file, 0o600)
        backend = f"host=127.0.0.1 port={pg.port}"
        conf = [
            "[databases]",
            f"app = {backend} dbname=app",
            f"* = {backend}",
            "",
            "[pgbouncer]",
            "listen_addr = 127.0.0.1",
            f"listen_port = {port}",
            "unix_socket_dir =",
            f"auth_type = {auth_type}",
            f"auth_file = {auth_file}",
            f"admin_users = {user}",
            f"stats_users = {user}",
            f"pool_mode = {pool_mode}",
            f"default_pool_size = {pool_size}",
            f"max_client_conn = {max_client_conn}",
            f"server_tls_sslmode = {server_tls_sslmode}",
            "ignore_startup_parameters = extra_float_digits",
            f"logfile = {bouncer.log_file}",
            f"pidfile = {workdir / 'pgbouncer.pid'}",
        ]
        if client_tls:
            if pg.ca is None:
                raise ValueError("client_tls needs a server started with ssl=True (its CA signs our cert)")
            cert, key = make_cert(workdir / "tls", pg.ca, "localhost")
            conf += [
                "client_tls_sslmode = allow",
                f"client_tls_cert_file = {cert}",
                f"client_tls_key_file = {key}",
                f"client_tls_ca_file = {pg.ca_file}",
            ]
        (workdir / "pgbouncer.ini").write_text("\n".join(conf) + "\n")
        _chown_tree(workdir)
        os.chmod(workdir, 0o700)
        out = open(workdir / "pgbouncer.out", "ab")
        try:
            bouncer._proc = subprocess.Popen(
                [_pgbouncer_bin(), str(workdir / "pgbouncer.ini")],
                cwd=workdir, env={"PATH": "/usr/bin:/bin", "HOME": str(workdir)},
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, **_user_kwargs(),
            )
        finally:
            out.close()
        wait_for_tcp(bouncer.host, port, timeout=10, proc=bouncer._proc)
    except BaseException as e:
        log = bouncer.log_text()[-2000:]
        bouncer.stop()
        if isinstance(e, Exception) and log:
            raise RuntimeError(f"pgbouncer failed to start: {e}\n--- log tail ---\n{log}") from e
        raise
    print(f"pgbouncer: 127.0.0.1:{port} -> {pg.port} up in {time.monotonic() - t0:.2f}s", file=sys.stderr)
    return bouncer


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scripts.peers.pgbouncer")
    ap.add_argument("--pool-mode", default="session", choices=["session", "transaction", "statement"])
    args = ap.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="dbproxy-peers-"))
    os.chmod(base, 0o755)
    try:
        with start_postgres(base) as pg:
            user, password = pg.users["scram-sha-256"]
            with start_pgbouncer(base, pg, user, password, args.pool_mode) as pgb:
                print(json.dumps({
                    "postgres": pg.info(),
                    "pgbouncer": {"host": pgb.host, "port": pgb.port, "user": user,
                                  "password": password, "pool_mode": pgb.pool_mode,
                                  "ca_file": str(pgb.ca_file) if pgb.ca_file else None},
                }, indent=2), flush=True)
                wait_for_interrupt()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
