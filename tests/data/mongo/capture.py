"""Regenerate the captured MongoDB wire messages in this folder.  Run by hand, not in CI.

    pip install mockupdb backports.zstd        # mockupdb: a wire-level fake server
    (cd /tmp/nodecap && npm install mongodb@6)  # the Node.js driver, for OP_QUERY hello
    NODE_PATH=/tmp/nodecap/node_modules python3 tests/data/mongo/capture.py

Every ``*.bin`` here is bytes a real driver or an independent server
implementation put on a socket, recorded by a tee between them:

* pymongo 4.x against mockupdb: OP_MSG hello, an insert whose documents
  travel as a kind-1 document sequence, a find, and mockupdb's OP_MSG reply.
* the Node.js driver against mockupdb: its legacy ``isMaster`` over OP_QUERY
  on ``admin.$cmd`` and mockupdb's OP_REPLY answer.
* pymongo with ``compressors=snappy|zlib|zstd`` against a small answering
  server (mockupdb does not speak OP_COMPRESSED): the client's OP_COMPRESSED
  requests.  Only the client side of these is saved, so the compressed
  samples never come from this project's own encoder.
"""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
import threading
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))

from dbproxy.engines.mongo import protocol as wire  # noqa: E402
from dbproxy.engines.mongo.codec import MongoDecoder  # noqa: E402
from dbproxy.sansio import NEED_DATA  # noqa: E402


class Tee:
    """Relays TCP connections to ``upstream`` and records both directions per connection."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections: list[tuple[bytearray, bytearray]] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            rec = (bytearray(), bytearray())
            self.connections.append(rec)
            threading.Thread(target=self._pump, args=(client, server, rec[0]), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, rec[1]), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, record: bytearray) -> None:
        try:
            while data := src.recv(65536):
                record += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def messages(self) -> tuple[list[wire.WireMessage], list[wire.WireMessage]]:
        requests: list[wire.WireMessage] = []
        replies: list[wire.WireMessage] = []
        for c2s, s2c in self.connections:
            for data, out in ((c2s, requests), (s2c, replies)):
                dec = MongoDecoder()
                dec.feed(bytes(data))
                while (m := dec.next_message()) is not NEED_DATA:
                    out.append(m)
        return requests, replies


def _name(msg: wire.WireMessage) -> str | None:
    cmd = wire.inspect_command(msg)
    return cmd.name if cmd else None


def save(name: str, msg: wire.WireMessage) -> None:
    (HERE / name).write_bytes(msg.raw)
    print(f"{name}: opcode {msg.op_code}, {msg.length} bytes")


HELLO_REPLY = {
    "ismaster": True,
    "isWritablePrimary": True,
    "helloOk": True,
    "maxWireVersion": 21,
    "minWireVersion": 0,
    "maxBsonObjectSize": 16777216,
    "maxMessageSizeBytes": 48000000,
    "maxWriteBatchSize": 100000,
    "connectionId": 1,
}


def capture_pymongo_and_node() -> None:
    from mockupdb import MockupDB
    from pymongo import MongoClient

    def respond(request):  # mockupdb handler: answer every command
        name = request.command_name
        if name.lower() in ("hello", "ismaster"):
            return request.ok(**{k: v for k, v in HELLO_REPLY.items()})
        if name == "insert":
            return request.ok(n=2)
        if name == "find":
            batch = [{"_id": 1, "item": "pen", "qty": 3}]
            return request.ok(cursor={"id": 0, "ns": "shop.orders", "firstBatch": batch})
        return request.ok()

    server = MockupDB()
    server.autoresponds(respond)
    port = server.run()
    tee = Tee(("127.0.0.1", port))

    client = MongoClient(f"mongodb://127.0.0.1:{tee.port}/?directConnection=true", serverSelectionTimeoutMS=5000)
    client.admin.command("ping")
    client.shop.orders.insert_many([{"_id": 1, "item": "pen", "qty": 3}, {"_id": 2, "item": "ink", "qty": 1}])
    list(client.shop.orders.find({"item": "pen"}))
    client.close()

    node = (
        "const {MongoClient} = require('mongodb');"
        f"const c = new MongoClient('mongodb://127.0.0.1:{tee.port}/?directConnection=true"
        "&serverSelectionTimeoutMS=5000');"
        "c.connect().then(() => c.db('admin').command({ping: 1})).then(() => c.close())"
        ".catch(e => { console.error(e); process.exit(1); });"
    )
    subprocess.run(["node", "-e", node], check=True, timeout=60, env=os.environ)
    time.sleep(0.5)
    server.stop()

    requests, replies = tee.messages()
    by_id = {r.response_to: r for r in replies}
    done: set[str] = set()
    for req in requests:
        name = _name(req)
        if name is None:
            continue
        if req.op_code == wire.OP_QUERY and name.lower() in ("ismaster", "hello") and "q" not in done:
            save("op_query_ismaster_node.bin", req)
            save("op_reply_ismaster_mockupdb.bin", by_id[req.request_id])
            done.add("q")
        elif req.op_code == wire.OP_MSG and name.lower() in ("ismaster", "hello") and "h" not in done:
            save("op_msg_hello_pymongo.bin", req)
            done.add("h")
        elif req.op_code == wire.OP_MSG and name == "insert" and "i" not in done:
            save("op_msg_insert_docseq_pymongo.bin", req)
            save("op_msg_reply_insert_mockupdb.bin", by_id[req.request_id])
            done.add("i")
        elif req.op_code == wire.OP_MSG and name == "find" and "f" not in done:
            save("op_msg_find_pymongo.bin", req)
            save("op_msg_reply_find_mockupdb.bin", by_id[req.request_id])
            done.add("f")
    missing = {"q", "h", "i", "f"} - done
    if missing:
        raise SystemExit(f"not captured: {missing}")


class AnsweringServer:
    """Answers hello (agreeing to the client's compressors) and any other command with ok: 1."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        dec = MongoDecoder()
        with conn:
            while data := conn.recv(65536):
                dec.feed(data)
                while (msg := dec.next_message()) is not NEED_DATA:
                    cmd = wire.inspect_command(msg)
                    if cmd.name.lower() in ("hello", "ismaster"):
                        doc = dict(HELLO_REPLY, compression=list(cmd.body.get("compression", [])), ok=1.0)
                    elif cmd.name == "insert":
                        doc = {"n": 1, "ok": 1.0}
                    else:
                        doc = {"ok": 1.0}
                    if cmd.op_code == wire.OP_QUERY:
                        conn.sendall(wire.encode_op_reply([doc], None, msg.request_id))
                    elif not cmd.more_to_come:
                        conn.sendall(wire.encode_op_msg(doc, response_to=msg.request_id))


def capture_compressed() -> None:
    from pymongo import MongoClient

    server = AnsweringServer()
    for name in ("snappy", "zlib", "zstd"):
        tee = Tee(("127.0.0.1", server.port))
        client = MongoClient(
            f"mongodb://127.0.0.1:{tee.port}/?directConnection=true&compressors={name}",
            serverSelectionTimeoutMS=5000,
        )
        client.shop.orders.insert_one({"_id": 7, "item": "pen", "note": "x" * 200})
        client.close()
        time.sleep(0.2)
        requests, _ = tee.messages()
        compressed = [
            m for m in requests
            if m.op_code == wire.OP_COMPRESSED and _name(m) == "insert"
        ]
        if not compressed or wire.compressed_header(compressed[0]).compressor_id != wire.COMPRESSOR_IDS[name]:
            raise SystemExit(f"no {name} OP_COMPRESSED insert captured")
        save(f"op_compressed_{name}_pymongo.bin", compressed[0])


if __name__ == "__main__":
    capture_pymongo_and_node()
    capture_compressed()
