"""Redfish policy (engines/redfish/policy.py): method + path globs + action parameter allow-lists,
paths that could hide another path, the BMC's sessions and accounts; and its config with the roles."""

from __future__ import annotations

import json

import pytest

from dbproxy.config import load_config
from dbproxy.engines import default_registry
from dbproxy.engines.redfish.policy import BadPath, Policy, Rule, action_of, normalize_path
from dbproxy.errors import ConfigErrors
from dbproxy.roles import AccessPolicy
from dbproxy.session import Identity

SYS = "/redfish/v1/Systems/1"
RESET = f"{SYS}/Actions/ComputerSystem.Reset"
RESET_RULE = Rule(methods=("POST",), paths=("/redfish/v1/Systems/*",),
                  actions=(("ComputerSystem.Reset", (("ResetType", ("On", "GracefulShutdown", "GracefulRestart")),)),))
READ_RULE = Rule(methods=("GET", "HEAD"), paths=("/redfish/v1", "/redfish/v1/*"))


def policy(*rules: Rule) -> Policy:
    return Policy.from_grant([rules])


def test_reads_under_a_glob():
    p = policy(READ_RULE)
    assert p.decide("GET", SYS, None, None).allowed
    assert p.decide("GET", "/redfish/v1", None, None).allowed
    assert p.decide("GET", f"{SYS}/Bios", None, None).allowed  # '*' crosses '/': everything under
    d = p.decide("PATCH", SYS, None, None)
    assert not d.allowed and d.reason == "no_rule" and "PATCH" in d.message


def test_reset_parameters_allow_list():
    p = policy(READ_RULE, RESET_RULE)
    assert p.decide("POST", RESET, "ComputerSystem.Reset", {"ResetType": "On"}).allowed
    assert p.decide("POST", RESET, "ComputerSystem.Reset", {}).allowed
    d = p.decide("POST", RESET, "ComputerSystem.Reset", {"ResetType": "ForceOff"})
    assert not d.allowed and d.reason == "parameter_not_allowed" and "ForceOff" in d.message
    d = p.decide("POST", RESET, "ComputerSystem.Reset", {"ResetType": "On", "Extra": "1"})
    assert not d.allowed and "'Extra'" in d.message
    d = p.decide("POST", RESET, "ComputerSystem.Reset", {"ResetType": ["On"]})  # not a string
    assert not d.allowed
    # Another action on the same path is not granted by the Reset rule, nor by the read rule.
    d = p.decide("POST", f"{SYS}/Actions/ComputerSystem.SetDefaultBootOrder", "ComputerSystem.SetDefaultBootOrder", {})
    assert not d.allowed and d.reason == "no_rule"
    # A rule for plain requests never allows an action on a path it covers.
    assert not policy(Rule(methods=("POST",), paths=("*",))).decide("POST", RESET, "ComputerSystem.Reset", {}).allowed


def test_wildcard_values_and_union_of_roles():
    any_reset = Rule(methods=("POST",), paths=("*",), actions=(("ComputerSystem.Reset", (("ResetType", ("*",)),)),))
    p = Policy.from_grant([(READ_RULE,), (any_reset,)])  # two granting roles
    assert p.decide("POST", RESET, "ComputerSystem.Reset", {"ResetType": "ForceOff"}).allowed


def test_sessions_and_accounts_need_a_rule_naming_them():
    p = policy(Rule(methods=("GET", "POST", "DELETE"), paths=("/redfish/v1/*",)))
    for path in ("/redfish/v1/SessionService", "/redfish/v1/SessionService/Sessions",
                 "/redfish/v1/AccountService/Accounts/1"):
        d = p.decide("GET", path, None, None)
        assert not d.allowed and d.reason == "protected_resource", path
    assert p.decide("GET", "/redfish/v1/SessionServiceX", None, None).allowed  # only the prefix itself
    named = policy(Rule(methods=("GET",), paths=("/redfish/v1/AccountService/*",)))
    assert named.decide("GET", "/redfish/v1/AccountService/Accounts", None, None).allowed
    # Unrestricted (no RBAC configured): everything but sessions and accounts.
    free = Policy.from_grant(None)
    assert free.decide("DELETE", SYS, None, None).allowed
    assert not free.decide("POST", "/redfish/v1/SessionService/Sessions", None, None).allowed


def test_nothing_allowed_without_rules():
    d = Policy.from_grant([]).decide("GET", "/redfish/v1", None, None)
    assert not d.allowed and d.reason == "no_rule"


@pytest.mark.parametrize("path", ["/redfish/v1/Systems/../SessionService", "/redfish/v1/./Systems",
                                  "/redfish/v1//Systems", "/redfish/v1/%2e%2e/AccountService",
                                  "/redfish/v1/Systems%2F1", "/redfish/v1\\Systems", "redfish/v1",
                                  "/redfish/v1/Sys tems", "/redfish/v1/%5cx"])
def test_paths_that_could_hide_another_are_refused(path):
    with pytest.raises(BadPath):
        normalize_path(path)


def test_path_normalisation_and_actions():
    assert normalize_path("/redfish/v1/") == "/redfish/v1"
    assert normalize_path("/") == "/"
    assert normalize_path("/redfish/v1/Systems/1%20a") == "/redfish/v1/Systems/1%20a"
    assert action_of("POST", RESET) == "ComputerSystem.Reset"
    assert action_of("POST", f"{SYS}/Actions/#ComputerSystem.Reset") == "ComputerSystem.Reset"
    assert action_of("GET", RESET) is None
    assert action_of("POST", SYS) is None


# --------------------------------------------------------------------------- config


def _doc(roles: dict) -> dict:
    return {
        "identity": {"token": {"algorithm": "HS256", "key_file": "token.key"}},
        "roles": roles,
        "listeners": [{"name": "rf", "protocol": "redfish", "kind": "http", "listen": "127.0.0.1:8443",
                       "auth": {"methods": ["token"]},
                       "routes": [{"match": {"target": "bmc-*"},
                                   "backend": {"address": "127.0.0.1:8000",
                                               "auth": {"method": "session", "username": "admin",
                                                        "password_env": "BMC_PW"}}}]}],
    }


def _load(tmp_path, d):
    (tmp_path / "token.key").write_bytes(b"k" * 32)
    (tmp_path / "token.key").chmod(0o600)
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(d))
    return load_config(str(path), default_registry()), str(path)


def _errors(tmp_path, d) -> list[str]:
    with pytest.raises(ConfigErrors) as info:
        _load(tmp_path, d)
    path = str(tmp_path / "cfg.json")
    assert all(e.file == path for e in info.value.errors)
    return [f"{e.path}: {e.expected}" for e in info.value.errors]


def test_roles_grant_bmcs_and_redfish_rules(tmp_path, monkeypatch):
    monkeypatch.setenv("BMC_PW", "secret")
    roles = {"op": {"routes": ["*"], "bmcs": ["bmc-*"], "redfish": [
        {"methods": ["GET"], "paths": ["/redfish/v1/*"]},
        {"actions": {"ComputerSystem.Reset": {"ResetType": ["On"]}}, "paths": ["/redfish/v1/Systems/*"]}]},
        "db": {"routes": ["*"], "databases": ["*"], "db_users": ["*"]}}
    cfg, _ = _load(tmp_path, _doc(roles))
    (lc,) = cfg.listeners
    assert lc.kind == "http" and lc.routes[0].backend.auth.params == {"username": "admin"}
    access = AccessPolicy(cfg.roles, enforced=True)
    grant = access.authorize(Identity("u", ("op",)), route="route0", database="bmc-1", db_user=None, family="bmc")
    (rules,) = grant.policy("redfish")
    p = Policy.from_grant(grant.policy("redfish"))
    assert p.decide("POST", RESET, "ComputerSystem.Reset", {"ResetType": "On"}).allowed and len(rules) == 2
    with pytest.raises(Exception, match="no role"):
        access.authorize(Identity("u", ("op",)), route="route0", database="other", db_user=None, family="bmc")
    with pytest.raises(Exception, match="no role"):  # database roles grant no BMC
        access.authorize(Identity("u", ("db",)), route="route0", database="bmc-1", db_user=None, family="bmc")
    # bmcs grant no database either
    with pytest.raises(Exception, match="no role"):
        access.authorize(Identity("u", ("op",)), route="route0", database="bmc-1", db_user="x")


def test_config_mistakes_name_the_path(tmp_path):
    roles = {"bad": {"routes": ["*"], "bmcs": ["bmc-*"], "redfish": [
        {"methods": ["FETCH"], "paths": ["redfish/v1"]},
        {"paths": ["/x"]},
        {"actions": {"Reset": {"ResetType": "On"}}, "methods": ["GET"]},
    ]}, "half": {"routes": ["*"], "redfish": []}}
    d = _doc(roles)
    d["listeners"][0]["routes"][0]["backend"]["auth"] = {"method": "token", "password_env": "X"}
    d["listeners"][0]["kind"] = "tcp"
    errors = "\n".join(_errors(tmp_path, d))
    assert "roles.bad.redfish[0].methods[0]: one of GET" in errors
    assert "roles.bad.redfish[0].paths[0]: a glob on the absolute path" in errors
    assert 'roles.bad.redfish[1]: a key "methods"' in errors
    assert "roles.bad.redfish[2].actions.Reset: an action name like ComputerSystem.Reset" in errors
    assert 'roles.bad.redfish[2].methods: only ["POST"]' in errors
    assert 'roles.half: a key "bmcs"' in errors
    assert "listeners[0].kind: a kind the redfish engine serves (http)" in errors
    assert "listeners[0].routes[0].backend.auth.method" in errors
