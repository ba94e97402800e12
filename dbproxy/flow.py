"""One session flow for every engine (Teleport lib/srv/db's shape, owned by the core).

    accept → handshake (engine) → identify (engine) → route → authorize →
    connect the backend (engine) → audit start → ready (engine) → pipeline → audit end

The core owns the order, the deadlines (the listener's handshake timeout for
the handshake and, separately, for the client's proof of identity;
``CONNECT_TIMEOUT`` for the backend login), the mapping of what goes wrong to
audit events and to the client's answer, the connection-limit slot, and the
end statistics.  An engine supplies hooks and renders errors in its own wire
format (``Engine.render_error``); it never audits a refusal itself.

Every way a session is turned away before it starts is a ``Refused``: its
``error`` goes to the failed session-start event (with the engine's native
code fields), its ``client_message`` to the client, and when it carries an
access ``cause`` and a ``stage`` a ``db.session.access_denied`` event too.
Engine hooks raise ``Refused`` for their own refusals (a startup setting, a
wrong user name); the core builds them from ``UpstreamError`` /
``AccessDenied`` through the engine's ``upstream_refused`` / ``denied``.

The server (``dbproxy.server``) still owns what surrounds any session —
the audit-unavailable check, ``on_session_end``, releasing the
connection-limit slot, the lingering close — so those also cover an engine
that handles connections itself.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any, Callable

import attrs
import trio

from .access import audit_denial
from .channel import MessageStream, PeerClosed
from .errors import AccessDenied, ProtocolError, ProxyError, UpstreamError
from .pipeline import Pipeline
from .sansio import identity_encoder
from .tee import TapPlan, Tee

log = logging.getLogger("dbproxy.flow")

# How long the proxy's own login to a backend may take (connect, TLS, authentication).
CONNECT_TIMEOUT = 15.0
# How long the proxy tries to deliver its last word to a client that stopped reading.
SEND_QUIETLY_SECONDS = 5.0

_LOST = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


def _metrics(engine: Any) -> Any:
    """The server's ``dbproxy.metrics.ProxyMetrics`` (None: an engine run without a server, e.g. unit tests).
    Called a few times per session, never per message."""
    return getattr(getattr(engine, "services", None), "metrics", None)


def _count_error(engine: Any, session: Any, kind: str, code: Any = None) -> None:
    metrics = _metrics(engine)
    if metrics is not None:
        metrics.error(session, kind, code)


class Refused(ProxyError):
    """The session is turned away before it starts.

    ``error``: the audit event's text; ``client_message``: what the client is
    told (default the same); ``code``: the engine's native error code
    (SQLSTATE, CQL error code, Mongo code) and ``fields`` the audit fields
    naming it; ``cause`` + ``stage``: also audit ``db.session.access_denied``
    (``denial_fields`` added to that event only).
    """

    def __init__(self, error: str, *, client_message: str | None = None, code: Any = None, detail: str | None = None,
                 fields: dict | None = None, cause: AccessDenied | str | None = None, stage: str | None = None,
                 denial_fields: dict | None = None) -> None:
        super().__init__(error)
        self.error = error
        self.client_message = client_message if client_message is not None else error
        self.code = code
        self.detail = detail
        self.fields = fields or {}
        self.cause = cause
        self.stage = stage
        self.denial_fields = denial_fields or {}


class BackendTimeout(UpstreamError):
    """The backend login did not finish within ``CONNECT_TIMEOUT`` (engines may answer it apart)."""


@attrs.define(eq=False)
class Request:
    """What the client asked for, as learnt by the engine's handshake.

    ``client``: the client-side ``MessageStream`` (its stream is replaced by a
    TLS upgrade); ``keys``: the values of the engine's route ``match_keys``;
    ``target`` / ``login``: what the client asked to reach and as whom (the
    session's until a route says otherwise); ``start_fields``: fields of the
    session-start event; ``route``: the chosen route; ``waiting_for``: what the handshake timeout is
    reported as, kept current by the engine; ``extra``: the engine's own.
    """

    client: MessageStream
    keys: dict = attrs.field(factory=dict)
    target: str | None = None
    login: str | None = None
    start_fields: dict = attrs.field(factory=dict)
    waiting_for: str = "client handshake timed out"
    extra: Any = None
    route: Any = None  # set by the core once chosen


@attrs.define(eq=False)
class Backend:
    """A logged-in backend connection (``Engine.connect_backend``).

    ``start_fields`` join the session-start event; ``deferred_start``: the
    engine emits the session start itself later (Mongo: once the client proved
    who it is, in band); ``close``: extra cleanup after the stream is closed.
    """

    stream: Any
    decoder: Any
    encoder: Callable[[bytes], bytes] = identity_encoder
    start_fields: dict = attrs.field(factory=dict)
    link: Any = None
    deferred_start: bool = False
    close: Callable[[], None] | None = None

    async def aclose(self) -> None:
        try:
            await trio.aclose_forcefully(self.stream)
        finally:
            if self.close is not None:
                self.close()


@attrs.define(eq=False)
class Wiring:
    """How the engine's pipeline is put together (``Engine.wiring``).

    The engine declares; the core decides (``assemble``).  Per direction:
    ``client_observers`` / ``backend_observers``: read-only observers (audit
    stages: ``handle`` always returns None); ``client_stages`` /
    ``backend_stages``: active stages (policy: they may replace, answer,
    close) — with any, the session's messages are needed on the proxy.
    ``client_guards``: active stages that act only on the few messages a
    tapped session's tee still hands out (CQL: STARTUP after the handshake, a
    refused body); they run first, in both modes, and keep no session inline.
    ``tap``: what tapping takes (``dbproxy.tee.TapPlan``), None for an engine
    that is not tapped.  The core runs the observers inline — client side
    before the active stages (the attempt is recorded before a policy may
    refuse it), backend side after them (the audit records what the client
    gets; a stage that replaces a message shows the observers its
    replacement) — when there is no ``tap``, when an active stage needs the
    messages, or when the audit cannot tap (in-process audit); else it puts a
    ``Tee`` in place of each decoder, runs no stage on the proxy, and the
    audit worker runs the observers (``tap.tap``) on the tapped frames.

    ``finished``: called when the pipeline returns or fails, before
    ``Engine.session_ended``.  Set by the core: ``tees`` (the two ``Tee``
    objects of a tapped session, else None).

    ``relay``: an engine whose protocol
    library owns the transport (SSH: asyncssh multiplexes channels over it) runs
    the session itself; an object shaped like ``Pipeline`` (``async run()``,
    ``end_reason``, ``statistics()``) the core runs instead of building one (the
    decoders, stages and encoders are then unused).
    """

    client_decoder: Any
    backend_decoder: Any
    client_stages: list
    backend_stages: list
    state: Any
    client_error: Callable[[ProxyError], bytes]
    to_client_encoder: Callable[[bytes], bytes] = identity_encoder
    to_backend_encoder: Callable[[bytes], bytes] = identity_encoder
    finished: Callable[[], None] | None = None
    client_guards: list = attrs.field(factory=list)
    client_observers: list = attrs.field(factory=list)
    backend_observers: list = attrs.field(factory=list)
    tap: TapPlan | None = None
    tees: tuple[Tee, Tee] | None = None
    relay: Any = None

    @property
    def tapped(self) -> bool:
        return self.tees is not None


@attrs.frozen
class Plumbing:
    """What the pipeline runs, as ``assemble`` decided; ``close`` ends a tap (None: not tapped)."""

    client_decoder: Any
    backend_decoder: Any
    client_stages: list
    backend_stages: list
    close: Callable[[], None] | None = None


def assemble(wiring: Wiring, audit: Any) -> Plumbing:
    """Observers inline, or their frames to the audit worker: the core's decision (see ``Wiring``)."""
    plan = wiring.tap
    active = wiring.client_stages or wiring.backend_stages
    if plan is None or (active and not plan.active_frames) or not getattr(audit, "can_tap", False):
        return Plumbing(wiring.client_decoder, wiring.backend_decoder,
                        [*wiring.client_guards, *wiring.client_observers, *wiring.client_stages],
                        [*wiring.backend_stages, *wiring.backend_observers])
    slot = audit.tap_open(plan.tap, plan.params) if plan.params else audit.tap_open(plan.tap)
    tees = (plan.tee.over(wiring.client_decoder, plan.client, functools.partial(audit.tap, slot, 0)),
            plan.tee.over(wiring.backend_decoder, plan.backend, functools.partial(audit.tap, slot, 1)))
    wiring.tees = tees
    close = functools.partial(audit.tap_close, slot)
    if plan.active_frames:
        # The tees return the frames the active stages act on as messages (the rest are tapped):
        # those go through the observers and stages inline, as in an untapped session.
        return Plumbing(tees[0], tees[1], [*wiring.client_guards, *wiring.client_observers, *wiring.client_stages],
                        [*wiring.backend_stages, *wiring.backend_observers], close=close)
    # Guards run in both modes: here on the few frames the tees hand out (the rest are tapped).
    return Plumbing(tees[0], tees[1], list(wiring.client_guards), [], close=close)


async def send_quietly(stream: Any, data: bytes) -> None:
    """The proxy's last word to a client: best effort, bounded, never raises for a gone peer."""
    if not data:
        return
    with trio.move_on_after(SEND_QUIETLY_SECONDS):
        try:
            await stream.send_all(data)
        except _LOST:
            pass


async def _handshake(engine: Any, session: Any, stream: Any) -> Request | None:
    """The client's protocol hello under the handshake timeout; None when there is no session to run."""
    request = engine.new_request(session, stream)
    try:
        with trio.fail_after(engine.handshake_timeout):
            if not await engine.handshake(session, request):
                return None
    except trio.TooSlowError:
        _count_error(engine, session, "handshake_timeout")
        engine.handshake_timed_out(session, request.waiting_for)
        return None
    except PeerClosed:
        return None
    except _LOST as exc:
        # e.g. a reset during the startup packet or the TLS upgrade: not a session.
        log.info("session %s: client connection lost during startup: %s", session.id, exc.__cause__ or exc)
        return None
    except ProtocolError as exc:
        log.info("session %s: client protocol error during its handshake: %s", session.id, exc)
        _count_error(engine, session, "client_protocol")
        session.details.setdefault("end_reason", f"client protocol error: {exc}")
        await send_quietly(request.client.stream, engine.render_error(request, exc))
        return None
    except Refused as refused:
        await _refuse(engine, session, request, refused)
        return None
    return request


async def refuse_session(engine: Any, session: Any, stream: Any, reason: str) -> None:
    """Turn a client away before any session (e.g. the audit is unavailable, fail-closed):
    its handshake as usual, then the engine's native error with ``reason``."""
    request = await _handshake(engine, session, stream)
    if request is not None:
        await send_quietly(request.client.stream, engine.render_error(request, engine.unavailable(request, reason)))


async def _refuse(engine: Any, session: Any, request: Request, refused: Refused) -> None:
    log.info("session %s: %s", session.id, refused.cause or refused)
    session.details["refused"] = True  # the session's outcome (dbproxy.metrics)
    kind = getattr(refused, "kind", None) or ("access_denied" if refused.cause is not None else "refused")
    _count_error(engine, session, kind, refused.code)
    fields = request.start_fields
    if refused.cause is not None and refused.stage is not None:
        audit_denial(session, refused.cause, stage=refused.stage, **refused.denial_fields, **fields)
    extra = dict(refused.fields)
    if isinstance(refused.cause, AccessDenied):
        extra.setdefault("reason", refused.cause.reason)
    session.audit.on_session_start(success=False, error=refused.error, **extra, **fields)
    await send_quietly(request.client.stream, engine.render_error(request, refused))


async def run_session(engine: Any, session: Any, stream: Any) -> None:
    """The whole life of one client connection, after the server accepted it."""
    request = await _handshake(engine, session, stream)
    if request is None:
        return
    audit = session.audit
    # identify: the client proves who it is (protocol-specific exchange, the core's identity services).
    request.waiting_for = "client authentication timed out"
    try:
        with trio.fail_after(engine.handshake_timeout):
            await engine.identify(session, request)
    except trio.TooSlowError:
        _count_error(engine, session, "handshake_timeout")
        engine.handshake_timed_out(session, request.waiting_for, **request.start_fields)
        return
    except PeerClosed:
        # e.g. psql hanging up to prompt for the password it will send on a new connection
        log.info("session %s: client closed during authentication", session.id)
        return
    except ProtocolError as exc:
        log.info("session %s: client protocol error during authentication: %s", session.id, exc)
        _count_error(engine, session, "client_protocol")
        await send_quietly(request.client.stream, engine.render_error(request, exc))
        return
    except Refused as refused:
        await _refuse(engine, session, request, refused)
        return
    # route
    route = engine.select_route(request.keys)
    if route is None:
        session.target, session.login = request.target, request.login
        await _refuse(engine, session, request, engine.no_route(request))
        return
    request.route = route
    session.route_name = route.name
    session.backend_addr = route.backend.address
    session.target = route.backend.database or request.target
    session.login = route.backend.user or request.login
    grant = None
    try:
        engine.check_route(session, request, route)
        # authorize: roles at connect, then the connection-limit slot (released by the server).
        if engine.access is not None and not engine.identifies_in_band:
            try:
                grant = engine.access.authorize(session.identity, route=route.name, database=session.target,
                                                db_user=session.login, family=engine.family)
                engine.access.admit(session)
            except AccessDenied as exc:
                refused = engine.denied(session, request, exc)
                refused.cause, refused.stage = exc, "connect"
                raise refused from None
            request.start_fields["granted_roles"] = list(grant.roles)
        # connect the backend with the route's credential
        metrics = _metrics(engine)
        began = time.monotonic()
        login_ok = False
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                backend = await engine.connect_backend(session, request, route, grant)
            login_ok = True
        except trio.TooSlowError:
            raise _upstream(engine, request, BackendTimeout(
                f"backend {route.backend.address} did not complete login within {CONNECT_TIMEOUT:.0f}s",
                kind="connect",
                client_hint=f"the backend database at {route.backend.address} did not answer in time",
            ), session) from None
        except UpstreamError as exc:
            raise _upstream(engine, request, exc, session) from None
        finally:
            if metrics is not None:  # the login's latency, failed logins apart (outcome "failed")
                metrics.backend_login(session, time.monotonic() - began, login_ok)
    except Refused as refused:
        await _refuse(engine, session, request, refused)
        return
    try:
        request.start_fields.update(backend.start_fields)
        if not backend.deferred_start:
            audit.on_session_start(success=True, **request.start_fields)
        await engine.ready(session, request, backend)
        wiring = engine.wiring(session, request, backend, grant)
        plumbing = assemble(wiring, audit)
        pipeline = wiring.relay if wiring.relay is not None else Pipeline(
            session=session,
            client=request.client.stream,
            backend=backend.stream,
            client_decoder=plumbing.client_decoder,
            backend_decoder=plumbing.backend_decoder,
            client_stages=plumbing.client_stages,
            backend_stages=plumbing.backend_stages,
            state=wiring.state,
            to_client_encoder=wiring.to_client_encoder,
            to_backend_encoder=wiring.to_backend_encoder,
            client_error=wiring.client_error,
            flush_audit=audit.flush,
            buffers=engine.services.buffers,
        )
        if metrics is not None:
            metrics.running(session, pipeline)  # its live byte counts, read at scrape time
        try:
            await pipeline.run()
        finally:
            try:
                if plumbing.close is not None:
                    plumbing.close()
            finally:
                if wiring.finished is not None:
                    wiring.finished()
        session.details["end_reason"] = pipeline.end_reason or "closed"
        c2b, b2c = pipeline.statistics()
        if metrics is not None:
            try:  # counting must never cost a session its end event
                metrics.traffic(session, pipeline)
                error = getattr(pipeline, "error", None)
                if error is not None:  # the session ended on an error (rendered to the client by the pipeline)
                    metrics.error(session, "session", getattr(error, "sqlstate", None) or error.__class__.__name__)
            except Exception:
                log.exception("session %s: metrics", session.id)
        end_fields = {"bytes_from_client": c2b.bytes_in, "bytes_to_client": b2c.bytes_out}
        end_fields.update(await engine.session_ended(session, request, backend, wiring, pipeline))
        session.details["end_fields"] = end_fields
    except _LOST as exc:
        session.details["end_reason"] = f"client connection lost: {exc.__class__.__name__}"
    finally:
        await backend.aclose()


def _upstream(engine: Any, request: Request, exc: UpstreamError, session: Any) -> Refused:
    log.warning("session %s: %s", session.id, exc)
    refused = engine.upstream_refused(request, exc)
    refused.kind = "backend_timeout" if isinstance(exc, BackendTimeout) else "backend"  # dbproxy.metrics
    return refused


__all__ = ["Backend", "BackendTimeout", "CONNECT_TIMEOUT", "Plumbing", "Refused", "Request", "Wiring", "assemble",
           "refuse_session", "run_session", "send_quietly"]
