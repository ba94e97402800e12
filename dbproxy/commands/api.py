"""The command-template API: an engine base class for an HTTP listener that runs templates on targets.

Strategy.  The API is served by the core's own HTTP/1.1 listener
(``dbproxy.listen.http``, h11, optionally TLS): every connection is a
``Session`` of the server like any other (limits, shutdown, buffer budget),
and each request comes to ``handle_http_request``.  This module knows no
remote-execution protocol: ``CommandsEngine.execute(run, route, session)``
is the one hook a protocol engine implements (``engines/ssh/commands.py``:
asyncssh with the route's proxy-held credential), and it registers the
subclass as a protocol of its own (``ssh-commands``) in
``engines.default_registry``.  The listener's routes are that engine's
routes (``match.target`` globs → backend address, credential, host key), so
its config validation is the engine's too.

Requests:

    GET  /healthz                 no token
    GET  /openapi.json, /docs     no token (the document names templates, no secret)
    GET  /commands                the templates the caller's scopes allow
    POST /execute                 {template, targets, params, wait} → job (202; 200 with wait)
    GET  /jobs/{id}[?stream=true] the caller's job; NDJSON output while it runs
    POST /jobs/{id}/cancel
    GET  /audit/logs?…            the JSONL trail, filtered, paginated (``audit_scope``)

Authentication is the proxy's token as a bearer token (RFC 6750), checked
by the listener's ``ClientAuthenticator`` exactly as a database password
would be; a missing, bad, expired or revoked token is 401 with
``WWW-Authenticate: Bearer error="invalid_token"``.  Authorization has two
parts, both deny by default: the caller's roles must carry *every* scope
the template lists (a role's ``scopes``; the union over the caller's roles),
and for each target some role must grant the target and the login as for an
SSH session (``targets``/``logins``, ``AccessPolicy.authorize`` with family
``terminal``); the template's own ``targets`` globs must match too.

Jobs run in a nursery under the one the server hands the engine
(``attach``), so they outlive the request that started them; when the
server stops, every run still going is stopped like a cancel (its remote
command killed) before the nursery closes.  Each target
of a job is audited as a session of its own (event family ``command``):
``command.start`` (template, validated parameters, the exact command line,
target, login) is handed to the audit before the proxy connects to the
target, and ``command.execute`` (exit status or signal, state, output sizes
and SHA-256, duration) when the run ends, whatever ended it.  Refusals are
``command.denied`` with the reason.  Tokens never reach the trail.
"""

from __future__ import annotations

import codecs
import logging
import time
import urllib.parse
from typing import Any

import orjson
import trio

from ..engine import Engine
from ..errors import AccessDenied, AuthFailed
from ..listen.http import HTTPError, HTTPResponse
from ..session import Session
from .auditlog import QueryError, parse_query, read_page
from .jobs import FINISHED, Job, LimitExceeded, Limits, TargetRun, new_job_id
from .openapi import DOCS_CSP, docs_page, document
from .templates import ParamError, Template, validate_templates

log = logging.getLogger("dbproxy.commands")

LISTENER_KEYS = ("templates", "commands")
COMMANDS_KEYS = {"max_jobs_per_caller", "max_commands_per_target", "job_retention_seconds", "max_targets",
                 "audit_scope", "audit_log_file", "recording_dir"}
DEFAULT_AUDIT_SCOPE = "audit.read"
DEFAULT_RETENTION = 3600.0
DEFAULT_MAX_TARGETS = 64
# Finished jobs kept at most (each holds its output, up to the template's output limit per target).
MAX_JOBS_KEPT = 1000
# After its timeout, how long a run may take to kill the remote command and close.
KILL_GRACE = 5.0


class TargetUnavailable(Exception):
    """The runner could not reach or log in to the target; ``hint`` is safe to show the caller."""

    def __init__(self, message: str, *, kind: str, hint: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.hint = hint


def validate_listener(v: Any, d: dict, path: str) -> dict:
    """``templates`` (required) and ``commands`` (limits, retention, the audit scope and file)."""
    extra: dict = {}
    if "templates" not in d:
        v.err(path, 'a key "templates": an object of template name → template')
    else:
        extra["templates"] = validate_templates(v, d["templates"], f"{path}.templates")
    cp = f"{path}.commands"
    cd = v.section(d.get("commands", {}), cp, COMMANDS_KEYS) or {}
    extra["max_jobs_per_caller"] = v.integer(cd, "max_jobs_per_caller", cp) or 4
    extra["max_commands_per_target"] = v.integer(cd, "max_commands_per_target", cp) or 4
    extra["max_targets"] = v.integer(cd, "max_targets", cp) or DEFAULT_MAX_TARGETS
    retention = v.number(cd, "job_retention_seconds", cp, minimum=1.0)
    extra["job_retention_seconds"] = DEFAULT_RETENTION if retention is None else retention
    extra["audit_scope"] = v.string(cd, "audit_scope", cp, required=False) or DEFAULT_AUDIT_SCOPE
    extra["audit_log_file"] = v.file_path(cd, "audit_log_file", cp, required=False, must_exist=False)
    folder = v.string(cd, "recording_dir", cp, required=False)
    if folder is not None:
        import os

        resolved = folder if os.path.isabs(folder) else os.path.join(v.base, folder)
        if not os.path.isdir(resolved) or not os.access(resolved, os.W_OK):
            v.err(f"{cp}.recording_dir", f"a writable folder for the recordings, but {resolved} is not one")
        else:
            extra["recording_dir"] = resolved
    if "auth" not in d:
        # Never an anonymous command runner: the caller's identity decides every scope.
        v.err(path, 'a key "auth": {"methods": ["token"]} (API callers present a proxy token as a bearer token)')
    return extra


class CommandsEngine(Engine):
    """The API; a protocol engine subclasses it and implements ``execute``."""

    family = "terminal"
    event_family = "command"
    listener_kinds = ("http",)
    match_keys = ("target",)
    client_auth_methods = ("token",)
    listener_keys = LISTENER_KEYS
    validate_listener = staticmethod(validate_listener)

    def __init__(self, listener: Any, services: Any) -> None:
        super().__init__(listener, services)
        extra = listener.extra
        self.templates: dict[str, Template] = extra.get("templates", {})
        self.limits = Limits(per_caller=extra.get("max_jobs_per_caller", 4),
                             per_target=extra.get("max_commands_per_target", 4))
        self.jobs: dict[str, Job] = {}
        self._nursery: trio.Nursery | None = None
        self._openapi: bytes | None = None

    # -- the hook a protocol engine implements --------------------------------------------------
    async def execute(self, run: TargetRun, route: Any, session: Session) -> None:  # pragma: no cover - interface
        """Run ``run.job.command`` on ``run.target`` as ``run.login`` with ``route``'s credential.

        Report output with ``run.output(stream, data)``, set ``run.exit_status`` or
        ``run.exit_signal``; raise ``TargetUnavailable`` when the target cannot be reached or
        refuses the login.  Connect and run inside ``with run.scope:`` — its deadline is the
        template's timeout, and cancel and the output limit cancel it — and, when it is
        cancelled, kill the remote command before the call returns."""
        raise NotImplementedError

    def command_line(self, job: Job) -> str:
        """The exact string the target is asked to run (a protocol may wrap the template's line)."""
        return job.command

    def adopt(self, previous: "CommandsEngine") -> None:
        """A reload: the jobs the previous generation runs or remembers stay visible (``GET`` /
        ``cancel``) and keep counting against the limits, which take the new config's values.  Its
        running jobs stay in its own nursery until they end."""
        self.jobs = previous.jobs
        previous.limits.per_caller, previous.limits.per_target = self.limits.per_caller, self.limits.per_target
        self.limits = previous.limits

    # -- the server's background nursery (jobs outlive requests) --------------------------------
    def attach(self, nursery: trio.Nursery) -> None:
        nursery.start_soon(self._host_jobs)

    async def _host_jobs(self) -> None:
        """Own the jobs' nursery until the server stops; then stop every run (its remote command is
        killed) and give them ``KILL_GRACE`` before cutting them off.

        The jobs' nursery is shielded: the server's cancellation must not reach a run before it
        was stopped in order — its runner's event loop has to live to send the kill."""
        stopping = trio.Event()

        async def jobs_nursery(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            with trio.CancelScope(shield=True):
                async with trio.open_nursery() as jobs:
                    self._nursery = jobs
                    task_status.started()
                    await stopping.wait()
                    self._nursery = None
                    for job in self.jobs.values():
                        if not job.done.is_set():
                            job.cancel()
                    jobs.cancel_scope.deadline = trio.current_time() + KILL_GRACE

        async with trio.open_nursery() as host:
            await host.start(jobs_nursery)
            try:
                await trio.sleep_forever()
            finally:
                stopping.set()

    # -- HTTP -----------------------------------------------------------------------------------
    async def handle_http_request(self, session: Any, request: Any) -> HTTPResponse:
        path, method = request.path, request.method
        if path == "/healthz":
            return _only(method, "GET") or HTTPResponse.json(200, {"status": "ok", "jobs_running": sum(
                1 for j in self.jobs.values() if not j.done.is_set())})
        if path == "/openapi.json":
            return _only(method, "GET") or HTTPResponse(200, (("content-type", "application/json"),), self._document())
        if path == "/docs":
            return _only(method, "GET") or HTTPResponse(200, (("content-type", "text/html; charset=utf-8"),
                                                              ("content-security-policy", DOCS_CSP)),
                                                        docs_page(orjson.loads(self._document())))
        routes = {"/commands": ("GET", self._commands), "/execute": ("POST", self._execute),
                  "/audit/logs": ("GET", self._audit_logs)}
        handler = None
        if path in routes:
            want, handler = routes[path]
            wrong = _only(method, want)
            if wrong:
                return wrong
            args: tuple = ()
        elif path.startswith("/jobs/"):
            rest = path[len("/jobs/"):]
            job_id, _, action = rest.partition("/")
            if action == "" and job_id:
                handler, args = self._job, (job_id,)
                wrong = _only(method, "GET")
            elif action == "cancel" and job_id:
                handler, args = self._cancel, (job_id,)
                wrong = _only(method, "POST")
            else:
                return _error(404, f"no such resource {path!r}")
            if wrong:
                return wrong
        else:
            return _error(404, f"no such resource {path!r} (see /docs)")
        identity = self._authenticate(session, request)
        if isinstance(identity, HTTPResponse):
            return identity
        return await handler(session, request, identity, *args)

    def _document(self) -> bytes:
        if self._openapi is None:
            from .. import __version__

            self._openapi = orjson.dumps(document(self.templates, __version__))
        return self._openapi

    def _authenticate(self, session: Any, request: Any) -> Any:
        header = request.header("authorization") or ""
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return _error(401, "a bearer token is required (Authorization: Bearer TOKEN, a dbproxy token)",
                          headers=(("www-authenticate", 'Bearer realm="dbproxy"'),))
        if self.access is None or not self.access.auth.token:
            return _error(503, "token authentication is not configured on this listener")
        try:
            identity = self.access.auth.verify_token(None, token.strip())
        except AuthFailed as exc:
            self._denied(session, None, "authenticate", exc.reason, str(exc), request=request,
                         **({"attempted_token_id": exc.token_id} if getattr(exc, "token_id", None) else {}))
            return _error(401, f"the token was not accepted ({exc.reason})",
                          headers=(("www-authenticate", f'Bearer realm="dbproxy", error="invalid_token", '
                                                        f'error_description="{exc.reason}"'),))
        return identity

    def _denied(self, session: Any, identity: Any, stage: str, reason: str, error: str, *, request: Any = None,
                **fields: Any) -> None:
        if session.audit is None:
            return
        if identity is not None:
            session.identity = identity
        if request is not None:
            fields.setdefault("http_method", request.method)
            fields.setdefault("http_path", request.path)
        session.audit.emit("command.denied", success=False, stage=stage, reason=reason, error=error, **fields)

    def scopes_of(self, identity: Any) -> set[str]:
        roles = self.access.policy.roles if self.access is not None else {}
        out: set[str] = set()
        for name in identity.roles:
            role = roles.get(name)
            if role is not None:
                out.update(role.scopes)
        return out

    async def _commands(self, session: Any, request: Any, identity: Any) -> HTTPResponse:
        scopes = self.scopes_of(identity)
        allowed = [t.describe() for name, t in sorted(self.templates.items()) if set(t.scopes) <= scopes]
        return HTTPResponse.json(200, {"commands": allowed})

    async def _read_json(self, request: Any) -> Any:
        ctype = (request.header("content-type") or "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise HTTPError(415, "the body must be JSON (Content-Type: application/json)")
        try:
            return orjson.loads(await request.read())
        except orjson.JSONDecodeError as exc:
            raise HTTPError(400, f"the body is not valid JSON: {exc}") from None

    async def _execute(self, session: Any, request: Any, identity: Any) -> HTTPResponse:
        try:
            body = await self._read_json(request)
        except HTTPError as exc:
            return _error(exc.status, exc.message)
        if not isinstance(body, dict):
            return _error(400, "the body must be a JSON object {template, targets, params, wait}")
        unknown = sorted(set(body) - {"template", "targets", "params", "wait"})
        if unknown:
            return _error(400, f"unknown key {unknown[0]!r} (known: template, targets, params, wait)")
        name = body.get("template")
        template = self.templates.get(name) if isinstance(name, str) else None
        if template is None:
            return _error(404, f"no template {name!r}" if isinstance(name, str) else "\"template\": a template name")
        targets = body.get("targets")
        if isinstance(targets, str):
            targets = [targets]
        max_targets = self.listener.extra.get("max_targets", DEFAULT_MAX_TARGETS)
        if (not isinstance(targets, list) or not targets or len(targets) > max_targets
                or not all(isinstance(t, str) and t for t in targets)):
            return _error(400, f"\"targets\": an array of 1 to {max_targets} target names")
        if len(set(targets)) != len(targets):
            return _error(400, "\"targets\": each target once")
        for t in targets:
            if not t.isascii() or not t.isprintable() or "/" in t or t.startswith("-"):
                return _error(400, f"\"targets\": a target name of printable ASCII, got {ascii(t)}")
        wait = body.get("wait", False)
        if not isinstance(wait, bool):
            return _error(400, "\"wait\": true or false")
        fields = {"template": template.name, "targets": targets}
        # Scopes first: a caller without them learns nothing about the parameters.
        missing = sorted(set(template.scopes) - self.scopes_of(identity))
        if missing:
            msg = f"the template {template.name!r} needs scope(s) {', '.join(missing)}, which no role of " \
                  f"{identity.user!r} carries"
            self._denied(session, identity, "scope", "missing_scope", msg, missing_scopes=missing, **fields)
            return _error(403, msg)
        try:
            params = template.validate(body.get("params"))
        except ParamError as exc:
            self._denied(session, identity, "params", "invalid_parameter", str(exc), param=exc.param, **fields)
            return _error(400, str(exc), param=exc.param)
        # Every target: the template's globs, a route, and a role granting (target, login).
        plans: list[tuple[str, Any, str]] = []
        for t in targets:
            if not template.allows_target(t):
                msg = f"the template {template.name!r} may not run on {t!r} (its targets: {', '.join(template.targets)})"
                self._denied(session, identity, "target", "template_target", msg, **fields)
                return _error(403, msg)
            route = self.select_route({"target": t})
            if route is None:
                msg = f"no route for target {t!r} on listener {self.listener.name}"
                self._denied(session, identity, "route", "no_route", msg, **fields)
                return _error(404, msg)
            login = route.backend.extra.get("login") or template.login
            if not login:
                msg = f"neither route {route.name!r} nor template {template.name!r} names the login for {t!r}"
                self._denied(session, identity, "route", "no_login", msg, **fields)
                return _error(500, msg)
            try:
                self.access.authorize(identity, route=route.name, database=t, db_user=login, family="terminal")
            except AccessDenied as exc:
                self._denied(session, identity, "authorize", exc.reason, str(exc), **fields)
                return _error(403, str(exc))
            plans.append((t, route, login))
        if self._nursery is None:
            return _error(503, "the proxy is not running jobs (starting or stopping)")
        if not self.services.recorder.accepting:
            return _error(503, "audit unavailable: no command runs unaudited")
        try:
            self.limits.admit(identity.user, targets)
        except LimitExceeded as exc:
            self._denied(session, identity, "limit", "too_many_jobs", str(exc), **fields)
            return _error(429, str(exc), headers=(("retry-after", "1"),))
        self._purge()
        job = Job(id=new_job_id(), template=template, params=params, user=identity.user,
                  client_addr=session.client_addr, identity=identity, command=template.command_line(params))
        for t, route, login in plans:
            job.runs.append(TargetRun(job=job, target=t, login=login, route=route.name))
        self.jobs[job.id] = job
        self._nursery.start_soon(self._run_job, job, [route for _, route, _ in plans])
        if wait:
            await job.done.wait()
            return HTTPResponse.json(200, job.snapshot())
        return HTTPResponse.json(202, job.snapshot(), headers=(("location", f"/jobs/{job.id}"),))

    def _purge(self) -> None:
        keep = self.listener.extra.get("job_retention_seconds", DEFAULT_RETENTION)
        now = time.time()
        for jid in [j for j, job in self.jobs.items() if job.finished_at is not None and now - job.finished_at > keep]:
            del self.jobs[jid]
        while len(self.jobs) >= MAX_JOBS_KEPT:
            oldest = next((j for j, job in self.jobs.items() if job.done.is_set()), None)
            if oldest is None:
                break
            del self.jobs[oldest]

    def _own_job(self, identity: Any, job_id: str) -> Job | None:
        job = self.jobs.get(job_id)
        # Another caller's job is "not found": its id says nothing to whoever guesses it.
        return job if job is not None and job.user == identity.user else None

    async def _job(self, session: Any, request: Any, identity: Any, job_id: str) -> HTTPResponse:
        job = self._own_job(identity, job_id)
        if job is None:
            return _error(404, f"no job {job_id!r} of {identity.user!r}")
        query = dict(urllib.parse.parse_qsl(request.query))
        if query.get("stream") in ("1", "true"):
            return HTTPResponse(200, (("content-type", "application/x-ndjson"), ("cache-control", "no-store")),
                                _stream(job))
        return HTTPResponse.json(200, job.snapshot())

    async def _cancel(self, session: Any, request: Any, identity: Any, job_id: str) -> HTTPResponse:
        job = self._own_job(identity, job_id)
        if job is None:
            return _error(404, f"no job {job_id!r} of {identity.user!r}")
        if not job.done.is_set():
            job.cancel()
            with trio.move_on_after(KILL_GRACE):
                await job.done.wait()
        return HTTPResponse.json(200, job.snapshot())

    async def _audit_logs(self, session: Any, request: Any, identity: Any) -> HTTPResponse:
        scope = self.listener.extra.get("audit_scope", DEFAULT_AUDIT_SCOPE)
        if scope not in self.scopes_of(identity):
            msg = f"reading the audit trail needs scope {scope!r}, which no role of {identity.user!r} carries"
            self._denied(session, identity, "scope", "missing_scope", msg, missing_scopes=[scope],
                         http_path=request.path)
            return _error(403, msg)
        path = self.listener.extra.get("audit_log_file") or _first_jsonl(self.services)
        if path is None:
            return _error(404, "no JSONL audit sink is configured (commands.audit_log_file)")
        try:
            q = parse_query(dict(urllib.parse.parse_qsl(request.query, keep_blank_values=True)))
        except QueryError as exc:
            return _error(400, str(exc))
        page = await trio.to_thread.run_sync(read_page, path, q)
        return HTTPResponse.json(200, page)

    # -- jobs --------------------------------------------------------------------------------
    def _open_recording(self, run: TargetRun, session: Session) -> dict:
        """The run's output recording (asciicast v2, as an SSH exec or shell channel's), when configured."""
        folder = self.listener.extra.get("recording_dir")
        if folder is None:
            return {}
        import os

        from ..terminal.recording import AsciicastWriter

        path = os.path.join(folder, f"{session.id}.cast")
        try:
            run.recorder = AsciicastWriter(path, 80, 24, None)
        except OSError as exc:
            # Nothing unrecorded reaches a target: without its recording the run does not start.
            raise RecordingUnavailable(f"recording unavailable: {exc.strerror or exc}") from None
        return {"recording": os.path.basename(path)}

    async def _run_job(self, job: Job, routes: list) -> None:
        try:
            async with trio.open_nursery() as nursery:
                for run, route in zip(job.runs, routes):
                    nursery.start_soon(self._run_target, run, route)
        finally:
            self.limits.release_caller(job.user)
            job.finish()

    async def _run_target(self, run: TargetRun, route: Any) -> None:
        job = run.job
        session = Session(listener=self.listener.name, protocol=self.protocol, client_addr=job.client_addr,
                          family=self.family, event_family=self.event_family)
        session.identity = job.identity
        session.target, session.login = run.target, run.login
        session.route_name, session.backend_addr = route.name, route.backend.address
        session.audit = audit = self.services.recorder.session(session)
        run.session_id = session.id
        common = {"job_id": job.id, "template": job.template.name, "params": job.params}
        try:
            # Before anything reaches the target: what will run there, exactly.
            run.command_line = self.command_line(job)
            recording = self._open_recording(run, session)
            audit.emit("command.start", command=run.command_line, argv=job.template.argv_for(job.params),
                       env=[k for k, _ in job.template.env_for(job.params)], **recording, **common)
            await audit.flush()
            if hasattr(audit, "wait_durable"):  # "durability": "ack": on disk before the target sees it
                await audit.wait_durable()
            if not self.services.recorder.accepting:  # a fail-closed sink can take no more
                raise RecordingUnavailable("audit unavailable: the command was not run")
            run.status = "running"
            run.started = time.monotonic()
            job.notify()
            # Entered by the runner (see ``execute``), not here: the runner's own machinery (an
            # event loop it opened) must outlive the stop to kill the remote command.
            scope = run.scope = trio.CancelScope(deadline=trio.current_time() + job.template.timeout)
            if run.stop_reason is not None:  # cancelled before it started
                scope.cancel()
            try:
                await self.execute(run, route, session)
            except TargetUnavailable as exc:
                run.status, run.error = "error", exc.hint
                log.info("job %s: target %s: %s", job.id, run.target, exc)
            run.ended = time.monotonic()
            if run.status != "error":
                if scope.cancelled_caught or run.stop_reason is not None:
                    run.status = run.stop_reason or "timeout"
                elif run.exit_status == 0:
                    run.status = "succeeded"
                else:
                    run.status = "failed"
        except RecordingUnavailable as exc:
            run.status, run.error = "error", str(exc)
            log.error("job %s: target %s: %s", job.id, run.target, exc)
        except Exception as exc:
            run.status, run.error = "error", f"internal error: {exc.__class__.__name__}"
            log.exception("job %s: target %s failed", job.id, run.target)
        finally:
            if run.status not in FINISHED:  # the server is stopping: the run was cut off
                run.status = "cancelled"
            if run.ended is None:
                run.ended = time.monotonic()
            self.limits.release_target(run.target)
            fields = {"success": run.status == "succeeded", "status": run.status, "exit_status": run.exit_status,
                      "exit_signal": run.exit_signal, "duration_ms": run.duration_ms,
                      "stdout_bytes": len(run.stdout), "stderr_bytes": len(run.stderr),
                      "output_truncated": run.truncated, **run.digests(), **common}
            if run.recorder is not None:
                # In the end event, so the audit's hash chain covers the recording's bytes.
                fields.update(run.recorder.close())
            if run.error:
                fields["error"] = run.error
            audit.emit("command.execute", **fields)
            job.notify()
            with trio.CancelScope(shield=True):
                with trio.move_on_after(5):
                    await audit.flush()
                audit.forget()


class RecordingUnavailable(Exception):
    """The run cannot be recorded or audited: it does not start."""


def _first_jsonl(services: Any) -> str | None:
    config = services.extras.get("config")
    for sink in getattr(getattr(config, "audit", None), "sinks", ()):
        if sink.type == "jsonl" and sink.path:
            return sink.path
    return None


async def _stream(job: Job):
    """NDJSON: each output chunk as it arrives, then ``{"event": "end", "job": …}``."""
    decoders: dict = {}
    index = 0
    while True:
        changed = job.changed
        while index < len(job.log):
            target, stream, data = job.log[index]
            index += 1
            dec = decoders.get((target, stream))
            if dec is None:
                dec = decoders[(target, stream)] = codecs.getincrementaldecoder("utf-8")("replace")
            text = dec.decode(data)
            if text:
                yield orjson.dumps({"event": "output", "target": target, "stream": stream, "data": text}) + b"\n"
        if job.done.is_set():
            yield orjson.dumps({"event": "end", "job": job.snapshot(output=False)}) + b"\n"
            return
        await changed.wait()


def _only(method: str, allowed: str) -> HTTPResponse | None:
    if method == allowed or (allowed == "GET" and method == "HEAD"):
        return None
    return _error(405, f"method {method} not allowed here (use {allowed})", headers=(("allow", allowed),))


def _error(status: int, message: str, *, headers: tuple = (), param: str | None = None) -> HTTPResponse:
    err: dict = {"code": status, "message": message}
    if param is not None:
        err["param"] = param
    return HTTPResponse.json(status, {"error": err}, headers=headers)
