"""The proxy server: listeners, sessions, graceful shutdown.

Nursery tree (everything has an owner, nothing outlives ``run``):

    run
    ├── audit drain task (recorder.run)           — outlives sessions, closes last
    │                                               (with ``audit.worker``: the link to the audit worker process)
    ├── admin listener (config "admin": /metrics, /healthz, /readyz; dbproxy.admin)
    ├── agents listener (config "agents": outbound agents' links; dbproxy.agent.hub)
    └── sessions nursery                          — one task per client connection / datagram peer
        └── accept nursery                        — one task per listener (dbproxy.listen: tcp, tls, udp, http)

``stop()`` cancels the accept nursery (no new connections), gives running
sessions ``shutdown_grace`` seconds to end on their own, then cancels them;
finally the recorder drains every queued event to the sinks.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import attrs
import trio

from dbproxy.audit.link import LINK_DELAY, AuditLink
from dbproxy.audit import events as ev
from dbproxy.audit.recorder import AUDIT_UNAVAILABLE, BATCH_DELAY, AuditRecorder, serialize
from dbproxy.audit.sinks import build_sink
from dbproxy.audit.sinks.jsonl import previous_run

from .buffer import BufferBudget
from .config import Config, ListenerConfig
from .engine import EngineRegistry, Services
from .errors import ProxyError
from .listen import bound_address, make_entry, open_listener, serve_listener
from .listen.proxied import peer_host, read_proxy_header
from .logs import SESSION
from .metrics import ProxyMetrics
from .net import AGENTS, peer_address
from .proxyproto import ClosedBeforeHeader, ProxyProtocolError
from .session import Session
from .workerctx import current as current_worker

log = logging.getLogger("dbproxy.server")


# After the proxy ended a session, how long it keeps reading (and discarding) what the
# client still sends before closing the socket.  Closing with unread input makes the
# kernel send a reset, and a reset can destroy the error the client has not read yet.
LINGER_SECONDS = 1.0


async def _linger(stream: trio.abc.Stream) -> None:
    """Half-close a plain TCP client and discard its input until it closes too (a lingering close)."""
    if type(stream) is not trio.SocketStream:
        return
    try:
        await stream.send_eof()
        while await stream.receive_some(65536):
            pass
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass


def _version() -> str:
    from . import __version__

    return __version__


@attrs.frozen
class BoundListener:
    name: str
    protocol: str
    host: str
    port: int
    kind: str = "tcp"


class ProxyServer:
    def __init__(self, config: Config, registry: EngineRegistry, *, recorder: AuditRecorder | None = None) -> None:
        self.config = config
        self.registry = registry
        # One of N proxy processes under a supervisor (``"workers": N``, dbproxy.workers); None: the only one.
        self.worker = current_worker()
        if recorder is None:
            durable = config.audit.durability == "ack"
            if config.audit.worker and os.path.isfile(config.file):
                # The trail is written by the audit worker process (it re-reads the
                # config file for its sinks); sessions only hand bytes over.  Under a supervisor
                # every process links to the supervisor's one worker (one chain).
                recorder = AuditLink(config.file, durable_sessions=durable, link_delay=0.0 if durable else LINK_DELAY,
                                     connect=self.worker.audit_socket if self.worker is not None else None)
            else:
                sinks = [build_sink(s) for s in config.audit.sinks]
                if durable:  # one fdatasync per batch (group commit), as the audit worker does
                    for sink in sinks:
                        if getattr(sink, "fsync", None) in ("interval", "never"):
                            sink.fsync = "always"
                recorder = AuditRecorder(sinks, capacity=config.audit.queue_size, durable_sessions=durable,
                                         batch_delay=0.0 if durable else BATCH_DELAY)
        self.recorder = recorder
        # One budget for every session's partly received messages (dbproxy.buffer).
        self.services = Services(
            recorder=self.recorder,
            buffers=BufferBudget(config.buffers.budget_bytes, message_timeout=config.buffers.message_timeout),
        )
        # Engines that need the whole config (the command API reads the JSONL trail's path).
        self.services.extras["config"] = config
        # Per server (not prometheus-client's global registry): in-process servers keep their own.
        self.metrics = ProxyMetrics(self)
        self.services.metrics = self.metrics
        self.engines = {}
        self.sessions: dict[str, Session] = {}
        self.bound: list[BoundListener] = []
        self.listening = False  # every listener bound, accepting
        self.admin_address: tuple[str, int] | None = None
        self.agents = self._agent_hub(config)  # dbproxy.agent.hub.AgentHub, None without an "agents" section
        self._stop = trio.Event()
        self._accept_scope: trio.CancelScope | None = None
        # What a new connection on each listener gets: (entry, ListenerConfig) of the current
        # config generation; a reload swaps it, running sessions keep the objects they started with.
        self._live: dict[str, tuple[Any, ListenerConfig]] = {}
        self._accepting: dict[str, trio.CancelScope] = {}
        self._nurseries: tuple[trio.Nursery, trio.Nursery, trio.Nursery] | None = None  # accept, sessions, background
        self._reload_lock = trio.Lock()
        self.reloads = 0

    def _agent_hub(self, config: Config) -> Any:
        if config.agents is None:
            return None
        from .agent.hub import AgentHub
        from .agent.tokens import NodeTokens
        from .identity.authority import TokenAuthority

        return AgentHub(config.agents, NodeTokens(TokenAuthority(config.identity.token)), emit=self._marker)

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def _make_engines(self) -> None:
        from .access import build_access
        from .kerberos import maybe_credential_cache

        self.services.credentials = maybe_credential_cache(self.config)
        self.services.access = build_access(self.config)
        for lc in self.config.listeners:
            self.engines[lc.name] = self.registry.get(lc.protocol)(lc, self.services)
            self._live[lc.name] = (make_entry(self.engines[lc.name], lc, self.services), lc)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        self._make_engines()
        async with trio.open_nursery() as audit_nursery:
            await audit_nursery.start(self.recorder.run)
            # A marker per run: ``dbproxy audit verify`` tells a clean stop (``proxy.stop``)
            # from a crash (a ``proxy.start`` with no stop before it).
            if self.worker is None:
                audit = self.config.audit
                self._marker(ev.PROXY_START, durability=audit.durability, **previous_run(audit.sinks))
            else:  # the supervisor marks the run; this is one of its processes
                self._marker(ev.PROXY_WORKER_START, worker=self.worker.index, workers=self.worker.count)
            try:
                async with trio.open_nursery() as background:
                    # Work shared by sessions (Kerberos acquisition and renewal) lives
                    # here: it outlives any one session, never the server.
                    if self.services.credentials is not None:
                        self.services.credentials.attach(background)
                    # Engines with work that outlives a connection (the command API's jobs).
                    for engine in self.engines.values():
                        if hasattr(engine, "attach"):
                            engine.attach(background)
                    if self.config.admin is not None and self.worker is None:  # else the supervisor's
                        from .admin import serve_admin

                        self.admin_address = await background.start(
                            serve_admin, self, self.config.admin.host, self.config.admin.port)
                    if self.agents is not None:
                        # Every session task inherits it: dbproxy.net.connect_backend dials through it.
                        AGENTS.set(self.agents)
                        await background.start(self.agents.serve)
                    await self._serve_sessions(background, task_status=task_status)
                    background.cancel_scope.cancel()
                if self.worker is None:
                    self._marker(ev.PROXY_STOP, reason="stopped")
                else:
                    self._marker(ev.PROXY_WORKER_STOP, worker=self.worker.index, reason="stopped")
            finally:
                with trio.CancelScope(shield=True):
                    await self.recorder.aclose()

    def _marker(self, kind: str, **fields: Any) -> None:
        body = serialize(ev.marker(kind, pid=os.getpid(), version=_version(), **fields))
        if not self.recorder.submit_nowait(body):
            log.error("audit: no room for the %s event", kind)

    async def _serve_sessions(self, background: trio.Nursery, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as sessions:
            async with trio.open_nursery() as accept:
                self._nurseries = (accept, sessions, background)
                for lc in self.config.listeners:
                    await self._open(lc)
                self.listening = True
                task_status.started(list(self.bound))
                await self._stop.wait()
                self.listening = False
                log.info("stopping: no new connections; %d sessions running", len(self.sessions))
                async with self._reload_lock:  # no reload half-applied while the listeners close
                    accept.cancel_scope.cancel()
            sessions.cancel_scope.deadline = trio.current_time() + self.config.shutdown_grace

    async def _open(self, lc: ListenerConfig) -> None:
        self._start(lc, await open_listener(lc, reuse_port=self.worker is not None))

    def _start(self, lc: ListenerConfig, opened: list) -> None:
        """Accept on ``lc``'s bound sockets, in its own cancel scope (a reload may close it alone)."""
        accept, sessions, _ = self._nurseries
        for sock in opened:
            host, port = bound_address(sock)
            self.bound.append(BoundListener(lc.name, lc.protocol, host, port, lc.kind))
            log.info("listener %s (%s, %s) on %s:%d", lc.name, lc.protocol, lc.kind, host, port)
        scope, done = trio.CancelScope(), trio.Event()
        self._accepting[lc.name] = (scope, done)
        accept.start_soon(self._serve, self.engines[lc.name], lc, opened, sessions, scope, done)

    def _close(self, name: str) -> trio.Event | None:
        """Stop accepting on a listener; its running sessions go on.  The returned event is set
        once its sockets are closed."""
        self.bound = [b for b in self.bound if b.name != name]
        found = self._accepting.pop(name, None)
        if found is None:
            return None
        scope, done = found
        scope.cancel()
        return done

    async def _serve(self, engine: Any, lc: Any, opened: list, sessions: trio.Nursery, scope: trio.CancelScope,
                     done: trio.Event) -> None:
        # The listener's kind decides what the engine is handed; every connection (or UDP peer)
        # comes back through handle_client, the one session accounting for all kinds — with the
        # engine and listener config current when it arrives (a reload may have swapped them).
        async def current(_entry: Any, _lc: Any, transport: Any) -> None:
            entry, live_lc = self._live[lc.name]
            await self.handle_client(entry, live_lc, transport)

        try:
            with scope:
                await serve_listener(lc, engine, self.services, opened, current, sessions)
        finally:
            done.set()

    async def reload(self) -> bool:
        """Re-read the config file: new sessions use the new config, running sessions keep theirs.

        Listeners are matched by name.  One whose address, kind and socket options are unchanged
        keeps its socket (no connection is refused meanwhile) and its next connections get the
        new engine; a listener moved elsewhere is opened at the new address before the old one
        closes; a removed one stops accepting.  An invalid file changes nothing: the old config
        stays, every problem is logged, and the refusal is audited (``proxy.reload``).  The
        ``audit`` section is not reloaded (the worker reads it when it starts; a restart applies
        it), nor ``buffers``.  Connection limits count across the reload.
        """
        async with self._reload_lock:
            if self._nurseries is None or self._stop.is_set():
                return False
            return await self._reload()

    async def _reload(self) -> bool:
        from .access import build_access
        from .config import load_config
        from .errors import ConfigErrors
        from .kerberos import maybe_credential_cache

        try:
            new = load_config(self.config.file, self.registry)
        except (ConfigErrors, OSError) as exc:
            errors = getattr(exc, "errors", None) or [exc]
            for err in errors:
                log.error("reload refused, the running config stays: %s", err)
            # Paths only in the trail (an error's text may quote a value from the file).
            self._marker(ev.PROXY_RELOAD, success=False,
                         error=f"{len(errors)} config error(s)",
                         error_paths=[getattr(e, "path", "") for e in errors][:50])
            return False
        old = {lc.name: lc for lc in self.config.listeners}
        # Bind every new address first: if one cannot be bound, nothing has changed yet.
        fresh: dict[str, list] = {}
        for lc in new.listeners:
            before = old.get(lc.name)
            if before is not None and (_same_socket(before, lc) or (before.host, before.port) == (lc.host, lc.port)):
                continue  # kept, or re-bound at the same address once the old socket is closed
            try:
                fresh[lc.name] = await open_listener(lc, reuse_port=self.worker is not None)
            except OSError as exc:
                for opened in fresh.values():
                    for sock in opened:
                        if hasattr(sock, "aclose"):
                            await trio.aclose_forcefully(sock)
                        else:
                            sock.close()
                log.error("reload refused, the running config stays: listener %s cannot listen on %s:%d: %s",
                          lc.name, lc.host, lc.port, exc.strerror or exc)
                self._marker(ev.PROXY_RELOAD, success=False, error=f"listener {lc.name}: {exc.strerror or exc}")
                return False
        services = Services(recorder=self.recorder, buffers=self.services.buffers, extras=self.services.extras,
                            metrics=self.metrics)
        services.credentials = maybe_credential_cache(new)
        limits = self.services.access.limits if self.services.access is not None else None
        services.access = build_access(new, limits=limits)
        engines = {lc.name: self.registry.get(lc.protocol)(lc, services) for lc in new.listeners}
        for name, engine in engines.items():
            before = self.engines.get(name)
            # State that outlives a connection (the command API's jobs) carries over to the new
            # generation of the same engine, so a reload does not forget running work.
            if before is not None and type(before) is type(engine) and hasattr(engine, "adopt"):
                engine.adopt(before)
        background = self._nurseries[2]
        if services.credentials is not None:
            services.credentials.attach(background)
        for engine in engines.values():
            if hasattr(engine, "attach"):
                engine.attach(background)
        added, removed, changed, kept = [], [], [], []
        for lc in new.listeners:
            self._live[lc.name] = (make_entry(engines[lc.name], lc, services), lc)
        self.engines.update(engines)
        for name in [n for n in old if n not in engines]:
            self._close(name)
            self._live.pop(name, None)
            self.engines.pop(name, None)
            removed.append(name)
        for lc in new.listeners:
            before = old.get(lc.name)
            if before is None:
                self._start(lc, fresh[lc.name])
                added.append(lc.name)
            elif _same_socket(before, lc):
                (kept if before == lc else changed).append(lc.name)
            elif lc.name in fresh:  # moved: the new address is already listening
                self._close(lc.name)
                self._start(lc, fresh[lc.name])
                changed.append(lc.name)
            else:  # same address, another kind: the old socket must be closed first
                closed = self._close(lc.name)
                if closed is not None:
                    await closed.wait()
                try:
                    await self._open(lc)
                except OSError as exc:
                    log.error("reload: listener %s could not listen again on %s:%d: %s", lc.name, lc.host, lc.port,
                              exc.strerror or exc)
                    removed.append(lc.name)
                    continue
                changed.append(lc.name)
        if new.audit != self.config.audit:
            log.warning("reload: the audit section changed; it applies when the proxy restarts")
        if new.agents != self.config.agents:
            log.warning("reload: the agents section changed; it applies when the proxy restarts")
        self.config, self.services = new, services
        self.reloads += 1
        log.info("reloaded %s: %d listener(s) added, %d removed, %d changed, %d unchanged",
                 new.file, len(added), len(removed), len(changed), len(kept))
        self._marker(ev.PROXY_RELOAD, success=True, added=added, removed=removed, changed=changed)
        return True

    async def _proxy_header(self, session: Session, stream: Any, pp: Any) -> bool:
        """A trusted load balancer names the real client first (PROXY protocol v1/v2): the trail
        shows the client, with the balancer beside it.  False: no valid header (audited, closed)."""
        try:
            header = await read_proxy_header(stream, pp.timeout)
        except ClosedBeforeHeader:
            # Connect and close without a byte: a balancer's TCP health check (HAProxy "check"
            # without check-send-proxy), every few seconds — not worth an audit event.
            log.debug("session %s from %s: closed before any byte (a health check)", session.id, session.client_addr)
            session.details["end_reason"] = "health check"
            return False
        except ProxyProtocolError as exc:
            log.warning("session %s from %s (a trusted load balancer): %s", session.id, session.client_addr, exc)
            session.details["end_reason"] = f"PROXY protocol: {exc}"
            session.audit.on_session_start(success=False, error=f"PROXY protocol: {exc}")
            return False
        if header.client_addr is not None:  # LOCAL (a health check) keeps the connection's own address
            session.balancer_addr, session.client_addr = session.client_addr, header.client_addr
        return True

    async def handle_client(self, engine: Any, lc: Any, stream: trio.abc.Stream) -> None:
        session = Session(listener=lc.name, protocol=lc.protocol, client_addr=peer_address(stream))
        SESSION.set(session.id)  # every log line of this connection's tasks carries it (dbproxy.logs)
        # The engine's kind of session and the family its session events are named after
        # (``db.session.start`` …, ``ssh.session.start`` …), known before any event.
        session.family = getattr(engine, "family", session.family)
        session.event_family = getattr(engine, "event_family", session.event_family)
        session.audit = self.recorder.session(session)
        self.sessions[session.id] = session
        started = time.monotonic()
        outcome = "abandoned"  # unless it starts, is refused or fails
        try:
            pp = lc.proxy_protocol
            if pp is not None and pp.trusts(peer_host(stream) or "") and not await self._proxy_header(session, stream, pp):
                if session.details.get("end_reason") != "health check":  # a balancer's check is no refusal
                    outcome = "refused"
                    self.metrics.error(session, "proxy_protocol")
                return
            if not self.recorder.accepting:  # fail_closed: an audit sink can take no more events
                outcome = "refused"
                self.metrics.error(session, "audit_unavailable")
                log.warning("session %s from %s refused: audit unavailable", session.id, session.client_addr)
                if hasattr(engine, "refuse"):
                    with trio.move_on_after(10):
                        await engine.refuse(session, stream, AUDIT_UNAVAILABLE)
                return
            await engine.handle_connection(session, stream)
        except ProxyError as exc:
            session.details.setdefault("end_reason", str(exc))
            log.info("session %s ended: %s", session.id, exc)
        except (trio.BrokenResourceError, OSError) as exc:
            # The client reset or dropped the connection while an engine was talking to it
            # outside the pipeline (handshake, authentication, the first answer): an
            # everyday event, one line — not a traceback.
            cause = exc.__cause__ or exc
            session.details.setdefault("end_reason", f"connection lost: {cause.__class__.__name__}")
            log.info("session %s from %s: connection lost: %s", session.id, session.client_addr, cause)
        except Exception as exc:  # a bug in one session must not take the listener down
            session.details.setdefault("end_reason", f"internal error: {exc.__class__.__name__}")
            log.exception("session %s failed", session.id)
            outcome = "failed"
            self.metrics.error(session, "internal", exc.__class__.__name__)
        finally:
            self.sessions.pop(session.id, None)
            if outcome != "failed":
                outcome = "completed" if session.started else "refused" if session.details.get("refused") else outcome
            self.metrics.session_closed(session, outcome)
            access = getattr(engine, "services", self.services).access  # the generation that admitted it
            if access is not None:
                access.release(session)  # the connection-limit slot, if the engine admitted it
            with trio.CancelScope(shield=True):
                if session.started:
                    session.audit.on_session_end(
                        reason=session.details.get("end_reason", "closed"),
                        duration_ms=round((time.monotonic() - started) * 1000, 3),
                        **session.details.get("end_fields", {}),
                    )
                else:
                    session.audit.forget()  # no end event: drop its session_seq counter all the same
                with trio.move_on_after(5):
                    await session.audit.flush()
                with trio.move_on_after(LINGER_SECONDS):
                    await _linger(stream)
                await trio.aclose_forcefully(stream)


def _same_socket(a: ListenerConfig, b: ListenerConfig) -> bool:
    """Whether a reloaded listener can keep its socket: same address and kind, and for UDP the
    same datagram options (the socket's demultiplexer is built with them)."""
    return (a.host, a.port, a.kind, a.protocol) == (b.host, b.port, b.kind, b.protocol) and (a.kind != "udp" or a.udp == b.udp)
