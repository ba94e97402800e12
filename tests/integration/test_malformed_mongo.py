"""A malformed message must not blind the audit (issue 13 §1): real FerretDB 1.24, raw wire messages.

The rule, as for every engine: a request whose header is right but whose body the audit cannot read
is refused before it is forwarded, audited as ``audit.malformed`` (type, length, first 64 bytes in
hex, truncated marker) and the session ends: ``ok: 0`` (code 17 ProtocolError) to that request, then
close.  Both audit modes are run (the worker, the default, and ``"audit": {"worker": false}``).

Each case sends, after a hello and in one TCP chunk, a valid insert (request 2), the malformed
request (3) — an insert of another document if it were read — and a third insert (4).  Checked: the
ok:0 answer to 3 and the close; the trail's malformed event after the first insert's query event;
FerretDB holds the first document only; another client keeps working.  The "nested BSON lies" case
is the path the proxy used to forward with an ``<unrenderable command>`` record.
"""

from __future__ import annotations

import struct
import uuid

import bson
import pytest

from tests.integration.test_mongo_proxy import OP_MSG, closed, connect, frame, op_msg, raw_session, recv_reply
from tests.support import ProxyProcess, jsonl_audit, password_backend, start_ferret, wait_audit

pytestmark = pytest.mark.integration

DB, COLL = "proxytest", "malformed"


@pytest.fixture(scope="module")
def ferret(tmp_path_factory):
    server = start_ferret(tmp_path_factory, "ferretdb")
    yield server
    server.stop()


@pytest.fixture(scope="module", params=[True, False], ids=["worker", "in-process"])
def proxy(request, ferret, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("mongo-malformed")
    backend = password_backend(workdir, f"127.0.0.1:{ferret.port}", ferret.user, ferret.password, "scram-sha-256")
    audit = jsonl_audit(workdir, worker=None if request.param else False)
    config = {"listeners": [{"name": "main", "protocol": "mongo", "listen": "127.0.0.1:0",
                             "options": {"client_auth": "accept"}, "routes": [{"name": "main", "backend": backend}]}],
              "audit": audit}
    proc = ProxyProcess(workdir, config).start()
    proc.audit_path = workdir / "audit.jsonl"
    yield proc
    proc.stop()


def insert(doc_id: str, request_id: int) -> bytes:
    return op_msg({"insert": COLL, "documents": [{"_id": doc_id, "s": "xy"}], "$db": DB}, request_id)


def malformed(case: str, tag: str) -> bytes:
    doc = bson.encode({"insert": COLL, "documents": [{"_id": f"bad-{tag}", "s": "xy"}], "$db": DB})
    if case == "nested-bson-lies":  # the inner string's length runs past its document; the top level is fine
        assert doc.count(b"\x02s\x00\x03\x00\x00\x00xy") == 1
        doc = doc.replace(b"\x02s\x00\x03\x00\x00\x00xy", b"\x02s\x00\x60\x00\x00\x00xy")
        return frame(OP_MSG, struct.pack("<I", 0) + b"\x00" + doc, 3)
    if case == "body-size-lies":
        return frame(OP_MSG, struct.pack("<I", 0) + b"\x00" + struct.pack("<i", len(doc) + 40) + doc[4:], 3)
    if case == "sequence-overruns":  # a kind-1 section whose document claims more than the section holds
        body = bson.encode({"insert": COLL, "$db": DB})
        inner = bson.encode({"_id": f"bad-{tag}"})
        section = b"documents\x00" + struct.pack("<i", len(inner) + 50) + inner[4:]
        return frame(OP_MSG, struct.pack("<I", 0) + b"\x00" + body + b"\x01" + struct.pack("<i", 4 + len(section)) + section, 3)
    raise AssertionError(case)


CASES = ["nested-bson-lies", "body-size-lies", "sequence-overruns"]


def ids(ferret, tag: str) -> set[str]:
    with ferret.client() as c:
        return {d["_id"] for d in c[DB][COLL].find({"_id": {"$regex": f"-{tag}$"}})}


@pytest.mark.parametrize("case", CASES)
def test_malformed_request_is_refused_audited_and_ends_the_session(proxy, ferret, case: str) -> None:
    tag = uuid.uuid4().hex[:12]
    bad = malformed(case, tag)
    sock, _ = raw_session(proxy)
    with sock:
        sock.sendall(insert(f"before-{tag}", 2) + bad + insert(f"after-{tag}", 4))
        replies = {}
        while (got := recv_reply(sock)) is not None:
            replies[got[1]] = got[2]
            if 3 in replies:
                break
        assert replies[3]["ok"] == 0.0 and replies[3]["code"] == 17, replies
        assert closed(sock)
        assert 4 not in replies

    def over(evs):
        sid = next((e["sid"] for e in evs if f"before-{tag}" in (e.get("db_query") or "")), None)
        return sid is not None and any(e["event"] == "db.session.end" and e.get("sid") == sid for e in evs)

    box = wait_audit(proxy.audit_path, over, timeout=15, what="the session's end event")
    sid = next(e["sid"] for e in box if f"before-{tag}" in (e.get("db_query") or ""))
    mine = [e for e in box if e.get("sid") == sid]
    [event] = [e for e in mine if e["event"] == "audit.malformed"]
    assert event["direction"] == "client" and event["code"] == "TAU01W" and event["success"] is False
    assert event["message_type"] == "OP_MSG" and event["message_code"] == OP_MSG
    assert event["length"] == len(bad) and event["prefix_hex"] == bad[:64].hex() and event["truncated"] is True
    order = [e["event"] for e in mine]
    assert order.index("db.session.query") < order.index("audit.malformed") < order.index("db.session.end")
    assert not any(f"after-{tag}" in (e.get("db_query") or "") or "unrenderable" in (e.get("db_query") or "")
                   for e in mine)

    assert ids(ferret, tag) == {f"before-{tag}"}  # never the malformed insert nor what followed it
    with connect(proxy) as other:  # other sessions keep working
        other[DB][COLL].insert_one({"_id": f"other-{tag}"})
    assert ids(ferret, tag) == {f"before-{tag}", f"other-{tag}"}
