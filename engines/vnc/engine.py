"""The VNC engine: desktop sessions through the core's session flow, with a proxy-held VNC credential.

Strategy.  The proxy is an RFB server to the viewer and an RFB client to
the desktop, with the handshake parsers of ``rfb.py`` on each leg; after
both logins it hands the viewer the desktop's *real* ServerInit (geometry,
pixel format, name) and the core's ``Pipeline`` relays, with a client
decoder framing every viewer message (``rfb.ClientMessageDecoder``) and a
server decoder framing the desktop's as it streams (``server.ServerDecoder``
over ``updates``' message parsers: update bytes go on as they arrive).  The core's flow maps onto RFB:

    handshake   the proxy's ProtocolVersion (3.8; 3.3/3.7 viewers are
                served in theirs), its security types: VeNCrypt (19) when
                the listener has a certificate — version 0.2, subtype
                X509Plain, TLS with the listener's certificate, then Plain
                (user name ``TARGET`` or ``USER@TARGET``, the proxy token as
                password) — and VNC authentication (2) when the token
                config has a codes file (``identity.token.codes_file``, or
                ``registry_file`` for the default next to it): a random
                challenge, the viewer's answer
    identify    the token (``verify_token``; a user named must be the
                token's), or the answer checked against each of the
                ``vnc`` kind's single-use codes (``dbproxy.onetime``: the
                protocol names no user, so no lookup by name): a match is
                used up at once; a code already used (``code_reused``),
                expired (``code_expired``) or matching none
                (``code_unknown``) is refused
    route       match key ``target`` (the code's target, the VeNCrypt user
                name's, or the listener's ``target``)
    authorize   roles' ``desktops`` globs (family ``desktop``) and their
                ``desktop`` policy (view-only, clipboard per direction)
    connect     TCP to the desktop (``dbproxy.net.connect_backend``: through
                an agent when the route says ``via``), its version, its
                security types: VNC authentication with the route's password
                (or VeNCrypt TLSVnc/X509Vnc), VeNCrypt Plain over TLS, or
                None, as the route's ``auth.method`` says; ClientInit (shared: other
                viewers of that desktop stay connected); its ServerInit
    ready       SecurityResult OK to the viewer, its ClientInit, the
                desktop's ServerInit

Every refusal before the session (wrong token or code, no route, a role,
the desktop down, its login refused) is audited by the core and reaches
the viewer as an RFB failure reason: SecurityResult "failed" with the
reason (RFB 3.8; 3.3 and 3.7 have no reason field after the security
handshake), or the security-type failure before it (``render_error``).

Audit (``event_family`` ``desktop``): ``desktop.session.start`` (geometry,
desktop name, pixel format, how each side authenticated),
``desktop.session.end`` (the encodings the viewer asked for, clipboard and
refused-input counts, the recording's file and SHA-256), and from the
stages (``stages.py``): ``desktop.clipboard``, ``desktop.input.refused``,
``desktop.keys`` (only with ``audit_keys``),
``desktop.session.access_denied``.  The token, the code, the desktop's
password never enter the trail, the log or the recording.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import ssl
import time
from typing import Any, NoReturn

import attrs
import trio

from dbproxy.buffer import ReceiveBuffer
from dbproxy.channel import MessageStream, PeerClosed
from dbproxy.engine import Engine
from dbproxy.errors import AccessDenied, AuthFailed, ProtocolError, ProxyError, UpstreamError
from dbproxy.flow import Backend, Refused, Request, Wiring
from dbproxy.net import connect_backend
from dbproxy.onetime import NO_CODES_FILE, CodeStore, store_for
from dbproxy.session import Identity
from dbproxy.tls import client_context, server_context

from . import config as vncconfig
from . import rfb
from .server import ServerDecoder
from .stages import ClientStage, DesktopPolicy, DesktopState, ServerStage

log = logging.getLogger("dbproxy.vnc")

_LOST = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)

# Single-use codes for classic VNC authentication (``dbproxy token issue --vnc``): the DES key is the
# password's first 8 bytes (RFC 6143 §7.2.2), so a code is 8 characters, read off a screen and typed into a
# viewer's password box — no 0/O, 1/l/I.
CODE_KIND = "vnc"
CODE_ALPHABET = "abcdefghijkmnpqrstuvwxyz23456789"
CODE_LENGTH = 8
CODE_TTL = 60
CODE_MAX_TTL = 3600


class _Reader:
    """A ``MessageStream`` decoder for the handshake: a buffer the ``rfb`` parsers read."""

    def __init__(self) -> None:
        self.buffer = ReceiveBuffer()

    def feed(self, data: bytes) -> None:
        self.buffer.feed(data)


@attrs.define(eq=False)
class ClientSide:
    """The viewer's handshake: where it stands (``render_error`` answers in the right message)."""

    phase: str = "version"  # version → security → result → done
    version: tuple[int, int] = rfb.RFB_38
    security: int | None = None
    subtype: int | None = None
    challenge: bytes = b""
    response: bytes = attrs.field(default=b"", repr=False)
    credentials: Any = attrs.field(default=None, repr=False)
    reader: _Reader = attrs.field(factory=_Reader)


@attrs.define(eq=False)
class DesktopLink:
    """The logged-in desktop: its ServerInit and what the handshake left in the buffer."""

    server_init: rfb.ServerInit
    leftover: bytes
    version: tuple[int, int]
    security: str


async def _read(ms: MessageStream, parser: Any) -> Any:
    buf = ms.decoder.buffer
    return await ms.receive_with(lambda: parser(buf))


class VNCEngine(Engine):
    protocol = "vnc"
    family = "desktop"
    event_family = "desktop"
    match_keys = ("target",)
    auth_methods = ("vnc", "plain", "none")
    password_methods = ("vnc", "plain")
    client_auth_methods = ("token",)
    listener_keys = vncconfig.LISTENER_KEYS
    backend_keys = vncconfig.BACKEND_KEYS
    role_keys = ("desktop",)
    role_key_requires = "desktops"
    # A client message's one unbounded part is a clipboard text (``max_message_size`` caps it).
    default_max_message_size = rfb.DEFAULT_MAX_CUT_TEXT
    # Single-use login codes (``dbproxy.onetime``); max_name 0: VNC authentication carries no user name.
    onetime_codes = {CODE_KIND: {"length": CODE_LENGTH, "alphabet": CODE_ALPHABET, "ttl": CODE_TTL,
                                 "max_ttl": CODE_MAX_TTL, "max_name": 0}}

    validate_listener = staticmethod(vncconfig.validate_listener)
    validate_auth = staticmethod(vncconfig.validate_auth)
    validate_backend = staticmethod(vncconfig.validate_backend)
    validate_role_key = staticmethod(vncconfig.validate_role_key)

    def __init__(self, listener: Any, services: Any) -> None:
        super().__init__(listener, services)
        self.ssl_context = server_context(listener.tls) if listener.tls else None
        if self.ssl_context is not None:
            # No TLS 1.3 session tickets: TigerVNC's viewer (1.12, GnuTLS 3.7) stalls on the tickets OpenSSL
            # sends after the handshake and never reads the SecurityResult; a VNC session never resumes.
            self.ssl_context.num_tickets = 0
        self._code_store: CodeStore | None = None

    # -- what the proxy offers -----------------------------------------------------------------
    @property
    def _authority(self) -> Any:
        auth = self.access.auth if self.access is not None else None
        return auth.authority if auth is not None and auth.token else None

    def _codes(self) -> CodeStore | None:
        """The codes file's store (one per listener: it remembers what this process used), None without one."""
        if self._code_store is None:
            self._code_store = store_for(self._authority)
        return self._code_store

    def _offered(self) -> tuple[int, ...]:
        authority = self._authority
        if authority is None:
            return ()
        types = []
        if self.ssl_context is not None:
            types.append(rfb.SEC_VENCRYPT)
        if self._codes() is not None:
            types.append(rfb.SEC_VNC)
        return tuple(types)

    # -- the session flow's hooks --------------------------------------------------------------
    def new_request(self, session: Any, stream: Any) -> Request:
        side = ClientSide()
        return Request(MessageStream(stream, side.reader, budget=self.services.buffers), extra=side,
                       waiting_for="viewer RFB handshake timed out")

    async def handshake(self, session: Any, request: Request) -> bool:
        side: ClientSide = request.extra
        ms = request.client
        await ms.stream.send_all(rfb.encode_version(rfb.RFB_38))
        side.version = rfb.negotiate(await _read(ms, rfb.parse_version))
        side.phase = "security"
        request.start_fields = {"client_rfb": "%d.%d" % side.version}
        offered = self._offered()
        if not offered:
            raise Refused(f"listener {self.listener.name}: no way for a viewer to authenticate (token authentication "
                          f"with a tls certificate for VeNCrypt; single-use codes: {NO_CODES_FILE})",
                          client_message="the proxy cannot authenticate you (no authentication configured)")
        if side.version == rfb.RFB_33:
            # RFC 6143 §7.1.2: in 3.3 the server picks the type.
            if rfb.SEC_VNC not in offered:
                raise Refused(f"an RFB 3.3 viewer can only use VNC authentication: {NO_CODES_FILE}",
                              client_message="this proxy needs a viewer that speaks RFB 3.7 or later "
                                                           "with VeNCrypt")
            chosen = rfb.SEC_VNC
            await ms.stream.send_all(rfb.encode_security_types(side.version, (chosen,)))
        else:
            await ms.stream.send_all(rfb.encode_security_types(side.version, offered))
            chosen = await _read(ms, rfb.parse_u8)
            if chosen not in offered:
                side.phase = "result"
                raise Refused(f"the viewer chose security type {rfb.security_name(chosen)}, not offered",
                              client_message="security type not offered by the proxy")
        side.security = chosen
        request.start_fields["client_security"] = rfb.security_name(chosen)
        if chosen == rfb.SEC_VNC:
            side.challenge = secrets.token_bytes(16)
            await ms.stream.send_all(side.challenge)
            side.response = await _read(ms, rfb.parse_challenge)
            side.phase = "result"
            return True
        return await self._vencrypt(session, request, side)

    async def _vencrypt(self, session: Any, request: Request, side: ClientSide) -> bool:
        ms = request.client
        await ms.stream.send_all(rfb.encode_vencrypt_version())
        version = await _read(ms, rfb.parse_vencrypt_version)
        if version != rfb.VENCRYPT_VERSION:
            await ms.stream.send_all(b"\xff")  # VeNCrypt: a non-zero ack refuses the version
            session.details["end_reason"] = f"viewer VeNCrypt version {version} (the proxy speaks 0.2)"
            return False
        subtypes = (rfb.VENCRYPT_X509PLAIN,)
        await ms.stream.send_all(b"\x00" + rfb.encode_vencrypt_subtypes(subtypes))
        sub = await _read(ms, rfb.parse_u32)
        if sub not in subtypes:
            session.details["end_reason"] = f"viewer chose VeNCrypt {rfb.vencrypt_name(sub)}, not offered"
            return False
        side.subtype = sub
        request.start_fields["client_security"] = f"VeNCrypt {rfb.vencrypt_name(sub)}"
        await ms.stream.send_all(b"\x01")  # accepted: the TLS handshake follows
        if ms.decoder.buffer:
            raise ProtocolError("the viewer sent data before its TLS handshake")
        tls = trio.SSLStream(ms.stream, self.ssl_context, server_side=True)
        try:
            await tls.do_handshake()
        except (ssl.SSLError, trio.BrokenResourceError) as exc:
            session.details["end_reason"] = f"viewer TLS handshake failed: {exc.__cause__ or exc}"
            return False
        ms.stream = tls
        session.details["client_tls"] = True
        side.phase = "result"
        side.credentials = await _read(ms, rfb.parse_plain)
        return True

    async def identify(self, session: Any, request: Request) -> None:
        side: ClientSide = request.extra
        if side.security == rfb.SEC_VNC:
            self._identify_by_code(session, request, side)
        else:
            self._identify_by_token(session, request, side)
        target = request.target
        request.keys = {"target": target}
        request.start_fields.update(requested_target=target, identity_method=session.identity.method)

    def _identify_by_token(self, session: Any, request: Request, side: ClientSide) -> None:
        creds, side.credentials = side.credentials, None  # checked once, then forgotten
        name = creds.username.strip()
        user, _, target = name.rpartition("@")
        target = target or self.listener.extra.get("target")
        request.start_fields["requested_user"] = name
        if not target:
            raise Refused(f"VeNCrypt user name {name!r} names no target",
                          client_message="the user name must be TARGET or USER@TARGET (the desktop to reach)")
        request.target = target
        try:
            session.identity = self.access.auth.verify_token(user or None, creds.password)
        except AccessDenied as exc:
            raise Refused(str(exc), client_message="authentication failed: the dbproxy token was not accepted",
                          fields={"reason": exc.reason}, cause=exc, stage="authenticate") from None

    def _identify_by_code(self, session: Any, request: Request, side: ClientSide) -> None:
        store = self._codes()
        response, side.response = side.response, b""
        now = time.time()
        try:
            codes = store.entries(CODE_KIND)  # used and expired ones too: a better answer than "wrong"
        except OSError as exc:  # fail closed: a code the proxy cannot read is no code
            self._code_refused(request, f"the codes file is unreadable ({exc.strerror or exc})",
                               "codes_file_unreadable")
        for code in codes:
            if not hmac.compare_digest(rfb.vnc_response(code.secret, side.challenge), response):
                continue
            request.target = code.target
            request.start_fields["code_id"] = code.id
            if code.exp <= now:
                self._code_refused(request, f"one-time code {code.id} of {code.user!r} expired", "code_expired")
            try:
                fresh = not code.used and store.consume(code, now=now)
            except OSError as exc:  # a code that cannot be marked used must not work
                self._code_refused(request, f"one-time code {code.id} could not be marked used "
                                   f"({exc.strerror or exc})", "codes_file_unwritable")
            if not fresh:
                self._code_refused(request, f"one-time code {code.id} of {code.user!r} was already used",
                                   "code_reused")
            session.identity = Identity(user=code.user, roles=code.roles, method="one_time_code")
            return
        self._code_refused(request, "no pending one-time code matches the viewer's answer", "code_unknown")

    @staticmethod
    def _code_refused(request: Request, error: str, reason: str) -> NoReturn:
        exc = AuthFailed(error, reason=reason)
        raise Refused(error, client_message="authentication failed: the one-time code was not accepted (wrong, "
                                            "expired or already used; issue a new one with dbproxy token issue --vnc)",
                      fields={"reason": reason}, cause=exc, stage="authenticate")

    def check_route(self, session: Any, request: Request, route: Any) -> None:
        session.login = None  # the desktop's account is the proxy's

    def no_route(self, request: Request) -> Refused:
        return Refused(f"no route for desktop {request.target!r} on listener {self.listener.name}",
                       client_message=f"no desktop {request.target!r} here")

    def denied(self, session: Any, request: Request, exc: AccessDenied) -> Refused:
        return Refused(str(exc), client_message=f"access denied: you may not reach the desktop {session.target!r}")

    def upstream_refused(self, request: Request, exc: UpstreamError) -> Refused:
        return Refused(str(exc), client_message=exc.client_hint, fields={"reason": f"desktop_{exc.kind}"})

    # -- the proxy's login to the desktop ---------------------------------------------------------
    async def connect_backend(self, session: Any, request: Request, route: Any, grant: Any) -> Backend:
        backend = route.backend
        where = f"the desktop {session.target!r}"
        try:
            # The one dial (``dbproxy.net``): direct, or through an agent when the route says ``via``.
            stream = await connect_backend(backend.host, backend.port, via=backend.via)
        except UpstreamError as exc:
            # The viewer's reason stays the engine's; through an agent, the agent's own hint (no agent of
            # the node connected, not on its allow-list…) says why.
            hint = f"{where} is unreachable" + (f" ({exc.client_hint})" if backend.via is not None else "")
            raise UpstreamError(str(exc), kind="connect", client_hint=hint) from None
        ms = MessageStream(stream, _Reader(), budget=self.services.buffers)
        ok = False
        try:
            link = await self._login(ms, backend, where)
            ok = True
        except ProtocolError as exc:
            raise UpstreamError(f"the desktop {backend.address} broke the RFB protocol: {exc}", kind="protocol",
                                client_hint=f"{where} broke the RFB protocol") from None
        except _LOST as exc:
            raise UpstreamError(f"the connection to {backend.address} was lost during the login: {exc}",
                                kind="connect", client_hint=f"{where} closed the connection during the login") \
                from None
        except PeerClosed:
            raise UpstreamError(f"the desktop {backend.address} closed the connection during the login",
                                kind="closed", client_hint=f"{where} closed the connection during the login") \
                from None
        finally:
            if not ok:
                await trio.aclose_forcefully(ms.stream)
        init = link.server_init
        start = {"width": init.width, "height": init.height, "desktop_name": init.name,
                 "pixel_format": init.pixel_format.hex(), "backend_rfb": "%d.%d" % link.version,
                 "backend_security": link.security}
        return Backend(stream=ms.stream, decoder=None, start_fields=start, link=link)

    async def _login(self, ms: MessageStream, backend: Any, where: str) -> DesktopLink:
        offered = await _read(ms, rfb.parse_version)
        version = rfb.negotiate(offered)
        await ms.stream.send_all(rfb.encode_version(version))
        types = await _read(ms, rfb.parse_security_types(version))
        if types.failed:
            raise UpstreamError(f"the desktop {backend.address} refused the connection: {types.reason}",
                                kind="auth", client_hint=f"{where} refused the connection: {types.reason}")
        method = backend.auth.method
        choice = _choose(method, types.types)
        if choice is None:
            offered_names = ", ".join(rfb.security_name(t) for t in types.types)
            raise UpstreamError(f"the desktop {backend.address} offers {offered_names}: none serves the route's auth "
                                f"method {method!r}", kind="auth",
                                client_hint=f"{where} offers no security type the proxy's login can use")
        if version != rfb.RFB_33:
            await ms.stream.send_all(bytes((choice,)))
        security = rfb.security_name(choice)
        if choice == rfb.SEC_VNC:
            await self._vnc_auth(ms, backend)
        elif choice == rfb.SEC_VENCRYPT:
            security = await self._vencrypt_login(ms, backend, where)
        if choice != rfb.SEC_NONE or version == rfb.RFB_38:
            result = await _read(ms, rfb.parse_security_result(version))
            if not result.ok:
                reason = result.reason or "authentication failed"
                raise UpstreamError(f"the desktop {backend.address} refused the proxy's login ({security}): {reason}",
                                    kind="auth", client_hint=f"{where} refused the proxy's login: {reason}")
        await ms.stream.send_all(b"\x01")  # ClientInit: shared, so other viewers of the desktop stay connected
        init = await _read(ms, rfb.parse_server_init)
        leftover = ms.decoder.buffer.take_rest()
        return DesktopLink(init, leftover, version, security)

    @staticmethod
    async def _vnc_auth(ms: MessageStream, backend: Any) -> None:
        challenge = await _read(ms, rfb.parse_challenge)
        # The password becomes bytes only here, for this answer.
        await ms.stream.send_all(rfb.vnc_response(backend.auth.secret.reveal().encode("latin-1", "replace"), challenge))

    async def _vencrypt_login(self, ms: MessageStream, backend: Any, where: str) -> str:
        major, minor = await _read(ms, rfb.parse_vencrypt_version)
        if (major, minor) < rfb.VENCRYPT_VERSION:
            raise UpstreamError(f"the desktop {backend.address} speaks VeNCrypt {major}.{minor}, the proxy 0.2",
                                kind="protocol", client_hint=f"{where} speaks an old VeNCrypt")
        await ms.stream.send_all(rfb.encode_vencrypt_version())
        if await _read(ms, rfb.parse_u8) != 0:
            raise UpstreamError(f"the desktop {backend.address} refused VeNCrypt 0.2", kind="protocol",
                                client_hint=f"{where} refused VeNCrypt 0.2")
        subtypes = await _read(ms, rfb.parse_vencrypt_subtypes)
        sub = _choose_subtype(backend.auth.method, subtypes, backend.tls.mode)
        if sub is None:
            names = ", ".join(rfb.vencrypt_name(s) for s in subtypes)
            raise UpstreamError(f"the desktop {backend.address} offers VeNCrypt {names}: none serves the route's auth "
                                f"method {backend.auth.method!r} over TLS", kind="auth",
                                client_hint=f"{where} offers no VeNCrypt subtype the proxy's login can use")
        await ms.stream.send_all(rfb.encode_u32(sub))
        if sub in rfb.VENCRYPT_TLS or sub in rfb.VENCRYPT_X509:
            if await _read(ms, rfb.parse_u8) != 1:
                raise UpstreamError(f"the desktop {backend.address} refused VeNCrypt {rfb.vencrypt_name(sub)}",
                                    kind="tls", client_hint=f"{where} refused the TLS upgrade")
            ctx = _anonymous_tls_context() if sub in rfb.VENCRYPT_TLS else client_context(backend.tls)
            tls = trio.SSLStream(ms.stream, ctx, server_hostname=backend.tls.server_name or backend.host)
            try:
                await tls.do_handshake()
            except (ssl.SSLError, ssl.CertificateError, trio.BrokenResourceError) as exc:
                raise UpstreamError(f"TLS handshake with the desktop {backend.address} failed: {exc.__cause__ or exc}",
                                    kind="tls", client_hint=f"the proxy could not establish TLS with {where}") \
                    from None
            ms.stream = tls
        if sub in (rfb.VENCRYPT_TLSVNC, rfb.VENCRYPT_X509VNC):
            await self._vnc_auth(ms, backend)
        elif sub in (rfb.VENCRYPT_TLSPLAIN, rfb.VENCRYPT_X509PLAIN):
            await ms.stream.send_all(rfb.encode_plain(backend.auth.params.get("username", ""),
                                                      backend.auth.secret.reveal()))
        return f"VeNCrypt {rfb.vencrypt_name(sub)}"

    # -- the session --------------------------------------------------------------------------------
    async def ready(self, session: Any, request: Request, backend: Backend) -> None:
        side: ClientSide = request.extra
        ms = request.client
        await ms.stream.send_all(rfb.encode_security_result(side.version, True))
        side.phase = "done"
        try:
            await _read(ms, rfb.parse_u8)  # ClientInit: the proxy already asked the desktop for a shared session
        except PeerClosed:
            raise ConnectionResetError("the viewer closed before its ClientInit") from None
        await ms.stream.send_all(backend.link.server_init.raw)

    def wiring(self, session: Any, request: Request, backend: Backend, grant: Any) -> Wiring:
        link: DesktopLink = backend.link
        init = link.server_init
        extra = self.listener.extra
        client_decoder = rfb.ClientMessageDecoder(self.max_message_size)
        client_decoder.feed(request.client.decoder.buffer.take_rest())  # what the viewer sent after ClientInit
        server_decoder = ServerDecoder(init.pixel_format)
        if link.leftover:
            server_decoder.feed(link.leftover)
        recorder = None
        folder = extra.get("recording_dir")
        if folder:
            from .recording import DesktopRecorder

            recorder = DesktopRecorder(os.path.join(folder, f"{session.id}.vncrec"), width=init.width,
                                       height=init.height, pixel_format=init.pixel_format, name=init.name)
        state = DesktopState(session, DesktopPolicy.from_grant(grant), recorder=recorder,
                             record_input=extra.get("recording_input", False),
                             audit_keys=extra.get("audit_keys", False),
                             on_pixel_format=server_decoder.set_pixel_format)
        return Wiring(client_decoder, server_decoder, [ClientStage(state)], [ServerStage(state)], state,
                      client_error=lambda exc: b"")

    async def session_ended(self, session: Any, request: Request, backend: Backend, wiring: Wiring,
                            pipeline: Any) -> dict:
        state: DesktopState = wiring.state
        fields = state.end_fields()
        if state.recorder is not None:
            # In the end event, so the audit's hash chain covers the recording's bytes.
            fields.update(state.recorder.fields())
            state.recorder = None
        return fields

    def render_error(self, request: Request, exc: ProxyError) -> bytes:
        """The refusal in the RFB message the viewer is waiting for."""
        side: ClientSide = request.extra
        message = exc.client_message if isinstance(exc, Refused) else getattr(exc, "client_hint", None) or str(exc)
        message = f"dbproxy: {message}"
        if side.phase == "security":
            return rfb.encode_failure(side.version, message)
        if side.phase == "result":
            return rfb.encode_security_result(side.version, False, message)
        return b""  # before the version (nothing to say yet) or after ServerInit (RFB has no error message)


def _choose(method: str, offered: tuple[int, ...]) -> int | None:
    """The security type the route's auth method uses among the desktop's (plain needs VeNCrypt)."""
    prefs = {"vnc": (rfb.SEC_VNC, rfb.SEC_VENCRYPT), "plain": (rfb.SEC_VENCRYPT,),
             "none": (rfb.SEC_NONE, rfb.SEC_VENCRYPT)}[method]
    for t in prefs:
        if t in offered:
            return t
    return None


def _choose_subtype(method: str, offered: tuple[int, ...], tls_mode: str) -> int | None:
    """A VeNCrypt subtype over TLS for the method: a certificate-checked one first when the route
    verifies the desktop's certificate, else the anonymous-TLS ones (never Plain without TLS: the
    password would cross in clear)."""
    x509 = {"vnc": rfb.VENCRYPT_X509VNC, "plain": rfb.VENCRYPT_X509PLAIN, "none": rfb.VENCRYPT_X509NONE}[method]
    anon = {"vnc": rfb.VENCRYPT_TLSVNC, "plain": rfb.VENCRYPT_TLSPLAIN, "none": rfb.VENCRYPT_TLSNONE}[method]
    prefs = (x509,) if tls_mode in ("verify-ca", "verify-full") else (x509, anon)
    if method == "vnc":
        prefs += (rfb.SEC_VNC,)  # VeNCrypt's own "VncAuth" subtype (2), unencrypted as classic VNC auth
    if method == "none":
        prefs += (rfb.SEC_NONE,)
    for sub in prefs:
        if sub in offered:
            return sub
    return None


def _anonymous_tls_context() -> ssl.SSLContext:
    """VeNCrypt's TLS* subtypes: anonymous Diffie-Hellman TLS (GnuTLS ANON-DH/ANON-ECDH), no certificate.

    Encrypts against eavesdroppers, not against a man in the middle (use the X509 subtypes with the
    route's ``tls`` verify modes for that).  TLS 1.3 has no anonymous suites: TLS 1.2, security level 0."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("aNULL:!eNULL:@SECLEVEL=0")
    return ctx
