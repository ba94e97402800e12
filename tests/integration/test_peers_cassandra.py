"""The Cassandra 5.0 test peer (scripts/peers/cassandra_server.py) is real
and usable by the proxy's integration tests: cassandra-driver logs in with
PasswordAuthenticator at every native protocol version the driver speaks
(v3, v4, v5, v6-beta) with and without frame compression, cqlsh talks to it,
TLS on the native port works, and a SIGKILLed node comes back with its data.

Needs `scripts/install/cassandra.sh` to have run; without the jars the tests
skip, or fail under CI=true.
"""

from __future__ import annotations

import os
import subprocess
import uuid

import pytest
from cassandra import ProtocolVersion
from cassandra.auth import PlainTextAuthProvider
from cassandra.cluster import Cluster, NoHostAvailable
from cassandra.query import BatchStatement

from scripts.peers.cassandra_server import CassandraServer, lib_dir, start_cassandra

pytestmark = pytest.mark.integration

KEYSPACE = "peer_check"


def _require_install() -> None:
    if not any(lib_dir().glob("cassandra-all-*.jar")):
        message = f"no Cassandra jars in {lib_dir()}: run scripts/install/cassandra.sh"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def node(tmp_path_factory) -> CassandraServer:
    _require_install()
    with start_cassandra(tmp_path_factory.mktemp("cassandra")) as server:
        yield server


def _cluster(server: CassandraServer, **kwargs) -> Cluster:
    return Cluster(
        [server.host],
        port=server.port,
        auth_provider=PlainTextAuthProvider(server.user, server.password),
        ssl_context=server.ssl_context(),
        connect_timeout=10,
        **kwargs,
    )


@pytest.fixture(scope="module")
def keyspace(node) -> str:
    cluster = _cluster(node, protocol_version=4)
    try:
        session = cluster.connect()
        session.execute(
            f"CREATE KEYSPACE IF NOT EXISTS {KEYSPACE} WITH replication = "
            "{'class': 'SimpleStrategy', 'replication_factor': 1}"
        )
    finally:
        cluster.shutdown()
    return KEYSPACE


def test_node_reports_cassandra_5(node):
    assert node.release_version.startswith("5.0.")
    assert node.user == "cassandra" and node.password == "cassandra"


def test_wrong_password_is_refused(node):
    cluster = Cluster(
        [node.host],
        port=node.port,
        auth_provider=PlainTextAuthProvider("cassandra", "not-the-password"),
        protocol_version=4,
        connect_timeout=10,
    )
    try:
        with pytest.raises(NoHostAvailable) as excinfo:
            cluster.connect()
        assert "Provided username cassandra and/or password are incorrect" in str(
            excinfo.value
        )
    finally:
        cluster.shutdown()


@pytest.mark.parametrize(
    ("version", "compression"),
    [
        (3, False),
        (3, "lz4"),
        (3, "snappy"),
        (4, False),
        (4, "lz4"),
        (4, "snappy"),
        (5, False),
        (5, "lz4"),  # v5 compresses whole segments, lz4 only (spec v5 §2)
        (6, "lz4"),  # v6-beta: client sets the USE_BETA flag
    ],
)
def test_driver_round_trip(node, keyspace, version, compression):
    beta = version in ProtocolVersion.BETA_VERSIONS
    cluster = _cluster(
        node,
        protocol_version=version,
        compression=compression,
        allow_beta_protocol_version=beta,
    )
    table = f"{keyspace}.t_v{version}_{compression or 'none'}"
    try:
        session = cluster.connect()
        assert cluster.protocol_version == version
        connection = cluster.control_connection._connection
        # The driver only sets these after the server's READY/AUTHENTICATE
        # accepted the STARTUP COMPRESSION option.
        assert connection._compression_type == (compression or None)
        assert (connection.compressor is not None) == bool(compression)
        if version >= 5:
            assert connection._is_checksumming_enabled

        session.execute(
            f"CREATE TABLE IF NOT EXISTS {table} "
            "(id uuid PRIMARY KEY, name text, payload blob)"
        )
        insert = session.prepare(f"INSERT INTO {table} (id, name, payload) VALUES (?, ?, ?)")
        # Large and repetitive so compression has something to do, and above
        # one 128 KiB v5 segment so the frame spans several segments.
        payload = (b"dbproxy-" * 40_000)[:300_000]
        ids = [uuid.uuid4() for _ in range(5)]
        batch = BatchStatement()
        for i, row_id in enumerate(ids[1:]):
            batch.add(insert, (row_id, f"row{i}", b"x" * 100))
        session.execute(batch)
        session.execute(insert, (ids[0], "big", payload))

        rows = {r.id: r for r in session.execute(f"SELECT id, name, payload FROM {table}")}
        assert set(rows) == set(ids)
        assert rows[ids[0]].payload == payload
        assert sorted(rows[i].name for i in ids[1:]) == ["row0", "row1", "row2", "row3"]
    finally:
        cluster.shutdown()


def test_cqlsh_reads_release_version(node):
    result = subprocess.run(
        [
            "cqlsh", node.host, str(node.port),
            "-u", node.user, "-p", node.password,
            "-e", "select release_version from system.local",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "release_version" in result.stdout
    assert node.release_version in result.stdout
    assert " 5.0." in result.stdout


def test_tls_node_survives_sigkill(tmp_path):
    """A second, TLS-only node: cqlsh and the driver over TLS verified against
    the peer's CA, then kill -9, restart, and the row written before is back
    (commit log replay)."""
    _require_install()
    with start_cassandra(tmp_path, ssl=True) as server:
        assert server.ca_file is not None and server.ca_file.exists()
        cluster = _cluster(server, protocol_version=5)
        try:
            session = cluster.connect()
            session.execute(
                "CREATE KEYSPACE tls_check WITH replication = "
                "{'class': 'SimpleStrategy', 'replication_factor': 1}"
            )
            session.execute("CREATE TABLE tls_check.kv (k int PRIMARY KEY, v text)")
            session.execute("INSERT INTO tls_check.kv (k, v) VALUES (1, 'before kill')")
        finally:
            cluster.shutdown()

        # Plain CQL at a TLS-only port does not get in.
        plain = Cluster(
            [server.host],
            port=server.port,
            auth_provider=PlainTextAuthProvider(server.user, server.password),
            protocol_version=4,
            connect_timeout=5,
        )
        try:
            with pytest.raises(NoHostAvailable):
                plain.connect()
        finally:
            plain.shutdown()

        env = dict(os.environ, SSL_CERTFILE=str(server.ca_file), SSL_VALIDATE="true")
        result = subprocess.run(
            [
                "cqlsh", "--ssl", server.host, str(server.port),
                "-u", server.user, "-p", server.password,
                "-e", "select release_version from system.local",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        assert result.returncode == 0, result.stderr
        assert " 5.0." in result.stdout

        pid = server.pid
        server.kill()
        assert not server.running()
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)

        server.start()
        cluster = _cluster(server, protocol_version=5)
        try:
            row = cluster.connect().execute("SELECT v FROM tls_check.kv WHERE k = 1").one()
            assert row.v == "before kill"
        finally:
            cluster.shutdown()
