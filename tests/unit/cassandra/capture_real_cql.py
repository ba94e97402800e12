"""Capture real Apache Cassandra 5.0 conversations into tests/data/cassandra/real_*.bin.

Run from the repository root (needs scripts/install/cassandra.sh done; takes
about a minute, most of it the node's start):

    python tests/unit/cassandra/capture_real_cql.py

It starts a throwaway node with scripts.peers.cassandra_server, talks to it
over a plain socket with this package's own encoders (so a real server also
vouches for them: a 200 KiB INSERT goes out split over segments), and writes
both directions of each conversation byte for byte.  The unit tests decode
these files; they never need a running server.  The login is the throwaway
node's default cassandra/cassandra.
"""

from __future__ import annotations

import json
import socket
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from dbproxy.sansio import NEED_DATA  # noqa: E402
from dbproxy.engines.cassandra import protocol as F  # noqa: E402
from dbproxy.engines.cassandra.codec import CqlDecoder, CqlEncoder  # noqa: E402
from scripts.peers.cassandra_server import start_cassandra  # noqa: E402
from tests.unit.cassandra.cql_testutil import DATA_DIR  # noqa: E402

BIG = 200 * 1024


class Conversation:
    def __init__(self, port: int, version: int, compression: str | None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.version = version
        self.compression = compression
        self.decoder = CqlDecoder("server")
        self.encoder = CqlEncoder()
        self.sent = bytearray()
        self.received = bytearray()
        self.stream = 0

    def send(self, opcode: int, body: bytes, *, compress: bool = True) -> int:
        self.stream += 1
        legacy = self.compression if compress and self.version < 5 else None
        frame = F.encode_frame(self.version, 0, self.stream, opcode, body, response=False, compressor=legacy)
        wire = self.encoder(frame)
        self.sock.sendall(wire)
        self.sent += wire
        return self.stream

    def reply(self, stream: int) -> F.Frame:
        while True:
            msg = self.decoder.next_message()
            if msg is not NEED_DATA:
                if msg.stream == stream:
                    return msg
                continue
            data = self.sock.recv(1 << 16)
            if not data:
                raise ConnectionError("server closed the connection")
            self.received += data
            self.decoder.feed(data)

    def handshake(self) -> None:
        self.reply(self.send(F.Opcode.OPTIONS, b""))
        options = {"CQL_VERSION": "3.0.0"}
        if self.compression:
            options["COMPRESSION"] = self.compression
        auth = self.reply(self.send(F.Opcode.STARTUP, F.startup_body(options), compress=False))
        assert auth.opcode == F.Opcode.AUTHENTICATE, auth
        if self.version >= 5:  # v5 spec 2.3.1: framing starts after READY/AUTHENTICATE
            self.decoder.set_framing("segments", self.compression)
            self.encoder.set_framing("segments", self.compression)
        else:
            self.decoder.set_framing("frames", self.compression)
        ok = self.reply(self.send(F.Opcode.AUTH_RESPONSE, F.auth_token_body(F.sasl_plain_token("cassandra", "cassandra"))))
        assert ok.opcode == F.Opcode.AUTH_SUCCESS, F.parse_error(ok)

    def query(self, text: str, *, values=(), page_size=None) -> F.Frame:
        return self.reply(self.send(F.Opcode.QUERY, F.query_body(self.version, text, F.Consistency.ONE, values=values, page_size=page_size)))

    def close(self) -> None:
        self.sock.close()


def conversation(port: int, version: int, compression: str | None, table: str) -> tuple[bytes, bytes, dict]:
    c = Conversation(port, version, compression)
    c.handshake()
    facts: dict = {}
    rows = c.query("SELECT release_version, cluster_name FROM system.local")
    facts["local_rows"] = F.parse_result(rows).rows.row_count
    c.query("CREATE KEYSPACE IF NOT EXISTS capture WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1}")
    c.query(f"CREATE TABLE IF NOT EXISTS capture.{table} (k int PRIMARY KEY, v blob)")
    blob = bytes(range(256)) * (BIG // 256)
    res = c.query(f"INSERT INTO capture.{table} (k, v) VALUES (?, ?)", values=[(1).to_bytes(4, "big"), blob])
    assert F.parse_result(res).kind == F.ResultKind.VOID, res
    res = c.query(f"SELECT k, v FROM capture.{table} WHERE k = 1")
    assert F.parse_result(res).rows.row_count == 1
    facts["big_result_frame_length"] = len(res.raw)
    prepared = c.reply(c.send(F.Opcode.PREPARE, F.pack_long_string("SELECT * FROM system.local WHERE key = ?") + (b"\x00\x00\x00\x00" if version >= 5 else b"")))
    facts["prepared_id"] = F.parse_result(prepared).prepared_id.hex()
    err = c.query("SELEKT nonsense")
    facts["syntax_error_code"] = F.parse_error(err).code
    c.query("USE capture")
    paged = c.query("SELECT keyspace_name FROM system_schema.tables", page_size=5)
    facts["paged_has_more"] = F.parse_result(paged).rows.has_more_pages
    c.close()
    return bytes(c.sent), bytes(c.received), facts


def refusal(port: int, first_frame: bytes) -> bytes:
    """Cassandra's whole answer to a bad first frame (it keeps the connection open)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(first_frame)
        data = b""
        while len(data) < 9 or len(data) < 9 + int.from_bytes(data[5:9], "big"):
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            data += chunk
        return data


def main() -> None:
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cql-capture-") as tmp:
        server = start_cassandra(tmp)
        try:
            facts = {"server_release": server.release_version}
            for version, comp, name in ((4, "lz4", "real_v4_lz4"), (4, "snappy", "real_v4_snappy"), (5, None, "real_v5_plain"), (5, "lz4", "real_v5_lz4")):
                sent, received, f = conversation(server.port, version, comp, name)
                (DATA_DIR / f"{name}.client.bin").write_bytes(sent)
                (DATA_DIR / f"{name}.server.bin").write_bytes(received)
                facts[name] = f
                print(name, len(sent), len(received), f)
            # First frames Cassandra refuses, on stream 5 to see which stream it answers on.
            # Headers are packed by hand (encode_frame would add USE_BETA to v6).  No v1/v2:
            # Cassandra 5.0 reads 9 header bytes even for them, so an 8-byte v2 OPTIONS hangs.
            firsts = {
                "v7": F.HEADER.pack(7, 0, 5, F.Opcode.OPTIONS, 0),
                "dse_v2": F.HEADER.pack(0x42, 0, 5, F.Opcode.OPTIONS, 0),
                "v6_nobeta": F.HEADER.pack(6, 0, 5, F.Opcode.OPTIONS, 0),
                "response_bit": F.HEADER.pack(0x84, 0, 5, F.Opcode.OPTIONS, 0),
                "response_opcode": F.HEADER.pack(4, 0, 5, F.Opcode.READY, 0),
                "tls_hello": bytes.fromhex("160301020001000100fc0303"),
            }
            for label, first in firsts.items():
                reply = refusal(server.port, first)
                (DATA_DIR / f"real_refusal_{label}.bin").write_bytes(reply)
                print(label, reply.hex())
            (DATA_DIR / "real_facts.json").write_text(json.dumps(facts, indent=1, sort_keys=True) + "\n")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
