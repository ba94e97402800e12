"""A real Mongo-wire server (FerretDB v1.24.2 on SQLite) as a test peer.

Strategy: ``scripts/install/mongo.sh`` builds the ``ferretdb`` binary into
``~/.cache/dbproxy/bin`` (override: ``DBPROXY_FERRETDB_BIN``); this module runs
it with everything under a private base dir — the SQLite backend
(``--handler=sqlite --sqlite-url=file:<base>/data/``, so no PostgreSQL), its
state file (``--state-dir``), and its log — on a free loopback port, with
telemetry off and the debug HTTP listener off (``--debug-addr=-``).

Authentication (``auth=True``, the default) is FerretDB 1.24's experimental
mode ``--test-enable-new-auth``: FerretDB keeps its own users in
``admin.system.users`` and speaks SCRAM-SHA-1 and SCRAM-SHA-256 (also as
speculative authentication inside an OP_QUERY ``hello``/``isMaster``);
every command but the handshake ones then needs a login.  The first user is
made by FerretDB itself at start-up from ``--setup-database=admin
--setup-username=… --setup-password=…`` when the ``admin`` database does not
exist yet; a restart on the same data keeps it.  The password goes in through
the ``FERRETDB_SETUP_PASSWORD`` environment variable, not argv, so ``ps``
never shows it.  ``auth=False`` starts FerretDB without the new auth mode: it
then needs no login at all (its legacy PLAIN mode only forwards credentials
to a PostgreSQL backend, which SQLite has not).

Not supported by FerretDB 1.24 (see tests/integration/test_peers_mongo.py):
OP_COMPRESSED — ``hello`` never lists ``compression``, so drivers stay
uncompressed, and a compressed message makes it drop the connection.

``tls=True`` makes the port TLS-only (``--listen-addr=`` empty,
``--listen-tls``) with a throwaway CA and a server cert for
127.0.0.1/localhost from ``scripts.peers.certs``; ``mtls=True`` also passes
``--listen-tls-ca-file``, which makes FerretDB require and verify a client
cert (``client_cert``/``client_key`` are issued for that).

The server is ready when pymongo's ``ping`` succeeds (logged in, when auth is
on).  ``start()`` after ``stop()``/``kill()`` restarts it on the same port and
data.  Run ``python -m scripts.peers.ferretdb_server [BASE_DIR] [--no-auth]
[--tls] [--mtls]`` to start one by hand: it prints its connection info as
JSON and runs until Ctrl-C.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import attrs

from scripts.peers import free_port
from scripts.peers.process import PeerProcess, run_in_foreground

__all__ = [
    "FerretServer",
    "FerretStartError",
    "ferretdb_path",
    "mongosh_path",
    "start_ferretdb",
]

CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dbproxy"
HOST = "127.0.0.1"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
ADMIN_DB = "admin"


class FerretStartError(RuntimeError):
    pass


def ferretdb_path() -> Path:
    """The ferretdb binary ``scripts/install/mongo.sh`` built."""
    path = Path(os.environ.get("DBPROXY_FERRETDB_BIN") or CACHE_DIR / "bin" / "ferretdb")
    if not os.access(path, os.X_OK):
        raise FileNotFoundError(f"{path} missing: run scripts/install/mongo.sh")
    return path


def mongosh_path() -> Path:
    """The mongosh executable ``scripts/install/mongo.sh`` installed with npm."""
    node_dir = Path(os.environ.get("DBPROXY_NODE_DIR") or CACHE_DIR / "node")
    path = node_dir / "node_modules" / ".bin" / "mongosh"
    if not os.access(path, os.X_OK):
        found = shutil.which("mongosh")
        if found:
            return Path(found)
        raise FileNotFoundError(f"{path} missing: run scripts/install/mongo.sh")
    return path


@attrs.define(eq=False)
class FerretServer(PeerProcess):
    base_dir: Path
    auth: bool = True
    tls: bool = False
    mtls: bool = False
    host: str = HOST
    port: int = attrs.field(factory=free_port)
    user: str = "admin"
    password: str = attrs.field(factory=lambda: secrets.token_urlsafe(18), repr=False)
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    start_seconds: float | None = None
    _proc: subprocess.Popen | None = None
    _stop_timeout = STOP_TIMEOUT
    _log_files = ("log_file",)

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    @property
    def log_file(self) -> Path:
        return self.base_dir / "ferretdb.log"

    def uri(
        self,
        db: str = ADMIN_DB,
        *,
        mechanism: str | None = "SCRAM-SHA-256",
        user: str | None = None,
        password: str | None = None,
        **options: str,
    ) -> str:
        """A ``mongodb://`` URI for this server.

        With auth on it carries the admin user's credentials (or *user*/
        *password*), ``authSource=admin`` and ``authMechanism`` (unless
        *mechanism* is None); with TLS, ``tls=true`` and the CA file.  Extra
        *options* are appended as URI options.
        """
        params: dict[str, str] = {}
        creds = ""
        if self.auth:
            q = urllib.parse.quote_plus
            creds = f"{q(user or self.user)}:{q(password if password is not None else self.password)}@"
            params["authSource"] = ADMIN_DB
            if mechanism:
                params["authMechanism"] = mechanism
        if self.tls:
            params["tls"] = "true"
            params["tlsCAFile"] = str(self.ca_file)
            if self.mtls:
                params["tlsCertificateKeyFile"] = str(self.base_dir / "certs" / "client.pem")
        params.update(options)
        query = "?" + urllib.parse.urlencode(params) if params else ""
        return f"mongodb://{creds}{self.host}:{self.port}/{db}{query}"

    def client(self, **kwargs):
        """A ``pymongo.MongoClient`` logged in as the admin user (caller closes it)."""
        import pymongo

        kwargs.setdefault("serverSelectionTimeoutMS", 5000)
        kwargs.setdefault("directConnection", True)
        return pymongo.MongoClient(self.uri(), **kwargs)

    def info(self) -> dict:
        return {
            "host": self.host,
            "port": self.port,
            "user": self.user if self.auth else None,
            "password": self.password if self.auth else None,
            "auth": self.auth,
            "tls": self.tls,
            "mtls": self.mtls,
            "ca_file": str(self.ca_file) if self.ca_file else None,
            "client_cert": str(self.client_cert) if self.client_cert else None,
            "client_key": str(self.client_key) if self.client_key else None,
            "uri": self.uri(),
            "base_dir": str(self.base_dir),
            "log_file": str(self.log_file),
            "pid": self.pid,
            "start_seconds": self.start_seconds,
            "mongosh": str(_optional(mongosh_path)),
        }

    # -- configuration -------------------------------------------------------

    def _write_certs(self) -> None:
        if self.cert_file is not None:
            return
        from scripts.peers.certs import make_ca, make_cert

        d = self.base_dir / "certs"
        ca = make_ca(d, name="dbproxy FerretDB test CA")
        self.ca_file = ca[0]
        self.cert_file, self.key_file = make_cert(d, ca, "localhost")
        self.client_cert, self.client_key = make_cert(d, ca, "client", client=True)
        # pymongo/mongosh take the client cert and key as one PEM file.
        pem = d / "client.pem"
        fd = os.open(pem, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(self.client_cert.read_bytes() + self.client_key.read_bytes())

    def _command(self) -> list[str]:
        addr = f"{self.host}:{self.port}"
        cmd = [
            str(ferretdb_path()),
            "--handler=sqlite",
            f"--sqlite-url=file:{self.data_dir}/",
            f"--state-dir={self.base_dir}",
            "--debug-addr=-",
            "--telemetry=disable",
            "--log-level=INFO",
            "--log-format=text",
        ]
        if self.tls:
            cmd += [
                "--listen-addr=",
                f"--listen-tls={addr}",
                f"--listen-tls-cert-file={self.cert_file}",
                f"--listen-tls-key-file={self.key_file}",
            ]
            if self.mtls:
                cmd.append(f"--listen-tls-ca-file={self.ca_file}")
        else:
            cmd.append(f"--listen-addr={addr}")
        if self.auth:
            cmd += [
                "--test-enable-new-auth",
                f"--setup-database={ADMIN_DB}",
                f"--setup-username={self.user}",
            ]
        return cmd

    # -- lifecycle -----------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT) -> FerretServer:
        if self.running():
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.tls:
            self._write_certs()
        env = dict(os.environ)
        for k in list(env):
            if k.startswith("FERRETDB_"):
                del env[k]
        if self.auth:
            env["FERRETDB_SETUP_PASSWORD"] = self.password
        began = time.monotonic()
        self._spawn(self._command(), log=self.log_file, env=env, cwd=self.base_dir, new_session=True)
        try:
            self._wait_ready(began + timeout)
        except BaseException:
            self.kill()
            raise
        self.start_seconds = round(time.monotonic() - began, 2)
        return self

    def _wait_ready(self, deadline: float) -> None:
        import pymongo

        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise FerretStartError(
                    f"ferretdb exited with {self._proc.returncode} during start\n" + self.log_tail()
                )
            try:
                # pymongo logs in on connection checkout, before the ping.
                with self.client(serverSelectionTimeoutMS=500, connectTimeoutMS=500) as c:
                    c.admin.command("ping")
                return
            except pymongo.errors.OperationFailure as exc:
                # The setup user exists before FerretDB listens: a refusal is final.
                raise FerretStartError(f"ferretdb refused the probe: {exc}\n" + self.log_tail()) from exc
            except pymongo.errors.PyMongoError as exc:
                last_error = exc
            time.sleep(0.05)
        raise FerretStartError(
            f"ferretdb not ready on {self.host}:{self.port} within the timeout "
            f"(last error: {last_error!r})\n" + self.log_tail()
        )


def start_ferretdb(
    base_dir: str | os.PathLike,
    *,
    auth: bool = True,
    tls: bool = False,
    mtls: bool = False,
    user: str = "admin",
    password: str | None = None,
) -> FerretServer:
    """Start FerretDB with all its files under *base_dir*; blocks until ``ping`` works."""
    base = Path(base_dir).resolve()
    base.mkdir(parents=True, exist_ok=True)
    kwargs = {"password": password} if password is not None else {}
    server = FerretServer(base_dir=base, auth=auth, tls=tls or mtls, mtls=mtls, user=user, **kwargs)
    return server.start()


def _optional(fn):
    try:
        return fn()
    except FileNotFoundError:
        return None



def main(argv: list[str]) -> int:
    flags = {a for a in argv if a.startswith("--")}
    unknown = flags - {"--no-auth", "--tls", "--mtls"}
    args = [a for a in argv if not a.startswith("--")]
    if unknown or len(args) > 1:
        print(
            "usage: python -m scripts.peers.ferretdb_server [BASE_DIR] [--no-auth] [--tls] [--mtls]",
            file=sys.stderr,
        )
        return 2
    return run_in_foreground(
        lambda base: start_ferretdb(base, auth="--no-auth" not in flags, tls="--tls" in flags, mtls="--mtls" in flags),
        args[0] if args else None, prefix="dbproxy-ferretdb-", indent=2)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
