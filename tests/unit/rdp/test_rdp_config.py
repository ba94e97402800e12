"""RDP listener config and desktop roles: the documented shape loads; mistakes name the file, the JSON
path and the expectation; roles grant desktops by ``desktops`` only."""

from __future__ import annotations

import json

import pytest

from dbproxy.config import load_config
from dbproxy.engines import default_registry
from dbproxy.errors import AccessDenied, ConfigErrors
from dbproxy.roles import AccessPolicy
from dbproxy.session import Identity

REG = default_registry()


def doc() -> dict:
    return {
        "roles": {"desk": {"routes": ["*"], "desktops": ["web*"]},
                  "ops": {"routes": ["*"], "targets": ["*"], "logins": ["*"]}},
        "listeners": [{
            "name": "rdp", "protocol": "rdp", "listen": "127.0.0.1:3389",
            "auth": {"methods": ["anonymous"], "anonymous_roles": ["desk"]},
            "routes": [{"name": "web", "match": {"target": "web*"},
                        "backend": {"address": "10.0.0.5:3389", "auth": {"method": "passthrough"}}},
                       {"name": "web-default",
                        "backend": {"address": "10.0.0.6:3389", "auth": {"method": "passthrough"}}}],
        }],
    }


def load(tmp_path, d):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(d))
    return load_config(str(path), REG)


def errors_for(tmp_path, d) -> list[str]:
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ConfigErrors) as info:
        load_config(str(path), REG)
    for err in info.value.errors:
        assert err.file == str(path)
    return [f"{e.path}: {e.expected}" for e in info.value.errors]


def test_documented_shape_loads(tmp_path):
    cfg = load(tmp_path, doc())
    (lc,) = cfg.listeners
    assert lc.protocol == "rdp" and [r.name for r in lc.routes] == ["web", "web-default"]
    assert lc.routes[0].backend.auth.method == "passthrough" and lc.routes[0].backend.auth.secret is None
    assert lc.max_message_size is None  # the engine's 4 KiB cap for a Connection Request applies


def _mutate(path: str, value):
    d = doc()
    target = d["listeners"][0]
    keys = path.split(".")
    for k in keys[:-1]:
        target = target[int(k)] if k.isdigit() else target[k]
    target[keys[-1]] = value
    return d


@pytest.mark.parametrize("path, value, expected", [
    ("routes.0.backend.auth", {"method": "passthrough", "password_file": "x.secret"}, "the proxy holds no RDP secret"),
    ("routes.0.backend.auth", {"method": "password"}, "passthrough"),
    ("routes.0.backend.user", "administrator", "injects no credential"),
    ("routes.0.match", {"login": "x"}, "a match key of this protocol (target)"),
    ("auth", {"methods": ["token"]}, "a method the rdp engine supports (anonymous)"),
    ("max_message_size", 70000, "TPKT"),
])
def test_mistakes_named(tmp_path, path, value, expected):
    if "password_file" in str(value):
        (tmp_path / "x.secret").write_text("s\n")
    errors = errors_for(tmp_path, _mutate(path, value))
    assert any(expected in e for e in errors), errors


def test_anonymous_listener_must_be_loopback(tmp_path):
    errors = errors_for(tmp_path, _mutate("listen", "0.0.0.0:3389"))
    assert any("loopback address for an anonymous listener" in e for e in errors), errors


def test_desktops_grant_desktop_sessions_only():
    from dbproxy.roles import validate_roles
    from dbproxy.validate import Validator

    v = Validator("cfg.json")
    roles = validate_roles(v, doc()["roles"])
    assert set(roles) == {"desk", "ops"}
    policy = AccessPolicy(roles, enforced=True)
    desk = Identity(user="anonymous", roles=("desk", "ops"), method="anonymous")
    grant = policy.authorize(desk, route="web", database="web1", db_user=None, family="desktop")
    assert grant.roles == ("desk",)  # "ops" grants terminals, not desktops
    with pytest.raises(AccessDenied, match="desktop 'db9'"):
        policy.authorize(desk, route="web", database="db9", db_user=None, family="desktop")
    terminal_only = Identity(user="anonymous", roles=("ops",), method="anonymous")
    with pytest.raises(AccessDenied):
        policy.authorize(terminal_only, route="web", database="web1", db_user=None, family="desktop")
