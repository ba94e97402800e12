"""Node tokens, the allow-list, the ``agents``/``via`` config, and the hub's dial without agents."""

from __future__ import annotations

import json

import pytest
import trio

from dbproxy.agent.client import AllowList, AllowRule
from dbproxy.agent.config import AgentsConfig
from dbproxy.agent.hub import AgentHub
from dbproxy.agent.tokens import NodeTokens
from dbproxy.config import load_config
from dbproxy.configtypes import ListenerTLS
from dbproxy.errors import AuthFailed, ConfigErrors, UpstreamError
from dbproxy.identity.authority import TokenAuthority
from dbproxy.identity.config import TokenConfig
from dbproxy.identity.keys import generate_keys
from dbproxy.net import AGENTS, connect_backend
from dbproxy.registry import default_registry

NOW = 1_800_000_000


@pytest.fixture(params=["EdDSA", "HS256"])
def authority(request, tmp_path) -> TokenAuthority:
    alg = request.param
    key, pub = tmp_path / "token.key", tmp_path / "token.pub"
    generate_keys(alg, str(key), str(pub) if alg == "EdDSA" else None)
    revoked = tmp_path / "revoked.txt"
    revoked.write_text("")
    return TokenAuthority(TokenConfig(algorithm=alg, key_file=str(key), public_key_file=str(pub) if alg == "EdDSA" else None,
                                      registry_file=None, revocation_file=str(revoked), leeway=0))


# --------------------------------------------------------------------------- node tokens


def test_node_token_verifies_for_its_node_only(authority):
    nodes = NodeTokens(authority)
    token, claims = nodes.issue("site-a", 3600, now=NOW)
    assert nodes.verify(token, "site-a", now=NOW + 10).sub == "site-a"
    with pytest.raises(AuthFailed) as info:
        nodes.verify(token, "site-b", now=NOW + 10)
    assert info.value.reason == "token_wrong_node"
    with pytest.raises(AuthFailed) as info:
        nodes.verify(token, "site-a", now=NOW + 3600)
    assert info.value.reason == "token_expired"


def test_node_token_is_no_login_token(authority):
    token, _ = NodeTokens(authority).issue("alice", 3600, now=NOW)  # even a node named like a user
    with pytest.raises(AuthFailed) as info:
        authority.verify_password("alice", token, now=NOW + 10)
    assert info.value.reason == "token_bad_issuer"


def test_login_token_is_no_node_token(authority):
    token, _ = authority.codec.issue("site-a", ("ops",), 3600, now=NOW)
    with pytest.raises(AuthFailed) as info:
        NodeTokens(authority).verify(token, "site-a", now=NOW + 10)
    assert info.value.reason == "token_bad_issuer"


def test_revoked_node_token_refused(authority, tmp_path):
    nodes = NodeTokens(authority)
    token, claims = nodes.issue("site-a", 3600, now=NOW)
    (tmp_path / "revoked.txt").write_text(claims.jti + "\n")
    with pytest.raises(AuthFailed) as info:
        nodes.verify(token, "site-a", now=NOW + 10)
    assert info.value.reason == "token_revoked"


# --------------------------------------------------------------------------- the allow-list


@pytest.mark.parametrize("rules, host, port, expected", [
    (["10.0.0.5:5432"], "10.0.0.5", 5432, "10.0.0.5"),
    (["10.0.0.5:5432"], "10.0.0.5", 5433, None),
    (["10.0.0.5:5432"], "10.0.0.6", 5432, None),
    (["10.0.1.0/24:22"], "10.0.1.77", 22, "10.0.1.77"),
    (["10.0.1.0/24:22"], "10.0.2.1", 22, None),
    (["10.0.1.0/24:*"], "10.0.1.1", 6543, "10.0.1.1"),
    (["10.0.1.0/24:5000-5999"], "10.0.1.1", 6000, None),
    (["*.db.internal:5432"], "pg1.db.internal", 5432, "pg1.db.internal"),
    (["*.db.internal:5432"], "db.internal", 5432, None),
    (["*.db.internal:5432"], "evil-db.internal", 5432, None),
    (["db.internal:5432"], "DB.internal", 5432, "db.internal"),
    (["127.0.0.0/8:5432"], "localhost", 5432, "127.0.0.1"),  # a name resolved, then checked
    ([], "10.0.0.5", 5432, None),
])
async def test_allow_list(rules, host, port, expected):
    assert await AllowList.parse(rules).resolve(host, port) == expected


@pytest.mark.parametrize("bad", ["10.0.0.5", ":5432", "10.0.0.5:0", "10.0.0.5:99999", "*:5432", "a*b:1", "h:9-1"])
def test_allow_rule_refuses_bad_text(bad):
    with pytest.raises(ValueError):
        AllowRule.parse(bad)


# --------------------------------------------------------------------------- config


def _doc(tmp_path, *, agents=True, identity=True, via="agent:site-a") -> dict:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    (tmp_path / "c.pem").write_text("x")
    (tmp_path / "k.pem").write_text("x")
    generate_keys("HS256", str(tmp_path / "token.key"), None)
    backend = {"address": "10.0.0.5:5432", "user": "app", "auth": {"method": "scram-sha-256", "password_file": str(secret)}}
    if via is not None:
        backend["via"] = via
    doc = {"listeners": [{"name": "pg", "protocol": "postgres", "listen": "127.0.0.1:15432",
                          "auth": {"methods": ["anonymous"]}, "routes": [{"name": "r", "backend": backend}]}],
           "audit": {"sinks": [{"type": "jsonl", "path": "audit.jsonl"}]}}
    if identity:
        doc["identity"] = {"token": {"algorithm": "HS256", "key_file": "token.key"}}
    if agents:
        doc["agents"] = {"listen": "0.0.0.0:7443", "tls": {"cert_file": "c.pem", "key_file": "k.pem"}}
    return doc


def _errors(tmp_path, doc) -> list[str]:
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigErrors) as info:
        load_config(str(path), default_registry())
    assert all(e.file == str(path) for e in info.value.errors)
    return [f"{e.path}: {e.expected}" for e in info.value.errors]


def test_agents_and_via_load(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(_doc(tmp_path)))
    cfg = load_config(str(path), default_registry())
    assert cfg.listeners[0].routes[0].backend.via == "agent:site-a"
    assert (cfg.agents.host, cfg.agents.port, cfg.agents.heartbeat) == ("0.0.0.0", 7443, 10.0)


@pytest.mark.parametrize("change, expected", [
    (lambda d: d.pop("agents"), "listeners[0].routes[0].backend.via: an \"agents\" section"),
    (lambda d: d.pop("identity"), "agents: an \"identity.token\" section too"),
    (lambda d: d["listeners"][0]["routes"][0]["backend"].update(via="ssh:bastion"),
     "listeners[0].routes[0].backend.via: \"agent:NODE\""),
    (lambda d: d["listeners"][0]["routes"][0]["backend"].update(via="agent:"), "listeners[0].routes[0].backend.via: \"agent:NODE\""),
    (lambda d: d["agents"].pop("tls"), "agents: a \"tls\" section"),
    (lambda d: d["agents"].update(heartbeat_seconds=5, heartbeat_timeout_seconds=5),
     "agents.heartbeat_timeout_seconds: more than heartbeat_seconds"),
    (lambda d: d["agents"].update(port=1), "agents.port: no key 'port' here"),
    (lambda d: d.update(workers=2), "workers: 1 with an \"agents\" section"),
])
def test_config_errors(tmp_path, change, expected):
    doc = _doc(tmp_path)
    change(doc)
    errors = _errors(tmp_path, doc)
    assert any(e.startswith(expected) for e in errors), errors


# --------------------------------------------------------------------------- dialling without agents


async def test_via_without_a_hub_is_an_upstream_error():
    with pytest.raises(UpstreamError) as info:
        await connect_backend("10.0.0.5", 5432, via="agent:site-a")
    assert "no agent listener" in info.value.client_hint


async def test_dial_with_no_agent_connected(authority):
    hub = AgentHub(AgentsConfig("127.0.0.1", 0, ListenerTLS("", "")), NodeTokens(authority))
    token = AGENTS.set(hub)
    try:
        with pytest.raises(UpstreamError) as info:
            await connect_backend("10.0.0.5", 5432, via="agent:site-a")
    finally:
        AGENTS.reset(token)
    assert info.value.client_hint == "the proxy cannot reach 10.0.0.5:5432: no agent of node 'site-a' is connected"
    assert hub.status() == {"nodes": []} and hub.connections() == {"connections": []}
    await trio.lowlevel.checkpoint()
