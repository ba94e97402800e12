"""The VNC engine's config, role policy, stages and the one-time codes, without a network.

Config mistakes name the file, JSON path and expectation; roles grant desktops by ``desktops``
only (a terminal role's ``targets`` grant no screen); the ``desktop`` policy combines across
granting roles (view-only only if every role is; clipboard per direction if any role allows);
the client stage drops input under view-only (audited once) and refused clipboard; ``token issue
--vnc`` makes the engine's 8-character code (the store itself: tests/unit/core/test_onetime.py)."""

from __future__ import annotations

import json

import pytest

from dbproxy.config import load_config
from dbproxy.engines.vnc import rfb
from dbproxy.engines.vnc.stages import ClientStage, DesktopPolicy, DesktopState, ServerStage
from dbproxy.errors import ConfigErrors
from dbproxy.registry import default_registry
from dbproxy.roles import AccessPolicy
from dbproxy.session import Identity
from dbproxy.sansio import Verdict


def _doc(roles: dict, **listener) -> dict:
    return {
        "identity": {"token": {"algorithm": "HS256", "key_file": "token.key", "codes_file": "codes.json"}},
        "roles": roles,
        "listeners": [{"name": "vnc", "protocol": "vnc", "listen": "127.0.0.1:0", "auth": {"methods": ["token"]},
                       **listener,
                       "routes": [{"name": "desk", "match": {"target": "desk-*"},
                                   "backend": {"address": "127.0.0.1:5901",
                                               "auth": {"method": "vnc", "password_env": "DESK_PW"}}}]}],
    }


def _load(tmp_path, d):
    (tmp_path / "token.key").write_bytes(b"k" * 32)
    (tmp_path / "token.key").chmod(0o600)
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(d))
    return load_config(str(path), default_registry())


def _errors(tmp_path, d) -> str:
    with pytest.raises(ConfigErrors) as info:
        _load(tmp_path, d)
    assert all(e.file == str(tmp_path / "cfg.json") for e in info.value.errors)
    return "\n".join(f"{e.path}: {e.expected}" for e in info.value.errors)


ROLES = {
    "ops": {"routes": ["*"], "desktops": ["desk-*"], "desktop": {"clipboard": {"to_server": True}}},
    "watch": {"routes": ["*"], "desktops": ["desk-*"],
              "desktop": {"view_only": True, "clipboard": {"to_client": True}}},
    "plain": {"routes": ["*"], "desktops": ["desk-*"]},
    "ssh": {"routes": ["*"], "targets": ["desk-*"], "logins": ["*"]},
}


def _grant(cfg, *roles):
    access = AccessPolicy(cfg.roles, enforced=True)
    return access.authorize(Identity("u", roles), route="desk", database="desk-1", db_user=None, family="desktop")


def test_roles_grant_desktops_and_combine_their_policy(tmp_path, monkeypatch):
    monkeypatch.setenv("DESK_PW", "secret")
    cfg = _load(tmp_path, _doc(ROLES, audit_keys=True))
    (lc,) = cfg.listeners
    assert lc.extra["audit_keys"] is True and cfg.identity.token.codes_file.endswith("codes.json")
    assert DesktopPolicy.from_grant(_grant(cfg, "ops")) == DesktopPolicy(False, True, False)
    assert DesktopPolicy.from_grant(_grant(cfg, "watch")) == DesktopPolicy(True, False, True)
    # view-only only when every granting role is; clipboard when any allows it
    assert DesktopPolicy.from_grant(_grant(cfg, "watch", "plain")) == DesktopPolicy(False, False, True)
    assert DesktopPolicy.from_grant(_grant(cfg, "plain")) == DesktopPolicy(False, False, False)
    with pytest.raises(Exception, match="no role"):  # terminal targets grant no screen
        _grant(cfg, "ssh")
    with pytest.raises(Exception, match="no role"):  # and desktops grant no terminal
        AccessPolicy(cfg.roles, enforced=True).authorize(Identity("u", ("ops",)), route="desk", database="desk-1",
                                                         db_user="root", family="terminal")


def test_config_mistakes_name_the_path(tmp_path, monkeypatch):
    monkeypatch.setenv("X", "secret")
    roles = {"bad": {"routes": ["*"], "desktops": ["d"], "desktop": {"view_only": "yes", "clipboard": {"up": True}}},
             "half": {"routes": ["*"], "desktop": {}}}
    d = _doc(roles, kind="tls", audit_keys=1, colour=True)
    d["listeners"][0]["routes"][0]["backend"]["auth"] = {"method": "plain", "password_env": "X"}
    d["listeners"][0]["routes"][0]["backend"]["user"] = "root"
    errors = _errors(tmp_path, d)
    assert "roles.bad.desktop.view_only: true or false, got a string" in errors
    assert "roles.bad.desktop.clipboard.up: no key 'up' here (allowed: to_client, to_server)" in errors
    assert 'roles.half: a key "desktops" (the targets the role\'s "desktop" rules apply to)' in errors
    assert "listeners[0].kind: a kind the vnc engine serves (tcp), got 'tls'" in errors
    assert "listeners[0].audit_keys: true or false, got a number" in errors
    assert "listeners[0].colour: no key 'colour' here" in errors
    assert "listeners[0].routes[0].backend.auth: a key 'username' (a string)" in errors
    assert "listeners[0].routes[0].backend.user: no key 'user' for a VNC backend" in errors


class _Audit:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []

    def emit(self, kind, **fields):
        self.events.append((kind, fields))
        return fields


class _Session:
    event_family = "desktop"

    def __init__(self) -> None:
        self.audit = _Audit()


def _msgs(*raws: bytes):
    dec = rfb.ClientMessageDecoder()
    dec.feed(b"".join(raws))
    out = []
    while (m := dec.next_message()) is not rfb.NEED_DATA:
        out.append(m)
    return out


def test_view_only_drops_input_and_audits_once():
    session = _Session()
    state = DesktopState(session, DesktopPolicy(view_only=True))
    stage = ClientStage(state)
    msgs = _msgs(rfb.encode_key_event(True, 0x61), rfb.encode_pointer_event(0, 5, 5),
                 rfb.encode_update_request(True, 0, 0, 10, 10), rfb.encode_key_event(False, 0x61))
    verdicts = [stage.handle(m, None) for m in msgs]
    assert [isinstance(v, Verdict) and v.replace == () for v in verdicts] == [True, True, False, True]
    kinds = [k for k, _ in session.audit.events]
    assert kinds.count("desktop.input.refused") == 1 and kinds.count("desktop.session.access_denied") == 1
    assert state.end_fields()["input_dropped"] == 3


def test_clipboard_policy_and_key_text():
    session = _Session()
    state = DesktopState(session, DesktopPolicy(to_server=False, to_client=True), audit_keys=True)
    stage = ClientStage(state)
    msgs = _msgs(rfb.encode_client_cut_text(b"secret"), *(rfb.encode_key_event(True, ord(c)) for c in "hi"),
                 rfb.encode_key_event(True, 0xFF0D))
    verdicts = [stage.handle(m, None) for m in msgs]
    assert verdicts[0] == Verdict(replace=()) and verdicts[1:] == [None, None, None]
    clip = next(f for k, f in session.audit.events if k == "desktop.clipboard")
    assert clip["success"] is False and clip["direction"] == "to_server" and clip["bytes"] == 6
    assert ("desktop.keys", {"text": "hi\n"}) in session.audit.events

    class Cut:
        kind, raw, text = "cut_text", b"\x03\x00\x00\x00\x00\x00\x00\x02ok", b"ok"

    assert ServerStage(state).handle(Cut(), None) is None  # to_client allowed
    assert ServerStage(DesktopState(_Session(), DesktopPolicy())).handle(Cut(), None) == Verdict(replace=())


def test_keys_not_audited_by_default():
    session = _Session()
    state = DesktopState(session, DesktopPolicy())
    stage = ClientStage(state)
    for m in _msgs(*(rfb.encode_key_event(True, k) for k in (ord("p"), ord("w"), 0xFF0D))):
        assert stage.handle(m, None) is None
    state.end_fields()
    assert not [k for k, _ in session.audit.events if k == "desktop.keys"]


def test_token_issue_vnc_prints_only_an_8_character_code(tmp_path, capsys):
    """``dbproxy token issue --vnc`` (the one code path of dbproxy/token_cli.py, the ``vnc`` kind the engine
    declares): only the code on stdout, recorded in identity.token.codes_file without a login name."""
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    from dbproxy.cli import main
    from dbproxy.engines.vnc.engine import CODE_ALPHABET
    from dbproxy.identity.keys import TokenKeys
    from dbproxy.onetime import CodeStore

    main(["token", "keygen", "--algorithm", "EdDSA", "--key-file", str(tmp_path / "k"),
          "--public-key-file", str(tmp_path / "k.pub")])
    token = {"algorithm": "EdDSA", "key_file": str(tmp_path / "k"), "public_key_file": str(tmp_path / "k.pub"),
             "codes_file": str(tmp_path / "codes.json")}
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"identity": {"token": token}, "roles": {"ops": {"routes": ["*"], "desktops": ["*"]}},
                                  "listeners": []}))
    capsys.readouterr()
    issue = ["token", "issue", "--config", str(config), "--user", "alice", "--roles", "ops", "--target", "desk-1"]
    assert main(issue + ["--vnc"]) == 0
    out, err = capsys.readouterr()
    code = out.strip()
    assert out == code + "\n" and len(code) == 8 and set(code) <= set(CODE_ALPHABET) and code not in err
    keys = TokenKeys("EdDSA", public_key=load_pem_public_key((tmp_path / "k.pub").read_bytes()))
    (entry,) = CodeStore(str(tmp_path / "codes.json"), keys).entries("vnc")
    assert entry.secret.decode() == code and entry.name == "" and entry.roles == ("ops",)
    assert entry.target == "desk-1" and entry.exp - entry.iat == 60 and not entry.used
    assert main(issue + ["--code", "vnc", "--ttl", "1h"]) == 0  # the longest a vnc code may live
    capsys.readouterr()
    assert main(issue + ["--vnc", "--ttl", "2h"]) == 2
    assert "lives at most 3600s" in capsys.readouterr().err
    assert main(issue + ["--vnc", "--login", "bob"]) == 2
    assert "bound to no login name" in capsys.readouterr().err
