"""The two logins of a Telnet session, sans-IO: the proxy's own prompts to the client, and the target's.

Strategy.  Telnet carries no authentication, so both are dialogues on the
terminal stream:

- ``LineEditor`` — the proxy's ``login:`` / ``Password:`` prompts.  The proxy
  has said WILL ECHO (RFC 857), so the client sends every key as typed and
  shows only what the proxy echoes: the login is echoed back (with
  backspace, Ctrl-U), the token is not echoed at all.  Enter ends the line;
  Ctrl-C / Ctrl-D (or Telnet's IP) abandon the login.
- ``TargetLogin`` — the proxy at the target's real ``login:`` prompt: the
  target's output is matched against the route's prompt expressions
  (``config.DEFAULT_PROMPTS``, matched at the end of what arrived since the
  last answer): at the login prompt the route's login is sent, at the
  password prompt the proxy-held password; then a shell prompt means success,
  a failure message or the login prompt again means the password was refused.
  The password is handed in only to make the bytes to send; it is never kept,
  logged or part of any event.

No I/O and no trio: the engine feeds bytes and sends what comes back.
"""

from __future__ import annotations

import re
from typing import Any

import attrs

MAX_LOGIN = 256
MAX_SECRET = 8192  # a token is a JWS: a few hundred bytes, more with many roles
_TAIL = 4096

_ANSI = re.compile(r"\x1b(\[[0-9;?]*[ -/]*[@-~]|\][^\x07]*\x07|[()][0-9A-Za-z]|.)")


class LoginAbandoned(Exception):
    """The client pressed Ctrl-C / Ctrl-D at a proxy prompt, or typed past the line's limit."""


class LineEditor:
    """One line typed at a proxy prompt; ``feed`` returns (bytes to echo, the line once Enter came, else None)."""

    def __init__(self, *, echo: bool, limit: int) -> None:
        self.echo = echo
        self.limit = limit
        self.buf = bytearray()

    def feed(self, data: bytes) -> tuple[bytes, bytes | None, bytes]:
        """(echo, the finished line or None, bytes after the Enter — type-ahead for whatever comes next)."""
        echo = bytearray()
        for i, b in enumerate(data):
            if b in (0x0D, 0x0A):
                echo += b"\r\n"
                line, self.buf = bytes(self.buf), bytearray()
                return bytes(echo) if self.echo else b"\r\n", line, data[i + 1:]
            if b in (0x03, 0x04):
                raise LoginAbandoned("the client abandoned the login (Ctrl-C / Ctrl-D)")
            if b in (0x7F, 0x08):
                if self.buf:
                    self.buf.pop()
                    echo += b"\b \b"
            elif b == 0x15:  # Ctrl-U: the line is gone
                echo += b"\b \b" * len(self.buf)
                self.buf.clear()
            elif b >= 0x20:
                if len(self.buf) >= self.limit:
                    raise LoginAbandoned(f"the line is longer than {self.limit} bytes")
                self.buf.append(b)
                echo.append(b)
            # other control characters (Tab, escape sequences' ESC) are ignored
        return (bytes(echo) if self.echo else b""), None, b""


@attrs.define
class LoginResult:
    ok: bool
    reason: str = ""
    kind: str = ""  # "auth" | "prompt"


class TargetLogin:
    """The target's login dialogue (see the module docstring); states login → password → result."""

    def __init__(self, prompts: dict[str, Any], login: str) -> None:
        self.prompts = prompts
        self.login = login
        self.state = "login"
        self.text = ""
        self.after = bytearray()  # what the target printed after the password (the MOTD, the first prompt)

    def _seen(self, key: str) -> bool:
        return self.prompts[key].search(self.text) is not None

    def output(self, data: bytes, password: Any) -> tuple[bytes, LoginResult | None]:
        """Feed target output; (what to send the target now, the result once known).

        ``password``: a callable returning the password (called once, at the password prompt)."""
        if self.state == "result" or self.state == "password_sent":
            self.after += data
        self.text = (self.text + _ANSI.sub("", data.decode("utf-8", "replace")).replace("\x00", ""))[-_TAIL:]
        if self.state == "login":
            if self._seen("login"):
                self.state, self.text = "password", ""
                return self.login.encode() + b"\r", None
            return b"", None
        if self.state == "password":
            if self._seen("password"):
                self.state, self.text = "password_sent", ""
                self.after.clear()
                return password().encode() + b"\r", None
            if self._seen("failure") or self._seen("login"):
                return b"", LoginResult(False, f"the target refused the login {self.login!r} before asking for a "
                                               f"password: {self._last_line()!r}", "auth")
            if self._seen("shell"):
                return b"", LoginResult(True)  # no password asked (the target trusts the login)
            return b"", None
        # after the password
        if self._seen("failure") or self._seen("login"):
            return b"", LoginResult(False, f"the target refused the password for {self.login!r}: "
                                           f"{self._last_line()!r}", "auth")
        if self._seen("shell"):
            return b"", LoginResult(True)
        return b"", None

    def _last_line(self) -> str:
        lines = [x.strip() for x in self.text.replace("\r", "\n").split("\n") if x.strip()]
        failure = next((x for x in lines if self.prompts["failure"].search(x)), None)
        return (failure or (lines[-1] if lines else ""))[:200]

    def waiting_for(self) -> str:
        return {"login": "the target's login prompt", "password": "the target's password prompt"}.get(
            self.state, "the target's shell prompt after the password")
