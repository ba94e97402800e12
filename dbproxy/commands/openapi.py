"""The command API's OpenAPI 3.1 document and its ``/docs`` page.

Strategy: the document is written here by hand, next to nothing else, and
checked by ``openapi-spec-validator`` in the tests; the configured templates
are added to the ``ExecuteRequest`` schema's ``template`` enum and described
under ``x-templates`` (their parameter schemas), so a client generator sees
what it may ask for.  ``/docs`` is one self-contained HTML page rendered from
the document — no script or stylesheet from elsewhere: a privileged-access
proxy should not make an operator's browser load third-party JavaScript.  It
is interactive through one inline script of our own (``TRY_SCRIPT``), pinned
by its SHA-256 in the page's Content-Security-Policy (``DOCS_CSP``: no other
script runs, requests go only to this origin): a "try it" form per template
(token, targets, parameters → ``POST /execute`` with ``wait``) and one for
``GET`` requests (``/commands``, ``/jobs/{id}``, ``/audit/logs?…``).  The
token stays in the page's memory; nothing is stored.
"""

from __future__ import annotations

import base64
import hashlib
import html
from typing import Any

# The page's one script: builds each request from a form and shows the answer.  ``request`` is
# pure (form values in, fetch arguments out) so tests run it under Node without a browser.
TRY_SCRIPT = r"""
function request(kind, v) {
  const headers = {"Authorization": "Bearer " + v.token.trim()};
  if (kind === "get") {
    if (!/^\/(commands|jobs\/[A-Za-z0-9_-]+|audit\/logs)(\?.*)?$/.test(v.path)) throw new Error("GET /commands, /jobs/ID or /audit/logs?...");
    return {url: v.path, init: {method: "GET", headers: headers}};
  }
  const params = {};
  for (const [name, raw] of Object.entries(v.params)) {
    if (raw === "") continue;
    const type = v.types[name];
    params[name] = type === "integer" ? Number(raw) : type === "boolean" ? raw === "true" : raw;
  }
  const targets = v.targets.split(",").map(t => t.trim()).filter(t => t);
  headers["Content-Type"] = "application/json";
  return {url: "/execute", init: {method: "POST", headers: headers,
          body: JSON.stringify({template: v.template, targets: targets, params: params, wait: true})}};
}
async function send(form, kind) {
  const out = form.querySelector("pre");
  const token = document.getElementById("token").value;
  const v = {token: token, template: form.dataset.template, targets: form.elements.targets ? form.elements.targets.value : "",
             path: form.elements.path ? form.elements.path.value : "", params: {}, types: {}};
  for (const el of form.querySelectorAll("[data-param]")) { v.params[el.name] = el.value; v.types[el.name] = el.dataset.type; }
  try {
    const r = request(kind, v);
    const answer = await fetch(r.url, r.init);
    out.textContent = answer.status + "\n" + JSON.stringify(await answer.json(), null, 2);
  } catch (e) { out.textContent = String(e); }
}
if (typeof document !== "undefined") {
  for (const form of document.querySelectorAll("form[data-kind]")) {
    form.addEventListener("submit", e => { e.preventDefault(); send(form, form.dataset.kind); });
  }
}
if (typeof module !== "undefined") module.exports = {request};
"""
DOCS_CSP = ("default-src 'none'; style-src 'unsafe-inline'; connect-src 'self'; form-action 'none'; "
            "script-src 'sha256-" + base64.b64encode(hashlib.sha256(TRY_SCRIPT.encode()).digest()).decode() + "'")

ERROR = {"$ref": "#/components/schemas/Error"}


def _error(description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": ERROR}}}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def document(templates: dict, version: str) -> dict:
    auth_errors = {"401": _error("no bearer token, or a token that is invalid, expired or revoked"),
                   "403": _error("the token's roles lack a scope the template needs, or do not grant the target")}
    target_run = {
        "type": "object",
        "properties": {
            "target": {"type": "string"}, "login": {"type": ["string", "null"]},
            "status": {"type": "string", "enum": ["queued", "running", "succeeded", "failed", "timeout", "cancelled",
                                                  "output_limit", "error"]},
            "exit_status": {"type": ["integer", "null"]}, "exit_signal": {"type": ["string", "null"]},
            "error": {"type": ["string", "null"]}, "duration_ms": {"type": ["number", "null"]},
            "output_truncated": {"type": "boolean"}, "stdout": {"type": "string"}, "stderr": {"type": "string"},
            "stdout_bytes": {"type": "integer"}, "stderr_bytes": {"type": "integer"},
            "stdout_sha256": {"type": "string"}, "stderr_sha256": {"type": "string"},
        },
        "required": ["target", "status"],
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "dbproxy command templates", "version": version,
                 "description": "Run pre-approved, parameter-validated commands on targets through the proxy. "
                                "Authenticate with a dbproxy token: `Authorization: Bearer TOKEN`."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {
                    "type": "object", "required": ["code", "message"],
                    "properties": {"code": {"type": "integer"}, "message": {"type": "string"},
                                   "param": {"type": "string"}}}}},
                "Template": {"type": "object", "properties": {
                    "name": {"type": "string"}, "description": {"type": "string"},
                    "argv": {"type": "array"}, "env": {"type": "object"},
                    "params": {"type": "object", "description": "a JSON Schema of the template's parameters"},
                    "targets": {"type": "array", "items": {"type": "string"}},
                    "scopes": {"type": "array", "items": {"type": "string"}},
                    "timeout_seconds": {"type": "number"}, "output_limit_bytes": {"type": "integer"}}},
                "ExecuteRequest": {
                    "type": "object", "required": ["template", "targets"], "additionalProperties": False,
                    "properties": {
                        "template": {"type": "string", **({"enum": sorted(templates)} if templates else {})},
                        "targets": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 64},
                        "params": {"type": "object"},
                        "wait": {"type": "boolean", "description": "answer when the job has finished"},
                    }},
                "TargetRun": target_run,
                "Job": {"type": "object", "required": ["job_id", "status", "targets"], "properties": {
                    "job_id": {"type": "string"}, "template": {"type": "string"}, "params": {"type": "object"},
                    "status": {"type": "string", "enum": ["queued", "running", "succeeded", "failed", "cancelled"]},
                    "user": {"type": "string"}, "created": {"type": "number"}, "finished": {"type": ["number", "null"]},
                    "targets": {"type": "array", "items": {"$ref": "#/components/schemas/TargetRun"}}}},
                "AuditPage": {"type": "object", "required": ["events"], "properties": {
                    "events": {"type": "array", "items": {"type": "object"}},
                    "next_cursor": {"type": ["string", "null"]}}},
            },
        },
        "security": [{"bearer": []}],
        "x-templates": {name: t.describe() for name, t in sorted(templates.items())},
        "paths": {
            "/healthz": {"get": {"summary": "liveness", "security": [], "operationId": "healthz",
                                 "responses": {"200": _json({"type": "object"}, "the API is serving")}}},
            "/commands": {"get": {
                "summary": "the templates this caller may run", "operationId": "listCommands",
                "responses": {"200": _json({"type": "object", "properties": {"commands": {
                    "type": "array", "items": {"$ref": "#/components/schemas/Template"}}}}, "templates"),
                    **auth_errors}}},
            "/execute": {"post": {
                "summary": "run a template on one or more targets", "operationId": "execute",
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/ExecuteRequest"}}}},
                "responses": {
                    "200": _json({"$ref": "#/components/schemas/Job"}, "the finished job (wait: true)"),
                    "202": _json({"$ref": "#/components/schemas/Job"}, "the job started; poll or stream /jobs/{id}"),
                    "400": _error("an unknown template parameter or a value its type refuses"),
                    **auth_errors,
                    "404": _error("no such template"),
                    "429": _error("the caller or a target runs as many commands as it may")}}},
            "/jobs/{id}": {"get": {
                "summary": "a job's status, exit codes and output", "operationId": "getJob",
                "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}},
                               {"name": "stream", "in": "query", "required": False, "schema": {"type": "boolean"},
                                "description": "stream the output as NDJSON lines while the job runs; the last "
                                               "line is {\"event\": \"end\", \"job\": Job}"}],
                "responses": {"200": {"description": "the job", "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/Job"}},
                    "application/x-ndjson": {"schema": {"type": "object"}}}},
                    "401": auth_errors["401"], "404": _error("no such job of this caller")}}},
            "/jobs/{id}/cancel": {"post": {
                "summary": "stop a running job (the remote commands are killed)", "operationId": "cancelJob",
                "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": _json({"$ref": "#/components/schemas/Job"}, "the job"),
                              "401": auth_errors["401"], "404": _error("no such job of this caller")}}},
            "/audit/logs": {"get": {
                "summary": "search the audit trail (needs the audit scope)", "operationId": "auditLogs",
                "parameters": [{"name": n, "in": "query", "required": False, "schema": s, "description": d}
                               for n, s, d in (
                                   ("user", {"type": "string"}, "the identity"),
                                   ("sid", {"type": "string"}, "a session id"),
                                   ("event", {"type": "string"}, "an event name or glob (command.*)"),
                                   ("job", {"type": "string"}, "a job id"),
                                   ("since", {"type": "string", "format": "date-time"}, "from this time"),
                                   ("until", {"type": "string", "format": "date-time"}, "up to this time"),
                                   ("limit", {"type": "integer", "minimum": 1, "maximum": 1000}, "events per page"),
                                   ("cursor", {"type": "string"}, "next_cursor of the previous page"))],
                "responses": {"200": _json({"$ref": "#/components/schemas/AuditPage"}, "a page of events"),
                              "400": _error("a bad filter"), **auth_errors}}},
        },
    }


def docs_page(doc: dict) -> bytes:
    """A plain HTML rendering of the document (endpoints, then templates)."""
    e = html.escape
    rows: list[str] = []
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            codes = ", ".join(f"{c} {e(r.get('description', ''))}" for c, r in op.get("responses", {}).items())
            rows.append(f"<tr><td><code>{e(method.upper())} {e(path)}</code></td><td>{e(op.get('summary', ''))}"
                        f"</td><td>{codes}</td></tr>")
    templates: list[str] = []
    for name, t in doc.get("x-templates", {}).items():
        params = "".join(f"<li><code>{e(p)}</code>: <code>{e(_schema_text(s))}</code></li>"
                         for p, s in t["params"]["properties"].items())
        fields = "".join(
            f"<label>{e(p)} <input name=\"{e(p)}\" data-param data-type=\"{e(str(s.get('type', 'string')))}\" "
            f"placeholder=\"{e(str(s.get('default', '')))}\"></label> " for p, s in t["params"]["properties"].items())
        templates.append(f"<h3>{e(name)}</h3><p>{e(t['description'])}</p><p>targets: {e(', '.join(t['targets']))}; "
                         f"scopes: {e(', '.join(t['scopes']))}; timeout {t['timeout_seconds']:g} s</p><ul>{params}</ul>"
                         f"<form data-kind=\"execute\" data-template=\"{e(name)}\"><label>targets "
                         f"<input name=\"targets\" placeholder=\"web-1, web-2\"></label> {fields}"
                         f"<button>Run {e(name)}</button><pre></pre></form>")
    body = (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{e(doc['info']['title'])}</title></head><body>"
            f"<h1>{e(doc['info']['title'])} {e(doc['info']['version'])}</h1><p>{e(doc['info']['description'])}</p>"
            f"<p>The machine-readable document: <a href=\"/openapi.json\">/openapi.json</a>.</p>"
            f"<p><label>Bearer token (kept in this page only) <input id=\"token\" type=\"password\" size=\"60\"></label></p>"
            f"<h2>Endpoints</h2><table border=\"1\" cellpadding=\"4\"><tr><th>request</th><th>what</th>"
            f"<th>responses</th></tr>{''.join(rows)}</table>"
            f"<form data-kind=\"get\"><label>GET <input name=\"path\" size=\"50\" value=\"/commands\"></label> "
            f"<button>Send</button><pre></pre></form>"
            f"<h2>Templates</h2>{''.join(templates)}<script>{TRY_SCRIPT}</script></body></html>")
    return body.encode("utf-8")


def _schema_text(s: Any) -> str:
    import orjson

    return orjson.dumps(s).decode()
