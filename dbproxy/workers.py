"""``"workers": N``: N proxy processes on the same ports, one supervisor, one audit chain.

Strategy.  One trio loop is one core; past one core's worth of traffic the
proxy runs N copies of itself.  ``dbproxy serve`` with ``"workers": N > 1``
becomes the *supervisor* (``supervise``): it serves no client itself, and

- starts the one audit worker (its ``AuditLink`` with ``listen``: the worker
  also accepts links on ``audit.sock``), and writes the run's
  ``proxy.start``/``proxy.stop`` through it, so ``dbproxy audit verify``
  sees one run, one chain;
- starts N proxy processes (``python -m dbproxy.workers worker …``), each a
  whole ``ProxyServer`` whose every listener (TCP and UDP) is bound with
  SO_REUSEPORT — the kernel spreads new connections over them by a hash of
  the addresses, nothing passes through the supervisor — whose audit link
  connects to ``audit.sock`` (``proxy.worker.start``/``stop`` markers; every
  session's events carry ``proxy_worker``), and which serves
  ``worker-<i>.sock`` (``dbproxy.siblings``: a cancel request that lands on
  a process not holding the session is routed to the one that does);
- creates the shared connection-limit table (``limits``,
  ``dbproxy.limits.SharedCounts``): a limit holds across the processes;
- restarts a process that dies (``proxy.worker.exit`` in the trail, its
  limit counts dropped; the others keep serving); SIGHUP (``dbproxy
  reload``) is passed to every process, each re-reads the file; SIGTERM /
  SIGINT stop every process (each with its ``shutdown_grace``), then the
  audit worker;
- serves the admin listener itself: ``/metrics`` is every process's
  registry, gathered over ``worker-<i>.sock`` at scrape time, each sample
  labelled ``worker="<i>"``; ``/readyz`` is ready while every process is;
  ``/healthz`` healthy while every process runs.

Its state (the sockets, the table) lives in a private temporary directory,
removed at exit.  ``"workers": 1`` (the default) runs none of this: the one
process is what ``dbproxy serve`` always was.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import Any

import attrs
import trio

log = logging.getLogger("dbproxy.workers")

RESTART_DELAY = 1.0  # seconds before a process that died is started again
READY_TIMEOUT = 60.0


from .workerctx import WorkerContext, audit_socket, current, limits_file  # noqa: F401  (current: the API)


# --------------------------------------------------------------------------- the proxy process


def worker_main(argv: list[str]) -> int:
    """``python -m dbproxy.workers worker CONFIG INDEX COUNT STATE_DIR`` (started by the supervisor)."""
    from dbproxy.audit import recorder as audit_recorder

    from . import workerctx

    from .config import load_config
    from .errors import ConfigErrors
    from .logs import configure_from_env
    from .registry import default_registry

    config_file, index, count, state_dir = argv[0], int(argv[1]), int(argv[2]), argv[3]
    workerctx.set_current(WorkerContext(index, count, state_dir))
    audit_recorder.PROXY_WORKER = index
    # Ctrl-C reaches the whole process group: the supervisor decides (it sends SIGTERM).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_from_env(level=None, process=f"proxy-{index}")
    registry = default_registry()
    try:
        config = load_config(config_file, registry)
    except ConfigErrors as exc:
        for err in exc.errors:
            log.error("proxy process %d: %s", index, err)
        return 2
    trio.run(_serve_worker, config, registry)
    return 0


async def _serve_worker(config: Any, registry: Any) -> None:
    from prometheus_client.exposition import generate_latest

    from .metrics import health, readiness
    from .server import ProxyServer
    from .siblings import Siblings

    ctx = current()
    server = ProxyServer(config, registry)
    siblings = Siblings(ctx.state_dir, ctx.index, ctx.count)
    server.services.extras["siblings"] = siblings  # engines route by it (postgres: cancel requests)

    async def metrics_text(_key: bytes) -> bytes:
        return generate_latest(server.metrics.registry)

    async def ready(_key: bytes) -> bytes:
        ok, reason = readiness(server)
        alive, detail = health(server)
        return json.dumps({"ready": ok, "reason": reason, "healthy": alive, "health": detail}).encode()

    siblings.register("proxy.metrics", metrics_text)
    siblings.register("proxy.ready", ready)
    stdout = trio.lowlevel.FdStream(os.dup(1))
    stdin = trio.lowlevel.FdStream(os.dup(0))
    scope = trio.CancelScope()
    async with trio.open_nursery() as nursery:

        async def watch_signals(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
                task_status.started()
                count = 0
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        log.info("proxy process %d: reloading %s", ctx.index, config.file)
                        await server.reload()
                        continue
                    count += 1
                    if count == 1:
                        server.stop()
                    else:
                        scope.cancel()

        async def watch_supervisor() -> None:
            # The supervisor holds our stdin: its end (the supervisor died) stops this process.
            try:
                while await stdin.receive_some(1024):
                    pass
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            if not server.stopping:
                log.warning("proxy process %d: the supervisor is gone; stopping", ctx.index)
                server.stop()

        await nursery.start(watch_signals)
        await nursery.start(siblings.serve)
        nursery.start_soon(watch_supervisor)
        with scope:
            async with trio.open_nursery() as inner:
                bound = await inner.start(server.run)
                said = {"ready": True, "pid": os.getpid(),
                        "bound": [[b.name, b.protocol, b.host, b.port, b.kind] for b in bound]}
                try:
                    await stdout.send_all(json.dumps(said).encode() + b"\n")
                except (trio.BrokenResourceError, OSError):
                    server.stop()
        nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- the supervisor


@attrs.define(eq=False)
class _Proc:
    index: int
    process: Any = None
    ready: bool = False
    starts: int = 0
    bound: list = attrs.field(factory=list)


class Supervisor:
    def __init__(self, config: Any, registry: Any) -> None:
        self.config = config
        self.registry = registry
        self.count = config.workers
        self.state_dir = tempfile.mkdtemp(prefix="dbproxy-")
        self.procs = [_Proc(i) for i in range(self.count)]
        self.stopping = False
        self.link: Any = None
        self.all_ready = trio.Event()
        self.done = trio.Event()
        self.admin_address: tuple[str, int] | None = None

    # -- the audit ----------------------------------------------------------------------
    def _marker(self, kind: str, **fields: Any) -> None:
        from dbproxy.audit import events as ev
        from dbproxy.audit.recorder import serialize

        from . import __version__

        body = serialize(ev.marker(kind, pid=os.getpid(), version=__version__, **fields))
        if not self.link.submit_nowait(body):
            log.error("audit: no room for the %s event", kind)

    # -- the processes ------------------------------------------------------------------
    async def _run_proc(self, proc: _Proc) -> None:
        """Run process ``proc.index`` until the supervisor stops; start it again when it dies."""
        from dbproxy.audit import events as ev

        from .limits import SharedCounts

        while not self.stopping:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "dbproxy.workers", "worker", os.path.abspath(self.config.file),
                 str(proc.index), str(self.count), self.state_dir],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            proc.process, proc.starts = process, proc.starts + 1
            watched = False
            try:
                await self._watch(proc, process)
                watched = True
            finally:
                if not watched and process.returncode is None and not self.stopping:
                    # Cancelled (another process failed to start): every process stops.  Not when
                    # its output ended: a process that dies closes its stdout a moment before the
                    # kernel lets it be reaped (``returncode`` is still None then), and that
                    # death is a restart, not a reason to stop the others.
                    self.stop()
                with trio.CancelScope(shield=True):
                    await process.wait()
                ever_ready, proc.ready = proc.ready or proc.starts > 1, False
            if self.stopping:
                return
            if not ever_ready:
                raise RuntimeError(f"proxy process {proc.index} failed to start (status {process.returncode}); "
                                   f"see its log above")
            log.error("proxy process %d (pid %d) exited with status %s; starting it again",
                      proc.index, process.pid, process.returncode)
            self._marker(ev.PROXY_WORKER_EXIT, worker=proc.index, worker_pid=process.pid,
                         status=process.returncode, restarting=True)
            # Its sessions are gone: so are their slots under the connection limits.
            SharedCounts(limits_file(self.state_dir), self.count, proc.index).clear_worker(proc.index)
            await trio.sleep(RESTART_DELAY)

    async def _watch(self, proc: _Proc, process: Any) -> None:
        buffer = b""
        while True:
            try:
                data = await process.stdout.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                data = b""
            if not data:
                return
            buffer += data
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                try:
                    said = json.loads(line)
                except ValueError:
                    continue
                if said.get("ready"):
                    proc.ready, proc.bound = True, said.get("bound", [])
                    if all(p.ready for p in self.procs):
                        self.all_ready.set()

    def signal_all(self, signum: int) -> None:
        for proc in self.procs:
            process = proc.process
            if process is not None and process.returncode is None:
                try:
                    process.send_signal(signum)
                except ProcessLookupError:
                    pass

    async def reload(self) -> None:
        """Check the file first (an invalid one is named here too), then every process re-reads it."""
        from .config import load_config
        from .errors import ConfigErrors

        try:
            new = load_config(self.config.file, self.registry)
        except (ConfigErrors, OSError) as exc:
            for err in getattr(exc, "errors", None) or [exc]:
                log.error("reload: %s (every proxy process keeps its running config)", err)
            # Each process refuses it too, and audits the refusal (proxy.reload).
        else:
            if new.workers != self.count:
                log.warning("reload: \"workers\" changed to %d; it applies when the proxy restarts", new.workers)
        self.signal_all(signal.SIGHUP)

    # -- the run ------------------------------------------------------------------------
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        from dbproxy.audit import events as ev
        from dbproxy.audit.link import LINK_DELAY, AuditLink
        from dbproxy.audit.sinks.jsonl import previous_run

        from .limits import SharedCounts

        config = self.config
        SharedCounts.create(limits_file(self.state_dir), self.count)
        durable = config.audit.durability == "ack"
        self.link = AuditLink(config.file, durable_sessions=durable, link_delay=0.0 if durable else LINK_DELAY,
                              listen=audit_socket(self.state_dir))
        try:
            async with trio.open_nursery() as audit_nursery:
                await audit_nursery.start(self.link.run)
                self._marker(ev.PROXY_START, durability=config.audit.durability, workers=self.count,
                             **previous_run(config.audit.sinks))
                try:
                    async with trio.open_nursery() as outer:  # the admin listener, until the processes end
                        async with trio.open_nursery() as procs:
                            for proc in self.procs:
                                procs.start_soon(self._run_proc, proc)
                            with trio.fail_after(READY_TIMEOUT):
                                await self.all_ready.wait()
                            if config.admin is not None:
                                self.admin_address = await outer.start(self._serve_admin)
                            task_status.started(self.procs[0].bound)
                        outer.cancel_scope.cancel()
                    self._marker(ev.PROXY_STOP, reason="stopped", workers=self.count)
                finally:
                    with trio.CancelScope(shield=True):
                        await self.link.aclose()
        finally:
            shutil.rmtree(self.state_dir, ignore_errors=True)
            self.done.set()

    def stop(self) -> None:
        """Every process stops (its own shutdown grace); ``run`` returns when all have exited."""
        self.stopping = True
        self.signal_all(signal.SIGTERM)

    # -- the admin listener ---------------------------------------------------------------
    async def _serve_admin(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        from .admin import serve_admin

        await serve_admin(self, self.config.admin.host, self.config.admin.port, handler=SupervisorAdmin(self),
                          task_status=task_status)

    async def ask_all(self, name: str) -> dict[int, bytes | None]:
        from .siblings import ask, socket_path

        answers: dict[int, bytes | None] = {}

        async def one(i: int) -> None:
            answers[i] = await ask(socket_path(self.state_dir, i), name)

        async with trio.open_nursery() as nursery:
            for proc in self.procs:
                nursery.start_soon(one, proc.index)
        return answers


class SupervisorAdmin:
    """The admin endpoints over every process (``dbproxy.admin``'s handler shape)."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    async def handle_http_request(self, session: Any, request: Any) -> Any:
        from .listen.http import HTTPResponse

        path = request.path
        if request.method not in ("GET", "HEAD"):
            return HTTPResponse.json(405, {"error": {"code": 405, "message": "only GET and HEAD"}},
                                     (("allow", "GET, HEAD"),))
        if path == "/metrics":
            texts = await self.supervisor.ask_all("proxy.metrics")
            body = merge_metrics({i: t.decode() for i, t in texts.items() if t is not None})
            return HTTPResponse(200, (("content-type", "text/plain; version=0.0.4; charset=utf-8"),), body.encode())
        if path in ("/healthz", "/readyz"):
            answers = await self.supervisor.ask_all("proxy.ready")
            states = {i: json.loads(a) if a is not None else None for i, a in answers.items()}
            if path == "/healthz":
                ok = all(s is not None and s["healthy"] for s in states.values())
                return HTTPResponse.json(200 if ok else 503, {
                    "status": "ok" if ok else "unavailable",
                    "workers": {str(i): (s["health"] if s is not None else {"status": "not running"})
                                for i, s in states.items()}})
            if self.supervisor.stopping:
                return HTTPResponse.json(503, {"ready": False, "reason": "stopping: no new sessions"})
            down = [f"process {i}: {s['reason'] if s is not None else 'not running'}"
                    for i, s in states.items() if s is None or not s["ready"]]
            return HTTPResponse.json(503 if down else 200, {"ready": not down, "reason": "; ".join(down) or "ready"})
        return HTTPResponse.json(404, {"error": {"code": 404, "message": f"no {path} here: /metrics, /healthz, /readyz"}})


def merge_metrics(texts: dict[int, str]) -> str:
    """Prometheus text format (0.0.4) of several processes as one: each family once (its HELP and
    TYPE), with every process's samples labelled ``worker="<i>"``."""
    families: dict[str, tuple[list[str], list[str]]] = {}
    for index, text in sorted(texts.items()):
        family = None
        for line in text.splitlines():
            if line.startswith(("# HELP ", "# TYPE ")):
                name = line.split(" ", 3)[2]
                family = families.setdefault(name, ([], []))
                if line not in family[0]:
                    family[0].append(line)
            elif not line.strip() or line.startswith("#"):
                continue
            else:
                if family is None:
                    family = families.setdefault("", ([], []))
                family[1].append(_with_worker(line, index))
    out: list[str] = []
    for header, samples in families.values():
        out += header
        out += samples
    return "\n".join(out) + "\n"


def _with_worker(sample: str, index: int) -> str:
    brace, space = sample.find("{"), sample.find(" ")
    if 0 <= brace < space or (brace >= 0 and space < 0):
        return f'{sample[:brace + 1]}worker="{index}",{sample[brace + 1:]}'.replace(",}", "}")
    return f'{sample[:space]}{{worker="{index}"}}{sample[space:]}'


async def supervise(config: Any, registry: Any) -> None:
    """``dbproxy serve`` with ``"workers": N > 1``: what ``cli._serve_main`` is for one process."""
    supervisor = Supervisor(config, registry)
    async with trio.open_nursery() as nursery:

        async def watch_signals(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
                task_status.started()
                count = 0
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        log.info("received SIGHUP: every proxy process reloads %s", config.file)
                        await supervisor.reload()
                        continue
                    count += 1
                    if count == 1:
                        log.info("received %s: graceful shutdown of %d proxy processes (grace %.1fs)",
                                 signal.Signals(signum).name, supervisor.count, config.shutdown_grace)
                        supervisor.stop()
                    else:
                        log.warning("second signal: every proxy process ends its sessions now")
                        supervisor.signal_all(signal.SIGTERM)

        await nursery.start(watch_signals)
        try:
            bound = await nursery.start(supervisor.run)
        except BaseException:
            supervisor.stop()
            raise
        for name, protocol, host, port, kind in bound:
            kind = "" if kind == "tcp" else f" ({kind})"
            print(f"dbproxy: {name} ({protocol}) listening on {host}:{port}{kind} ({supervisor.count} processes)",
                  flush=True)
        if supervisor.admin_address is not None:
            host, port = supervisor.admin_address
            print(f"dbproxy: admin listening on {host}:{port} (/metrics, /healthz, /readyz)", flush=True)
        # ``run`` ends once every process has exited after ``stop`` and the audit worker is done.
        await supervisor.done.wait()
        nursery.cancel_scope.cancel()
    log.info("stopped")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 5 and argv[0] == "worker":
        return worker_main(argv[1:])
    print("usage: python -m dbproxy.workers worker CONFIG INDEX COUNT STATE_DIR (started by dbproxy serve)",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
