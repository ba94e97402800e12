"""SCRAM-SHA-1 / SCRAM-SHA-256 for MongoDB, client and server side.

* The conversations published in mongodb/specifications ``source/auth/auth.md``
  (SCRAM-SHA-1 with the ``user:mongo:pencil`` digest; SCRAM-SHA-256 is also
  RFC 7677's example) are reproduced byte for byte by both ``ScramClient`` and
  ``ScramServer``, including the base64 payloads of the saslStart /
  saslContinue documents.
* ``ScramClient`` and ``ScramServer`` authenticate each other for both
  mechanisms; wrong passwords, forged signatures, downgrades and malformed
  messages are refused with the right error.
* pymongo itself (an independent SCRAM client) authenticates against
  ``ScramServer`` answering over mockupdb, for both mechanisms.
"""

from __future__ import annotations

import base64
import threading

import bson
import pytest
from bson.binary import Binary
from hypothesis import given, settings
from hypothesis import strategies as st

from dbproxy.errors import AccessDenied, RemoteProtocolError, UpstreamError
from dbproxy.sansio import NEED_DATA
from dbproxy.engines.mongo import protocol as wire
from dbproxy.engines.mongo import scram
from dbproxy.engines.mongo.codec import MongoDecoder

SHA1_VECTOR = {
    "mechanism": "SCRAM-SHA-1",
    "client_nonce": b"fyko+d2lbbFgONRv9qkxdawL",
    "server_nonce": b"Ho+Vgk7qvUOKUwuWLIWg4l/9SraGMHEE",
    "salt": "rQ9ZY3MntBeuP3E1TDVC4w==",
    "iterations": 10000,
    "client_first": b"n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL",
    "server_first": b"r=fyko+d2lbbFgONRv9qkxdawLHo+Vgk7qvUOKUwuWLIWg4l/9SraGMHEE,s=rQ9ZY3MntBeuP3E1TDVC4w==,i=10000",
    "client_final": b"c=biws,r=fyko+d2lbbFgONRv9qkxdawLHo+Vgk7qvUOKUwuWLIWg4l/9SraGMHEE,p=MC2T8BvbmWRckDw8oWl5IVghwCY=",
    "server_final": b"v=UMWeI25JD1yNYZRMpZ4VHvhZ9e0=",
    "start_payload_b64": "biwsbj11c2VyLHI9ZnlrbytkMmxiYkZnT05Sdjlxa3hkYXdM",
    "continue_payload_b64": (
        "Yz1iaXdzLHI9ZnlrbytkMmxiYkZnT05Sdjlxa3hkYXdMSG8rVmdrN3F2VU9LVXd1V0xJV2c0bC85U3JhR01IRUUs"
        "cD1NQzJUOEJ2Ym1XUmNrRHc4b1dsNUlWZ2h3Q1k9"
    ),
}
SHA256_VECTOR = {
    "mechanism": "SCRAM-SHA-256",
    "client_nonce": b"rOprNGfwEbeRWgbNEkqO",
    "server_nonce": b"%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0",
    "salt": "W22ZaJ0SNY7soEsUEjb6gQ==",
    "iterations": 4096,
    "client_first": b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO",
    "server_first": b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
    "client_final": (
        b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
        b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
    ),
    "server_final": b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=",
    "start_payload_b64": "biwsbj11c2VyLHI9ck9wck5HZndFYmVSV2diTkVrcU8=",
    "continue_payload_b64": (
        "Yz1iaXdzLHI9ck9wck5HZndFYmVSV2diTkVrcU8laHZZRHBXVWEyUmFUQ0FmdXhGSWxqKWhObEYkazAscD1kSHpi"
        "WmFwV0lrNGpVaE4rVXRlOXl0YWc5empmTUhnc3FtbWl6N0FuZFZRPQ=="
    ),
}
VECTORS = [SHA1_VECTOR, SHA256_VECTOR]


@pytest.mark.parametrize("v", VECTORS, ids=lambda v: v["mechanism"])
def test_client_reproduces_spec_conversation(v):
    client = scram.ScramClient(v["mechanism"], "user", "pencil", nonce=v["client_nonce"])
    assert client.client_first() == v["client_first"]
    assert client.client_final(v["server_first"]) == v["client_final"]
    client.verify_server_final(v["server_final"])


@pytest.mark.parametrize("v", VECTORS, ids=lambda v: v["mechanism"])
def test_server_reproduces_spec_conversation(v):
    creds = scram.scram_credentials(
        v["mechanism"], "user", "pencil", salt=base64.b64decode(v["salt"]), iterations=v["iterations"]
    )
    server = scram.ScramServer.from_credentials(creds, nonce=v["server_nonce"])
    assert server.server_first(v["client_first"]) == v["server_first"]
    assert server.user == "user"
    assert server.server_final(v["client_final"]) == v["server_final"]
    assert server.authenticated


@pytest.mark.parametrize("v", VECTORS, ids=lambda v: v["mechanism"])
def test_sasl_command_documents(v):
    client = scram.ScramClient(v["mechanism"], "user", "pencil", nonce=v["client_nonce"])
    start = scram.sasl_start(client.mechanism, client.client_first(), db="admin")
    assert list(start)[0] == "saslStart"
    assert start["mechanism"] == v["mechanism"] and start["autoAuthorize"] == 1
    assert start["options"] == {"skipEmptyExchange": True} and start["$db"] == "admin"
    assert isinstance(start["payload"], Binary)
    assert base64.b64encode(start["payload"]).decode() == v["start_payload_b64"]
    cont = scram.sasl_continue(1, client.client_final(v["server_first"]))
    assert list(cont) == ["saslContinue", "conversationId", "payload"]
    assert base64.b64encode(cont["payload"]).decode() == v["continue_payload_b64"]
    # Both encode to BSON and survive an OP_MSG round trip.
    for doc in (start, cont):
        data = wire.encode_op_msg(doc, request_id=1)
        assert wire.parse_op_msg(data).body_raw == bson.encode(doc)


def test_mongo_password_digests():
    # auth.md: SCRAM-SHA-1 uses hex(md5("user:mongo:pencil")); SCRAM-SHA-256 uses SASLprep.
    assert scram.mongo_password("SCRAM-SHA-1", "user", "pencil") == b"1c33006ec1ffd90f9cadcbcc0e118200"
    assert scram.mongo_password("SCRAM-SHA-256", "user", "I\u00adX") == b"IX"  # soft hyphen mapped out
    assert scram.mongo_password("SCRAM-SHA-256", "user", "\u2168") == b"IX"  # NFKC
    with pytest.raises(ValueError):
        scram.mongo_password("SCRAM-MD5", "u", "p")


def run_conversation(client: scram.ScramClient, server: scram.ScramServer) -> None:
    server_first = server.server_first(client.client_first())
    server_final = server.server_final(client.client_final(server_first))
    client.verify_server_final(server_final)


@pytest.mark.parametrize("mechanism", scram.MECHANISMS)
@pytest.mark.parametrize("user", ["alice", "we,ird=name", "ünïcødé"])
def test_client_server_round_trip(mechanism, user):
    creds = scram.scram_credentials(mechanism, user, "s3cret pässword", iterations=4096)
    server = scram.ScramServer.from_credentials(creds)
    client = scram.ScramClient(mechanism, user, "s3cret pässword")
    run_conversation(client, server)
    assert server.authenticated and server.user == user


def test_sha256_saslprep_equivalent_passwords_match():
    creds = scram.scram_credentials("SCRAM-SHA-256", "user", "IX", iterations=4096)
    run_conversation(scram.ScramClient("SCRAM-SHA-256", "user", "\u2168"), scram.ScramServer.from_credentials(creds))


def test_default_credentials():
    creds = scram.scram_credentials("SCRAM-SHA-256", "u", "p")
    assert creds.iterations == 15000 and len(creds.salt) == 28 and len(creds.stored_key) == 32
    creds = scram.scram_credentials("SCRAM-SHA-1", "u", "p")
    assert creds.iterations == 10000 and len(creds.salt) == 16 and len(creds.stored_key) == 20
    assert repr(creds.stored_key) not in repr(creds) and repr(creds.salt) not in repr(creds)
    assert "hunter2" not in repr(scram.ScramClient("SCRAM-SHA-256", "u", "hunter2"))


@pytest.mark.parametrize("mechanism", scram.MECHANISMS)
def test_wrong_password_is_denied(mechanism):
    creds = scram.scram_credentials(mechanism, "alice", "right", iterations=4096)
    server = scram.ScramServer.from_credentials(creds)
    client = scram.ScramClient(mechanism, "alice", "wrong")
    server_first = server.server_first(client.client_first())
    with pytest.raises(AccessDenied):
        server.server_final(client.client_final(server_first))
    assert not server.authenticated


def test_sha1_and_sha256_keys_do_not_mix():
    creds = scram.scram_credentials("SCRAM-SHA-1", "alice", "pw", iterations=4096)
    server = scram.ScramServer("SCRAM-SHA-256", creds.stored_key, creds.server_key, creds.salt, 4096)
    client = scram.ScramClient("SCRAM-SHA-256", "alice", "pw")
    with pytest.raises(AccessDenied):
        server.server_final(client.client_final(server.server_first(client.client_first())))


def test_client_rejects_forged_server_signature():
    v = SHA256_VECTOR
    client = scram.ScramClient(v["mechanism"], "user", "pencil", nonce=v["client_nonce"])
    client.client_first()
    client.client_final(v["server_first"])
    forged = b"v=" + base64.b64encode(b"\x00" * 32)
    with pytest.raises(UpstreamError) as exc:
        client.verify_server_final(forged)
    assert exc.value.kind == "auth"
    with pytest.raises(UpstreamError):
        client.verify_server_final(b"e=other-error")
    with pytest.raises(UpstreamError):
        client.verify_server_final(b"garbage")


@pytest.mark.parametrize(
    "server_first",
    [
        b"r=rOprNGfwEbeRWgbNEkqOxyz,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4095",  # downgrade below 4096
        b"r=rOprNGfwEbeRWgbNEkqOxyz,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=1000000001",  # CPU pinning
        b"r=someoneelse,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",  # nonce not extended
        b"r=rOprNGfwEbeRWgbNEkqO,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",  # nonce not extended at all
        b"m=ext,r=rOprNGfwEbeRWgbNEkqOxyz,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",  # mandatory extension
        b"r=rOprNGfwEbeRWgbNEkqOxyz,s=!!!,i=4096",  # bad base64
        b"r=rOprNGfwEbeRWgbNEkqOxyz,i=4096",  # no salt
        b"r=rOprNGfwEbeRWgbNEkqOxyz,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=many",
    ],
)
def test_client_rejects_bad_server_first(server_first):
    client = scram.ScramClient("SCRAM-SHA-256", "user", "pencil", nonce=b"rOprNGfwEbeRWgbNEkqO")
    client.client_first()
    with pytest.raises(UpstreamError) as exc:
        client.client_final(server_first)
    assert exc.value.kind == "auth"


@pytest.mark.parametrize(
    "client_first",
    [
        b"p=tls-unique,,n=user,r=abc",  # channel binding demanded
        b"n,,r=abc",  # no user
        b"n,,n=user",  # no nonce
        b"n,x,n=user,r=abc",  # bad authzid
        b"n,a=admin,n=user,r=abc",  # an authorization identity: not supported (PostgreSQL refuses it too)
        b"n,,r=abc,n=user",  # attributes out of order (RFC 5802 §7)
        b"n,,n=us=5Cer,r=abc",  # bad escape
        b"nonsense",
    ],
)
def test_server_rejects_bad_client_first(client_first):
    creds = scram.scram_credentials("SCRAM-SHA-256", "user", "pencil", iterations=4096)
    server = scram.ScramServer.from_credentials(creds)
    with pytest.raises(RemoteProtocolError):
        server.server_first(client_first)


def test_server_rejects_bad_client_final():
    creds = scram.scram_credentials("SCRAM-SHA-256", "user", "pencil", iterations=4096)
    client = scram.ScramClient("SCRAM-SHA-256", "user", "pencil")
    server = scram.ScramServer.from_credentials(creds)
    final = client.client_final(server.server_first(client.client_first()))
    with pytest.raises(RemoteProtocolError):
        server.server_final(final.replace(b"c=biws", b"c=eSws"))  # channel binding differs from GS2 header
    with pytest.raises(RemoteProtocolError):
        server.server_final(final.rpartition(b",")[0])  # no proof
    tampered_nonce = final.replace(b"r=", b"r=X", 1)
    with pytest.raises(AccessDenied):
        server.server_final(tampered_nonce)
    assert server.server_final(final).startswith(b"v=")


_SCRAM_TEXT = st.one_of(
    st.binary(max_size=120),
    st.lists(
        st.tuples(st.sampled_from(["n", "r", "s", "i", "c", "p", "v", "e", "m", "a", "xx", ""]),
                  st.text(max_size=20)),
        max_size=5,
    ).map(lambda kv: ",".join(f"{k}={v}" for k, v in kv).encode("utf-8")),
)


@settings(max_examples=300, deadline=None)
@given(first=_SCRAM_TEXT, final=_SCRAM_TEXT, prefix=st.sampled_from([b"", b"n,,", b"y,,", b"n,a=x,"]))
def test_fuzz_server_raises_only_protocol_or_access_errors(first, final, prefix):
    creds = scram.scram_credentials("SCRAM-SHA-256", "user", "pencil", salt=b"s" * 16, iterations=4096)
    server = scram.ScramServer.from_credentials(creds)
    try:
        server.server_first(prefix + first)
        server.server_final(final)
    except (RemoteProtocolError, AccessDenied):
        pass
    assert not server.authenticated


@settings(max_examples=300, deadline=None)
@given(first=_SCRAM_TEXT, final=_SCRAM_TEXT)
def test_fuzz_client_raises_only_upstream_errors(first, final):
    client = scram.ScramClient("SCRAM-SHA-256", "user", "pencil", nonce=b"abc")
    client.client_first()
    try:
        client.client_final(b"r=abcdef,s=c2FsdA==,i=4096" if not first else first)
        client.verify_server_final(final)
    except UpstreamError as exc:
        assert exc.kind == "auth"
    else:
        raise AssertionError("a random server-final-message was accepted")


def test_parse_client_first_unescapes():
    first = scram.parse_client_first(b"n,,n=a=2Cb=3Dc,r=xyz")
    assert (first.user, first.nonce, first.bare, first.gs2_header) == ("a,b=c", b"xyz", b"n=a=2Cb=3Dc,r=xyz", b"n,,")


def test_parse_sasl_reply():
    r = scram.parse_sasl_reply({"conversationId": 1, "done": False, "payload": b"r=abc", "ok": 1.0})
    assert (r.conversation_id, r.payload, r.done) == (1, b"r=abc", False)
    doc = bson.decode(bson.encode(scram.sasl_reply(1, b"v=xyz", done=True)))
    assert scram.parse_sasl_reply(doc) == scram.SaslReply(1, b"v=xyz", True)
    with pytest.raises(UpstreamError) as exc:
        scram.parse_sasl_reply({"ok": 0.0, "errmsg": "Authentication failed.", "code": 18})
    assert exc.value.kind == "auth"


@pytest.mark.parametrize("mechanism", scram.MECHANISMS)
def test_full_exchange_over_the_wire(mechanism):
    """Client and server exchange real OP_MSG bytes through MongoDecoder, as the engine will."""
    creds = scram.scram_credentials(mechanism, "alice", "pw", iterations=4096)
    client = scram.ScramClient(mechanism, "alice", "pw")
    server_side = MongoDecoder()
    client_side = MongoDecoder()
    server: scram.ScramServer | None = None

    def to_server(doc):
        server_side.feed(wire.encode_op_msg(doc))
        msg = server_side.next_message()
        cmd = wire.inspect_command(msg)
        nonlocal server
        payload = bytes(cmd.body["payload"])
        if cmd.name == "saslStart":
            assert cmd.database == "admin" and cmd.body["mechanism"] == mechanism
            first = scram.parse_client_first(payload)
            assert first.user == "alice"
            server = scram.ScramServer.from_credentials(creds)
            answer = scram.sasl_reply(1, server.server_first(first), done=False)
        else:
            answer = scram.sasl_reply(cmd.body["conversationId"], server.server_final(payload), done=True)
        client_side.feed(wire.reply_to(msg, answer))
        reply = client_side.next_message()
        assert reply.response_to == msg.request_id and client_side.next_message() is NEED_DATA
        return scram.parse_sasl_reply(wire.parse_op_msg(reply).body)

    r = to_server(scram.sasl_start(mechanism, client.client_first(), db="admin"))
    r = to_server(scram.sasl_continue(r.conversation_id, client.client_final(r.payload), db="admin"))
    client.verify_server_final(r.payload)
    assert r.done and server.authenticated


# --- pymongo (an independent SCRAM client) against ScramServer -------------------


class ScramMockServer:
    """mockupdb answering hello, saslStart/saslContinue (via ScramServer) and ping."""

    def __init__(self, mechanism: str, user: str, password: str) -> None:
        from mockupdb import MockupDB

        self.creds = scram.scram_credentials(mechanism, user, password, iterations=4096)
        self.conversations: dict[int, scram.ScramServer] = {}
        self.authenticated: list[str] = []
        self.lock = threading.Lock()
        self.mock = MockupDB()
        self.mock.autoresponds(self.respond)

    def respond(self, request):
        name = request.command_name
        doc = request.doc
        if name.lower() in ("hello", "ismaster"):
            return request.ok(isWritablePrimary=True, ismaster=True, helloOk=True, maxWireVersion=21,
                              minWireVersion=0, saslSupportedMechs=[self.creds.mechanism])
        if name == "saslStart":
            server = scram.ScramServer.from_credentials(self.creds)
            with self.lock:
                cid = len(self.conversations) + 1
                self.conversations[cid] = server
            if doc["mechanism"] != self.creds.mechanism:
                return request.command_err(code=2, errmsg="wrong mechanism")
            return request.ok(conversationId=cid, done=False, payload=Binary(server.server_first(doc["payload"])))
        if name == "saslContinue":
            server = self.conversations[doc["conversationId"]]
            try:
                final = server.server_final(doc["payload"])
            except AccessDenied:
                return request.command_err(code=18, errmsg="Authentication failed.")
            with self.lock:
                self.authenticated.append(server.user)
            return request.ok(conversationId=doc["conversationId"], done=True, payload=Binary(final))
        return request.ok()


@pytest.mark.parametrize("mechanism", scram.MECHANISMS)
def test_pymongo_authenticates_against_scram_server(mechanism):
    pytest.importorskip("mockupdb")
    from pymongo import MongoClient
    from pymongo.errors import OperationFailure

    fake = ScramMockServer(mechanism, "alice", "s3cret")
    fake.mock.run()
    try:
        uri = f"mongodb://127.0.0.1:{fake.mock.port}/?directConnection=true"
        client = MongoClient(uri, username="alice", password="s3cret", authMechanism=mechanism,
                             serverSelectionTimeoutMS=5000, connectTimeoutMS=5000)
        try:
            assert client.admin.command("ping")["ok"] == 1
        finally:
            client.close()
        assert fake.authenticated == ["alice"]

        client = MongoClient(uri, username="alice", password="wrong", authMechanism=mechanism,
                             serverSelectionTimeoutMS=5000, connectTimeoutMS=5000)
        try:
            with pytest.raises(OperationFailure):
                client.admin.command("ping")
        finally:
            client.close()
        assert fake.authenticated == ["alice"]
    finally:
        fake.mock.stop()
