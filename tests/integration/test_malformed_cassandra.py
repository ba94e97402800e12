"""A malformed message must not blind the audit (issue 13 §1): a real Cassandra 5.0 node, raw CQL frames.

The rule, as for every engine: a request whose frame header is right but whose body does not parse is
refused before it is forwarded, audited as ``audit.malformed`` (type, length, first 64 bytes in hex,
truncated marker), and the session ends with ERROR PROTOCOL_ERROR (0x000A) on the offending stream.
Both audit modes (the audit worker, the default, and ``"audit": {"worker": false}``) are run; CQL
sessions run their audit stages in the proxy either way, so the two must write the same.

Each case sends, after a real SASL login and in one TCP chunk, a valid INSERT (stream 3), the malformed
request (stream 7) and another INSERT (stream 9).  Checked: PROTOCOL_ERROR on stream 7, then the
connection closes; the trail holds the malformed event with the frame's hex prefix after the first
INSERT's query event; the node has the first row and none of the others; another session works.
"""

from __future__ import annotations

import struct
import uuid

import pytest

from dbproxy.engines.cassandra import protocol as F
from tests.integration.test_cassandra_proxy import RawCql, node  # noqa: F401  (node: the module's own Cassandra)
from tests.support import (
    ProxyProcess,
    cassandra_direct,
    cql_keyspace,
    jsonl_audit,
    password_backend,
    read_audit,
    wait_until,
)

pytestmark = pytest.mark.integration

KS = "malformed_ks"


@pytest.fixture(scope="module")
def direct(node):
    c, session = cassandra_direct(node, cql_keyspace(KS), f"CREATE TABLE IF NOT EXISTS {KS}.t (k text, v text, PRIMARY KEY (k, v))")
    yield session
    c.shutdown()


@pytest.fixture(scope="module", params=[True, False], ids=["worker", "in-process"])
def proxy(request, node, direct, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("cql-malformed")
    backend = password_backend(workdir, f"{node.host}:{node.port}", node.user, node.password, "password")
    audit = jsonl_audit(workdir, worker=None if request.param else False)
    config = {"listeners": [{"name": "cql", "protocol": "cassandra", "listen": "127.0.0.1:0",
                             "routes": [{"name": "app", "backend": backend}]}], "audit": audit}
    proc = ProxyProcess(workdir, config).start()
    proc.audit_path = workdir / "audit.jsonl"
    yield proc
    proc.stop()


def insert(tag: str, value: str) -> str:
    return f"INSERT INTO {KS}.t (k, v) VALUES ('{tag}', '{value}')"


def long_string(s: str) -> bytes:
    b = s.encode()
    return struct.pack(">i", len(b)) + b


def flags(version: int, value: int) -> bytes:
    return struct.pack(">I", value) if version >= 5 else bytes((value,))


def malformed(case: str, version: int, tag: str) -> tuple[int, bytes]:
    bad = insert(tag, "bad")
    if case == "query-long-string-overruns":  # announces 500 bytes of CQL, holds fewer
        return F.Opcode.QUERY, struct.pack(">i", 500) + bad.encode()
    if case == "query-value-length-invalid":  # [value] length -7 (only -1 and -2 are defined, v4 §3)
        cql = f"INSERT INTO {KS}.t (k, v) VALUES ('{tag}', ?)"
        return F.Opcode.QUERY, long_string(cql) + struct.pack(">H", 1) + flags(version, F.QF_VALUES) + struct.pack(">hi", 1, -7)
    if case == "execute-id-length-overruns":
        return F.Opcode.EXECUTE, struct.pack(">H", 300) + b"an id shorter than announced"
    if case == "batch-child-count-overruns":  # says 3 children, holds 1
        return F.Opcode.BATCH, bytes([1]) + struct.pack(">H", 3) + bytes([0]) + long_string(bad) + struct.pack(">H", 0)
    if case == "prepare-garbage":
        return F.Opcode.PREPARE, b"\x7f\xff\xff\xff" + bad.encode()
    raise AssertionError(case)


CASES = ["query-long-string-overruns", "query-value-length-invalid", "execute-id-length-overruns",
         "batch-child-count-overruns", "prepare-garbage"]


def rows(direct, tag: str) -> set[str]:
    return {r.v for r in direct.execute(f"SELECT v FROM {KS}.t WHERE k = %s", (tag,))}


@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize("case", CASES)
def test_malformed_request_is_refused_audited_and_ends_the_session(proxy, direct, case: str, version: int) -> None:
    tag = uuid.uuid4().hex[:12]
    opcode, body = malformed(case, version, tag)
    bad = F.encode_frame(version, 0, 7, opcode, body, response=False)
    raw = RawCql(proxy.port(), version=version)
    raw.login()
    raw.send(F.encode_frame(version, 0, 3, F.Opcode.QUERY, F.query_body(version, insert(tag, "before")), response=False)
             + bad
             + F.encode_frame(version, 0, 9, F.Opcode.QUERY, F.query_body(version, insert(tag, "after")), response=False))
    frames = raw.frames_until_close()  # returns once the proxy has closed the connection
    raw.close()
    errors = [f for f in frames if f.opcode == F.Opcode.ERROR]
    assert [f.stream for f in errors] == [7], frames
    assert F.parse_error(errors[0]).code == F.ErrorCode.PROTOCOL_ERROR
    assert not any(f.stream == 9 for f in frames)

    def session_over(evs):
        sid = next((e["sid"] for e in evs if insert(tag, "before") == e.get("db_query")), None)
        return sid is not None and any(e["event"] == "db.session.end" and e.get("sid") == sid for e in evs)

    box: list = []
    wait_until(lambda: session_over(box.__setitem__(slice(None), read_audit(proxy.audit_path)) or box) or None,
               timeout=15, what="the session's end event")
    sid = next(e["sid"] for e in box if insert(tag, "before") == e.get("db_query"))
    mine = [e for e in box if e.get("sid") == sid]
    [event] = [e for e in mine if e["event"] == "audit.malformed"]
    assert event["direction"] == "client" and event["code"] == "TAU01W" and event["success"] is False
    assert event["message_type"] == F.Opcode(opcode).name and event["message_code"] == opcode
    assert event["length"] == len(bad) and event["prefix_hex"] == bad[:64].hex()
    assert event["truncated"] is (len(bad) > 64)
    order = [e["event"] for e in mine]
    assert order.index("db.session.query") < order.index("audit.malformed") < order.index("db.session.end")
    assert not any("after" in (e.get("db_query") or "") or "<malformed" in (e.get("db_query") or "") for e in mine)

    assert rows(direct, tag) == {"before"}  # executed: the INSERT before it; never the bad one or what follows
    other = RawCql(proxy.port(), version=4)  # other sessions keep working
    other.login()
    assert other.query(insert(tag, "other")).opcode == F.Opcode.RESULT
    other.close()
    assert rows(direct, tag) == {"before", "other"}
