"""Real Apache Cassandra 5.0.9 bytes (tests/data/cassandra/real_*), captured by capture_real_cql.py.

Each conversation is both directions of one connection: OPTIONS/SUPPORTED
and STARTUP/AUTHENTICATE unframed, then (v5) LZ4 or plain segments or (v4)
per-frame LZ4/Snappy, a login, DDL, a 200 KiB INSERT and SELECT (split over
segments in v5, both ways), PREPARE, a syntax error, USE and a paged SELECT.
The client side was written by this package's encoders and accepted by the
server; the server side is Cassandra's own.
"""

from __future__ import annotations

import json

import pytest

from tests.unit.cassandra.cql_testutil import DATA_DIR, vector
from dbproxy.sansio import NEED_DATA
from dbproxy.engines.cassandra import protocol as F
from dbproxy.engines.cassandra import segments as S
from dbproxy.engines.cassandra.codec import CqlDecoder

FACTS = json.loads((DATA_DIR / "real_facts.json").read_text())
CONVERSATIONS = [("real_v4_lz4", 4, "lz4"), ("real_v4_snappy", 4, "snappy"), ("real_v5_plain", 5, None), ("real_v5_lz4", 5, "lz4")]
CLIENT_OPCODES = [F.Opcode.OPTIONS, F.Opcode.STARTUP, F.Opcode.AUTH_RESPONSE] + [F.Opcode.QUERY] * 5 + [F.Opcode.PREPARE] + [
    F.Opcode.QUERY
] * 3


def read_side(data: bytes, direction: str, version: int, compression: str | None, chunk: int | None = None) -> list[F.Frame]:
    """Decode one direction, switching framing as an engine does.

    v3/v4: Cassandra already compresses its answer to STARTUP, so the server
    side knows the compression from the client's STARTUP on (set up front
    here).  v5: both sides switch to segments after STARTUP / AUTHENTICATE.
    """
    d = CqlDecoder(direction)
    if direction == "server" and version < 5:
        d.set_framing("frames", compression)
    switch_after = F.Opcode.STARTUP if direction == "client" else F.Opcode.AUTHENTICATE
    out: list[F.Frame] = []
    step = chunk or len(data)
    d.buffer.mark()
    for i in range(0, len(data), step):
        d.feed(data[i:i + step])
        while (msg := d.next_message()) is not NEED_DATA:
            out.append(msg)
            if msg.opcode == switch_after:
                d.set_framing("segments" if version >= 5 else "frames", compression)
    assert d.buffer.consumed_since_mark() == data  # every byte belongs to a returned message
    return out


@pytest.mark.parametrize("name,version,compression", CONVERSATIONS)
def test_client_side(name, version, compression):
    frames = read_side(vector(f"{name}.client.bin"), "client", version, compression)
    assert [f.opcode for f in frames] == CLIENT_OPCODES
    assert {f.version for f in frames} == {version}
    assert F.parse_startup(frames[1]) == ({"CQL_VERSION": "3.0.0", "COMPRESSION": compression} if compression else {"CQL_VERSION": "3.0.0"})
    assert F.parse_auth_response(frames[2]) == b"\x00cassandra\x00cassandra"
    insert = F.parse_query(frames[6])
    assert insert.query.startswith("INSERT INTO capture.") and len(insert.params.values[1]) == 200 * 1024
    assert F.parse_query(frames[11]).params.page_size == 5


@pytest.mark.parametrize("name,version,compression", CONVERSATIONS)
def test_server_side(name, version, compression):
    facts = FACTS[name]
    frames = read_side(vector(f"{name}.server.bin"), "server", version, compression)
    assert [f.opcode for f in frames] == [
        F.Opcode.SUPPORTED, F.Opcode.AUTHENTICATE, F.Opcode.AUTH_SUCCESS, *[F.Opcode.RESULT] * 6, F.Opcode.ERROR, *[F.Opcode.RESULT] * 2
    ]
    supported = F.parse_supported(frames[0])
    assert supported["PROTOCOL_VERSIONS"] == ["3/v3", "4/v4", "5/v5", "6/v6-beta"]
    assert {"lz4", "snappy"} <= set(supported["COMPRESSION"])
    assert F.parse_authenticate(frames[1]) == "org.apache.cassandra.auth.PasswordAuthenticator"
    assert F.parse_auth_token(frames[2]) is None
    local = F.parse_result(frames[3]).rows
    assert local.row_count == facts["local_rows"] == 1
    assert [c.name for c in local.columns] == ["release_version", "cluster_name"]
    assert F.parse_result(frames[6]).kind == F.ResultKind.VOID  # the INSERT
    big = F.parse_result(frames[7])
    assert len(frames[7].raw) == facts["big_result_frame_length"]
    assert big.rows.row_count == 1 and [c.type_id for c in big.rows.columns] == [0x09, 0x03]
    assert len(frames[7].body()) > 200 * 1024
    assert F.parse_result(frames[8]).prepared_id.hex() == facts["prepared_id"]
    err = F.parse_error(frames[9])
    assert err.code == F.ErrorCode.SYNTAX_ERROR == facts["syntax_error_code"]
    assert F.parse_result(frames[10]) == F.Result(F.ResultKind.SET_KEYSPACE, keyspace="capture")
    paged = F.parse_result(frames[11]).rows
    assert paged.has_more_pages and paged.paging_state and paged.row_count == 5
    if version < 5:
        # Cassandra compresses v4 bodies once STARTUP asked for it, its answer to STARTUP included
        assert not frames[0].compressed and frames[1].compressed and frames[7].compressed


@pytest.mark.parametrize("name,version,compression", CONVERSATIONS)
def test_small_reads(name, version, compression):
    for side, direction in (("client", "client"), ("server", "server")):
        data = vector(f"{name}.{side}.bin")
        whole = read_side(data, direction, version, compression)
        assert read_side(data, direction, version, compression, chunk=997) == whole
        if len(data) < 20_000:
            assert read_side(data, direction, version, compression, chunk=1) == whole


def _segments_after_handshake(data: bytes, compressed: bool) -> list[tuple[S.SegmentHeader, bytes]]:
    pos = 0
    for _ in range(2):  # SUPPORTED, AUTHENTICATE: unframed
        pos += 9 + int.from_bytes(data[pos + 5:pos + 9], "big")
    out = []
    while pos < len(data):
        header = S.parse_segment_header(data[pos:], compressed)
        out.append((header, data[pos:pos + header.total_size]))
        pos += header.total_size
    return out


@pytest.mark.parametrize("name,compressed", [("real_v5_plain", False), ("real_v5_lz4", True)])
def test_cassandra_segments_and_ours(name, compressed):
    segments = _segments_after_handshake(vector(f"{name}.server.bin"), compressed)
    split = [h for h, _ in segments if not h.self_contained]
    assert len(split) == 2  # the 200 KiB Rows result
    for header, wire in segments:
        payload = S.decode_payload(wire, header)
        ours = S.encode_segment(payload, self_contained=header.self_contained, compress=compressed)
        if compressed:
            # lz4-java and liblz4 may pick different matches: same payload, not the same bytes
            ours_header = S.parse_segment_header(ours, True)
            assert S.decode_payload(ours, ours_header) == payload
            assert ours_header.self_contained == header.self_contained
            assert bool(ours_header.uncompressed_length) == bool(header.uncompressed_length)
        else:
            assert ours == wire


@pytest.mark.parametrize(
    "label,expected_exc",
    [("v7", F.UnsupportedProtocolVersion), ("dse_v2", F.UnsupportedProtocolVersion), ("tls_hello", F.UnsupportedProtocolVersion),
     ("v6_nobeta", F.CqlProtocolError), ("response_bit", F.CqlProtocolError), ("response_opcode", F.CqlProtocolError)],
)
def test_refusals_match_cassandra(label, expected_exc):
    firsts = {
        "v7": F.HEADER.pack(7, 0, 5, F.Opcode.OPTIONS, 0),
        "dse_v2": F.HEADER.pack(0x42, 0, 5, F.Opcode.OPTIONS, 0),
        "v6_nobeta": F.HEADER.pack(6, 0, 5, F.Opcode.OPTIONS, 0),
        "response_bit": F.HEADER.pack(0x84, 0, 5, F.Opcode.OPTIONS, 0),
        "response_opcode": F.HEADER.pack(4, 0, 5, F.Opcode.READY, 0),
        "tls_hello": bytes.fromhex("160301020001000100fc0303"),
    }
    real = vector(f"real_refusal_{label}.bin")
    d = CqlDecoder("client")
    d.feed(firsts[label])
    with pytest.raises(expected_exc) as info:
        d.next_message()
    exc = info.value
    if label.startswith("response_"):
        # Cassandra answers a bad first header in its current version, not the client's
        assert F.protocol_error_reply(exc, version=F.CURRENT_VERSION) == real
    else:
        assert F.protocol_error_reply(exc) == real
