"""A real single-node Apache Kafka 4.1 in KRaft mode as a test peer.

Strategy: no tarball and no launch scripts.  ``scripts/install/kafka.sh`` puts
``kafka_2.13`` and its runtime dependencies from Maven Central into one lib
dir; this module writes a ``server.properties`` into a private base dir — one
node that is both broker and KRaft controller (``process.roles=broker,controller``,
a static one-voter quorum ``controller.quorum.voters=1@127.0.0.1:<controller port>``),
a PLAINTEXT listener and a CONTROLLER listener on free loopback ports, every
internal topic with replication factor 1, ``log.dirs`` under the base dir —
formats the storage once (``kafka.tools.StorageTool format -t <cluster id> -c
server.properties``: the 4.x storage tool, the ``kafka-storage.sh format`` of the
distribution), and runs ``java … kafka.Kafka server.properties`` as a child.

The JVM is kept small for shared 2-core machines: 512 MiB heap, serial GC,
C1 only (``-XX:TieredStopAtLevel=1``: a test broker's start time is JIT-bound).

The node is ready when a real client (confluent-kafka's AdminClient) gets
cluster metadata naming the broker: the port opens before the node has
registered with its controller.

``start()`` after ``stop()`` or ``kill()`` restarts the same node on the same
ports and data (no second format: the meta.properties written by the first
one stays).

``sasl_ssl=True`` adds a SASL_SSL listener (``sasl_port``): TLS with a
throwaway CA and a server certificate for 127.0.0.1/localhost as a PEM
keystore (``ssl.keystore.type=PEM``, Kafka ≥ 2.7), SASL PLAIN with the users
of ``sasl_users`` in the listener's JAAS config (``user_<name>="<password>"``,
Kafka's PlainLoginModule).  Inter-broker traffic stays on PLAINTEXT.

Run ``python -m scripts.peers.kafka_server [BASE_DIR] [--sasl-ssl]`` to start one by hand:
it prints its connection info as JSON and runs until Ctrl-C.
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import attrs

from scripts.peers import free_port
from scripts.peers.process import PeerProcess, run_in_foreground

PEER_DIR = Path(__file__).resolve().parent / "kafka"
DEFAULT_LIB_DIR = Path.home() / ".cache" / "dbproxy" / "kafka" / "lib"
START_TIMEOUT = 120.0
STOP_TIMEOUT = 60.0
HOST = "127.0.0.1"
NODE_ID = 1



def lib_dir() -> Path:
    return Path(os.environ.get("DBPROXY_KAFKA_LIB") or DEFAULT_LIB_DIR)


def installed() -> bool:
    return any(lib_dir().glob("kafka_2.13-*.jar"))


def random_cluster_id() -> str:
    # Kafka's Uuid.toString(): 16 random bytes, URL-safe base64 without padding (what
    # `kafka-storage.sh random-uuid` prints).  Like Kafka's Uuid.randomUuid, never one that
    # starts with "-": `kafka-storage format -t -…` takes it for an option and fails
    # (one start in 64 did, in a CI run).
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):
            return cluster_id


class KafkaStartError(RuntimeError):
    pass


@attrs.define(eq=False)
class KafkaServer(PeerProcess):
    base_dir: Path
    host: str = HOST
    port: int = attrs.field(factory=free_port)
    controller_port: int = attrs.field(factory=free_port)
    cluster_id: str = attrs.field(factory=random_cluster_id)
    sasl_ssl: bool = False
    sasl_port: int = attrs.field(factory=free_port)
    sasl_users: dict = attrs.field(factory=lambda: {"audit": "audit-secret-" + uuid.uuid4().hex[:8]})
    ca_file: Path | None = None
    start_seconds: float | None = None
    _proc: subprocess.Popen | None = None
    _stop_timeout = STOP_TIMEOUT
    _log_files = ("stdout_file",)

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    @property
    def stdout_file(self) -> Path:
        return self.base_dir / "logs" / "stdout.log"

    def info(self) -> dict:
        return {
            "bootstrap_servers": self.bootstrap_servers,
            "sasl_bootstrap_servers": self.sasl_bootstrap_servers if self.sasl_ssl else None,
            "ca_file": str(self.ca_file) if self.ca_file else None,
            "controller_port": self.controller_port,
            "cluster_id": self.cluster_id,
            "base_dir": str(self.base_dir),
            "log_file": str(self.stdout_file),
            "pid": self.pid,
            "start_seconds": self.start_seconds,
        }

    # -- configuration -------------------------------------------------------

    @property
    def sasl_bootstrap_servers(self) -> str:
        return f"{self.host}:{self.sasl_port}"

    def _sasl_ssl_lines(self) -> list[str]:
        from scripts.peers.cassandra_server import make_test_certs

        tls = self.base_dir / "tls"
        keystore, self.ca_file = tls / "server-keystore.pem", tls / "ca.pem"
        if not keystore.exists():
            tls.mkdir(parents=True, exist_ok=True)
            pems = make_test_certs()
            self.ca_file.write_bytes(pems["ca_cert"])
            keystore.write_bytes(pems["server_key"] + pems["server_cert"] + pems["ca_cert"])
        users = " ".join(f'user_{name}="{password}"' for name, password in self.sasl_users.items())
        return [
            "sasl.enabled.mechanisms=PLAIN",
            "listener.name.sasl_ssl.ssl.keystore.type=PEM",
            f"listener.name.sasl_ssl.ssl.keystore.location={keystore}",
            "listener.name.sasl_ssl.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule "
            f"required {users};",
        ]

    def _write_config(self) -> Path:
        (self.base_dir / "logs").mkdir(parents=True, exist_ok=True)
        config = self.base_dir / "server.properties"
        listeners = [f"PLAINTEXT://{self.host}:{self.port}"]
        protocols = "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
        if self.sasl_ssl:
            listeners.append(f"SASL_SSL://{self.host}:{self.sasl_port}")
            protocols += ",SASL_SSL:SASL_SSL"
        config.write_text("\n".join([
            "process.roles=broker,controller",
            f"node.id={NODE_ID}",
            # A static quorum of one voter (this node): formatted without --standalone.
            f"controller.quorum.voters={NODE_ID}@{self.host}:{self.controller_port}",
            f"listeners={','.join(listeners)},CONTROLLER://{self.host}:{self.controller_port}",
            f"advertised.listeners={','.join(listeners)}",
            "controller.listener.names=CONTROLLER",
            "inter.broker.listener.name=PLAINTEXT",
            f"listener.security.protocol.map={protocols}",
            *(self._sasl_ssl_lines() if self.sasl_ssl else []),
            f"log.dirs={self.data_dir}",
            f"metadata.log.dir={self.base_dir / 'metadata'}",
            "num.partitions=1",
            "offsets.topic.replication.factor=1",
            "offsets.topic.num.partitions=1",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "share.coordinator.state.topic.replication.factor=1",
            "share.coordinator.state.topic.min.isr=1",
            "group.initial.rebalance.delay.ms=0",
            "auto.create.topics.enable=false",
            "num.network.threads=2",
            "num.io.threads=2",
            "background.threads=2",
            "log.cleaner.enable=false",
            "",
        ]))
        return config

    def _classpath(self) -> str:
        lib = lib_dir()
        if not any(lib.glob("kafka_2.13-*.jar")):
            raise KafkaStartError(f"no kafka_2.13 jar in {lib}: run scripts/install/kafka.sh")
        return os.pathsep.join(str(j) for j in sorted(lib.glob("*.jar")))

    def _java(self, main: str, *args: str, heap: str = "512m") -> list[str]:
        return [
            shutil.which("java") or "java",
            f"-Xmx{heap}",
            "-Xms128m",
            "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1",
            "-Djava.awt.headless=true",
            f"-XX:ErrorFile={self.base_dir / 'logs'}/hs_err_%p.log",
            "-cp",
            self._classpath(),
            main,
            *args,
        ]

    def _format(self, config: Path) -> None:
        """Format the log dirs once (a node restarted on its data keeps its meta.properties)."""
        if (self.base_dir / "metadata" / "meta.properties").exists():
            return
        out = subprocess.run(
            self._java("kafka.tools.StorageTool", "format", "-t", self.cluster_id, "-c", str(config), heap="256m"),
            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
        )
        if out.returncode != 0:
            raise KafkaStartError(f"kafka storage format failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")

    # -- lifecycle -----------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT) -> KafkaServer:
        if self.running():
            return self
        config = self._write_config()
        began = time.monotonic()
        self._format(config)
        self._spawn(self._java("kafka.Kafka", str(config)), log=self.stdout_file, cwd=self.base_dir, new_session=True)
        try:
            self._wait_ready(began + timeout)
        except BaseException:
            self.kill()
            raise
        self.start_seconds = round(time.monotonic() - began, 1)
        return self

    def admin(self):
        from confluent_kafka.admin import AdminClient

        return AdminClient({"bootstrap.servers": self.bootstrap_servers, "log_level": 0})

    def _wait_ready(self, deadline: float) -> None:
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise KafkaStartError(f"kafka exited with {self._proc.returncode} during start\n" + self.log_tail())
            try:
                with socket.create_connection((self.host, self.port), timeout=1):
                    pass
                md = self.admin().list_topics(timeout=5)
                if NODE_ID in md.brokers:
                    return
                last_error = KafkaStartError(f"metadata names no broker {NODE_ID} yet: {md.brokers}")
            except Exception as exc:  # not up yet
                last_error = exc
            time.sleep(0.5)
        raise KafkaStartError(
            f"kafka not ready on {self.bootstrap_servers} within the timeout (last error: {last_error!r})\n" + self.log_tail()
        )

    def create_topic(self, name: str, partitions: int = 1, timeout: float = 30.0) -> None:
        from confluent_kafka.admin import NewTopic

        admin = self.admin()  # kept referenced until the result is in (its destruction fails the future)
        futures = admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)],
                                      operation_timeout=timeout, request_timeout=timeout)
        futures[name].result(timeout)


def start_kafka(base_dir: str | os.PathLike, *, sasl_ssl: bool = False) -> KafkaServer:
    """Start a node whose files all live under ``base_dir``; blocks until its metadata names it.
    ``sasl_ssl``: also a SASL_SSL listener (PLAIN users ``sasl_users``, CA in ``ca_file``)."""
    base = Path(base_dir).resolve()
    base.mkdir(parents=True, exist_ok=True)
    return KafkaServer(base_dir=base, sasl_ssl=sasl_ssl).start()



def main(argv: list[str]) -> int:
    sasl_ssl = "--sasl-ssl" in argv
    argv = [a for a in argv if a != "--sasl-ssl"]
    return run_in_foreground(lambda base: start_kafka(base, sasl_ssl=sasl_ssl), argv[0] if argv else None,
                             prefix="dbproxy-kafka-")


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
