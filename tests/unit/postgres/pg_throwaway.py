"""A throwaway PostgreSQL 15 server for the codec's live tests and for capturing test data.

initdb + pg_ctl in a fresh temp dir owned by the ``postgres`` user (the
server refuses to run as root), listening on a free loopback port.  Roles:
``scram_user`` (SCRAM-SHA-256, a non-ASCII password that exercises SASLprep)
and ``md5_user`` (MD5).  Optionally TLS with a given certificate.  The
passwords are throwaway test values of this private instance.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from scripts.peers import free_port

PG_BIN = Path(os.environ.get("PG_BINDIR", "/usr/lib/postgresql/15/bin"))

SCRAM_USER = "scram_user"
# U+00AD (soft hyphen) is mapped to nothing by SASLprep, U+2003 (em space) to
# U+0020: the key only matches if the client prepares the password as the server did.
SCRAM_PASSWORD = "p\u00e4ss\u00adw\u2003rd-\u00fc"
MD5_USER = "md5_user"
MD5_PASSWORD = "md5-secret"


def available() -> bool:
    return (PG_BIN / "initdb").exists() and (os.geteuid() != 0 or _has_postgres_user())


def _has_postgres_user() -> bool:
    try:
        pwd.getpwnam("postgres")
        return True
    except KeyError:
        return False


def _sql_literal(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


class ThrowawayPostgres:
    def __init__(self, *, tls_cert_pem: bytes | None = None, tls_key_pem: bytes | None = None) -> None:
        self.tls_cert_pem = tls_cert_pem
        self.tls_key_pem = tls_key_pem
        self.dir: Path | None = None
        self.port = 0

    def _run(self, *args: str, input: str | None = None) -> str:
        cmd = list(args)
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        res = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=60,
                             cwd=str(self.dir))
        if res.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({res.returncode}): {res.stderr.strip()}")
        return res.stdout

    def start(self) -> ThrowawayPostgres:
        self.dir = Path(tempfile.mkdtemp(prefix="dbproxy-pg-"))
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        data = self.dir / "data"
        self._run(str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth-local=trust",
                  "--auth-host=reject", "-E", "UTF8", "--locale=C.UTF-8", "--no-sync")
        self.port = free_port()
        conf = [
            "listen_addresses = '127.0.0.1'",
            f"port = {self.port}",
            f"unix_socket_directories = '{self.dir}'",
            "fsync = off",
            "password_encryption = 'scram-sha-256'",
        ]
        if self.tls_cert_pem is not None:
            for name, pem in (("server.crt", self.tls_cert_pem), ("server.key", self.tls_key_pem)):
                path = data / name
                path.write_bytes(pem)
                os.chmod(path, 0o600)
                if os.geteuid() == 0:
                    os.chown(path, pw.pw_uid, pw.pw_gid)
            conf += ["ssl = on", "ssl_cert_file = 'server.crt'", "ssl_key_file = 'server.key'"]
        with open(data / "postgresql.conf", "a") as f:
            f.write("\n".join(conf) + "\n")
        (data / "pg_hba.conf").write_text(
            "local all all trust\n"
            f"host all {MD5_USER} 127.0.0.1/32 md5\n"
            "host all all 127.0.0.1/32 scram-sha-256\n"
        )
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(self.dir / "log"), "-w", "-t", "30", "start")
        self.psql(
            f"CREATE ROLE {SCRAM_USER} LOGIN SUPERUSER PASSWORD {_sql_literal(SCRAM_PASSWORD)};"
            "SET password_encryption = 'md5';"
            f"CREATE ROLE {MD5_USER} LOGIN PASSWORD {_sql_literal(MD5_PASSWORD)};"
        )
        return self

    def psql(self, sql: str) -> str:
        assert self.dir is not None
        return self._run(str(PG_BIN / "psql"), "-X", "-v", "ON_ERROR_STOP=1", "-h", str(self.dir),
                         "-p", str(self.port), "-U", "postgres", "-d", "postgres", "-Atq", input=sql)

    def stop(self) -> None:
        if self.dir is None:
            return
        try:
            self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.dir / "data"), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> ThrowawayPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
