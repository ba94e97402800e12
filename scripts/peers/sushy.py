"""A private sushy-emulator (PyPI sushy-tools, fake driver) as the BMC of the Redfish tests.

Strategy: ``python -m scripts.peers.sushy serve DIR PORT`` as our child
process runs sushy-tools' own Flask application (``sushy_tools.emulator.
main.app``, configured from a config file of ours, ``--fake`` driver) under
werkzeug's threaded server on a loopback port:

- Basic auth by sushy-tools' own ``RedfishAuthMiddleware`` over an htpasswd
  file of bcrypt hashes (``SUSHY_EMULATOR_AUTH_FILE``; written here with
  ``bcrypt``, a dependency of sushy-tools) for the one BMC account
  (``username``/``password``): the credential only the proxy holds.
- Redfish sessions: sushy-tools 2.2 has no SessionService, so ``serve`` puts
  a small one in front of the emulator (``SessionService`` below, DSP0266
  §13.3.4): ``POST /redfish/v1/SessionService/Sessions`` with the htpasswd
  account's ``UserName``/``Password`` (checked by sushy-tools'
  ``auth_basic.authenticate``) answers 201 with ``X-Auth-Token`` and
  ``Location``; a request with a valid ``X-Auth-Token`` reaches the emulator
  as an authenticated one; ``GET`` lists sessions, ``DELETE`` ends one (Basic
  or token auth).  Every resource, action and the power state machine are
  the emulator's own.
- ``TMPDIR`` and ``SUSHY_EMULATOR_STATE_DIR`` point into DIR (the fake
  driver keeps its state in sqlite there); power changes land 1–11 s after a
  Reset (the fake driver's own delay): poll.

``stop()`` terminates it.  Runnable: ``python -m scripts.peers.sushy [DIR]``
prints the connection info as JSON and waits for Ctrl-C.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import attrs

from scripts.peers import free_port, wait_for_interrupt, wait_for_tcp
from scripts.peers.process import PeerProcess

__all__ = ["Sushy", "start_sushy", "SYSTEM_UUID"]

ROOT = Path(__file__).resolve().parents[2]
SYSTEM_UUID = "27946b59-9e44-4fa7-8e91-f3527a1ef094"  # sushy-tools' fake driver default system
SESSIONS = "/redfish/v1/SessionService/Sessions"


@attrs.define(eq=False)
class Sushy(PeerProcess):
    dir: Path
    port: int
    username: str
    password: str
    host: str = "127.0.0.1"
    _proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def password_file(self) -> Path:
        return self.dir / "bmc-password"

    @property
    def log_file(self) -> Path:
        return self.dir / "sushy.log"

    def start(self, timeout: float = 30.0) -> "Sushy":
        env = dict(os.environ, TMPDIR=str(self.dir / "tmp"),
                   PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self._spawn([sys.executable, "-m", "scripts.peers.sushy", "serve", str(self.dir), str(self.port)],
                    log=self.log_file, env=env, cwd=self.dir)
        try:
            wait_for_tcp(self.host, self.port, timeout=timeout, proc=self._proc)
        except Exception as exc:
            raise RuntimeError(f"sushy-emulator did not start: {exc}\n{self.log_text()}") from None
        return self

    def info(self) -> dict:
        return {"url": self.url, "username": self.username, "password_file": str(self.password_file),
                "dir": str(self.dir)}

    # -- direct access (the tests' view of the BMC, not through the proxy) --------------------
    def request(self, method: str, path: str, body: dict | None = None, headers: dict | None = None) -> tuple:
        """(status, headers, parsed body) of a request straight to the emulator with the BMC account."""
        import base64
        import http.client

        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        hdrs = {"Authorization": "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()}
        hdrs.update(headers or {})
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            hdrs["Content-Type"] = "application/json"
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        raw = resp.read()
        conn.close()
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = raw
        return resp.status, dict(resp.getheaders()), parsed

    def power_state(self, system: str = SYSTEM_UUID) -> str:
        status, _, body = self.request("GET", f"/redfish/v1/Systems/{system}")
        assert status == 200, body
        return body["PowerState"]

    def issued_tokens(self) -> list[str]:
        """Every Redfish session token the emulator handed out (to the proxy)."""
        try:
            return (self.dir / "issued-tokens").read_text().split()
        except FileNotFoundError:
            return []

    def sessions(self) -> list[str]:
        status, _, body = self.request("GET", SESSIONS)
        assert status == 200, body
        return [m["@odata.id"] for m in body["Members"]]


def _htpasswd(path: Path, user: str, password: str) -> None:
    import bcrypt

    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
    path.write_text(f"{user}:{hashed}\n")


def start_sushy(base_dir: str | Path, *, port: int | None = None, username: str = "bmcadmin") -> Sushy:
    """Config, htpasswd and a running emulator under *base_dir* on a free loopback port."""
    base = Path(base_dir)
    base.mkdir(parents=True, exist_ok=True)
    dir = Path(tempfile.mkdtemp(prefix="sushy-", dir=base))
    (dir / "tmp").mkdir()
    password = "bmc-" + secrets.token_hex(12)  # the BMC secret: it must never reach a client or the audit
    _htpasswd(dir / "htpasswd", username, password)
    (dir / "bmc-password").write_text(password + "\n")
    os.chmod(dir / "bmc-password", 0o600)
    (dir / "emulator.conf").write_text("\n".join([
        f"SUSHY_EMULATOR_AUTH_FILE = {str(dir / 'htpasswd')!r}",
        f"SUSHY_EMULATOR_STATE_DIR = {str(dir / 'state')!r}",
        "SUSHY_EMULATOR_FAKE_DRIVER = True",
        "",
    ]))
    for _ in range(5):
        chosen = port or free_port()
        server = Sushy(dir=dir, port=chosen, username=username, password=password)
        try:
            return server.start()
        except RuntimeError:
            if port is not None or "Address already in use" not in server.log_text():
                raise
            time.sleep(0.1)
    raise RuntimeError("sushy-emulator: no free port after 5 tries")


# --------------------------------------------------------------------------- the emulator process


class SessionService:
    """WSGI middleware: Redfish sessions (DSP0266 §13.3.4) in front of sushy-tools' emulator."""

    def __init__(self, basic_app, flask_app, auth_file: str, issued: Path | None = None) -> None:
        self.basic_app = basic_app  # the emulator behind its Basic-auth middleware
        self.flask_app = flask_app  # the emulator itself (for requests a session authenticated)
        self.auth_file = auth_file
        self.issued = issued  # every session token handed out, one a line (a test checks none leaks)
        self.sessions: dict[str, tuple[str, str]] = {}  # id → (token, user)
        self.lock = threading.Lock()

    def _json(self, start_response, status: str, body: dict | None, headers: list | None = None):
        data = json.dumps(body).encode() if body is not None else b""
        hdrs = [("Content-Type", "application/json"), ("Content-Length", str(len(data)))] + (headers or [])
        start_response(status, hdrs)
        return [data]

    def _error(self, start_response, status: str, message: str):
        return self._json(start_response, status, {"error": {"code": "Base.1.0.GeneralError", "message": message,
                                                             "@Message.ExtendedInfo": [{"Message": message}]}})

    def _token_user(self, token: str) -> str | None:
        with self.lock:
            for tok, user in self.sessions.values():
                if secrets.compare_digest(tok, token):
                    return user
        return None

    def _basic_user(self, env) -> str | None:
        from sushy_tools import error
        from sushy_tools.emulator import auth_basic

        header = env.get("HTTP_AUTHORIZATION")
        if not header:
            return None
        try:
            token = auth_basic.parse_header(dict(env))
            user, password = auth_basic.parse_token(token)
            auth_basic.authenticate(self.auth_file, user, password)
            return user
        except error.FishyError:
            return None

    def __call__(self, env, start_response):
        path = env.get("PATH_INFO", "").rstrip("/")
        method = env.get("REQUEST_METHOD", "GET")
        token = env.get("HTTP_X_AUTH_TOKEN")
        if path == SESSIONS and method == "POST":
            try:
                size = int(env.get("CONTENT_LENGTH") or 0)
                body = json.loads(env["wsgi.input"].read(size) or b"{}")
                user, password = body["UserName"], body["Password"]
            except (ValueError, KeyError, TypeError):
                return self._error(start_response, "400 Bad Request", "UserName and Password are required")
            from sushy_tools import error
            from sushy_tools.emulator import auth_basic

            try:
                auth_basic.authenticate(self.auth_file, user, password.encode())
            except error.FishyError:
                return self._error(start_response, "401 Unauthorized", "Incorrect username or password")
            sid, tok = secrets.token_hex(4), secrets.token_hex(16)
            with self.lock:
                self.sessions[sid] = (tok, user)
                if self.issued is not None:
                    with open(self.issued, "a") as f:
                        f.write(tok + "\n")
            uri = f"{SESSIONS}/{sid}"
            return self._json(start_response, "201 Created", {"@odata.id": uri, "Id": sid, "UserName": user},
                              [("X-Auth-Token", tok), ("Location", uri)])
        user = self._token_user(token) if token else None
        if token and user is None:
            return self._error(start_response, "401 Unauthorized", "the session does not exist or has expired")
        if path == SESSIONS or path.startswith(SESSIONS + "/") or path == "/redfish/v1/SessionService":
            user = user or self._basic_user(env)
            if user is None:
                return self._error(start_response, "401 Unauthorized", "Authorization required")
            if path == "/redfish/v1/SessionService":
                return self._json(start_response, "200 OK", {"@odata.id": "/redfish/v1/SessionService",
                                                             "Id": "SessionService",
                                                             "Sessions": {"@odata.id": SESSIONS}})
            if path == SESSIONS and method == "GET":
                with self.lock:
                    members = [{"@odata.id": f"{SESSIONS}/{sid}"} for sid in self.sessions]
                return self._json(start_response, "200 OK", {"@odata.id": SESSIONS, "Members": members,
                                                             "Members@odata.count": len(members)})
            sid = path.rsplit("/", 1)[1]
            with self.lock:
                known = sid in self.sessions
                if known and method == "DELETE":
                    del self.sessions[sid]
            if not known:
                return self._error(start_response, "404 Not Found", f"no session {sid}")
            if method == "DELETE":
                start_response("204 No Content", [])
                return [b""]
            return self._json(start_response, "200 OK", {"@odata.id": path, "Id": sid})
        if user is not None:
            env = dict(env, HTTP_X_USER=user, HTTP_X_USER_NAME=user)
            env.pop("HTTP_X_AUTH_TOKEN", None)
            return self.flask_app(env, start_response)
        return self.basic_app(env, start_response)


def serve(dir: Path, port: int) -> None:
    from sushy_tools.emulator import main as emulator

    # Note: werkzeug's server answers every request with "Connection: close" (its serving.py: keep-alive
    # is not handled by http.server), so the proxy opens a new BMC connection per request here.

    app = emulator.app
    app.configure(config_file=str(dir / "emulator.conf"))
    app.config["SUSHY_EMULATOR_FAKE_DRIVER"] = True
    basic = app.wsgi_app  # RedfishAuthMiddleware(flask's wsgi_app)
    app.wsgi_app = SessionService(basic, basic.app, str(dir / "htpasswd"), dir / "issued-tokens")
    app.run(host="127.0.0.1", port=port, threaded=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        serve(Path(sys.argv[2]), int(sys.argv[3]))
        sys.exit(0)
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="dbproxy-sushy-"))
    bmc = start_sushy(target)
    print(json.dumps(bmc.info(), indent=2), flush=True)
    try:
        wait_for_interrupt()
    finally:
        bmc.stop()
