"""A private PostgreSQL 15 server for integration tests and the demo.

Strategy: ``initdb`` a fresh cluster in a temp dir and run it with ``pg_ctl``
as the ``postgres`` OS user (the server refuses root; when we are not root we
simply run as ourselves).  It listens on 127.0.0.1 on a port the kernel picked
(bind port 0, read it back) plus a unix socket inside the temp dir, with TLS
on (server cert for localhost/127.0.0.1 from a throwaway CA, see certs.py) and
durability off (fsync, full_page_writes) since the data is thrown away.

Database ``app`` and one login role per backend auth method, each reachable
over TCP both with and without TLS (pg_hba ``hostssl`` + ``hostnossl``):

    users["trust"]          u_trust      trust
    users["password"]       u_password   password (cleartext on the wire)
    users["md5"]            u_md5        md5 (stored as md5, password_encryption='md5')
    users["scram-sha-256"]  u_scram      scram-sha-256

With a ``KdcRealm`` the server also gets ``postgres/localhost@REALM`` in its
keytab (``krb_server_keyfile``) and role ``dbproxy`` logs in by GSSAPI only,
over TLS (``hostssl … gss``) or GSS encryption (``hostgssenc … gss``).  The
ticket is for host ``localhost``: GSS clients must connect to ``localhost``,
not 127.0.0.1 (the KDC has no ``postgres/127.0.0.1``).

The superuser ``postgres`` is reachable over the unix socket only (trust);
``psql()`` runs admin SQL that way.  ``kill()`` is a crash stop
(``pg_ctl stop -m immediate``) and ``start()`` brings the same cluster back,
for backend-down tests; ``stop()`` shuts down and deletes everything.

Runnable: ``python -m scripts.peers.postgres [--kerberos]`` prints the
connection info as JSON and waits for Ctrl-C.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import pwd
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import attrs

from scripts.peers import free_port, wait_for_interrupt
from scripts.peers.certs import make_ca, make_cert
from scripts.peers.kdc import KdcRealm, start_realm

__all__ = ["PgServer", "start_postgres", "pg_bindir", "RUN_AS"]

RUN_AS = "postgres"
GSS_USER = "dbproxy"
# method (pg_hba name) -> role
ROLES = {
    "trust": "u_trust",
    "password": "u_password",
    "md5": "u_md5",
    "scram-sha-256": "u_scram",
}
# Unix socket paths are limited to 107 bytes (sun_path); the file is ".s.PGSQL.<port>".
_SUN_PATH_MAX = 107 - len("/.s.PGSQL.65535")


def pg_bindir() -> Path:
    """Directory of the PostgreSQL server binaries ($PG_BINDIR, else the newest Debian one)."""
    env = os.environ.get("PG_BINDIR")
    if env:
        return Path(env)
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb is None:
        raise FileNotFoundError("PostgreSQL server binaries not found: run scripts/install/postgres.sh")
    return Path(initdb).resolve().parent


def _as_root() -> bool:
    return os.geteuid() == 0


def _owner() -> pwd.struct_passwd:
    return pwd.getpwnam(RUN_AS) if _as_root() else pwd.getpwuid(os.geteuid())


def _user_kwargs() -> dict:
    """subprocess kwargs that drop root for the server user (with its own groups only)."""
    if not _as_root():
        return {}
    pw = _owner()
    return {"user": pw.pw_uid, "group": pw.pw_gid,
            "extra_groups": os.getgrouplist(pw.pw_name, pw.pw_gid)}


def _chown_tree(path: Path) -> None:
    if not _as_root():
        return
    pw = _owner()
    os.chown(path, pw.pw_uid, pw.pw_gid)
    for root, dirs, files in os.walk(path):
        for n in dirs + files:
            os.chown(os.path.join(root, n), pw.pw_uid, pw.pw_gid)


def _reachable_by_owner(path: Path) -> bool:
    """Can the server user traverse every ancestor of *path*?  (Mode bits; no ACLs.)"""
    if not _as_root():
        return True
    pw = _owner()
    groups = set(os.getgrouplist(pw.pw_name, pw.pw_gid))
    p = path.resolve()
    for d in [p, *p.parents]:
        st = d.stat()
        if st.st_uid == pw.pw_uid:
            ok = st.st_mode & stat.S_IXUSR
        elif st.st_gid in groups:
            ok = st.st_mode & stat.S_IXGRP
        else:
            ok = st.st_mode & stat.S_IXOTH
        if not ok:
            return False
    return True


def _conninfo_quote(value: str) -> str:
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


@attrs.define(eq=False)
class PgServer:
    host: str
    port: int
    dir: Path
    data_dir: Path
    socket_dir: Path
    ca_file: Path | None
    ca: tuple[Path, Path] | None
    users: dict[str, tuple[str, str]] = attrs.field(repr=False)
    bindir: Path
    kerberos: KdcRealm | None = None
    # GSS login: role, service principal, the host name clients must use.
    gss_user: str | None = None
    krb_service: str | None = None
    gss_host: str = "localhost"
    admin_user: str = "postgres"
    _extra_dirs: list[Path] = attrs.Factory(list)
    _env: dict[str, str] = attrs.field(factory=dict, repr=False)
    _stopped: bool = False

    @property
    def log_file(self) -> Path:
        return self.dir / "postgres.log"

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    def dsn(self, user: str, password: str | None = None, db: str = "app", **kw) -> str:
        """A libpq conninfo string for *user*; *kw* adds or overrides keywords."""
        params: dict[str, object] = {"host": self.host, "port": self.port, "dbname": db, "user": user}
        if password is not None:
            params["password"] = password
        params.update(kw)
        return " ".join(f"{k}={_conninfo_quote(str(v))}" for k, v in params.items() if v is not None)

    def _pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        p = subprocess.run(
            [str(self.bindir / "pg_ctl"), "-D", str(self.data_dir), *args],
            env=self._env, cwd=self.dir, capture_output=True, text=True, **_user_kwargs(),
        )
        if check and p.returncode != 0:
            raise RuntimeError(
                f"pg_ctl {args[-1]} failed ({p.returncode}): {p.stderr.strip()}\n"
                f"--- server log tail ---\n{self.log_text()[-2000:]}"
            )
        return p

    def start(self) -> None:
        """Start (or restart after ``kill()``) the server and wait until it accepts connections."""
        if self._stopped:
            raise RuntimeError("server was stopped and its files removed")
        if self.running:
            return
        self._pg_ctl("-l", str(self.log_file), "-w", "-t", "30", "start")

    @property
    def running(self) -> bool:
        return self._pg_ctl("status", check=False).returncode == 0

    def kill(self) -> None:
        """Crash stop: the postmaster and all backends go at once, no checkpoint."""
        if self.running:
            self._pg_ctl("-m", "immediate", "-w", "stop")

    def stop(self) -> None:
        """Shut down and remove the cluster and all its files."""
        if self._stopped:
            return
        try:
            if self.data_dir.exists() and self.running:
                self._pg_ctl("-m", "fast", "-w", "stop", check=False)
        finally:
            self._stopped = True
            for d in [self.dir, *self._extra_dirs]:
                shutil.rmtree(d, ignore_errors=True)

    def psql(self, *args: str, db: str = "app", input: str | None = None) -> str:
        """Run psql as superuser over the unix socket; return its stdout (``-At``)."""
        p = subprocess.run(
            [str(self.bindir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
             "-h", str(self.socket_dir), "-p", str(self.port), "-U", self.admin_user,
             "-d", db, *args],
            env=self._env, cwd=self.dir, input=input, capture_output=True, text=True,
        )
        if p.returncode != 0:
            raise RuntimeError(f"psql failed ({p.returncode}): {p.stderr.strip()}")
        return p.stdout

    def info(self) -> dict:
        """Connection info as plain JSON-able data (includes the throwaway passwords)."""
        d = {
            "host": self.host, "port": self.port, "socket_dir": str(self.socket_dir),
            "ca_file": str(self.ca_file) if self.ca_file else None,
            "database": "app",
            "users": {m: {"user": u, "password": p} for m, (u, p) in self.users.items()},
            "log_file": str(self.log_file),
        }
        if self.kerberos is not None:
            d["gss"] = {
                "user": self.gss_user, "host": self.gss_host, "service": self.krb_service,
                "client_principal": self.kerberos.proxy_principal,
                "client_keytab": str(self.kerberos.proxy_keytab),
                "env": self.kerberos.env(),
            }
        return d

    def __enter__(self) -> PgServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _pg_hba(kerberos: bool) -> str:
    lines = [
        "# TYPE      DATABASE USER        ADDRESS       METHOD",
        # Admin: unix socket only.
        "local       all      postgres                  trust",
    ]
    for method, role in ROLES.items():
        for kind in ("hostssl", "hostnossl"):
            lines.append(f"{kind:<11} all      {role:<11} 127.0.0.1/32  {method}")
    if kerberos:
        # GSS for dbproxy only; include_realm=0 maps dbproxy@REALM to role dbproxy.
        lines.append(f"hostssl     all      {GSS_USER:<11} 127.0.0.1/32  gss include_realm=0")
        lines.append(f"hostgssenc  all      {GSS_USER:<11} 127.0.0.1/32  gss include_realm=0")
    return "\n".join(lines) + "\n"


def _postgresql_conf(port: int, socket_dir: Path, tls: dict[str, Path] | None,
                     keytab: Path | None) -> str:
    conf = {
        "listen_addresses": "127.0.0.1",
        "port": port,
        "unix_socket_directories": str(socket_dir),
        "max_connections": 100,
        "shared_buffers": "32MB",
        "password_encryption": "scram-sha-256",
        # Throwaway data: durability off for speed.
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
        "log_connections": "on",
        "log_line_prefix": "%m [%p] %q%u@%d ",
        "ssl": "on" if tls else "off",
    }
    if tls:
        conf.update(ssl_cert_file=str(tls["cert"]), ssl_key_file=str(tls["key"]),
                    ssl_ca_file=str(tls["ca"]))
    if keytab is not None:
        conf["krb_server_keyfile"] = str(keytab)
    out = ["", "# --- scripts/peers/postgres.py ---"]
    for k, v in conf.items():
        out.append(f"{k} = {v}" if isinstance(v, int) else f"{k} = '{v}'")
    return "\n".join(out) + "\n"


def start_postgres(base_dir: str | Path, *, port: int | None = None, ssl: bool = True,
                   kerberos: KdcRealm | None = None) -> PgServer:
    """initdb + start a server under *base_dir*; returns once it accepts connections."""
    t0 = time.monotonic()
    base = Path(base_dir)
    base.mkdir(parents=True, exist_ok=True)
    extra: list[Path] = []
    if _reachable_by_owner(base):
        workdir = Path(tempfile.mkdtemp(prefix="pg-", dir=base))
    else:
        # e.g. pytest's tmp_path sits under a root-only 0700 directory.
        workdir = Path(tempfile.mkdtemp(prefix="dbproxy-pg-"))
    socket_dir = workdir / "sock"
    socket_dir.mkdir()
    if len(str(socket_dir)) > _SUN_PATH_MAX:
        socket_dir = Path(tempfile.mkdtemp(prefix="pgs-", dir="/tmp"))
        extra.append(socket_dir)
    bindir = pg_bindir()
    env = {
        "PATH": f"{bindir}:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "HOME": str(workdir),
        "PGTZ": "UTC",
    }
    server = PgServer(
        host="127.0.0.1", port=port or free_port(), dir=workdir, data_dir=workdir / "data",
        socket_dir=socket_dir, ca_file=None, ca=None, users={}, bindir=bindir,
        kerberos=kerberos, extra_dirs=extra, env=env,
    )
    try:
        tls = None
        if ssl:
            tls_dir = workdir / "tls"
            ca = make_ca(tls_dir)
            cert, key = make_cert(tls_dir, ca, "localhost", sans=["localhost", "127.0.0.1"])
            server.ca, server.ca_file = ca, ca[0]
            tls = {"cert": cert, "key": key, "ca": ca[0]}

        keytab = None
        if kerberos is not None:
            shutil.copy(kerberos.krb5_conf, workdir / "krb5.conf")
            env.update(kerberos.env())
            # The server reads krb5.conf as its own user; the realm dir may be unreachable.
            env["KRB5_CONFIG"] = str(workdir / "krb5.conf")
            env.pop("KRB5_KDC_PROFILE", None)
            service = kerberos.add_principal("postgres/localhost", exist_ok=True)
            keytab = kerberos.keytab(service, workdir / "postgres.keytab")
            server.gss_user, server.krb_service = GSS_USER, service

        _chown_tree(workdir)
        for d in extra:
            _chown_tree(d)
        os.chmod(workdir, 0o700)

        p = subprocess.run(
            [str(bindir / "initdb"), "-D", str(server.data_dir), "-U", "postgres",
             "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"],
            env=env, cwd=workdir, capture_output=True, text=True, **_user_kwargs(),
        )
        if p.returncode != 0:
            raise RuntimeError(f"initdb failed: {p.stderr.strip()}")
        with open(server.data_dir / "postgresql.conf", "a") as f:
            f.write(_postgresql_conf(server.port, socket_dir, tls, keytab))
        (server.data_dir / "pg_hba.conf").write_text(_pg_hba(kerberos is not None))
        server.start()

        passwords = {m: secrets.token_urlsafe(12) for m in ROLES}
        sql = ["SET password_encryption = 'scram-sha-256';"]
        for method, role in ROLES.items():
            if method != "md5":
                sql.append(f"CREATE ROLE {role} LOGIN PASSWORD '{passwords[method]}';")
        sql.append("SET password_encryption = 'md5';")
        sql.append(f"CREATE ROLE {ROLES['md5']} LOGIN PASSWORD '{passwords['md5']}';")
        roles = list(ROLES.values())
        if kerberos is not None:
            sql.append(f"CREATE ROLE {GSS_USER} LOGIN;")
            roles.append(GSS_USER)
        sql.append("CREATE DATABASE app;")
        sql.append(f"GRANT ALL ON DATABASE app TO {', '.join(roles)};")
        sql.append("\\connect app")
        # PG15 no longer lets PUBLIC create in schema public.
        sql.append(f"GRANT ALL ON SCHEMA public TO {', '.join(roles)};")
        server.psql("-f", "-", db="postgres", input="\n".join(sql) + "\n")
        server.users = {m: (ROLES[m], passwords[m]) for m in ROLES}
    except BaseException:
        server.stop()
        raise
    print(f"postgres: 127.0.0.1:{server.port} up in {time.monotonic() - t0:.2f}s", file=sys.stderr)
    return server


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scripts.peers.postgres", description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, default=None)
    ap.add_argument("--no-ssl", action="store_true")
    ap.add_argument("--kerberos", action="store_true", help="also start a KDC and enable GSS for role dbproxy")
    args = ap.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="dbproxy-peers-"))
    os.chmod(base, 0o755)
    realm = None
    try:
        if args.kerberos:
            realm = start_realm(base)
        with start_postgres(base, port=args.port, ssl=not args.no_ssl, kerberos=realm) as pg:
            print(json.dumps(pg.info(), indent=2), flush=True)
            wait_for_interrupt()
    finally:
        if realm is not None:
            realm.close()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
