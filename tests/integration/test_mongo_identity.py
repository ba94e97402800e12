"""Identity and access through the Mongo engine: real FerretDB 1.24, real pymongo and mongosh, the real CLI.

Listeners of the proxy (one ``dbproxy serve`` for the module, one FerretDB):
  tok      auth token, plain TCP      (SCRAM-SHA-256 / SCRAM-SHA-1; PLAIN refused: no TLS)
  toktls   auth token, listener TLS   (PLAIN takes the token itself)
  mtls     auth mtls, TLS + client CA (identity = certificate CN)
  mixed    auth token + anonymous     (anonymous_roles [analyst])
  limited  auth token, at most 2 sessions on the listener

One route (FerretDB as its admin user, proxy-owned SCRAM-SHA-256).  Roles:
analyst (read-only, database app), writer (databases app and app_*; denies
dropDatabase, drop and aggregate $out), lab (databases app_*).  Limits: carol 1 session.
Tokens come from ``dbproxy token issue`` run as a subprocess, as an operator would.
"""

from __future__ import annotations

import os
import secrets
import socket
import struct
import subprocess
import time
from pathlib import Path

import bson
import pymongo
import pytest
from pymongo.errors import OperationFailure, ServerSelectionTimeoutError

from tests.support import (
    BAD_TOKEN_CASES, TOKEN_IDENTITY, ProxyProcess, TokenEnv, assert_no_token_secrets, issue_bad_tokens,
    password_backend, recv_exact, start_ferret, token_keygen, wait_until,
)

pytestmark = pytest.mark.integration

OP_MSG = 2013
UNAUTHORIZED, AUTHENTICATION_FAILED = 13, 18


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ferret(tmp_path_factory):
    server = start_ferret(tmp_path_factory, "ferret-ident", mongosh=True)
    yield server
    server.stop()


class Env(TokenEnv):
    def __init__(self, proc: ProxyProcess, workdir: Path, ca: Path, certs: dict, ferret) -> None:
        super().__init__(proc, workdir)
        self.ca = ca
        self.certs = certs  # name -> combined cert+key PEM (pymongo's tlsCertificateKeyFile)
        self.ferret = ferret

    def client(self, listener: str, user: str | None = None, token: str | None = None, *, tls: bool | None = None,
               cert: str | None = None, app: str | None = None, **kw) -> pymongo.MongoClient:
        kw.setdefault("serverSelectionTimeoutMS", 10_000)
        kw.setdefault("appname", app or f"t-{secrets.token_hex(4)}")
        if user is not None:
            kw.update(username=user, password=token)
        if tls is None:
            tls = listener in ("toktls", "mtls")
        if tls:
            kw.update(tls=True, tlsCAFile=str(self.ca))
            if cert is not None:
                kw["tlsCertificateKeyFile"] = str(self.certs[cert])
        return pymongo.MongoClient("127.0.0.1", self.port(listener), **kw)

    def direct(self):
        """FerretDB itself, bypassing the proxy (to check what the proxy did not forward)."""
        return self.ferret.client()


@pytest.fixture(scope="module")
def env(ferret, tmp_path_factory):
    from scripts.peers.certs import make_ca, make_cert

    workdir = tmp_path_factory.mktemp("mongoident")
    ca = make_ca(workdir / "ca")
    cert, key = make_cert(workdir / "ca", ca, "proxy", sans=["localhost", "127.0.0.1"])
    certs = {}
    for name, issuer in (("alice", ca), ("mallory", ca), ("stranger", None)):
        if issuer is None:
            other = make_ca(workdir / "other-ca", name="untrusted CA")
            c, k = make_cert(workdir / "other-ca", other, "alice", client=True)
        else:
            c, k = make_cert(workdir / "clients", issuer, name, client=True)
        pem = workdir / f"{name}.pem"
        pem.write_bytes(Path(c).read_bytes() + Path(k).read_bytes())
        certs[name] = pem
    token_keygen(workdir)
    route = [{"name": "app", "backend": password_backend(workdir, f"127.0.0.1:{ferret.port}", ferret.user, ferret.password, "scram-sha-256")}]
    tls = {"cert_file": str(cert), "key_file": str(key)}

    def listener(name, **extra):
        return {"name": name, "protocol": "mongo", "listen": "127.0.0.1:0", "routes": route, **extra}

    config = {
        "identity": {
            "token": TOKEN_IDENTITY,
            "mtls": {"subject": "cn", "users": {"alice": ["writer"], "mallory": []}},
        },
        "roles": {
            "analyst": {"routes": ["*"], "databases": ["app"], "db_users": ["*"], "read_only": True},
            "lab": {"routes": ["*"], "databases": ["app_*"], "db_users": ["*"]},
            "writer": {"routes": ["app"], "databases": ["app", "app_*"], "db_users": ["*"],
                       "deny_commands": ["dropDatabase", "drop", "$out"]},
        },
        "limits": {"identities": {"carol": 1}, "listeners": {"limited": 2}},
        "listeners": [
            listener("tok", auth={"methods": ["token"]}),
            listener("toktls", tls=tls, auth={"methods": ["token"]}),
            listener("mtls", tls=dict(tls, client_ca_file=str(ca[0])), auth={"methods": ["mtls"]}),
            listener("mixed", auth={"methods": ["token", "anonymous"], "anonymous_roles": ["analyst"]}),
            listener("limited", auth={"methods": ["token"]}),
        ],
        "audit": {"sinks": [{"type": "jsonl", "path": "audit.jsonl"}]},
    }
    proc = ProxyProcess(workdir, config, name="proxy").start()
    with ferret.client() as c:
        c.app.seed.drop()
        c.app.seed.insert_many([{"_id": i, "k": i % 3} for i in range(10)])
        c.other.secret.drop()
        c.other.secret.insert_one({"_id": 1, "s": "not for analysts"})
    e = Env(proc, workdir, ca[0], certs, ferret)
    yield e
    proc.stop()


def _sid_events(evs: list[dict], sid: str) -> list[dict]:
    return [e for e in evs if e.get("sid") == sid]


def _starts(evs: list[dict], **match) -> list[dict]:
    return [e for e in evs if e["event"] == "db.session.start" and all(e.get(k) == v for k, v in match.items())]


def _denials(evs: list[dict], **match) -> list[dict]:
    return [e for e in evs if e["event"] == "db.session.access_denied" and all(e.get(k) == v for k, v in match.items())]


def _code(exc_info) -> int:
    return exc_info.value.code


# --------------------------------------------------------------------------- raw wire helpers


def _op_msg(doc: dict, request_id: int) -> bytes:
    body = struct.pack("<I", 0) + b"\x00" + bson.encode(doc)
    return struct.pack("<iiii", 16 + len(body), request_id, 0, OP_MSG) + body


def _recv(sock: socket.socket) -> dict | None:
    header = recv_exact(sock, 16)
    if header is None:
        return None
    length, _rid, _to, opcode = struct.unpack("<iiii", header)
    body = recv_exact(sock, length - 16)
    assert opcode == OP_MSG and body is not None
    return bson.decode(body[5:])


def _raw(env, listener: str = "tok") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", env.port(listener)), timeout=15)
    sock.sendall(_op_msg({"hello": 1, "$db": "admin", "client": {"application": {"name": "t-raw"}, "driver": {"name": "raw", "version": "0"}}}, 1))
    assert _recv(sock)["ok"] == 1.0
    return sock


# --------------------------------------------------------------------------- mongosh


def mongosh(env, uri: str, script: str, *extra: str) -> subprocess.CompletedProcess:
    from scripts.peers.ferretdb_server import mongosh_path

    home = env.workdir / "mongosh-home"
    home.mkdir(exist_ok=True)
    return subprocess.run(
        [str(mongosh_path()), "--quiet", uri, *extra, "--eval", script],
        capture_output=True, text=True, timeout=180,
        env={**os.environ, "HOME": str(home), "MONGOSH_NO_TELEMETRY": "1"},
    )


# --------------------------------------------------------------------------- valid tokens


@pytest.mark.parametrize("mechanism", ["DEFAULT", "SCRAM-SHA-256", "SCRAM-SHA-1"])
def test_token_scram_pymongo(env, mechanism):
    token, jti = env.issue("alice", "writer")
    kw = {} if mechanism == "DEFAULT" else {"authMechanism": mechanism}
    with env.client("tok", "alice", token, **kw) as c:
        c.app.scram.insert_one({"via": mechanism})
        assert c.app.scram.count_documents({"via": mechanism}) >= 1
        status = c.app.command("connectionStatus")
    # connectionStatus is the proxy's: the client's identity, not the proxy's backend login.
    assert status["authInfo"]["authenticatedUsers"] == [{"user": "alice", "db": "$dbproxy"}]
    assert status["authInfo"]["authenticatedUserRoles"] == [{"role": "writer", "db": "$dbproxy"}]
    evs = env.wait_events(lambda evs: any(e.get("token_id") == jti and e["event"] == "db.session.end" for e in evs))
    start = _starts(evs, token_id=jti)[0]
    expected = "SCRAM-SHA-256" if mechanism == "DEFAULT" else mechanism
    assert (start["user"], start["roles"], start["auth_method"], start["client_auth"]) == ("alice", ["writer"], "token", expected)
    assert start["success"] is True and start["granted_roles"] == ["writer"] and start["read_only"] is False
    # pymongo authenticates inside its first hello (speculative authentication) for SCRAM.
    assert start["client_auth_speculative"] is True
    assert start["handshake_commands"].get("saslContinue") == 1
    mine = _sid_events(evs, start["sid"])
    assert any(e["event"] == "db.session.query" and e["command"] == "insert" for e in mine)
    for e in mine:
        assert (e["user"], e["roles"], e["auth_method"], e["token_id"]) == ("alice", ["writer"], "token", jti), e


def test_token_plain_over_tls_pymongo(env):
    token, jti = env.issue("alice", "writer")
    with env.client("toktls", "alice", token, authMechanism="PLAIN") as c:
        c.app.plain.insert_one({"over": "tls"})
        assert c.app.plain.find_one({"over": "tls"}, {"_id": 0}) == {"over": "tls"}
    evs = env.wait_events(lambda evs: bool(_starts(evs, token_id=jti)))
    start = _starts(evs, token_id=jti)[0]
    assert start["client_auth"] == "PLAIN" and start["client_tls"] is True and start["user"] == "alice"


def test_token_plain_without_tls_refused_unverified(env):
    token, _ = env.issue("alice", "writer")
    mark = env.mark()
    with env.client("tok", "alice", token, authMechanism="PLAIN") as c:
        with pytest.raises(OperationFailure) as info:
            c.app.plain.find_one()
    assert _code(info) == AUTHENTICATION_FAILED and "only over TLS" in str(info.value)
    evs = env.wait_events(lambda evs: bool(_denials(evs, reason="plain_without_tls")), since=mark)
    d = _denials(evs, reason="plain_without_tls")[0]
    assert d["stage"] == "authenticate" and d["attempted_user"] == "alice" and d["user"] == "unauthenticated"


def test_token_mongosh(env):
    token, jti = env.issue("alice", "writer")
    script = ("db.getSiblingDB('app').sh.insertOne({by: 'mongosh'}); "
              "print('N=' + db.getSiblingDB('app').sh.countDocuments({by: 'mongosh'})); "
              "print('WHO=' + db.runCommand({connectionStatus: 1}).authInfo.authenticatedUsers[0].user)")
    port = env.port("tok")
    out = mongosh(env, f"mongodb://127.0.0.1:{port}/app", script, "-u", "alice", "-p", token)
    assert out.returncode == 0, out.stderr + out.stdout
    assert "WHO=alice" in out.stdout.split() and any(w.startswith("N=") and int(w[2:]) >= 1 for w in out.stdout.split())
    sha1 = mongosh(env, f"mongodb://127.0.0.1:{port}/app", "print('PING=' + db.runCommand({ping: 1}).ok)",
                   "-u", "alice", "-p", token, "--authenticationMechanism", "SCRAM-SHA-1")
    assert sha1.returncode == 0 and "PING=1" in sha1.stdout.split(), sha1.stderr + sha1.stdout
    plain = mongosh(env, f"mongodb://localhost:{env.port('toktls')}/app", "print('PING=' + db.runCommand({ping: 1}).ok)",
                    "-u", "alice", "-p", token, "--authenticationMechanism", "PLAIN", "--tls", "--tlsCAFile", str(env.ca))
    assert plain.returncode == 0 and "PING=1" in plain.stdout.split(), plain.stderr + plain.stdout
    evs = env.wait_events(lambda evs: {s["client_auth"] for s in _starts(evs, token_id=jti)} >= {"SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN"})
    drivers = {s.get("client_driver") or "" for s in _starts(evs, token_id=jti)}
    assert any("nodejs" in d for d in drivers), drivers


# --------------------------------------------------------------------------- refused tokens


@pytest.fixture(scope="module")
def bad_tokens(env):
    return issue_bad_tokens(env, "writer")


CASES = BAD_TOKEN_CASES


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-1"])
@pytest.mark.parametrize("case", CASES)
def test_bad_token_refused_scram(env, bad_tokens, case, mechanism):
    token, _, _ = bad_tokens[case]
    mark = env.mark()
    with env.client("tok", "alice", token, authMechanism=mechanism) as c:
        with pytest.raises(OperationFailure) as info:
            c.app.seed.find_one()
    assert _code(info) == AUTHENTICATION_FAILED and "Authentication failed" in str(info.value)
    # SCRAM never shows the proxy the token: no verifier of alice's active tokens matched the proof.
    evs = env.wait_events(lambda evs: bool(_denials(evs, stage="authenticate")), since=mark)
    d = _denials(evs, stage="authenticate")[0]
    assert (d["reason"], d["client_auth"], d["attempted_user"], d["success"]) == ("scram_no_match", mechanism, "alice", False)
    assert (d["user"], d["auth_method"], d["roles"]) == ("unauthenticated", "token", []) and "token_id" not in d


@pytest.mark.parametrize("case", CASES)
def test_bad_token_refused_plain(env, bad_tokens, case):
    token, reason, token_id = bad_tokens[case]
    mark = env.mark()
    with env.client("toktls", "alice", token, authMechanism="PLAIN") as c:
        with pytest.raises(OperationFailure) as info:
            c.app.seed.find_one()
    assert _code(info) == AUTHENTICATION_FAILED
    evs = env.wait_events(lambda evs: bool(_denials(evs, reason=reason)), since=mark)
    d = _denials(evs, reason=reason)[0]
    assert d["stage"] == "authenticate" and d["client_auth"] == "PLAIN" and d["success"] is False
    assert d.get("attempted_token_id") == token_id and "token_id" not in d


def test_bad_tokens_refused_mongosh(env, bad_tokens):
    for case in ("expired", "revoked", "other-user"):
        out = mongosh(env, f"mongodb://127.0.0.1:{env.port('tok')}/app", "print('PING=' + db.runCommand({ping: 1}).ok)",
                      "-u", "alice", "-p", bad_tokens[case][0])
        assert out.returncode != 0, case
        assert "Authentication failed" in out.stdout + out.stderr, (case, out.stdout, out.stderr)


def test_revocation_is_seen_by_the_running_proxy(env):
    token, jti = env.issue("alice", "writer")
    with env.client("tok", "alice", token) as c:
        assert c.app.seed.count_documents({}) == 10
    env.revoke(jti)
    for listener, kw in (("tok", {}), ("toktls", {"authMechanism": "PLAIN"})):
        with env.client(listener, "alice", token, **kw) as c:
            with pytest.raises(OperationFailure) as info:
                c.app.seed.find_one()
        assert _code(info) == AUTHENTICATION_FAILED, listener


# --------------------------------------------------------------------------- mTLS


def test_mtls_identity_from_certificate(env):
    mark = env.mark()
    with env.client("mtls", cert="alice", app="t-mtls-alice") as c:
        c.app.mtls.insert_one({"by": "certificate"})
        assert c.app.mtls.count_documents({"by": "certificate"}) >= 1
    # …and with the explicit MONGODB-X509 mechanism (speculative in pymongo's hello).
    with env.client("mtls", cert="alice", authMechanism="MONGODB-X509", app="t-mtls-x509") as c:
        assert c.app.mtls.count_documents({}) >= 1
    evs = env.wait_events(lambda evs: len(_starts(evs, listener="mtls", user="alice")) >= 2, since=mark)
    by_app = {s["application_name"]: s for s in _starts(evs, listener="mtls", user="alice")}
    implicit, x509 = by_app["t-mtls-alice"], by_app["t-mtls-x509"]
    assert (implicit["auth_method"], implicit["roles"], implicit["client_auth"]) == ("mtls", ["writer"], "mtls")
    assert x509["client_auth"] == "MONGODB-X509" and x509["auth_method"] == "mtls" and "token_id" not in x509


def test_mtls_without_certificate_refused(env):
    mark = env.mark()
    with env.client("mtls", app="t-mtls-nocert") as c:
        assert c.admin.command("ping")["ok"] == 1.0  # the handshake works without an identity
        with pytest.raises(OperationFailure) as info:
            c.app.seed.find_one()
    assert _code(info) == UNAUTHORIZED and "requires a client certificate" in str(info.value)
    with env.client("mtls", authMechanism="MONGODB-X509", username="CN=alice") as c:
        with pytest.raises(OperationFailure) as info:
            c.app.seed.find_one()
    assert _code(info) == AUTHENTICATION_FAILED
    evs = env.wait_events(lambda evs: bool(_denials(evs, reason="certificate_missing", stage="command"))
                          and bool(_denials(evs, reason="certificate_missing", stage="authenticate")), since=mark)
    assert all(d["success"] is False for d in _denials(evs, reason="certificate_missing"))


def test_mtls_untrusted_or_roleless_certificate_refused(env):
    # A certificate from a CA the listener does not trust fails the TLS handshake itself.
    with env.client("mtls", cert="stranger", serverSelectionTimeoutMS=2000) as c:
        with pytest.raises(ServerSelectionTimeoutError):
            c.admin.command("ping")
    # mallory's certificate is valid but maps to no role: deny by default.
    mark = env.mark()
    with env.client("mtls", cert="mallory") as c:
        with pytest.raises(OperationFailure) as info:
            c.app.seed.find_one()
    assert _code(info) == UNAUTHORIZED and "permission denied" in str(info.value)
    evs = env.wait_events(lambda evs: bool(_denials(evs, user="mallory")), since=mark)
    d = _denials(evs, user="mallory")[0]
    assert (d["stage"], d["reason"], d["auth_method"]) == ("connect", "no_role_allows", "mtls")


# --------------------------------------------------------------------------- RBAC per command


def test_role_without_access_to_database_refused(env):
    token, jti = env.issue("alice", "analyst")
    with env.client("tok", "alice", token) as c:
        assert c.app.seed.count_documents({}) == 10
        with pytest.raises(OperationFailure) as info:
            c.other.secret.find_one()
        assert _code(info) == UNAUTHORIZED and "not authorized on other to execute command find" in str(info.value)
        assert c.app.seed.find_one({"_id": 1})["k"] == 1  # the session goes on
    writer, _ = env.issue("alice", "writer")
    with env.client("tok", "alice", writer) as c:
        with pytest.raises(OperationFailure) as info:
            c.other.secret.insert_one({"_id": 2, "s": "should never arrive"})
        assert _code(info) == UNAUTHORIZED
        # A write naming another database inside an allowed one ($merge into other.*) is refused too.
        with pytest.raises(OperationFailure) as info:
            list(c.app.seed.aggregate([{"$merge": {"into": {"db": "other", "coll": "secret"}}}]))
        assert _code(info) == UNAUTHORIZED and "'other'" in str(info.value)
        c.app_extra.t.insert_one({"glob": "app_*"})  # app_* is allowed
    with env.direct() as d:
        assert d.other.secret.count_documents({}) == 1
    evs = env.wait_events(lambda evs: bool(_denials(evs, token_id=jti)))
    d = _denials(evs, token_id=jti)[0]
    assert (d["reason"], d["command"], d["db_name"], d["stage"]) == ("database_not_allowed", "find", "other", "command")


def test_grants_are_per_database(env):
    # analyst (read-only, app) + lab (app_*): read-only on app, writable on app_lab — as Postgres at connect.
    token, jti = env.issue("alice", "analyst,lab")
    with env.client("tok", "alice", token) as c:
        with pytest.raises(OperationFailure) as info:
            c.app.seed.insert_one({"_id": 300})
        assert _code(info) == UNAUTHORIZED and "read-only role" in str(info.value)
        c.app_lab.t.insert_one({"_id": 300})
        assert c.app_lab.t.count_documents({"_id": 300}) == 1
        assert c.app.seed.count_documents({}) == 10
    evs = env.wait_events(lambda evs: bool(_starts(evs, token_id=jti)))
    start = _starts(evs, token_id=jti)[0]
    assert start["granted_roles"] == ["analyst", "lab"] and start["read_only"] is False


def test_read_only_role_refuses_writes(env):
    token, jti = env.issue("alice", "analyst")
    with env.client("tok", "alice", token) as c:
        coll = c.app.seed
        writes = {
            "insert": lambda: coll.insert_one({"_id": 100}),
            "update": lambda: coll.update_one({"_id": 1}, {"$set": {"k": 99}}),
            "delete": lambda: coll.delete_many({}),
            "findAndModify": lambda: coll.find_one_and_update({"_id": 1}, {"$set": {"k": 99}}),
            "create": lambda: c.app.create_collection("ro_new"),
            "drop": lambda: coll.drop(),
            "createIndexes": lambda: coll.create_index("k"),
            "aggregate $out": lambda: list(coll.aggregate([{"$match": {}}, {"$out": "ro_copy"}])),
            "aggregate $merge": lambda: list(coll.aggregate([{"$merge": {"into": "ro_copy"}}])),
        }
        for what, write in writes.items():
            with pytest.raises(OperationFailure) as info:
                write()
            assert _code(info) == UNAUTHORIZED, what
            assert "read-only role" in str(info.value), (what, str(info.value))
        # Reads work, before and after the refusals.
        assert coll.count_documents({}) == 10
        assert sorted(coll.distinct("k")) == [0, 1, 2]
        assert [d["_id"] for d in coll.aggregate([{"$group": {"_id": "$k"}}, {"$sort": {"_id": 1}}])] == [0, 1, 2]
        assert "seed" in c.app.list_collection_names()
        assert coll.estimated_document_count() == 10
        assert len(list(coll.find({}, batch_size=3))) == 10  # find + getMore
    with env.direct() as d:
        assert d.app.seed.count_documents({}) == 10 and d.app.seed.find_one({"_id": 1})["k"] == 1
        assert "ro_new" not in d.app.list_collection_names() and "ro_copy" not in d.app.list_collection_names()
    evs = env.wait_events(lambda evs: len(_denials(evs, token_id=jti)) >= len(writes))
    assert {d["reason"] for d in _denials(evs, token_id=jti)} == {"read_only"}


def test_denied_command_mid_session_then_next_works(env):
    token, jti = env.issue("alice", "writer")
    with env.client("tok", "alice", token) as c:
        c.app.deny.insert_one({"n": 1})
        with pytest.raises(OperationFailure) as info:
            c.drop_database("app")
        assert _code(info) == UNAUTHORIZED and "dropDatabase is denied by role policy 'dropDatabase'" in str(info.value)
        c.app.deny.insert_one({"n": 2})  # the next allowed command works
        with pytest.raises(OperationFailure) as info:
            c.app.deny.drop()
        assert _code(info) == UNAUTHORIZED and "drop is denied by role policy 'drop'" in str(info.value)
        with pytest.raises(OperationFailure) as info:
            list(c.app.deny.aggregate([{"$out": "deny_copy"}]))
        assert _code(info) == UNAUTHORIZED and "$out is denied" in str(info.value)
        # renameCollection runs on admin, which writer does not allow.
        with pytest.raises(OperationFailure) as info:
            c.app.deny.rename("deny_renamed")
        assert _code(info) == UNAUTHORIZED and "not authorized on admin" in str(info.value)
        assert c.app.deny.count_documents({}) >= 2
    with env.direct() as d:
        assert "app" in d.list_database_names() and d.app.seed.count_documents({}) == 10
        names = d.app.list_collection_names()
        assert "deny" in names and "deny_renamed" not in names and "deny_copy" not in names
    evs = env.wait_events(lambda evs: len(_denials(evs, token_id=jti)) >= 4 and any(
        e.get("token_id") == jti and e["event"] == "db.session.end" for e in evs))
    denials = _denials(evs, token_id=jti)
    assert [(d["command"], d["reason"]) for d in denials] == [
        ("dropDatabase", "command_denied"), ("drop", "command_denied"), ("$out", "command_denied"),
        ("renameCollection", "database_not_allowed")]
    assert all(d["stage"] == "command" and d["success"] is False for d in denials)
    # Each refused command is a query with a failed result answered by the proxy, tied to its denial.
    results = {e["query_uid"]: e for e in evs if e["event"] == "db.session.result" and e.get("token_id") == jti}
    for d in denials:
        r = results[d["query_uid"]]
        assert r["success"] is False and r["code"] == UNAUTHORIZED and r["answered_by"] == "proxy"


def test_unauthenticated_commands_refused(env):
    mark = env.mark()
    with env.client("tok", app="t-noauth") as c:
        assert c.admin.command("ping")["ok"] == 1.0
        assert "version" in c.admin.command("buildInfo")
        with pytest.raises(OperationFailure) as info:
            c.app.seed.find_one()
        assert _code(info) == UNAUTHORIZED and "requires authentication" in str(info.value)
    # Raw wire: a write before any login is answered by the proxy and never reaches FerretDB.
    with _raw(env) as sock:
        sock.sendall(_op_msg({"insert": "seed", "documents": [{"_id": 500}], "$db": "app"}, 2))
        reply = _recv(sock)
        assert (reply["ok"], reply["code"], reply["codeName"]) == (0.0, UNAUTHORIZED, "Unauthorized")
        sock.sendall(_op_msg({"connectionStatus": 1, "$db": "admin"}, 3))
        assert _recv(sock)["authInfo"]["authenticatedUsers"] == []
        sock.sendall(_op_msg({"ping": 1, "$db": "admin"}, 4))
        assert _recv(sock)["ok"] == 1.0
    with env.direct() as d:
        assert d.app.seed.count_documents({"_id": 500}) == 0
    # Both clients' records: pymongo's own client opens more than one connection (each writes one),
    # so a count of two could be met before the raw connection's record is written.
    evs = env.wait_events(lambda evs: len(_denials(evs, reason="unauthenticated")) >= 2
                          and {e.get("application_name") for e in evs if e["event"] == "db.session.mongo.handshake_only"}
                          >= {"t-noauth", "t-raw"}, since=mark)
    # (pymongo's endSessions when closing a client that never logged in is answered, not refused.)
    assert {d["command"] for d in _denials(evs, reason="unauthenticated")} == {"find", "insert"}
    raw = next(e for e in evs if e["event"] == "db.session.mongo.handshake_only" and e.get("application_name") == "t-raw")
    assert raw["handshake_commands"] == {"hello": 1, "connectionStatus": 1, "ping": 1} and raw["denied"] == 1
    assert raw["success"] is False and raw["user"] == "unauthenticated"
    # Connections that never established wrote no session events, only that one record (and the denials).
    noauth_sids = {e["sid"] for e in evs if e.get("application_name") == "t-noauth"}
    assert not [e for e in evs if e.get("sid") in noauth_sids and e["event"] in ("db.session.start", "db.session.query", "db.session.end")]


def test_anonymous_fallback_on_mixed_listener(env):
    mark = env.mark()
    with env.client("mixed", app="t-mixed-anon") as c:
        assert c.app.seed.count_documents({}) == 10
        with pytest.raises(OperationFailure) as info:
            c.app.seed.insert_one({"_id": 200})
        assert _code(info) == UNAUTHORIZED and "read-only" in str(info.value)
    token, jti = env.issue("alice", "writer")
    with env.client("mixed", "alice", token, app="t-mixed-token") as c:
        c.app.mixed.insert_one({"who": "alice"})
    evs = env.wait_events(lambda evs: bool(_starts(evs, application_name="t-mixed-anon")) and bool(_starts(evs, token_id=jti)), since=mark)
    anon = _starts(evs, application_name="t-mixed-anon")[0]
    assert (anon["user"], anon["auth_method"], anon["roles"], anon["read_only"]) == ("anonymous", "anonymous", ["analyst"], True)
    assert _starts(evs, token_id=jti)[0]["user"] == "alice"


# --------------------------------------------------------------------------- limits


def _works(env, listener: str, user: str, token: str) -> bool:
    try:
        with env.client(listener, user, token, serverSelectionTimeoutMS=3000) as c:
            c.app.seed.find_one()
        return True
    except OperationFailure:
        return False


def test_connection_limit_per_identity(env):
    token, _ = env.issue("carol", "analyst")
    mark = env.mark()
    first = env.client("tok", "carol", token, maxPoolSize=1)
    try:
        assert first.app.seed.count_documents({}) == 10  # holds carol's one session (its monitor holds none)
        with env.client("tok", "carol", token) as second:
            with pytest.raises(OperationFailure) as info:
                second.app.seed.find_one()
        assert _code(info) == UNAUTHORIZED and "too many connections" in str(info.value)
        assert first.app.seed.count_documents({}) == 10  # the first session is unaffected
    finally:
        first.close()
    wait_until(lambda: _works(env, "tok", "carol", token), timeout=10, what="carol's slot to free")
    evs = env.wait_events(lambda evs: bool(_denials(evs, reason="too_many_connections_identity")), since=mark)
    d = _denials(evs, reason="too_many_connections_identity")[0]
    assert d["user"] == "carol" and d["stage"] == "connect"
    end = [e for e in evs if e.get("sid") == d["sid"] and e["event"] == "db.session.mongo.handshake_only"]
    assert end and end[0]["denied"] == 1  # refused and closed, recorded once


def test_connection_limit_per_listener(env):
    tokens = {u: env.issue(u, "analyst")[0] for u in ("dave", "erin", "gina")}
    held = [env.client("limited", u, tokens[u], maxPoolSize=1) for u in ("dave", "erin")]
    try:
        for c in held:
            assert c.app.seed.find_one({"_id": 0}) is not None
        with env.client("limited", "gina", tokens["gina"]) as c:
            with pytest.raises(OperationFailure) as info:
                c.app.seed.find_one()
        assert _code(info) == UNAUTHORIZED and "too many connections" in str(info.value)
        assert _works(env, "tok", "gina", tokens["gina"])  # other listeners are not affected
    finally:
        for c in held:
            c.close()
    wait_until(lambda: _works(env, "limited", "gina", tokens["gina"]), timeout=10, what="the listener slot to free")


# --------------------------------------------------------------------------- audit and secrets


def test_monitoring_connections_are_recorded_once(env):
    token, jti = env.issue("alice", "writer")
    app = "t-monitor"
    with env.client("tok", "alice", token, app=app, heartbeatFrequencyMS=500) as c:
        c.app.seed.find_one()
        time.sleep(2.0)  # a few heartbeats on the monitoring connection
    evs = env.wait_events(lambda evs: any(e["event"] == "db.session.mongo.handshake_only" and e.get("application_name") == app for e in evs))
    mon = [e for e in evs if e["event"] == "db.session.mongo.handshake_only" and e.get("application_name") == app]
    assert mon[0]["handshake_commands"].get("hello", 0) + mon[0]["handshake_commands"].get("isMaster", 0) >= 3
    assert mon[0]["success"] is True and mon[0]["auth_failures"] == 0
    assert not [e for e in evs if e.get("sid") == mon[0]["sid"] and e["event"] != "db.session.mongo.handshake_only"]
    assert _starts(evs, token_id=jti)  # the pool connection is the session


def test_no_token_in_logs_or_audit(env, bad_tokens):
    # Runs after the other tests of the module have used many tokens.
    time.sleep(1.0)
    blob = env.audit_path.read_text() + env.proc.log_text()
    assert len(env.tokens) > 10
    assert_no_token_secrets(blob, env, bad_tokens)
    assert "hunter2-plain-password" not in blob and env.ferret.password not in blob
    assert "Traceback" not in env.proc.log_text(), env.proc.log_text()[-3000:]
    evs = env.events()
    assert all(e["db_protocol"] == "mongo" for e in evs if "sid" in e)  # not the proxy.start marker
    # Every query of an established session has its result.
    results = {e["query_uid"] for e in evs if e["event"] == "db.session.result" and e.get("query_uid")}
    missing = [e for e in evs if e["event"] == "db.session.query" and e["uid"] not in results]
    assert not missing, [(m["command"], m["sid"]) for m in missing[:5]]
