"""Mongo engine stages, client auth and config rules, without sockets.

The stages get real wire bytes (encoded with pymongo's ``bson`` by the wire
module) and a recording stand-in for the session audit; every verdict is
checked byte for byte or by decoding what would be sent.  Client SCRAM is run
against the proxy's answers with the project's ``ScramClient`` (which checks
the server signature the way drivers do).
"""

from __future__ import annotations

import datetime
import json
import os
import re
import uuid

import bson
import pytest
from bson import Binary, Decimal128, Int64, MaxKey, MinKey, ObjectId, Regex, Timestamp
from bson.raw_bson import RawBSONDocument

from dbproxy.audit import events as ev
from dbproxy.config import load_config
from dbproxy.errors import ConfigErrors, FrameTooLarge, MalformedMessage
from dbproxy.engines import default_registry
from dbproxy.engines.mongo import protocol as wire
from dbproxy.engines.mongo import scram
from dbproxy.engines.mongo.clientauth import NO_PASSWORD_MESSAGE, REJECT_MESSAGE, ClientAuthPolicy
from dbproxy.engines.mongo.codec import MongoDecoder
from dbproxy.engines.mongo.errors import AttributingDecoder, client_protocol_error_reply
from dbproxy.engines.mongo.stages import (
    CommandAudit,
    ReplyAudit,
    MongoSessionState,
    backend_stages,
    client_stages,
    count_documents,
    cursor_summary,
    lost_backend_replies,
    render_command,
    summarize_reply,
)
from dbproxy.engines.mongo.stages.render import fast_renderable


class Stages:
    """One direction's stages run as the pipeline runs them: in order, the first verdict wins."""

    def __init__(self, stages: list) -> None:
        self.stages = stages

    def handle(self, message, ctx):
        for stage in self.stages:
            verdict = stage.handle(message, ctx)
            if verdict is not None:
                return verdict
        return None


class FakeAudit:
    def __init__(self) -> None:
        self.events: list[dict] = []
        self.n = 0

    def emit(self, kind: str, **fields) -> dict:
        self.n += 1
        event = {"event": kind, "uid": f"u{self.n}", **fields}
        self.events.append(event)
        return event

    def on_query(self, query: str, **fields) -> dict:
        return self.emit("db.session.query", db_query=ev.truncate(query), **fields)

    def on_result(self, *, success: bool, **fields) -> dict:
        return self.emit("db.session.result", success=success, **fields)

    def of(self, kind: str) -> list[dict]:
        return [e for e in self.events if e["event"] == kind]


class SecretFile:
    def __init__(self, tmp_path, value: str) -> None:
        self.path = tmp_path / "listener.secret"
        self.path.write_text(value + "\n")


def session(tmp_path=None, *, mode="accept", password: str | None = None, max_size=wire.DEFAULT_MAX_MESSAGE_SIZE):
    options = {"client_auth": mode}
    if password is not None:
        options["client_password_file"] = str(SecretFile(tmp_path, password).path)
    state = MongoSessionState(auth=ClientAuthPolicy.from_options(options).session(), max_message_size=max_size)
    audit = FakeAudit()
    return state, audit, Stages(client_stages(state, audit)), Stages(backend_stages(state, audit))


def msg(data: bytes) -> wire.WireMessage:
    return wire.WireMessage.from_bytes(data)


def reply_doc(data: bytes) -> dict:
    m = msg(data)
    if m.op_code == wire.OP_REPLY:
        return wire.decode_document(wire.parse_op_reply(m).documents[0])
    return wire.decode_document(wire.parse_op_msg(m).body_raw)


# --------------------------------------------------------------------------- rendering


def test_render_redacts_credentials_everywhere():
    text = render_command({"createUser": "u", "pwd": "hunter2", "roles": [], "$db": "admin"}, "createUser")
    assert "hunter2" not in text and '"pwd":"<redacted>"' in text
    text = render_command({"updateUser": "u", "pwd": "hunter3", "customData": {"password": "p4"}}, "updateUser")
    assert "hunter3" not in text and "p4" not in text
    text = render_command({"saslStart": 1, "mechanism": "PLAIN", "payload": b"\0u\0plainpw"}, "saslStart")
    assert "plainpw" not in text and '"payload":"<redacted>"' in text and '"mechanism":"PLAIN"' in text
    hello = {"hello": 1, "speculativeAuthenticate": {"saslStart": 1, "payload": b"n,,n=u,r=abc"}}
    assert "n=u" not in render_command(hello, "hello")
    # Index specs use "key": not a secret outside authentication commands.
    text = render_command({"createIndexes": "c", "indexes": [{"key": {"a": 1}, "name": "a_1"}]}, "createIndexes")
    assert '"key":{"a":1}' in text



@pytest.mark.parametrize("key", ["pwd", "password", "passwd", "speculativeAuthenticate"])
def test_raw_commands_with_a_secret_key_skip_the_fast_path_and_are_redacted(key):
    # As the worker renders a request: its body raw (the fast path decodes small bodies whole,
    # but only those whose bytes hold no redactable key, at any depth).
    for body in ({"updateUser": "u", key: "s3cret-value", "$db": "admin"},
                 {"insert": "c", "documents": [{"deep": {key: "s3cret-value"}}], "$db": "d"}):
        raw = RawBSONDocument(bson.encode(body))
        name = next(iter(body))
        text = render_command(raw, name)
        assert "s3cret-value" not in text and f'"{key}":"<redacted>"' in text
        assert not fast_renderable(raw.raw, name)
    assert fast_renderable(bson.encode({"find": "c", "filter": {key[:-1]: 1}}), "find")  # a near miss is fine

def test_render_is_bounded_and_json():
    body = {"insert": "c", "documents": [{"i": i, "s": "x" * 5000} for i in range(2000)], "$db": "d"}
    text = render_command(RawBSONDocument(bson.encode(body)), "insert")
    assert len(text) <= ev.MAX_QUERY_CHARS + 100
    assert text.startswith('{"insert":"c","documents":[{"i":0,"s":"xxxx')
    huge = render_command({"find": "c", "filter": {"s": "y" * 10_000_000}}, "find")
    assert len(huge) < ev.MAX_QUERY_CHARS + 100 and "more chars" in huge


def test_render_bson_types_as_extended_json():
    oid = ObjectId()
    u = uuid.uuid4()
    body = {
        "find": "c",
        "filter": {
            "oid": oid, "when": datetime.datetime(2024, 1, 2, 3, 4, 5), "dec": Decimal128("1.5"),
            "uuid": Binary(u.bytes, 4), "bin": Binary(b"\x00" * 100), "re": Regex("^a", "i"),
            "ts": Timestamp(5, 6), "min": MinKey(), "max": MaxKey(), "big": Int64(2**40), "f": 1.5, "none": None,
        },
    }
    doc = json.loads(render_command(RawBSONDocument(bson.encode(body)), "find"))
    f = doc["filter"]
    assert f["oid"] == {"$oid": str(oid)} and f["uuid"] == {"$uuid": str(u)}
    assert f["bin"] == {"$binary": {"subType": "00", "length": 100}}
    assert f["dec"] == {"$numberDecimal": "1.5"} and f["ts"] == {"$timestamp": {"t": 5, "i": 6}}
    assert f["re"]["$regex"] == "^a" and f["min"] == {"$minKey": 1} and f["max"] == {"$maxKey": 1}
    assert f["big"] == 2**40 and f["f"] == 1.5 and f["none"] is None and f["when"]["$date"].startswith("2024-01-02")


def test_sequence_summary_replaces_documents():
    text = render_command({"insert": "c", "$db": "d"}, "insert", {"documents": 100_000})
    assert json.loads(text)["documents"] == "<100000 documents in a document sequence>"


# --------------------------------------------------------------------------- reply reading


def test_count_documents():
    data = b"".join(bson.encode({"i": i}) for i in range(1234))
    assert count_documents(data) == 1234
    assert count_documents(b"") == 0
    with pytest.raises(wire.RemoteProtocolError):
        count_documents(data[:-1])
    with pytest.raises(wire.RemoteProtocolError):
        count_documents(b"\x01\x00\x00\x00" + data)


@pytest.mark.parametrize("n", [0, 1, 9, 10, 11, 99, 100, 101, 1000, 10_001])
@pytest.mark.parametrize("key", ["firstBatch", "nextBatch"])
def test_cursor_summary_counts_without_decoding(n, key):
    reply = {"cursor": {key: [{"_id": i, "v": "x" * (i % 5)} for i in range(n)], "id": Int64(123456789012), "ns": "db.c"}, "ok": 1.0}
    doc = RawBSONDocument(bson.encode(reply))
    assert cursor_summary(doc["cursor"]) == (123456789012, "db.c", n)


def test_cursor_summary_falls_back_when_batch_is_not_first_or_not_documents():
    doc = RawBSONDocument(bson.encode({"cursor": {"id": 0, "ns": "db.$cmd.listCollections", "firstBatch": [{"a": 1}, {"b": 2}]}}))
    assert cursor_summary(doc["cursor"]) == (0, "db.$cmd.listCollections", 2)
    doc = RawBSONDocument(bson.encode({"cursor": {"firstBatch": [1, 2, 3], "id": 7, "ns": "x.y"}}))
    assert cursor_summary(doc["cursor"]) == (7, "x.y", 3)


def test_summarize_reply_fields():
    s = summarize_reply(RawBSONDocument(bson.encode({"n": 3, "nModified": 2, "upserted": [{"index": 0, "_id": 1}], "ok": 1.0})))
    assert s == {"ok": 1.0, "n": 3, "nModified": 2, "upserted": 1}
    s = summarize_reply(RawBSONDocument(bson.encode({"ok": 0.0, "errmsg": "boom", "code": 2, "codeName": "BadValue"})))
    assert s == {"ok": 0.0, "errmsg": "boom", "code": 2, "codeName": "BadValue"}
    s = summarize_reply(RawBSONDocument(bson.encode({"n": 1, "writeErrors": [{"index": 1, "code": 11000, "errmsg": "dup key"}], "ok": 1.0})))
    assert s["write_errors"] == 1 and s["code"] == 11000 and s["errmsg"] == "dup key"
    s = summarize_reply(RawBSONDocument(bson.encode({"cursorsKilled": [Int64(5)], "cursorsNotFound": [], "ok": 1})))
    assert s["cursorsKilled"] == [5]


# --------------------------------------------------------------------------- client → backend stage


def test_plain_command_forwarded_untouched_and_audited():
    state, audit, client, backend = session()
    req = wire.encode_op_msg({"find": "c", "filter": {"a": 1}, "$db": "d"}, request_id=10)
    assert client.handle(msg(req), None) is None
    (q,) = audit.of("db.session.query")
    assert (q["command"], q["db_name"], q["collection"], q["request_id"]) == ("find", "d", "c", 10)
    assert json.loads(q["db_query"]) == {"find": "c", "filter": {"a": 1}, "$db": "d"}
    rep = wire.encode_op_msg({"cursor": {"firstBatch": [{"a": 1}], "id": Int64(0), "ns": "d.c"}, "ok": 1.0}, response_to=10)
    assert backend.handle(msg(rep), None) is None
    (r,) = audit.of("db.session.result")
    assert r["query_uid"] == q["uid"] and r["batch_size"] == 1 and r["cursor_id"] == 0 and r["success"] is True
    assert not state.pending


def test_document_sequence_counted_not_rendered():
    state, audit, client, _ = session()
    req = wire.encode_op_msg({"insert": "c", "$db": "d"}, request_id=3, sequences={"documents": [{"secretish": i} for i in range(500)]})
    assert client.handle(msg(req), None) is None
    (q,) = audit.of("db.session.query")
    assert q["document_count"] == 500 and "secretish" not in q["db_query"]


@pytest.mark.parametrize("compressor", ["snappy", "zlib", "zstd"])
def test_compressed_request_forwarded_decompressed(compressor):
    state, audit, client, _ = session()
    inner = wire.encode_op_msg({"ping": 1, "$db": "admin"}, request_id=44, checksum=True)
    packed = wire.compress(inner, wire.COMPRESSOR_IDS[compressor])
    verdict = client.handle(msg(packed), None)
    assert verdict.replace == (inner,)  # the original message, checksum still valid
    (q,) = audit.of("db.session.query")
    assert q["compressor"] == compressor and state.compressed_requests == 1


def test_getmore_and_killcursors_tied_to_original_command():
    state, audit, client, backend = session()
    client.handle(msg(wire.encode_op_msg({"aggregate": "c", "pipeline": [], "cursor": {}, "$db": "d"}, request_id=1)), None)
    backend.handle(msg(wire.encode_op_msg({"cursor": {"firstBatch": [{"x": 1}], "id": Int64(99), "ns": "d.c"}, "ok": 1.0}, response_to=1)), None)
    agg = audit.of("db.session.query")[0]
    client.handle(msg(wire.encode_op_msg({"getMore": Int64(99), "collection": "c", "$db": "d"}, request_id=2)), None)
    gm = audit.of("db.session.query")[1]
    assert gm["cursor_query_uid"] == agg["uid"] and gm["cursor_command"] == "aggregate" and gm["cursor_id"] == 99
    backend.handle(msg(wire.encode_op_msg({"cursor": {"nextBatch": [{"x": 2}], "id": Int64(99), "ns": "d.c"}, "ok": 1.0}, response_to=2)), None)
    assert audit.of("db.session.result")[-1]["cursor_query_uid"] == agg["uid"]
    client.handle(msg(wire.encode_op_msg({"killCursors": "c", "cursors": [Int64(99), Int64(5)], "$db": "d"}, request_id=3)), None)
    kill = audit.of("db.session.query")[-1]
    assert kill["cursor_query_uids"] == [agg["uid"], None]
    backend.handle(msg(wire.encode_op_msg({"cursorsKilled": [Int64(99)], "cursorsNotFound": [Int64(5)], "ok": 1.0}, response_to=3)), None)
    assert 99 not in state.cursors


def test_more_to_come_request_and_exhaust_replies():
    state, audit, client, backend = session()
    w0 = wire.encode_op_msg({"insert": "c", "$db": "d", "writeConcern": {"w": 0}}, request_id=5, flags=wire.MORE_TO_COME,
                            sequences={"documents": [{"a": 1}]})
    assert client.handle(msg(w0), None) is None
    assert audit.of("db.session.result")[-1]["acknowledged"] is False and not state.pending
    client.handle(msg(wire.encode_op_msg({"getMore": Int64(7), "collection": "c", "$db": "d"}, request_id=6, flags=wire.EXHAUST_ALLOWED)), None)
    first = wire.encode_op_msg({"cursor": {"nextBatch": [{"a": 1}], "id": Int64(7), "ns": "d.c"}, "ok": 1}, request_id=900, response_to=6, flags=wire.MORE_TO_COME)
    backend.handle(msg(first), None)
    assert 900 in state.pending  # the next exhaust reply answers the previous reply's requestID
    last = wire.encode_op_msg({"cursor": {"nextBatch": [], "id": Int64(0), "ns": "d.c"}, "ok": 1}, request_id=901, response_to=900)
    backend.handle(msg(last), None)
    assert not state.pending
    results = audit.of("db.session.result")[-2:]
    assert [r["batch_size"] for r in results] == [1, 0] and results[0]["query_uid"] == results[1]["query_uid"]


def test_hello_is_stripped_and_reply_rewritten(tmp_path):
    state, audit, client, backend = session(tmp_path, password="pw")
    hello = {
        "isMaster": 1, "helloOk": True, "client": {"driver": {"name": "d", "version": "1"}, "application": {"name": "app1"}},
        "compression": ["lz4", "zstd", "zlib"], "saslSupportedMechs": "admin.alice",
    }
    req = wire.encode_op_query("admin.$cmd", {"$query": hello, "$readPreference": {"mode": "primary"}}, request_id=8)
    verdict = client.handle(msg(req), None)
    fwd = wire.parse_op_query(msg(verdict.replace[0]))
    assert fwd.full_collection_name == "admin.$cmd"
    inner = wire.decode_document(fwd.query_raw)
    assert inner["$query"] == {"isMaster": 1, "helloOk": True} and inner["$readPreference"] == {"mode": "primary"}
    assert state.details["application_name"] == "app1"
    backend_reply = wire.encode_op_reply(
        [{"ismaster": True, "hosts": ["db1:27017", "db2:27017"], "setName": "rs0", "me": "db1:27017", "primary": "db1:27017",
          "maxMessageSizeBytes": 48_000_000, "maxWireVersion": 21, "ok": 1.0}], 700, 8)
    out = backend.handle(msg(backend_reply), None)
    rewritten = msg(out.replace[0])
    assert (rewritten.op_code, rewritten.request_id, rewritten.response_to) == (wire.OP_REPLY, 700, 8)
    doc = reply_doc(out.replace[0])
    assert not {"hosts", "setName", "me", "primary"} & set(doc)
    assert doc["compression"] == ["zstd"] and state.compressor == "zstd"
    assert doc["saslSupportedMechs"] == ["SCRAM-SHA-1", "SCRAM-SHA-256", "PLAIN"]
    assert doc["ismaster"] is True and doc["maxWireVersion"] == 21


def test_heartbeat_hello_reply_forwarded_untouched():
    state, audit, client, backend = session(max_size=wire.DEFAULT_MAX_MESSAGE_SIZE)
    assert client.handle(msg(wire.encode_op_msg({"hello": 1, "$db": "admin"}, request_id=2)), None) is None
    rep = wire.encode_op_msg({"isWritablePrimary": True, "maxMessageSizeBytes": 48_000_000, "ok": 1.0}, response_to=2)
    assert backend.handle(msg(rep), None) is None


def test_hello_max_message_size_capped_with_checksum_recomputed():
    state, audit, client, backend = session(max_size=8 * 1024 * 1024)
    client.handle(msg(wire.encode_op_msg({"hello": 1, "$db": "admin"}, request_id=2)), None)
    rep = wire.encode_op_msg({"isWritablePrimary": True, "maxMessageSizeBytes": 48_000_000, "ok": 1.0}, response_to=2, checksum=True)
    out = backend.handle(msg(rep), None).replace[0]
    wire.verify_op_msg_checksum(msg(out))
    assert msg(out).op_msg_flags & wire.CHECKSUM_PRESENT and reply_doc(out)["maxMessageSizeBytes"] == 8 * 1024 * 1024


def test_speculative_scram_sha_256_full_conversation(tmp_path):
    state, audit, client, backend = session(tmp_path, password="listener-pw")
    sc = scram.ScramClient("SCRAM-SHA-256", "alice", "listener-pw")
    spec = scram.sasl_start("SCRAM-SHA-256", sc.client_first(), db="admin")
    spec["db"] = "admin"
    verdict = client.handle(msg(wire.encode_op_msg({"hello": 1, "speculativeAuthenticate": spec, "$db": "admin"}, request_id=1)), None)
    forwarded = wire.decode_document(wire.parse_op_msg(msg(verdict.replace[0])).body_raw)
    assert "speculativeAuthenticate" not in forwarded
    out = backend.handle(msg(wire.encode_op_msg({"isWritablePrimary": True, "ok": 1.0}, response_to=1)), None)
    first = scram.parse_sasl_reply(reply_doc(out.replace[0])["speculativeAuthenticate"])
    final = sc.client_final(first.payload)
    v = client.handle(msg(wire.encode_op_msg(scram.sasl_continue(first.conversation_id, final, db="admin"), request_id=2)), None)
    answer = scram.parse_sasl_reply(reply_doc(v.reply))
    sc.verify_server_final(answer.payload)  # the proxy proved it knows the listener password
    assert answer.done and v.replace == () and msg(v.reply).response_to == 2
    assert state.auth.authenticated and state.auth.user == "alice"
    assert "listener-pw" not in json.dumps(audit.events, default=str)


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-1", "SCRAM-SHA-256"])
@pytest.mark.parametrize("skip_empty", [True, False])
def test_explicit_scram_conversation(tmp_path, mechanism, skip_empty):
    policy = ClientAuthPolicy.from_options({"client_password_file": str(SecretFile(tmp_path, "pw!").path)})
    auth = policy.session()
    sc = scram.ScramClient(mechanism, "bob", "pw!")
    start = scram.sasl_start(mechanism, sc.client_first())
    if not skip_empty:
        del start["options"]
    r = scram.parse_sasl_reply(auth.handle("saslStart", start).reply)
    r = scram.parse_sasl_reply(auth.handle("saslContinue", scram.sasl_continue(r.conversation_id, sc.client_final(r.payload))).reply)
    sc.verify_server_final(r.payload)
    if not skip_empty:
        assert not r.done
        r = scram.parse_sasl_reply(auth.handle("saslContinue", scram.sasl_continue(r.conversation_id, b"")).reply)
    assert r.done and auth.authenticated and auth.mechanism == mechanism


def test_scram_wrong_password_refused(tmp_path):
    auth = ClientAuthPolicy.from_options({"client_password_file": str(SecretFile(tmp_path, "right").path)}).session()
    sc = scram.ScramClient("SCRAM-SHA-256", "bob", "wrong")
    r = scram.parse_sasl_reply(auth.handle("saslStart", scram.sasl_start("SCRAM-SHA-256", sc.client_first())).reply)
    out = auth.handle("saslContinue", scram.sasl_continue(r.conversation_id, sc.client_final(r.payload)))
    assert out.reply["ok"] == 0 and out.reply["code"] == 18 and not auth.authenticated


def test_policies_without_password_and_reject():
    auth = ClientAuthPolicy.from_options({}).session()
    out = auth.handle("saslStart", scram.sasl_start("SCRAM-SHA-256", b"n,,n=u,r=abc"))
    assert out.reply["code"] == 18 and out.reply["errmsg"] == NO_PASSWORD_MESSAGE
    ok = auth.handle("saslStart", scram.sasl_start("PLAIN", b"\x00carol\x00secret-pw"))
    assert ok.ok and ok.done and ok.user == "carol" and "secret-pw" not in repr(ok)
    assert auth.handle("authenticate", {"authenticate": 1, "mechanism": "MONGODB-X509"}).ok
    assert auth.handle("saslStart", {"saslStart": 1, "mechanism": "GSSAPI", "payload": b""}).reply["code"] == 334
    rejecting = ClientAuthPolicy.from_options({"client_auth": "reject"})
    assert rejecting.mechanisms() == []
    r = rejecting.session().handle("saslStart", scram.sasl_start("PLAIN", b"\x00a\x00b"))
    assert r.reply["code"] == 18 and r.reply["errmsg"] == REJECT_MESSAGE
    assert rejecting.session().speculative({"saslStart": 1, "mechanism": "SCRAM-SHA-256", "payload": b"n,,n=u,r=x"}) is None


def test_auth_commands_answered_by_proxy_never_forwarded():
    state, audit, client, _ = session(mode="reject")
    v = client.handle(msg(wire.encode_op_query("admin.$cmd", scram.sasl_start("PLAIN", b"\x00u\x00pw-in-payload"), request_id=4)), None)
    assert v.replace == () and msg(v.reply).op_code == wire.OP_REPLY and msg(v.reply).response_to == 4
    assert reply_doc(v.reply)["code"] == 18
    q, r = audit.of("db.session.query")[0], audit.of("db.session.result")[0]
    assert q["answered_by"] == "proxy" and r["success"] is False and "pw-in-payload" not in q["db_query"]


def test_malformed_body_refused_for_the_pipeline_to_audit_and_answer():
    """Refused (MalformedMessage): the pipeline audits it and ends the session after the engine's
    ok:0 reply to this request (tests/unit/mongo/test_mongo_malformed.py has the cases)."""
    state, audit, client, _ = session()
    body = bson.encode({"ping": 1})
    bad = wire.HEADER.pack(16 + 5 + len(body), 12, 0, wire.OP_MSG) + b"\x00\x00\x00\x00\x00" + b"\xff\x00\x00\x00" + body[4:]
    with pytest.raises(MalformedMessage) as info:
        client.handle(msg(bad), None)
    out = client_protocol_error_reply(info.value)
    assert reply_doc(out)["code"] == 17 and msg(out).response_to == 12
    assert audit.events == [] and state.pending == {}


def test_lost_backend_answers_waiting_requests_in_their_style():
    state, audit, client, _ = session()
    client.handle(msg(wire.encode_op_msg({"find": "c", "$db": "d"}, request_id=21)), None)
    client.handle(msg(wire.encode_op_query("d.$cmd", {"count": "c"}, request_id=22)), None)
    out = lost_backend_replies(state, audit, "gone")
    dec = MongoDecoder()
    dec.feed(out)
    a, b = dec.next_message(), dec.next_message()
    assert (a.op_code, a.response_to, b.op_code, b.response_to) == (wire.OP_MSG, 21, wire.OP_REPLY, 22)
    assert reply_doc(a.raw)["code"] == 6 and not state.pending
    assert [r["success"] for r in audit.of("db.session.result")] == [False, False]


def test_client_decoder_errors_name_the_request():
    dec = AttributingDecoder(MongoDecoder(max_message_size=1024), "client")
    dec.feed(wire.HEADER.pack(10_000, 555, 0, wire.OP_MSG))
    with pytest.raises(FrameTooLarge) as info:
        dec.next_message()
    out = client_protocol_error_reply(info.value)
    assert msg(out).response_to == 555 and reply_doc(out)["code"] == 10334
    dec = AttributingDecoder(MongoDecoder(), "client")
    dec.feed(wire.HEADER.pack(64, 1, 0, 0x41414141))
    with pytest.raises(wire.RemoteProtocolError) as info:
        dec.next_message()
    assert client_protocol_error_reply(info.value) == b""  # not a Mongo request: just close


# --------------------------------------------------------------------------- config


def _config(tmp_path, listener_extra=None, backend_extra=None) -> str:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    backend = {"address": "127.0.0.1:27017", "user": "proxy", "auth": {"method": "scram-sha-256", "password_file": "pw"}}
    backend.update(backend_extra or {})
    listener = {"name": "m", "protocol": "mongo", "listen": "127.0.0.1:0", "routes": [{"backend": backend}]}
    listener.update(listener_extra or {})
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"listeners": [listener]}))
    return str(path)


def test_config_accepts_mongo_listener_and_resolves_password_file(tmp_path):
    (tmp_path / "lpw").write_text("x\n")
    cfg = load_config(_config(tmp_path, {"options": {"client_auth": "accept", "client_password_file": "lpw", "compressors": ["zstd"]}},
                              {"options": {"auth_source": "admin", "handshake": "isMaster"}}), default_registry())
    (lc,) = cfg.listeners
    assert lc.options["client_password_file"] == str(tmp_path / "lpw")
    assert lc.routes[0].backend.options == {"auth_source": "admin", "handshake": "isMaster"}


@pytest.mark.parametrize(
    "listener_extra, backend_extra, path, expected",
    [
        ({"options": {"client_auth": "maybe"}}, None, "listeners[0].options.client_auth", "one of accept, reject"),
        ({"options": {"colour": 1}}, None, "listeners[0].options.colour", "no key 'colour'"),
        ({"options": {"client_auth": "reject", "client_password_env": "HOME"}}, None, "listeners[0].options", "no client password"),
        ({"options": {"compressors": ["lz4"]}}, None, "listeners[0].options.compressors", "snappy, zlib, zstd"),
        (None, {"options": {"handshake": "hi"}}, "listeners[0].routes[0].backend.options.handshake", "hello, isMaster"),
        (None, {"user": None}, "listeners[0].routes[0].backend", "a \"user\""),
        (None, {"auth": {"method": "scram-sha-256", "password_file": "pw", "mechanism": "x"}}, "listeners[0].routes[0].backend.auth.mechanism", "no key"),
        (None, {"auth": {"method": "kerberos"}}, "listeners[0].routes[0].backend.auth.method", "scram-sha-256"),
    ],
)
def test_config_errors(tmp_path, listener_extra, backend_extra, path, expected):
    if backend_extra and backend_extra.get("user", 1) is None:
        backend_extra = {}
        listener_extra = None
        cfg_path = _config(tmp_path)
        doc = json.loads(open(cfg_path).read())
        del doc["listeners"][0]["routes"][0]["backend"]["user"]
        open(cfg_path, "w").write(json.dumps(doc))
    else:
        cfg_path = _config(tmp_path, listener_extra, backend_extra)
    with pytest.raises(ConfigErrors) as info:
        load_config(cfg_path, default_registry())
    found = [e for e in info.value.errors if e.path == path]
    assert found and expected in found[0].expected, [str(e) for e in info.value.errors]


def test_shipped_example_config(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    with pytest.raises(ConfigErrors) as info:
        load_config(os.path.join(root, "configs", "mongo.json"), default_registry())
    # Only the secrets and certificates the example names (env vars, files under /etc) are missing here.
    paths = [e.path for e in info.value.errors]
    assert all(re.search(r"(password_(env|file)|cert_file|key_file)$", p) for p in paths), [str(e) for e in info.value.errors]
    assert "listeners[0].options.client_password_env" in paths


def test_malformed_nested_input_never_escapes_the_stages():
    state, audit, client, backend = session()
    # A document sequence whose inner document sizes overrun the section.
    seq_doc = bson.encode({"a": 1})
    bad_seq = b"\x01" + (4 + 10 + len(seq_doc)).to_bytes(4, "little") + b"documents\x00" + b"\xff\x00\x00\x00" + seq_doc[4:]
    body = b"\x00\x00\x00\x00\x00" + bson.encode({"insert": "c", "$db": "d"}) + bad_seq
    with pytest.raises(MalformedMessage) as info:  # refused: the pipeline audits it and ends the session
        client.handle(msg(wire.HEADER.pack(16 + len(body), 40, 0, wire.OP_MSG) + body), None)
    assert reply_doc(client_protocol_error_reply(info.value))["code"] == 17
    # A reply whose cursor batch is cut short: forwarded, audited as unreadable or counted by the fallback.
    client.handle(msg(wire.encode_op_msg({"find": "c", "$db": "d"}, request_id=41)), None)
    good = bson.encode({"cursor": {"firstBatch": [{"x": 1}, {"x": 2}], "id": Int64(0), "ns": "d.c"}, "ok": 1.0})
    corrupt = bytearray(good)
    corrupt[good.index(b"\x03" + b"1\x00") + 3] = 0x7F  # second document claims 127 bytes
    rep = wire.HEADER.pack(16 + 5 + len(corrupt), 900, 41, wire.OP_MSG) + b"\x00\x00\x00\x00\x00" + bytes(corrupt)
    assert backend.handle(msg(rep), None) is None
    assert audit.of("db.session.result")[-1]["query_uid"] == audit.of("db.session.query")[-1]["uid"]



def test_the_audit_stages_are_read_only_observers(tmp_path):
    """Issue 14's contract: an audit stage records and never answers, rewrites, drops or closes;
    it runs before every client stage that may refuse (a refused command is audited first)."""
    state, audit, client, backend = session(tmp_path, password="pw")
    [command_audit] = [s for s in client.stages if isinstance(s, CommandAudit)]
    [reply_audit] = [s for s in backend.stages if isinstance(s, ReplyAudit)]
    assert not client.stages[:client.stages.index(command_audit)]  # no access control: no session gate before it
    assert backend.stages.index(reply_audit) == 0
    returned = []
    for observer in (command_audit, reply_audit):
        def spy(message, ctx, handle=observer.handle):
            returned.append(handle(message, ctx))
            return returned[-1]
        observer.handle = spy
    hello = {"hello": 1, "compression": ["zstd"], "saslSupportedMechs": "admin.alice", "$db": "admin"}
    verdicts = [
        client.handle(msg(wire.encode_op_msg(hello, request_id=1)), None),  # rewritten by the hello stage
        client.handle(msg(wire.encode_op_msg(scram.sasl_start("PLAIN", b"\0alice\0pw"), request_id=2)), None),
        client.handle(msg(wire.compress(wire.encode_op_msg({"find": "c", "$db": "d"}, request_id=3),
                                        wire.COMPRESSOR_IDS["zlib"])), None),  # sent on decompressed
        backend.handle(msg(wire.encode_op_msg({"hello": 1, "hosts": ["a:1"], "ok": 1.0}, response_to=1)), None),
        backend.handle(msg(wire.encode_op_msg({"cursor": {"firstBatch": [], "id": Int64(0), "ns": "d.c"}, "ok": 1.0},
                                              response_to=3)), None),
    ]
    assert all(v is not None for v in verdicts[:4])  # other stages changed every one of those…
    assert len(returned) == 5 and all(r is None for r in returned)  # …the observers none
    assert len(audit.of("db.session.query")) == 3 and len(audit.of("db.session.result")) == 3



def test_the_session_keeps_no_message_once_its_stages_are_done(tmp_path):
    """The stages read each message once and share that view; it is dropped when the walk ends
    (a verdict or the last stage), so no message outlives its batch unseen by the buffer budget."""
    import gc
    import weakref

    state, audit, client, backend = session(tmp_path, password="pw")
    hello = {"hello": 1, "compression": ["zstd"], "$db": "admin"}
    requests = [
        wire.encode_op_msg(hello, request_id=1),  # rewritten
        wire.encode_op_msg(scram.sasl_start("PLAIN", b"\0alice\0pw"), request_id=2),  # answered by the proxy
        wire.compress(wire.encode_op_msg({"find": "c", "$db": "d"}, request_id=3), wire.COMPRESSOR_IDS["zlib"]),
        wire.encode_op_msg({"insert": "c", "documents": [{"x": "y" * 100_000}], "$db": "d"}, request_id=4),
    ]
    replies = [
        wire.encode_op_msg({"hello": 1, "hosts": ["a:1"], "ok": 1.0}, response_to=1),  # rewritten
        wire.encode_op_msg({"n": 1, "ok": 1.0}, response_to=4),  # forwarded as received
    ]
    for stages, data in [(client, d) for d in requests] + [(backend, d) for d in replies]:
        message = msg(data)
        ref = weakref.ref(message)
        stages.handle(message, None)
        del message
        gc.collect()
        assert ref() is None, data[:40]


def test_legacy_opcodes_audited():
    state, audit, client, backend = session()
    op_insert = wire.HEADER.pack(16 + 4 + 4 + len(bson.encode({"a": 1})), 50, 0, wire.OP_INSERT) + b"\x00" * 4 + b"d.c\x00" + bson.encode({"a": 1})
    assert client.handle(msg(op_insert), None) is None
    q, r = audit.of("db.session.query")[-1], audit.of("db.session.result")[-1]
    assert q["command"] == "legacy opcode 2002" and r["acknowledged"] is False and r["query_uid"] == q["uid"]
