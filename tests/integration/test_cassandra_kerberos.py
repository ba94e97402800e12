"""Kerberos (SASL GSSAPI, RFC 4752) backend login of the Cassandra engine: a real MIT KDC, a real
Apache Cassandra 5.0 running the Kerberos test authenticator, the real cassandra-driver and cqlsh,
the real ``dbproxy serve`` CLI.

Apache Cassandra ships no Kerberos authenticator: the node runs the test peer's own
(``scripts/peers/cassandra-krb-auth``, the JDK's javax.security.sasl GSSAPI server with the keytab
of ``cassandra/localhost@REALM``; a principal logs in as the role of its short name; SASL PLAIN
still works for the harness's cassandra/cassandra).  This module starts that node for itself (the
other Cassandra modules keep their PasswordAuthenticator nodes).

The clients have no Kerberos at all (no KRB5* variables, no ticket): they log in to the proxy with
a SASL PLAIN user name (a claim; the password is dropped) or with nothing (listener ``cqlnone``),
and land in Cassandra as role ``dbproxy`` — the proxy's principal ``dbproxy@REALM`` — which is no
superuser: ``LIST ROLES`` shows only it, and a table it has no grant on is refused.

Routes of the shared proxy (listener "cql"; a client picks one by user name):
  app / *          dbproxy@REALM from its keytab, host localhost
  nosuch-svc       service "nosuch": no such service principal in the realm
  stale-keytab     principal "stale" whose key was rotated after its keytab was exported
  norole           principal "norole": the KDC knows it, Cassandra has no role for it
  nologin          principal "nologin": its role exists with LOGIN = false
  kdc-down         its own keytab copy (a fresh credential) while the KDC is stopped
  authz-self       authorization_id = the principal itself (accepted by the node)
  authz-other      authorization_id "cassandra" (the node refuses: dbproxy may not act as it)
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from cassandra import Unauthorized
from cassandra.auth import PlainTextAuthProvider
from cassandra.cluster import Cluster, NoHostAvailable

from dbproxy.engines.cassandra import protocol as F
from dbproxy.engines.cassandra.codec import CqlDecoder
from dbproxy.sansio import NEED_DATA
from tests.support import ProxyProcess, cassandra_direct, cql_keyspace, peer_missing, read_audit, require_cassandra, wait_until

pytestmark = pytest.mark.integration

CLIENT_HINT = "the proxy could not authenticate to the backend database (Kerberos)"
CLIENT_PASSWORD = "client-password-never-forwarded"
INSTACLUSTR = "com.instaclustr.cassandra.auth.KerberosAuthenticator"
DSE = "com.datastax.bdp.cassandra.auth.DseAuthenticator"
PEER_CLASS = "dbproxy.peers.cassandra.KerberosAuthenticator"


# --------------------------------------------------------------------------- peers


@pytest.fixture(scope="module")
def realm(tmp_path_factory):
    try:
        import gssapi  # noqa: F401
    except ImportError as exc:
        peer_missing(f"python gssapi ({exc}); run scripts/setup (needs libkrb5-dev)")
    if not shutil.which("krb5kdc", path="/usr/sbin:/usr/bin:" + os.environ.get("PATH", "")):
        peer_missing("MIT krb5kdc (Debian krb5-kdc)")
    from scripts.peers.kdc import start_realm

    kr = start_realm(tmp_path_factory.mktemp("krb"))
    yield kr
    kr.close()


@pytest.fixture(scope="module")
def knode(realm, tmp_path_factory):
    from scripts.peers.cassandra_server import CassandraStartError, krb_auth_jar, start_cassandra

    require_cassandra()
    try:
        krb_auth_jar()
    except CassandraStartError as exc:
        peer_missing(str(exc))
    t0 = time.monotonic()
    server = start_cassandra(tmp_path_factory.mktemp("kcassandra"), kerberos=realm)
    print(f"\nCassandra with the Kerberos test authenticator up in {time.monotonic() - t0:.1f}s")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def direct(knode):
    """A PLAIN session straight to the node as cassandra/cassandra: roles, grants, checks."""
    c, session = cassandra_direct(
        knode,
        cql_keyspace("krb"),
        "CREATE TABLE IF NOT EXISTS krb.kv (k text PRIMARY KEY, v int)",
        "CREATE TABLE IF NOT EXISTS krb.secret (k text PRIMARY KEY, v int)",
        "INSERT INTO krb.kv (k, v) VALUES ('seed', 1)",
        "CREATE ROLE IF NOT EXISTS dbproxy WITH LOGIN = true",
        "CREATE ROLE IF NOT EXISTS nologin WITH LOGIN = false",
        "GRANT SELECT ON krb.kv TO dbproxy",
        "GRANT MODIFY ON krb.kv TO dbproxy",
        "GRANT SELECT ON system_views.clients TO dbproxy",  # the node's own view of who is connected
    )
    yield session
    c.shutdown()


@pytest.fixture(autouse=True)
def client_without_kerberos(monkeypatch):
    """The clients (the driver in this process, cqlsh) have no Kerberos of their own."""
    for k in list(os.environ):
        if k.startswith("KRB5"):
            monkeypatch.delenv(k)


def client_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("KRB5")}


# --------------------------------------------------------------------------- proxy


def gss_route(name: str, realm, node, *, match: str | None = None, **auth) -> dict:
    """A route to ``node`` as the realm's dbproxy principal (``auth`` overrides); matched on user
    ``match`` (default: ``name``; ``""``: no match key, the listener's only route)."""
    a = {
        "method": "gssapi",
        "principal": realm.proxy_principal,
        "keytab_file": str(realm.proxy_keytab),
        "krb5_config": str(realm.krb5_conf),
        "host": "localhost",
    }
    a.update(auth)
    a = {k: v for k, v in a.items() if v is not None}
    route = {"name": name, "backend": {"address": f"{node.host}:{node.port}", "user": "dbproxy", "auth": a}}
    if match != "":
        route["match"] = {"user": match or name}
    return route


def start_proxy(workdir: Path, listeners: list[dict], *, name: str = "proxy") -> ProxyProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    config = {"listeners": listeners,
              "audit": {"sinks": [{"type": "jsonl", "path": str(workdir / f"{name}.audit.jsonl")}]}}
    proc = ProxyProcess(workdir, config, name=name)
    # Nothing Kerberos-related is inherited: the routes' krb5_config must suffice.
    proc.env = {k: v for k, v in proc.env.items() if not k.startswith("KRB5")}
    proc.start()
    proc.audit_path = workdir / f"{name}.audit.jsonl"
    return proc


def cql_listener(name: str, routes: list[dict], **extra) -> dict:
    return {"name": name, "protocol": "cassandra", "listen": "127.0.0.1:0", "routes": routes, **extra}


@pytest.fixture(scope="module")
def proxy(realm, knode, direct, tmp_path_factory):
    d = tmp_path_factory.mktemp("kproxy")
    for principal in ("stale", "norole", "nologin"):
        realm.add_principal(principal)
    down_kt = d / "down.keytab"
    shutil.copy(realm.proxy_keytab, down_kt)
    routes = [
        gss_route("nosuch-svc", realm, knode, service="nosuch"),
        gss_route("stale-keytab", realm, knode, principal=realm.principal("stale"),
                  keytab_file=str(realm.keytab("stale", d / "stale.keytab"))),
        gss_route("norole", realm, knode, principal=realm.principal("norole"),
                  keytab_file=str(realm.keytab("norole", d / "norole.keytab"))),
        gss_route("nologin", realm, knode, principal=realm.principal("nologin"),
                  keytab_file=str(realm.keytab("nologin", d / "nologin.keytab"))),
        gss_route("kdc-down", realm, knode, keytab_file=str(down_kt)),
        gss_route("authz-self", realm, knode, authorization_id=realm.proxy_principal),
        gss_route("authz-other", realm, knode, authorization_id="cassandra"),
        gss_route("app", realm, knode, match="*"),
    ]
    proc = start_proxy(d, [
        cql_listener("cql", routes),
        cql_listener("cqlnone", [gss_route("app", realm, knode, match="")], options={"client_auth": "none"}),
        cql_listener("strict", [gss_route("app", realm, knode, match="")], options={"expected_user": "alice"}),
    ])
    proc.node = knode
    yield proc
    proc.stop()


@pytest.fixture
def own_proxy(tmp_path):
    started: list[ProxyProcess] = []

    def start(routes: list[dict], name: str = "proxy") -> ProxyProcess:
        proc = start_proxy(tmp_path, [cql_listener("cql", routes)], name=name)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


def cluster(port: int, *, user: str | None = "app", version: int = 5, compression: str | None = "lz4") -> Cluster:
    return Cluster(["127.0.0.1"], port=port,
                   auth_provider=PlainTextAuthProvider(user, CLIENT_PASSWORD) if user else None,
                   protocol_version=version, compression=compression or False, connect_timeout=20,
                   control_connection_timeout=20)


def session_starts(proxy, *, success: bool | None = None, **match) -> list[dict]:
    return [e for e in read_audit(proxy.audit_path)
            if e.get("event") == "db.session.start" and (success is None or e.get("success") is success)
            and all(e.get(k) == v for k, v in match.items())]


def wait_starts(proxy, count: int = 1, **match) -> list[dict]:
    found: list[dict] = []

    def check():
        found[:] = session_starts(proxy, **match)
        return len(found) >= count

    wait_until(check, timeout=20, what=f"{count} db.session.start {match}")
    return found


def started_session_that_ran(proxy, statement: str, **match) -> dict | None:
    """The start event (matching ``match``, as ``session_starts``) of a session whose audited
    query contains ``statement``; None while there is none on file."""
    starts = {e["sid"]: e for e in session_starts(proxy, **match)}
    for e in read_audit(proxy.audit_path):
        if e.get("event") == "db.session.query" and e.get("sid") in starts and statement in (e.get("db_query") or ""):
            return starts[e["sid"]]
    return None


def acquisitions(proxy) -> int:
    return proxy.log_text().count("Kerberos credentials acquired")


def tgt_requests(realm, principal: str | None = None) -> int:
    """TGTs the KDC issued to *principal*, from the KDC's own log."""
    principal = principal or realm.proxy_principal
    log = (realm.dir / "kdc.log").read_text(errors="replace")
    return sum(1 for line in log.splitlines()
               if "AS_REQ" in line and "ISSUE" in line and f" {principal} for krbtgt/" in line)


# --------------------------------------------------------------------------- a hand-rolled CQL client


class RawCql:
    """A socket speaking CQL frames the codec writes: the exact frames of a refusal."""

    def __init__(self, port: int, version: int = 4) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.version = version
        self.decoder = CqlDecoder("server")

    def recv(self) -> F.Frame | None:
        while True:
            msg = self.decoder.next_message()
            if msg is not NEED_DATA:
                return msg
            try:
                data = self.sock.recv(65536)
            except (ConnectionResetError, socket.timeout):
                return None
            if not data:
                return None
            self.decoder.feed(data)

    def handshake(self, user: str) -> list[F.Frame | None]:
        """OPTIONS, STARTUP, AUTH_RESPONSE (SASL PLAIN ``user``): every frame the proxy answers, up to its close."""
        v = self.version
        self.sock.sendall(F.encode_options(v, 1))
        frames = [self.recv()]
        self.sock.sendall(F.encode_startup(v, 2, {"CQL_VERSION": "3.0.0", "DRIVER_NAME": "raw-krb-test"}))
        frames.append(self.recv())
        if v >= 5:
            self.decoder.set_framing("segments", None)
        body = F.encode_auth_response(v, 3, F.sasl_plain_token(user, CLIENT_PASSWORD))
        if v >= 5:
            from dbproxy.engines.cassandra import segments as S

            body = S.encode_segment(body, self_contained=True, compress=False)
        self.sock.sendall(body)
        while (frame := self.recv()) is not None:
            frames.append(frame)
        return frames

    def close(self) -> None:
        self.sock.close()


def refusal_frames(port: int, user: str, version: int = 4) -> list[F.Frame]:
    raw = RawCql(port, version)
    try:
        return raw.handshake(user)
    finally:
        raw.close()


def assert_refused_in_cql(proxy, realm, user: str, detail: str, *, client_text: str = CLIENT_HINT) -> dict:
    """SUPPORTED → AUTHENTICATE → AUTH_ERROR then close, for a raw v4 and a v5 client; the driver reports
    an authentication failure; the audit event and the log carry the Kerberos ``detail``, the client
    never sees realm, principals or keytab paths."""
    for version in (4, 5):
        frames = refusal_frames(proxy.port("cql"), user, version)
        assert [F.Opcode(f.opcode).name for f in frames] == ["SUPPORTED", "AUTHENTICATE", "ERROR"], frames
        err = F.parse_error(frames[-1])
        assert err.code == F.ErrorCode.AUTH_ERROR and frames[-1].stream == 3, err
        assert client_text in err.message, err.message
        if client_text == CLIENT_HINT:
            text = err.message.lower()
            leaks = ["kdc", "keytab", "krb5", "@", realm.realm.lower(), "nosuch", "stale", "/", "major", "minor"]
            assert not [w for w in leaks if w in text], err.message
    c = cluster(proxy.port("cql"), user=user)
    try:
        with pytest.raises(NoHostAvailable) as info:
            c.connect()
    finally:
        c.shutdown()
    assert "AuthenticationFailed" in str(info.value) and client_text in str(info.value), str(info.value)
    evs = wait_starts(proxy, 3, requested_user=user, success=False)
    for ev in evs:
        assert ev["error_code"] == F.ErrorCode.AUTH_ERROR and ev["backend_error_kind"] == "auth", ev
        assert re.search(detail, ev["error"]), ev["error"]
    assert re.search(detail, proxy.log_text())
    print(f"\n{user}: client AUTH_ERROR {err.message!r}\n  audit error: {evs[-1]['error']}")
    return evs[-1]


def role_and_grants(session) -> tuple[list[str], bool]:
    """(LIST ROLES as the logged-in role — a non-superuser sees only its own —, SELECT on krb.secret allowed?)"""
    roles = [r.role for r in session.execute("LIST ROLES")]
    try:
        session.execute("SELECT * FROM krb.secret")
        allowed = True
    except Unauthorized:
        allowed = False
    return roles, allowed


# --------------------------------------------------------------------------- happy paths


MATRIX = [(4, None), (4, "lz4"), (4, "snappy"), (5, None), (5, "lz4")]


@pytest.mark.parametrize(("version", "compression"), MATRIX, ids=[f"v{v}-{c or 'none'}" for v, c in MATRIX])
def test_driver_lands_as_the_proxy_principals_role(proxy, realm, direct, version, compression):
    assert subprocess.run(["klist", "-s"], env=client_env()).returncode != 0  # no ticket on the client side
    c = cluster(proxy.port("cql"), version=version, compression=compression)
    try:
        session = c.connect()
        assert c.protocol_version == version
        assert c.control_connection._connection._compression_type == compression
        assert role_and_grants(session) == (["dbproxy"], False)
        clients = {(r.username, r.protocol_version) for r in session.execute("SELECT username, protocol_version FROM system_views.clients")}
        assert ("dbproxy", version) in clients, clients
        key = f"v{version}-{compression}"
        session.execute("INSERT INTO krb.kv (k, v) VALUES (%s, %s)", (key, version))
        assert session.execute("SELECT v FROM krb.kv WHERE k = %s", (key,)).one().v == version
    finally:
        c.shutdown()
    assert direct.execute("SELECT v FROM krb.kv WHERE k = %s", (key,)).one().v == version
    # The driver's control connection is a session of its own, and its start can be on file
    # before the pool connection's (the one that ran LIST ROLES) is: look for the session that ran it.
    ev = wait_until(lambda: started_session_that_ran(proxy, "LIST ROLES", requested_user="app", success=True,
                                                     protocol_version=version, compression=compression),
                    timeout=20, what="LIST ROLES audited in a session started as asked")
    assert ev["backend_auth"] == "gssapi" and ev["backend_auth_mechanism"] == "GSSAPI", ev
    assert ev["backend_authenticator"] == PEER_CLASS and ev["backend_principal"] == realm.proxy_principal
    assert ev["db_user"] == "dbproxy" and ev["client_auth"] == "claim"
    sid = ev["sid"]
    wait_until(lambda: any(e.get("sid") == sid and e["event"] == "db.session.end" for e in read_audit(proxy.audit_path)),
               what="session end audited")
    blob = proxy.audit_path.read_text() + proxy.log_text()
    assert CLIENT_PASSWORD not in blob


def test_authorization_id_reaches_the_node(proxy, realm):
    """The authzid travels in the wrapped security-layer answer (RFC 4752 3.1): the node's SASL server
    reads it — the principal itself is accepted, another role refused by the node."""
    c = cluster(proxy.port("cql"), user="authz-self")
    try:
        assert role_and_grants(c.connect()) == (["dbproxy"], False)
    finally:
        c.shutdown()
    frames = refusal_frames(proxy.port("cql"), "authz-other")
    assert [F.Opcode(f.opcode).name for f in frames] == ["SUPPORTED", "AUTHENTICATE", "ERROR"]
    err = F.parse_error(frames[-1])
    assert err.code == F.ErrorCode.AUTH_ERROR
    assert f"{realm.proxy_principal} is not authorized to connect as cassandra" in err.message, err.message
    ev = wait_starts(proxy, requested_user="authz-other", success=False)[-1]
    assert ev["backend_error_code"] == F.ErrorCode.AUTH_ERROR and "not authorized to connect as cassandra" in ev["error"]


@pytest.mark.parametrize("version", [4, 5])
def test_cqlsh_without_kerberos(proxy, direct, version):
    if shutil.which("cqlsh") is None:
        peer_missing("cqlsh not on PATH (pip install cqlsh)")
    base = ["cqlsh", "127.0.0.1", "--connect-timeout", "20", "--request-timeout", "60", "--protocol-version", str(version)]
    out = subprocess.run(base[:2] + [str(proxy.port("cql"))] + base[2:] + ["-u", "app", "-p", CLIENT_PASSWORD, "-e", "LIST ROLES"],
                         capture_output=True, text=True, timeout=180, env=client_env())
    assert out.returncode == 0, out.stderr + out.stdout
    lines = [line.split("|")[0].strip() for line in out.stdout.splitlines() if "|" in line]
    assert lines == ["role", "dbproxy"], out.stdout
    # No credentials at all (listener client_auth none): READY, still the principal's role.
    out = subprocess.run(base[:2] + [str(proxy.port("cqlnone"))] + base[2:] + ["-e", "SELECT k, v FROM krb.kv WHERE k = 'seed'; LIST ROLES"],
                         capture_output=True, text=True, timeout=180, env=client_env())
    assert out.returncode == 0, out.stderr + out.stdout
    assert "seed" in out.stdout and "dbproxy" in out.stdout and "cassandra" not in out.stdout, out.stdout
    out = subprocess.run(base[:2] + [str(proxy.port("cqlnone"))] + base[2:] + ["-e", "SELECT * FROM krb.secret"],
                         capture_output=True, text=True, timeout=180, env=client_env())
    assert out.returncode != 0 and "Unauthorized" in out.stderr and "dbproxy has no SELECT permission" in out.stderr, out.stderr
    # The session that ran the statement (cqlsh's control connection is another; its start may be
    # on file first).
    wait_until(lambda: started_session_that_ran(proxy, "FROM krb.kv WHERE k = 'seed'", requested_user=None,
                                                client_auth="none", success=True, protocol_version=version),
               timeout=20, what="cqlsh statement audited")
    evs = wait_starts(proxy, requested_user=None, client_auth="none", success=True, protocol_version=version)
    assert all(e["backend_auth_mechanism"] == "GSSAPI" for e in evs)


@pytest.mark.parametrize("announced", [INSTACLUSTR, DSE, "com.example.SomeKerberosAuthenticator"])
def test_authenticator_class_names_of_the_field(proxy, knode, announced):
    """The node announces the class names Kerberos authenticators carry in the field; DSE's wants the
    mechanism name first (GSSAPI → GSSAPI-START), the others the first GSS token at once."""
    knode.announce_file.write_text(announced)
    try:
        for version in (4, 5):
            c = cluster(proxy.port("cql"), user=f"field-{version}", version=version)
            try:
                assert role_and_grants(c.connect()) == (["dbproxy"], False)
            finally:
                c.shutdown()
    finally:
        knode.announce_file.unlink()
    # Both logins' starts: each driver opens two sessions (control connection, pool), so "two on
    # file" can be field-4's alone while field-5's are still in the audit worker's next write.
    wait_until(lambda: {e["requested_user"] for e in session_starts(proxy, backend_authenticator=announced, success=True)}
               >= {"field-4", "field-5"}, timeout=20, what=f"field-4 and field-5 logged in over {announced}")


def test_node_with_password_authenticator_only_is_refused_clearly(proxy, knode, realm):
    knode.announce_file.write_text("org.apache.cassandra.auth.PasswordAuthenticator")
    try:
        frames = refusal_frames(proxy.port("cql"), "pwonly")
    finally:
        knode.announce_file.unlink()
    assert [F.Opcode(f.opcode).name for f in frames] == ["SUPPORTED", "AUTHENTICATE", "ERROR"]
    err = F.parse_error(frames[-1])
    assert err.code == F.ErrorCode.AUTH_ERROR and "does not offer Kerberos" in err.message
    ev = wait_starts(proxy, requested_user="pwonly", success=False)[-1]
    assert "SASL PLAIN only" in ev["error"] and "needs a Kerberos authenticator" in ev["error"]


def test_twenty_concurrent_sessions_share_one_credential(realm, knode, direct, own_proxy):
    before = tgt_requests(realm)
    proxy = own_proxy([gss_route("app", realm, knode, match="*")])
    assert acquisitions(proxy) == 0  # acquired on first use, not at start
    n = 20
    start, hold = threading.Barrier(n), threading.Barrier(n)
    rows: list = []
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            start.wait(timeout=60)
            c = cluster(proxy.port("cql"), user=f"user{i}", version=4 if i % 2 else 5, compression="lz4" if i % 3 else None)
            try:
                session = c.connect()
                rows.append((session.execute("LIST ROLES").one().role, c.protocol_version))
                hold.wait(timeout=120)  # all twenty sessions are live at once
            finally:
                c.shutdown()
        except BaseException as exc:  # asserted below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    elapsed = time.monotonic() - t0
    assert not errors, errors[:3]
    assert sorted(rows) == sorted([("dbproxy", 4)] * (n // 2) + [("dbproxy", 5)] * (n // 2))
    assert acquisitions(proxy) == 1, proxy.log_text()
    time.sleep(0.5)  # the KDC writes its log line as it answers
    assert tgt_requests(realm) - before == 1
    # Each driver opens a control connection and a pool connection: 2 GSSAPI logins per client.
    evs = wait_starts(proxy, 2 * n, success=True)
    assert {e["backend_principal"] for e in evs} == {realm.proxy_principal}
    print(f"\n{n} concurrent drivers ({len(evs)} GSSAPI logins) in {elapsed:.1f}s")


def test_credential_renewed_while_a_long_session_runs(realm, knode, direct, own_proxy):
    """60 s tickets, renew_margin 45 s: renewed after ~15 s in the background; a session opened before
    the renewal keeps working (CQL authenticates once per connection), new sessions use the new TGT."""
    realm.kadmin(f'modprinc -maxlife "60 seconds" {realm.proxy_principal}')
    try:
        before = tgt_requests(realm)
        proxy = own_proxy([gss_route("app", realm, knode, match="*", renew_margin_seconds=45)])
        t0 = time.monotonic()
        long_lived = cluster(proxy.port("cql"))
        try:
            session = long_lived.connect()
            assert session.execute("LIST ROLES").one().role == "dbproxy"
            m = re.search(r"Kerberos credentials acquired for \S+ \(lifetime (\d+)s", proxy.log_text())
            assert m and 50 <= int(m.group(1)) <= 60, proxy.log_text()
            time.sleep(max(0.0, 16 - (time.monotonic() - t0)))
            c = cluster(proxy.port("cql"), version=4)  # due for renewal: served at once, renewed behind it
            try:
                assert c.connect().execute("LIST ROLES").one().role == "dbproxy"
            finally:
                c.shutdown()
            wait_until(lambda: acquisitions(proxy) == 2, timeout=15, what="background renewal")
            c = cluster(proxy.port("cql"))
            try:
                assert c.connect().execute("LIST ROLES").one().role == "dbproxy"
            finally:
                c.shutdown()
            assert session.execute("SELECT v FROM krb.kv WHERE k = 'seed'").one().v == 1  # the long session goes on
        finally:
            long_lived.shutdown()
        assert acquisitions(proxy) == 2
        time.sleep(0.5)
        assert tgt_requests(realm) - before == 2
    finally:
        realm.kadmin(f'modprinc -maxlife "10 hours" {realm.proxy_principal}')


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("version", [4, 5])
def test_wrong_client_user_gets_supported_authenticate_auth_error(proxy, realm, version):
    """Username validation against the listener: the client sees SUPPORTED → AUTHENTICATE → AUTH_ERROR
    and a close; the proxy never logs in to the backend for it."""
    before = tgt_requests(realm)
    frames = refusal_frames(proxy.port("strict"), "mallory", version)
    assert [F.Opcode(f.opcode).name for f in frames] == ["SUPPORTED", "AUTHENTICATE", "ERROR"], frames
    assert F.parse_authenticate(frames[1]) == "org.apache.cassandra.auth.PasswordAuthenticator"
    err = F.parse_error(frames[2])
    assert err.code == F.ErrorCode.AUTH_ERROR and 'user "mallory" is not allowed' in err.message
    ev = wait_starts(proxy, requested_user="mallory", success=False, protocol_version=version)[-1]
    assert ev["error_code"] == F.ErrorCode.AUTH_ERROR and "backend_auth" not in ev
    assert tgt_requests(realm) == before


def test_unknown_service_principal(proxy, realm):
    assert_refused_in_cql(proxy, realm, "nosuch-svc", r"security context with nosuch@localhost failed: .*nosuch/localhost@DBPROXY\.TEST not found")


def test_stale_keytab(proxy, realm):
    realm.rotate_key("stale")  # the keytab the route names now holds an old key
    assert_refused_in_cql(proxy, realm, "stale-keytab",
                          r"stale@DBPROXY\.TEST from keytab .*(Decrypt integrity check failed|Preauthentication failed|Password incorrect)")


def test_backend_refuses_a_principal_without_role(proxy, realm):
    ev = assert_refused_in_cql(proxy, realm, "norole", r"norole is not permitted to log in",
                               client_text="norole is not permitted to log in")
    assert ev["backend_error_code"] == F.ErrorCode.AUTH_ERROR


def test_backend_refuses_a_role_without_login(proxy, realm):
    ev = assert_refused_in_cql(proxy, realm, "nologin", r"nologin is not permitted to log in",
                               client_text="nologin is not permitted to log in")
    assert ev["backend_error_code"] == F.ErrorCode.AUTH_ERROR


def test_kdc_down_then_up(proxy, realm):
    realm.stop()
    try:
        assert_refused_in_cql(proxy, realm, "kdc-down", r"Cannot contact any KDC for realm 'DBPROXY\.TEST'")
    finally:
        realm.start()
    c = cluster(proxy.port("cql"), user="kdc-down")
    try:
        assert role_and_grants(c.connect()) == (["dbproxy"], False)
    finally:
        c.shutdown()
    assert wait_starts(proxy, requested_user="kdc-down", success=True)


def test_backend_rejects_ticket_for_rotated_service_key(realm, knode, own_proxy, tmp_path):
    """The KDC hands out tickets under a new cassandra/localhost key the node does not have: the JDK's
    GSSAPI server fails the context, Cassandra answers AUTH_ERROR, relayed; the audit has why."""
    keytab = tmp_path / "rot.keytab"
    shutil.copy(realm.proxy_keytab, keytab)  # a fresh credential: no cached service ticket
    proxy = own_proxy([gss_route("rot", realm, knode, match="*", keytab_file=str(keytab))])
    realm.rotate_key("cassandra/localhost")
    try:
        frames = refusal_frames(proxy.port("cql"), "rot")
        assert [F.Opcode(f.opcode).name for f in frames] == ["SUPPORTED", "AUTHENTICATE", "ERROR"]
        err = F.parse_error(frames[-1])
        assert err.code == F.ErrorCode.AUTH_ERROR and "Kerberos authentication failed" in err.message, err.message
        ev = wait_starts(proxy, requested_user="rot", success=False)[-1]
        assert ev["backend_error_code"] == F.ErrorCode.AUTH_ERROR and "Kerberos authentication failed" in ev["error"]
        print(f"\nrotated service key: client {err.message!r}")
    finally:
        # Give the node the new key too (appended to its keytab: the old one stays valid for older tickets).
        realm.keytab("cassandra/localhost", knode.krb_keytab)
    # The JDK re-reads the keytab for each context (KeyTab.getInstance in the Subject): the next session works.
    c = cluster(proxy.port("cql"), user="rot")
    try:
        assert role_and_grants(c.connect()) == (["dbproxy"], False)
    finally:
        c.shutdown()
