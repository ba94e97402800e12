"""Config validation: every mistake names the file, the JSON path and what was expected."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dbproxy.config import load_config
from dbproxy.errors import ConfigErrors
from dbproxy.engines import default_registry

REG = default_registry()


def good(tmp_path) -> dict:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    return {
        "listeners": [
            {
                "name": "pg",
                "protocol": "postgres",
                "listen": "127.0.0.1:15432",
                "routes": [
                    {
                        "match": {"database": "app*", "user": "*"},
                        "backend": {
                            "address": "127.0.0.1:5432",
                            "database": "app",
                            "user": "app_rw",
                            "auth": {"method": "scram-sha-256", "password_file": str(secret)},
                            "tls": {"mode": "require"},
                        },
                    }
                ],
            }
        ],
        "audit": {"sinks": [{"type": "jsonl", "path": "audit.jsonl"}]},
    }


def errors_for(tmp_path, doc) -> list[str]:
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(doc) if not isinstance(doc, str) else doc)
    with pytest.raises(ConfigErrors) as info:
        load_config(str(path), REG)
    for err in info.value.errors:
        assert err.file == str(path)
    return [f"{e.path}: {e.expected}" for e in info.value.errors]


def test_good_config_loads(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(good(tmp_path)))
    cfg = load_config(str(path), REG)
    (lc,) = cfg.listeners
    assert (lc.host, lc.port, lc.protocol) == ("127.0.0.1", 15432, "postgres")
    backend = lc.routes[0].backend
    assert backend.auth.secret.reveal() == "s3cret"
    assert "s3cret" not in repr(cfg)
    assert cfg.audit.sinks[0].path == str(tmp_path / "audit.jsonl")


def test_example_configs_validate_structure():
    # The shipped example names an env var and a keytab that don't exist here: exactly those are reported.
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    with pytest.raises(ConfigErrors) as info:
        load_config(os.path.join(root, "configs", "postgres.json"), REG)
    paths = sorted(e.path for e in info.value.errors)
    assert paths == [
        "listeners[0].routes[0].backend.auth.password_env",
        "listeners[0].routes[1].backend.auth.keytab_file",
    ]


CASES = [
    ("invalid json", lambda d: "{not json", ": valid JSON"),
    ("no listeners", lambda d: {**d, "listeners": []}, "listeners: a non-empty array of listeners"),
    ("top-level typo", lambda d: {**d, "listners": []}, "listners: no key 'listners' here"),
    ("unknown protocol", lambda d: _set(d, ["listeners", 0, "protocol"], "mysql"), "listeners[0].protocol: one of "),
    ("bad listen", lambda d: _set(d, ["listeners", 0, "listen"], "localhost"), 'listeners[0].listen: "host:port"'),
    ("port range", lambda d: _set(d, ["listeners", 0, "listen"], "127.0.0.1:70000"), 'listeners[0].listen: "host:port"'),
    ("routes missing", lambda d: _del(d, ["listeners", 0, "routes"]), "listeners[0].routes: a non-empty array of routes"),
    ("match key", lambda d: _set(d, ["listeners", 0, "routes", 0, "match", "keyspace"], "x"), "listeners[0].routes[0].match.keyspace: a match key of this protocol"),
    ("match glob type", lambda d: _set(d, ["listeners", 0, "routes", 0, "match", "user"], 5), "listeners[0].routes[0].match.user: a glob string"),
    ("backend missing", lambda d: _del(d, ["listeners", 0, "routes", 0, "backend"]), "listeners[0].routes[0]: a key 'backend'"),
    ("backend address", lambda d: _set(d, ["listeners", 0, "routes", 0, "backend", "address"], 5432), "listeners[0].routes[0].backend.address: a non-empty string"),
    ("auth missing", lambda d: _del(d, ["listeners", 0, "routes", 0, "backend", "auth"]), "listeners[0].routes[0].backend: a key 'auth'"),
    ("auth method", lambda d: _set(d, ["listeners", 0, "routes", 0, "backend", "auth", "method"], "kerberos"), "listeners[0].routes[0].backend.auth.method: one of trust, password, md5, scram-sha-256, gssapi"),
    ("inline password", lambda d: _set(d, ["listeners", 0, "routes", 0, "backend", "auth", "password"], "x"), 'listeners[0].routes[0].backend.auth.password: no inline password'),
    ("password file missing", lambda d: _set(d, ["listeners", 0, "routes", 0, "backend", "auth", "password_file"], "/nonexistent/pw"), "listeners[0].routes[0].backend.auth.password_file: a readable file"),
    ("password env unset", lambda d: _swap_secret(d, {"password_env": "DBPROXY_TEST_UNSET_VAR"}), "listeners[0].routes[0].backend.auth.password_env: environment variable DBPROXY_TEST_UNSET_VAR to be set"),
    ("no secret", lambda d: _swap_secret(d, {}), 'listeners[0].routes[0].backend.auth: "password_file" or "password_env"'),
    ("gssapi needs keytab", lambda d: _swap_auth(d, {"method": "gssapi", "principal": "p@R"}), 'listeners[0].routes[0].backend.auth: "keytab_file" or "ccache"'),
    ("gssapi unknown key", lambda d: _swap_auth(d, {"method": "gssapi", "ccache": "FILE:/x", "realm": "R"}), "listeners[0].routes[0].backend.auth.realm: a gssapi key"),
    ("gssencmode", lambda d: _swap_auth(d, {"method": "gssapi", "ccache": "FILE:/x", "gssencmode": "always"}), "listeners[0].routes[0].backend.auth.gssencmode: one of disable, prefer, require"),
    ("tls mode", lambda d: _set(d, ["listeners", 0, "routes", 0, "backend", "tls", "mode"], "verify"), "listeners[0].routes[0].backend.tls.mode: one of disable, require, verify-ca, verify-full"),
    ("verify needs ca", lambda d: _set(d, ["listeners", 0, "routes", 0, "backend", "tls", "mode"], "verify-full"), "listeners[0].routes[0].backend.tls: a key 'ca_file'"),
    ("listener tls files", lambda d: _set(d, ["listeners", 0, "tls"], {"cert_file": "/nope.crt", "key_file": "/nope.key"}), "listeners[0].tls.cert_file: a readable file"),
    ("max message size", lambda d: _set(d, ["listeners", 0, "max_message_size"], 10), "listeners[0].max_message_size: an integer >= 1024"),
    ("sink type", lambda d: _set(d, ["audit", "sinks", 0, "type"], "kinesis"), "audit.sinks[0].type: one of"),
    ("grace", lambda d: {**d, "shutdown_grace_seconds": -1}, "shutdown_grace_seconds: a number >= 0.0"),
    ("duplicate names", lambda d: {**d, "listeners": d["listeners"] * 2}, "listeners[1].name: a unique listener name"),
]


def _walk(d, path):
    for key in path[:-1]:
        d = d[key]
    return d


def _set(d, path, value):
    _walk(d, path)[path[-1]] = value
    return d


def _del(d, path):
    del _walk(d, path)[path[-1]]
    return d


def _swap_auth(d, auth):
    d["listeners"][0]["routes"][0]["backend"]["auth"] = auth
    return d


def _swap_secret(d, secret):
    return _swap_auth(d, {"method": "scram-sha-256", **secret})


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_config_error_names_path_and_expectation(tmp_path, case):
    _, mutate, expected = case
    errs = errors_for(tmp_path, mutate(good(tmp_path)))
    assert any(expected in e for e in errs), errs


def test_all_errors_reported_at_once(tmp_path):
    d = good(tmp_path)
    d["listeners"][0]["listen"] = "nope"
    d["listeners"][0]["routes"][0]["backend"]["auth"]["method"] = "x"
    d["audit"]["sinks"][0]["type"] = "y"
    errs = errors_for(tmp_path, d)
    assert len(errs) == 3


def test_check_config_cli_exit_codes(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(good(tmp_path)))
    ok = subprocess.run([sys.executable, "-m", "dbproxy.cli", "check-config", str(path)], capture_output=True, text=True)
    assert ok.returncode == 0 and "OK" in ok.stdout
    d = good(tmp_path)
    d["listeners"][0]["routes"][0]["backend"]["auth"]["method"] = "md4"
    path.write_text(json.dumps(d))
    bad = subprocess.run([sys.executable, "-m", "dbproxy.cli", "check-config", str(path)], capture_output=True, text=True)
    assert bad.returncode == 2
    assert f"{path}: listeners[0].routes[0].backend.auth.method: expected one of" in bad.stderr
    serve = subprocess.run([sys.executable, "-m", "dbproxy.cli", "serve", "--config", str(path)], capture_output=True, text=True, timeout=30)
    assert serve.returncode == 2 and "refusing to start" in serve.stderr
