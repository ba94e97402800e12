"""Mongo identity and access without sockets: the command policy, token/certificate client auth, the gated stages.

Client SCRAM runs the project's own ``ScramClient`` (which checks the
server signature as drivers do) with a *token* as the password against the
proxy's ``IdentityAuthenticator``, backed by a real ``TokenAuthority`` and
registry in a temporary folder.  The stages get real wire bytes; the audit is
a stand-in that stamps each event with the session's identity at emit time,
as ``audit.recorder.SessionAudit`` does.
"""

from __future__ import annotations

import json

import attrs
import pytest
import bson
from bson.raw_bson import RawBSONDocument

from dbproxy.audit import events as ev
from dbproxy.access import ListenerAccess
from dbproxy.config import load_config
from dbproxy.errors import ConfigErrors
from dbproxy.identity.authenticator import ClientAuthenticator
from dbproxy.identity.authority import TokenAuthority
from dbproxy.identity.config import MtlsConfig, TokenConfig
from dbproxy.identity.keys import generate_keys
from dbproxy.limits import ConnectionLimits, LimitsConfig
from dbproxy.roles import AccessPolicy, Grant, RoleConfig
from dbproxy.session import Identity
from dbproxy.engines import default_registry
from dbproxy.engines.mongo import protocol as wire
from dbproxy.engines.mongo import scram
from dbproxy.engines.mongo.clientauth import ClientAuthPolicy, IdentityAuthenticator
from dbproxy.engines.mongo.policy import PENDING, MongoAccess, check_command, read_only_violation
from dbproxy.engines.mongo.stages import CommandAudit, MongoSessionState, SessionGate, backend_stages, client_stages
from tests.unit.mongo.test_mongo_stages import Stages

# --------------------------------------------------------------------------- check_command

RO = Grant(roles=("analyst",), read_only=True, databases=("app",), restricted=True)
RW = Grant(roles=("writer",), databases=("app", "app_*"), deny_commands=("dropDatabase", "drop*", "$out"), restricted=True)


def raw(doc: dict) -> RawBSONDocument:
    return RawBSONDocument(bson.encode(doc))


def check(grant: Grant, doc: dict, db: str | None = "app"):
    """One grant for every database it allows (per-database grants: see test_grants_are_per_database)."""
    name = next(iter(doc))
    return check_command(grant, lambda d: grant if grant.allows_database(d) else None, name, db, raw(doc))


@pytest.mark.parametrize("doc", [
    {"find": "c", "filter": {}},
    {"aggregate": "c", "pipeline": [{"$match": {}}, {"$group": {"_id": "$k"}}], "cursor": {}},
    {"aggregate": "c", "pipeline": [{"$lookup": {"from": "d", "as": "x", "pipeline": [{"$match": {}}]}}], "cursor": {}},
    {"count": "c"}, {"distinct": "c", "key": "k"}, {"listCollections": 1}, {"listIndexes": "c"},
    {"getMore": bson.Int64(5), "collection": "c"}, {"killCursors": "c", "cursors": [bson.Int64(5)]},
    {"explain": {"find": "c", "filter": {}}}, {"explain": {"aggregate": "c", "pipeline": []}},
    {"mapReduce": "c", "map": "f", "reduce": "g", "out": {"inline": 1}},
    {"dbStats": 1}, {"collStats": "c"}, {"ping": 1}, {"hello": 1}, {"endSessions": []},
])
def test_read_only_allows_reads(doc):
    assert check(RO, doc) is None


@pytest.mark.parametrize("doc", [
    {"insert": "c", "documents": [{}]}, {"update": "c", "updates": []}, {"delete": "c", "deletes": []},
    {"findAndModify": "c", "query": {}, "update": {"$set": {"a": 1}}}, {"findandmodify": "c", "remove": True},
    {"create": "c"}, {"drop": "c"}, {"dropDatabase": 1}, {"createIndexes": "c", "indexes": []}, {"dropIndexes": "c", "index": "*"},
    {"collMod": "c"}, {"renameCollection": "app.a", "to": "app.b"}, {"applyOps": []}, {"createUser": "u", "pwd": "x", "roles": []},
    {"aggregate": "c", "pipeline": [{"$out": "d"}], "cursor": {}},
    {"aggregate": "c", "pipeline": [{"$match": {}}, {"$merge": {"into": "d"}}], "cursor": {}},
    {"aggregate": "c", "pipeline": [{"$facet": {"a": [{"$out": "d"}]}}], "cursor": {}},  # nested: refused all the same
    {"explain": {"delete": "c", "deletes": []}}, {"explain": {"aggregate": "c", "pipeline": [{"$out": "x"}]}},
    {"mapReduce": "c", "map": "f", "reduce": "g", "out": "target"},
    {"someFutureWriteCommand": 1},  # deny by default
])
def test_read_only_refuses_everything_else(doc):
    denial = check(RO, doc)
    assert denial is not None and denial.reason == "read_only", doc
    assert "read-only role" in denial.why


@pytest.mark.parametrize("doc, db, bad", [
    ({"find": "c"}, "other", "other"),
    ({"find": "c"}, None, None),
    ({"aggregate": "c", "pipeline": [{"$merge": {"into": {"db": "other", "coll": "x"}}}], "cursor": {}}, "app", "other"),
    ({"aggregate": "c", "pipeline": [{"$lookup": {"from": {"db": "other", "coll": "x"}, "as": "y"}}], "cursor": {}}, "app", "other"),
    ({"renameCollection": "app.a", "to": "other.b"}, "admin", "admin"),
    ({"bulkWrite": 1, "ops": [], "nsInfo": [{"ns": "app.a"}, {"ns": "other.b"}]}, "app", "other"),
    ({"explain": {"aggregate": "c", "pipeline": [{"$merge": {"into": {"db": "other", "coll": "x"}}}]}}, "app", "other"),
])
def test_databases_named_anywhere_are_checked(doc, db, bad):
    grant = Grant(roles=("w",), databases=("app",), restricted=True)
    denial = check(grant, doc, db)
    assert denial is not None and denial.reason == "database_not_allowed"
    assert (repr(bad) in denial.why) if bad else "names no database" in denial.why


def test_database_globs_and_neutral_commands():
    assert check(RW, {"insert": "c", "documents": []}, "app_2024") is None
    assert check(RW, {"aggregate": "c", "pipeline": [{"$merge": {"into": {"db": "app_x", "coll": "y"}}}], "cursor": {}}) is None
    for neutral in ({"ping": 1}, {"hello": 1}, {"buildInfo": 1}, {"endSessions": []}, {"connectionStatus": 1}, {"atlasVersion": 1}):
        assert check(RW, neutral, "admin") is None, neutral
    assert check(RW, {"listDatabases": 1}, "admin").reason == "database_not_allowed"


@pytest.mark.parametrize("doc, command", [
    ({"dropDatabase": 1}, "dropDatabase"),
    ({"drop": "c"}, "drop"),
    ({"dropIndexes": "c", "index": "*"}, "dropIndexes"),  # "drop*" glob
    ({"DROPDATABASE": 1}, "DROPDATABASE"),  # case-insensitive, like the statement kinds of SQL
    ({"explain": {"drop": "c"}}, "drop"),
    ({"aggregate": "c", "pipeline": [{"$out": "d"}], "cursor": {}}, "$out"),
])
def test_deny_patterns_match_command_names(doc, command):
    denial = check(RW, doc)
    assert denial is not None and denial.reason == "command_denied" and denial.command == command


def test_deny_patterns_leave_the_rest_alone():
    # A database no role allows is refused as such: deny patterns come from the roles that allow it.
    assert check(RW, {"dropDatabase": 1}, "other").reason == "database_not_allowed"
    assert check(RW, {"insert": "c", "documents": [{}]}) is None
    assert check(RW, {"aggregate": "c", "pipeline": [{"$merge": {"into": "d"}}], "cursor": {}}) is None


def test_grants_are_per_database():
    """As in Postgres, only the roles that allow a database count for it: analyst (read-only, app) plus
    writer (app_*, denies drop) is read-only on app and may write to app_x, where drop is denied."""
    roles = {
        "analyst": RoleConfig("analyst", routes=("*",), databases=("app",), db_users=("*",), read_only=True),
        "writer": RoleConfig("writer", routes=("*",), databases=("app_*",), db_users=("*",), deny_commands=("drop",)),
    }
    policy = AccessPolicy(roles, enforced=True)
    ident = Identity(user="alice", roles=("analyst", "writer"), method="token")
    session_grant = policy.authorize(ident, route="r", database=None, db_user="u")
    assert session_grant.read_only is False and session_grant.roles == ("analyst", "writer")

    def grant_for(db):
        try:
            return policy.authorize(ident, route="r", database=db, db_user="u")
        except Exception:
            return None

    def run(doc, db):
        return check_command(session_grant, grant_for, next(iter(doc)), db, raw(doc))

    assert run({"insert": "c", "documents": [{}]}, "app").reason == "read_only"
    assert run({"insert": "c", "documents": [{}]}, "app_x") is None
    assert run({"drop": "c"}, "app_x").reason == "command_denied"
    assert run({"find": "c"}, "app") is None and run({"find": "c"}, "other").reason == "database_not_allowed"
    # Reading app into app_x touches both: held to the strictest (app is read-only).
    assert run({"aggregate": "c", "pipeline": [{"$merge": {"into": {"db": "app_x", "coll": "y"}}}], "cursor": {}}, "app").reason == "read_only"


def test_read_only_violation_names_the_problem():
    assert read_only_violation("aggregate", raw({"aggregate": "c", "pipeline": [{"$merge": {"into": "x"}}]})) == \
        "aggregate with $merge is not allowed for a read-only role"
    assert read_only_violation("explain", raw({"explain": {"insert": "c"}})) == "explain of insert is not allowed for a read-only role"


# --------------------------------------------------------------------------- identity fixtures


@pytest.fixture
def authority(tmp_path) -> TokenAuthority:
    key = tmp_path / "token.key"
    generate_keys("HS256", str(key))
    cfg = TokenConfig(algorithm="HS256", key_file=str(key), public_key_file=None,
                      registry_file=str(tmp_path / "tokens.json"), revocation_file=str(tmp_path / "revoked.txt"), leeway=0)
    from dbproxy.token_cli import scram_flavours

    return TokenAuthority(cfg, flavours=scram_flavours())  # as `dbproxy token issue` builds it (Mongo's SHA-1 too)


def issue(authority: TokenAuthority, user: str = "alice", roles=("analyst",), ttl: int = 3600) -> tuple[str, str]:
    token, claims = authority.codec.issue(user, roles, ttl)
    authority.registry.add(claims, token)
    return token, claims.jti


MTLS = MtlsConfig(users=(("alice", ("writer",)), ("mallory", ())))


def listener_auth(authority, methods=("token",), anonymous_roles=()) -> ClientAuthenticator:
    return ClientAuthenticator(methods, authority=authority, mtls=MTLS, anonymous_roles=anonymous_roles)


def scram_login(auth: IdentityAuthenticator, mechanism: str, user: str, token: str, *, skip_empty: bool = True):
    """Run a driver-style conversation; return (last outcome, the outcome that carried the identity)."""
    sc = scram.ScramClient(mechanism, user, token)
    start = scram.sasl_start(mechanism, sc.client_first())
    if not skip_empty:
        del start["options"]
    out = auth.handle("saslStart", start)
    assert out.ok, out.reply
    r = scram.parse_sasl_reply(out.reply)
    out = auth.handle("saslContinue", scram.sasl_continue(r.conversation_id, sc.client_final(r.payload)))
    if not out.ok:
        return out, None
    proved = out
    r = scram.parse_sasl_reply(out.reply)
    sc.verify_server_final(r.payload)  # the proxy proved it holds the token's verifier
    if not r.done:
        out = auth.handle("saslContinue", scram.sasl_continue(r.conversation_id, b""))
    return out, proved


# --------------------------------------------------------------------------- IdentityAuthenticator


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-1"])
@pytest.mark.parametrize("skip_empty", [True, False])
def test_scram_with_a_token(authority, mechanism, skip_empty):
    token, jti = issue(authority)
    auth = IdentityAuthenticator(listener_auth(authority))
    out, proved = scram_login(auth, mechanism, "alice", token, skip_empty=skip_empty)
    assert out.ok and out.done and auth.authenticated
    assert proved.identity == Identity(user="alice", roles=("analyst",), method="token", token_id=jti)
    assert out.identity is None or out is proved  # the identity is reported once
    assert token not in repr(out) and token not in repr(auth)


def test_scram_picks_the_token_used_and_refuses_others(authority):
    first, jti1 = issue(authority, roles=("analyst",))
    second, jti2 = issue(authority, roles=("writer",))
    bobs, _ = issue(authority, user="bob")
    for token, jti in ((first, jti1), (second, jti2)):
        _, proved = scram_login(IdentityAuthenticator(listener_auth(authority)), "SCRAM-SHA-256", "alice", token)
        assert proved.identity.token_id == jti
    out, proved = scram_login(IdentityAuthenticator(listener_auth(authority)), "SCRAM-SHA-256", "alice", bobs)
    assert proved is None and out.reply["code"] == 18 and out.reply["errmsg"] == "Authentication failed."
    assert out.reason == "scram_no_match" and out.failure is not None and out.user == "alice"


def test_plain_needs_tls_and_a_valid_token(authority):
    token, jti = issue(authority)
    payload = b"\x00alice\x00" + token.encode()
    plain = IdentityAuthenticator(listener_auth(authority), client_tls=False)
    out = plain.handle("saslStart", scram.sasl_start("PLAIN", payload))
    assert out.reply["code"] == 18 and out.reason == "plain_without_tls" and "only over TLS" in out.reply["errmsg"]
    assert not plain.authenticated
    tls = IdentityAuthenticator(listener_auth(authority), client_tls=True)
    out = tls.handle("saslStart", scram.sasl_start("PLAIN", payload))
    assert out.ok and out.done and out.identity.token_id == jti
    for bad, reason in ((b"\x00bob\x00" + token.encode(), "token_wrong_user"),
                        (b"\x00alice\x00not-a-token", "token_malformed"),
                        (b"mallory\x00alice\x00" + token.encode(), "plain_authzid_differs")):
        out = IdentityAuthenticator(listener_auth(authority), client_tls=True).handle("saslStart", scram.sasl_start("PLAIN", bad))
        assert out.reply["code"] == 18 and out.reason == reason, reason
        assert token not in json.dumps(out.reply, default=str)


def test_mechanisms_follow_the_listener(authority):
    assert IdentityAuthenticator(listener_auth(authority)).mechanisms() == ["SCRAM-SHA-1", "SCRAM-SHA-256", "PLAIN"]
    assert IdentityAuthenticator(listener_auth(authority, ("mtls",))).mechanisms() == []
    out = IdentityAuthenticator(listener_auth(authority, ("mtls",))).handle("saslStart", scram.sasl_start("SCRAM-SHA-256", b"n,,n=a,r=x"))
    assert out.reply["code"] == 334 and out.reason == "mechanism_unavailable"
    out = IdentityAuthenticator(listener_auth(authority)).handle("saslStart", {"saslStart": 1, "mechanism": "GSSAPI", "payload": b""})
    assert out.reply["code"] == 334


def test_x509_uses_the_verified_certificate(authority):
    cert = Identity(user="alice", roles=("writer",), method="mtls")
    auth = IdentityAuthenticator(listener_auth(authority, ("mtls",)), client_tls=True, certificate=cert)
    out = auth.handle("authenticate", {"authenticate": 1, "mechanism": "MONGODB-X509", "user": "CN=alice,O=test"})
    assert out.ok and out.identity == cert and out.reply["user"] == "CN=alice,O=test"
    wrong = IdentityAuthenticator(listener_auth(authority, ("mtls",)), certificate=cert)
    out = wrong.handle("authenticate", {"authenticate": 1, "mechanism": "MONGODB-X509", "user": "CN=bob"})
    assert out.reply["code"] == 18 and out.reason == "certificate_wrong_user"
    none = IdentityAuthenticator(listener_auth(authority, ("mtls",)))
    out = none.handle("authenticate", {"authenticate": 1, "mechanism": "MONGODB-X509"})
    assert out.reply["code"] == 18 and out.reason == "certificate_missing"
    assert none.speculative({"authenticate": 1, "mechanism": "MONGODB-X509"}) is None


def test_one_identity_per_connection(authority):
    token, _ = issue(authority)
    auth = IdentityAuthenticator(listener_auth(authority))
    sc = scram.ScramClient("SCRAM-SHA-256", "alice", token)
    start = scram.sasl_start("SCRAM-SHA-256", sc.client_first())
    del start["options"]  # a driver without skipEmptyExchange: an empty step follows the proof
    r = scram.parse_sasl_reply(auth.handle("saslStart", start).reply)
    proved = auth.handle("saslContinue", scram.sasl_continue(r.conversation_id, sc.client_final(r.payload)))
    auth.lock(proved.identity.user)  # the session is established at the proof
    done = auth.handle("saslContinue", scram.sasl_continue(r.conversation_id, b""))
    assert done.ok and done.done and done.identity is None
    again = auth.handle("saslStart", scram.sasl_start("SCRAM-SHA-256", b"n,,n=bob,r=abc"))
    assert again.reply["code"] == 13 and "already authenticated as 'alice'" in again.reply["errmsg"]
    assert auth.handle("logout", {"logout": 1}).reply["code"] == 13
    assert auth.speculative({"saslStart": 1, "mechanism": "SCRAM-SHA-256", "payload": b"n,,n=bob,r=abc"}) is None
    # Established some other way (a certificate) while a conversation was open: it cannot finish.
    other = IdentityAuthenticator(listener_auth(authority))
    sc = scram.ScramClient("SCRAM-SHA-256", "alice", token)
    r = scram.parse_sasl_reply(other.handle("saslStart", scram.sasl_start("SCRAM-SHA-256", sc.client_first())).reply)
    other.lock("alice")
    out = other.handle("saslContinue", scram.sasl_continue(r.conversation_id, sc.client_final(r.payload)))
    assert not out.ok and out.identity is None


# --------------------------------------------------------------------------- the gated stages


class SessionAudit:
    """Like audit.recorder.SessionAudit: every event carries the session's identity as it is at emit time."""

    def __init__(self, session) -> None:
        self.session = session
        self.events: list[dict] = []

    def emit(self, kind: str, **fields) -> dict:
        ident = self.session.identity
        event = {"event": kind, "uid": f"u{len(self.events)}", "user": ident.user, "roles": list(ident.roles),
                 "auth_method": ident.method, "token_id": ident.token_id, **fields}
        self.events.append(event)
        return event

    def on_session_start(self, *, success: bool, **fields) -> dict:
        self.session.started = success
        return self.emit(ev.SESSION_START, success=success, **fields)

    def on_query(self, query: str, **fields) -> dict:
        return self.emit(ev.QUERY, db_query=query, **fields)

    def on_result(self, *, success: bool, **fields) -> dict:
        return self.emit(ev.RESULT, success=success, **fields)

    def of(self, kind: str) -> list[dict]:
        return [e for e in self.events if e["event"] == kind]


@attrs.define(eq=False)
class FakeSession:
    id: str = "s1"
    listener: str = "l1"
    identity: Identity = PENDING
    started: bool = False
    audit: object = None


ROLES = {
    "analyst": RoleConfig("analyst", routes=("*",), databases=("app",), db_users=("*",), read_only=True),
    "writer": RoleConfig("writer", routes=("*",), databases=("app",), db_users=("*",), deny_commands=("dropDatabase",)),
}


def gated(authority, *, methods=("token",), limits=None, certificate=None, legacy=None, client_tls=False, anonymous_roles=()):
    session = FakeSession()
    session.audit = audit = SessionAudit(session)
    la = ListenerAccess("l1", listener_auth(authority, methods, anonymous_roles), AccessPolicy(ROLES, enforced=True),
                        limits or ConnectionLimits(None))
    if legacy is not None:
        auth = legacy
    else:
        auth = IdentityAuthenticator(la.auth, client_tls=client_tls, certificate=certificate)
    state = MongoSessionState(auth=auth, max_message_size=wire.DEFAULT_MAX_MESSAGE_SIZE)
    state.gate = MongoAccess(la, session, auth, route="r1", db_user="admin", start_fields={"application_name": "t"},
                             certificate=certificate)
    return state, session, audit, Stages(client_stages(state, audit)), Stages(backend_stages(state, audit))


def msg(data: bytes) -> wire.WireMessage:
    return wire.WireMessage.from_bytes(data)


def op(doc: dict, rid: int, **kw) -> wire.WireMessage:
    return msg(wire.encode_op_msg(doc, request_id=rid, **kw))


def reply_doc(data: bytes) -> dict:
    m = msg(data)
    if m.op_code == wire.OP_REPLY:
        return wire.decode_document(wire.parse_op_reply(m).documents[0])
    return wire.decode_document(wire.parse_op_msg(m).body_raw)


def test_with_access_control_the_audit_observes_before_any_refusal(authority):
    """Pipeline order: the session gate, then the audit observer, then every stage that may refuse."""
    state, session, audit, client, backend = gated(authority)
    kinds = [type(s) for s in client.stages]
    assert kinds[:2] == [SessionGate, CommandAudit]
    assert {type(s).__name__ for s in client.stages[2:]} >= {"ClientAuth", "AccessPolicy"}


def test_before_login_only_the_handshake_runs_unaudited(authority):
    state, session, audit, client, backend = gated(authority)
    v = client.handle(op({"hello": 1, "saslSupportedMechs": "admin.alice", "$db": "admin"}, 1), None)
    assert v is not None and v.replace  # forwarded, rewritten (saslSupportedMechs is the proxy's)
    out = backend.handle(msg(wire.encode_op_msg({"isWritablePrimary": True, "maxWireVersion": 21, "ok": 1.0}, response_to=1)), None)
    assert reply_doc(out.replace[0])["saslSupportedMechs"] == ["SCRAM-SHA-1", "SCRAM-SHA-256", "PLAIN"]
    v = client.handle(op({"find": "c", "filter": {}, "$db": "app"}, 2), None)
    assert v.replace == () and reply_doc(v.reply)["code"] == 13 and "requires authentication" in reply_doc(v.reply)["errmsg"]
    v = client.handle(op({"insert": "c", "documents": [{"a": 1}], "$db": "app"}, 3, flags=wire.MORE_TO_COME), None)
    assert v.replace == () and v.reply == b""  # fire-and-forget: dropped, no answer
    assert client.handle(op({"ping": 1, "$db": "admin"}, 4), None) is None
    assert [e["event"] for e in audit.events] == [ev.ACCESS_DENIED, ev.ACCESS_DENIED]  # no query/result/start
    assert {e["reason"] for e in audit.events} == {"unauthenticated"} and not session.started
    assert state.gate.handshake == {"hello": 1, "ping": 1}


def test_speculative_login_establishes_then_rbac_per_command(authority):
    token, jti = issue(authority, roles=("analyst",))
    state, session, audit, client, backend = gated(authority)
    sc = scram.ScramClient("SCRAM-SHA-256", "alice", token)
    spec = scram.sasl_start("SCRAM-SHA-256", sc.client_first(), db="admin")
    client.handle(op({"hello": 1, "speculativeAuthenticate": spec, "$db": "admin"}, 1), None)
    out = backend.handle(msg(wire.encode_op_msg({"isWritablePrimary": True, "ok": 1.0}, response_to=1)), None)
    first = scram.parse_sasl_reply(reply_doc(out.replace[0])["speculativeAuthenticate"])
    v = client.handle(op(scram.sasl_continue(first.conversation_id, sc.client_final(first.payload), db="admin"), 2), None)
    answer = scram.parse_sasl_reply(reply_doc(v.reply))
    sc.verify_server_final(answer.payload)
    assert answer.done and session.identity.token_id == jti and session.started
    start = audit.of(ev.SESSION_START)[0]
    assert (start["user"], start["token_id"], start["client_auth"], start["client_auth_speculative"]) == ("alice", jti, "SCRAM-SHA-256", True)
    assert start["granted_roles"] == ["analyst"] and start["read_only"] is True
    assert start["handshake_commands"] == {"hello": 1, "saslContinue": 1}
    assert client.handle(op({"find": "c", "filter": {}, "$db": "app"}, 3), None) is None  # forwarded as received
    v = client.handle(op({"insert": "c", "documents": [{"a": 1}], "$db": "app"}, 4), None)
    assert v.replace == () and reply_doc(v.reply)["code"] == 13
    assert reply_doc(v.reply)["errmsg"] == "not authorized on app to execute command insert (dbproxy: insert is not allowed for a read-only role)"
    v = client.handle(op({"find": "c", "$db": "other"}, 5), None)
    assert reply_doc(v.reply)["code"] == 13 and "'other'" in reply_doc(v.reply)["errmsg"]
    status = reply_doc(client.handle(op({"connectionStatus": 1, "$db": "admin"}, 6), None).reply)
    assert status["authInfo"]["authenticatedUsers"] == [{"user": "alice", "db": "$dbproxy"}]
    after = audit.events[audit.events.index(start):]
    assert all((e["user"], e["token_id"]) == ("alice", jti) for e in after)
    assert [e["reason"] for e in audit.of(ev.ACCESS_DENIED)] == ["read_only", "database_not_allowed"]
    denied_queries = [e for e in audit.of(ev.QUERY) if e["command"] in ("insert",)]
    results = {e["query_uid"]: e for e in audit.of(ev.RESULT)}
    assert results[denied_queries[0]["uid"]]["code"] == 13 and results[denied_queries[0]["uid"]]["success"] is False


def test_failed_login_is_audited_and_the_connection_stays_open(authority):
    issue(authority)
    state, session, audit, client, _ = gated(authority)
    sc = scram.ScramClient("SCRAM-SHA-1", "alice", "wrong-token")
    r = scram.parse_sasl_reply(reply_doc(client.handle(op(scram.sasl_start("SCRAM-SHA-1", sc.client_first(), db="admin"), 1), None).reply))
    v = client.handle(op(scram.sasl_continue(r.conversation_id, sc.client_final(r.payload), db="admin"), 2), None)
    assert reply_doc(v.reply)["code"] == 18 and not v.close
    (denial,) = audit.of(ev.ACCESS_DENIED)
    assert (denial["user"], denial["auth_method"], denial["reason"], denial["attempted_user"]) == ("unauthenticated", "token", "scram_no_match", "alice")
    assert session.identity == PENDING and not session.started and state.gate.auth_failures == 1


def test_authorization_and_limit_refusals(authority):
    nobody, _ = issue(authority, user="nobody", roles=())
    state, session, audit, client, _ = gated(authority, client_tls=True)
    v = client.handle(op(scram.sasl_start("PLAIN", b"\x00nobody\x00" + nobody.encode(), db="$external"), 1), None)
    assert reply_doc(v.reply)["code"] == 13 and "permission denied" in reply_doc(v.reply)["errmsg"] and not v.close
    assert audit.of(ev.ACCESS_DENIED)[0]["user"] == "nobody"  # the denial names who was refused
    assert session.identity == PENDING and not state.auth.authenticated

    limits = ConnectionLimits(LimitsConfig(identities={"carol": 1}))
    carol, _ = issue(authority, user="carol", roles=("analyst",))
    login = scram.sasl_start("PLAIN", b"\x00carol\x00" + carol.encode(), db="$external")
    first = gated(authority, limits=limits, client_tls=True)
    assert reply_doc(first[3].handle(op(login, 1), None).reply)["ok"] == 1.0
    second = gated(authority, limits=limits, client_tls=True)
    second[1].id = "s2"
    v = second[3].handle(op(login, 1), None)
    assert reply_doc(v.reply)["code"] == 13 and "too many connections" in reply_doc(v.reply)["errmsg"] and v.close
    assert second[2].of(ev.ACCESS_DENIED)[0]["reason"] == "too_many_connections_identity"


def test_certificate_and_anonymous_identities_establish_at_the_first_command(authority):
    cert = Identity(user="alice", roles=("writer",), method="mtls")
    state, session, audit, client, _ = gated(authority, methods=("mtls",), certificate=cert, client_tls=True)
    assert client.handle(op({"hello": 1, "$db": "admin"}, 1), None) is None and not session.started
    assert client.handle(op({"insert": "c", "documents": [{}], "$db": "app"}, 2), None) is None
    assert session.identity == cert and audit.of(ev.SESSION_START)[0]["client_auth"] == "mtls"
    v = client.handle(op({"dropDatabase": 1, "$db": "app"}, 3), None)
    assert "dropDatabase is denied by role policy 'dropDatabase'" in reply_doc(v.reply)["errmsg"]

    # An anonymous-only listener keeps its client_auth policy for credentials (claims, not identities).
    legacy = ClientAuthPolicy.from_options({}).session()
    state, session, audit, client, _ = gated(authority, methods=("anonymous",), legacy=legacy, anonymous_roles=("analyst",))
    v = client.handle(op(scram.sasl_start("PLAIN", b"\x00claimed\x00whatever"), 1), None)
    assert reply_doc(v.reply)["ok"] == 1.0 and not session.started
    assert client.handle(op({"find": "c", "$db": "app"}, 2), None) is None
    start = audit.of(ev.SESSION_START)[0]
    assert (start["user"], start["roles"], start["client_auth"], start["client_user"]) == ("anonymous", ["analyst"], "anonymous", "claimed")


def test_legacy_opcodes_end_a_gated_session(authority):
    state, session, audit, client, _ = gated(authority)
    legacy_insert = wire.WireMessage.from_bytes(wire.HEADER.pack(16 + 4 + 7 + 5, 9, 0, wire.OP_INSERT) + b"\0\0\0\0app.c\0\0" + b"\x05\0\0\0\0")
    v = client.handle(legacy_insert, None)
    assert v.close and v.replace == () and audit.of(ev.ACCESS_DENIED)[0]["reason"] == "legacy_opcode"


def test_identity_mode_rejects_listener_password_options(tmp_path):
    secret = tmp_path / "pw"
    secret.write_text("x\n")
    key = tmp_path / "token.key"
    generate_keys("HS256", str(key))
    doc = {
        "identity": {"token": {"algorithm": "HS256", "key_file": str(key)}},
        "roles": {"r": {"routes": ["*"], "databases": ["*"], "db_users": ["*"]}},
        "listeners": [{"name": "m", "protocol": "mongo", "listen": "127.0.0.1:0", "auth": {"methods": ["token"]},
                       "options": {"client_password_file": str(secret)},
                       "routes": [{"name": "r", "backend": {"address": "127.0.0.1:1", "user": "u",
                                                            "auth": {"method": "scram-sha-256", "password_file": str(secret)}}}]}],
    }
    path = tmp_path / "c.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigErrors) as info:
        load_config(str(path), default_registry())
    assert "listeners[0].options.client_password_file" in str(info.value)
    del doc["listeners"][0]["options"]
    path.write_text(json.dumps(doc))
    cfg = load_config(str(path), default_registry())
    assert cfg.listeners[0].auth.methods == ("token",)
