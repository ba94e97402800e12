"""The real PostgreSQL / MIT Kerberos / pgbouncer peers work as the proxy's tests expect.

Talks to the peers directly (no proxy): every password method with and
without TLS, the GSSAPI path both through python-gssapi (what the proxy will
use) and through libpq (system libpq 15 and psycopg-binary's), pgbouncer, and
the failure levers (crash/restart, KDC down, stale keytab).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid

import gssapi
import psycopg
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from scripts.peers.certs import make_ca, make_cert
from scripts.peers.kdc import start_realm
from scripts.peers.pgbouncer import start_pgbouncer
from scripts.peers.postgres import start_postgres

pytestmark = pytest.mark.integration

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PASSWORD_METHODS = ["password", "md5", "scram-sha-256"]


@pytest.fixture(scope="module")
def realm(tmp_path_factory):
    t0 = time.monotonic()
    kr = start_realm(tmp_path_factory.mktemp("krb"))
    print(f"\nrealm setup {time.monotonic() - t0:.2f}s")
    yield kr
    kr.close()


@pytest.fixture(scope="module")
def pg(realm, tmp_path_factory):
    t0 = time.monotonic()
    server = start_postgres(tmp_path_factory.mktemp("pg"), kerberos=realm)
    print(f"\npostgres setup {time.monotonic() - t0:.2f}s")
    yield server
    server.stop()


@pytest.fixture
def krb_env(realm, monkeypatch):
    """Point this process's MIT krb5 (python-gssapi) at the test realm."""
    for k, v in realm.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("KRB5CCNAME", raising=False)
    return realm.env()


def _session(conn) -> tuple[str, bool]:
    user, ssl = conn.execute(
        "select current_user, ssl from pg_stat_ssl where pid = pg_backend_pid()"
    ).fetchone()
    return user, ssl


# -- password methods ----------------------------------------------------

@pytest.mark.parametrize("sslmode", ["disable", "require"])
@pytest.mark.parametrize("method", ["trust", *PASSWORD_METHODS])
def test_password_method_logs_in(pg, method, sslmode):
    user, password = pg.users[method]
    with psycopg.connect(pg.dsn(user, password, sslmode=sslmode, gssencmode="disable"),
                         connect_timeout=5) as conn:
        assert _session(conn) == (user, sslmode == "require")
        table = f"t_{user}_{sslmode}"
        conn.execute(f"create table {table} (x int)")
        conn.execute(f"insert into {table} values (42)")
        assert conn.execute(f"select x from {table}").fetchone() == (42,)
        conn.execute(f"drop table {table}")
    if method != "trust":
        # The server log names the pg_hba method that authenticated the session.
        assert re.search(rf'identity="{user}" method={re.escape(method)} ', pg.log_text())


@pytest.mark.parametrize("sslmode", ["disable", "require"])
@pytest.mark.parametrize("method", PASSWORD_METHODS)
def test_wrong_password_fails(pg, method, sslmode):
    user, _ = pg.users[method]
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(pg.dsn(user, "not-the-password", sslmode=sslmode, gssencmode="disable"),
                        connect_timeout=5)


def test_trust_ignores_password(pg):
    user, _ = pg.users["trust"]
    with psycopg.connect(pg.dsn(user, "anything", sslmode="disable"), connect_timeout=5) as conn:
        assert _session(conn) == (user, False)


def test_password_storage(pg):
    rows = dict(
        line.split("|", 1)
        for line in pg.psql("-c", "select rolname, left(rolpassword, 13) from pg_authid"
                                  " where rolname like 'u\\_%'").split()
    )
    assert rows["u_md5"].startswith("md5")
    assert rows["u_scram"].startswith("SCRAM-SHA-256")


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_tls_verify_full(pg, host):
    user, password = pg.users["scram-sha-256"]
    dsn = pg.dsn(user, password, host=host, sslmode="verify-full", sslrootcert=str(pg.ca_file))
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        assert _session(conn) == (user, True)


def test_tls_rejects_foreign_ca(pg, tmp_path):
    other_ca, _ = make_ca(tmp_path)
    user, password = pg.users["scram-sha-256"]
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        psycopg.connect(pg.dsn(user, password, sslmode="verify-ca", sslrootcert=str(other_ca)),
                        connect_timeout=5)


def test_admin_over_unix_socket(pg):
    assert pg.psql("-c", "select current_user").strip() == "postgres"
    roles = set(pg.psql("-c", "select rolname from pg_roles where rolcanlogin").split())
    assert {"u_trust", "u_password", "u_md5", "u_scram", "dbproxy"} <= roles


def test_no_tcp_for_superuser(pg):
    with pytest.raises(psycopg.OperationalError, match="no pg_hba.conf entry"):
        psycopg.connect(pg.dsn("postgres", sslmode="disable", gssencmode="disable"), connect_timeout=5)


# -- Kerberos / GSSAPI ---------------------------------------------------

def _service_token(keytab) -> bytes:
    """First GSS-API token for postgres@localhost, creds straight from *keytab*."""
    creds = gssapi.Credentials(usage="initiate", store={
        "client_keytab": str(keytab), "ccache": f"MEMORY:{uuid.uuid4().hex}",
    })
    ctx = gssapi.SecurityContext(
        name=gssapi.Name("postgres@localhost", gssapi.NameType.hostbased_service),
        creds=creds, usage="initiate",
    )
    return ctx.step()


def test_gssapi_service_ticket_from_keytab(pg, realm, krb_env):
    token = _service_token(realm.proxy_keytab)
    assert len(token) > 100  # an AP-REQ carrying the postgres/localhost ticket
    creds = gssapi.Credentials(usage="initiate", store={
        "client_keytab": str(realm.proxy_keytab), "ccache": f"MEMORY:{uuid.uuid4().hex}",
    })
    assert str(creds.name) == f"dbproxy@{realm.realm}"
    assert pg.krb_service == f"postgres/localhost@{realm.realm}"


def test_gssapi_stale_keytab_fails(realm, krb_env, tmp_path):
    realm.add_principal("stale")
    kt = realm.keytab("stale", tmp_path / "stale.keytab")
    _service_token(kt)
    realm.rotate_key("stale")
    with pytest.raises(gssapi.exceptions.GSSError):
        _service_token(kt)


def test_gssapi_kdc_down_then_up(realm, krb_env):
    realm.stop()
    try:
        assert not realm.running
        with pytest.raises(gssapi.exceptions.GSSError):
            _service_token(realm.proxy_keytab)
    finally:
        realm.start()
    assert _service_token(realm.proxy_keytab)


_LIBPQ_PROBE = """
import sys, psycopg
with psycopg.connect(sys.argv[1], connect_timeout=5) as c:
    row = c.execute(
        "select current_user, g.gss_authenticated, g.encrypted, s.ssl"
        " from pg_stat_gssapi g join pg_stat_ssl s using (pid) where pid = pg_backend_pid()"
    ).fetchone()
    print(psycopg.pq.__impl__, *row)
"""


@pytest.fixture(scope="module")
def gss_ccache(realm, pg, tmp_path_factory):
    cc = f"FILE:{tmp_path_factory.mktemp('ccache')}/dbproxy.cc"
    realm.kinit("dbproxy", realm.proxy_keytab, cc)
    return cc


def _libpq(pg, realm, ccache, impl, **kw):
    env = {**os.environ, **realm.env(), "KRB5CCNAME": ccache, "PSYCOPG_IMPL": impl,
           "PYTHONPATH": REPO_ROOT}
    kw.setdefault("host", pg.gss_host)
    dsn = pg.dsn(pg.gss_user, **kw)
    return subprocess.run([sys.executable, "-c", _LIBPQ_PROBE, dsn], env=env,
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("impl", ["binary", "python"])  # psycopg-binary's libpq / system libpq 15
@pytest.mark.parametrize("transport,kw,expect", [
    ("tls", {"sslmode": "require", "gssencmode": "disable"}, "True False True"),
    ("gssenc", {"gssencmode": "require"}, "True True False"),
])
def test_libpq_gss_login(pg, realm, gss_ccache, impl, transport, kw, expect):
    p = _libpq(pg, realm, gss_ccache, impl, **kw)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == [impl, "dbproxy", *expect.split()]


def test_libpq_gss_needs_tls_or_gssenc(pg, realm, gss_ccache):
    p = _libpq(pg, realm, gss_ccache, "binary", sslmode="disable", gssencmode="disable")
    assert p.returncode != 0
    assert "no pg_hba.conf entry" in p.stderr


def test_libpq_gss_by_ip_fails(pg, realm, gss_ccache):
    # TESTENV: the KDC has postgres/localhost only.
    p = _libpq(pg, realm, gss_ccache, "binary", host="127.0.0.1", gssencmode="require")
    assert p.returncode != 0
    assert f"postgres/127.0.0.1@{realm.realm} not found" in p.stderr


# -- pgbouncer -----------------------------------------------------------

@pytest.mark.parametrize("method", ["scram-sha-256", "md5"])
def test_pgbouncer_select_1(pg, method, tmp_path):
    user, password = pg.users[method]
    t0 = time.monotonic()
    with start_pgbouncer(tmp_path, pg, user, password) as pgb:
        print(f"\npgbouncer setup {time.monotonic() - t0:.2f}s")
        with psycopg.connect(pgb.dsn(sslmode="disable"), connect_timeout=5) as conn:
            assert conn.execute("select 1, current_user").fetchone() == (1, user)
            # pgbouncer's own backend connection is a separate session on the server.
            assert conn.execute("select application_name from pg_stat_activity"
                                " where pid = pg_backend_pid()").fetchone() is not None
        dsn = pgb.dsn(sslmode="verify-full", sslrootcert=str(pgb.ca_file), host="localhost")
        with psycopg.connect(dsn, connect_timeout=5) as conn:
            assert conn.pgconn.ssl_in_use
            assert conn.execute("select 1").fetchone() == (1,)
        with psycopg.connect(pgb.dsn(db="pgbouncer", sslmode="disable"), autocommit=True,
                             connect_timeout=5) as admin:
            pools = [r for r in admin.execute("show pools").fetchall() if r[0] == "app"]
            assert pools and pools[0][1] == user
        pgb_dir = pgb.dir
    assert not pgb_dir.exists()


# -- certs ----------------------------------------------------------------

def test_certs_chain_and_usage(tmp_path):
    ca_path, _ = make_ca(tmp_path)
    ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
    srv = x509.load_pem_x509_certificate(make_cert(tmp_path, (ca_path, tmp_path / "ca.key"), "localhost")[0].read_bytes())
    cli_cert, cli_key = make_cert(tmp_path, (ca_path, tmp_path / "ca.key"), "alice", client=True)
    cli = x509.load_pem_x509_certificate(cli_cert.read_bytes())
    srv.verify_directly_issued_by(ca)
    cli.verify_directly_issued_by(ca)
    eku = lambda c: list(c.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert eku(srv) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert eku(cli) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    sans = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert oct(cli_key.stat().st_mode & 0o777) == "0o600"


# -- crash and restart (last: it bounces the shared server) --------------

def test_kill_and_restart(pg):
    user, password = pg.users["scram-sha-256"]
    dsn = pg.dsn(user, password, sslmode="require")
    conn = psycopg.connect(dsn, connect_timeout=5)
    t0 = time.monotonic()
    pg.kill()
    try:
        assert not pg.running
        with pytest.raises(psycopg.OperationalError):
            conn.execute("select 1")
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(dsn, connect_timeout=5)
    finally:
        conn.close()
        pg.start()
    print(f"\nkill+restart {time.monotonic() - t0:.2f}s")
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
