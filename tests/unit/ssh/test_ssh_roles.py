"""Roles for terminal sessions: ``targets`` and ``logins`` grant SSH, ``databases``/``db_users`` grant
databases, deny by default either way; ``port_forwarding`` per role; mistakes named with file and JSON path."""

from __future__ import annotations

import json

import pytest

from dbproxy.config import load_config
from dbproxy.engines import default_registry
from dbproxy.errors import AccessDenied, ConfigErrors
from dbproxy.roles import AccessPolicy, RoleConfig
from dbproxy.session import Identity

from .test_ssh_config import doc, errors_for, files  # noqa: F401  (fixture)

REG = default_registry()


def policy(**roles: RoleConfig) -> AccessPolicy:
    return AccessPolicy(roles, enforced=True)


OPS = RoleConfig(name="ops", routes=("*",), databases=(), db_users=(), targets=("web-*",), logins=("deploy",),
                 port_forwarding=("local",))
DBA = RoleConfig(name="dba", routes=("*",), databases=("web-*",), db_users=("deploy",))


def test_targets_and_logins_grant_terminals():
    grant = policy(ops=OPS).authorize(Identity("alice", ("ops",)), route="r", database="web-1", db_user="deploy",
                                      family="terminal")
    assert grant.roles == ("ops",) and grant.allows_forwarding("local") and not grant.allows_forwarding("remote")


@pytest.mark.parametrize("target, login", [("db-1", "deploy"), ("web-1", "root")])
def test_terminal_outside_the_globs_denied(target, login):
    with pytest.raises(AccessDenied) as info:
        policy(ops=OPS).authorize(Identity("alice", ("ops",)), route="r", database=target, db_user=login,
                                  family="terminal")
    assert info.value.reason == "no_role_allows"
    assert f"target {target!r}" in str(info.value) and f"login {login!r}" in str(info.value)


def test_database_keys_do_not_grant_terminals_nor_the_reverse():
    """A role naming the same globs as databases grants no SSH session, and a terminal role no database."""
    with pytest.raises(AccessDenied):
        policy(dba=DBA).authorize(Identity("bob", ("dba",)), route="r", database="web-1", db_user="deploy",
                                  family="terminal")
    with pytest.raises(AccessDenied):
        policy(ops=OPS).authorize(Identity("alice", ("ops",)), route="r", database="web-1", db_user="deploy")
    assert policy(dba=DBA).authorize(Identity("bob", ("dba",)), route="r", database="web-1", db_user="deploy").roles == ("dba",)


def test_forwarding_is_a_union_and_off_by_default():
    plain = RoleConfig(name="plain", routes=("*",), databases=(), db_users=(), targets=("*",), logins=("*",))
    remote = RoleConfig(name="remote", routes=("*",), databases=(), db_users=(), targets=("*",), logins=("*",),
                        port_forwarding=("remote",))
    p = policy(plain=plain, remote=remote)
    assert p.authorize(Identity("a", ("plain",)), route="r", database="h", db_user="u", family="terminal").port_forwarding == ()
    both = p.authorize(Identity("a", ("plain", "remote")), route="r", database="h", db_user="u", family="terminal")
    assert both.allows_forwarding("remote") and not both.allows_forwarding("local")


def test_role_keys_load(files):  # noqa: F811
    d = doc()
    d["roles"] = {"ops": {"routes": ["*"], "targets": ["web-*"], "logins": ["deploy"], "port_forwarding": ["local", "remote"]},
                  "both": {"routes": ["*"], "databases": ["*"], "db_users": ["*"], "targets": ["*"], "logins": ["*"]}}
    path = files / "cfg.json"
    path.write_text(json.dumps(d))
    roles = load_config(str(path), REG).roles
    assert roles["ops"].targets == ("web-*",) and roles["ops"].logins == ("deploy",)
    assert roles["ops"].databases == () and roles["ops"].port_forwarding == ("local", "remote")
    assert roles["both"].grants("database") == (("*",), ("*",)) and roles["both"].grants("terminal") == (("*",), ("*",))


@pytest.mark.parametrize("role, expected", [
    ({"routes": ["*"]}, 'roles.r: what the role grants: "databases" and "db_users" (database sessions) and/or "targets"'),
    ({"routes": ["*"], "targets": ["web-*"]}, "roles.r: a key 'logins'"),
    ({"routes": ["*"], "logins": ["deploy"]}, "roles.r: a key 'targets'"),
    ({"routes": ["*"], "databases": ["x"]}, "roles.r: a key 'db_users'"),
    ({"routes": ["*"], "targets": "web-*", "logins": ["deploy"]}, "roles.r.targets: an array of non-empty strings"),
    ({"routes": ["*"], "targets": ["*"], "logins": ["*"], "port_forwarding": ["dynamic"]},
     "roles.r.port_forwarding[0]: one of local, remote, got 'dynamic'"),
    ({"routes": ["*"], "targets": ["*"], "logins": ["*"], "hosts": ["*"]}, "roles.r.hosts: no key 'hosts'"),
])
def test_role_mistakes_are_named(files, role, expected):  # noqa: F811
    d = doc()
    d["roles"] = {"r": role}
    errors = errors_for(files, d)
    assert any(e.startswith(expected) for e in errors), errors
