"""The two Telnet logins, sans-IO (engines/telnet/login.py): the proxy's prompts and the target's dialogue."""

from __future__ import annotations

import re

import pytest

from dbproxy.engines.telnet.config import DEFAULT_PROMPTS
from dbproxy.engines.telnet.login import LineEditor, LoginAbandoned, TargetLogin

PROMPTS = {k: re.compile(v) for k, v in DEFAULT_PROMPTS.items()}


def test_login_line_is_echoed_and_edited():
    e = LineEditor(echo=True, limit=64)
    assert e.feed(b"depx") == (b"depx", None, b"")
    assert e.feed(b"\x7f") == (b"\b \b", None, b"")
    echo, line, rest = e.feed(b"loy@host-1\rls\r")
    assert (echo, line, rest) == (b"loy@host-1\r\n", b"deploy@host-1", b"ls\r")


def test_secret_line_is_never_echoed():
    e = LineEditor(echo=False, limit=64)
    assert e.feed(b"tok") == (b"", None, b"")
    assert e.feed(b"en\r") == (b"\r\n", b"token", b"")


@pytest.mark.parametrize("key", [b"\x03", b"\x04"])
def test_ctrl_c_abandons(key):
    with pytest.raises(LoginAbandoned):
        LineEditor(echo=True, limit=64).feed(b"de" + key)


def test_line_limit():
    with pytest.raises(LoginAbandoned):
        LineEditor(echo=False, limit=4).feed(b"12345")


def run(dialogue, chunks, password="pw"):
    sent, result = b"", None
    asked = []
    for chunk in chunks:
        answer, result = dialogue.output(chunk, lambda: asked.append(1) or password)
        sent += answer
        if result is not None:
            break
    return sent, result, len(asked)


def test_target_login_success_any_split():
    transcript = b"\r\nDebian GNU/Linux 12\r\nvm login: " , b"Pass", b"word: ", b"\r\nLast login: x\r\n", b"u@vm:~$ "
    d = TargetLogin(PROMPTS, "deploy")
    sent, result, asked = run(d, transcript)
    assert sent == b"deploy\rpw\r" and result.ok and asked == 1
    assert bytes(d.after).endswith(b"u@vm:~$ ")


def test_target_login_wrong_password():
    d = TargetLogin(PROMPTS, "deploy")
    sent, result, _ = run(d, [b"login: ", b"Password: ", b"\r\n", b"\r\nLogin incorrect\r\nvm login: "])
    assert result is not None and not result.ok and result.kind == "auth"
    assert "Login incorrect" in result.reason and "pw" not in result.reason


def test_password_asked_only_at_the_password_prompt():
    d = TargetLogin(PROMPTS, "deploy")
    _, result, asked = run(d, [b"login: ", b"\x1b[1mwelcome\x1b[0m\r\n"])
    assert result is None and asked == 0 and d.waiting_for() == "the target's password prompt"
