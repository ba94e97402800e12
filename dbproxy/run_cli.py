"""``dbproxy run TEMPLATE --target T --param k=v``: run a command template through the proxy's API.

    DBPROXY_TOKEN=$(dbproxy token issue …) dbproxy run disk-usage --url http://127.0.0.1:8443 \\
        --target web-1 --param path=/var/log

Strategy: ``POST /execute`` (the job starts), then ``GET /jobs/{id}?stream=true``
whose NDJSON lines carry the output as it arrives: stdout chunks go to
stdout, stderr chunks to stderr (prefixed ``[target]`` per line when the job
runs on several targets).  Ctrl-C cancels the job (``POST
/jobs/{id}/cancel``).  Exit status: a single target's own exit status; 124
when it timed out, 125 for any other failure of the run (target down,
output limit, cancelled); with several targets 0 when all succeeded, else 1;
2 when the API refused the request (its message on stderr).  The token comes
from ``--token-file`` or ``$DBPROXY_TOKEN`` — never from the command line,
where other users would see it in the process list.  Standard library only
(``http.client``): the CLI adds no dependency.
"""

from __future__ import annotations

import argparse
import http.client
import os
import ssl
import sys
import urllib.parse
from typing import Any

import orjson


def _fail(msg: str) -> int:
    print(f"dbproxy run: {msg}", file=sys.stderr)
    return 2


class _Api:
    def __init__(self, url: str, token: str, cafile: str | None, timeout: float) -> None:
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"--url: http(s)://HOST:PORT, got {url!r}")
        self.scheme, self.host, self.port = u.scheme, u.hostname, u.port
        self.token, self.cafile, self.timeout = token, cafile, timeout

    def connect(self) -> http.client.HTTPConnection:
        if self.scheme == "https":
            ctx = ssl.create_default_context(cafile=self.cafile)
            return http.client.HTTPSConnection(self.host, self.port, context=ctx, timeout=self.timeout)
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any, http.client.HTTPResponse,
                                                                           http.client.HTTPConnection]:
        conn = self.connect()
        headers = {"authorization": f"Bearer {self.token}", "accept": "application/json"}
        data = None
        if body is not None:
            data = orjson.dumps(body)
            headers["content-type"] = "application/json"
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        return resp.status, None, resp, conn


def _json(resp: http.client.HTTPResponse) -> Any:
    raw = resp.read()
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {"error": {"message": raw.decode("utf-8", "replace")[:500]}}


def _message(doc: Any) -> str:
    if isinstance(doc, dict) and isinstance(doc.get("error"), dict):
        return str(doc["error"].get("message"))
    return str(doc)


def cmd_run(args: argparse.Namespace) -> int:
    token = None
    if args.token_file:
        try:
            with open(args.token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as exc:
            return _fail(f"--token-file: {exc.strerror}")
    else:
        token = os.environ.get("DBPROXY_TOKEN", "").strip()
    if not token:
        return _fail("no token: pass --token-file FILE or set DBPROXY_TOKEN")
    params: dict[str, str] = {}
    for item in args.param:
        name, sep, value = item.partition("=")
        if not sep or not name:
            return _fail(f"--param NAME=VALUE, got {item!r}")
        params[name] = value  # typed by the server (int and bool parameters accept their text)
    try:
        api = _Api(args.url, token, args.cacert, args.timeout)
    except ValueError as exc:
        return _fail(str(exc))
    try:
        status, _, resp, conn = api.request("POST", "/execute", {"template": args.template, "targets": args.target,
                                                                 "params": params})
        doc = _json(resp)
        conn.close()
    except (OSError, http.client.HTTPException) as exc:
        return _fail(f"cannot reach {args.url}: {exc}")
    if status not in (200, 202):
        return _fail(f"refused ({status}): {_message(doc)}")
    job_id = doc["job_id"]
    multi = len(args.target) > 1
    try:
        final = _stream(api, job_id, multi)
    except KeyboardInterrupt:
        try:
            _, _, resp, conn = api.request("POST", f"/jobs/{job_id}/cancel")
            final = _json(resp)
            conn.close()
        except (OSError, http.client.HTTPException):
            final = None
        print(f"dbproxy run: job {job_id} cancelled", file=sys.stderr)
        return 130
    except (OSError, http.client.HTTPException) as exc:
        return _fail(f"lost the job's stream ({exc}); ask GET /jobs/{job_id}")
    return _exit_code(final, multi)


def _stream(api: _Api, job_id: str, multi: bool) -> dict | None:
    _, _, resp, conn = api.request("GET", f"/jobs/{job_id}?stream=true")
    if resp.status != 200:
        raise http.client.HTTPException(f"{resp.status}: {_message(_json(resp))}")
    final = None
    at_line_start: dict = {}
    try:
        while True:
            line = resp.readline()
            if not line:
                break
            event = orjson.loads(line)
            if event.get("event") == "output":
                out = sys.stderr if event["stream"] == "stderr" else sys.stdout
                text = event["data"]
                if multi:
                    key = (event["target"], event["stream"])
                    prefix = f"[{event['target']}] "
                    lines = text.splitlines(keepends=True)
                    text = "".join((prefix if (i > 0 or at_line_start.get(key, True)) else "") + ln
                                   for i, ln in enumerate(lines))
                    at_line_start[key] = text.endswith("\n")
                out.write(text)
                out.flush()
            elif event.get("event") == "end":
                final = event["job"]
    finally:
        conn.close()
    return final


def _exit_code(job: dict | None, multi: bool) -> int:
    if job is None:
        return 125
    for run in job["targets"]:
        if run["status"] not in ("succeeded", "failed"):
            why = run.get("error") or run["status"]
            print(f"dbproxy run: {run['target']}: {why}", file=sys.stderr)
    if multi:
        return 0 if all(r["status"] == "succeeded" for r in job["targets"]) else 1
    (run,) = job["targets"]
    if run["status"] in ("succeeded", "failed"):
        return run["exit_status"] if run["exit_status"] is not None else 125
    return 124 if run["status"] == "timeout" else 125


def add_parser(sub: Any) -> None:
    p = sub.add_parser("run", help="run a command template on targets through the proxy's API")
    p.add_argument("template")
    p.add_argument("--target", action="append", required=True, help="a target (repeat for several)")
    p.add_argument("--param", action="append", default=[], help="NAME=VALUE (repeat)")
    p.add_argument("--url", default=os.environ.get("DBPROXY_URL", "http://127.0.0.1:8443"),
                   help="the command API (default $DBPROXY_URL or http://127.0.0.1:8443)")
    p.add_argument("--token-file", help="a file holding the token (default: $DBPROXY_TOKEN)")
    p.add_argument("--cacert", help="CA file to verify an https API")
    p.add_argument("--timeout", type=float, default=3600.0, help="socket timeout in seconds")
    p.set_defaults(func=cmd_run)
