"""A real single-node Apache Cassandra 5.0 as a test peer.

Strategy: no tarball and no launch scripts.  ``scripts/install/cassandra.sh``
puts ``cassandra-all`` and its runtime dependencies from Maven Central into
one lib dir; this module writes a ``cassandra.yaml`` (from
``cassandra/cassandra.yaml.in``) into a private base dir with loopback
addresses and free ports, and runs ``java … CassandraDaemon`` itself with the
Java 17 flags of Cassandra's own ``conf/jvm17-server.options``
(``cassandra/jvm17-server.options``) and the system properties the
``bin/cassandra`` script would pass, plus the ones that make a lone node start
fast (no gossip settling, no superuser setup delay, short ring delay).

The node is ready when a real client can log in as the default superuser
cassandra/cassandra (created by CassandraRoleManager right after start, since
``superuser_setup_delay_ms=0``): the probe uses cassandra-driver, not just a
TCP connect, because the native port opens before the role exists.

``start()`` after ``stop()`` or ``kill()`` restarts the same node on the same
ports and data (commit log replay after a kill).  ``ssl=True`` makes the native
port TLS-only, with a throwaway CA and a server certificate for 127.0.0.1 /
localhost in PEM files (``PEMBasedSslContextFactory``, new in 5.0).

``kerberos=realm`` (a ``scripts.peers.kdc.KdcRealm``) starts the node with
the Kerberos test authenticator (``cassandra-krb-auth/``, test
infrastructure: Apache Cassandra ships none), built by the install step into
``krb_auth_dir()`` and put on the classpath: principal
``cassandra/localhost@REALM`` with its own keytab, the realm's krb5.conf for
the JVM.  It is a PasswordAuthenticator that also speaks SASL GSSAPI, so the
cassandra/cassandra readiness probe and DDL helpers keep working; a GSSAPI
principal logs in as the role of its short name (``dbproxy@REALM`` →
``dbproxy``).  The class name it announces in AUTHENTICATE is the content of
``announce_file`` when that exists (re-read per connection).

Run ``python -m scripts.peers.cassandra_server [BASE_DIR] [--ssl]`` to start
one by hand: it prints its connection info as JSON and runs until Ctrl-C.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import shutil
import socket
import ssl as ssl_module
import string
import subprocess
import sys
import time
from pathlib import Path

import attrs

from scripts.peers import free_port
from scripts.peers.process import PeerProcess, run_in_foreground

PEER_DIR = Path(__file__).resolve().parent / "cassandra"
KRB_AUTH_SRC = Path(__file__).resolve().parent / "cassandra-krb-auth"
KRB_AUTH_CLASS = "dbproxy.peers.cassandra.KerberosAuthenticator"
DEFAULT_LIB_DIR = Path.home() / ".cache" / "dbproxy" / "cassandra" / "lib"
DEFAULT_KRB_DIR = Path.home() / ".cache" / "dbproxy" / "cassandra" / "krb-auth"
START_TIMEOUT = 180.0
STOP_TIMEOUT = 60.0
HOST = "127.0.0.1"



def lib_dir() -> Path:
    return Path(os.environ.get("DBPROXY_CASSANDRA_LIB") or DEFAULT_LIB_DIR)


def krb_auth_dir() -> Path:
    return Path(os.environ.get("DBPROXY_CASSANDRA_KRB") or DEFAULT_KRB_DIR)


def krb_auth_stamp() -> str:
    """sha256 of the authenticator's sources, the recipe of scripts/install/cassandra.sh:
    ``find … | LC_ALL=C sort | xargs sha256sum | sha256sum``."""
    files = sorted(
        "./" + str(p.relative_to(KRB_AUTH_SRC)) for p in KRB_AUTH_SRC.rglob("*")
        if p.is_file() and (p.name == "pom.xml" or p.suffix == ".java") and "target" not in p.relative_to(KRB_AUTH_SRC).parts
    )
    listing = "".join(f"{hashlib.sha256((KRB_AUTH_SRC / f).read_bytes()).hexdigest()}  {f}\n" for f in files)
    return hashlib.sha256(listing.encode()).hexdigest()


def krb_auth_jar() -> Path:
    """The built Kerberos test authenticator; CassandraStartError when missing or stale."""
    jar = krb_auth_dir() / "cassandra-krb-auth.jar"
    stamp = krb_auth_dir() / "stamp"
    if not jar.exists():
        raise CassandraStartError(f"no {jar}: run scripts/install/cassandra.sh")
    if not stamp.exists() or stamp.read_text().strip() != krb_auth_stamp():
        raise CassandraStartError(f"{jar} is older than scripts/peers/cassandra-krb-auth: run scripts/install/cassandra.sh")
    return jar


def jvm_options() -> list[str]:
    opts = []
    for line in (PEER_DIR / "jvm17-server.options").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            # "--add-opens a=b" is one line but two argv words for java.
            opts.extend(line.split())
    return opts


class CassandraStartError(RuntimeError):
    pass


@attrs.define(eq=False)
class CassandraServer(PeerProcess):
    base_dir: Path
    ssl: bool = False
    host: str = HOST
    port: int = attrs.field(factory=free_port)
    storage_port: int = attrs.field(factory=free_port)
    ssl_storage_port: int = attrs.field(factory=free_port)
    user: str = "cassandra"
    password: str = "cassandra"
    ca_file: Path | None = None
    release_version: str | None = None
    start_seconds: float | None = None
    kerberos: object = None  # scripts.peers.kdc.KdcRealm: the Kerberos test authenticator
    krb_principal: str | None = None
    krb_keytab: Path | None = None
    _proc: subprocess.Popen | None = None
    _stop_timeout = STOP_TIMEOUT
    _log_files = ("stdout_file", "log_file")

    @property
    def log_file(self) -> Path:
        return self.base_dir / "logs" / "system.log"

    @property
    def stdout_file(self) -> Path:
        return self.base_dir / "logs" / "stdout.log"

    @property
    def announce_file(self) -> Path:
        """Its content, when it exists, is the class name announced in AUTHENTICATE (kerberos nodes)."""
        return self.base_dir / "announce.txt"

    def info(self) -> dict:
        return {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "password": self.password,
            "ssl": self.ssl,
            "ca_file": str(self.ca_file) if self.ca_file else None,
            "release_version": self.release_version,
            "base_dir": str(self.base_dir),
            "log_file": str(self.log_file),
            "pid": self.pid,
            "start_seconds": self.start_seconds,
        }

    def ssl_context(self) -> ssl_module.SSLContext | None:
        """A client context that trusts this node's CA (None without ssl)."""
        if not self.ssl:
            return None
        return ssl_module.create_default_context(cafile=str(self.ca_file))

    # -- configuration -------------------------------------------------------

    def _write_config(self) -> Path:
        for sub in ("data", "commitlog", "saved_caches", "hints", "cdc_raw", "logs", "triggers"):
            (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
        client_encryption = ""
        if self.ssl:
            key_file = self._write_certs()
            client_encryption = (
                "client_encryption_options:\n"
                "  enabled: true\n"
                "  optional: false\n"
                "  require_client_auth: false\n"
                "  ssl_context_factory:\n"
                "    class_name: org.apache.cassandra.security.PEMBasedSslContextFactory\n"
                f"  keystore: {key_file}\n"
                f"  truststore: {self.ca_file}\n"
            )
        template = string.Template((PEER_DIR / "cassandra.yaml.in").read_text())
        config = self.base_dir / "cassandra.yaml"
        config.write_text(
            template.substitute(
                authenticator=KRB_AUTH_CLASS if self.kerberos is not None else "PasswordAuthenticator",
                base_dir=self.base_dir,
                native_port=self.port,
                storage_port=self.storage_port,
                ssl_storage_port=self.ssl_storage_port,
                client_encryption=client_encryption,
            )
        )
        return config

    def _write_certs(self) -> Path:
        """A CA and a server certificate for 127.0.0.1/localhost, as PEM.

        Returns the server's PEM keystore: unencrypted PKCS#8 key followed by
        the certificate chain, the layout PEMBasedSslContextFactory reads.
        """
        key_file = self.base_dir / "tls" / "server-keystore.pem"
        self.ca_file = self.base_dir / "tls" / "ca.pem"
        if key_file.exists() and self.ca_file.exists():
            return key_file
        key_file.parent.mkdir(parents=True, exist_ok=True)
        pems = make_test_certs()
        self.ca_file.write_bytes(pems["ca_cert"])
        key_file.write_bytes(pems["server_key"] + pems["server_cert"] + pems["ca_cert"])
        return key_file

    def _command(self, config: Path) -> list[str]:
        lib = lib_dir()
        jars = sorted(lib.glob("*.jar"))
        jamm = [j for j in jars if j.name.startswith("jamm-")]
        if not any(j.name.startswith("cassandra-all-") for j in jars):
            raise CassandraStartError(
                f"no cassandra-all jar in {lib}: run scripts/install/cassandra.sh"
            )
        logs = self.base_dir / "logs"
        krb: list[str] = []
        if self.kerberos is not None:
            jars.append(krb_auth_jar())
            self._kerberos_keytab()
            krb = [
                f"-Djava.security.krb5.conf={self.base_dir / 'krb5.conf'}",
                f"-Ddbproxy.krb.principal={self.krb_principal}",
                f"-Ddbproxy.krb.keytab={self.krb_keytab}",
                f"-Ddbproxy.krb.announce_file={self.announce_file}",
                # The JDK's own replay cache is in memory; nothing to configure.
            ]
        return [
            shutil.which("java") or "java",
            "-Xms512m",
            "-Xmx1g",
            "-ea",
            # jamm measures on-heap sizes (memtable accounting), as bin/cassandra does.
            *[f"-javaagent:{j}" for j in jamm[:1]],
            *jvm_options(),
            f"-Dcassandra.config=file://{config}",
            f"-Dcassandra.storagedir={self.base_dir}",
            "-Dcassandra-foreground=yes",
            f"-Dcassandra.logdir={logs}",
            f"-Dlogback.configurationFile=file://{PEER_DIR / 'logback.xml'}",
            "-Dcassandra.skip_wait_for_gossip_to_settle=0",
            "-Dcassandra.superuser_setup_delay_ms=0",
            "-Dcassandra.ring_delay_ms=1000",
            f"-Dcassandra.triggers_dir={self.base_dir / 'triggers'}",
            f"-XX:HeapDumpPath={self.base_dir}",
            f"-XX:ErrorFile={logs}/hs_err_%p.log",
            *krb,
            "-cp",
            os.pathsep.join(str(j) for j in jars),
            "org.apache.cassandra.service.CassandraDaemon",
        ]

    def _kerberos_keytab(self) -> None:
        """Principal cassandra/localhost@REALM and its keytab, exported once (a restart keeps the key)."""
        realm = self.kerberos
        shutil.copy(realm.krb5_conf, self.base_dir / "krb5.conf")
        if self.krb_keytab is None:
            self.krb_principal = realm.add_principal("cassandra/localhost", exist_ok=True)
            self.krb_keytab = realm.keytab(self.krb_principal, self.base_dir / "cassandra.keytab")

    # -- lifecycle -----------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT) -> CassandraServer:
        if self.running():
            return self
        config = self._write_config()
        command = self._command(config)
        began = time.monotonic()
        self._spawn(command, log=self.stdout_file, cwd=self.base_dir, new_session=True)
        try:
            self._wait_ready(began + timeout)
        except BaseException:
            self.kill()
            raise
        self.start_seconds = round(time.monotonic() - began, 1)
        return self

    def _wait_ready(self, deadline: float) -> None:
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise CassandraStartError(
                    f"cassandra exited with {self._proc.returncode} during start\n"
                    + self.log_tail()
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=1):
                    pass
                self.release_version = self._probe_login()
                return
            except Exception as exc:  # not up yet: port closed or role missing
                last_error = exc
            time.sleep(1)
        raise CassandraStartError(
            f"cassandra not ready on {self.host}:{self.port} within the timeout "
            f"(last error: {last_error!r})\n" + self.log_tail()
        )

    def _probe_login(self) -> str:
        from cassandra.auth import PlainTextAuthProvider
        from cassandra.cluster import Cluster

        quiet = logging.getLogger("cassandra")
        level = quiet.level
        quiet.setLevel(logging.CRITICAL)
        cluster = Cluster(
            [self.host],
            port=self.port,
            auth_provider=PlainTextAuthProvider(self.user, self.password),
            ssl_context=self.ssl_context(),
            connect_timeout=5,
            control_connection_timeout=5,
        )
        try:
            session = cluster.connect()
            row = session.execute("SELECT release_version FROM system.local").one()
            return row.release_version
        finally:
            cluster.shutdown()
            quiet.setLevel(level)


def start_cassandra(base_dir: str | os.PathLike, *, ssl: bool = False, kerberos: object = None) -> CassandraServer:
    """Start a node whose files all live under ``base_dir``; blocks until a
    cassandra/cassandra login works.  ``kerberos``: a ``KdcRealm`` — the node
    runs the Kerberos test authenticator for that realm."""
    base = Path(base_dir).resolve()
    base.mkdir(parents=True, exist_ok=True)
    return CassandraServer(base_dir=base, ssl=ssl, kerberos=kerberos).start()


def make_test_certs() -> dict[str, bytes]:
    """A throwaway CA and a server certificate for 127.0.0.1 and localhost."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dbproxy test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]
            ),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return {
        "ca_cert": ca_cert.public_bytes(pem),
        "server_cert": cert.public_bytes(pem),
        "server_key": key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    }



def main(argv: list[str]) -> int:
    use_ssl = "--ssl" in argv
    args = [a for a in argv if a != "--ssl"]
    return run_in_foreground(lambda base: start_cassandra(base, ssl=use_ssl), args[0] if args else None,
                             prefix="dbproxy-cassandra-")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
