"""The Telnet engine: terminal sessions through the core's session flow and audit.

Strategy.  Telnet has no authentication and no multiplexing: one TCP stream,
a terminal on it.  The proxy is a Telnet server to the client and a Telnet
client to the target, with a ``codec.TelnetProtocol`` on each leg (options
are negotiated per leg; the proxy relays what they mean — window size,
terminal type, echo — not their bytes).  The core's flow maps onto it:

    handshake   the proxy's own Telnet server: WILL ECHO, WILL SGA (character
                at a time, the proxy echoes), DO NAWS, DO TTYPE; then its
                ``login:`` prompt, where the user types ``LOGIN@TARGET``, and
                ``Password:`` (not echoed), where the user types a proxy token
    identify    the token, checked by the core's identity code
                (``ClientAuthenticator.verify_token``, the same tokens as SSH
                and the databases); dropped then
    route       match keys ``target`` and ``login``
    authorize   roles' ``targets`` / ``logins`` globs (family ``terminal``)
    connect     TCP to the target, its negotiation answered (TTYPE: the
                client's terminal type; NAWS: the client's window), its real
                ``login:`` / ``Password:`` prompts answered with the route's
                login and proxy-held password (``login.TargetLogin``, the
                route's prompt expressions); a shell prompt is success, a
                failure message is an ``UpstreamError`` (audited, the client
                told why, closed)
    relay       ``relay.TelnetRelay``: two pumps; the client's keys through
                the core's terminal observer and line policy
                (``dbproxy.terminal.audit``), the target's output recorded

Every refusal before the session (a bad ``LOGIN@TARGET``, a wrong, expired
or revoked token, no route, a role that does not grant it, the target down,
its login refused) is audited by the core and reaches the client as a line
``dbproxy: …`` before the connection closes (``render_error``).

Audit: ``telnet.session.start`` / ``telnet.session.end`` (the engine's
``event_family``; the end lists the recordings with their SHA-256, so the
audit chain covers them), ``telnet.shell.command`` / ``.command.end`` /
``.hidden_input``, ``telnet.session.access_denied``.  The token and the
target password never enter the trail, the log or a recording.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from dbproxy.channel import MessageStream, PeerClosed
from dbproxy.errors import ProxyError, RemoteProtocolError, UpstreamError
from dbproxy.flow import Backend, Refused, Request, Wiring
from dbproxy.net import connect_backend
from dbproxy.terminal.engine import TerminalEngine
from dbproxy.terminal.config import BadUserName, parse_login_target

from . import codec as tn
from . import config as tnconfig
from .codec import Command, Data, OptionChanged, Subnegotiation, TelnetProtocol
from .login import MAX_LOGIN, MAX_SECRET, LineEditor, LoginAbandoned, TargetLogin
from .relay import TelnetRelay

log = logging.getLogger("dbproxy.telnet")

RECEIVE_SIZE = 65536


class Leg:
    """One Telnet connection the proxy is an end of: its stream and its codec.

    Sends are serialized (both pumps and the echo timer may send to the same leg)."""

    def __init__(self, stream: Any, proto: TelnetProtocol) -> None:
        self.stream = stream
        self.proto = proto
        self.lock = trio.Lock()
        self.pending: list = []  # events already decoded, not yet handled (type-ahead)

    async def send(self, data: bytes) -> None:
        if data:
            async with self.lock:
                await self.stream.send_all(data)

    async def flush(self) -> None:
        """Send the negotiation answers the fed bytes called for."""
        await self.send(self.proto.data_to_send())

    async def receive_raw(self) -> bytes:
        return await self.stream.receive_some(RECEIVE_SIZE)

    async def receive(self) -> bytes:
        data = await self.stream.receive_some(RECEIVE_SIZE)
        if data:
            self.proto.feed(data)
        return data


class ClientLeg(Leg):
    """The proxy as a Telnet server to the client."""

    def __init__(self, stream: Any, max_subnegotiation: int = tn.DEFAULT_MAX_SUBNEGOTIATION) -> None:
        super().__init__(stream, TelnetProtocol(accept_local={tn.ECHO, tn.SGA}, accept_remote={tn.NAWS, tn.TTYPE},
                                                enter=True, max_subnegotiation=max_subnegotiation))
        self.secret: str | None = None
        # What the client told (RFC 1073, RFC 1091); 0 / None until it does (the target then uses its default).
        self.width = 0
        self.height = 0
        self.term: str | None = None

    def note(self, event: Any) -> bytes:
        """Window size and terminal type from the client's subnegotiations; what to ask next."""
        if isinstance(event, OptionChanged) and event.side == "remote" and event.option == tn.TTYPE and event.enabled:
            return tn.ttype_send()  # RFC 1091: ask for the name once the client agreed to tell it
        if isinstance(event, Subnegotiation):
            if event.option == tn.NAWS:
                size = tn.parse_naws(event.payload)
                if size is not None:
                    self.width, self.height = size
            elif event.option == tn.TTYPE:
                parsed = tn.parse_ttype(event.payload)
                if parsed is not None and parsed[0] == "is" and parsed[1] and self.term is None:
                    # RFC 1091: names are case-insensitive, sent in upper case by custom (telnet sends
                    # XTERM); the terminfo name the target and the recording's TERM mean is lower case.
                    self.term = parsed[1].lower()
        return b""

    async def read_line(self, editor: LineEditor) -> bytes:
        """A line typed at a proxy prompt (the negotiation goes on meanwhile)."""
        while True:
            while self.pending:
                event = self.pending.pop(0)
                if isinstance(event, Data):
                    echo, line, rest = editor.feed(event.data)
                    await self.send(TelnetProtocol.encode_data(echo) if echo else b"")
                    if line is not None:
                        if rest:
                            self.pending.insert(0, Data(rest))
                        return line
                elif isinstance(event, Command) and event.code == tn.IP:
                    raise LoginAbandoned("the client interrupted the login")
                else:
                    await self.send(self.note(event))
            data = await self.receive()
            if not data:
                raise PeerClosed("client closed during the login")
            await self.flush()
            self.pending += self.proto.events()


class TargetLeg(Leg):
    """The proxy as a Telnet client to the target."""

    def __init__(self, stream: Any, client: ClientLeg) -> None:
        local = {tn.NAWS} | ({tn.TTYPE} if client.term else set())
        super().__init__(stream, TelnetProtocol(accept_local=local, accept_remote={tn.ECHO, tn.SGA}))
        self.client = client

    def answer(self, event: Any) -> bytes:
        """The target's questions about the terminal: TTYPE (the client's type), NAWS (the client's window)."""
        if isinstance(event, Subnegotiation) and event.option == tn.TTYPE:
            parsed = tn.parse_ttype(event.payload)
            if parsed is not None and parsed[0] == "send" and self.client.term:
                return tn.ttype_is(self.client.term)
        if isinstance(event, OptionChanged) and event.side == "local" and event.option == tn.NAWS and event.enabled:
            return self.naws()
        return b""

    def naws(self) -> bytes:
        if not self.proto.local_enabled(tn.NAWS) or not self.client.width:
            return b""
        return TelnetProtocol.encode_subnegotiation(tn.NAWS, tn.naws_payload(self.client.width, self.client.height))


class TelnetEngine(TerminalEngine):
    protocol = "telnet"
    event_family = "telnet"
    match_keys = ("target", "login")
    auth_methods = ("password",)
    password_methods = ("password",)
    client_auth_methods = ("token",)
    listener_keys = tnconfig.LISTENER_KEYS
    backend_keys = tnconfig.BACKEND_KEYS
    # Telnet data is a stream: the one bounded unit is a subnegotiation (``max_message_size`` caps it).
    default_max_message_size = tn.DEFAULT_MAX_SUBNEGOTIATION

    validate_listener = staticmethod(tnconfig.validate_listener)
    validate_auth = staticmethod(tnconfig.validate_auth)
    validate_backend = staticmethod(tnconfig.validate_backend)

    # -- the session flow's hooks ----------------------------------------------------------
    def new_request(self, session: Any, stream: Any) -> Request:
        # The engine reads the client's bytes itself (the codec is per leg): the MessageStream is the
        # flow's handle on the stream.
        return Request(MessageStream(stream, None), extra=ClientLeg(stream, self.max_message_size),
                       waiting_for="client Telnet login timed out")

    async def handshake(self, session: Any, request: Request) -> bool:
        client: ClientLeg = request.extra
        proto = client.proto
        _oob_inline(client.stream)
        # RFC 857/858: the proxy echoes and the client sends each key (so the token is never echoed);
        # RFC 1073/1091: the window and the terminal type, passed on to the target.
        proto.request_local(tn.ECHO, True)
        proto.request_local(tn.SGA, True)
        proto.request_remote(tn.NAWS, True)
        proto.request_remote(tn.TTYPE, True)
        banner = self.listener.extra.get("banner")
        greeting = (banner.replace("\n", "\r\n") + "\r\n" if banner else "") + "login: "
        await client.send(proto.data_to_send() + TelnetProtocol.encode_data(greeting.encode()))
        try:
            name = (await client.read_line(LineEditor(echo=True, limit=MAX_LOGIN))).decode("utf-8", "replace").strip()
            request.start_fields = {"requested_user": name, "client_auth": "token"}
            try:
                user = parse_login_target(name, "login")
            except BadUserName as exc:
                raise Refused(str(exc)) from None
            request.login, request.target = user.login, user.target
            request.keys = {"target": user.target, "login": user.login}
            request.start_fields.update(requested_target=user.target, requested_login=user.login)
            await client.send(b"Password: ")
            secret = await client.read_line(LineEditor(echo=False, limit=MAX_SECRET))
        except LoginAbandoned as exc:
            log.info("session %s: %s", session.id, exc)
            session.details.setdefault("end_reason", str(exc))
            return False
        client.secret = secret.decode("utf-8", "replace").strip()
        # What the client said along with its Enter (its terminal type, its window) counts for the target login.
        for event in client.pending:
            if not isinstance(event, Data):
                await client.send(client.note(event))
        if client.term:
            request.start_fields["term"] = client.term
        return True

    async def identify(self, session: Any, request: Request) -> None:
        client: ClientLeg = request.extra
        secret, client.secret = client.secret, None  # checked once, then forgotten
        self.identify_by_token(session, request, secret)

    async def connect_backend(self, session: Any, request: Request, route: Any, grant: Any) -> Backend:
        backend = route.backend
        client: ClientLeg = request.extra
        try:
            stream = await connect_backend(backend.host, backend.port, via=backend.via)
        except UpstreamError as exc:
            if backend.via is not None:
                raise  # the agent's own hint (no agent connected, not on its allow-list…)
            raise UpstreamError(str(exc), kind="connect",
                                client_hint=f"the target {session.target!r} is unreachable") from None
        _oob_inline(stream)
        target = TargetLeg(stream, client)
        dialogue = TargetLogin(backend.extra["prompts"], session.login)
        auth = backend.auth
        ok = logged_in = False
        try:
            with trio.move_on_after(backend.extra["login_timeout"]):
                while True:
                    data = await target.receive()
                    if not data:
                        raise UpstreamError(f"the target {backend.address} closed the connection during the login "
                                            f"(at {dialogue.waiting_for()})", kind="connect",
                                            client_hint=f"the target {session.target!r} closed the connection "
                                                        "during the login")
                    output = bytearray()
                    for event in target.proto.events():
                        if isinstance(event, Data):
                            output += event.data
                        else:
                            await target.send(target.proto.data_to_send() + target.answer(event))
                    await target.flush()
                    if not output:
                        continue
                    # The secret is made into bytes only at the password prompt, and only for the target.
                    answer, result = dialogue.output(bytes(output), lambda: auth.secret.reveal())
                    if answer:
                        await target.send(TelnetProtocol.encode_data(answer))
                    if result is not None:
                        if not result.ok:
                            raise UpstreamError(result.reason, kind=result.kind,
                                                client_hint=f"the target {session.target!r} refused the proxy's "
                                                            f"login as {session.login!r}")
                        ok = True
                        break
            if not ok:
                raise UpstreamError(f"the target {backend.address} did not show {dialogue.waiting_for()} within "
                                    f"{backend.extra['login_timeout']:g}s (see the route's prompts)", kind="prompt",
                                    client_hint=f"the target {session.target!r} did not complete the login in time")
            logged_in = True
        except RemoteProtocolError as exc:
            raise UpstreamError(f"the target {backend.address} broke the Telnet protocol: {exc}", kind="protocol",
                                client_hint=f"the target {session.target!r} broke the Telnet protocol") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise UpstreamError(f"the connection to {backend.address} was lost during the login: {exc}",
                                kind="connect", client_hint=f"the target {session.target!r} is unreachable") from None
        finally:
            if not logged_in:
                await trio.aclose_forcefully(stream)
        target.pending = [Data(bytes(dialogue.after))] if dialogue.after else []
        # ``link`` carries the engine's leg (codec state, the output after the login) to the relay.
        return Backend(stream=stream, decoder=None, link=target)

    def upstream_refused(self, request: Request, exc: UpstreamError) -> Refused:
        return Refused(str(exc), client_message=exc.client_hint, fields={"reason": f"target_{exc.kind}"})

    def wiring(self, session: Any, request: Request, backend: Backend, grant: Any) -> Wiring:
        extra = self.listener.extra
        relay = TelnetRelay(session, request.extra, backend.link, grant=grant,
                            recording_dir=extra.get("recording_dir"),
                            recording_input=extra.get("recording_input", False),
                            idle_timeout=extra.get("idle_timeout_seconds"))
        return Wiring(None, None, [], [], None, client_error=lambda exc: b"", relay=relay)

    async def session_ended(self, session: Any, request: Request, backend: Backend, wiring: Wiring,
                            pipeline: Any) -> dict:
        fields: dict = {"commands": pipeline.commands}
        if pipeline.recordings:
            # In the end event, so the audit's hash chain covers each recording's bytes.
            fields["recordings"] = pipeline.recordings
        return fields

    def render_error(self, request: Request, exc: ProxyError) -> bytes:
        """The refusal as a line on the client's terminal (the connection closes after it)."""
        if isinstance(exc, Refused):
            message = exc.client_message
        else:
            message = getattr(exc, "client_hint", None) or str(exc)
        return TelnetProtocol.encode_data(f"\r\ndbproxy: {message}\r\n".encode("utf-8", "replace"))


def _oob_inline(stream: Any) -> None:
    """Telnet's Synch (RFC 854 p. 8: ``IAC DM`` sent as TCP urgent data, telnetd sends it after an
    interrupt): read inline, so the IAC DM stays in the stream where the codec parses it (without
    SO_OOBINLINE the kernel pulls one of its bytes out of band and leaves a stray byte in the data)."""
    import socket

    try:
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
    except (AttributeError, OSError):
        pass  # not a socket (a test's memory stream)
