"""Kerberos (GSSAPI) backend auth for the Postgres engine: real MIT KDC, real PostgreSQL 15, real psql and psycopg.

The proxy (a real ``dbproxy serve`` process) holds the keytab of
``dbproxy@REALM``; clients connect with no Kerberos of their own (no KRB5*
variables, no ticket) and land in PostgreSQL as role ``dbproxy``, which
pg_hba lets in by ``gss`` only.  The proxy's environment has no KRB5_CONFIG
either: the routes' ``krb5_config`` key is all that points it at the realm.

Routes of the shared proxy (listener "pg"; a client picks one by user name):
  gss-tls          localhost:<port>, TLS verify-full, then GSS auth; service
                   principal defaulted to postgres@<backend host>
  gss-tls-require  127.0.0.1:<port>, TLS require, ``host: localhost``
  gss-enc          127.0.0.1:<port>, ``gssencmode: require`` (GSS-encrypted link)
  gss-prefer       gssencmode prefer + TLS: GSS encryption wins when offered
  gss-ccache       a ccache filled by kinit instead of a keytab

Tests that need a credential of their own (acquisition counts, renewal, KDC
failures) start their own proxy process.  The KDC log is the proof of how
many AS requests (TGT acquisitions) the proxy really made.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import psycopg
import pytest

from tests.support import ProxyProcess, peer_missing, read_audit, wait_until

pytestmark = pytest.mark.integration

TIMINGS: dict[str, float] = {}
CLIENT_HINT = "the proxy could not authenticate to the backend database"
STAT_SQL = (
    "select current_user, s.ssl, g.gss_authenticated, g.encrypted, g.principal"
    " from pg_stat_ssl s join pg_stat_gssapi g using (pid) where pid = pg_backend_pid()"
)


# --------------------------------------------------------------------------- peers


@pytest.fixture(scope="module")
def realm(tmp_path_factory):
    try:
        import gssapi  # noqa: F401
    except ImportError as exc:
        peer_missing(f"python gssapi ({exc}); run scripts/install (needs libkrb5-dev)")
    if not shutil.which("krb5kdc", path="/usr/sbin:/usr/bin:" + os.environ.get("PATH", "")):
        peer_missing("MIT krb5kdc (Debian krb5-kdc)")
    from scripts.peers.kdc import start_realm

    t0 = time.monotonic()
    kr = start_realm(tmp_path_factory.mktemp("krb"))
    TIMINGS["realm"] = time.monotonic() - t0
    print(f"\nKerberos realm setup (kdb5_util create, principals, keytab, krb5kdc up): {TIMINGS['realm']:.2f}s")
    yield kr
    kr.close()


@pytest.fixture(scope="module")
def kpg(realm, tmp_path_factory):
    from scripts.peers.postgres import pg_bindir, start_postgres

    try:
        pg_bindir()
    except Exception as exc:
        peer_missing(f"PostgreSQL server binaries ({exc}); run scripts/install/postgres.sh")
    t0 = time.monotonic()
    server = start_postgres(tmp_path_factory.mktemp("kpg"), kerberos=realm)
    TIMINGS["postgres"] = time.monotonic() - t0
    print(f"\nPostgreSQL with krb_server_keyfile setup: {TIMINGS['postgres']:.2f}s")
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def client_without_kerberos(monkeypatch):
    """The clients of these tests (psycopg in this process, psql) have no Kerberos of their own."""
    for k in list(os.environ):
        if k.startswith("KRB5"):
            monkeypatch.delenv(k)


def client_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("KRB5", "PG"))}


# --------------------------------------------------------------------------- proxy


def gss_route(name: str, realm, pg, *, address: str | None = None, tls: dict | None = None, **auth) -> dict:
    a = {
        "method": "gssapi",
        "principal": realm.proxy_principal,
        "keytab_file": str(realm.proxy_keytab),
        "krb5_config": str(realm.krb5_conf),
    }
    a.update(auth)
    a = {k: v for k, v in a.items() if v is not None}
    backend = {"address": address or f"127.0.0.1:{pg.port}", "database": "app", "user": "dbproxy", "auth": a}
    if tls:
        backend["tls"] = tls
    return {"name": name, "match": {"user": name}, "backend": backend}


def verify_full(pg) -> dict:
    return {"mode": "verify-full", "ca_file": str(pg.ca_file), "server_name": "localhost"}


def start_proxy(workdir: Path, routes: list[dict], *, name: str = "proxy") -> ProxyProcess:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    config = {
        "listeners": [{"name": "pg", "protocol": "postgres", "listen": "127.0.0.1:0", "routes": routes}],
        "audit": {"sinks": [{"type": "jsonl", "path": str(workdir / f"{name}.audit.jsonl")}]},
    }
    proc = ProxyProcess(workdir, config, name=name)
    # Nothing Kerberos-related is inherited: the routes' krb5_config must suffice.
    proc.env = {k: v for k, v in proc.env.items() if not k.startswith("KRB5")}
    proc.start()
    proc.audit_path = workdir / f"{name}.audit.jsonl"
    return proc


@pytest.fixture
def own_proxy(tmp_path):
    started: list[ProxyProcess] = []

    def start(routes: list[dict], name: str = "proxy") -> ProxyProcess:
        proc = start_proxy(tmp_path, routes, name=name)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture(scope="module")
def gss_ccache(realm, kpg, tmp_path_factory):
    cc = f"FILE:{tmp_path_factory.mktemp('ccache')}/dbproxy.cc"
    realm.kinit("dbproxy", realm.proxy_keytab, cc)
    return cc


@pytest.fixture(scope="module")
def proxy(realm, kpg, gss_ccache, tmp_path_factory):
    routes = [
        gss_route("gss-tls", realm, kpg, address=f"localhost:{kpg.port}", tls=verify_full(kpg)),
        gss_route("gss-tls-require", realm, kpg, tls={"mode": "require"}, host="localhost"),
        gss_route("gss-enc", realm, kpg, host="localhost", gssencmode="require"),
        gss_route("gss-prefer", realm, kpg, address=f"localhost:{kpg.port}", tls=verify_full(kpg), gssencmode="prefer"),
        gss_route("gss-ccache", realm, kpg, tls={"mode": "require"}, host="localhost",
                  keytab_file=None, principal=None, ccache=gss_ccache),
    ]
    proc = start_proxy(tmp_path_factory.mktemp("kproxy"), routes)
    yield proc
    proc.stop()


def connect(proxy, user: str, **kw) -> psycopg.Connection:
    kw.setdefault("sslmode", "disable")
    kw.setdefault("connect_timeout", 30)
    return psycopg.connect(host="127.0.0.1", port=proxy.port(), user=user, dbname="app", **kw)


def psql(proxy, user: str, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
    dsn = f"host=127.0.0.1 port={proxy.port()} user={user} dbname=app sslmode=disable connect_timeout=30"
    return subprocess.run(["psql", dsn, "-X", "-v", "ON_ERROR_STOP=1", *args], input=input,
                          capture_output=True, text=True, timeout=120, env=client_env())


def session_starts(proxy, user: str, *, success: bool, count: int = 1) -> list[dict]:
    found: list[dict] = []

    def check():
        found[:] = [e for e in read_audit(proxy.audit_path)
                    if e.get("event") == "db.session.start" and e.get("requested_user") == user
                    and e.get("success") is success]
        return len(found) >= count

    wait_until(check, timeout=15, what=f"{count} db.session.start success={success} for {user}")
    return found


def acquisitions(proxy) -> int:
    return proxy.log_text().count("Kerberos credentials acquired")


def tgt_requests(realm, principal: str | None = None) -> int:
    """TGTs the KDC issued to *principal* (AS-REQ answered with ISSUE), from the KDC's own log."""
    principal = principal or realm.proxy_principal
    log = (realm.dir / "kdc.log").read_text(errors="replace")
    return sum(1 for line in log.splitlines()
               if "AS_REQ" in line and "ISSUE" in line and f" {principal} for krbtgt/" in line)


def raw_login_error(proxy, user: str) -> tuple[dict[str, str], bytes]:
    """Start a session by hand; return the fields of the ErrorResponse the proxy sends, and all bytes."""
    s = socket.create_connection(("127.0.0.1", proxy.port()), timeout=30)
    try:
        params = f"user\0{user}\0database\0app\0\0".encode()
        s.sendall(struct.pack(">ii", 8 + len(params), 196608) + params)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    finally:
        s.close()
    assert data[:1] == b"E", data[:100]
    (n,) = struct.unpack(">i", data[1:5])
    fields = {chr(p[0]): p[1:].decode() for p in data[5 : 1 + n].split(b"\0") if p}
    return fields, data


def assert_auth_failure(proxy, realm, user: str, detail: str) -> dict:
    """The client sees 28xxx + a plain message, the audit event and the log carry the Kerberos *detail*."""
    fields, raw = raw_login_error(proxy, user)
    assert fields["S"] == "FATAL" and fields["C"] in ("28000", "28P01"), fields
    assert CLIENT_HINT in fields["M"], fields
    leaks = ["kdc", "keytab", "ccache", "krb", "principal", "@", realm.realm.lower(), "dbproxy",
             "nosuch", "postgres/", "stale", "gone", "/", "gss_", "major", "minor"]
    text = raw.decode(errors="replace").lower()
    assert not [w for w in leaks if w in text], fields
    with pytest.raises(psycopg.OperationalError) as info:
        connect(proxy, user)
    assert CLIENT_HINT in str(info.value)
    assert realm.realm not in str(info.value)
    evs = session_starts(proxy, user, success=False, count=2)
    for ev in evs:
        assert ev["sqlstate"] == fields["C"]
        assert re.search(detail, ev["error"]), ev["error"]
    assert re.search(detail, proxy.log_text())
    print(f"\n{user}: client {fields['C']} {fields['M']!r}\n  audit error: {evs[-1]['error']}")
    return evs[-1]


# --------------------------------------------------------------------------- happy paths


def test_realm_setup_under_a_minute(realm, kpg):
    print(f"\nrealm {TIMINGS['realm']:.2f}s, postgres+keytab {TIMINGS['postgres']:.2f}s")
    assert TIMINGS["realm"] < 60
    assert realm.running


EXPECT = {  # route: (ssl, gss_authenticated, encrypted, audit mechanism)
    "gss-tls": ("t", "t", "f", "gssapi"),
    "gss-tls-require": ("t", "t", "f", "gssapi"),
    "gss-enc": ("f", "t", "t", "gssapi-encrypted"),
    "gss-prefer": ("f", "t", "t", "gssapi-encrypted"),
    "gss-ccache": ("t", "t", "f", "gssapi"),
}


@pytest.mark.parametrize("route", list(EXPECT))
def test_psql_lands_as_kerberos_user(proxy, realm, route):
    # The client really has no Kerberos: no ticket anywhere it would look.
    assert subprocess.run(["klist", "-s"], env=client_env()).returncode != 0
    out = psql(proxy, route, "-At", "-c", STAT_SQL)
    assert out.returncode == 0, out.stderr + proxy.log_text()[-3000:]
    ssl, auth, enc, mech = EXPECT[route]
    assert out.stdout.strip() == f"dbproxy|{ssl}|{auth}|{enc}|{realm.proxy_principal}"
    ev = session_starts(proxy, route, success=True)[-1]
    assert ev["backend_auth"] == "gssapi" and ev["backend_auth_mechanism"] == mech
    assert ev["backend_tls"] is (ssl == "t") and ev["backend_gssenc"] is (enc == "t")
    assert ev["db_user"] == "dbproxy"


@pytest.mark.parametrize("route", ["gss-tls", "gss-enc"])
def test_psycopg_lands_as_kerberos_user(proxy, realm, route):
    with connect(proxy, route) as conn:
        user, ssl, authenticated, encrypted, principal = conn.execute(STAT_SQL).fetchone()
        assert conn.execute("select session_user").fetchone() == ("dbproxy",)
    assert (user, authenticated, principal) == ("dbproxy", True, realm.proxy_principal)
    assert (ssl, encrypted) == ((True, False) if route == "gss-tls" else (False, True))


def test_bulk_data_through_gss_encrypted_link(proxy):
    """~20 MB each way through wrap/unwrap: a large result, COPY in with odd chunk sizes, COPY out."""
    rows = 20_000
    with connect(proxy, "gss-enc") as conn:
        conn.autocommit = True
        assert conn.execute(STAT_SQL).fetchone()[3] is True
        t0 = time.monotonic()
        digest, size = hashlib.md5(), 0
        cur = conn.cursor()
        cur.execute("select repeat(md5(g::text), 32) from generate_series(1, %s) g order by g", (rows,))
        while batch := cur.fetchmany(1000):
            for (value,) in batch:
                digest.update(value.encode())
                size += len(value)
        server = conn.execute(
            "select md5(string_agg(repeat(md5(g::text), 32), '' order by g)) from generate_series(1, %s) g", (rows,)
        ).fetchone()[0]
        assert size == rows * 1024 and digest.hexdigest() == server
        t_result = time.monotonic() - t0

        conn.execute("drop table if exists t_gss_copy")
        conn.execute("create unlogged table t_gss_copy (id int, line text)")
        payload = b"".join(b"%d\t%s\n" % (i, (b"%08d" % i) * 128) for i in range(rows))  # ~20.7 MB
        t0 = time.monotonic()
        with conn.cursor().copy("copy t_gss_copy (id, line) from stdin") as copy:
            pos, step = 0, 1
            while pos < len(payload):  # chunk sizes that never line up with 16 kB GSS packets
                step = (step * 7919 + 13) % 70001 + 1
                copy.write(payload[pos : pos + step])
                pos += step
        t_in = time.monotonic() - t0
        assert conn.execute("select count(*), sum(length(line)) from t_gss_copy").fetchone() == (rows, rows * 1024)
        out = bytearray()
        with conn.cursor().copy("copy (select id, line from t_gss_copy order by id) to stdout") as copy:
            for data in copy:
                out += data
        assert hashlib.sha256(out).digest() == hashlib.sha256(payload).digest()
        conn.execute("drop table t_gss_copy")
    print(f"\nGSS-encrypted link: 20 MB result {t_result:.2f}s, 20 MB COPY in {t_in:.2f}s")
    wait_until(lambda: sum(e.get("command_tag") == f"COPY {rows}" for e in read_audit(proxy.audit_path)) >= 2,
               what="both COPYs audited")


def test_twenty_concurrent_sessions_share_one_credential(realm, kpg, own_proxy):
    before = tgt_requests(realm)
    proxy = own_proxy([
        gss_route("gss-tls", realm, kpg, address=f"localhost:{kpg.port}", tls=verify_full(kpg)),
        gss_route("gss-enc", realm, kpg, host="localhost", gssencmode="require"),
    ])
    assert acquisitions(proxy) == 0  # credentials are acquired on first use, not at start
    n = 20
    start, hold = threading.Barrier(n), threading.Barrier(n)
    rows: list[tuple] = []
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            start.wait(timeout=30)
            with connect(proxy, "gss-tls" if i % 2 else "gss-enc") as conn:
                rows.append(conn.execute("select current_user, pg_backend_pid(), (select encrypted from"
                                         " pg_stat_gssapi where pid = pg_backend_pid())").fetchone())
                hold.wait(timeout=60)  # all twenty sessions are live at once
        except BaseException as exc:  # asserted below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not errors, errors[:3]
    assert len(rows) == n and {r[0] for r in rows} == {"dbproxy"}
    assert len({r[1] for r in rows}) == n
    assert sorted(r[2] for r in rows) == [False] * (n // 2) + [True] * (n // 2)
    assert acquisitions(proxy) == 1, proxy.log_text()
    time.sleep(0.5)  # the KDC writes its log line as it answers; allow for it
    assert tgt_requests(realm) - before == 1
    assert len(session_starts(proxy, "gss-tls", success=True, count=n // 2)) == n // 2


def test_kdc_hang_blocks_neither_the_loop_nor_past_the_connect_timeout(realm, kpg, own_proxy, tmp_path):
    """A KDC that accepts but never answers: other sessions go on; the stuck one ends at the proxy's deadline."""
    keytab = tmp_path / "hang.keytab"
    shutil.copy(realm.proxy_keytab, keytab)
    trust_user = kpg.users["trust"][0]
    proxy = own_proxy([
        gss_route("gss-hang", realm, kpg, host="localhost", gssencmode="require", keytab_file=str(keytab)),
        {"name": "plain", "match": {"user": "plain"},
         "backend": {"address": f"127.0.0.1:{kpg.port}", "database": "app", "user": trust_user, "auth": {"method": "trust"}}},
    ])
    realm.stop()
    hole = socket.socket()
    hole.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    hole.bind(("127.0.0.1", realm.port))
    hole.listen(16)
    hole.settimeout(20)
    stuck: dict = {}

    def stuck_client() -> None:
        t0 = time.monotonic()
        try:
            connect(proxy, "gss-hang", connect_timeout=60).close()
            stuck["result"] = "connected"
        except psycopg.OperationalError as exc:
            stuck["result"] = str(exc)
        stuck["elapsed"] = time.monotonic() - t0

    accepted = []
    try:
        t = threading.Thread(target=stuck_client)
        t.start()
        accepted.append(hole.accept()[0])  # the proxy's acquisition thread is now waiting on the KDC
        t0 = time.monotonic()
        for _ in range(3):
            with connect(proxy, "plain") as conn:
                assert conn.execute("select current_user").fetchone() == (trust_user,)
        elapsed = time.monotonic() - t0
        assert elapsed < 3, f"3 unrelated sessions took {elapsed:.2f}s while the KDC hung"
        t.join(40)
        assert not t.is_alive()
        print(f"\nplain sessions during KDC hang: {elapsed:.2f}s; stuck session ended after {stuck['elapsed']:.1f}s")
        assert "did not answer in time" in stuck["result"]
        assert 14 < stuck["elapsed"] < 25
    finally:
        for c in accepted:
            c.close()
        hole.close()
        # The abandoned attempt ends once the KDC connection is gone; a new one works.
        try:
            wait_until(lambda: "could not acquire credentials" in proxy.log_text(), timeout=60, what="attempt ended")
        finally:
            realm.start()
    ev = session_starts(proxy, "gss-hang", success=False)[-1]
    assert "did not complete login within" in ev["error"]
    with connect(proxy, "gss-hang") as conn:
        assert conn.execute("select current_user").fetchone() == ("dbproxy",)


# --------------------------------------------------------------------------- renewal


def test_keytab_credential_renewed_before_expiry(realm, kpg, own_proxy):
    """60 s tickets, renew_margin 45 s: the credential is renewed after ~15 s, in the background."""
    realm.kadmin(f'modprinc -maxlife "60 seconds" {realm.proxy_principal}')
    try:
        before = tgt_requests(realm)
        proxy = own_proxy([gss_route("gss-enc", realm, kpg, host="localhost", gssencmode="require",
                                     renew_margin_seconds=45)])
        t0 = time.monotonic()
        with connect(proxy, "gss-enc") as conn:
            assert conn.execute("select current_user").fetchone() == ("dbproxy",)
        m = re.search(r"Kerberos credentials acquired for \S+ \(lifetime (\d+)s", proxy.log_text())
        assert m and 50 <= int(m.group(1)) <= 60, proxy.log_text()
        time.sleep(3)
        with connect(proxy, "gss-enc") as conn:
            conn.execute("select 1")
        assert acquisitions(proxy) == 1
        time.sleep(max(0.0, 16 - (time.monotonic() - t0)))
        with connect(proxy, "gss-enc") as conn:  # due for renewal: served at once, renewed behind it
            assert conn.execute("select current_user").fetchone() == ("dbproxy",)
        wait_until(lambda: acquisitions(proxy) == 2, timeout=10, what="background renewal")
        with connect(proxy, "gss-enc") as conn:
            assert conn.execute("select current_user").fetchone() == ("dbproxy",)
        assert acquisitions(proxy) == 2
        time.sleep(0.5)
        assert tgt_requests(realm) - before == 2
    finally:
        realm.kadmin(f'modprinc -maxlife "10 hours" {realm.proxy_principal}')


def test_ccache_credential_reread_after_external_renewal(realm, kpg, own_proxy, tmp_path):
    """A ccache kept fresh by someone else (kinit here): sessions outlive the first ticket."""
    cc = f"FILE:{tmp_path}/short.cc"
    env = {**os.environ, **realm.env()}

    def kinit(life: str) -> None:
        p = subprocess.run(["kinit", "-l", life, "-kt", str(realm.proxy_keytab), "-c", cc, "dbproxy"],
                           env=env, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr

    kinit("20s")
    first_expiry = time.monotonic() + 20
    proxy = own_proxy([gss_route("gss-cc", realm, kpg, tls={"mode": "require"}, host="localhost",
                                 keytab_file=None, principal=None, ccache=cc, renew_margin_seconds=12)])
    with connect(proxy, "gss-cc") as conn:
        assert conn.execute("select current_user").fetchone() == ("dbproxy",)
    assert acquisitions(proxy) == 1
    time.sleep(5)
    kinit("60s")  # the external renewer puts a newer ticket into the cache
    time.sleep(max(0.0, first_expiry - 11 - time.monotonic()))
    with connect(proxy, "gss-cc") as conn:
        conn.execute("select 1")
    wait_until(lambda: acquisitions(proxy) >= 2, timeout=10, what="ccache re-read")
    time.sleep(max(0.0, first_expiry + 2 - time.monotonic()))
    # The first ticket has expired; a credential handle on it would now fail.
    with connect(proxy, "gss-cc") as conn:
        assert conn.execute("select current_user").fetchone() == ("dbproxy",)
    assert session_starts(proxy, "gss-cc", success=True, count=3)
    assert not session_starts_failed(proxy, "gss-cc")


def session_starts_failed(proxy, user: str) -> list[dict]:
    return [e for e in read_audit(proxy.audit_path)
            if e.get("event") == "db.session.start" and e.get("requested_user") == user and e.get("success") is False]


# --------------------------------------------------------------------------- failure paths


@pytest.fixture(scope="module")
def fail_proxy(realm, kpg, tmp_path_factory):
    d = tmp_path_factory.mktemp("kfail")
    realm.add_principal("stale")
    realm.add_principal("gone")
    stale_kt = realm.keytab("stale", d / "stale.keytab")
    gone_kt = realm.keytab("gone", d / "gone.keytab")
    down_kt = d / "down.keytab"
    shutil.copy(realm.proxy_keytab, down_kt)
    tls = {"mode": "require"}
    routes = [
        gss_route("no-ticket", realm, kpg, tls=tls, host="localhost", keytab_file=None, principal=None,
                  ccache=f"FILE:{d}/never-filled.cc"),
        gss_route("expired-ticket", realm, kpg, tls=tls, host="localhost", keytab_file=None, principal=None,
                  ccache=f"FILE:{d}/expired.cc"),
        gss_route("stale-keytab", realm, kpg, tls=tls, host="localhost", principal=realm.principal("stale"),
                  keytab_file=str(stale_kt)),
        gss_route("expired-principal", realm, kpg, host="localhost", gssencmode="require",
                  principal=realm.principal("gone"), keytab_file=str(gone_kt)),
        gss_route("nosuch-tls", realm, kpg, tls=tls, host="localhost", service="nosuch"),
        gss_route("nosuch-enc", realm, kpg, host="localhost", gssencmode="require", service="nosuch"),
        gss_route("kdc-down", realm, kpg, host="localhost", gssencmode="require", keytab_file=str(down_kt)),
    ]
    proc = start_proxy(d, routes)
    proc.dir = d
    yield proc
    proc.stop()


def test_no_ticket_in_ccache(fail_proxy, realm):
    assert_auth_failure(fail_proxy, realm, "no-ticket", r"No credentials cache found")


def test_expired_ticket_in_ccache(fail_proxy, realm):
    p = subprocess.run(["kinit", "-l", "2s", "-kt", str(realm.proxy_keytab), "-c",
                        f"FILE:{fail_proxy.dir}/expired.cc", "dbproxy"],
                       env={**os.environ, **realm.env()}, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    time.sleep(3)
    assert_auth_failure(fail_proxy, realm, "expired-ticket", r"credential has expired")


def test_stale_keytab(fail_proxy, realm):
    realm.rotate_key("stale")  # the keytab the route names now holds an old key
    assert_auth_failure(fail_proxy, realm, "stale-keytab",
                        r"stale@DBPROXY\.TEST from keytab .*(Decrypt integrity check failed|Preauthentication failed|Password incorrect)")


def test_expired_principal(fail_proxy, realm):
    realm.expire_principal("gone", "yesterday")  # "now" only takes effect once the second has passed
    assert_auth_failure(fail_proxy, realm, "expired-principal", r"Client's entry in database has expired")


@pytest.mark.parametrize("route", ["nosuch-tls", "nosuch-enc"])
def test_wrong_service_principal(fail_proxy, realm, route):
    assert_auth_failure(fail_proxy, realm, route,
                        r"security context with nosuch@localhost failed: .*nosuch/localhost@DBPROXY\.TEST not found")


def test_kdc_down_then_up(fail_proxy, realm):
    realm.stop()
    try:
        assert_auth_failure(fail_proxy, realm, "kdc-down", r"Cannot contact any KDC for realm 'DBPROXY\.TEST'")
    finally:
        realm.start()
    with connect(fail_proxy, "kdc-down") as conn:
        assert conn.execute(STAT_SQL).fetchone()[:4] == ("dbproxy", False, True, True)
    assert session_starts(fail_proxy, "kdc-down", success=True)


def test_backend_rejects_ticket_for_rotated_service_key(realm, kpg, own_proxy, tmp_path):
    """The KDC hands out tickets under a new postgres/localhost key PostgreSQL does not have yet.

    Over GSSENC PostgreSQL answers the broken context with a plain ErrorResponse
    in place of a token; over TLS it fails the AuthenticationGSS exchange.
    """
    keytab = tmp_path / "rot.keytab"
    shutil.copy(realm.proxy_keytab, keytab)  # a fresh credential: no cached service ticket
    proxy = own_proxy([
        gss_route("rot-enc", realm, kpg, host="localhost", gssencmode="require", keytab_file=str(keytab)),
        gss_route("rot-tls", realm, kpg, host="localhost", tls={"mode": "require"}, keytab_file=str(keytab)),
    ])
    realm.rotate_key("postgres/localhost")
    try:
        for route in ("rot-enc", "rot-tls"):
            fields, _ = raw_login_error(proxy, route)
            assert fields["C"].startswith("28"), fields
            assert "could not" in fields["M"] and realm.realm not in fields["M"]
            ev = session_starts(proxy, route, success=False)[-1]
            assert ev["sqlstate"].startswith("28"), ev
            print(f"\n{route}: client {fields['C']} {fields['M']!r}; audit {ev['error']!r}")
        enc = session_starts(proxy, "rot-enc", success=False)[-1]
        assert "during GSS encryption setup" in enc["error"]
    finally:
        # Give PostgreSQL the new key too (appended: tickets under the old key stay valid).
        owner = "postgres" if os.geteuid() == 0 else None
        realm.keytab("postgres/localhost", kpg.dir / "postgres.keytab", owner=owner)
    for route in ("rot-enc", "rot-tls"):
        with connect(proxy, route) as conn:
            assert conn.execute("select current_user").fetchone() == ("dbproxy",)
