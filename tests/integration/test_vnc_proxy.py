"""VNC through the proxy: real desktops (Xtigervnc, x11vnc on Xvfb, each with an xterm), real viewers.

The desktops come from ``scripts/peers/vnc.py`` (VNC authentication with a
random password only the proxy holds).  The scripted viewer is vncdotool
(connect, screenshot, keys, pointer, clipboard), logging in to the proxy with
a one-time code from the real ``dbproxy token issue --vnc``; VeNCrypt with a
token is TigerVNC's ``vncviewer`` under Xvfb, captured with ImageMagick's
``import``.  Raw sockets speak RFB (``engines/vnc/rfb.py``) where the test
must read the failure reason a viewer would only print.  Every test checks
the audit trail the proxy wrote.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import threading
import time

import pytest

from tests.support import ProxyProcess, dbproxy_cli, peer_missing, read_audit, wait_audit, wait_until

pytestmark = pytest.mark.integration


def _cli(*args: str) -> subprocess.CompletedProcess:
    return dbproxy_cli(*args, check=True)


@pytest.fixture(scope="module")
def desktop(tmp_path_factory):
    from scripts.peers.vnc import start_desktop, vnc_binaries

    try:
        vnc_binaries("tigervnc")
    except FileNotFoundError as exc:
        peer_missing(str(exc))
    d = start_desktop(tmp_path_factory.mktemp("tigervnc"))
    time.sleep(1.0)  # the xterm draws its first line
    yield d
    d.stop()


@pytest.fixture(scope="module")
def x11desktop(tmp_path_factory):
    from scripts.peers.vnc import start_desktop, vnc_binaries

    try:
        vnc_binaries("x11vnc")
    except FileNotFoundError as exc:
        peer_missing(str(exc))
    d = start_desktop(tmp_path_factory.mktemp("x11vnc"), "x11vnc")
    time.sleep(1.0)
    yield d
    d.stop()


@pytest.fixture(scope="module")
def clipdesktop(tmp_path_factory):
    """A desktop of its own for the clipboard-to-viewer test: on the shared one, what earlier tests did
    (clicks, pastes: the X selections' owners) at times keeps Xtigervnc from passing a new clipboard on."""
    from scripts.peers.vnc import start_desktop

    d = start_desktop(tmp_path_factory.mktemp("clipdesk"))
    time.sleep(1.0)
    yield d
    d.stop()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    from scripts.peers.certs import make_ca, make_cert

    d = tmp_path_factory.mktemp("pki")
    ca = make_ca(d)
    return {"ca": ca[0], "proxy": make_cert(d / "proxy", ca, "dbproxy-vnc"),
            "desktop": make_cert(d / "desktop", ca, "desktop")}


@pytest.fixture(scope="module")
def vencrypt_desktops(tmp_path_factory, pki):
    """Xtigervnc offering only VeNCrypt: TLSVnc (anonymous TLS) and X509Vnc (its certificate, from the test CA)."""
    from scripts.peers.vnc import start_desktop, vnc_binaries

    try:
        vnc_binaries("tigervnc")
    except FileNotFoundError as exc:
        peer_missing(str(exc))
    tls = start_desktop(tmp_path_factory.mktemp("tlsvnc"), security="TLSVnc")
    x509 = start_desktop(tmp_path_factory.mktemp("x509vnc"), security="X509Vnc", cert=pki["desktop"])
    time.sleep(1.0)
    yield {"tls": tls, "x509": x509}
    tls.stop()
    x509.stop()


class Env:
    def __init__(self, proc: ProxyProcess, workdir) -> None:
        self.proc = proc
        self.workdir = workdir
        self.audit_path = workdir / "audit.jsonl"

    @property
    def port(self) -> int:
        return self.proc.port("vnc")

    def code(self, user: str, roles: str, target: str, ttl: str | None = None) -> str:
        args = ["token", "issue", "--config", str(self.proc.config_path), "--user", user, "--roles", roles, "--vnc",
                "--target", target]
        if ttl:
            args += ["--ttl", ttl]
        code = _cli(*args).stdout.strip()
        assert len(code) == 8, code
        return code

    def token(self, user: str, roles: str) -> str:
        return _cli("token", "issue", "--config", str(self.proc.config_path), "--user", user, "--roles", roles,
                    "--ttl", "1h").stdout.strip()

    def events(self) -> list[dict]:
        return read_audit(self.audit_path)

    def mark(self) -> int:
        return len(self.events())

    def wait(self, condition, since: int = 0, timeout: float = 20.0) -> list[dict]:
        return wait_audit(self.audit_path, condition, timeout=timeout, since=since)


@pytest.fixture(scope="module")
def env(desktop, x11desktop, vencrypt_desktops, clipdesktop, pki, tmp_path_factory):
    from scripts.peers import refused_port

    workdir = tmp_path_factory.mktemp("vncproxy")
    _cli("token", "keygen", "--algorithm", "EdDSA", "--key-file", str(workdir / "token.key"),
         "--public-key-file", str(workdir / "token.pub"))
    (workdir / "ca").mkdir()
    shutil.copyfile(pki["ca"], workdir / "ca" / "ca.crt")
    cert, key = pki["proxy"]
    (workdir / "clip.secret").write_text(clipdesktop.password + "\n")
    for name in ("tls", "x509"):
        (workdir / f"{name}.secret").write_text(vencrypt_desktops[name].password + "\n")
    (workdir / "desk.secret").write_text(desktop.password + "\n")
    (workdir / "x11.secret").write_text(x11desktop.password + "\n")
    (workdir / "wrong.secret").write_text("wrongpw\n")
    (workdir / "recordings").mkdir()
    backend = {"address": desktop.address, "auth": {"method": "vnc", "password_file": "desk.secret"}}
    config = {
        "identity": {"token": {"algorithm": "EdDSA", "key_file": "token.key", "public_key_file": "token.pub",
                               "revocation_file": "revoked.txt", "codes_file": "codes.json"}},
        "roles": {
            "ops": {"routes": ["*"], "desktops": ["desk-*", "x11-*"],
                    "desktop": {"clipboard": {"to_server": True, "to_client": True}}},
            "noclip": {"routes": ["*"], "desktops": ["desk-*"]},
            "viewer": {"routes": ["*"], "desktops": ["desk-*"], "desktop": {"view_only": True}},
            "ssh-only": {"routes": ["*"], "targets": ["desk-*"], "logins": ["*"]},
        },
        "audit": {"sinks": [{"type": "jsonl", "path": "audit.jsonl"}]},
        "listeners": [{
            "name": "vnc", "protocol": "vnc", "listen": "127.0.0.1:0",
            "tls": {"cert_file": str(cert), "key_file": str(key)},
            "auth": {"methods": ["token"]},
            "audit_keys": True,
            "recording": {"dir": "recordings"},
            "routes": [
                {"name": "desk", "match": {"target": "desk-1"}, "backend": backend},
                {"name": "x11", "match": {"target": "x11-1"},
                 "backend": {"address": x11desktop.address,
                             "auth": {"method": "vnc", "password_file": "x11.secret"}}},
                {"name": "clip", "match": {"target": "desk-clip"},
                 "backend": {"address": clipdesktop.address,
                             "auth": {"method": "vnc", "password_file": "clip.secret"}}},
                {"name": "tlsvnc", "match": {"target": "desk-tlsvnc"},
                 "backend": {"address": vencrypt_desktops["tls"].address,
                             "auth": {"method": "vnc", "password_file": "tls.secret"}}},
                {"name": "x509vnc", "match": {"target": "desk-x509vnc"},
                 "backend": {"address": vencrypt_desktops["x509"].address,
                             "tls": {"mode": "verify-full", "ca_file": str(pki["ca"]), "server_name": "localhost"},
                             "auth": {"method": "vnc", "password_file": "x509.secret"}}},
                {"name": "wrongpw", "match": {"target": "desk-wrongpw"},
                 "backend": {**backend, "auth": {"method": "vnc", "password_file": "wrong.secret"}}},
                {"name": "down", "match": {"target": "desk-down"},
                 "backend": {**backend, "address": f"127.0.0.1:{refused_port()}"}},
            ],
        }],
    }
    proc = ProxyProcess(workdir, config).start()
    yield Env(proc, workdir)
    proc.stop()
    assert desktop.password not in proc.log_text()


# -- viewers -------------------------------------------------------------------------------------
class Viewer:
    """vncdotool's threaded client, closed on exit."""

    def __init__(self, port: int, password: str, timeout: float = 15.0) -> None:
        from vncdotool import api

        self.client = api.connect(f"127.0.0.1::{port}", password=password, timeout=timeout)

    def __enter__(self):
        return self.client

    def __exit__(self, *exc) -> None:
        try:
            self.client.disconnect()
        except Exception:
            pass


@pytest.fixture(scope="module", autouse=True)
def _vncdotool_reactor():
    yield
    try:
        from vncdotool import api

        api.shutdown()
    except Exception:
        pass


def _screenshot(port: int, password: str, path) -> "object":
    from PIL import Image

    with Viewer(port, password) as v:
        v.refreshScreen()
        v.captureScreen(str(path))
    return Image.open(path).convert("RGB")


def _same(a, b) -> bool:
    from PIL import ImageChops

    return a.size == b.size and ImageChops.difference(a, b).getbbox() is None


# -- RFB by hand, for the failure reasons --------------------------------------------------------
def _recv(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def _vnc_login(port: int, password: str) -> tuple[bool, str]:
    """RFB 3.8 with VNC authentication: (accepted, failure reason)."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        return _rfb_login(s, password)


def _rfb_login(s: socket.socket, password: str) -> tuple[bool, str]:
    from dbproxy.engines.vnc import rfb

    if True:
        assert _recv(s, 12) == b"RFB 003.008\n"
        s.sendall(b"RFB 003.008\n")
        n = _recv(s, 1)[0]
        types = _recv(s, n)
        assert rfb.SEC_VNC in types, types
        s.sendall(bytes([rfb.SEC_VNC]))
        challenge = _recv(s, 16)
        s.sendall(rfb.vnc_response(password.encode(), challenge))
        status = int.from_bytes(_recv(s, 4), "big")
        if status == 0:
            return True, ""
        n = int.from_bytes(_recv(s, 4), "big")
        return False, _recv(s, n).decode()


# -- the tests -----------------------------------------------------------------------------------
def test_screenshot_through_the_proxy_equals_direct(env, desktop, tmp_path):
    since = env.mark()
    direct = _screenshot(desktop.port, desktop.password, tmp_path / "direct.png")
    code = env.code("sheila", "ops", "desk-1")
    proxied = _screenshot(env.port, code, tmp_path / "proxied.png")
    assert _same(direct, proxied), "the screen through the proxy differs from the screen seen directly"
    events = [e for e in env.wait(lambda evs: any(e["event"] == "desktop.session.end" and e["user"] == "sheila"
                                                  for e in evs), since=since) if e.get("user") == "sheila"]
    start = next(e for e in events if e["event"] == "desktop.session.start")
    assert start["success"] is True and start["width"] == direct.size[0] and start["height"] == direct.size[1]
    assert start["identity_method"] == "one_time_code"
    assert start["backend_security"] == "VNC" and start["client_security"] == "VNC"
    end = next(e for e in events if e["event"] == "desktop.session.end")
    assert end["encodings"], end  # what vncdotool asked for
    # The recording's SHA-256 closes the end event (the audit chain covers it); it holds what was shown.
    from dbproxy.engines.vnc.recording import read_recording

    path = env.workdir / "recordings" / end["recording"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == end["recording_sha256"]
    rec = read_recording(str(path))
    assert (rec.width, rec.height) == direct.size
    # `dbproxy replay --last` renders the recording's final screen: the screen the viewer saw (vncdotool
    # draws the pointer's cursor into its screenshot, the recording keeps the cursor apart: at most
    # the cursor's box differs).
    from PIL import Image, ImageChops

    _cli("replay", str(path), "--last", str(tmp_path / "last.png"))
    last = Image.open(tmp_path / "last.png").convert("RGB")
    box = ImageChops.difference(last, proxied).getbbox()
    assert last.size == proxied.size and (box is None or (box[2] - box[0] <= 32 and box[3] - box[1] <= 32)), box
    assert code not in env.audit_path.read_text() and desktop.password not in env.audit_path.read_text()


@pytest.mark.parametrize("name,security", [("tls", "VeNCrypt TLSVnc"), ("x509", "VeNCrypt X509Vnc")])
def test_backend_login_over_vencrypt(env, vencrypt_desktops, name, security, tmp_path):
    """The desktop offers only VeNCrypt: the proxy logs in over its TLS (anonymous, or the desktop's
    certificate checked against the route's CA) with VNC authentication inside."""
    d = vencrypt_desktops[name]
    since = env.mark()
    user = f"vera-{name}"
    proxied = _screenshot(env.port, env.code(user, "ops", f"desk-{name}vnc"), tmp_path / "proxied.png")
    assert proxied.size == (640, 400)
    events = env.wait(lambda evs: any(e["event"] == "desktop.session.start" and e["user"] == user for e in evs),
                      since=since)
    start = next(e for e in events if e["event"] == "desktop.session.start" and e["user"] == user)
    assert start["success"] is True and start["backend_security"] == security, start
    assert d.password not in env.audit_path.read_text()


def test_x11vnc_desktop_through_the_proxy(env, x11desktop, tmp_path):
    # x11vnc draws the pointer into the screen where it last polled it: just after it started (a loaded
    # machine) a first screenshot can show it at (0, 0), a later one where it is. Settle on two alike.
    direct = _screenshot(x11desktop.port, x11desktop.password, tmp_path / "direct.png")
    for i in range(10):
        again = _screenshot(x11desktop.port, x11desktop.password, tmp_path / f"direct{i}.png")
        if _same(direct, again):
            break
        direct = again
    proxied = _screenshot(env.port, env.code("alice", "ops", "x11-1"), tmp_path / "proxied.png")
    assert _same(direct, proxied)


def test_typed_keys_reach_the_xterm_and_are_audited(env, desktop):
    since = env.mark()
    word = f"typed{os.getpid()}"
    with Viewer(env.port, env.code("alice", "ops", "desk-1")) as v:
        v.mouseMove(100, 100)
        v.mousePress(1)  # a click on the xterm (focus follows the pointer there)
        for ch in word:
            v.keyPress(ch)
        v.keyPress("enter")
    wait_until(lambda: word in desktop.typed(), what="the typed line in the xterm's output file")
    events = env.wait(lambda evs: any(e["event"] == "desktop.keys" and word in e.get("text", "") for e in evs),
                      since=since)
    assert any(e["event"] == "desktop.keys" for e in events)


def test_view_only_blocks_input(env, desktop):
    since = env.mark()
    word = f"blocked{os.getpid()}"
    with Viewer(env.port, env.code("victor", "viewer", "desk-1")) as v:
        for ch in word:
            v.keyPress(ch)
        v.keyPress("enter")
        v.mouseMove(10, 10)
    events = [e for e in env.wait(lambda evs: any(e["event"] == "desktop.session.end" and e["user"] == "victor"
                                                  for e in evs), since=since) if e.get("user") == "victor"]
    time.sleep(0.5)
    assert word not in desktop.typed()
    refused = [e for e in events if e["event"] == "desktop.input.refused"]
    assert len(refused) == 1, refused  # audited once, the rest counted
    end = next(e for e in events if e["event"] == "desktop.session.end")
    assert end["input_dropped"] >= 2 * (len(word) + 1)
    assert any(e["event"] == "desktop.session.access_denied" and e["reason"] == "view_only" for e in events)


def test_clipboard_to_server_allowed_and_refused(env, desktop):
    since = env.mark()
    text = f"clip-{os.getpid()}-allowed"
    with Viewer(env.port, env.code("carla", "ops", "desk-1")) as v:
        v.paste(text)
        v.pause(0.3)
    events = env.wait(lambda evs: any(e["event"] == "desktop.clipboard" and e["user"] == "carla" for e in evs),
                      since=since)
    clip = next(e for e in events if e["event"] == "desktop.clipboard" and e["user"] == "carla")
    assert clip["success"] is True and clip["direction"] == "to_server" and clip["bytes"] == len(text)
    assert clip["sha256"] == hashlib.sha256(text.encode()).hexdigest() and clip["preview"] == text
    since = env.mark()
    with Viewer(env.port, env.code("nora", "noclip", "desk-1")) as v:
        v.paste("secret-clip")
        v.pause(0.3)
    events = [e for e in env.wait(lambda evs: any(e["event"] == "desktop.session.end" and e["user"] == "nora"
                                                  for e in evs), since=since) if e.get("user") == "nora"]
    clip = next(e for e in events if e["event"] == "desktop.clipboard")
    assert clip["success"] is False
    assert any(e["event"] == "desktop.session.access_denied" and e["reason"] == "clipboard_denied" for e in events)


class RawViewer:
    """A viewer on a raw socket that logs in, asks for updates and keeps every byte the proxy sends."""

    def __init__(self, port: int, password: str) -> None:
        from dbproxy.engines.vnc import rfb

        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        ok, reason = _rfb_login(self.sock, password)
        assert ok, reason
        self.sock.sendall(b"\x01")  # ClientInit, shared
        init = _recv(self.sock, 24)
        _recv(self.sock, int.from_bytes(init[20:24], "big"))
        self.sock.sendall(rfb.encode_set_encodings((0,)) + rfb.encode_update_request(False, 0, 0, 16, 16))
        self.received = bytearray()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return
                self.received += data
        except OSError:
            return

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the reader (a close alone would not end its recv)
        except OSError:
            pass
        self.sock.close()
        self.thread.join(5)


@pytest.mark.parametrize("roles,allowed", [("ops", True), ("noclip", False)])
def test_clipboard_to_client_allowed_and_refused(env, clipdesktop, roles, allowed):
    """An X client on the desktop takes the clipboard; the desktop sends it to the viewer (ServerCutText)."""
    text = f"to-client-{os.getpid()}-{roles}"
    since = env.mark()
    user = f"wanda-{roles}"
    watcher = RawViewer(env.port, env.code(user, roles, "desk-clip"))
    try:
        time.sleep(0.5)
        clipdesktop.set_clipboard(text)
        events = env.wait(lambda evs: any(e["event"] == "desktop.clipboard" and e["direction"] == "to_client"
                                          and e["user"] == user for e in evs), since=since)
        time.sleep(0.5)
    finally:
        watcher.close()
    clip = next(e for e in events if e["event"] == "desktop.clipboard" and e["direction"] == "to_client"
                and e["user"] == user)
    assert clip["success"] is allowed and clip["bytes"] == len(text)
    assert (text.encode() in watcher.received) is allowed


def test_wrong_and_reused_code(env):
    since = env.mark()
    ok, reason = _vnc_login(env.port, "nocode99")
    assert not ok and "one-time code was not accepted" in reason
    code = env.code("alice", "ops", "desk-1")
    ok, _ = _vnc_login(env.port, code)
    assert ok
    ok, reason = _vnc_login(env.port, code)
    assert not ok and "one-time code was not accepted" in reason
    events = env.wait(lambda evs: sum(e["event"] == "desktop.session.start" and not e["success"] for e in evs) >= 2,
                      since=since)
    reasons = [e.get("reason") for e in events if e["event"] == "desktop.session.start" and not e["success"]]
    assert reasons == ["code_unknown", "code_reused"], reasons
    assert code not in env.audit_path.read_text()


def test_role_without_desktops_is_refused(env):
    since = env.mark()
    ok, reason = _vnc_login(env.port, env.code("sam", "ssh-only", "desk-1"))
    assert not ok and "access denied" in reason
    env.wait(lambda evs: any(e["event"] == "desktop.session.access_denied" for e in evs), since=since)


def test_wrong_backend_password_and_server_down(env):
    since = env.mark()
    ok, reason = _vnc_login(env.port, env.code("alice", "ops", "desk-wrongpw"))
    assert not ok and "refused the proxy's login" in reason, reason
    ok, reason = _vnc_login(env.port, env.code("alice", "ops", "desk-down"))
    assert not ok and "unreachable" in reason, reason
    events = env.wait(lambda evs: sum(e["event"] == "desktop.session.start" and not e["success"] for e in evs) >= 2,
                      since=since)
    reasons = [e.get("reason") for e in events if e["event"] == "desktop.session.start" and not e["success"]]
    assert reasons == ["desktop_auth", "desktop_connect"], reasons


def test_ten_concurrent_viewers(env, desktop, tmp_path):
    direct = _screenshot(desktop.port, desktop.password, tmp_path / "direct.png")
    # Ten CLI runs may take longer than a code's default minute on a loaded machine: ten minutes each.
    codes = [env.code(f"user{i}", "ops", "desk-1", ttl="10m") for i in range(10)]
    results: dict[int, object] = {}

    def one(i: int) -> None:
        try:
            results[i] = _screenshot(env.port, codes[i], tmp_path / f"v{i}.png")
        except Exception as exc:  # reported below
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 10
    for i, img in results.items():
        assert not isinstance(img, Exception), f"viewer {i}: {img!r}"
        assert _same(direct, img), f"viewer {i} saw another screen"


def test_vencrypt_x509plain_with_a_token_in_tigervnc_viewer(env, desktop, tmp_path):
    """TigerVNC's viewer: VeNCrypt X509Plain (TLS with the listener's certificate, checked against the
    test CA; user name TARGET, the proxy token as password); its screen equals the same viewer's
    screen seen directly (VNC authentication with the desktop's password)."""
    from PIL import Image
    import io
    from scripts.peers.vnc import tigervnc_viewer_screenshot

    if shutil.which("vncviewer") is None or shutil.which("import") is None:
        peer_missing("vncviewer / import: run scripts/install/vnc.sh")
    pw = subprocess.run(["vncpasswd", "-f"], input=desktop.password.encode(), capture_output=True,
                        check=True).stdout
    direct, log = tigervnc_viewer_screenshot(tmp_path, f"127.0.0.1::{desktop.port}", args=("-passwd", "pw"),
                                             files={"pw": pw}, settle=7)
    assert direct is not None, log
    since = env.mark()
    token = env.token("tess", "ops")
    ca = (env.workdir / "ca" / "ca.crt").read_bytes()
    proxied, log = tigervnc_viewer_screenshot(
        tmp_path, f"127.0.0.1::{env.port}", args=("-SecurityTypes", "X509Plain", "-X509CA", "ca.crt"),
        files={"ca.crt": ca}, env={"VNC_USERNAME": "desk-1", "VNC_PASSWORD": token}, settle=7)
    assert proxied is not None, log
    assert "X509Plain" in log, log
    a = Image.open(io.BytesIO(direct)).convert("RGB")
    b = Image.open(io.BytesIO(proxied)).convert("RGB")
    assert _same(a, b), "TigerVNC's viewer shows another screen through the proxy"
    events = env.wait(lambda evs: any(e["event"] == "desktop.session.start" and e["user"] == "tess" for e in evs),
                      since=since)
    start = next(e for e in events if e["event"] == "desktop.session.start" and e["user"] == "tess")
    assert start["success"] is True and start["client_security"] == "VeNCrypt X509Plain"
    assert start["identity_method"] == "token"
    assert token not in env.audit_path.read_text() and token not in env.proc.log_text()


def test_vencrypt_with_a_wrong_token_gets_the_reason(env, tmp_path):
    import ssl

    from dbproxy.engines.vnc import rfb

    since = env.mark()
    with socket.create_connection(("127.0.0.1", env.port), timeout=20) as s:
        assert _recv(s, 12) == b"RFB 003.008\n"
        s.sendall(b"RFB 003.008\n")
        types = _recv(s, _recv(s, 1)[0])
        assert rfb.SEC_VENCRYPT in types
        s.sendall(bytes([rfb.SEC_VENCRYPT]))
        assert _recv(s, 2) == b"\x00\x02"
        s.sendall(b"\x00\x02")
        assert _recv(s, 1) == b"\x00"
        subs = _recv(s, 4 * _recv(s, 1)[0])
        assert subs == rfb.encode_u32(rfb.VENCRYPT_X509PLAIN)
        s.sendall(subs)
        assert _recv(s, 1) == b"\x01"
        ctx = ssl.create_default_context(cafile=str(env.workdir / "ca" / "ca.crt"))
        with ctx.wrap_socket(s, server_hostname="localhost") as t:
            t.sendall(rfb.encode_plain("desk-1", "not-a-token"))
            assert _recv(t, 4) == b"\x00\x00\x00\x01"
            reason = _recv(t, int.from_bytes(_recv(t, 4), "big")).decode()
    assert "token was not accepted" in reason, reason
    env.wait(lambda evs: any(e["event"] == "desktop.session.start" and not e["success"] for e in evs), since=since)
