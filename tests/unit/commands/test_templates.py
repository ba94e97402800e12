"""Command templates without a target: config errors (file, JSON path, expectation), every parameter
type valid and invalid, every injection attempt refused or quoted inert — the command line checked by
handing it to a real POSIX shell (/bin/sh) and reading back the argv it ran."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import pytest

from dbproxy.commands.templates import ParamError, validate_templates
from dbproxy.config import load_config
from dbproxy.engines import default_registry
from dbproxy.errors import ConfigErrors
from dbproxy.validate import Validator

TEMPLATES = {
    "t": {
        "argv": ["tool", {"flag": "-v", "when": "verbose"}, {"param": "n", "prefix": "--count="}, "--",
                 {"param": "path"}, {"param": "word"}, {"param": "mode"}],
        "env": {"WORD": "word"},
        "params": {
            "path": {"type": "path", "under": ["/var/log"], "required": True},
            "word": {"type": "string", "pattern": "[ -~]{1,80}"},  # lax: any printable ASCII
            "strict": {"type": "string", "pattern": "\\w+"},
            "mode": {"type": "enum", "values": ["fast", "slow"], "default": "fast"},
            "n": {"type": "int", "minimum": 1, "maximum": 10},
            "verbose": {"type": "bool", "default": False},
        },
        "timeout_seconds": 5, "output_limit_bytes": 100, "targets": ["web-*"], "scopes": ["s"],
    }
}


def templates(raw: dict) -> tuple[dict, list]:
    v = Validator("/etc/dbproxy/proxy.json")
    out = validate_templates(v, raw, "listeners[0].templates")
    return out, [str(e) for e in v.errors]


@pytest.fixture
def t():
    raw = json.loads(json.dumps(TEMPLATES))
    raw["t"]["argv"].append({"param": "strict"})
    # The laxest pattern there is: only the checks every value goes through stand in the way.
    raw["t"]["params"]["free"] = {"type": "string", "pattern": ".+"}
    raw["t"]["argv"].append({"param": "free"})
    out, errors = templates(raw)
    assert errors == []
    return out["t"]


def argv_by_sh(line: str) -> list[str]:
    """What a real POSIX shell makes of the line: it runs a printer of its argv instead of ``tool``."""
    printer = f"{shlex.quote(sys.executable)} -c 'import sys, json; print(json.dumps(sys.argv[1:]))'"
    # ``exec tool`` → ``exec <printer> tool``: the printer receives exactly the words the shell built.
    assert line.startswith("exec ")
    p = subprocess.run(["/bin/sh", "-c", "exec " + printer + " " + line[len("exec "):]], capture_output=True,
                       text=True, timeout=10, check=True)
    return json.loads(p.stdout)


# ------------------------------------------------------------------------------ config


@pytest.mark.parametrize("mutate,path,expected", [
    (lambda r: r["t"].pop("argv"), "listeners[0].templates.t", '"argv"'),
    (lambda r: r["t"]["argv"].insert(0, {"param": "word"}), "listeners[0].templates.t.argv[0]", "literal command"),
    (lambda r: r["t"]["argv"].append({"param": "nope"}), "listeners[0].templates.t.argv[7].param", "parameter"),
    (lambda r: r["t"]["argv"].append({"param": "verbose"}), "listeners[0].templates.t.argv[7]", "non-bool"),
    (lambda r: r["t"]["params"]["word"].update(pattern="("), "listeners[0].templates.t.params.word.pattern",
     "regular expression"),
    (lambda r: r["t"]["params"]["word"].pop("pattern"), "listeners[0].templates.t.params.word", "'pattern'"),
    (lambda r: r["t"]["params"]["n"].update(type="float"), "listeners[0].templates.t.params.n.type", "one of"),
    (lambda r: r["t"]["params"]["mode"].update(default="medium"), "listeners[0].templates.t.params.mode.default",
     "valid value"),
    (lambda r: r["t"]["params"]["path"].update(under=["var/log"]), "listeners[0].templates.t.params.path.under[0]",
     "absolute"),
    (lambda r: r["t"].update(env={"LD_PRELOAD": "word"}), "listeners[0].templates.t.env.LD_PRELOAD", "LD_"),
    (lambda r: r["t"].pop("scopes"), "listeners[0].templates.t", "'scopes'"),
    (lambda r: r["t"].update(timeout_seconds=0), "listeners[0].templates.t.timeout_seconds", "number >="),
    (lambda r: r["t"].update(shell="bash"), "listeners[0].templates.t.shell", "no key"),
    (lambda r: r["t"]["params"].update(unused={"type": "bool"}), "listeners[0].templates.t.params.unused", "uses"),
])
def test_config_errors_name_path_and_expectation(mutate, path, expected):
    raw = json.loads(json.dumps(TEMPLATES))
    raw["t"]["params"].pop("strict")
    mutate(raw)
    _, errors = templates(raw)
    assert any(e.startswith(f"/etc/dbproxy/proxy.json: {path}:") and expected in e for e in errors), errors


def test_whole_config_loads_and_refuses_a_listener_without_auth(tmp_path):
    import subprocess as sp

    sp.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")], check=True)
    pub = (tmp_path / "k.pub").read_text().split()
    (tmp_path / "known_hosts").write_text(f"10.0.0.5 {pub[0]} {pub[1]}\n")
    raw = json.loads(json.dumps(TEMPLATES))
    raw["t"]["params"].pop("strict")
    (tmp_path / "tok.key").write_text("x" * 40)
    (tmp_path / "tok.key").chmod(0o600)
    listener = {"name": "api", "protocol": "ssh-commands", "kind": "http", "listen": "127.0.0.1:0",
                "templates": raw,
                "routes": [{"match": {"target": "web-*"}, "backend": {
                    "address": "10.0.0.5:22", "login": "deploy", "auth": {"method": "publickey", "key_file": "k"},
                    "host_key": {"known_hosts_file": "known_hosts"}}}]}
    doc = {"listeners": [listener], "roles": {"r": {"routes": ["*"], "targets": ["*"], "logins": ["*"],
                                                    "scopes": ["s"]}}}
    path = tmp_path / "proxy.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigErrors) as exc:
        load_config(str(path), default_registry())
    assert any(e.path == "listeners[0]" and '"auth"' in e.expected for e in exc.value.errors)
    doc["identity"] = {"token": {"algorithm": "HS256", "key_file": "tok.key"}}
    listener["auth"] = {"methods": ["token"]}
    path.write_text(json.dumps(doc))
    config = load_config(str(path), default_registry())
    assert config.listeners[0].extra["templates"]["t"].scopes == ("s",)
    assert config.roles["r"].scopes == ("s",)


# ------------------------------------------------------------------------------ types


def test_each_type_valid(t):
    values = t.validate({"path": "/var/log/syslog", "word": "a b", "strict": "abc_1", "mode": "slow", "n": "7",
                         "verbose": "true"})
    assert values == {"path": "/var/log/syslog", "word": "a b", "strict": "abc_1", "mode": "slow", "n": 7,
                      "verbose": True}
    assert t.validate({"path": "/var/log"}) == {"path": "/var/log", "mode": "fast", "verbose": False}


@pytest.mark.parametrize("param,value", [
    ("path", "/etc/passwd"), ("path", "var/log/x"), ("path", "/var/log/../../etc/shadow"), ("path", "/var/log/./x"),
    ("path", "/var/log//x"), ("path", "/var/logx"), ("path", "/var/log/a b"), ("path", "/var/log/*"), ("path", 5),
    ("strict", "a-b"), ("strict", ""), ("strict", 12),
    ("mode", "FAST"), ("mode", "medium"),
    ("n", 0), ("n", 11), ("n", "1e3"), ("n", 2.0), ("n", True), ("n", "0x5"),
    ("verbose", "yes"), ("verbose", 1), ("verbose", "True"),
])
def test_each_type_invalid(t, param, value):
    with pytest.raises(ParamError) as exc:
        t.validate({"path": "/var/log", param: value})
    assert exc.value.param == param


def test_required_and_unknown(t):
    with pytest.raises(ParamError, match="required"):
        t.validate({"word": "x"})
    with pytest.raises(ParamError, match="no parameter 'other'"):
        t.validate({"path": "/var/log", "other": "x"})


# ------------------------------------------------------------------------------ injection

SHELL_SYNTAX = {
    "semicolon": "x; touch /tmp/pwned",
    "and": "x && touch /tmp/pwned",
    "pipe": "x | touch /tmp/pwned",
    "subst": "$(touch /tmp/pwned)",
    "backticks": "`touch /tmp/pwned`",
    "quote": "x'; touch /tmp/pwned; echo '",
    "glob": "*",
    "var": "$HOME",
    "redirect": "x > /tmp/pwned",
}


@pytest.mark.parametrize("name", sorted(SHELL_SYNTAX))
def test_shell_syntax_refused_by_a_strict_pattern(t, name):
    with pytest.raises(ParamError):
        t.validate({"path": "/var/log", "strict": SHELL_SYNTAX[name]})


@pytest.mark.parametrize("name", sorted(SHELL_SYNTAX))
def test_shell_syntax_inert_through_a_lax_pattern(t, name, tmp_path):
    value = SHELL_SYNTAX[name]
    values = t.validate({"path": "/var/log/x", "word": value})
    line = t.command_line(values)
    # The real shell hands the command exactly the argv (env included), the value one element.
    assert argv_by_sh(line) == ["env", f"WORD={value}", "tool", "--", "/var/log/x", value, "fast"]


@pytest.mark.parametrize("value", [
    "x\ny", "x\r", "a\x00b", "\x1b]0;title\x07", "tab\there", "del\x7f", "c1\x85",
])
def test_control_characters_refused(t, value):
    for param in ("free", "word"):
        with pytest.raises(ParamError, match="control"):
            t.validate({"path": "/var/log", param: value})


@pytest.mark.parametrize("param,value", [("word", "--x"), ("word", "-rf"), ("free", "--exec=id"), ("strict", "-x"),
                                         ("path", "--help"), ("mode", "--fast")])
def test_option_injection_refused(t, param, value):
    with pytest.raises(ParamError):
        t.validate({"path": "/var/log", param: value})


def test_option_injection_inert_after_double_dash(t):
    # A value that may begin with '-' (allowed explicitly) still lands after the template's "--".
    raw = json.loads(json.dumps(TEMPLATES))
    raw["t"]["params"].pop("strict")
    raw["t"]["params"]["word"]["allow_leading_dash"] = True
    out, errors = templates(raw)
    assert not errors
    line = out["t"].command_line(out["t"].validate({"path": "/var/log", "word": "--x"}))
    words = argv_by_sh(line)
    assert words.index("--") < words.index("--x")


@pytest.mark.parametrize("value", [
    "x\uff1b id",  # fullwidth semicolon
    "\u0435cho",  # Cyrillic e
    "\u2014x",  # em dash (looks like an option)
    "x\u200by",  # zero-width space
    "x\u2009y",  # thin space
    "f\u0430st",  # Cyrillic a in an enum value
])
def test_unicode_lookalikes_refused(t, value):
    for param in ("free", "word", "strict", "mode"):
        with pytest.raises(ParamError):
            t.validate({"path": "/var/log", param: value})


def test_unicode_allowed_only_when_the_parameter_says_so():
    raw = {"u": {"argv": ["echo", {"param": "name"}], "targets": ["*"], "scopes": ["s"],
                 "params": {"name": {"type": "string", "pattern": "\\w+", "unicode": True}}}}
    out, errors = templates(raw)
    assert not errors
    with pytest.raises(ParamError):  # re.ASCII: \w is [A-Za-z0-9_] whatever "unicode" says
        out["u"].validate({"name": "Zo\u00eb"})
    raw["u"]["params"]["name"]["pattern"] = "[\\w\u00e0-\u00ff]+"
    out, _ = templates(raw)
    assert out["u"].validate({"name": "Zo\u00eb"}) == {"name": "Zo\u00eb"}


def test_int_and_bool_reach_argv_as_text(t):
    line = t.command_line(t.validate({"path": "/var/log", "n": 3, "verbose": True}))
    assert argv_by_sh(line) == ["tool", "-v", "--count=3", "--", "/var/log", "fast"]
