"""The Mongo-wire test peer (scripts/peers/ferretdb_server.py: FerretDB
v1.24.2 on SQLite) and mongosh are real and usable by the proxy's tests.

What FerretDB 1.24 does, as these tests pin it down (the proxy's Mongo
engine relies on these answers):
- SCRAM-SHA-256 and SCRAM-SHA-1 logins work (``--test-enable-new-auth``);
  a wrong password is refused with AuthenticationFailed (18), and commands
  without a login with Unauthorized (13).
- Speculative authentication works in the OP_QUERY ``isMaster``/``hello``
  handshake (which drivers use for their first hello), and the
  conversation finishes with ``saslContinue`` on the same connection; an
  OP_MSG ``hello`` ignores ``speculativeAuthenticate``.
- No wire compression at all: ``hello`` never returns ``compression`` for
  any offered compressor, so drivers stay uncompressed; an OP_COMPRESSED
  message makes FerretDB drop the connection without a reply.  The proxy
  must do compression toward its clients only.
- maxWireVersion is 21 (≥ 9, which pymongo 4.20 needs).

Needs ``scripts/install/mongo.sh`` to have run; without the binaries the
tests skip, or fail under CI=true.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import bson
import pymongo
import pytest
import snappy
from pymongo.errors import OperationFailure, ServerSelectionTimeoutError

from scripts.peers.ferretdb_server import (
    FerretServer,
    ferretdb_path,
    mongosh_path,
    start_ferretdb,
)
from tests.support import recv_exact

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
OP_REPLY, OP_QUERY, OP_COMPRESSED, OP_MSG = 1, 2004, 2012, 2013


def _require_install() -> None:
    try:
        ferretdb_path()
        mongosh_path()
    except FileNotFoundError as exc:
        if os.environ.get("CI"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> FerretServer:
    _require_install()
    with start_ferretdb(tmp_path_factory.mktemp("ferretdb")) as srv:
        yield srv


@pytest.fixture
def client(server):
    with server.client() as c:
        yield c


# -- raw wire helpers (MongoDB wire protocol: message header, OP_MSG, OP_QUERY,
#    OP_REPLY, OP_COMPRESSED) --------------------------------------------------

def _frame(opcode: int, body: bytes, request_id: int = 1) -> bytes:
    return struct.pack("<iiii", 16 + len(body), request_id, 0, opcode) + body


def op_msg(doc: dict, request_id: int = 1) -> bytes:
    return _frame(OP_MSG, struct.pack("<I", 0) + b"\x00" + bson.encode(doc), request_id)


def op_query(doc: dict, request_id: int = 1) -> bytes:
    body = struct.pack("<i", 0) + b"admin.$cmd\x00" + struct.pack("<ii", 0, -1) + bson.encode(doc)
    return _frame(OP_QUERY, body, request_id)


def recv_reply(sock: socket.socket) -> tuple[int, dict] | None:
    """One reply as (opcode, document); None when the server closed the connection."""
    header = recv_exact(sock, 16)
    if header is None:
        return None
    length, _rid, _rto, opcode = struct.unpack("<iiii", header)
    body = recv_exact(sock, length - 16)
    assert body is not None, "connection closed mid-message"
    if opcode == OP_MSG:
        assert body[4] == 0, "expected a kind-0 section first"
        return opcode, bson.decode(body[5:])
    if opcode == OP_REPLY:
        # responseFlags i32, cursorID i64, startingFrom i32, numberReturned i32
        return opcode, bson.decode(body[20:])
    raise AssertionError(f"unexpected reply opcode {opcode}")


def roundtrip(server: FerretServer, message: bytes) -> tuple[int, dict] | None:
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(message)
        return recv_reply(sock)


CLIENT_METADATA = {"driver": {"name": "dbproxy-tests", "version": "0"}, "os": {"type": "Linux"}}


# -- handshake -----------------------------------------------------------------

def test_hello_reports_wire_version_and_scram_mechanisms(server, client):
    hello = client.admin.command("hello", saslSupportedMechs=f"admin.{server.user}")
    print("saslSupportedMechs:", hello.get("saslSupportedMechs"))
    print("maxWireVersion:", hello["maxWireVersion"], "compression:", hello.get("compression"))
    assert hello["maxWireVersion"] >= 9
    assert set(hello["saslSupportedMechs"]) == {"SCRAM-SHA-1", "SCRAM-SHA-256"}
    assert hello["isWritablePrimary"] is True


# -- authentication ------------------------------------------------------------

@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-1"])
def test_scram_login(server, mechanism):
    with pymongo.MongoClient(server.uri(mechanism=mechanism), serverSelectionTimeoutMS=5000) as c:
        status = c.admin.command("connectionStatus")
        users = status["authInfo"]["authenticatedUsers"]
        assert {"user": server.user, "db": "admin"} in users
        # listDatabases is not anonymous: it proves the session is logged in.
        c.admin.command("listDatabases", nameOnly=True)


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-1"])
def test_wrong_password_fails(server, mechanism):
    uri = server.uri(mechanism=mechanism, password="not-" + server.password)
    with pymongo.MongoClient(uri, serverSelectionTimeoutMS=5000) as c:
        with pytest.raises(OperationFailure) as info:
            c.admin.command("ping")
    assert info.value.code == 18  # AuthenticationFailed


def test_unknown_user_fails(server):
    uri = server.uri(user="nobody", password=server.password)
    with pymongo.MongoClient(uri, serverSelectionTimeoutMS=5000) as c:
        with pytest.raises(OperationFailure) as info:
            c.admin.command("ping")
    assert info.value.code == 18


def test_command_without_login_is_refused(server):
    with pymongo.MongoClient(server.host, server.port, serverSelectionTimeoutMS=5000) as c:
        assert c.admin.command("ping")["ok"] == 1.0  # handshake commands stay anonymous
        with pytest.raises(OperationFailure) as info:
            c.peer_check.items.find_one()
    assert info.value.code == 13  # Unauthorized


def test_created_user_can_log_in(server, client):
    name, password = "app_" + secrets.token_hex(4), secrets.token_urlsafe(12)
    client.admin.command("createUser", name, pwd=password, roles=[])
    try:
        with pymongo.MongoClient(
            server.uri(user=name, password=password, mechanism="SCRAM-SHA-256"),
            serverSelectionTimeoutMS=5000,
        ) as c:
            c.peer_check.items.find_one()
    finally:
        client.admin.command("dropUser", name)


def _scram_sha256_final(password: str, client_first_bare: str, server_first: str):
    """RFC 5802 §3 / RFC 7677 client-final message and the expected server signature."""
    attrs = dict(item.split("=", 1) for item in server_first.split(","))
    salted = hashlib.pbkdf2_hmac(
        "sha256", password.encode(), base64.b64decode(attrs["s"]), int(attrs["i"])
    )
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    stored_key = hashlib.sha256(client_key).digest()
    without_proof = f"c=biws,r={attrs['r']}"
    auth_message = f"{client_first_bare},{server_first},{without_proof}".encode()
    signature = hmac.digest(stored_key, auth_message, "sha256")
    proof = bytes(a ^ b for a, b in zip(client_key, signature))
    server_key = hmac.digest(salted, b"Server Key", "sha256")
    server_signature = base64.b64encode(hmac.digest(server_key, auth_message, "sha256")).decode()
    return f"{without_proof},p={base64.b64encode(proof).decode()}", server_signature


def test_speculative_auth_in_op_query_hello_completes(server):
    nonce = base64.b64encode(os.urandom(24)).decode()
    client_first_bare = f"n={server.user},r={nonce}"
    speculative = {
        "saslStart": 1,
        "mechanism": "SCRAM-SHA-256",
        "payload": bson.Binary(b"n,," + client_first_bare.encode()),
        "db": "admin",
        "options": {"skipEmptyExchange": True},
    }
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(op_query({"isMaster": 1, "client": CLIENT_METADATA,
                               "speculativeAuthenticate": speculative}))
        opcode, hello = recv_reply(sock)
        assert opcode == OP_REPLY
        step = hello["speculativeAuthenticate"]
        server_first = step["payload"].decode()
        assert server_first.startswith(f"r={nonce}") and step["done"] is False

        final, expected_v = _scram_sha256_final(server.password, client_first_bare, server_first)
        sock.sendall(op_msg({"saslContinue": 1, "conversationId": step["conversationId"],
                             "payload": bson.Binary(final.encode()), "$db": "admin"}, 2))
        _, cont = recv_reply(sock)
        assert cont["ok"] == 1.0, cont
        assert cont["payload"].decode() == f"v={expected_v}"
        request_id = 3
        while not cont["done"]:
            sock.sendall(op_msg({"saslContinue": 1, "conversationId": cont["conversationId"],
                                 "payload": bson.Binary(b""), "$db": "admin"}, request_id))
            _, cont = recv_reply(sock)
            assert cont["ok"] == 1.0, cont
            request_id += 1

        sock.sendall(op_msg({"listDatabases": 1, "nameOnly": True, "$db": "admin"}, request_id))
        _, listed = recv_reply(sock)
        assert listed["ok"] == 1.0, listed


def test_op_msg_hello_ignores_speculative_auth(server):
    speculative = {
        "saslStart": 1,
        "mechanism": "SCRAM-SHA-256",
        "payload": bson.Binary(f"n,,n={server.user},r=abcdefgh".encode()),
        "db": "admin",
    }
    opcode, hello = roundtrip(server, op_msg({"hello": 1, "$db": "admin", "client": CLIENT_METADATA,
                                              "speculativeAuthenticate": speculative}))
    assert opcode == OP_MSG and hello["ok"] == 1.0
    assert "speculativeAuthenticate" not in hello


# -- commands ------------------------------------------------------------------

def test_insert_find_aggregate(client):
    coll = client.peer_check["items_" + secrets.token_hex(4)]
    coll.insert_many([{"k": i % 3, "v": i, "name": f"n{i}"} for i in range(30)])
    assert coll.count_documents({}) == 30
    found = list(coll.find({"v": {"$gte": 25}}, {"_id": 0, "v": 1}).sort("v", -1))
    assert found == [{"v": v} for v in (29, 28, 27, 26, 25)]
    totals = {d["_id"]: d["total"] for d in coll.aggregate(
        [{"$match": {"v": {"$lt": 9}}}, {"$group": {"_id": "$k", "total": {"$sum": "$v"}}}]
    )}
    assert totals == {0: 0 + 3 + 6, 1: 1 + 4 + 7, 2: 2 + 5 + 8}
    assert coll.update_one({"v": 1}, {"$set": {"name": "one"}}).modified_count == 1
    assert coll.find_one({"v": 1})["name"] == "one"
    assert coll.delete_many({"k": 0}).deleted_count == 10
    # More than one batch: getMore over a cursor.
    assert len(list(coll.find({}, batch_size=4))) == 20
    coll.drop()


# -- compression -----------------------------------------------------------------

@pytest.mark.parametrize("compressor", ["snappy", "zlib", "zstd"])
def test_no_compressor_is_negotiated(server, compressor):
    for message in (
        op_msg({"hello": 1, "$db": "admin", "client": CLIENT_METADATA, "compression": [compressor]}),
        op_query({"isMaster": 1, "client": CLIENT_METADATA, "compression": [compressor]}),
    ):
        _, hello = roundtrip(server, message)
        assert hello["ok"] == 1.0
        assert "compression" not in hello, f"FerretDB now negotiates {compressor}: {hello}"


@pytest.mark.parametrize("compressor", ["snappy", "zlib"])
def test_driver_asking_for_compression_still_works(server, compressor):
    with pymongo.MongoClient(server.uri(compressors=compressor), serverSelectionTimeoutMS=5000) as c:
        c.peer_check.compress_probe.insert_one({"blob": "x" * 10_000})
        assert len(c.peer_check.compress_probe.find_one()["blob"]) == 10_000
        c.peer_check.compress_probe.drop()


def test_op_compressed_message_drops_connection(server):
    inner = op_msg({"hello": 1, "$db": "admin"}, 7)
    # OP_COMPRESSED: originalOpcode i32, uncompressedSize i32, compressorId u8 (1 = snappy)
    body = struct.pack("<iiB", OP_MSG, len(inner) - 16, 1) + snappy.compress(inner[16:])
    assert roundtrip(server, _frame(OP_COMPRESSED, body, 7)) is None


# -- mongosh -------------------------------------------------------------------

def test_mongosh_scram_sha_256(server):
    script = (
        "const c = db.getSiblingDB('peer_check').mongosh_probe;"
        "c.drop(); c.insertMany([{v: 20}, {v: 22}]);"
        "print('SUM=' + c.aggregate([{$group: {_id: null, s: {$sum: '$v'}}}]).toArray()[0].s);"
        "print('USER=' + db.runCommand({connectionStatus: 1}).authInfo.authenticatedUsers[0].user);"
    )
    proc = subprocess.run(
        [str(mongosh_path()), "--quiet", server.uri("admin"), "--eval", script],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "MONGOSH_NO_TELEMETRY": "1", "HOME": str(server.base_dir)},
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split()
    assert "SUM=42" in lines and f"USER={server.user}" in lines, proc.stdout


def test_mongosh_wrong_password_fails(server):
    proc = subprocess.run(
        [str(mongosh_path()), "--quiet", server.uri("admin", password="wrong"), "--eval", "print('in')"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "HOME": str(server.base_dir)},
    )
    assert proc.returncode != 0
    assert "in" not in proc.stdout.split()
    assert "Authentication failed" in proc.stdout + proc.stderr


# -- lifecycle, TLS, no-auth, runnable module ----------------------------------

def test_restart_after_kill_keeps_user_and_data(tmp_path):
    _require_install()
    with start_ferretdb(tmp_path / "f") as srv:
        with srv.client() as c:
            c.peer_check.durable.insert_one({"_id": 1, "v": "kept"})
        port, pid = srv.port, srv.pid
        # The setup password goes in through the environment: not in argv, not in the log.
        assert srv.password.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
        assert srv.password not in srv.log_file.read_text()
        srv.kill()
        assert not srv.running()
        with pytest.raises(OSError):
            socket.create_connection((srv.host, port), timeout=1).close()
        srv.start()
        assert srv.port == port and srv.pid != pid
        with srv.client() as c:
            assert c.peer_check.durable.find_one({"_id": 1})["v"] == "kept"
        srv.stop()
        srv.start()
        with srv.client() as c:
            assert c.peer_check.durable.count_documents({}) == 1


def test_tls_only_port(tmp_path):
    _require_install()
    with start_ferretdb(tmp_path / "f", tls=True) as srv:
        with srv.client() as c:  # uri() carries tls=true and the CA
            c.admin.command("listDatabases", nameOnly=True)
        with pymongo.MongoClient(
            srv.host, srv.port, username=srv.user, password=srv.password,
            serverSelectionTimeoutMS=1500,
        ) as c:
            with pytest.raises(ServerSelectionTimeoutError):
                c.admin.command("ping")


def test_mutual_tls_requires_client_cert(tmp_path):
    _require_install()
    with start_ferretdb(tmp_path / "f", mtls=True) as srv:
        with srv.client() as c:
            c.admin.command("listDatabases", nameOnly=True)
        with pymongo.MongoClient(
            srv.host, srv.port, tls=True, tlsCAFile=str(srv.ca_file),
            username=srv.user, password=srv.password, serverSelectionTimeoutMS=1500,
        ) as c:
            with pytest.raises(ServerSelectionTimeoutError):
                c.admin.command("ping")


def test_no_auth_mode(tmp_path):
    _require_install()
    with start_ferretdb(tmp_path / "f", auth=False) as srv:
        assert "@" not in srv.uri()
        with pymongo.MongoClient(srv.uri(), serverSelectionTimeoutMS=5000) as c:
            c.peer_check.items.insert_one({"v": 1})
            assert c.peer_check.items.count_documents({}) == 1


def test_runnable_module_prints_info_and_stops_on_sigterm(tmp_path):
    _require_install()
    proc = subprocess.Popen(
        [sys.executable, "-m", "scripts.peers.ferretdb_server", str(tmp_path / "f")],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            lines.append(line)
            if line.startswith("}"):
                break
        info = json.loads("".join(lines))
        with pymongo.MongoClient(info["uri"], serverSelectionTimeoutMS=5000) as c:
            c.admin.command("listDatabases", nameOnly=True)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        with pytest.raises(OSError):
            socket.create_connection((info["host"], info["port"]), timeout=1).close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
