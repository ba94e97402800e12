"""``dbproxy token issue --node`` and ``dbproxy agent login`` / argument checks."""

from __future__ import annotations

import io
import json
import stat

import pytest

from dbproxy.agent.tokens import NodeTokens
from dbproxy.cli import main
from dbproxy.identity.authority import TokenAuthority
from dbproxy.identity.config import TokenConfig
from dbproxy.identity.keys import generate_keys


@pytest.fixture
def config(tmp_path):
    generate_keys("HS256", str(tmp_path / "token.key"), None)
    path = tmp_path / "proxy.json"
    path.write_text(json.dumps({"identity": {"token": {"algorithm": "HS256", "key_file": "token.key"}},
                                "listeners": [], "audit": {}}))
    return path


def test_token_issue_node(config, tmp_path, capsys):
    assert main(["token", "issue", "--config", str(config), "--node", "site-a", "--ttl", "1h"]) == 0
    token = capsys.readouterr().out.strip()
    authority = TokenAuthority(TokenConfig(algorithm="HS256", key_file=str(tmp_path / "token.key"),
                                           public_key_file=None, registry_file=None, revocation_file=None))
    assert NodeTokens(authority).verify(token, "site-a").sub == "site-a"
    assert main(["token", "issue", "--config", str(config), "--node", "bad name!"]) == 2
    with pytest.raises(SystemExit):  # one of --user / --node
        main(["token", "issue", "--config", str(config), "--user", "a", "--node", "b"])


def test_agent_login_stores_the_token_privately(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.setattr("sys.stdin", io.StringIO("aaa.bbb.ccc\n"))
    assert main(["agent", "login", "--name", "site-a", "--token-stdin"]) == 0
    stored = tmp_path / "cfg" / "dbproxy" / "agent" / "site-a.token"
    assert stored.read_text() == "aaa.bbb.ccc\n"
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    monkeypatch.setattr("sys.stdin", io.StringIO("not a token\n"))
    assert main(["agent", "login", "--name", "site-a", "--token-stdin"]) == 2


def test_agent_arguments_are_checked(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    assert main(["agent", "--name", "site-a", "--allow", "10.0.0.1:5432"]) == 2  # no --proxy
    assert main(["agent", "--name", "site-a", "--proxy", "p:7443"]) == 2  # no --allow
    assert main(["agent", "--name", "site-a", "--proxy", "p:7443", "--allow", "10.0.0.1"]) == 2
    assert main(["agent", "--name", "site-a", "--proxy", "p:7443", "--allow", "10.0.0.1:5432"]) == 2  # no token
    assert "agent login --name site-a" in capsys.readouterr().err
