"""The RDP engine: RDP passed through to the desktop it may reach, audited (honest scope).

Strategy.  An RDP client opens with one clear-text exchange — its X.224
Connection Request, the server's Connection Confirm ([MS-RDPBCGR] 1.3.1.1) —
and then starts TLS (and CredSSP/NLA when HYBRID was selected) *with the
server*.  The proxy reads that first exchange (``x224``), decides where the
connection may go, and then passes every byte through: it does not terminate
TLS, never sees the credentials, and injects none (not yet).  The core's flow
maps onto it:

    handshake   the client's Connection Request (one TPKT): its cookie
                (``Cookie: mstshash=USER`` — the user name the client
                *announces*, unauthenticated), its routing token, the
                protocols it offers (RDP_NEG_REQ).  A routing token
                ``dbproxy:TARGET`` names the target (xfreerdp
                ``/load-balance-info:dbproxy:TARGET``, mstsc's
                ``loadbalanceinfo:s:dbproxy:TARGET``); anything malformed is
                refused (audited) and the connection closed without a reply
    identify    RDP offers nothing before TLS: the listener's anonymous
                identity (``auth.methods: ["anonymous"]``, roles from
                ``anonymous_roles``) — the listener's access rules (where it
                listens, which roles its clients get) are the whole client check
    route       match key ``target`` (the routing token's TARGET, or "" when
                the client named none: a route without ``match`` takes it);
                the session's target is that name, else the route's name
    authorize   roles' ``desktops`` globs on the target (family ``desktop``)
    connect     TCP to the route's address (``dbproxy.net.connect_backend``:
                through an agent when the route says ``via``),
                the Connection Request forwarded as received — without the
                proxy's routing token when the client used one — and the
                server's Connection Confirm read (RDP_NEG_RSP: the selected
                protocol; RDP_NEG_FAILURE: relayed to the client as the
                server's answer)
    ready       the Connection Confirm relayed to the client as received
    relay       the core's ``Pipeline`` with a pass-through decoder and no
                stages: each received chunk goes out unchanged in one send

Refusals before the backend answers (a target the roles do not grant, no
route, the target unreachable or not speaking X.224) are audited by the
core and answered with an X.224 Disconnect Request (ISO 8073 13.5) in place
of the Connection Confirm: RDP has no way to carry a text message before
TLS, so the reason is in the audit event and the log, not on the client's
screen.

Audit: ``desktop.session.start`` / ``desktop.session.end`` with the core's
neutral fields (``target``, ``target_addr``, ``addr.remote``, ``route``),
``announced_user`` (the cookie's name, not verified by anyone at that
point), ``requested_protocols``, ``selected_protocol`` (or
``negotiation_failure``), and at the end bytes each way (the X.224 exchange
included) and ``duration_ms``; ``desktop.session.access_denied``.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import attrs
import trio

from dbproxy.channel import MessageStream, PeerClosed
from dbproxy.engine import Engine
from dbproxy.errors import ProxyError, UpstreamError
from dbproxy.flow import Backend, Refused, Request, Wiring
from dbproxy.net import connect_backend
from dbproxy.session import Identity

from . import config as rdpconfig
from . import x224
from .relay import PassThrough

log = logging.getLogger("dbproxy.rdp")

# The routing token that names a target to the proxy: ``dbproxy:TARGET`` (a host-like name).
TOKEN_PREFIX = b"dbproxy:"
_TARGET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}")
# A Connection Request is a few dozen bytes (8 + 36 of negotiation data, a cookie or routing
# token); 4 KiB leaves room for long load-balancing tokens and keeps a stalled client cheap.
DEFAULT_MAX_REQUEST = 4096


@attrs.define(eq=False)
class RdpRequest:
    """What the engine learnt from the client's Connection Request."""

    request: x224.ConnectionRequest | None = None
    forward: bytes = b""  # the bytes sent to the server: the request (maybe rewritten) and any bytes after it


@attrs.define(eq=False)
class RdpBackend:
    confirm: x224.ConnectionConfirm
    rest: bytes = b""


class RDPEngine(Engine):
    protocol = "rdp"
    family = "desktop"
    event_family = "desktop"
    match_keys = ("target",)
    # The client's credentials go end to end inside TLS/CredSSP: the route holds none.
    auth_methods = ("passthrough",)
    password_methods = ()
    client_auth_methods = ("anonymous",)
    listener_keys = rdpconfig.LISTENER_KEYS
    backend_keys = rdpconfig.BACKEND_KEYS
    default_max_message_size = DEFAULT_MAX_REQUEST
    # T.123 8: the TPKT length field is 16 bits.
    max_message_size_limit = x224.TPKT_MAX
    max_message_size_limit_source = "a TPKT's 16-bit length, T.123 section 8"

    validate_auth = staticmethod(rdpconfig.validate_auth)
    validate_backend = staticmethod(rdpconfig.validate_backend)

    # -- the session flow's hooks ----------------------------------------------------------
    def new_request(self, session: Any, stream: Any) -> Request:
        decoder = x224.X224Decoder(client=True, max_size=self.max_message_size)
        return Request(MessageStream(stream, decoder, budget=self.services.buffers), extra=RdpRequest(),
                       waiting_for="client X.224 Connection Request timed out")

    async def handshake(self, session: Any, request: Request) -> bool:
        state: RdpRequest = request.extra
        try:
            cr = await request.client.receive()
        except x224.X224Error as exc:
            raise Refused(f"malformed X.224 Connection Request: {exc}", fields={"reason": "malformed_x224"}) from None
        state.request = cr  # from here on, a refusal is answered in X.224 (``render_error``)
        fields = request.start_fields
        fields["requested_protocols"] = x224.protocol_names(cr.requested_protocols)
        if cr.negotiation is None:
            fields["negotiation"] = "none (legacy client: Standard RDP Security)"
        user = cr.cookie_user
        if user is not None:
            # The cookie's name: what the client says it will log in as.  Nobody has checked it.
            fields["announced_user"] = user
        forward_token = cr.token
        target = None
        if cr.token is not None and cr.token.startswith(TOKEN_PREFIX):
            name = cr.token[len(TOKEN_PREFIX):].decode("latin-1")
            if not _TARGET.fullmatch(name):
                raise Refused(f"routing token names no valid target: {name[:64]!r} (expected dbproxy:NAME, NAME of "
                              "letters, digits, '.', '_', '-')", fields={"reason": "bad_target"})
            target = name
            forward_token = None  # the proxy's token means nothing to the server
            fields["requested_target"] = target
        elif cr.token is not None and user is None:
            fields["routing_token"] = "present"  # a broker's token: forwarded as is, not interpreted
        request.target = target
        request.keys = {"target": target or ""}
        rest = request.client.decoder.rest()
        raw = cr.raw if forward_token is cr.token else x224.encode_connection_request(cr, forward_token)
        state.forward = raw + rest
        return True

    async def identify(self, session: Any, request: Request) -> None:
        # RDP authenticates inside TLS, end to end with the server: the proxy can check nothing
        # before it.  The listener's anonymous identity (and its roles) is all there is.
        session.identity = self.access.auth.anonymous() if self.access is not None else Identity()
        request.start_fields["client_auth"] = "anonymous"

    def check_route(self, session: Any, request: Request, route: Any) -> None:
        session.target = request.target or route.name

    def no_route(self, request: Request) -> Refused:
        what = f"target {request.target!r}" if request.target else "a connection that names no target"
        return Refused(f"no route for {what} on listener {self.listener.name}", fields={"reason": "no_route"})

    async def connect_backend(self, session: Any, request: Request, route: Any, grant: Any) -> Backend:
        state: RdpRequest = request.extra
        address = route.backend.address
        stream = await connect_backend(route.backend.host, route.backend.port, via=route.backend.via)
        ok = False
        try:
            await stream.send_all(state.forward)
            decoder = x224.X224Decoder(client=False)
            confirm = await MessageStream(stream, decoder).receive()
            ok = True
        except x224.X224Error as exc:
            raise UpstreamError(f"target {address} answered the X.224 Connection Request with something else: {exc}",
                                kind="protocol", client_hint="the target does not speak RDP") from None
        except PeerClosed:
            raise UpstreamError(f"target {address} closed the connection after the X.224 Connection Request",
                                kind="closed", client_hint="the target closed the connection") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise UpstreamError(f"the connection to target {address} failed during the X.224 exchange: {exc}",
                                kind="closed", client_hint="the connection to the target failed") from None
        finally:
            if not ok:
                await trio.aclose_forcefully(stream)
        fields: dict = {}
        if confirm.failure is not None:
            fields["negotiation_failure"] = confirm.failure
        elif confirm.selected_protocol is not None:
            fields["selected_protocol"] = x224.selected_name(confirm.selected_protocol)
        else:
            fields["selected_protocol"] = "RDP"  # no RDP_NEG_RSP: Standard RDP Security (2.2.1.2)
        return Backend(stream=stream, decoder=None, start_fields=fields,
                       link=RdpBackend(confirm=confirm, rest=decoder.rest()))

    def upstream_refused(self, request: Request, exc: UpstreamError) -> Refused:
        return Refused(str(exc), client_message=exc.client_hint, fields={"reason": f"target_{exc.kind}"})

    async def ready(self, session: Any, request: Request, backend: Backend) -> None:
        link: RdpBackend = backend.link
        await request.client.stream.send_all(link.confirm.raw + link.rest)

    def wiring(self, session: Any, request: Request, backend: Backend, grant: Any) -> Wiring:
        # No stages: what follows is TLS the proxy does not read.  The pump sends each received
        # chunk unchanged, in one send (the core's hot path).
        return Wiring(PassThrough(), PassThrough(), [], [], None, client_error=lambda exc: b"")

    async def session_ended(self, session: Any, request: Request, backend: Backend, wiring: Wiring,
                            pipeline: Any) -> dict:
        c2b, b2c = pipeline.statistics()
        state: RdpRequest = request.extra
        link: RdpBackend = backend.link
        fields = {
            # The X.224 exchange counts: it is part of what each side sent.
            "bytes_from_client": c2b.bytes_in + len(state.forward),
            "bytes_to_client": b2c.bytes_out + len(link.confirm.raw) + len(link.rest),
            "requested_protocols": request.start_fields.get("requested_protocols"),
        }
        for key in ("announced_user", "selected_protocol", "negotiation_failure"):
            value = request.start_fields.get(key)
            if value is not None:
                fields[key] = value
        return fields

    def render_error(self, request: Request, exc: ProxyError) -> bytes:
        """A refusal: an X.224 Disconnect Request in place of the Connection Confirm; nothing for
        bytes that were not a Connection Request (the connection just closes)."""
        state = request.extra
        if state is None or state.request is None:
            return b""
        return x224.encode_disconnect_request(state.request.src_ref)
