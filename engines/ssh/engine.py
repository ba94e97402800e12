"""The SSH engine: terminal sessions through the core's session flow and audit.

Strategy.  asyncssh terminates SSH on both sides (``bridge``, behind an
interface this engine owns), on a trio-asyncio loop opened for each session
inside its trio task.  The core's flow maps onto SSH's connection protocol:

    handshake   key exchange, then the client's first authentication request
                (password, or keyboard-interactive with one prompt) — its user
                name is ``LOGIN@TARGET``
    identify    the secret is a proxy token, checked by the core's identity
                code (``ClientAuthenticator.verify_token``); it is dropped then.
                Or a public key registered to an identity, or an OpenSSH user
                certificate of the configured user CA whose principal names
                the identity (``identity.publickey``): asyncssh checks the
                signature and the certificate, ``bridge.ClientKeys`` says whose
    route       match keys ``target`` and ``login``
    authorize   roles grant targets (``targets`` globs) and logins
                (``logins`` globs), deny by default (the core's ``roles``,
                family ``terminal``: ``databases``/``db_users`` grant no SSH)
    connect     the proxy's own login to the target: the route's key or
                password, or a fresh key with a short-lived OpenSSH user
                certificate the route's CA signs for this session (principal:
                the login; key id: proxy, identity and session id); the
                target's host key verified against the route's known_hosts
    ready       only now does the client's authentication succeed
    relay       channels relayed by asyncssh callbacks (``bridge.Relay``)

Every refusal before the session (bad user name, wrong token, no route, a
role that does not grant it, the target down or its host key wrong) is
audited by the core and reaches the client as an SSH disconnect whose
description OpenSSH prints (``render_error`` sends it; it returns no bytes,
since asyncssh owns the client's byte stream).

Audit: ``ssh.session.start``/``ssh.session.end`` (the engine's
``event_family``), ``ssh.shell``, ``ssh.exec`` (the command line, before the
target runs it, or refused by the role's deny patterns), ``ssh.subsystem``,
``ssh.channel.end`` (exit status or signal, bytes, the recording's SHA-256),
``ssh.forward`` (refused forwarding, agent and X11 requests); the session
end lists the recordings, so the audit chain covers them.  The token never
enters the trail, the log or a recording.
"""

from __future__ import annotations

import logging
from typing import Any

import trio
import trio_asyncio

from dbproxy.channel import MessageStream
from dbproxy.errors import ProxyError, UpstreamError
from dbproxy.flow import Backend, Refused, Request, Wiring, run_session
from dbproxy.session import Identity
from dbproxy.terminal.engine import TerminalEngine

from . import config as sshconfig
from .bridge import DISC_BY_APPLICATION, DISC_REFUSED, DISC_UNAVAILABLE, ClientGate, ClientKeys, Relay, \
    TargetConnection, serve_client
from .target import TargetError, TargetLogins, hint

log = logging.getLogger("dbproxy.ssh")

# After a refusal or the end of a session, how long asyncssh may take to deliver its disconnect.
CLOSE_GRACE = 2.0


class SSHEngine(TerminalEngine):
    protocol = "ssh"
    event_family = "ssh"
    refusal = {"code": DISC_REFUSED}  # SSH disconnect reason codes (RFC 4253 §11.1)
    unconfigured_refusal = {"code": DISC_UNAVAILABLE}
    match_keys = ("target", "login")
    auth_methods = ("publickey", "password", "certificate")
    password_methods = ("password",)
    client_auth_methods = ("token", "publickey")
    listener_keys = sshconfig.LISTENER_KEYS
    backend_keys = sshconfig.BACKEND_KEYS
    # SSH's own packet limit is the implementation's (asyncssh: 256 KiB); the core's buffers are unused.
    default_max_message_size = 256 * 1024

    validate_listener = staticmethod(sshconfig.validate_listener)
    validate_auth = staticmethod(sshconfig.validate_auth)
    validate_backend = staticmethod(sshconfig.validate_backend)

    def __init__(self, listener: Any, services: Any) -> None:
        super().__init__(listener, services)
        import asyncssh

        self.host_key = asyncssh.read_private_key(listener.extra["host_key_file"])
        self._gates: dict[str, ClientGate] = {}
        self._nurseries: dict[str, trio.Nursery] = {}  # per session: tasks bridging a target reached via an agent
        self._logins = TargetLogins()  # the proxy's login to targets; route CA keys read once
        # Client keys and the user CA (identity.publickey), when the listener accepts them.
        cfg = self.access.auth.publickey if self.access is not None else None
        self.client_keys = ClientKeys(cfg) if cfg is not None else None

    # -- connection ---------------------------------------------------------------------
    async def handle_connection(self, session: Any, stream: Any) -> None:
        session.family = self.family
        async with trio_asyncio.open_loop():
            async with trio.open_nursery() as nursery:
                gate = ClientGate(session, self.client_keys)
                self._gates[session.id] = gate
                self._nurseries[session.id] = nursery
                nursery.start_soon(self._serve, stream, gate)
                try:
                    await run_session(self, session, stream)
                finally:
                    self._gates.pop(session.id, None)
                    self._nurseries.pop(session.id, None)
                    if not gate.closed.is_set() and gate.conn is not None:
                        gate.conn.close()
                    with trio.move_on_after(CLOSE_GRACE):
                        await gate.closed.wait()
                    nursery.cancel_scope.cancel()

    async def _serve(self, stream: Any, gate: ClientGate) -> None:
        extra = self.listener.extra
        await serve_client(stream, gate, self.host_key, login_timeout=self.handshake_timeout * 2,
                           keepalive_interval=extra.get("keepalive_seconds", 0),
                           keepalive_count_max=extra.get("keepalive_count_max", 3))

    async def refuse(self, session: Any, stream: Any, reason: str) -> None:
        async with trio_asyncio.open_loop():
            async with trio.open_nursery() as nursery:
                gate = ClientGate(session, self.client_keys)
                self._gates[session.id] = gate
                nursery.start_soon(self._serve, stream, gate)
                try:
                    await super().refuse(session, stream, reason)
                finally:
                    self._gates.pop(session.id, None)
                    with trio.move_on_after(CLOSE_GRACE):
                        await gate.closed.wait()
                    nursery.cancel_scope.cancel()

    # -- the session flow's hooks ----------------------------------------------------------
    def new_request(self, session: Any, stream: Any) -> Request:
        # asyncssh owns the client's bytes: the MessageStream is only the flow's handle on the stream.
        return Request(MessageStream(stream, None), extra=self._gates[session.id],
                       waiting_for="client SSH handshake timed out")

    async def handshake(self, session: Any, request: Request) -> bool:
        gate: ClientGate = request.extra
        await gate.attempted.wait()
        if gate.attempt is None:
            return False  # the client went away before authenticating: not a session
        attempt = gate.attempt
        request.start_fields = {"requested_user": attempt.username, "client_auth": attempt.method}
        try:
            user = sshconfig.parse_user(attempt.username)
        except sshconfig.BadUserName as exc:
            attempt.secret = None
            raise Refused(str(exc), code=DISC_REFUSED) from None
        request.login, request.target = user.login, user.target
        request.keys = {"target": user.target, "login": user.login}
        request.start_fields.update(requested_target=user.target, requested_login=user.login)
        return True

    async def identify(self, session: Any, request: Request) -> None:
        gate: ClientGate = request.extra
        attempt = gate.attempt
        secret, attempt.secret = attempt.secret, None  # checked once, then forgotten
        if attempt.key is not None:
            # A registered key or a CA-signed certificate: asyncssh verified the signature (and the
            # certificate's validity); the registry said whose it is.
            key = attempt.key
            session.identity = Identity(user=key.user, roles=key.roles, method=key.method)
            request.start_fields.update(identity_method=key.method, client_key=key.fingerprint,
                                        **({"certificate_key_id": key.key_id} if key.key_id is not None else {}))
            return
        self.identify_by_token(session, request, secret)

    async def connect_backend(self, session: Any, request: Request, route: Any, grant: Any) -> Backend:
        try:
            target = await self._logins.open(route.backend, session.login, session, self._nurseries.get(session.id))
        except TargetError as exc:
            raise UpstreamError(str(exc), kind=exc.kind, client_hint=hint(exc.kind, session.target, session.login)) from None
        # The target, login and address are in every ssh.* event already (the audit's session fields).
        return Backend(stream=_TargetStream(target), decoder=None)

    def upstream_refused(self, request: Request, exc: UpstreamError) -> Refused:
        return Refused(str(exc), client_message=exc.client_hint, code=DISC_BY_APPLICATION,
                       fields={"reason": f"target_{exc.kind}"})

    async def ready(self, session: Any, request: Request, backend: Backend) -> None:
        request.extra.accept()

    def wiring(self, session: Any, request: Request, backend: Backend, grant: Any) -> Wiring:
        relay = Relay(session, request.extra, backend.stream.target,
                      recording_dir=self.listener.extra.get("recording_dir"), grant=grant,
                      recording_input=self.listener.extra.get("recording_input", False),
                      env_allow=self.listener.extra.get("env_allow", ()),
                      idle_timeout=self.listener.extra.get("idle_timeout_seconds"))
        return Wiring(None, None, [], [], None, client_error=lambda exc: b"", relay=relay)

    async def session_ended(self, session: Any, request: Request, backend: Backend, wiring: Wiring,
                            pipeline: Any) -> dict:
        fields: dict = {"channels": pipeline.channels, "execs": pipeline.execs}
        if pipeline.recordings:
            # In the end event, so the audit's hash chain covers each recording's bytes.
            fields["recordings"] = pipeline.recordings
        return fields

    def unavailable(self, request: Request, reason: str) -> Refused:
        return Refused(reason, code=DISC_UNAVAILABLE)

    def render_error(self, request: Request, exc: ProxyError) -> bytes:
        """Disconnect the client with the message (asyncssh owns its stream: no bytes to return)."""
        gate: ClientGate = request.extra
        if isinstance(exc, Refused):
            gate.refuse(exc.client_message, exc.code or DISC_REFUSED)
        else:
            gate.refuse(getattr(exc, "client_hint", None) or str(exc), DISC_BY_APPLICATION)
        return b""


class _TargetStream:
    """``flow.Backend.stream``: closing it closes the proxy's SSH connection to the target."""

    def __init__(self, target: TargetConnection) -> None:
        self.target = target

    async def aclose(self) -> None:
        await self.target.aclose()
