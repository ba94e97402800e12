"""RBAC policy, connection limits and the config sections (dbproxy/roles.py, limits.py, access.py).

The statement rules are tested with their engines: the SQL lexer and the
Postgres rules in tests/unit/postgres/test_pg_policy.py, CQL in
tests/unit/cassandra/test_cql_policy.py.
"""

from __future__ import annotations

import json
import os

import pytest

from dbproxy.access import is_loopback
from dbproxy.limits import ConnectionLimits, LimitsConfig, TooManyConnections
from dbproxy.roles import UNRESTRICTED, AccessPolicy, Grant, RoleConfig, command_matches
from dbproxy.config import load_config
from dbproxy.errors import AccessDenied, ConfigErrors
from dbproxy.session import Identity, Session
from dbproxy.statements import Refusal
from dbproxy.engines import default_registry

REG = default_registry()
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROLES = {
    "analyst": RoleConfig("analyst", routes=("app-*",), databases=("app",), db_users=("app_ro", "app_rw"), read_only=True),
    "developer": RoleConfig("developer", routes=("app-*",), databases=("app", "scratch*"), db_users=("app_rw",), deny_commands=("DROP", "TRUNCATE")),
    "auditor": RoleConfig("auditor", routes=("*",), databases=("*",), db_users=("*",), read_only=True, deny_commands=("COPY",)),
}


def who(*roles: str, user: str = "alice") -> Identity:
    return Identity(user=user, roles=roles, method="token", token_id="t1")


# --------------------------------------------------------------------------- policy


def test_deny_by_default():
    policy = AccessPolicy(ROLES, enforced=True)
    for identity in (who(), who("no-such-role"), Identity()):
        with pytest.raises(AccessDenied) as info:
            policy.authorize(identity, route="app-rw", database="app", db_user="app_rw")
        assert info.value.reason == "no_role_allows"


@pytest.mark.parametrize(
    "route,database,db_user,allowed",
    [
        ("app-rw", "app", "app_rw", True),
        ("app-rw", "app", "postgres", False),  # db user not in any role
        ("admin", "app", "app_rw", False),  # route not allowed for analyst
        ("app-rw", "other", "app_rw", False),  # database not allowed
        ("app-rw", "scratch1", "app_ro", False),  # developer has scratch*, but not app_ro
    ],
)
def test_connect_checks_route_database_and_user(route, database, db_user, allowed):
    policy = AccessPolicy(ROLES, enforced=True)
    ident = who("analyst", "developer")
    if allowed:
        assert policy.authorize(ident, route=route, database=database, db_user=db_user).restricted
    else:
        with pytest.raises(AccessDenied):
            policy.authorize(ident, route=route, database=database, db_user=db_user)


def test_grant_merges_granting_roles_only():
    policy = AccessPolicy(ROLES, enforced=True)
    # analyst alone: read-only, no deny patterns.
    g = policy.authorize(who("analyst"), route="app-rw", database="app", db_user="app_ro")
    assert (g.roles, g.read_only, g.deny_commands) == (("analyst",), True, ())
    # analyst + developer both grant app_rw: read-write (allows are a union), developer's denies apply.
    g = policy.authorize(who("analyst", "developer"), route="app-rw", database="app", db_user="app_rw")
    assert (set(g.roles), g.read_only, g.deny_commands) == ({"analyst", "developer"}, False, ("DROP", "TRUNCATE"))
    # developer does not grant app_ro: only analyst's rules, so read-only.
    g = policy.authorize(who("analyst", "developer"), route="app-rw", database="app", db_user="app_ro")
    assert g.read_only and g.deny_commands == ()
    # auditor + developer: denies are a union (a deny always wins).
    g = policy.authorize(who("auditor", "developer"), route="app-x", database="app", db_user="app_rw")
    assert not g.read_only and set(g.deny_commands) == {"DROP", "TRUNCATE", "COPY"}


def test_database_checked_later_when_unknown_at_connect():
    policy = AccessPolicy(ROLES, enforced=True)
    g = policy.authorize(who("developer"), route="app-1", database=None, db_user="app_rw")
    assert g.allows_database("scratch7") and g.allows_database("app") and not g.allows_database("admin")


def test_not_enforced_without_identity_or_roles():
    assert AccessPolicy(None, enforced=False).authorize(Identity(), route="x", database="y", db_user="z") is UNRESTRICTED
    assert not UNRESTRICTED.restricted and not UNRESTRICTED.has_statement_rules


@pytest.mark.parametrize(
    "command,pattern,hit",
    [
        ("DROP TABLE", "DROP", True),
        ("DROP TABLE", "drop table", True),
        ("DROP TABLE", "DROP T*", True),
        ("DROP DATABASE", "DROP TABLE", False),
        ("DROPPED", "DROP", False),
        ("dropDatabase", "dropdatabase", True),
        ("ALTER SYSTEM", "ALTER SYSTEM", True),
        ("ALTER TABLE", "ALTER SYSTEM", False),
    ],
)
def test_command_patterns(command, pattern, hit):
    assert command_matches(command, pattern) is hit
    assert (Grant(deny_commands=(pattern,)).denied_command(command) == pattern) is hit


class LineDialect:
    """A made-up statement language (one statement a line, its command the first word) with two readings.

    The core's rules must work with any dialect an engine brings: no SQL or CQL here.
    """

    name = "lines"

    def statements(self, text: str) -> list[list[str]]:
        return [line.upper().split() for line in text.splitlines() if line.strip()]

    def variants(self, text: str) -> list[list[list[str]]]:
        # a second reading in which "|" also ends a statement
        return [self.statements(text), self.statements(text.replace("|", "\n"))]

    def commands(self, stmt: list[str]) -> list[str]:
        return stmt[:1] + [w for w in stmt[1:] if w.startswith("+")]

    def read_only_violation(self, stmt: list[str]) -> str | None:
        return None if stmt[0] in ("GET", "LIST") else f"{stmt[0]} writes"


def test_grant_refusal_through_a_dialect():
    lines = LineDialect()
    ro = Grant(read_only=True, deny_commands=("PUT",), restricted=True)
    assert ro.refusal("get a\nlist b", lines) is None
    assert ro.refusal("get a\nput b", lines) == Refusal("command_denied", "PUT", "PUT")  # a deny is named before read-only
    assert ro.refusal("get a\nset b", lines) == Refusal("read_only", "SET", "SET writes")
    assert ro.refusal("get a | set b", lines) == Refusal("read_only", "SET", "SET writes")  # every reading is checked
    assert Grant(deny_commands=("+DROP*",), restricted=True).refusal("get a +dropall", lines) == Refusal("command_denied", "+DROPALL", "+DROP*")
    assert Grant(deny_commands=("PUT",)).refusal("get a\nset b", lines) is None  # not read-only: only the patterns


# --------------------------------------------------------------------------- limits


def _session(user: str, listener: str = "pg") -> Session:
    s = Session(listener=listener, protocol="postgres", client_addr="127.0.0.1:1")
    s.identity = who(user=user)
    return s


def test_connection_limits_per_identity_and_listener():
    limits = ConnectionLimits(LimitsConfig(per_identity=2, per_listener=3, identities={"carol": 1}, listeners={"small": 1}))
    a1, a2, a3 = _session("alice"), _session("alice"), _session("alice")
    limits.admit(a1)
    limits.admit(a1)  # idempotent
    limits.admit(a2)
    with pytest.raises(TooManyConnections) as info:
        limits.admit(a3)
    assert info.value.scope == "identity" and info.value.reason == "too_many_connections_identity"
    limits.admit(_session("bob"))
    with pytest.raises(TooManyConnections) as info:
        limits.admit(_session("dave"))
    assert info.value.scope == "listener"
    limits.release(a1)
    limits.release(a1)  # idempotent
    limits.admit(a3)
    c1 = _session("carol", "other")
    limits.admit(c1)
    with pytest.raises(TooManyConnections):
        limits.admit(_session("carol", "other"))  # carol's own limit (1), across listeners
    limits.admit(_session("erin", "small"))
    with pytest.raises(TooManyConnections):
        limits.admit(_session("frank", "small"))  # the per-listener override
    assert limits.by_identity["alice"] == 2 and limits.by_listener["pg"] == 3


def test_refused_session_holds_no_slot():
    limits = ConnectionLimits(LimitsConfig(per_identity=1))
    s = _session("alice")
    limits.admit(s)
    refused = _session("alice")
    with pytest.raises(TooManyConnections):
        limits.admit(refused)
    limits.release(refused)  # the server releases every session; a refused one must not free s's slot
    with pytest.raises(TooManyConnections):
        limits.admit(_session("alice"))


# --------------------------------------------------------------------------- config


def _doc(tmp_path, **extra) -> dict:
    doc = {
        "listeners": [
            {
                "name": "pg",
                "protocol": "postgres",
                "listen": "127.0.0.1:15432",
                "routes": [{"name": "app", "backend": {"address": "127.0.0.1:5432", "auth": {"method": "trust"}}}],
            }
        ],
        "audit": {"sinks": []},
    }
    doc.update(extra)
    return doc


def _keys(tmp_path) -> dict:
    from dbproxy.identity.keys import generate_keys

    generate_keys("EdDSA", str(tmp_path / "k"), str(tmp_path / "k.pub"))
    return {"token": {"algorithm": "EdDSA", "public_key_file": "k.pub", "key_file": "k", "registry_file": "reg.json", "revocation_file": "rev.txt"}}


def _load(tmp_path, doc):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(doc))
    return load_config(str(path), REG)


def _errors(tmp_path, doc) -> list[str]:
    with pytest.raises(ConfigErrors) as info:
        _load(tmp_path, doc)
    return [f"{e.path}: {e.expected}" for e in info.value.errors]


def test_no_identity_means_anonymous_on_loopback(tmp_path):
    cfg = _load(tmp_path, _doc(tmp_path))
    assert cfg.identity is None and cfg.roles is None and cfg.limits is None
    assert cfg.listeners[0].auth.methods == ("anonymous",) and not cfg.listeners[0].auth.explicit
    from dbproxy.access import build_access

    assert build_access(cfg) is None  # unrestricted, exactly as before identity existed


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "db.example"])
def test_anonymous_listener_off_loopback_refused(tmp_path, host):
    doc = _doc(tmp_path)
    doc["listeners"][0]["listen"] = f"[{host}]:15432" if ":" in host else f"{host}:15432"
    errs = _errors(tmp_path, doc)
    assert any(e.startswith("listeners[0].listen: a loopback address for an anonymous listener") for e in errs), errs
    doc["listeners"][0]["auth"] = {"methods": ["anonymous"], "i_know_this_is_open": True}
    assert _load(tmp_path, doc).listeners[0].auth.i_know_this_is_open


def test_is_loopback():
    assert is_loopback("127.0.0.1") and is_loopback("127.9.9.9") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("") and not is_loopback("example.com")


def test_identity_defaults_listener_to_token(tmp_path):
    doc = _doc(tmp_path, identity=_keys(tmp_path), roles={"r": {"routes": ["*"], "databases": ["*"], "db_users": ["*"]}})
    cfg = _load(tmp_path, doc)
    assert cfg.listeners[0].auth.methods == ("token",)
    assert cfg.identity.token.registry_file == str(tmp_path / "reg.json")
    assert cfg.identity.token.leeway == 30 and cfg.identity.token.max_ttl == 24 * 3600


CONFIG_CASES = [
    ("token without identity", lambda d, t: d["listeners"][0].update(auth={"methods": ["token"]}), 'listeners[0].auth: identity.token to be configured'),
    ("unknown method", lambda d, t: d["listeners"][0].update(auth={"methods": ["password"]}), "listeners[0].auth.methods[0]: one of token, mtls, publickey, anonymous"),
    ("empty methods", lambda d, t: d["listeners"][0].update(auth={"methods": []}), 'listeners[0].auth: a key "methods"'),
    ("duplicate method", lambda d, t: d["listeners"][0].update(auth={"methods": ["anonymous", "anonymous"]}), "listed twice"),
    ("unknown auth key", lambda d, t: d["listeners"][0].update(auth={"methods": ["anonymous"], "open": True}), "listeners[0].auth.open: no key 'open'"),
    ("mtls without CA", lambda d, t: (d.update(identity={"mtls": {}}), d["listeners"][0].update(auth={"methods": ["mtls"]})), 'listeners[0].tls.client_ca_file for method "mtls"'),
    ("anonymous roles undefined", lambda d, t: d["listeners"][0].update(auth={"methods": ["anonymous"], "anonymous_roles": ["ghost"]}), "listeners[0].auth.anonymous_roles[0]: a role defined"),
    ("role lacks routes", lambda d, t: d.update(roles={"r": {"databases": ["*"], "db_users": ["*"]}}), "roles.r: a key 'routes'"),
    ("role bad deny", lambda d, t: d.update(roles={"r": {"routes": ["*"], "databases": ["*"], "db_users": ["*"], "deny_commands": "DROP"}}), "roles.r.deny_commands: an array"),
    ("role unknown key", lambda d, t: d.update(roles={"r": {"routes": ["*"], "databases": ["*"], "db_users": ["*"], "readonly": True}}), "roles.r.readonly: no key"),
    ("limits bad", lambda d, t: d.update(limits={"max_connections_per_identity": 0}), "limits.max_connections_per_identity: an integer >= 1"),
    ("limits unknown listener", lambda d, t: d.update(limits={"listeners": {"nope": 3}}), "limits.listeners.nope: the name of a listener"),
    ("inline key", lambda d, t: d.update(identity={"token": {"algorithm": "HS256", "key": "abc"}}), "identity.token.key: no inline key"),
    ("hs256 key missing", lambda d, t: d.update(identity={"token": {"algorithm": "HS256"}}), "identity.token: a key 'key_file'"),
    ("bad algorithm", lambda d, t: d.update(identity={"token": {"algorithm": "RS256"}}), "identity.token.algorithm: one of EdDSA, HS256"),
    ("eddsa needs public key", lambda d, t: d.update(identity={"token": {"algorithm": "EdDSA", "key_file": "k"}}), "identity.token: a key 'public_key_file'"),
    ("empty identity", lambda d, t: d.update(identity={}), 'identity: "token", "mtls" and/or "publickey"'),
    ("anonymous without roles under RBAC", lambda d, t: d.update(roles={}), 'listeners[0]: "anonymous_roles" for an anonymous-only listener'),
    ("mtls role undefined", lambda d, t: d.update(identity={"mtls": {"users": {"alice": ["ghost"]}}}, roles={}), "identity.mtls.users.alice: roles defined"),
]


@pytest.mark.parametrize("name,mutate,expected", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_config_errors(tmp_path, name, mutate, expected):
    doc = _doc(tmp_path)
    mutate(doc, tmp_path)
    errs = _errors(tmp_path, doc)
    assert any(expected in e for e in errs), errs


def test_world_readable_hmac_key_refused(tmp_path):
    key = tmp_path / "hs.key"
    key.write_text("x" * 40)
    os.chmod(key, 0o644)
    errs = _errors(tmp_path, _doc(tmp_path, identity={"token": {"algorithm": "HS256", "key_file": str(key)}}))
    assert any("world-accessible" in e for e in errs), errs
    os.chmod(key, 0o600)
    assert _load(tmp_path, _doc(tmp_path, identity={"token": {"algorithm": "HS256", "key_file": str(key)}})).identity.token.algorithm == "HS256"


def test_engine_without_client_auth_support_fails_closed(tmp_path):
    """An engine that has not declared client_auth_methods only offers anonymous: identity must not be silently skipped."""
    from dbproxy.engine import Engine, EngineRegistry

    class Legacy(Engine):
        protocol = "legacy"
        auth_methods = ("trust",)

    reg = EngineRegistry()
    reg.register("legacy", Legacy)
    doc = _doc(tmp_path, identity=_keys(tmp_path))
    doc["listeners"][0]["protocol"] = "legacy"
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigErrors) as info:
        load_config(str(path), reg)
    assert any('a key "auth": identity is configured' in str(e) for e in info.value.errors)
    doc["listeners"][0]["auth"] = {"methods": ["token"]}
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigErrors) as info:
        load_config(str(path), reg)
    assert any("a method the legacy engine supports" in str(e) for e in info.value.errors)


def test_example_identity_config_is_structurally_valid(monkeypatch):
    for var in ("DBPROXY_APP_RO_PASSWORD", "DBPROXY_APP_RW_PASSWORD", "DBPROXY_APP_OWNER_PASSWORD"):
        monkeypatch.setenv(var, "x")
    with pytest.raises(ConfigErrors) as info:
        load_config(os.path.join(ROOT, "configs", "identity.json"), REG)
    # Only the files of a real deployment (keys, certificates) are missing here.
    for err in info.value.errors:
        assert "a readable file" in err.expected and "/etc/dbproxy/" in err.expected, err
