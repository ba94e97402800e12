"""Redfish through the proxy: curl and the OpenStack ``sushy`` client in front of a real sushy-emulator.

The BMC is sushy-tools' emulator with its fake driver and Basic auth over an
htpasswd file (``scripts/peers/sushy.py``, which also adds the Redfish
SessionService sushy-tools lacks); only the proxy knows its password.  The
proxy listens on HTTPS; curl reaches ``https://bmc-<x>.bmc.test`` with
``--connect-to`` (the Host header's first label names the BMC), the sushy
client a listener that serves one BMC.  Power changes land 1–11 s after a
Reset (the fake driver's delay): the tests poll the emulator directly.
Every test checks the audit trail.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from scripts.peers import refused_port
from scripts.peers.certs import make_ca, make_cert
from tests.support import ProxyProcess, dbproxy_cli, peer_missing, read_audit, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SYSTEM = "27946b59-9e44-4fa7-8e91-f3527a1ef094"
SYSTEM_PATH = f"/redfish/v1/Systems/{SYSTEM}"
RESET_PATH = f"{SYSTEM_PATH}/Actions/ComputerSystem.Reset"
READ_RULE = {"methods": ["GET", "HEAD"], "paths": ["/redfish/v1", "/redfish/v1/*"]}


@pytest.fixture(scope="module")
def bmc(tmp_path_factory):
    try:
        import sushy_tools  # noqa: F401
    except ImportError:
        peer_missing("sushy-tools (scripts/install/redfish.sh)")
    from scripts.peers.sushy import start_sushy

    server = start_sushy(tmp_path_factory.mktemp("sushy"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def rf(bmc, tmp_path_factory):
    if shutil.which("curl") is None:
        peer_missing("curl (scripts/install/http.sh)")
    workdir = tmp_path_factory.mktemp("redfishproxy")
    dbproxy_cli("token", "keygen", "--algorithm", "EdDSA", "--key-file", str(workdir / "token.key"),
                "--public-key-file", str(workdir / "token.pub"), check=True)
    ca = make_ca(workdir / "pki")
    cert, key = make_cert(workdir / "pki", ca, "proxy", sans=("*.bmc.test", "localhost", "127.0.0.1"))
    down_port = refused_port()  # nothing listens there: that BMC is down

    from scripts.peers.sushy import start_sushy

    # A second emulator, for the test that takes its BMC down mid-session.
    doomed = start_sushy(workdir / "doomed")

    def backend(method: str, address: str = bmc.address) -> dict:
        return {"address": address, "auth": {"method": method, "username": bmc.username,
                                             "password_file": str(bmc.password_file)}}

    reset = {"ComputerSystem.Reset": {"ResetType": ["On", "GracefulShutdown", "GracefulRestart"]}}
    config = {
        "identity": {"token": {"algorithm": "EdDSA", "key_file": "token.key", "public_key_file": "token.pub",
                               "registry_file": "tokens.json", "revocation_file": "revoked.txt",
                               "leeway_seconds": 0}},
        "roles": {
            "reader": {"routes": ["*"], "bmcs": ["bmc-*", "gone-*"], "redfish": [READ_RULE]},
            "operator": {"routes": ["*"], "bmcs": ["bmc-*"], "redfish": [
                READ_RULE,
                {"methods": ["PATCH"], "paths": ["/redfish/v1/Systems/*"]},
                {"actions": reset, "paths": ["/redfish/v1/Systems/*"]},
            ]},
            "other": {"routes": ["*"], "bmcs": ["other-*"], "redfish": [READ_RULE]},
        },
        "listeners": [
            {"name": "rf", "protocol": "redfish", "kind": "http", "listen": "127.0.0.1:0",
             "tls": {"cert_file": str(cert), "key_file": str(key)}, "auth": {"methods": ["token"]},
             "routes": [
                 {"name": "session", "match": {"target": "bmc-s*"}, "backend": backend("session")},
                 {"name": "basic", "match": {"target": "bmc-b*"}, "backend": backend("basic")},
                 {"name": "down", "match": {"target": "bmc-down"},
                  "backend": backend("basic", f"127.0.0.1:{down_port}")},
                 {"name": "wrong-basic", "match": {"target": "bmc-wrongb"},
                  "backend": {**backend("basic"), "auth": {"method": "basic", "username": bmc.username,
                                                           "password_env": "WRONG_BMC_PASSWORD"}}},
                 {"name": "wrong-session", "match": {"target": "bmc-wrongs"},
                  "backend": {**backend("session"), "auth": {"method": "session", "username": bmc.username,
                                                             "password_env": "WRONG_BMC_PASSWORD"}}},
                 {"name": "doomed", "match": {"target": "gone-*"},
                  "backend": {"address": doomed.address, "auth": {
                      "method": "basic", "username": doomed.username, "password_file": str(doomed.password_file)}}},
             ]},
            {"name": "one", "protocol": "redfish", "kind": "http", "listen": "127.0.0.1:0", "target": "bmc-s9",
             "tls": {"cert_file": str(cert), "key_file": str(key)}, "auth": {"methods": ["token"]},
             "routes": [{"name": "session", "match": {"target": "bmc-s*"}, "backend": backend("session")}]},
        ],
        "audit": {"sinks": [{"type": "jsonl", "path": "audit.jsonl"}]},
    }
    proc = ProxyProcess(workdir, config, env={"WRONG_BMC_PASSWORD": "not-the-bmc-password"}).start()
    proc.ca = str(ca[0])
    proc.audit_path = workdir / "audit.jsonl"
    proc.bmc = bmc
    proc.doomed = doomed
    proc.tokens = {}
    for user, role in (("olga", "operator"), ("rita", "reader"), ("oscar", "other")):
        p = dbproxy_cli("token", "issue", "--config", str(proc.config_path), "--user", user, "--roles", role,
                        "--ttl", "1h", check=True)
        proc.tokens[role] = p.stdout.strip()
    proc.seen: list[str] = []  # everything a client received: no BMC secret may be in it
    yield proc
    proc.stop()
    doomed.stop()


def curl(rf, *args: str, host: str = "bmc-s1", token: str | None = None, role: str = "operator",
         basic_user: str | None = None) -> tuple[int, dict, dict | str]:
    """One curl request; (status, headers, parsed body).  ``token``/``role``: the Bearer token."""
    port = rf.port("rf")
    token = token if token is not None else rf.tokens[role]
    auth = ["-u", f"{basic_user}:{token}"] if basic_user is not None else ["-H", f"Authorization: Bearer {token}"]
    if token == "":
        auth = []
    url_args = [a.replace("URL", f"https://{host}.bmc.test:{port}") for a in args]
    p = subprocess.run(["curl", "-sS", "--cacert", rf.ca, "--connect-to", f"::127.0.0.1:{port}", "-D", "-",
                        *auth, *url_args], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    rf.seen.append(p.stdout)
    head, _, body = p.stdout.replace("\r\n", "\n").partition("\n\n")
    while head.startswith("HTTP/1.1 100"):
        head, _, body = body.partition("\n\n")
    lines = head.split("\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    try:
        parsed = json.loads(body) if body else ""
    except ValueError:
        parsed = body
    return status, headers, parsed


def events(rf, kind: str | None = None) -> list[dict]:
    evs = read_audit(rf.audit_path)
    return [e for e in evs if kind is None or e["event"] == kind]


def wait_event(rf, predicate, timeout: float = 10.0) -> dict:
    found: list[dict] = []

    def check() -> bool:
        found[:] = [e for e in read_audit(rf.audit_path) if predicate(e)]
        return bool(found)

    wait_until(check, timeout=timeout, what="audit event")
    return found[-1]


def _is_redfish_error(body, code: str) -> None:
    assert isinstance(body, dict) and body["error"]["code"] == code, body
    assert body["error"]["message"]
    assert body["error"]["@Message.ExtendedInfo"][0]["MessageId"] == code


# --------------------------------------------------------------------------- reads


def test_reads_with_curl_bearer_and_basic_token(rf):
    status, headers, body = curl(rf, "URL/redfish/v1/Systems")
    assert status == 200 and body["Members"] == [{"@odata.id": SYSTEM_PATH}]
    status, _, body = curl(rf, f"URL{SYSTEM_PATH}", role="reader", basic_user="rita")
    assert status == 200 and body["Id"] == SYSTEM and body["PowerState"] in ("On", "Off")
    # The basic-auth route: the proxy sends Basic credentials to the BMC.
    status, _, body = curl(rf, "URL/redfish/v1/Systems", host="bmc-b1", role="reader")
    assert status == 200 and body["Members@odata.count"] == 1
    req = wait_event(rf, lambda e: e["event"] == "bmc.redfish.request" and e["user"] == "rita"
                     and e["path"] == SYSTEM_PATH)
    assert req["verdict"] == "allowed" and req["method"] == "GET" and req["target"] == "bmc-s1"
    assert req["login"] == rf.bmc.username and req["protocol"] == "redfish"
    resp = wait_event(rf, lambda e: e["event"] == "bmc.redfish.response" and e["sid"] == req["sid"])
    assert resp["status"] == 200 and resp["request_id"] == req["request_id"]
    start = wait_event(rf, lambda e: e["event"] == "bmc.redfish.session.start" and e["sid"] == req["sid"])
    assert start["success"] is True and start["granted_roles"] == ["reader"] and start["bmc_auth"] == "session"


def test_keepalive_several_requests_on_one_connection(rf):
    port = rf.port("rf")
    ctx = ssl.create_default_context(cafile=rf.ca)
    # http.client would check the certificate against 127.0.0.1; the BMC's name goes in the Host header.
    ctx.check_hostname = False
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=20)
    paths = ["/redfish/v1", "/redfish/v1/Systems", SYSTEM_PATH, "/redfish/v1/Managers", "/redfish/v1/Chassis"]
    sockets = set()
    for path in paths:
        conn.request("GET", path, headers={"Host": f"bmc-s2.bmc.test:{port}",
                                           "Authorization": f"Bearer {rf.tokens['reader']}"})
        resp = conn.getresponse()
        body = resp.read()
        rf.seen.append(str(resp.getheaders()) + body.decode())
        assert resp.status == 200, body
        assert json.loads(body)["@odata.id"].rstrip("/") == path.rstrip("/")
        sockets.add(id(conn.sock))
    conn.close()
    assert len(sockets) == 1  # one connection all along
    end = wait_event(rf, lambda e: e["event"] == "bmc.redfish.session.end" and e["target"] == "bmc-s2")
    assert end["http_requests"] == len(paths) and end["requests_forwarded"] == len(paths)
    starts = [e for e in events(rf, "bmc.redfish.session.start") if e["sid"] == end["sid"]]
    assert len(starts) == 1


def test_sushy_client_reads_and_resets_power(rf, bmc):
    import sushy
    from sushy import auth as sushy_auth

    port = rf.port("one")
    root = sushy.Sushy(f"https://localhost:{port}/redfish/v1", verify=rf.ca,
                       auth=sushy_auth.BasicAuth(username="olga", password=rf.tokens["operator"]))
    system = root.get_system(SYSTEM_PATH)
    assert system.identity == SYSTEM
    # sushy's default auth tries a Redfish session first: the proxy refuses it (403), sushy falls back to Basic.
    default = sushy.Sushy(f"https://localhost:{port}/redfish/v1", verify=rf.ca, username="olga",
                          password=rf.tokens["operator"])
    assert default.get_system(SYSTEM_PATH).identity == SYSTEM
    before = bmc.power_state()
    wanted = "Off" if before == "On" else "On"
    reset = sushy.RESET_GRACEFUL_SHUTDOWN if before == "On" else sushy.RESET_ON
    system.reset_system(reset)
    wait_until(lambda: bmc.power_state() == wanted, timeout=20, what=f"power {wanted}")
    req = wait_event(rf, lambda e: e["event"] == "bmc.redfish.request" and e.get("action") == "ComputerSystem.Reset"
                     and e["verdict"] == "allowed")
    assert req["parameters"] == {"ResetType": "GracefulShutdown" if before == "On" else "On"}
    assert req["target"] == "bmc-s9" and req["user"] == "olga"
    resp = wait_event(rf, lambda e: e["event"] == "bmc.redfish.response" and e["sid"] == req["sid"]
                      and e["request_id"] == req["request_id"])
    assert resp["status"] == 204 and resp["success"] is True


def test_reset_refused_by_role_and_by_parameter_leaves_power_alone(rf, bmc):
    before = bmc.power_state()
    log_before = bmc.log_text().count("ComputerSystem.Reset")
    # The reader may not reset at all.
    status, _, body = curl(rf, "-X", "POST", "-H", "Content-Type: application/json", "-d",
                           '{"ResetType": "ForceOff"}', f"URL{RESET_PATH}", role="reader")
    assert status == 403
    _is_redfish_error(body, "Base.1.0.InsufficientPrivilege")
    # The operator may, but not ForceOff, nor with a parameter the rule does not list.
    for payload in ('{"ResetType": "ForceOff"}', '{"ResetType": "On", "Extra": 1}'):
        status, _, body = curl(rf, "-X", "POST", "-H", "Content-Type: application/json", "-d", payload,
                               f"URL{RESET_PATH}", role="operator")
        assert status == 403
        _is_redfish_error(body, "Base.1.0.InsufficientPrivilege")
    # A body that is not JSON: 400, not forwarded.
    status, _, body = curl(rf, "-X", "POST", "-d", "ResetType=On", f"URL{RESET_PATH}", role="operator")
    assert status == 400 and body["error"]["code"] == "Base.1.0.MalformedJSON"
    wait_event(rf, lambda e: e["event"] == "bmc.redfish.request" and e.get("reason") == "bad_action_body")
    denied = [e for e in events(rf, "bmc.redfish.request") if e.get("action") == "ComputerSystem.Reset"
              and e["verdict"] == "denied"]
    assert {(e["user"], e["reason"], e["status"]) for e in denied} >= {
        ("rita", "no_rule", 403), ("olga", "parameter_not_allowed", 403), ("olga", "bad_action_body", 400)}
    assert any(e.get("parameters") == {"ResetType": "ForceOff"} for e in denied)
    # Nothing reached the BMC: no Reset in its log, and the power state holds past the fake driver's delay.
    time.sleep(12)
    assert bmc.log_text().count("ComputerSystem.Reset") == log_before
    assert bmc.power_state() == before


def test_patch_allowed_and_refused_by_role(rf, bmc):
    _, _, system = bmc.request("GET", SYSTEM_PATH)
    wanted = "Blinking" if system.get("IndicatorLED") != "Blinking" else "Lit"
    status, _, body = curl(rf, "-X", "PATCH", "-H", "Content-Type: application/json", "-d",
                           json.dumps({"IndicatorLED": wanted}), f"URL{SYSTEM_PATH}", role="reader")
    assert status == 403
    _is_redfish_error(body, "Base.1.0.InsufficientPrivilege")
    assert bmc.request("GET", SYSTEM_PATH)[2].get("IndicatorLED") != wanted
    status, _, body = curl(rf, "-X", "PATCH", "-H", "Content-Type: application/json", "-d",
                           json.dumps({"IndicatorLED": wanted}), f"URL{SYSTEM_PATH}", role="operator")
    assert status in (200, 204), body
    assert bmc.request("GET", SYSTEM_PATH)[2].get("IndicatorLED") == wanted
    wait_event(rf, lambda e: e["event"] == "bmc.redfish.request" and e["method"] == "PATCH" and e["user"] == "olga")
    patched = [e for e in events(rf, "bmc.redfish.request") if e["method"] == "PATCH"]
    assert {(e["user"], e["verdict"]) for e in patched} == {("rita", "denied"), ("olga", "allowed")}
    assert all(e["properties"] == ["IndicatorLED"] for e in patched)


def test_bmc_sessions_and_accounts_are_refused(rf, bmc):
    assert curl(rf, "URL/redfish/v1/Systems")[0] == 200  # the proxy's own BMC session exists from here
    sessions_before = bmc.sessions()
    status, _, body = curl(rf, "-X", "POST", "-H", "Content-Type: application/json", "-d",
                           json.dumps({"UserName": bmc.username, "Password": "guess"}),
                           "URL/redfish/v1/SessionService/Sessions", role="operator")
    assert status == 403
    _is_redfish_error(body, "Base.1.0.InsufficientPrivilege")
    for path in ("/redfish/v1/SessionService/Sessions", "/redfish/v1/AccountService/Accounts",
                 "/redfish/v1/Systems/../SessionService", "/redfish/v1/%2e%2e/AccountService"):
        status, _, body = curl(rf, "--path-as-is", f"URL{path}", role="operator")
        assert status in (400, 403), (path, body)
    # $expand would inline the linked sessions and accounts into a resource the rules allow.
    status, _, body = curl(rf, "-g", "URL/redfish/v1?$expand=*($levels=2)", role="operator")
    assert status == 400 and body["error"]["code"] == "Base.1.0.QueryNotSupported"
    assert bmc.sessions() == sessions_before
    wait_event(rf, lambda e: e["event"] == "bmc.redfish.request" and e.get("reason") == "query_not_allowed")
    wait_event(rf, lambda e: e["event"] == "bmc.redfish.request" and e.get("reason") == "bad_path")
    reasons = {e["reason"] for e in events(rf, "bmc.redfish.request") if e["verdict"] == "denied"}
    assert {"protected_resource", "bad_path"} <= reasons


# --------------------------------------------------------------------------- refusals before a session


def test_wrong_missing_and_expired_tokens_get_401(rf):
    expired = dbproxy_cli("token", "issue", "--config", str(rf.config_path), "--user", "olga", "--roles", "operator",
                          "--ttl", "1s", check=True).stdout.strip()
    time.sleep(1.5)
    forged = rf.tokens["operator"][:-4] + ("AAAA" if not rf.tokens["operator"].endswith("AAAA") else "BBBB")
    for token, reason in ((expired, "token_expired"), (forged, "token_bad_signature"), ("", "no_credentials"),
                          ("not-a-token", "token_malformed")):
        status, headers, body = curl(rf, "URL/redfish/v1/Systems", token=token)
        assert status == 401, (reason, body)
        _is_redfish_error(body, "Base.1.0.NoValidSession")
        assert headers["www-authenticate"].startswith("Basic realm=\"dbproxy\"")
        wait_event(rf, lambda e: e["event"] == "bmc.redfish.session.start" and e["success"] is False
                   and e.get("reason") == reason)
    # Basic with the token as password but another user's name.
    status, _, body = curl(rf, "URL/redfish/v1/Systems", role="operator", basic_user="mallory")
    assert status == 401
    for token in (expired, forged):
        assert token not in rf.audit_path.read_text()


def test_token_revoked_mid_connection_is_401_on_the_next_request(rf):
    token = dbproxy_cli("token", "issue", "--config", str(rf.config_path), "--user", "rita", "--roles", "reader",
                        "--ttl", "1h", check=True).stdout.strip()
    ctx = ssl.create_default_context(cafile=rf.ca)
    ctx.check_hostname = False
    conn = http.client.HTTPSConnection("127.0.0.1", rf.port("rf"), context=ctx, timeout=30)
    headers = {"Host": "bmc-s5.bmc.test", "Authorization": f"Bearer {token}"}
    conn.request("GET", "/redfish/v1/Systems", headers=headers)
    first = conn.getresponse()
    assert first.status == 200
    first.read()
    dbproxy_cli("token", "revoke", "--config", str(rf.config_path), token, check=True)
    conn.request("GET", "/redfish/v1/Systems", headers=headers)
    second = conn.getresponse()
    body = json.loads(second.read())
    conn.close()
    assert second.status == 401
    _is_redfish_error(body, "Base.1.0.NoValidSession")
    denied = wait_event(rf, lambda e: e["event"] == "bmc.redfish.request" and e["target"] == "bmc-s5"
                        and e["verdict"] == "denied")
    assert denied["reason"] == "token_revoked" and denied["request_id"] == 2 and denied["status"] == 401


def test_role_without_the_bmc_and_unknown_bmc(rf):
    status, _, body = curl(rf, "URL/redfish/v1/Systems", role="other")
    assert status == 403
    _is_redfish_error(body, "Base.1.0.InsufficientPrivilege")
    denial = wait_event(rf, lambda e: e["event"] == "bmc.redfish.session.access_denied" and e["user"] == "oscar")
    assert denial["reason"] == "no_role_allows"
    status, _, body = curl(rf, "URL/redfish/v1/Systems", host="nosuch-1")
    assert status == 404 and body["error"]["code"] == "Base.1.0.ResourceMissingAtURI"


def test_bmc_down_is_502_and_audited(rf, bmc):
    status, _, body = curl(rf, "URL/redfish/v1/Systems", host="bmc-down")
    assert status == 502
    _is_redfish_error(body, "Base.1.0.ServiceTemporarilyUnavailable")
    start = wait_event(rf, lambda e: e["event"] == "bmc.redfish.session.start" and e.get("target") == "bmc-down")
    assert start["success"] is False and start["reason"] == "bmc_connect"


def test_bmc_refusing_the_proxys_login_is_502_not_401(rf):
    # The client's token is good; the BMC refuses the proxy's own credential: a 502 (the client cannot fix
    # it by logging in again), and the BMC's WWW-Authenticate challenge does not reach the client.
    for host, where in (("bmc-wrongb", "bmc.redfish.response"), ("bmc-wrongs", "bmc.redfish.session.start")):
        status, headers, body = curl(rf, "URL/redfish/v1/Systems", host=host, role="reader")
        assert status == 502, (host, body)
        _is_redfish_error(body, "Base.1.0.ServiceTemporarilyUnavailable")
        assert "the BMC refused the proxy's login" in body["error"]["message"]
        assert "www-authenticate" not in headers
        event = wait_event(rf, lambda e: e["event"] == where and e["target"] == host)
        assert event["success"] is False
    start = wait_event(rf, lambda e: e["event"] == "bmc.redfish.session.start" and e["target"] == "bmc-wrongs")
    assert start["reason"] == "bmc_auth" and "Incorrect username or password" in start["error"]


# --------------------------------------------------------------------------- the proxy's BMC session


def test_bmc_session_recreated_after_it_was_deleted_behind_the_proxys_back(rf, bmc):
    status, _, _ = curl(rf, "URL/redfish/v1/Systems", host="bmc-s3", role="reader")
    assert status == 200
    before = bmc.sessions()
    assert before, "the proxy holds a Redfish session on the BMC"
    for uri in before:
        assert bmc.request("DELETE", uri)[0] == 204
    assert bmc.sessions() == []
    # The next request (a new connection; the route's session is shared) still succeeds.
    status, headers, body = curl(rf, f"URL{SYSTEM_PATH}", host="bmc-s3", role="reader")
    assert status == 200 and body["Id"] == SYSTEM
    after = bmc.sessions()
    assert len(after) == 1 and after[0] not in before
    assert not any(k in headers for k in ("x-auth-token", "set-cookie"))
    assert bmc.address not in json.dumps(body)


def test_bmc_going_down_mid_session_is_502_and_audited(rf):
    port = rf.port("rf")
    ctx = ssl.create_default_context(cafile=rf.ca)
    ctx.check_hostname = False
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=30)
    headers = {"Host": "gone-1.bmc.test", "Authorization": f"Bearer {rf.tokens['reader']}"}
    conn.request("GET", "/redfish/v1/Systems", headers=headers)
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    resp.read()
    rf.doomed.stop()
    conn.request("GET", "/redfish/v1/Systems", headers=headers)
    resp = conn.getresponse()
    body = json.loads(resp.read())
    conn.close()
    assert resp.status == 502
    _is_redfish_error(body, "Base.1.0.ServiceTemporarilyUnavailable")
    failed = wait_event(rf, lambda e: e["event"] == "bmc.redfish.response" and e["target"] == "gone-1"
                        and e["status"] == 502)
    assert failed["success"] is False and failed["request_id"] == 2
    assert rf.doomed.address not in body["error"]["message"]


def test_chunked_patch_streams_to_a_basic_auth_bmc(rf, bmc):
    # A body of unknown length (chunked) on the Basic route is streamed to the BMC, not held.
    _, _, system = bmc.request("GET", SYSTEM_PATH)
    wanted = "Off" if system.get("IndicatorLED") != "Off" else "Lit"
    status, _, body = curl(rf, "-X", "PATCH", "-H", "Content-Type: application/json", "-H",
                           "Transfer-Encoding: chunked", "-d", json.dumps({"IndicatorLED": wanted}),
                           f"URL{SYSTEM_PATH}", host="bmc-b2", role="operator")
    assert status in (200, 204), body
    assert bmc.request("GET", SYSTEM_PATH)[2].get("IndicatorLED") == wanted


def test_head_then_get_on_one_connection(rf):
    out = subprocess.run(["curl", "-sS", "--cacert", rf.ca, "--connect-to", f"::127.0.0.1:{rf.port('rf')}",
                          "-H", f"Authorization: Bearer {rf.tokens['reader']}", "-I", "-w", "%{num_connects}\n",
                          f"https://bmc-s4.bmc.test:{rf.port('rf')}{SYSTEM_PATH}", "--next",
                          "--cacert", rf.ca, "--connect-to", f"::127.0.0.1:{rf.port('rf')}", "-H", f"Authorization: Bearer {rf.tokens['reader']}", "-w", "\n%{num_connects}",
                          f"https://bmc-s4.bmc.test:{rf.port('rf')}{SYSTEM_PATH}"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rf.seen.append(out.stdout)
    assert out.stdout.startswith("HTTP/1.1 200")
    assert out.stdout.rstrip().endswith("\n0")  # the GET reused the HEAD's connection
    assert f'"Id": "{SYSTEM}"' in out.stdout or f'"Id":"{SYSTEM}"' in out.stdout


def test_no_bmc_secret_reached_a_client_the_audit_or_the_log(rf, bmc):
    """Last in the file: everything the clients above received, the audit trail and the proxy's log."""
    tokens = bmc.issued_tokens()
    assert tokens, "the proxy logged in to the BMC with Redfish sessions"
    wait_event(rf, lambda e: e["event"] == "bmc.redfish.session.end")
    blob = "\n".join(rf.seen) + rf.audit_path.read_text() + rf.log_text()
    assert rf.seen  # what the clients of the tests before this one received
    assert bmc.password not in blob
    assert base64.b64encode(f"{bmc.username}:{bmc.password}".encode()).decode() not in blob
    for token in tokens:
        assert token not in blob
    assert "x-auth-token" not in blob.lower() and "set-cookie" not in blob.lower()
    for token in rf.tokens.values():
        assert token not in rf.audit_path.read_text() and token.split(".")[2] not in rf.log_text()
