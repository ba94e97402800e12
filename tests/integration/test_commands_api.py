"""The command-template API end to end: a real ``dbproxy serve``, a real OpenSSH sshd as the target,
curl and httpx as clients, and the audit trail the proxy wrote.

The target runs on this machine (``scripts/peers/sshd.py``, as the test user), so a test can look
at what the command did (a canary file that an injection would create, a process a timeout must
have killed) directly.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.conftest import require_binary
from tests.support import ROOT, ProxyProcess, read_audit, wait_until

pytestmark = pytest.mark.integration

# An unusual duration, new each run: pgrep finds exactly this run's sleep on the target.
SLEEP_MARK = f"{uuid.uuid4().int % 900_000 + 100_000}.25"


def _cli(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    e = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {}))
    p = subprocess.run([sys.executable, "-m", "dbproxy.cli", *args], capture_output=True, text=True, env=e, timeout=60)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def _templates(files: Path) -> dict:
    return {
        # Strict: a word of letters, digits, '_' and '.'.
        "echo-word": {"description": "print one word", "argv": ["printf", "[%s]\\n", {"param": "word"}],
                      "params": {"word": {"type": "string", "pattern": "[A-Za-z0-9_.]+", "required": True}},
                      "targets": ["web-*"], "scopes": ["demo.run"]},
        # Lax on purpose (any printable ASCII): shell syntax passes validation and must stay inert.
        "echo-text": {"description": "print any text", "argv": ["printf", "[%s]\\n", {"param": "text"}],
                      "params": {"text": {"type": "string", "pattern": "[ -~]{1,200}", "required": True}},
                      "targets": ["web-*"], "scopes": ["demo.run"]},
        "list-dir": {"argv": ["ls", "-1", {"flag": "-a", "when": "all"}, "--", {"param": "dir"}],
                     "params": {"dir": {"type": "path", "under": [str(files)], "required": True},
                                "all": {"type": "bool", "default": False}},
                     "targets": ["web-*"], "scopes": ["disk.read"]},
        "head-lines": {"argv": ["head", {"param": "n", "prefix": "-n"}, "--", {"param": "file"}],
                       "params": {"n": {"type": "int", "minimum": 1, "maximum": 100, "default": 2},
                                  "file": {"type": "path", "under": [str(files)], "required": True}},
                       "targets": ["web-*"], "scopes": ["disk.read"]},
        "color": {"argv": ["printf", "%s\\n", {"param": "color"}],
                  "params": {"color": {"type": "enum", "values": ["red", "green"], "required": True}},
                  "targets": ["web-*"], "scopes": ["demo.run"]},
        "greet": {"argv": ["sh", "-c", "printf '%s\\n' \"$GREETING\""], "env": {"GREETING": "greeting"},
                  "params": {"greeting": {"type": "string", "pattern": "[ -~]{1,400}", "required": True}},
                  "targets": ["web-*"], "scopes": ["demo.run"]},
        "pause": {"argv": ["sleep", {"param": "seconds"}],
                  "params": {"seconds": {"type": "string", "pattern": "[0-9]+(\\.[0-9]+)?", "required": True}},
                  "timeout_seconds": 30, "targets": ["web-*", "down-*"], "scopes": ["demo.run"]},
        "pause-short": {"argv": ["sleep", {"param": "seconds"}],
                        "params": {"seconds": {"type": "string", "pattern": "[0-9]+(\\.[0-9]+)?", "required": True}},
                        "timeout_seconds": 1.5, "targets": ["web-*"], "scopes": ["demo.run"]},
        "flood": {"argv": ["yes", "dbproxy-flood"], "output_limit_bytes": 1000, "timeout_seconds": 20,
                  "targets": ["web-*"], "scopes": ["demo.run"]},
        "admin-only": {"argv": ["id"], "targets": ["*"], "scopes": ["demo.admin"]},
    }


@pytest.fixture(scope="module")
def api(sshd, tmp_path_factory):
    require_binary("curl")
    from scripts.peers import refused_port

    workdir = tmp_path_factory.mktemp("cmdapi")
    files = workdir / "files"
    files.mkdir()
    (files / "alpha.txt").write_text("line one\nline two\nline three\n")
    (files / ".hidden").write_text("")
    (workdir / "recordings").mkdir()
    _cli("token", "keygen", "--algorithm", "EdDSA", "--key-file", str(workdir / "token.key"),
         "--public-key-file", str(workdir / "token.pub"))
    backend = {"address": sshd.address, "login": sshd.login,
               "auth": {"method": "publickey", "key_file": str(sshd.client_key)},
               "host_key": {"known_hosts_file": str(sshd.known_hosts)}}
    config = {
        "identity": {"token": {"algorithm": "EdDSA", "key_file": "token.key", "public_key_file": "token.pub"}},
        "roles": {
            "ops": {"routes": ["*"], "targets": ["web-*", "down-*"], "logins": [sshd.login],
                    "scopes": ["demo.run", "disk.read", "audit.read"]},
            "reader": {"routes": ["*"], "targets": ["web-*"], "logins": [sshd.login], "scopes": ["disk.read"]},
            # Scopes but no target: the role grants no host.
            "elsewhere": {"routes": ["*"], "targets": ["db-*"], "logins": [sshd.login], "scopes": ["demo.run"]},
        },
        "listeners": [{
            "name": "api", "protocol": "ssh-commands", "kind": "http", "listen": "127.0.0.1:0",
            "auth": {"methods": ["token"]},
            "commands": {"max_jobs_per_caller": 3, "max_commands_per_target": 2, "recording_dir": "recordings"},
            "templates": _templates(files),
            "routes": [
                {"name": "web", "match": {"target": "web-*"}, "backend": backend},
                {"name": "down", "match": {"target": "down-*"},
                 "backend": {**backend, "address": f"127.0.0.1:{refused_port()}"}},
            ],
        }],
        "audit": {"sinks": [{"type": "jsonl", "path": "audit.jsonl"}]},
    }
    # The same API over HTTPS (the core's TLS on the http listener).
    from scripts.peers.certs import make_ca, make_cert

    ca = make_ca(workdir / "pki")
    cert, key = make_cert(workdir / "pki", ca, "localhost")
    config["listeners"].append({**config["listeners"][0], "name": "api-tls",
                                "tls": {"cert_file": str(cert), "key_file": str(key)}})
    proc = ProxyProcess(workdir, config, name="proxy").start()
    proc.url = f"http://127.0.0.1:{proc.port('api')}"
    proc.tls_url = f"https://localhost:{proc.port('api-tls')}"
    proc.ca_file = str(ca[0])
    proc.audit_path = workdir / "audit.jsonl"
    proc.files = files
    proc.workdir = workdir

    def issue(user: str, roles: str) -> str:
        return _cli("token", "issue", "--config", str(proc.config_path), "--user", user, "--roles", roles,
                    "--ttl", "1h").stdout.strip()

    proc.token = issue("alice", "ops")
    proc.reader_token = issue("rita", "reader")
    proc.elsewhere_token = issue("eve", "elsewhere")
    proc.issue = issue
    yield proc
    proc.stop()


def client(api, token: str | None = None) -> httpx.Client:
    headers = {"authorization": f"Bearer {token or api.token}"}
    return httpx.Client(base_url=api.url, headers=headers, timeout=30)


def execute(api, template: str, params: dict | None = None, *, targets=("web-1",), token: str | None = None,
            wait: bool = True) -> httpx.Response:
    with client(api, token) as c:
        return c.post("/execute", json={"template": template, "targets": list(targets), "params": params or {},
                                        "wait": wait})


def curl(api, *args: str, token: str | None = None) -> subprocess.CompletedProcess:
    auth = ["-H", f"Authorization: Bearer {token or api.token}"] if token != "" else []
    return subprocess.run(["curl", "-sS", "-w", "\\n%{http_code}", *auth, *args], capture_output=True, text=True,
                          timeout=60)


def curl_json(p: subprocess.CompletedProcess) -> tuple[int, dict]:
    body, _, code = p.stdout.rpartition("\n")
    return int(code), json.loads(body)


def audit_events(api, condition, timeout: float = 15.0) -> list[dict]:
    box: list[dict] = []

    def check():
        box[:] = read_audit(api.audit_path)
        return condition(box)

    wait_until(check, timeout=timeout, what="audit condition")
    return box


def job_events(api, job_id: str, count: int) -> list[dict]:
    return [e for e in audit_events(api, lambda es: sum(e.get("job_id") == job_id for e in es) >= count)
            if e.get("job_id") == job_id]


def sleeping(mark: str) -> bool:
    # Anchored: the target's shell line holds "sleep MARK" too until it execs the command.
    return subprocess.run(["pgrep", "-f", f"^sleep {mark}$"], capture_output=True).returncode == 0


# ------------------------------------------------------------------------------------ the server


def test_healthz_with_curl_no_token(api):
    code, doc = curl_json(curl(api, f"{api.url}/healthz", token=""))
    assert code == 200 and doc["status"] == "ok"


def test_openapi_document_validates_and_docs_page(api):
    from openapi_spec_validator import validate

    with httpx.Client(base_url=api.url) as c:
        doc = c.get("/openapi.json").json()
        page = c.get("/docs")
    validate(doc)
    assert doc["openapi"].startswith("3.1")
    assert "echo-word" in doc["components"]["schemas"]["ExecuteRequest"]["properties"]["template"]["enum"]
    assert {"/commands", "/execute", "/jobs/{id}", "/jobs/{id}/cancel", "/audit/logs", "/healthz"} <= set(doc["paths"])
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/execute" in page.text and "echo-word" in page.text
    # Interactive, with our one inline script only: the CSP pins its hash, requests stay on this origin.
    import base64
    import hashlib
    import re

    scripts = re.findall(r"<script>(.*?)</script>", page.text, re.S)
    assert len(scripts) == 1 and "<script src" not in page.text and "<link" not in page.text
    csp = page.headers["content-security-policy"]
    digest = base64.b64encode(hashlib.sha256(scripts[0].encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in csp and "connect-src 'self'" in csp and "default-src 'none'" in csp
    assert 'data-kind="execute" data-template="echo-word"' in page.text and 'data-kind="get"' in page.text
    # The page's request builder, run by Node: the form values become exactly the API's request.
    node = shutil.which("node")
    assert node, "node (Debian nodejs) runs the page's script"
    harness = scripts[0] + """
const r = request("execute", {token: " T0K ", template: "echo-word", targets: "web-1, web-2,", path: "",
                              params: {word: "hi", count: "3", loud: "true", empty: ""},
                              types: {word: "string", count: "integer", loud: "boolean", empty: "string"}});
const g = request("get", {token: "T", path: "/audit/logs?user=alice", params: {}, types: {}});
let bad = null; try { request("get", {token: "T", path: "https://elsewhere/x", params: {}, types: {}}); } catch (e) { bad = String(e); }
console.log(JSON.stringify({r, g, bad}));
"""
    out = subprocess.run([node, "-e", harness], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["r"]["url"] == "/execute" and got["r"]["init"]["method"] == "POST"
    assert got["r"]["init"]["headers"]["Authorization"] == "Bearer T0K"
    assert json.loads(got["r"]["init"]["body"]) == {"template": "echo-word", "targets": ["web-1", "web-2"],
                                                    "params": {"word": "hi", "count": 3, "loud": True}, "wait": True}
    assert got["g"]["url"] == "/audit/logs?user=alice" and got["g"]["init"]["method"] == "GET"
    assert got["bad"] and "GET /commands" in got["bad"]


def test_commands_lists_what_the_caller_may_run(api):
    with client(api, api.reader_token) as c:
        names = {t["name"] for t in c.get("/commands").json()["commands"]}
    assert names == {"list-dir", "head-lines"}
    with client(api) as c:
        names = {t["name"] for t in c.get("/commands").json()["commands"]}
    assert "echo-word" in names and "admin-only" not in names


# ------------------------------------------------------------------------------------ auth


def test_no_token_is_401_with_bearer_challenge(api):
    p = curl(api, "-i", f"{api.url}/commands", token="")
    assert "401" in p.stdout.splitlines()[0]
    assert 'www-authenticate: bearer realm="dbproxy"' in p.stdout.lower()


def test_expired_token_is_refused_and_audited(api):
    from dbproxy.identity.keys import TokenKeys
    from dbproxy.identity.tokens import TokenCodec
    from dbproxy.token_cli import load_token_config

    cfg, _ = load_token_config(str(api.config_path))
    codec = TokenCodec(TokenKeys.from_config(cfg, need_signing=True))
    token, claims = codec.issue("alice", ["ops"], 60, now=time.time() - 3600)
    r = execute(api, "echo-word", {"word": "hi"}, token=token)
    assert r.status_code == 401
    assert "token_expired" in r.json()["error"]["message"]
    assert 'error="invalid_token"' in r.headers["www-authenticate"]
    evs = audit_events(api, lambda es: any(e["event"] == "command.denied" and e.get("reason") == "token_expired"
                                           for e in es))
    denied = [e for e in evs if e["event"] == "command.denied" and e.get("reason") == "token_expired"]
    assert denied[-1]["attempted_token_id"] == claims.jti
    assert token not in api.audit_path.read_text()


def test_missing_scope_is_403_and_nothing_runs(api):
    r = execute(api, "echo-word", {"word": "scopetest"}, token=api.reader_token)
    assert r.status_code == 403 and "demo.run" in r.json()["error"]["message"]
    r = execute(api, "admin-only", {}, token=api.token)
    assert r.status_code == 403 and "demo.admin" in r.json()["error"]["message"]
    evs = audit_events(api, lambda es: any(e["event"] == "command.denied" and e.get("reason") == "missing_scope"
                                           and e.get("user") == "rita" for e in es))
    assert not any(e["event"] == "command.start" and e.get("user") == "rita" for e in evs)


def test_role_without_the_target_is_403(api):
    r = execute(api, "echo-word", {"word": "x"}, token=api.elsewhere_token)
    assert r.status_code == 403 and "no role" in r.json()["error"]["message"]


# ------------------------------------------------------------------------------------ parameter types


def test_path_param_valid_and_bool_flag(api):
    r = execute(api, "list-dir", {"dir": str(api.files)}, token=api.reader_token)
    assert r.status_code == 200, r.text
    run = r.json()["targets"][0]
    assert run["status"] == "succeeded" and run["exit_status"] == 0
    assert run["stdout"].split() == ["alpha.txt"]
    r = execute(api, "list-dir", {"dir": str(api.files), "all": True}, token=api.reader_token)
    assert ".hidden" in r.json()["targets"][0]["stdout"].split()


@pytest.mark.parametrize("value", ["/etc", "relative/dir", "{files}/../..", "{files}/./x", "{files}//x", "{files} x"])
def test_path_param_invalid(api, value):
    r = execute(api, "list-dir", {"dir": value.format(files=api.files)}, token=api.reader_token)
    assert r.status_code == 400 and r.json()["error"]["param"] == "dir"


def test_int_param_valid_default_and_invalid(api):
    r = execute(api, "head-lines", {"file": str(api.files / "alpha.txt"), "n": 1}, token=api.reader_token)
    assert r.json()["targets"][0]["stdout"] == "line one\n"
    r = execute(api, "head-lines", {"file": str(api.files / "alpha.txt")}, token=api.reader_token)
    assert r.json()["targets"][0]["stdout"] == "line one\nline two\n"  # the default, 2
    for bad in (0, 101, "3; id", True, 2.5):
        r = execute(api, "head-lines", {"file": str(api.files / "alpha.txt"), "n": bad}, token=api.reader_token)
        assert r.status_code == 400 and r.json()["error"]["param"] == "n", bad


def test_enum_param(api):
    r = execute(api, "color", {"color": "green"})
    assert r.json()["targets"][0]["stdout"] == "green\n"
    r = execute(api, "color", {"color": "blue"})
    assert r.status_code == 400 and "red, green" in r.json()["error"]["message"]


def test_string_param_valid_and_invalid(api):
    r = execute(api, "echo-word", {"word": "hello_1.2"})
    assert r.json()["targets"][0]["stdout"] == "[hello_1.2]\n"
    r = execute(api, "echo-word", {"word": "two words"})
    assert r.status_code == 400 and "pattern" in r.json()["error"]["message"]


def test_bool_param_invalid(api):
    r = execute(api, "list-dir", {"dir": str(api.files), "all": "yes"}, token=api.reader_token)
    assert r.status_code == 400 and r.json()["error"]["param"] == "all"


def test_required_and_unknown_params(api):
    r = execute(api, "echo-word", {})
    assert r.status_code == 400 and "required" in r.json()["error"]["message"]
    r = execute(api, "echo-word", {"word": "a", "extra": "b"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "extra"


def test_env_param_reaches_the_command_as_data(api):
    canary = api.workdir / "env-canary"
    r = execute(api, "greet", {"greeting": f"hi $(touch {canary}) `touch {canary}`; touch {canary}"})
    assert r.json()["targets"][0]["stdout"] == f"hi $(touch {canary}) `touch {canary}`; touch {canary}\n"
    assert not canary.exists()


# ------------------------------------------------------------------------------------ injection

INJECTIONS = {
    "semicolon": "x; touch {canary}",
    "and": "x && touch {canary}",
    "pipe": "x | touch {canary}",
    "subst": "$(touch {canary})",
    "backticks": "`touch {canary}`",
    "quote-escape": "x'; touch {canary}; echo '",
}


@pytest.mark.parametrize("name", sorted(INJECTIONS))
def test_injection_refused_by_a_strict_pattern(api, name):
    canary = api.workdir / f"canary-strict-{name}"
    r = execute(api, "echo-word", {"word": INJECTIONS[name].format(canary=canary)})
    assert r.status_code == 400 and r.json()["error"]["param"] == "word"
    assert not canary.exists()


@pytest.mark.parametrize("name", sorted(INJECTIONS))
def test_injection_inert_through_a_lax_pattern(api, name):
    canary = api.workdir / f"canary-lax-{name}"
    text = INJECTIONS[name].format(canary=canary)
    r = execute(api, "echo-text", {"text": text})
    assert r.status_code == 200, r.text
    run = r.json()["targets"][0]
    assert run["stdout"] == f"[{text}]\n"  # one argument, printed as sent
    assert not canary.exists()


@pytest.mark.parametrize("value,why", [
    ("x\ntouch {canary}", "control"),
    ("x\rtouch", "control"),
    ("x\x00y", "control"),
    ("\x1b[2J", "control"),
    ("--x", "option"),
    ("-rf", "option"),
    ("x\uff1b touch {canary}", "ASCII"),  # fullwidth semicolon
    ("\u0435cho", "ASCII"),  # Cyrillic e
    ("x\u2009y", "ASCII"),  # thin space
])
def test_injection_refused_by_validation_whatever_the_pattern(api, value, why):
    canary = api.workdir / "canary-ctl"
    r = execute(api, "echo-text", {"text": value.format(canary=canary)})
    assert r.status_code == 400, r.text
    assert why in r.json()["error"]["message"] or (why == "option" and "'-'" in r.json()["error"]["message"])
    assert not canary.exists()


def test_option_injection_in_path_and_enum(api):
    r = execute(api, "list-dir", {"dir": "--help"}, token=api.reader_token)
    assert r.status_code == 400
    r = execute(api, "color", {"color": "--red"})
    assert r.status_code == 400


def test_unicode_lookalike_enum_refused(api):
    r = execute(api, "color", {"color": "r\u0435d"})  # Cyrillic e in "red"
    assert r.status_code == 400


# ------------------------------------------------------------------------------------ execution


def test_execute_with_curl_and_audit(api):
    p = curl(api, "-X", "POST", "-H", "Content-Type: application/json", f"{api.url}/execute",
             "-d", json.dumps({"template": "echo-word", "targets": ["web-1"], "params": {"word": "curl_ok"},
                               "wait": True}))
    code, job = curl_json(p)
    assert code == 200, p.stdout
    run = job["targets"][0]
    assert run["stdout"] == "[curl_ok]\n" and run["status"] == "succeeded"
    assert run["stdout_sha256"] == hashlib.sha256(b"[curl_ok]\n").hexdigest()
    evs = job_events(api, job["job_id"], 2)
    start, end = [e for e in evs if e["event"] == "command.start"][0], [e for e in evs if e["event"] == "command.execute"][0]
    assert start["seq"] < end["seq"] and start["sid"] == end["sid"]
    # The exact line the target's shell ran: its pid for a stop, then the template, each argument quoted.
    assert start["command"] == "printf 'dbproxy-pid:%s\\n' \"$$\" >&2; exec printf '[%s]\\n' curl_ok"
    assert start["params"] == {"word": "curl_ok"} and start["template"] == "echo-word"
    assert start["user"] == "alice" and start["target"] == "web-1"
    assert end["exit_status"] == 0 and end["success"] is True
    assert end["stdout_sha256"] == run["stdout_sha256"] and end["duration_ms"] > 0
    assert api.token not in api.audit_path.read_text()


def test_output_recorded_and_covered_by_the_chain(api):
    r = execute(api, "head-lines", {"file": str(api.files / "alpha.txt"), "n": 3})
    job_id = r.json()["job_id"]
    end = [e for e in job_events(api, job_id, 2) if e["event"] == "command.execute"][0]
    start = [e for e in job_events(api, job_id, 2) if e["event"] == "command.start"][0]
    cast = api.workdir / "recordings" / end["recording"]
    assert start["recording"] == end["recording"] == f"{end['sid']}.cast"
    data = cast.read_bytes()
    assert hashlib.sha256(data).hexdigest() == end["recording_sha256"] and len(data) == end["recording_bytes"]
    lines = [json.loads(x) for x in data.splitlines()]
    assert lines[0]["version"] == 2
    assert "".join(x[2] for x in lines[1:] if x[1] == "o") == "line one\nline two\nline three\n"


def test_target_down(api):
    r = execute(api, "pause", {"seconds": "0"}, targets=["down-1"])
    run = r.json()["targets"][0]
    assert r.json()["status"] == "failed"
    assert run["status"] == "error" and "unreachable" in run["error"]
    evs = job_events(api, r.json()["job_id"], 2)
    assert [e for e in evs if e["event"] == "command.execute"][0]["status"] == "error"


def test_timeout_kills_the_remote_command(api):
    mark = "9" + SLEEP_MARK
    r = execute(api, "pause-short", {"seconds": mark})
    run = r.json()["targets"][0]
    assert run["status"] == "timeout"
    assert 1.4 <= run["duration_ms"] / 1000 < 8
    assert not sleeping(mark), "the remote sleep outlived the run"
    evs = job_events(api, r.json()["job_id"], 3)
    kill = [e for e in evs if e["event"] == "command.kill"][0]
    assert kill["reason"] == "timeout" and kill["command"] == f"kill -KILL -- -{kill['pid']}"


def test_output_limit(api):
    r = execute(api, "flood")
    run = r.json()["targets"][0]
    assert run["status"] == "output_limit" and run["output_truncated"] is True
    assert run["stdout_bytes"] == 1000 and run["stdout"].startswith("dbproxy-flood\n")
    assert subprocess.run(["pgrep", "-f", "^yes dbproxy-flood$"], capture_output=True).returncode != 0


def test_cancel_kills_and_stream_shows_output(api):
    mark = "8" + SLEEP_MARK
    r = execute(api, "pause", {"seconds": mark}, wait=False)
    assert r.status_code == 202
    job_id = r.json()["job_id"]
    wait_until(lambda: sleeping(mark), timeout=10, what="the remote sleep to start")
    with client(api) as c:
        lines: list[dict] = []
        with c.stream("GET", f"/jobs/{job_id}?stream=true") as resp:
            assert resp.headers["content-type"] == "application/x-ndjson"
            cancelled = c.post(f"/jobs/{job_id}/cancel")
            for line in resp.iter_lines():
                lines.append(json.loads(line))
    assert cancelled.json()["status"] == "cancelled"
    assert lines[-1]["event"] == "end" and lines[-1]["job"]["targets"][0]["status"] == "cancelled"
    assert not sleeping(mark), "the remote sleep outlived the cancel"
    kill = [e for e in job_events(api, job_id, 3) if e["event"] == "command.kill"][0]
    assert kill["reason"] == "cancelled" and kill["pid"] is not None


def test_stream_output_while_running_with_curl(api):
    # Output arrives in order, chunk by chunk, then the end line with the job.
    r = execute(api, "echo-text", {"text": "streamed"}, wait=False)
    p = subprocess.run(["curl", "-sS", "-N", "-H", f"Authorization: Bearer {api.token}",
                        f"{api.url}/jobs/{r.json()['job_id']}?stream=true"], capture_output=True, text=True, timeout=30)
    lines = [json.loads(x) for x in p.stdout.splitlines()]
    assert "".join(x["data"] for x in lines if x["event"] == "output") == "[streamed]\n"
    assert lines[-1]["event"] == "end" and lines[-1]["job"]["status"] == "succeeded"


def test_two_jobs_on_one_target_concurrently_and_limits(api):
    marks = ["3." + SLEEP_MARK.replace(".", ""), "4." + SLEEP_MARK.replace(".", "")]  # ~3 s and ~4 s
    a, b = (execute(api, "pause", {"seconds": m}, targets=["web-9"], wait=False).json()["job_id"] for m in marks)
    # Both commands run on the target at the same time (two exec channels, two processes).
    wait_until(lambda: sleeping(marks[0]) and sleeping(marks[1]), timeout=10, what="both sleeps at once")
    # max_commands_per_target is 2: a third on web-9 is refused while both run.
    third = execute(api, "pause", {"seconds": "0"}, targets=["web-9"], wait=False)
    assert third.status_code == 429 and "web-9" in third.json()["error"]["message"]
    with client(api) as c:
        def done():
            jobs = [c.get(f"/jobs/{j}").json() for j in (a, b)]
            return jobs if all(j["status"] not in ("running", "queued") for j in jobs) else None
        jobs = wait_until(done, timeout=20, what="both jobs")
    assert [j["status"] for j in jobs] == ["succeeded", "succeeded"]
    # The slots are free again.
    assert execute(api, "pause", {"seconds": "0"}, targets=["web-9"]).json()["status"] == "succeeded"


def test_per_caller_limit(api):
    token = api.issue("paula", "ops")
    ids = [execute(api, "pause", {"seconds": "30"}, targets=[f"web-p{i}"], token=token, wait=False).json()["job_id"]
           for i in range(3)]
    r = execute(api, "pause", {"seconds": "0"}, targets=["web-p9"], token=token, wait=False)
    assert r.status_code == 429 and "paula" in r.json()["error"]["message"]
    with client(api, token) as c:
        for j in ids:
            assert c.post(f"/jobs/{j}/cancel").json()["status"] == "cancelled"
        # Another caller's job is not found.
        with client(api) as other:
            assert other.get(f"/jobs/{ids[0]}").status_code == 404
        assert execute(api, "pause", {"seconds": "0"}, targets=["web-p9"], token=token).status_code == 200


def test_multiple_targets(api):
    r = execute(api, "echo-word", {"word": "multi"}, targets=["web-a", "web-b"])
    job = r.json()
    assert job["status"] == "succeeded"
    assert sorted(t["target"] for t in job["targets"]) == ["web-a", "web-b"]
    evs = job_events(api, job["job_id"], 4)
    assert len({e["sid"] for e in evs}) == 2


# ------------------------------------------------------------------------------------ audit logs


def test_audit_logs_filters_and_pages(api):
    r = execute(api, "echo-word", {"word": "auditpage"})
    job_id = r.json()["job_id"]
    job_events(api, job_id, 2)
    with client(api) as c:
        page = c.get("/audit/logs", params={"job": job_id, "limit": 1}).json()
        assert [e["event"] for e in page["events"]] == ["command.start"]
        nxt = c.get("/audit/logs", params={"job": job_id, "limit": 1, "cursor": page["next_cursor"]}).json()
        assert [e["event"] for e in nxt["events"]] == ["command.execute"]
        by_event = c.get("/audit/logs", params={"event": "command.*", "user": "alice", "limit": 1000}).json()
        assert by_event["events"] and all(e["event"].startswith("command.") and e["user"] == "alice"
                                          for e in by_event["events"])
        future = c.get("/audit/logs", params={"since": "2999-01-01T00:00:00Z"}).json()
        assert future["events"] == []
        sid = page["events"][0]["sid"]
        assert {e["event"] for e in c.get("/audit/logs", params={"sid": sid}).json()["events"]} == \
            {"command.start", "command.execute"}
        assert c.get("/audit/logs", params={"since": "yesterday"}).status_code == 400
    with client(api, api.reader_token) as c:
        assert c.get("/audit/logs").status_code == 403


def test_cli_run_streams_and_exits_with_the_status(api):
    env = {"DBPROXY_TOKEN": api.token}
    p = _cli("run", "echo-word", "--url", api.url, "--target", "web-1", "--param", "word=from_cli", env=env)
    assert p.stdout == "[from_cli]\n"
    p = _cli("run", "pause-short", "--url", api.url, "--target", "web-1", "--param", "seconds=7" + SLEEP_MARK,
             env=env, check=False)
    assert p.returncode == 124 and "timeout" in p.stderr
    p = _cli("run", "echo-word", "--url", api.url, "--target", "web-1", "--param", "word=a b", env=env, check=False)
    assert p.returncode == 2 and "pattern" in p.stderr
    p = _cli("run", "echo-word", "--url", api.url, "--target", "web-1", "--target", "web-2", "--param", "word=x",
             env=env)
    assert sorted(p.stdout.splitlines()) == ["[web-1] [x]", "[web-2] [x]"]


def test_https_with_curl_httpx_and_the_cli(api):
    code, doc = curl_json(curl(api, "--cacert", api.ca_file, f"{api.tls_url}/healthz", token=""))
    assert code == 200 and doc["status"] == "ok"
    import ssl

    with httpx.Client(base_url=api.tls_url, verify=ssl.create_default_context(cafile=api.ca_file), timeout=30,
                      headers={"authorization": f"Bearer {api.token}"}) as c:
        r = c.post("/execute", json={"template": "echo-word", "targets": ["web-1"], "params": {"word": "tls"},
                                     "wait": True})
    assert r.status_code == 200 and r.json()["targets"][0]["stdout"] == "[tls]\n"
    p = _cli("run", "echo-word", "--url", api.tls_url, "--cacert", api.ca_file, "--target", "web-1",
             "--param", "word=tls_cli", env={"DBPROXY_TOKEN": api.token})
    assert p.stdout == "[tls_cli]\n"
    # Without the CA the client refuses the proxy's certificate.
    assert subprocess.run(["curl", "-sS", f"{api.tls_url}/healthz"], capture_output=True).returncode != 0


def test_audit_chain_verifies(api):
    p = _cli("audit", "verify", str(api.audit_path), check=False)
    assert p.returncode == 0, p.stdout + p.stderr


def test_a_reload_keeps_running_jobs_visible_and_cancellable(api):
    """SIGHUP re-reads the config: a job started before it is still seen and cancelled through the
    new generation of the API (its remote command killed), and new jobs run."""
    import signal as _signal

    mark = "9" + SLEEP_MARK
    r = execute(api, "pause", {"seconds": mark}, wait=False)
    job_id = r.json()["job_id"]
    wait_until(lambda: sleeping(mark), timeout=10, what="the remote sleep to start")
    reloads = len([e for e in read_audit(api.audit_path) if e["event"] == "proxy.reload"])
    api.proc.send_signal(_signal.SIGHUP)
    wait_until(lambda: len([e for e in read_audit(api.audit_path) if e["event"] == "proxy.reload"
                            and e["success"]]) > reloads, what="the reload")
    with client(api) as c:
        seen = c.get(f"/jobs/{job_id}")
        assert seen.status_code == 200 and seen.json()["status"] == "running", seen.text
        cancelled = c.post(f"/jobs/{job_id}/cancel")
    assert cancelled.json()["status"] == "cancelled"
    wait_until(lambda: not sleeping(mark), timeout=10, what="the remote sleep killed")
    after = execute(api, "echo-text", {"text": "after-reload"})
    assert after.json()["status"] == "succeeded", after.text


def test_server_stop_kills_running_commands(api):
    """Last in this file: it stops the module's proxy."""
    mark = "6" + SLEEP_MARK
    job_id = execute(api, "pause", {"seconds": mark}, wait=False).json()["job_id"]
    wait_until(lambda: sleeping(mark), timeout=10, what="the remote sleep to start")
    time.sleep(0.5)  # the pid line has reached the proxy
    assert api.stop() == 0
    assert not sleeping(mark), "the remote command outlived the proxy"
    evs = [e for e in read_audit(api.audit_path) if e.get("job_id") == job_id]
    assert [e["event"] for e in evs] == ["command.start", "command.kill", "command.execute"]
    assert evs[1]["reason"] == "cancelled" and evs[1]["pid"] is not None  # stopped, not timed out
    assert evs[-1]["status"] == "cancelled"

