"""The IPMI v2.0 / RMCP+ engine: the proxy is a BMC toward the client and a console toward the real BMC.

Strategy.  The listener is the core's ``udp`` kind: one socket, datagrams
demultiplexed per client address into ``DatagramSession``s (an ipmitool run
is one socket, one RMCP+ session).  One dbproxy session is one RMCP+
session, and the session flow's steps happen inside its handshake:

    presence    ASF ping → pong; Get Channel Authentication Capabilities
                (IPMI v1.5 framing) → "IPMI v2.0 supported" (§22.13)
    handshake   Open Session (cipher suite 3 or 17, §13.17); RAKP 1 names the
                user: the proxy looks up the single-use code issued for that
                name (``dbproxy token issue --ipmi``, ``dbproxy.onetime``) and
                keys RAKP 2 with it — no code: status "unauthorized name"
    identify    RAKP 3's HMAC proves the client holds the code (else RAKP 4
                "invalid integrity check value"); the code is consumed once the
                session below exists (a second use finds nothing: "unauthorized
                name"; a refused or failed start leaves it for another try)
    route       match key ``target``: the code's target
    authorize   roles grant BMCs (``bmcs``) and commands (``ipmi``,
                ``commands.py``); the connection limits apply
    connect     the proxy's own RMCP+ session with the BMC (``console``) with
                the route's stored user/password; refused or unreachable →
                RAKP 4 "insufficient resources" (the client sees an error)
    ready       RAKP 4 with the integrity check value: the client is in
    relay       each authenticated, decrypted, in-window request is named,
                checked against the allow-list, audited, sent to the BMC
                under the proxy's session (its own rqSeq, sequence numbers,
                keys) and the answer re-sealed toward the client

Requests the proxy answers itself: Set Session Privilege Level (at most the
level the client opened its session with), Close Session (ends the dbproxy
session), Get Channel Authentication Capabilities and Get Channel Cipher
Suites (the proxy's own suites, session-less too).  A refused request gets
completion code D4h (insufficient privilege) from the proxy, audited as
``bmc.ipmi.command`` with ``refused: true``; a BMC that does not answer
after the retries → C3h (timeout) to the client.  Retransmissions: a
request whose rqSeq, NetFn, command and data equal the last one's is a
retransmission (the client did not get the answer): the cached response is
sent again and nothing reaches the BMC twice (§6.12.13 leaves rqSeq reuse to
the console; ipmitool resends with the same rqSeq).

Malformed, forged (bad AuthCode), replayed (``SequenceWindow``) or foreign
datagrams are dropped and counted — answered with nothing, as a BMC does —
so they cannot disturb the running session; the counts join the session's
end event.

SOL hook (``README-sol.md``): ``IpmiSession.payload_handlers[0x01]`` gets
the client's SOL payloads, ``IpmiSession.bmc.payload_handlers[0x01]`` the
BMC's, and ``IpmiSession.command_hooks[(netfn, cmd)]`` sees allowed
Activate/Deactivate Payload requests before they are relayed.  An
``engines/ipmi/sol_session.py`` with ``attach(ipmi_session)`` is called for every
established session.

Audit (``event_family`` ``bmc.ipmi``): ``bmc.ipmi.session.start`` / ``.end``
(client, user, target, cipher suite, privilege) and ``bmc.ipmi.command``.
No code, password, SIK or key ever enters the trail or the logs.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from typing import Any, Awaitable, Callable

import attrs
import trio

from dbproxy.access import audit_denial
from dbproxy.engine import Engine
from dbproxy.errors import AccessDenied
from dbproxy.onetime import NO_CODES_FILE, CodeStore, store_for
from dbproxy.session import Identity

from . import commands, config as ipmiconfig, rmcp
from .commands import (CC_CANNOT_RESPOND, CC_INSUFFICIENT_PRIVILEGE, CC_OK, CC_TIMEOUT, CMD_CLOSE_SESSION,
                       CMD_GET_CHANNEL_AUTH_CAPS, CMD_GET_CHANNEL_CIPHER_SUITES, CMD_SET_SESSION_PRIVILEGE, NETFN_APP,
                       Policy)
from .console import BmcError, BmcSession, BmcTimeout
from .rakp import (PRIV_NAMES, STATUS_INVALID_INTEGRITY_CHECK, STATUS_NAMES, STATUS_NO_RESOURCES,
                   STATUS_UNAUTHORIZED_NAME, STATUS_UNAUTHORIZED_ROLE, SUITES, BmcHandshake, HandshakeFailed)
from .rmcp import IpmiError, Request, Response

log = logging.getLogger("dbproxy.ipmi")

CODE_KIND = "ipmi"
CODE_LENGTH = 20  # an IPMI v2.0 password's full length (§13.31)
CODE_TTL = 300
# The proxy's login to the BMC (session setup with its retries) at a session's start.
CONNECT_TIMEOUT = 10.0


def _sol_attach() -> Callable[["IpmiSession"], Any] | None:
    """The SOL layer's ``attach`` (``engines/ipmi/sol_session.py``; ``sol.py`` is its sans-IO codec)."""
    try:
        from . import sol_session  # type: ignore[attr-defined]
    except ImportError:
        return None
    return getattr(sol_session, "attach", None)


class IpmiEngine(Engine):
    protocol = "ipmi"
    family = "bmc"
    event_family = "bmc.ipmi"
    listener_kinds = ("udp",)
    match_keys = ("target",)
    auth_methods = ("rakp",)
    password_methods = ("rakp",)
    client_auth_methods = ("token",)
    listener_keys = ipmiconfig.LISTENER_KEYS
    backend_keys = ipmiconfig.BACKEND_KEYS
    role_keys = ("ipmi",)
    # Single-use login codes this engine accepts (``dbproxy token issue --ipmi``): kind → length, lifetime, name.
    onetime_codes = {CODE_KIND: {"length": CODE_LENGTH, "ttl": CODE_TTL, "max_ttl": CODE_TTL, "max_name": 16}}

    validate_listener = staticmethod(ipmiconfig.validate_listener)
    validate_auth = staticmethod(ipmiconfig.validate_auth)
    validate_backend = staticmethod(ipmiconfig.validate_backend)
    validate_role_key = staticmethod(ipmiconfig.validate_role_key)

    def __init__(self, listener: Any, services: Any) -> None:
        super().__init__(listener, services)
        # The proxy's GUID as a BMC (RAKP 2, §13.21): one per listener and process.
        self.guid = os.urandom(16)
        self._codes: CodeStore | None = None
        self.sol_attach = _sol_attach()

    def codes(self) -> CodeStore | None:
        if self._codes is None and self.access is not None and self.access.auth.token:
            self._codes = store_for(getattr(self.access.auth, "authority", None))
        return self._codes

    async def handle_datagram_session(self, session: Any, channel: Any) -> None:
        session.family = self.family
        await IpmiSession(self, session, channel).run()


class _Ended(Exception):
    """The client session is over (Close Session, or a refused handshake after its answer)."""


class IpmiSession:
    """One client's RMCP+ session with the proxy, and the proxy's session with the BMC."""

    def __init__(self, engine: IpmiEngine, session: Any, channel: Any) -> None:
        self.engine = engine
        self.session = session
        self.channel = channel
        self.audit = session.audit
        self.handshake = BmcHandshake(engine.guid, suites=engine.listener.extra.get("cipher_suites", (3, 17)))
        self.keys: rmcp.SessionKeys | None = None
        self.window = rmcp.SequenceWindow()
        self.out_seq = 0
        self.bmc: BmcSession | None = None
        self.policy = Policy(None)
        self.route: Any = None
        self.code: Any = None
        self.rakp4: bytes | None = None  # the answer to a retransmitted RAKP 3
        self.privilege = 0
        self.fields: dict = {}
        self.nursery: trio.Nursery | None = None
        # The SOL hook (README-sol.md).
        self.payload_handlers: dict[int, Callable[[bytes], Awaitable[None]]] = {}
        self.command_hooks: dict[tuple[int, int], Callable[[Request], Awaitable[Response | None]]] = {}
        self.on_close: list[Callable[[], Awaitable[dict | None]]] = []
        # Retransmission cache: the last request (rqSeq, netFn, cmd, data) and the response it got.
        self._last: tuple[tuple, bytes] | None = None
        self.counts = {"commands": 0, "refused": 0, "retransmits": 0, "malformed": 0, "replayed": 0,
                       "bmc_timeouts": 0}

    # -- sending ---------------------------------------------------------------------------
    async def send_raw(self, data: bytes) -> None:
        await self.channel.send(data)

    async def send_to_client(self, payload_type: int, payload: bytes) -> None:
        """One payload of the established session toward the client (sealed with its keys)."""
        assert self.keys is not None
        self.out_seq = rmcp.next_seq(self.out_seq)
        await self.channel.send(self.keys.seal(payload_type, payload, session_id=self.handshake.console_sid,
                                               seq=self.out_seq))

    async def respond(self, request: Request, cc: int, data: bytes = b"") -> bytes:
        message = request.response(cc, data).encode()
        await self.send_to_client(rmcp.PT_IPMI, message)
        return message

    # -- the session ------------------------------------------------------------------------
    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                try:
                    await self._handshake()
                    if self.bmc is not None:
                        nursery.start_soon(self._bmc_reader)
                        await self._relay()
                except _Ended:
                    pass
                except trio.EndOfChannel:
                    self.session.details.setdefault("end_reason", "proxy shutting down")
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self._close()

    async def _close(self) -> None:
        end = dict(self.counts)
        for hook in self.on_close:
            try:
                with trio.move_on_after(5):
                    extra = await hook()
                if extra:
                    end.update(extra)
            except Exception:
                log.exception("session %s: SOL close hook", self.session.id)
        if self.bmc is not None:
            with trio.move_on_after(2):
                await self.bmc.close()
            end["bmc_retransmits"] = self.bmc.retransmits
            end["bmc_dropped"] = self.bmc.dropped
        if self.session.started:
            self.session.details.setdefault("end_fields", {}).update(end)

    async def _bmc_reader(self) -> None:
        assert self.bmc is not None
        try:
            await self.bmc.run()
        except BmcError as exc:
            log.warning("session %s: %s", self.session.id, exc)
            self.session.details["end_reason"] = f"BMC connection lost: {exc}"
            if not self.bmc._waiting:  # else the waiting request answers the client and ends the session
                self.nursery.cancel_scope.cancel()

    # -- handshake: presence, Open Session, RAKP 1–4 ---------------------------------------
    async def _handshake(self) -> None:
        hs = self.handshake
        # The client's handshake timeout bounds waiting for the client; the proxy's own login to the BMC
        # (inside RAKP 3's handling) has its own, CONNECT_TIMEOUT.
        deadline = trio.current_time() + self.engine.handshake_timeout
        while True:
            data = None
            with trio.move_on_at(deadline):
                data = await self.channel.receive()
            if data is None:
                break
            try:
                pkt = rmcp.parse(data)
            except IpmiError as exc:
                self._malformed(exc)
                continue
            if isinstance(pkt, rmcp.AsfPing):
                await self.send_raw(rmcp.asf_pong(pkt.tag))
                continue
            if isinstance(pkt, rmcp.Packet15):
                await self._session_less(pkt)
                continue
            if pkt.authenticated or pkt.session_id != 0:
                self._malformed("an authenticated packet before the session exists")
                continue
            try:
                if pkt.payload_type == rmcp.PT_OPEN_SESSION_REQUEST:
                    await self.send_raw(rmcp.packet20_clear(rmcp.PT_OPEN_SESSION_RESPONSE,
                                                            hs.open_session(pkt.payload)))
                elif pkt.payload_type == rmcp.PT_RAKP1:
                    await self._rakp1(pkt.payload)
                elif pkt.payload_type == rmcp.PT_RAKP3:
                    if await self._rakp3(pkt.payload):
                        return
                elif pkt.payload_type == rmcp.PT_IPMI:
                    await self._session_less(pkt, v2=True)
                else:
                    self._malformed(f"payload type {pkt.payload_type:#04x} before the session exists")
            except IpmiError as exc:
                self._malformed(exc)
            except HandshakeFailed as exc:
                await self._handshake_failed(pkt.payload_type, exc)
        if self.code is not None:
            # RAKP 2 went out keyed with the code and no RAKP 3 came: ipmitool checks RAKP 2 with the
            # password it was given and, when that is not the code, gives up without a word (§13.22
            # would have it send RAKP 3 with status 0Fh) — the usual trace of a wrong code.
            self.session.details["end_reason"] = "client RMCP+ handshake timed out"
            self._refused_start(f"no RAKP 3 within {self.engine.handshake_timeout:g}s after RAKP 2 (a client "
                                f"holding another code than the one issued gives up there)", "no_rakp3",
                                status=STATUS_INVALID_INTEGRITY_CHECK, stage="authenticate")
        elif hs.suite is not None:
            self.engine.handshake_timed_out(self.session, "client RMCP+ handshake timed out",
                                            **self._start_fields())
        raise _Ended

    async def _session_less(self, pkt: Any, *, v2: bool = False) -> None:
        """A request outside any session (IPMI v1.5 framing, or RMCP+ unauthenticated with session id 0,
        §13.14): only the two questions a console asks before Open Session are answered."""
        try:
            req = Request.decode(pkt.payload if v2 else pkt.message)
        except IpmiError as exc:
            self._malformed(exc)
            return
        if (req.netfn, req.cmd) == (NETFN_APP, CMD_GET_CHANNEL_AUTH_CAPS):
            resp = req.response(CC_OK, self._auth_caps(req)).encode()
        elif (req.netfn, req.cmd) == (NETFN_APP, CMD_GET_CHANNEL_CIPHER_SUITES):
            resp = req.response(CC_OK, self._cipher_suites(req)).encode()
        else:
            self._malformed(f"session-less request netFn {req.netfn:#04x} cmd {req.cmd:#04x}")
            return
        await self.send_raw(rmcp.packet20_clear(rmcp.PT_IPMI, resp) if v2 else rmcp.packet15(resp))

    def _cipher_suites(self, req: Request) -> bytes:
        """Get Channel Cipher Suites (§22.15): the proxy's own suites, so a console without ``-C``
        picks one (ipmitool 1.8.19 asks, then prefers 17); 16 bytes of records per list index."""
        records = b"".join(bytes((0xC0, s.id, s.auth, 0x40 | s.integrity.number, 0x80 | s.confidentiality))
                           for s in (SUITES[i] for i in self.handshake.suites))
        index = req.data[2] & 0x3F if len(req.data) >= 3 else 0
        return bytes((0x01,)) + records[16 * index:16 * index + 16]

    @staticmethod
    def _auth_caps(req: Request) -> bytes:
        # §22.13 table 22-15: channel 1; bit 7: IPMI v2.0 extended data; non-null user names only
        # (08h); extended capabilities: IPMI v2.0 connections (02h); no OEM.
        channel = (req.data[0] & 0x0F) if req.data and (req.data[0] & 0x0F) != 0x0E else 0x01
        return bytes((channel, 0x80, 0x08, 0x02, 0, 0, 0, 0))

    async def _rakp1(self, payload: bytes) -> None:
        hs = self.handshake
        msg = hs.rakp1(payload)
        name = msg.username.decode("utf-8", "replace")
        store = self.engine.codes()
        reason = "no_codes_file" if store is None else "unknown_or_used_code"
        try:
            code = store.lookup(CODE_KIND, name) if store is not None and msg.username else None
        except OSError as exc:  # fail closed: a code the proxy cannot read is no code
            log.error("session %s: cannot read the IPMI codes file: %s", self.session.id, exc)
            code, reason = None, "codes_file_unreadable"
        if code is None:
            await self.send_raw(rmcp.packet20_clear(rmcp.PT_RAKP2, hs.rakp2(None)))
            error = (f"RAKP 1: no IPMI code can be looked up: {NO_CODES_FILE}" if store is None else
                     f"RAKP 1: no outstanding IPMI code for user name {name!r} (unknown, used or expired)")
            self._refused_start(error, reason, status=STATUS_UNAUTHORIZED_NAME, stage="authenticate")
            raise _Ended
        self.code = code
        await self.send_raw(rmcp.packet20_clear(rmcp.PT_RAKP2, hs.rakp2(code.secret)))

    async def _rakp3(self, payload: bytes) -> bool:
        """True once the session is established (RAKP 4 sent with status 0)."""
        hs = self.handshake
        if self.rakp4 is not None:  # a retransmitted RAKP 3: RAKP 4 was lost
            await self.send_raw(rmcp.packet20_clear(rmcp.PT_RAKP4, self.rakp4))
            return False
        hs.rakp3(payload)  # raises HandshakeFailed (wrong code) before anything is consumed
        code = self.code
        identity = Identity(user=code.user, roles=code.roles, method="ipmi_code", token_id=code.id)
        self.session.identity = identity
        await self._start(identity)
        # The code is spent once the session exists: a refusal by role or a BMC that is down or refuses
        # the proxy leaves it usable for another try (nobody but its holder can pass RAKP 3 with it).
        store = self.engine.codes()
        try:
            consumed = store.consume(code)
        except OSError as exc:
            log.error("session %s: cannot consume the IPMI code: %s", self.session.id, exc)
            consumed = False
        if not consumed:
            with trio.move_on_after(2):
                await self.bmc.close()
            self.bmc = None
            await self._reject(STATUS_UNAUTHORIZED_NAME, "the IPMI code was used by another session (or "
                               "could not be marked used)", "code_already_used", stage="authenticate")
        self.rakp4 = hs.rakp4()
        self.keys = hs.keys
        self.privilege = hs.privilege
        self.audit.on_session_start(success=True, **self._start_fields())
        if self.engine.sol_attach is not None:
            self.engine.sol_attach(self)
        await self.send_raw(rmcp.packet20_clear(rmcp.PT_RAKP4, self.rakp4))
        return True

    def _start_fields(self) -> dict:
        hs = self.handshake
        fields = {"ipmi_user": hs.username.decode("utf-8", "replace"),
                  "cipher_suite": hs.suite.id if hs.suite else None,
                  "privilege": PRIV_NAMES.get(hs.role & 0x0F if hs.role else hs.privilege)}
        if self.code is not None:
            fields["requested_target"] = self.code.target
            fields["code_id"] = self.code.id
        fields.update(self.fields)
        return fields

    async def _start(self, identity: Identity) -> None:
        """Route, authorize and connect the BMC; refusals answer RAKP 4 with a status and end."""
        engine, session = self.engine, self.session
        target = self.code.target
        route = engine.select_route({"target": target or ""})
        if route is None:
            await self._reject(STATUS_UNAUTHORIZED_NAME, f"no route for BMC {target!r} on listener "
                               f"{engine.listener.name}", "no_route")
        self.route = route
        session.route_name, session.backend_addr, session.target = route.name, route.backend.address, target
        session.login = route.backend.auth.params.get("username")
        if engine.access is not None:
            try:
                grant = engine.access.authorize(identity, route=route.name, database=target, db_user=None,
                                                family=engine.family)
                engine.access.admit(session)
            except AccessDenied as exc:
                audit_denial(session, exc, stage="connect", **self._start_fields())
                await self._reject(STATUS_UNAUTHORIZED_ROLE, str(exc), exc.reason)
            self.fields["granted_roles"] = list(grant.roles)
            self.policy = Policy.from_grant(grant.policy("ipmi"))
        backend = route.backend
        bmc = BmcSession(backend.host, backend.port, SUITES[backend.extra.get("cipher_suite", 3)],
                         backend.auth.params["username"].encode(), backend.auth.secret.reveal().encode(),
                         backend.extra.get("privilege", 4))
        started = time.monotonic()
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                await bmc.open()
                await bmc.set_privilege(bmc.handshake.privilege)
        except (BmcError, trio.TooSlowError) as exc:
            await bmc.close()
            error = str(exc) if isinstance(exc, BmcError) else f"BMC {bmc.authority} did not complete the " \
                f"proxy's login within {CONNECT_TIMEOUT:.0f}s"
            reason = f"bmc_{exc.kind}" if isinstance(exc, BmcError) else "bmc_timeout"
            log.warning("session %s: %s", session.id, error)
            await self._reject(STATUS_NO_RESOURCES, error, reason)
        self.fields["bmc_login_ms"] = round((time.monotonic() - started) * 1000, 3)
        self.bmc = bmc

    async def _reject(self, status: int, error: str, reason: str, *, stage: str | None = None) -> None:
        await self.send_raw(rmcp.packet20_clear(rmcp.PT_RAKP4, self.handshake.rakp4(status)))
        self._refused_start(error, reason, status=status, stage=stage)
        raise _Ended

    def _refused_start(self, error: str, reason: str, *, status: int, stage: str | None = None) -> None:
        log.info("session %s from %s: %s", self.session.id, self.session.client_addr, error)
        fields = self._start_fields()
        if stage is not None:
            audit_denial(self.session, AccessDenied(error, reason=reason), stage=stage, **fields)
        self.session.details["refused"] = True
        self.session.details["end_reason"] = error
        self.audit.on_session_start(success=False, error=error, reason=reason, rakp_status=status,
                                    rakp_status_name=STATUS_NAMES.get(status), **fields)

    async def _handshake_failed(self, payload_type: int, exc: HandshakeFailed) -> None:
        hs = self.handshake
        if payload_type == rmcp.PT_RAKP1:
            await self.send_raw(rmcp.packet20_clear(rmcp.PT_RAKP2, hs.error(exc.status)))
            self._refused_start(f"RAKP 1 refused: {exc}", "rakp1_refused", status=exc.status)
        else:
            await self.send_raw(rmcp.packet20_clear(rmcp.PT_RAKP4, hs.rakp4(exc.status)))
            reason = "wrong_code" if exc.status == STATUS_INVALID_INTEGRITY_CHECK else "rakp3_refused"
            self._refused_start(f"RAKP 3 refused: {exc}", reason, status=exc.status,
                                stage="authenticate" if reason == "wrong_code" else None)
        raise _Ended

    def _malformed(self, why: Any) -> None:
        self.counts["malformed"] += 1
        log.debug("session %s from %s: datagram dropped: %s", self.session.id, self.session.client_addr, why)

    # -- the relay --------------------------------------------------------------------------
    def _open(self, data: bytes) -> rmcp.Packet20 | None:
        """An inbound datagram of the established session, authenticated and decrypted; None: dropped."""
        assert self.keys is not None
        try:
            pkt = rmcp.parse(data, auth_code_size=self.keys.integrity.size)
        except IpmiError as exc:
            self._malformed(exc)
            return None
        if not isinstance(pkt, rmcp.Packet20):
            return pkt  # type: ignore[return-value]  # ping / session-less: handled by the caller
        if pkt.session_id == 0:
            return pkt  # a setup message again (a retransmitted RAKP 3)
        if pkt.session_id != self.handshake.bmc_sid:
            self._malformed("another session's id")
            return None
        try:
            payload = self.keys.open(pkt)
        except IpmiError as exc:
            self._malformed(exc)
            return None
        if not self.window.accept(pkt.seq):
            self.counts["replayed"] += 1
            return None
        return attrs.evolve(pkt, payload=payload, encrypted=False, authenticated=True)

    async def _relay(self) -> None:
        while True:
            data = await self.channel.receive()
            pkt = self._open(data)
            if pkt is None:
                continue
            if isinstance(pkt, rmcp.AsfPing):
                await self.send_raw(rmcp.asf_pong(pkt.tag))
                continue
            if isinstance(pkt, rmcp.Packet15):
                await self._session_less(pkt)
                continue
            if pkt.session_id == 0:
                if pkt.payload_type == rmcp.PT_RAKP3 and self.rakp4 is not None:
                    await self.send_raw(rmcp.packet20_clear(rmcp.PT_RAKP4, self.rakp4))
                else:
                    self._malformed("a setup message in an established session")
                continue
            if pkt.payload_type == rmcp.PT_IPMI:
                try:
                    req = Request.decode(pkt.payload)
                except IpmiError as exc:
                    self._malformed(exc)
                    continue
                await self._request(req)
                continue
            handler = self.payload_handlers.get(pkt.payload_type)
            if handler is None:
                self._malformed(f"payload type {pkt.payload_type:#04x} not handled")
                continue
            await handler(pkt.payload)

    async def _request(self, req: Request) -> None:
        ident = (req.rq_seq, req.netfn, req.cmd, req.data)
        if self._last is not None and self._last[0] == ident:
            # The client did not get our answer and sent the same request again: answer it again,
            # without running it a second time (a power cycle must not happen twice).
            self.counts["retransmits"] += 1
            await self.send_to_client(rmcp.PT_IPMI, self._last[1])
            return
        name = commands.command_name(req.netfn, req.cmd, req.data)
        fields = {"netfn": req.netfn, "cmd": req.cmd, "command": name, "data_length": len(req.data)}
        if req.data:
            fields["data"] = commands.data_summary(req.data)
        if req.netfn == NETFN_APP and req.cmd in (CMD_SET_SESSION_PRIVILEGE, CMD_CLOSE_SESSION,
                                                   CMD_GET_CHANNEL_AUTH_CAPS, CMD_GET_CHANNEL_CIPHER_SUITES):
            await self._local(req, fields, ident)
            return
        self.counts["commands"] += 1
        if not self.policy.allows(name):
            self.counts["refused"] += 1
            self.audit.emit("bmc.ipmi.command", **fields, refused=True, success=False, completion_code=CC_INSUFFICIENT_PRIVILEGE,
                            reason="not_allowed_by_role")
            self._last = (ident, await self.respond(req, CC_INSUFFICIENT_PRIVILEGE))
            return
        self.audit.emit("bmc.ipmi.command", **fields, refused=False, verdict="allowed")
        await self.audit.flush()  # the audit's backpressure before the BMC acts
        started = time.monotonic()
        hook = self.command_hooks.get((req.netfn, req.cmd))
        try:
            resp = await hook(req) if hook is not None else None
            if resp is None:
                bmc_resp = await self.bmc.request(req.netfn, req.cmd, req.data, rs_lun=req.rs_lun)
                resp = req.response(bmc_resp.cc, bmc_resp.data)
        except BmcTimeout as exc:
            self.counts["bmc_timeouts"] += 1
            self.audit.emit("bmc.ipmi.response", netfn=req.netfn, cmd=req.cmd, command=name, success=False,
                            completion_code=CC_TIMEOUT, error=str(exc),
                            duration_ms=round((time.monotonic() - started) * 1000, 3))
            self._last = (ident, await self.respond(req, CC_TIMEOUT))
            return
        except BmcError as exc:
            # The BMC went away (e.g. ICMP port unreachable): tell the client, end the session.
            self.audit.emit("bmc.ipmi.response", netfn=req.netfn, cmd=req.cmd, command=name, success=False,
                            completion_code=CC_CANNOT_RESPOND, error=str(exc),
                            duration_ms=round((time.monotonic() - started) * 1000, 3))
            await self.respond(req, CC_CANNOT_RESPOND)
            self.session.details["end_reason"] = f"BMC connection lost: {exc}"
            raise _Ended from None
        self.audit.emit("bmc.ipmi.response", netfn=req.netfn, cmd=req.cmd, command=name, success=resp.cc == CC_OK,
                        completion_code=resp.cc, data_length=len(resp.data),
                        duration_ms=round((time.monotonic() - started) * 1000, 3))
        message = resp.encode()
        await self.send_to_client(rmcp.PT_IPMI, message)
        self._last = (ident, message)

    async def _local(self, req: Request, fields: dict, ident: tuple) -> None:
        if req.cmd == CMD_GET_CHANNEL_AUTH_CAPS:
            self._last = (ident, await self.respond(req, CC_OK, self._auth_caps(req)))
            return
        if req.cmd == CMD_GET_CHANNEL_CIPHER_SUITES:
            self._last = (ident, await self.respond(req, CC_OK, self._cipher_suites(req)))
            return
        if req.cmd == CMD_SET_SESSION_PRIVILEGE:
            wanted = req.data[0] & 0x0F if req.data else 0
            if wanted == 0:  # "no change": report the present level (§22.18)
                self._last = (ident, await self.respond(req, CC_OK, bytes((self.privilege,))))
            elif wanted > self.privilege or wanted > 5:
                self.audit.emit("bmc.ipmi.command", **fields, refused=True, success=False, completion_code=0x81,
                                reason="privilege_above_session")
                self._last = (ident, await self.respond(req, 0x81))  # "exceeds the user's limit" (§22.18)
            else:
                self.privilege = wanted
                self._last = (ident, await self.respond(req, CC_OK, bytes((wanted,))))
            return
        # Close Session (§22.19): ours only; another session's id is not this client's to close.
        sid = struct.unpack("<I", req.data[:4])[0] if len(req.data) >= 4 else None
        if sid != self.handshake.bmc_sid:
            self._last = (ident, await self.respond(req, 0x87))  # "invalid session ID in request"
            return
        await self.respond(req, CC_OK)
        self.session.details["end_reason"] = "client closed the session"
        raise _Ended


__all__ = ["IpmiEngine", "IpmiSession"]
