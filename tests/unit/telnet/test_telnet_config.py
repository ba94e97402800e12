"""Telnet listener config: the issue's shape loads; every mistake names the file, the JSON path and the expectation."""

from __future__ import annotations

import copy
import json

import pytest

from dbproxy.config import load_config
from dbproxy.engines import default_registry
from dbproxy.errors import ConfigErrors

REG = default_registry()


@pytest.fixture
def files(tmp_path):
    (tmp_path / "token.key").write_bytes(b"k" * 32)
    (tmp_path / "token.key").chmod(0o600)
    (tmp_path / "deploy.secret").write_text("s3cret\n")
    (tmp_path / "recordings").mkdir()
    return tmp_path


def doc() -> dict:
    return {
        "identity": {"token": {"algorithm": "HS256", "key_file": "token.key"}},
        "roles": {"ops": {"routes": ["*"], "targets": ["host-*"], "logins": ["deploy"]}},
        "listeners": [{
            "name": "telnet", "protocol": "telnet", "listen": "127.0.0.1:2323",
            "auth": {"methods": ["token"]},
            "recording": {"dir": "recordings"},
            "idle_timeout_seconds": 600,
            "routes": [{"match": {"target": "host-*", "login": "deploy"},
                        "backend": {"address": "127.0.0.1:23", "login": "deploy",
                                    "auth": {"method": "password", "password_file": "deploy.secret"},
                                    "prompts": {"login": "login:", "password": "Password:",
                                                "shell": r"\$ $"}}}],
        }],
    }


def load(dir, d):
    path = dir / "cfg.json"
    path.write_text(json.dumps(d))
    return load_config(str(path), REG)


def errors_for(dir, d) -> list[str]:
    path = dir / "cfg.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ConfigErrors) as info:
        load_config(str(path), REG)
    for err in info.value.errors:
        assert err.file == str(path)
    return [f"{e.path}: {e.expected}" for e in info.value.errors]


def test_issue_shape_loads(files):
    (lc,) = load(files, doc()).listeners
    assert lc.protocol == "telnet"
    assert lc.extra["recording_dir"] == str(files / "recordings") and lc.extra["idle_timeout_seconds"] == 600
    (route,) = lc.routes
    backend = route.backend
    assert backend.extra["login"] == "deploy" and backend.auth.method == "password"
    assert backend.auth.secret.reveal() == "s3cret"
    prompts = backend.extra["prompts"]
    assert prompts["shell"].search("deploy@h:~$ ") and not prompts["shell"].search("deploy@h:~# ")
    assert prompts["login"].search("\r\nhost login: ")
    # Defaults for what the route did not say.
    assert prompts["failure"].search("Login incorrect") and backend.extra["login_timeout"] == 10.0


@pytest.mark.parametrize("change, expected", [
    (lambda d: d["listeners"][0].pop("auth"), 'listeners[0]: a key "auth": {"methods": ["token"]}'),
    (lambda d: d["listeners"][0]["routes"][0]["backend"]["prompts"].update(shell="[unclosed"),
     "listeners[0].routes[0].backend.prompts.shell: a regular expression (Python re), but '[unclosed' is not one"),
    (lambda d: d["listeners"][0]["routes"][0]["backend"]["prompts"].update(motd="x"),
     "listeners[0].routes[0].backend.prompts.motd: no key 'motd' here"),
    (lambda d: d["listeners"][0]["routes"][0]["backend"]["prompts"].update(timeout_seconds=0),
     "listeners[0].routes[0].backend.prompts.timeout_seconds: a number >= 1.0, got 0"),
    (lambda d: d["listeners"][0]["routes"][0]["backend"]["auth"].update(method="publickey"),
     "listeners[0].routes[0].backend.auth.method: one of password"),
    (lambda d: d["listeners"][0]["routes"][0]["backend"]["auth"].pop("password_file"),
     "listeners[0].routes[0].backend.auth"),
    (lambda d: d["listeners"][0]["routes"][0]["backend"].update(user="deploy"),
     'listeners[0].routes[0].backend.user: the key "login"'),
    (lambda d: d["listeners"][0]["routes"][0]["match"].update(database="x"),
     "listeners[0].routes[0].match.database: a match key of this protocol (login, target)"),
    (lambda d: d["listeners"][0].update(recording={"dir": "nowhere"}),
     "listeners[0].recording.dir: a writable folder for the recordings"),
    (lambda d: d["listeners"][0].update(idle_timeout_seconds=0.5),
     "listeners[0].idle_timeout_seconds: a number >= 1.0, got 0.5"),
    (lambda d: d["listeners"][0].update(host_key_file="x"), "listeners[0].host_key_file: no key 'host_key_file' here"),
])
def test_mistakes_name_path_and_expectation(files, change, expected):
    d = copy.deepcopy(doc())
    change(d)
    errors = errors_for(files, d)
    assert any(e.startswith(expected) for e in errors), errors
