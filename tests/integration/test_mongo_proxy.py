"""The Mongo engine end to end: real FerretDB 1.24 (SCRAM auth on), real pymongo and mongosh, the real proxy CLI.

Listeners of the shared proxy (one process, one FerretDB):
  main       client_auth accept + a listener password (client SCRAM works) → backend SCRAM-SHA-256
  reject     client_auth reject                                           → backend SCRAM-SHA-256
  plainonly  client_auth accept, no listener password (PLAIN only)        → backend SCRAM-SHA-1
  tls        listener TLS (the proxy's own certificate)                   → backend SCRAM-SHA-256
  down       a backend address nothing listens on
  wrongpw    the backend user with a wrong password file

Raw-socket tests build messages by hand (struct + bson) so faults are exact:
MongoDB wire protocol header, OP_MSG (flagBits, kind-0 body, CRC-32C),
OP_QUERY/OP_REPLY, OP_COMPRESSED.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import struct
import subprocess
import threading
import time
import zlib
from pathlib import Path

import bson
import crc32c
import pymongo
import pytest
from pymongo.errors import OperationFailure, PyMongoError, ServerSelectionTimeoutError

from scripts.peers import refused_port
from tests.support import ProxyProcess, read_audit, recv_exact, require_ferret, start_ferret, wait_audit, wait_until

pytestmark = pytest.mark.integration

OP_REPLY, OP_QUERY, OP_COMPRESSED, OP_MSG = 1, 2004, 2012, 2013
CHECKSUM_PRESENT = 1
LISTENER_PASSWORD = "listener-pw-" + secrets.token_hex(6)
CLIENT_PLAIN_PASSWORD = "client-plain-pw-" + secrets.token_hex(6)
WRONG_BACKEND_PASSWORD = "wrong-backend-pw-" + secrets.token_hex(6)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ferret(tmp_path_factory):
    server = start_ferret(tmp_path_factory, "ferretdb", mongosh=True)
    yield server
    server.stop()


def _route(name: str, server, secret: Path, method: str = "scram-sha-256", **backend) -> dict:
    b = {"address": f"127.0.0.1:{server.port}", "user": server.user, "auth": {"method": method, "password_file": str(secret)}}
    b.update(backend)
    return {"name": name, "backend": b}


def build_config(ferret, workdir: Path, *, extra_listeners=()) -> dict:
    from scripts.peers.certs import make_ca, make_cert

    secret = workdir / "backend.secret"
    secret.write_text(ferret.password + "\n")
    wrong = workdir / "wrong.secret"
    wrong.write_text(WRONG_BACKEND_PASSWORD + "\n")
    listener_pw = workdir / "listener.secret"
    listener_pw.write_text(LISTENER_PASSWORD + "\n")
    (workdir / "certs").mkdir(exist_ok=True)
    ca = make_ca(workdir / "certs")
    cert, key = make_cert(workdir / "certs", ca, "proxy", sans=["localhost", "127.0.0.1"])
    workdir.joinpath("ca.path").write_text(str(ca[0]))

    def listener(name, routes, **extra):
        return {"name": name, "protocol": "mongo", "listen": "127.0.0.1:0", "routes": routes, **extra}

    listeners = [
        listener("main", [_route("main", ferret, secret)], options={"client_password_file": str(listener_pw)}),
        listener("reject", [_route("reject", ferret, secret)], options={"client_auth": "reject"}),
        listener("plainonly", [_route("sha1", ferret, secret, method="scram-sha-1")], options={"client_auth": "accept"}),
        listener("tls", [_route("tls", ferret, secret)], tls={"cert_file": str(cert), "key_file": str(key)}),
        listener("down", [{"name": "down", "backend": {"address": f"127.0.0.1:{refused_port()}", "user": "x",
                                                         "auth": {"method": "scram-sha-256", "password_file": str(secret)}}}]),
        listener("wrongpw", [_route("wrongpw", ferret, wrong)]),
        *extra_listeners,
    ]
    return {"listeners": listeners, "audit": {"sinks": [{"type": "jsonl", "path": str(workdir / "audit.jsonl")}]}}


@pytest.fixture(scope="module")
def proxy(ferret, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("mongoproxy")
    proc = ProxyProcess(workdir, build_config(ferret, workdir)).start()
    proc.audit_path = workdir / "audit.jsonl"
    proc.ca_file = Path(workdir.joinpath("ca.path").read_text())
    proc.ferret = ferret
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def loaded(ferret):
    """A 20 000-document collection written directly to FerretDB (no proxy audit noise)."""
    with ferret.client() as c:
        coll = c.proxytest.loaded
        coll.drop()
        coll.insert_many([{"_id": i, "k": i % 7, "name": f"n{i}"} for i in range(20_000)])
    return "loaded"


def connect(proxy, listener: str = "main", *, app: str | None = None, **kw) -> pymongo.MongoClient:
    kw.setdefault("serverSelectionTimeoutMS", 10_000)
    return pymongo.MongoClient("127.0.0.1", proxy.port(listener), appname=app or f"t-{secrets.token_hex(4)}", **kw)


def audit_when(proxy, condition, timeout: float = 20.0) -> list[dict]:
    """All events once ``condition(events)`` holds (the drain task writes asynchronously)."""
    return wait_audit(proxy.audit_path, condition, timeout=timeout)


def app_sids(events: list[dict], app: str) -> set[str]:
    return {e["sid"] for e in events if e["event"] == "db.session.start" and e.get("application_name") == app}


def for_app(events: list[dict], app: str) -> list[dict]:
    sids = app_sids(events, app)
    return [e for e in events if e.get("sid") in sids]


def results_by_uid(events: list[dict]) -> dict[str, dict]:
    return {e["query_uid"]: e for e in events if e["event"] == "db.session.result" and e.get("query_uid")}


# --------------------------------------------------------------------------- raw wire helpers


def frame(op_code: int, body: bytes, request_id: int, response_to: int = 0) -> bytes:
    return struct.pack("<iiii", 16 + len(body), request_id, response_to, op_code) + body


def op_msg(doc: dict, request_id: int, *, checksum: bool = False, bad_checksum: bool = False) -> bytes:
    flags = CHECKSUM_PRESENT if (checksum or bad_checksum) else 0
    body = struct.pack("<I", flags) + b"\x00" + bson.encode(doc)
    if not flags:
        return frame(OP_MSG, body, request_id)
    msg = frame(OP_MSG, body + b"\x00\x00\x00\x00", request_id)
    crc = crc32c.crc32c(msg[:-4])
    if bad_checksum:
        crc ^= 0xDEADBEEF
    return msg[:-4] + struct.pack("<I", crc)


def op_query(doc: dict, request_id: int, ns: str = "admin.$cmd") -> bytes:
    return frame(OP_QUERY, struct.pack("<i", 0) + ns.encode() + b"\x00" + struct.pack("<ii", 0, -1) + bson.encode(doc), request_id)


def op_compressed(message: bytes, compressor: str) -> bytes:
    length, request_id, response_to, op_code = struct.unpack_from("<iiii", message)
    body = message[16:]
    if compressor == "snappy":
        import snappy

        data, cid = snappy.compress(body), 1
    elif compressor == "zlib":
        data, cid = zlib.compress(body), 2
    else:
        import zstandard

        data, cid = zstandard.ZstdCompressor().compress(body), 3
    return frame(OP_COMPRESSED, struct.pack("<iiB", op_code, len(body), cid) + data, request_id, response_to)


def recv_reply(sock: socket.socket) -> tuple[int, int, dict] | None:
    """(opcode, responseTo, document) of one reply; None when the proxy closed the connection."""
    header = recv_exact(sock, 16)
    if header is None:
        return None
    length, _rid, response_to, opcode = struct.unpack("<iiii", header)
    body = recv_exact(sock, length - 16)
    assert body is not None, "connection closed mid-message"
    if opcode == OP_MSG:
        flags = struct.unpack_from("<I", body)[0]
        assert body[4] == 0
        end = len(body) - 4 if flags & CHECKSUM_PRESENT else len(body)
        return opcode, response_to, bson.decode(body[5:end])
    assert opcode == OP_REPLY, opcode
    return opcode, response_to, bson.decode(body[20:])


def closed(sock: socket.socket, timeout: float = 10.0) -> bool:
    """True when the proxy closes the connection without sending anything more."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def raw_session(proxy, listener: str = "main", compression: list | None = None) -> tuple[socket.socket, dict]:
    sock = socket.create_connection(("127.0.0.1", proxy.port(listener)), timeout=15)
    hello = {"isMaster": 1, "helloOk": True, "client": {"driver": {"name": "raw-test", "version": "0"}, "application": {"name": "raw"}}}
    if compression is not None:
        hello["compression"] = compression
    sock.sendall(op_query(hello, 1))
    reply = recv_reply(sock)
    assert reply is not None and reply[0] == OP_REPLY and reply[2]["ok"] == 1.0, reply
    return sock, reply[2]


def ping(sock: socket.socket, request_id: int) -> dict:
    sock.sendall(op_msg({"ping": 1, "$db": "admin"}, request_id))
    reply = recv_reply(sock)
    assert reply is not None and reply[1] == request_id
    return reply[2]


# --------------------------------------------------------------------------- data paths


def test_insert_many_100k_uses_document_sequences(proxy):
    app = "t-insert-100k"
    docs = [{"i": i, "s": f"value-{i}"} for i in range(100_000)]
    with connect(proxy, app=app) as c:
        coll = c.proxytest.seq100k
        coll.drop()
        result = coll.insert_many(docs)
        assert len(result.inserted_ids) == 100_000
        assert coll.count_documents({}) == 100_000
        assert coll.find_one({"i": 99_999}, {"_id": 0}) == {"i": 99_999, "s": "value-99999"}
    evs = audit_when(proxy, lambda evs: sum(e.get("n", 0) for e in for_app(evs, app) if e.get("command") == "insert" and e["event"] == "db.session.result") >= 100_000)
    mine = for_app(evs, app)
    inserts = [e for e in mine if e["event"] == "db.session.query" and e["command"] == "insert"]
    assert sum(e["document_count"] for e in inserts) == 100_000
    results = results_by_uid(mine)
    for q in inserts:
        assert q["collection"] == "seq100k" and q["db_name"] == "proxytest"
        assert f"<{q['document_count']} documents in a document sequence>" in q["db_query"]
        assert "value-" not in q["db_query"]  # counted, never rendered
        assert len(q["db_query"]) < 2000
        assert results[q["uid"]]["n"] == q["document_count"] and results[q["uid"]]["success"] is True


def test_find_cursor_getmore_batches_tied_to_find(proxy, loaded):
    app = "t-find-cursor"
    with connect(proxy, app=app) as c:
        got = [d["_id"] for d in c.proxytest[loaded].find({}, batch_size=500).sort("_id", 1)]
    assert got == list(range(20_000))
    evs = audit_when(proxy, lambda evs: any(e.get("command") == "getMore" and e.get("cursor_id") == 0 for e in for_app(evs, app)))
    mine = for_app(evs, app)
    finds = [e for e in mine if e["event"] == "db.session.query" and e["command"] == "find"]
    assert len(finds) == 1 and finds[0]["collection"] == loaded and '"batchSize":500' in finds[0]["db_query"]
    find_uid = finds[0]["uid"]
    results = results_by_uid(mine)
    first = results[find_uid]
    assert first["batch_size"] == 500 and first["cursor_id"] != 0 and first["ns"] == f"proxytest.{loaded}"
    getmores = [e for e in mine if e["event"] == "db.session.query" and e["command"] == "getMore"]
    assert len(getmores) >= 39
    assert all(g["cursor_query_uid"] == find_uid and g["cursor_command"] == "find" and g["cursor_id"] == first["cursor_id"] for g in getmores)
    gm_results = [results[g["uid"]] for g in getmores]
    assert all(r["cursor_query_uid"] == find_uid and r["success"] for r in gm_results)
    assert first["batch_size"] + sum(r["batch_size"] for r in gm_results) == 20_000
    assert gm_results[-1]["cursor_id"] == 0


def test_killcursors_tied_to_its_find(proxy, loaded):
    app = "t-killcursors"
    with connect(proxy, app=app) as c:
        cursor = c.proxytest[loaded].find({}, batch_size=10)
        assert len([next(cursor) for _ in range(15)]) == 15
        cursor.close()
        assert c.proxytest[loaded].estimated_document_count() == 20_000
    evs = audit_when(proxy, lambda evs: any(e.get("command") == "killCursors" and e["event"] == "db.session.result" for e in for_app(evs, app)))
    mine = for_app(evs, app)
    find = next(e for e in mine if e["event"] == "db.session.query" and e["command"] == "find")
    kill = next(e for e in mine if e["event"] == "db.session.query" and e["command"] == "killCursors")
    assert kill["cursor_query_uids"] == [find["uid"]]
    assert results_by_uid(mine)[kill["uid"]]["success"] is True


def test_aggregate_update_delete_counts_in_audit(proxy):
    app = "t-crud"
    with connect(proxy, app=app) as c:
        coll = c.proxytest.crud
        coll.drop()
        coll.insert_many([{"k": i % 3, "v": i} for i in range(30)])
        totals = {d["_id"]: d["total"] for d in coll.aggregate([{"$match": {"v": {"$lt": 9}}}, {"$group": {"_id": "$k", "total": {"$sum": "$v"}}}])}
        assert totals == {0: 9, 1: 12, 2: 15}
        assert coll.update_many({"k": 1}, {"$set": {"tag": "one"}}).modified_count == 10
        assert coll.delete_many({"k": 0}).deleted_count == 10
        assert coll.count_documents({}) == 20
        with pytest.raises(OperationFailure):
            c.proxytest.command({"noSuchCommandXyz": 1})
    evs = audit_when(proxy, lambda evs: sum(1 for e in for_app(evs, app) if e["event"] == "db.session.result" and e.get("command") in ("update", "delete", "noSuchCommandXyz")) >= 3)
    mine = for_app(evs, app)
    results = results_by_uid(mine)
    q = {e["command"]: e for e in mine if e["event"] == "db.session.query"}
    q["aggregate"] = next(e for e in mine if e["event"] == "db.session.query" and '"total"' in e["db_query"])
    upd, dele, agg, bad = results[q["update"]["uid"]], results[q["delete"]["uid"]], results[q["aggregate"]["uid"]], results[q["noSuchCommandXyz"]["uid"]]
    assert (upd["n"], upd["nModified"], upd["affected_records"]) == (10, 10, 10)
    assert (dele["n"], dele["affected_records"]) == (10, 10)
    assert agg["batch_size"] == 3 and agg["cursor_id"] == 0 and '"$group"' in q["aggregate"]["db_query"]
    assert bad["success"] is False and bad["ok"] == 0 and bad["code"] == 59 and "noSuchCommandXyz" in bad["errmsg"]
    assert q["update"]["collection"] == "crud" and q["update"]["db_name"] == "proxytest"


def test_15mb_document_round_trip(proxy):
    app = "t-15mb"
    blob = secrets.token_hex(8) + "z" * (15 * 1024 * 1024)
    with connect(proxy, app=app) as c:
        coll = c.proxytest.big
        coll.drop()
        coll.insert_one({"_id": "big", "blob": blob})
        back = coll.find_one({"_id": "big"})
        assert back["blob"] == blob
        coll.drop()
    evs = audit_when(proxy, lambda evs: any(e.get("command") == "find" and e["event"] == "db.session.result" for e in for_app(evs, app)))
    mine = for_app(evs, app)
    ins = next(e for e in mine if e["event"] == "db.session.query" and e["command"] == "insert")
    find = next(e for e in mine if e["event"] == "db.session.query" and e["command"] == "find")
    assert ins["document_count"] == 1 and len(ins["db_query"]) < 2000
    res = results_by_uid(mine)
    assert res[ins["uid"]]["n"] == 1 and res[find["uid"]]["batch_size"] == 1


@pytest.mark.parametrize("compressor", ["snappy", "zlib", "zstd"])
def test_compressor_negotiated_client_to_proxy(proxy, compressor):
    app = f"t-compress-{compressor}"
    doc = {"_id": compressor, "text": "compress me " * 20_000, "n": list(range(1000))}
    with connect(proxy, app=app, compressors=compressor) as c:
        coll = c.proxytest.compressed
        coll.delete_many({"_id": compressor})
        coll.insert_one(doc)
        assert coll.find_one({"_id": compressor}) == doc
        coll.delete_one({"_id": compressor})
    # Two deletes run (delete_many first, delete_one last): wait for the last one's result.
    evs = audit_when(proxy, lambda evs: sum(e.get("command") == "delete" and e["event"] == "db.session.result"
                                            for e in for_app(evs, app)) >= 2)
    queries = [e for e in for_app(evs, app) if e["event"] == "db.session.query" and e["command"] in ("insert", "find", "delete")]
    assert len(queries) >= 3
    # pymongo compressed every command after the handshake: the proxy decompressed them for FerretDB.
    assert {e.get("compressor") for e in queries} == {compressor}
    evs = audit_when(proxy, lambda evs: any(e["event"] == "db.session.end" and e.get("compressed_requests") for e in for_app(evs, app)))
    end = next(e for e in for_app(evs, app) if e["event"] == "db.session.end" and e.get("compressed_requests"))
    assert end["compressor"] == compressor and end["compressed_requests"] >= 3


@pytest.mark.parametrize("compressor", ["snappy", "zlib", "zstd"])
def test_raw_hello_negotiates_and_op_compressed_is_forwarded_decompressed(proxy, compressor):
    sock, hello = raw_session(proxy, compression=["lz4", compressor, "zlib"])
    with sock:
        assert hello["compression"] == [compressor]  # the client's first supported choice; FerretDB offers none
        for key in ("hosts", "setName", "me", "primary"):
            assert key not in hello
        assert hello["maxMessageSizeBytes"] <= 48_000_000
        sock.sendall(op_compressed(op_msg({"ping": 1, "$db": "admin"}, 5), compressor))
        opcode, response_to, doc = recv_reply(sock)
        assert (opcode, response_to, doc["ok"]) == (OP_MSG, 5, 1.0)
        # A checksummed OP_MSG inside OP_COMPRESSED: the checksum covers the uncompressed message.
        sock.sendall(op_compressed(op_msg({"listDatabases": 1, "nameOnly": True, "$db": "admin"}, 6, checksum=True), compressor))
        opcode, response_to, doc = recv_reply(sock)
        assert response_to == 6 and doc["ok"] == 1.0 and isinstance(doc["databases"], list)


def test_checksummed_op_msg_is_accepted(proxy):
    sock, _ = raw_session(proxy)
    with sock:
        sock.sendall(op_msg({"ping": 1, "$db": "admin"}, 9, checksum=True))
        assert recv_reply(sock)[1:] == (9, {"ok": 1.0})


def test_hello_reply_is_rewritten_for_the_proxy(proxy):
    sock = socket.create_connection(("127.0.0.1", proxy.port("main")), timeout=15)
    with sock:
        sock.sendall(op_msg({"hello": 1, "$db": "admin", "saslSupportedMechs": "admin.anyone", "compression": ["zstd"],
                             "client": {"driver": {"name": "raw", "version": "1"}}}, 3))
        opcode, response_to, hello = recv_reply(sock)
    assert opcode == OP_MSG and response_to == 3 and hello["ok"] == 1.0
    assert hello["saslSupportedMechs"] == ["SCRAM-SHA-1", "SCRAM-SHA-256", "PLAIN"]
    assert hello["compression"] == ["zstd"]
    assert hello["maxWireVersion"] >= 9 and hello["isWritablePrimary"] is True


# --------------------------------------------------------------------------- client credentials


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-1", "DEFAULT"])
def test_client_scram_with_listener_password_connects(proxy, mechanism):
    app = f"t-cred-{mechanism}"
    kw = {} if mechanism == "DEFAULT" else {"authMechanism": mechanism}
    with connect(proxy, app=app, username="alice", password=LISTENER_PASSWORD, authSource="admin", **kw) as c:
        c.proxytest.creds.insert_one({"who": mechanism})
        assert c.proxytest.creds.count_documents({"who": mechanism}) == 1
    evs = audit_when(proxy, lambda evs: any(e.get("client_authenticated") for e in for_app(evs, app)))
    mine = for_app(evs, app)
    done = [e for e in mine if e.get("client_authenticated")]
    assert done and done[-1]["client_user"] == "alice" and done[-1]["answered_by"] == "proxy"
    expected = "SCRAM-SHA-256" if mechanism == "DEFAULT" else mechanism
    assert done[-1]["mechanism"] == expected
    # The backend never saw the client's SASL conversation: the proxy answered it.
    sasl = [e for e in mine if e["event"] == "db.session.query" and e["command"] in ("saslStart", "saslContinue")]
    assert sasl and all(e["answered_by"] == "proxy" and '"payload":"<redacted>"' in e["db_query"] for e in sasl)


def test_client_plain_credentials_accepted(proxy):
    app = "t-cred-plain"
    with connect(proxy, app=app, username="bob", password=CLIENT_PLAIN_PASSWORD, authMechanism="PLAIN") as c:
        assert c.proxytest.command("ping")["ok"] == 1.0
    evs = audit_when(proxy, lambda evs: any(e.get("client_authenticated") for e in for_app(evs, app)))
    done = [e for e in for_app(evs, app) if e.get("client_authenticated")]
    assert done[-1]["mechanism"] == "PLAIN" and done[-1]["client_user"] == "bob"


def test_client_scram_wrong_listener_password_refused(proxy):
    with connect(proxy, username="alice", password="not-the-listener-password", authMechanism="SCRAM-SHA-256") as c:
        with pytest.raises(OperationFailure) as info:
            c.proxytest.command("ping")
    assert info.value.code == 18


def test_reject_policy_refuses_credentials_but_serves_anonymous_clients(proxy):
    with connect(proxy, "reject", username="alice", password=LISTENER_PASSWORD) as c:
        with pytest.raises(OperationFailure) as info:
            c.proxytest.command("ping")
    assert info.value.code == 18
    assert "does not accept client credentials" in str(info.value)
    with connect(proxy, "reject") as c:
        assert c.proxytest.command("ping")["ok"] == 1.0


def test_plain_only_listener_explains_scram(proxy):
    with connect(proxy, "plainonly", username="carol", password="whatever") as c:
        with pytest.raises(OperationFailure) as info:
            c.proxytest.command("ping")
    assert info.value.code == 18 and "client_password_file" in str(info.value)
    with connect(proxy, "plainonly", username="carol", password=CLIENT_PLAIN_PASSWORD, authMechanism="PLAIN") as c:
        assert c.proxytest.command("ping")["ok"] == 1.0


def test_backend_scram_sha_1_route(proxy):
    app = "t-sha1-backend"
    with connect(proxy, "plainonly", app=app) as c:
        c.proxytest.sha1.insert_one({"x": 1})
        assert c.proxytest.sha1.count_documents({}) >= 1
    evs = audit_when(proxy, lambda evs: any(e["event"] == "db.session.start" for e in for_app(evs, app)))
    starts = [e for e in for_app(evs, app) if e["event"] == "db.session.start"]
    assert all(e["success"] and e["backend_auth_mechanism"] == "SCRAM-SHA-1" for e in starts)


def test_listener_tls(proxy):
    app = "t-listener-tls"
    with connect(proxy, "tls", app=app, tls=True, tlsCAFile=str(proxy.ca_file)) as c:
        assert c.proxytest.command("ping")["ok"] == 1.0
    evs = audit_when(proxy, lambda evs: any(e["event"] == "db.session.start" for e in for_app(evs, app)))
    assert all(e["client_tls"] is True for e in for_app(evs, app) if e["event"] == "db.session.start")
    with connect(proxy, "tls", serverSelectionTimeoutMS=1500) as c:  # plaintext to a TLS listener
        with pytest.raises(ServerSelectionTimeoutError):
            c.proxytest.command("ping")


def test_backend_tls_verify_full(tmp_path, proxy_factory):
    require_ferret(mongosh=True)
    from scripts.peers.ferretdb_server import start_ferretdb

    with start_ferretdb(tmp_path / "ferret-tls", tls=True) as srv:
        secret = tmp_path / "tls.secret"
        secret.write_text(srv.password + "\n")
        route = _route("tls-backend", srv, secret, tls={"mode": "verify-full", "ca_file": str(srv.ca_file), "server_name": "localhost"})
        route["backend"]["address"] = f"localhost:{srv.port}"
        config = {"listeners": [{"name": "btls", "protocol": "mongo", "listen": "127.0.0.1:0", "routes": [route]}],
                  "audit": {"sinks": [{"type": "jsonl", "path": str(tmp_path / "audit.jsonl")}]}}
        p = proxy_factory(config, name="btls")
        with pymongo.MongoClient("127.0.0.1", p.port(), serverSelectionTimeoutMS=10_000) as c:
            c.proxytest.tls.insert_one({"over": "tls"})
            assert c.proxytest.tls.find_one({}, {"_id": 0}) == {"over": "tls"}
        starts = wait_until(lambda: [e for e in read_audit(tmp_path / "audit.jsonl") if e["event"] == "db.session.start"], what="start")
        assert all(e["success"] and e["backend_tls"] is True for e in starts)


# --------------------------------------------------------------------------- mongosh


def mongosh(uri: str, script: str, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    from scripts.peers.ferretdb_server import mongosh_path

    return subprocess.run(
        [str(mongosh_path()), "--quiet", *extra, uri, "--eval", script],
        capture_output=True, text=True, timeout=180,
        env={**os.environ, "HOME": str(tmp_path), "MONGOSH_NO_TELEMETRY": "1"},
    )


MONGOSH_BASICS = """
const c = db.getSiblingDB('proxytest').mongosh_basics;
c.drop();
c.insertMany(Array.from({length: 300}, (_, i) => ({i: i, k: i % 3})));
print('FOUND=' + c.find().batchSize(40).toArray().length);
print('SUM=' + c.aggregate([{$match: {k: 1}}, {$group: {_id: null, s: {$sum: '$i'}}}]).toArray()[0].s);
print('MODIFIED=' + c.updateMany({k: 2}, {$set: {tag: 'two'}}).modifiedCount);
print('DELETED=' + c.deleteMany({k: 0}).deletedCount);
print('LEFT=' + c.countDocuments({}));
"""


def test_mongosh_basics(proxy, tmp_path):
    app = "t-mongosh-basics"
    out = mongosh(f"mongodb://127.0.0.1:{proxy.port('main')}/proxytest?appName={app}", MONGOSH_BASICS, tmp_path)
    assert out.returncode == 0, out.stderr + out.stdout
    lines = out.stdout.split()
    assert {"FOUND=300", f"SUM={sum(range(1, 300, 3))}", "MODIFIED=100", "DELETED=100", "LEFT=200"} <= set(lines), out.stdout
    evs = audit_when(proxy, lambda evs: any(e.get("command") == "count" or e.get("command") == "aggregate" and e["event"] == "db.session.result" and e.get("batch_size") == 1 for e in for_app(evs, app)) and any(e.get("command") == "delete" and e["event"] == "db.session.result" for e in for_app(evs, app)))
    mine = for_app(evs, app)
    results = results_by_uid(mine)
    q = [e for e in mine if e["event"] == "db.session.query"]
    find = next(e for e in q if e["command"] == "find" and e["collection"] == "mongosh_basics")
    getmores = [e for e in q if e["command"] == "getMore" and e.get("cursor_query_uid") == find["uid"]]
    assert len(getmores) >= 7  # 300 documents in batches of 40
    upd = next(e for e in q if e["command"] == "update")
    dele = next(e for e in q if e["command"] == "delete")
    assert results[upd["uid"]]["nModified"] == 100 and results[dele["uid"]]["n"] == 100
    ins = next(e for e in q if e["command"] == "insert")
    assert results[ins["uid"]]["n"] == 300


def test_mongosh_with_credentials(proxy, tmp_path):
    script = "print('PING=' + db.runCommand({ping: 1}).ok); print('N=' + db.getSiblingDB('proxytest').creds_sh.countDocuments({}))"
    port = proxy.port("main")
    ok = mongosh(f"mongodb://dave:{LISTENER_PASSWORD}@127.0.0.1:{port}/proxytest?authSource=admin", script, tmp_path)
    assert ok.returncode == 0, ok.stderr + ok.stdout
    assert "PING=1" in ok.stdout.split()
    plain = mongosh(f"mongodb://dave:{CLIENT_PLAIN_PASSWORD}@127.0.0.1:{port}/proxytest?authSource=admin&authMechanism=PLAIN", script, tmp_path)
    assert plain.returncode == 0 and "PING=1" in plain.stdout.split(), plain.stderr + plain.stdout
    refused = mongosh(f"mongodb://dave:{LISTENER_PASSWORD}@127.0.0.1:{proxy.port('reject')}/proxytest?authSource=admin", script, tmp_path)
    assert refused.returncode != 0
    assert "does not accept client credentials" in refused.stdout + refused.stderr
    anonymous = mongosh(f"mongodb://127.0.0.1:{proxy.port('reject')}/proxytest", script, tmp_path)
    assert anonymous.returncode == 0 and "PING=1" in anonymous.stdout.split(), anonymous.stderr


def test_mongosh_over_listener_tls_with_zlib(proxy, tmp_path):
    script = "print('PING=' + db.runCommand({ping: 1}).ok)"
    out = mongosh(f"mongodb://127.0.0.1:{proxy.port('tls')}/proxytest?compressors=zlib", script, tmp_path,
                  "--tls", "--tlsCAFile", str(proxy.ca_file))
    assert out.returncode == 0 and "PING=1" in out.stdout.split(), out.stderr + out.stdout


# --------------------------------------------------------------------------- faults


@pytest.fixture
def bystander(proxy):
    """A client with a session open through the proxy before a fault; it must keep working after."""
    c = connect(proxy, app="t-bystander")
    c.proxytest.bystander.insert_one({"before": True})
    yield c
    assert c.proxytest.bystander.count_documents({"before": True}) >= 1
    c.close()


def test_garbage_header_first_message_closes(proxy, bystander):
    with socket.create_connection(("127.0.0.1", proxy.port("main")), timeout=10) as s:
        s.sendall(struct.pack("<iiii", 64, 7, 0, 0x41414141) + b"garbage!" * 6)
        assert closed(s)
    with socket.create_connection(("127.0.0.1", proxy.port("main")), timeout=10) as s:
        s.sendall(struct.pack("<i", 5) + b"\x00" * 12)  # messageLength below the header size
        assert closed(s)
    with socket.create_connection(("127.0.0.1", proxy.port("main")), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert closed(s)


def test_garbage_mid_session_closes(proxy, bystander):
    sock, _ = raw_session(proxy)
    with sock:
        assert ping(sock, 2)["ok"] == 1.0
        sock.sendall(struct.pack("<iiii", 32, 3, 0, 999) + b"\xff" * 16)
        assert closed(sock)


def test_length_over_max_gets_ok0_then_close(proxy, bystander):
    sock, _ = raw_session(proxy)
    with sock:
        sock.sendall(struct.pack("<iiii", 64 * 1024 * 1024, 4242, 0, OP_MSG) + b"\x00" * 64)
        opcode, response_to, doc = recv_reply(sock)
        assert (opcode, response_to, doc["ok"], doc["code"]) == (OP_MSG, 4242, 0.0, 10334)
        assert "too large" in doc["errmsg"]
        assert closed(sock)
    # The same as the very first message of a connection.
    with socket.create_connection(("127.0.0.1", proxy.port("main")), timeout=10) as s:
        s.sendall(struct.pack("<iiii", 100 * 1024 * 1024, 17, 0, OP_QUERY))
        opcode, response_to, doc = recv_reply(s)
        assert (opcode, response_to, doc["ok"], doc["code"]) == (OP_REPLY, 17, 0.0, 10334)
        assert closed(s)


def test_bad_checksum_gets_ok0_then_close(proxy, bystander):
    sock, _ = raw_session(proxy)
    with sock:
        sock.sendall(op_msg({"ping": 1, "$db": "admin"}, 77, bad_checksum=True))
        opcode, response_to, doc = recv_reply(sock)
        assert (response_to, doc["ok"], doc["code"]) == (77, 0.0, 17)
        assert "checksum" in doc["errmsg"]
        assert closed(sock)


def test_malformed_bson_body_gets_ok0_then_close(proxy, bystander):
    """Framing intact, body unreadable: refused, audited, ok:0 then close (issue 13 §1; more in
    test_malformed_mongo.py)."""
    sock, _ = raw_session(proxy)
    with sock:
        body = bson.encode({"ping": 1, "$db": "admin"})
        broken = struct.pack("<i", len(body) + 40) + body[4:]  # document size runs past the message
        sock.sendall(frame(OP_MSG, struct.pack("<I", 0) + b"\x00" + broken, 31))
        opcode, response_to, doc = recv_reply(sock)
        assert (response_to, doc["ok"], doc["code"]) == (31, 0.0, 17)
        assert closed(sock)


def test_backend_down_gets_ok0(proxy, bystander):
    with socket.create_connection(("127.0.0.1", proxy.port("down")), timeout=20) as s:
        s.sendall(op_query({"isMaster": 1, "client": {"application": {"name": "t-down"}, "driver": {"name": "raw", "version": "0"}}}, 11))
        opcode, response_to, doc = recv_reply(s)
        assert (opcode, response_to, doc["ok"], doc["code"]) == (OP_REPLY, 11, 0.0, 6)
        assert "could not connect to the backend database" in doc["errmsg"]
        assert closed(s)
    with connect(proxy, "down", serverSelectionTimeoutMS=2000) as c:
        with pytest.raises(ServerSelectionTimeoutError) as info:
            c.proxytest.command("ping")
    assert "could not connect to the backend database" in str(info.value)
    evs = audit_when(proxy, lambda evs: any(e["event"] == "db.session.start" and e.get("application_name") == "t-down" for e in evs))
    start = next(e for e in evs if e["event"] == "db.session.start" and e.get("application_name") == "t-down")
    assert start["success"] is False and start["code"] == 6 and "could not connect to backend" in start["error"]


def test_wrong_backend_password_gets_ok0_code18(proxy, bystander):
    with socket.create_connection(("127.0.0.1", proxy.port("wrongpw")), timeout=20) as s:
        s.sendall(op_msg({"hello": 1, "$db": "admin", "client": {"application": {"name": "t-wrongpw"}, "driver": {"name": "raw", "version": "0"}}}, 12))
        opcode, response_to, doc = recv_reply(s)
        assert (opcode, response_to, doc["ok"], doc["code"], doc["codeName"]) == (OP_MSG, 12, 0.0, 18, "AuthenticationFailed")
        assert "authentication failed" in doc["errmsg"]
        assert closed(s)
    with connect(proxy, "wrongpw", serverSelectionTimeoutMS=2000) as c:
        with pytest.raises(ServerSelectionTimeoutError):
            c.proxytest.command("ping")
    evs = audit_when(proxy, lambda evs: any(e["event"] == "db.session.start" and e.get("application_name") == "t-wrongpw" for e in evs))
    start = next(e for e in evs if e["event"] == "db.session.start" and e.get("application_name") == "t-wrongpw")
    assert start["success"] is False and start["code"] == 18
    assert "refused the proxy's login as 'admin'" in start["error"] and "Authentication failed" in start["error"]


def test_backend_killed_mid_cursor(tmp_path, proxy_factory, ferret, bystander):
    from scripts.peers.ferretdb_server import start_ferretdb

    srv = start_ferretdb(tmp_path / "victim")
    try:
        secret = tmp_path / "victim.secret"
        secret.write_text(srv.password + "\n")
        config = {"listeners": [{"name": "victim", "protocol": "mongo", "listen": "127.0.0.1:0", "routes": [_route("victim", srv, secret)]}],
                  "audit": {"sinks": [{"type": "jsonl", "path": str(tmp_path / "audit.jsonl")}]}}
        p = proxy_factory(config, name="victim")
        with srv.client() as direct:
            direct.proxytest.victim.insert_many([{"i": i} for i in range(2000)])
        with pymongo.MongoClient("127.0.0.1", p.port(), serverSelectionTimeoutMS=3000, retryReads=False) as c:
            cursor = c.proxytest.victim.find({}, batch_size=50)
            assert [next(cursor)["i"] for _ in range(60)] == list(range(60))  # one getMore done
            srv.kill()
            with pytest.raises(PyMongoError):
                for _ in cursor:
                    pass
        # A request in flight when the backend dies gets ok:0 (HostUnreachable), not silence.
        srv.start()
        sock = socket.create_connection(("127.0.0.1", p.port()), timeout=20)
        with sock:
            sock.sendall(op_msg({"ping": 1, "$db": "admin"}, 1))
            assert recv_reply(sock)[2]["ok"] == 1.0
            os.kill(srv.pid, signal.SIGSTOP)
            sock.sendall(op_msg({"find": "victim", "filter": {}, "$db": "proxytest"}, 2))
            time.sleep(0.5)
            srv.kill()
            opcode, response_to, doc = recv_reply(sock)
            assert (response_to, doc["ok"], doc["code"]) == (2, 0.0, 6)
            assert "connection to the backend database was lost" in doc["errmsg"]
            assert closed(sock)
        assert p.proc.poll() is None
        srv.start()
        with pymongo.MongoClient("127.0.0.1", p.port(), serverSelectionTimeoutMS=10_000) as c:
            assert c.proxytest.victim.count_documents({}) == 2000
        evs = read_audit(tmp_path / "audit.jsonl")
        ends = [e for e in evs if e["event"] == "db.session.end" and e["reason"].startswith("backend")]
        assert ends
        lost = [e for e in evs if e["event"] == "db.session.result" and e.get("code") == 6 and e.get("command") == "find"]
        assert lost and lost[-1]["success"] is False
    finally:
        if srv.running():
            srv.kill()


def test_concurrent_sessions(proxy, loaded):
    errors: list[BaseException] = []
    counts: list[int] = []

    def worker(i: int) -> None:
        try:
            with connect(proxy, app=f"t-conc-{i}") as c:
                for _ in range(2):
                    counts.append(len(list(c.proxytest[loaded].find({"k": i % 7}, batch_size=300))))
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:3]
    assert len(counts) == 20 and all(n in (2857, 2858) for n in counts)


# --------------------------------------------------------------------------- the whole trail


def test_zz_audit_complete_and_free_of_secrets(proxy):
    """Runs last in this module: every command has its result; no password in any audit or log line."""
    audit_when(proxy, lambda evs: len(evs) > 0)
    time.sleep(1.0)  # let the drain task write what the last sessions queued
    evs = read_audit(proxy.audit_path)
    results = results_by_uid(evs)
    queries = [e for e in evs if e["event"] == "db.session.query"]
    missing = [e for e in queries if e["uid"] not in results]
    assert not missing, [(m["command"], m["sid"]) for m in missing[:5]]
    log_text = proxy.log_text()
    assert "Traceback" not in log_text and "internal error" not in log_text, log_text[-3000:]
    blob = proxy.audit_path.read_text() + log_text
    for secret in (proxy.ferret.password, LISTENER_PASSWORD, CLIENT_PLAIN_PASSWORD, WRONG_BACKEND_PASSWORD):
        assert secret not in blob
    assert all(e["db_protocol"] == "mongo" for e in evs if "sid" in e)  # not the proxy.start marker
