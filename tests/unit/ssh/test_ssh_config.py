"""SSH listener config: the issue's shape loads; every mistake names the file, the JSON path and the expectation.
And the client's user name, LOGIN@TARGET."""

from __future__ import annotations

import copy
import json
import subprocess

import pytest

from dbproxy.config import load_config
from dbproxy.engines import default_registry
from dbproxy.engines.ssh.config import BadUserName, parse_user
from dbproxy.errors import ConfigErrors

REG = default_registry()


def keygen(path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return str(path)


@pytest.fixture
def files(tmp_path):
    keygen(tmp_path / "host_ed25519")
    keygen(tmp_path / "deploy_ed25519")
    pub = (tmp_path / "host_ed25519.pub").read_text().split()
    (tmp_path / "known_hosts").write_text(f"10.0.0.5 {pub[0]} {pub[1]}\n")
    (tmp_path / "token.key").write_bytes(b"k" * 32)
    (tmp_path / "token.key").chmod(0o600)
    return tmp_path


def doc() -> dict:
    """The config shape of issue 15 (with the token method this foundation supports)."""
    return {
        "identity": {"token": {"algorithm": "HS256", "key_file": "token.key"}},
        "roles": {"web": {"routes": ["*"], "targets": ["web-*"], "logins": ["deploy"]}},
        "listeners": [{
            "name": "ssh", "protocol": "ssh", "listen": "127.0.0.1:2222",
            "host_key_file": "host_ed25519",
            "auth": {"methods": ["token"]},
            "routes": [{"match": {"target": "web-*", "login": "deploy"},
                        "backend": {"address": "10.0.0.5:22", "login": "deploy",
                                    "auth": {"method": "publickey", "key_file": "deploy_ed25519"},
                                    "host_key": {"known_hosts_file": "known_hosts"}}}],
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
    cfg = load(files, doc())
    (lc,) = cfg.listeners
    assert lc.protocol == "ssh"
    assert lc.extra["host_key_file"] == str(files / "host_ed25519")
    (route,) = lc.routes
    assert route.match == {"target": "web-*", "login": "deploy"}
    backend = route.backend
    assert backend.address == "10.0.0.5:22"
    assert backend.extra == {"login": "deploy", "known_hosts_file": str(files / "known_hosts")}
    assert backend.auth.method == "publickey" and backend.auth.params == {"key_file": str(files / "deploy_ed25519")}


def test_password_backend_loads(files):
    d = doc()
    (files / "pw").write_text("s3cret")
    d["listeners"][0]["routes"][0]["backend"]["auth"] = {"method": "password", "password_file": "pw"}
    backend = load(files, d).listeners[0].routes[0].backend
    assert backend.auth.method == "password" and backend.auth.secret.reveal() == "s3cret"


def test_keepalive_and_idle_load(files):
    d = doc()
    d["listeners"][0].update(keepalive_seconds=15, keepalive_count_max=4, idle_timeout_seconds=600)
    extra = load(files, d).listeners[0].extra
    assert (extra["keepalive_seconds"], extra["keepalive_count_max"], extra["idle_timeout_seconds"]) == (15, 4, 600)


def test_certificate_backend_loads(files):
    d = doc()
    d["listeners"][0]["routes"][0]["backend"]["auth"] = {"method": "certificate", "ca_key_file": "deploy_ed25519"}
    auth = load(files, d).listeners[0].routes[0].backend.auth
    assert auth.method == "certificate"
    assert auth.params == {"ca_key_file": str(files / "deploy_ed25519"), "validity_seconds": 300}


def mutate(fn) -> dict:
    d = copy.deepcopy(doc())
    fn(d["listeners"][0])
    return d


@pytest.mark.parametrize("change, expected", [
    (lambda lc: lc.pop("host_key_file"), "listeners[0]: a key 'host_key_file'"),
    (lambda lc: lc.update(host_key_file="nope"), "listeners[0].host_key_file: a readable file"),
    (lambda lc: lc.update(host_key_file="known_hosts"), "listeners[0].host_key_file: an unencrypted OpenSSH private key"),
    (lambda lc: lc.pop("auth"), 'listeners[0]: a key "auth": {"methods": ["token"]}'),
    (lambda lc: lc["routes"][0]["match"].update(database="x"), "listeners[0].routes[0].match.database: a match key of this protocol (login, target)"),
    (lambda lc: lc["routes"][0]["backend"].pop("host_key"), 'listeners[0].routes[0].backend: a key "host_key"'),
    (lambda lc: lc["routes"][0]["backend"]["host_key"].update(known_hosts_file="missing"),
     "listeners[0].routes[0].backend.host_key.known_hosts_file: a readable file"),
    (lambda lc: lc["routes"][0]["backend"]["host_key"].update(fingerprint="x"),
     "listeners[0].routes[0].backend.host_key.fingerprint: no key 'fingerprint'"),
    (lambda lc: lc["routes"][0]["backend"]["auth"].pop("key_file"),
     "listeners[0].routes[0].backend.auth: a key 'key_file'"),
    (lambda lc: lc["routes"][0]["backend"]["auth"].update(key_file="known_hosts"),
     "listeners[0].routes[0].backend.auth.key_file: an unencrypted OpenSSH private key"),
    (lambda lc: lc["routes"][0]["backend"]["auth"].update(method="gssapi"),
     "listeners[0].routes[0].backend.auth.method: one of publickey, password, certificate"),
    (lambda lc: lc["routes"][0]["backend"].update(auth={"method": "certificate"}),
     "listeners[0].routes[0].backend.auth: a key 'ca_key_file'"),
    (lambda lc: lc["routes"][0]["backend"].update(auth={"method": "certificate", "ca_key_file": "known_hosts"}),
     "listeners[0].routes[0].backend.auth.ca_key_file: an unencrypted OpenSSH private key"),
    (lambda lc: lc["routes"][0]["backend"].update(auth={"method": "certificate", "ca_key_file": "deploy_ed25519",
                                                        "validity_seconds": 90000}),
     "listeners[0].routes[0].backend.auth.validity_seconds: at most 86400 seconds"),
    (lambda lc: lc["routes"][0]["backend"].update(auth={"method": "certificate", "ca_key_file": "deploy_ed25519",
                                                        "key_file": "deploy_ed25519"}),
     "listeners[0].routes[0].backend.auth.key_file: no key 'key_file' for method certificate"),
    (lambda lc: lc["routes"][0]["backend"].update(auth={"method": "password"}),
     'listeners[0].routes[0].backend.auth: "password_file" or "password_env"'),
    (lambda lc: lc["routes"][0]["backend"].update(user="deploy"),
     'listeners[0].routes[0].backend.user: the key "login"'),
    (lambda lc: lc["routes"][0]["backend"].update(login=""), "listeners[0].routes[0].backend.login: a non-empty string"),
    (lambda lc: lc.update(bogus=1), "listeners[0].bogus: no key 'bogus'"),
    (lambda lc: lc.update(keepalive_count_max=3), 'listeners[0].keepalive_count_max: a "keepalive_seconds" too'),
    (lambda lc: lc.update(keepalive_seconds=0), "listeners[0].keepalive_seconds: a number >= 0.1"),
    (lambda lc: lc.update(idle_timeout_seconds=0.5), "listeners[0].idle_timeout_seconds: a number >= 1.0"),
    (lambda lc: lc.update(env_allow="LANG"), "listeners[0].env_allow: an array of non-empty name globs"),
    (lambda lc: lc.update(recording={"dir": "nowhere"}), "listeners[0].recording.dir: a writable folder"),
    (lambda lc: lc.update(recording={"dir": ".", "input": "yes"}), "listeners[0].recording.input: true or false"),
    (lambda lc: lc.update(recording={"dir": ".", "keys": True}), "listeners[0].recording.keys: no key 'keys'"),
])
def test_mistakes_are_named(files, change, expected):
    errors = errors_for(files, mutate(change))
    assert any(e.startswith(expected) for e in errors), errors


def test_ssh_keys_are_not_allowed_on_other_protocols(files):
    d = doc()
    d["listeners"].append({"name": "pg", "protocol": "postgres", "listen": "127.0.0.1:5433", "host_key_file": "host_ed25519",
                           "auth": {"methods": ["token"]},
                           "routes": [{"backend": {"address": "127.0.0.1:5432", "auth": {"method": "trust"},
                                                   "host_key": {"known_hosts_file": "known_hosts"}}}]})
    errors = errors_for(files, d)
    assert any(e.startswith("listeners[1].host_key_file: no key 'host_key_file'") for e in errors), errors
    assert any(e.startswith("listeners[1].routes[0].backend.host_key: no key 'host_key'") for e in errors), errors


# --------------------------------------------------------------------------- LOGIN@TARGET


@pytest.mark.parametrize("name, login, target", [
    ("deploy@web-1", "deploy", "web-1"),
    ("alice@corp@web-1", "alice@corp", "web-1"),  # split at the last @: host names hold none
    ("root@10.0.0.5", "root", "10.0.0.5"),
])
def test_user_name(name, login, target):
    user = parse_user(name)
    assert (user.login, user.target) == (login, target)


@pytest.mark.parametrize("name", ["deploy", "@web-1", "deploy@", "", "de ploy@web-1", "deploy@web\x01"])
def test_bad_user_name(name):
    with pytest.raises(BadUserName) as info:
        parse_user(name)
    assert "LOGIN@TARGET" in str(info.value) or "spaces or control" in str(info.value)


# --------------------------------------------------------------------------- client keys (identity.publickey)


def publickey_doc(files) -> dict:
    keygen(files / "alice_ed25519")
    keygen(files / "user_ca")
    d = doc()
    d["identity"]["publickey"] = {"users": {"alice": {"roles": ["web"], "authorized_keys_file": "alice_ed25519.pub"},
                                            "bob": {"roles": ["web"]}},
                                  "user_ca_file": "user_ca.pub"}
    d["listeners"][0]["auth"] = {"methods": ["token", "publickey"]}  # the issue's shape
    return d


def test_issue_auth_methods_load(files):
    cfg = load(files, publickey_doc(files))
    assert cfg.listeners[0].auth.methods == ("token", "publickey")
    pk = cfg.identity.publickey
    assert pk.users == (("alice", ("web",), str(files / "alice_ed25519.pub")), ("bob", ("web",), None))
    assert pk.user_ca_file == str(files / "user_ca.pub")


@pytest.mark.parametrize("change, expected", [
    (lambda d: d["identity"].pop("publickey"), 'listeners[0].auth: identity.publickey to be configured for method "publickey"'),
    (lambda d: d["identity"]["publickey"]["users"]["alice"].update(authorized_keys_file="host_ed25519"),
     "identity.publickey.users.alice.authorized_keys_file: one OpenSSH public key per line"),
    (lambda d: d["identity"]["publickey"]["users"]["alice"].update(roles=["nope"]),
     "identity.publickey.users.alice.roles: roles defined in \"roles\", 'nope' is not"),
    (lambda d: d["identity"]["publickey"]["users"]["bob"].pop("roles"),
     'identity.publickey.users.bob: a key "roles"'),
    (lambda d: d["identity"]["publickey"].update(user_ca_file="known_hosts"),
     "identity.publickey.user_ca_file: an OpenSSH public key"),
    (lambda d: d["identity"].update(publickey={"users": {"bob": {"roles": ["web"]}}}),
     'identity.publickey: "users" with an "authorized_keys_file" and/or a "user_ca_file"'),
    (lambda d: d["listeners"].append({"name": "pg", "protocol": "postgres", "listen": "127.0.0.1:5433",
                                      "auth": {"methods": ["publickey"]},
                                      "routes": [{"backend": {"address": "127.0.0.1:5432", "auth": {"method": "trust"}}}]}),
     "listeners[1].auth.methods[0]: a method the postgres engine supports"),
])
def test_publickey_mistakes_are_named(files, change, expected):
    d = publickey_doc(files)
    change(d)
    errors = errors_for(files, d)
    assert any(e.startswith(expected) for e in errors), errors


def test_client_keys_match_keys_and_certificates(files):
    """``ClientKeys.lookup`` on the blobs an SSH client sends: a registered key, a certificate of the CA naming a
    configured user (and not one naming nobody, nor a key of no one)."""
    import asyncssh

    from dbproxy.engines.ssh.bridge import ClientKeys

    cfg = load(files, publickey_doc(files)).identity.publickey
    keys = ClientKeys(cfg)
    alice = asyncssh.read_public_key(str(files / "alice_ed25519.pub"))
    assert keys.lookup(alice.public_data).user == "alice"
    ca = asyncssh.read_private_key(str(files / "user_ca"))
    someone = asyncssh.generate_private_key("ssh-ed25519")
    assert keys.lookup(someone.convert_to_public().public_data) is None
    cert = ca.generate_user_certificate(someone, "bob-key", principals=["bob"])
    match = keys.lookup(cert.public_data)
    assert (match.user, match.method, match.key_id) == ("bob", "certificate", "bob-key")
    assert keys.lookup(ca.generate_user_certificate(someone, "x", principals=["eve"]).public_data) is None
    other_ca = asyncssh.generate_private_key("ssh-ed25519")
    assert keys.lookup(other_ca.generate_user_certificate(someone, "x", principals=["bob"]).public_data) is None
