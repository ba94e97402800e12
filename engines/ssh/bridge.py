"""The narrow interface between the SSH engine (trio) and asyncssh (asyncio, under trio-asyncio).

Strategy.  SSH is terminated on both sides by asyncssh — the proxy writes no
SSH or crypto.  asyncssh runs on a trio-asyncio loop the engine opens per
session, inside the session's own trio task, so the session's cancellation,
deadlines and audit are trio's and nothing outlives the session.  The accepted
client socket is handed to ``asyncssh.run_server`` (a duplicate descriptor:
the core still owns, lingers and closes its stream).

Two directions meet here:

- *trio → asyncio*: the engine awaits asyncssh coroutines through
  ``trio_asyncio.aio_as_trio`` (``run_server``, ``connect``).
- *asyncio → trio*: asyncssh calls the ``ClientGate`` (an ``SSHServer``)
  back during user authentication; the gate hands the attempt to the engine
  (``wait_attempt``) and answers asyncssh with a future the engine resolves
  once the core's session flow has identified, routed, authorized and logged
  in to the target (``accept``) — or disconnects with the refusal's message
  (``refuse``), so the client is told why in SSH's own terms (RFC 4253
  §11.1, SSH_MSG_DISCONNECT with a description OpenSSH prints).

After authentication every session channel (RFC 4254 §6) the client opens is
relayed to a channel of the same kind on the target by ``ChannelRelay`` /
``TargetSide`` — pty request with its modes, window changes, signals,
breaks, exit status / signal, EOF — entirely in asyncssh's callbacks (no
task per chunk; flow control by pausing the other side's reading when a
side's send window is full; the packets one received chunk makes for the
other connection go to its socket in one write, ``coalesce_writes``, without the
SSH_MSG_IGNORE asyncssh puts before each, ``drop_ignores``; AES-GCM on the client leg when the
client has it, ``offer_gcm_only``).  What
the audit wants to know is emitted from those callbacks *before* the request
is forwarded (an exec command before the target sees it).  Forwarding requests are audited with their verdict:
``direct-tcpip`` (``-L``, ``-D``, ``-W``) and ``tcpip-forward`` (``-R``)
are relayed through the target connection when a granting role's
``port_forwarding`` allows them (asyncssh's ``SSHForwarder`` pairs the
channels), refused otherwise; Unix-socket variants, agent and X11 always.
Client keys and certificates (``ClientKeys``) are matched before asyncssh
checks the signature; only a verified request becomes the connection's one
authentication attempt.  An exec line a role's deny patterns refuse
(``policy``) and a pty-less shell for such a role never reach the target: the
channel is answered locally (stderr, exit status 126).  Pty channels are
recorded when the listener says where, and the client's
keystrokes on them go through the core's terminal layer
(``dbproxy.terminal.audit``: observer, recording) before they are forwarded: each line is
audited and checked against the deny patterns when Enter is pressed.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import os
import socket
from typing import Any

import asyncssh
import attrs
import trio
import trio_asyncio

from dbproxy.access import audit_denial
from dbproxy.errors import AccessDenied, ProtocolError

from dbproxy.terminal.audit import TerminalAudit
from dbproxy.terminal.observer import Step

from .policy import denied_exec, simple_commands
from .sftp import SftpAudit

log = logging.getLogger("dbproxy.ssh")

# asyncssh logs every packet-level step at INFO; the proxy's log is for sessions.
logging.getLogger("asyncssh").setLevel(logging.WARNING)

# After the session ends, how long the channels' close callbacks may take to run.
CHANNEL_CLOSE_GRACE = 2.0

# The exit status of an exec the policy refused (the shell's "found but cannot execute").
EXIT_REFUSED = 126

KBDINT_PROMPT = "Password (dbproxy token): "

# Channel flow control (RFC 4254 §5.2) on both legs: the window the proxy grants each sender and the
# largest data packet it accepts.  Kept at asyncssh's defaults, 2 MiB / 32 KiB: scripts/bench/ssh saw
# no difference beyond noise for windows of 0.5-8 MiB (proxy CPU 8.5-10.6 ns/byte either way), and
# the packet size is the senders' (OpenSSH sends at most 32 KiB whatever we accept).  The
# DBPROXY_SSH_WINDOW / DBPROXY_SSH_PACKET environment variables override them for such an A/B run.
CHANNEL_WINDOW = int(os.environ.get("DBPROXY_SSH_WINDOW", 2 * 1024 * 1024))
CHANNEL_PACKET = int(os.environ.get("DBPROXY_SSH_PACKET", 32768))

# Ciphers: the proxy decrypts and re-encrypts every byte, in asyncssh on pyca/cryptography.  There
# chacha20-poly1305 (OpenSSH's first choice) is the slowest: per 32 KiB packet, measured on this
# machine, 95 MB/s against 328 MB/s for AES-GCM (aes128-ctr + umac-64-etm about half of AES-GCM).
# So AES-GCM first on the target leg (we are the client there: our order wins, RFC 4253 §7.1), and
# the client leg offers no chacha20 — the client's order wins there, and OpenSSH then picks
# aes128-ctr (it lists CTR before GCM).  The rest are asyncssh's defaults.
_GCM = ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com"]
_REST = [a.decode() for a in asyncssh.encryption.get_default_encryption_algs() if a.decode() not in _GCM]
TARGET_CIPHERS = _GCM + _REST
CLIENT_CIPHERS = _GCM + [a for a in _REST if not a.startswith("chacha20")]
# ... unless ``offer_gcm_only`` sees the client list AES-GCM: it is then offered alone.
# DBPROXY_SSH_CLIENT_GCM=0 leaves the client leg at CLIENT_CIPHERS (for an A/B run of scripts/bench/ssh).
_CLIENT_GCM = os.environ.get("DBPROXY_SSH_CLIENT_GCM", "1") != "0"
# How long the proxy waits for the client's KEXINIT before sending its own anyway.
KEXINIT_WAIT = 1.0


def offer_gcm_only(conn: Any) -> None:
    """Get AES-GCM on the client leg from clients that list it, without refusing those that do not.

    The client's order decides the cipher (RFC 4253 §7.1: the first on the client's list the
    server also lists), and OpenSSH lists aes*-ctr before aes*-gcm: offered CLIENT_CIPHERS, it
    picks aes128-ctr + umac-64-etm, which costs the proxy (and the client) more per byte than
    AES-GCM (scripts/bench/README.md).  Both sides send KEXINIT without waiting for the other's
    (§7.1), so the server may as well send its own after reading the client's: the proxy holds
    its KEXINIT back (asyncssh sends it on the client's version line) until the client's arrives,
    and then offers only the AES-GCM ciphers when the client lists one for both directions, else
    CLIENT_CIPHERS unchanged.  The exchange hash covers both KEXINITs as sent (§8), whatever their
    order.  A client that waits for the server's KEXINIT first gets it after ``KEXINIT_WAIT``.
    Rekeys (a session id exists) are asyncssh's, unchanged.
    """
    if not _CLIENT_GCM:
        return
    send_kexinit = conn._send_kexinit
    handlers = dict(conn._packet_handlers)  # per instance: asyncssh looks handlers up on self
    process_kexinit = handlers[asyncssh.constants.MSG_KEXINIT]
    held = False
    timer: asyncio.TimerHandle | None = None

    def release() -> None:
        nonlocal held
        if held and conn._transport is not None:
            held = False
            send_kexinit()

    def hold_first_kexinit() -> None:
        nonlocal held, timer
        if conn._session_id or held is None:  # a rekey, or the first KEXINIT already went out
            send_kexinit()
            return
        held = True
        timer = asyncio.get_event_loop().call_later(KEXINIT_WAIT, release)

    def kexinit_received(self: Any, pkttype: int, pktid: int, packet: Any) -> Any:
        nonlocal held
        if timer is not None:
            timer.cancel()  # nothing left on the session's loop once the KEXINITs are exchanged
        if held:
            peek = asyncssh.packet.SSHPacket(packet.get_remaining_payload())
            peek.get_bytes(16)  # cookie
            peek.get_namelist()  # kex algorithms
            peek.get_namelist()  # host key algorithms
            to_server, to_client = peek.get_namelist(), peek.get_namelist()
            gcm = [a.encode() for a in _GCM]
            if any(a in gcm for a in to_server) and any(a in gcm for a in to_client):
                conn._enc_algs = gcm
            release()
        held = None  # from now on asyncssh's own
        return process_kexinit(self, pkttype, pktid, packet)

    handlers[asyncssh.constants.MSG_KEXINIT] = kexinit_received
    conn._packet_handlers = handlers
    conn._send_kexinit = hold_first_kexinit

# A batch of SSH packets to one peer is handed to the socket at most this large at a time.
COALESCE_LIMIT = 256 * 1024
# DBPROXY_SSH_COALESCE=0 writes each packet as asyncssh makes it (for an A/B run of scripts/bench/ssh).
_COALESCE = os.environ.get("DBPROXY_SSH_COALESCE", "1") != "0"
# asyncssh sends an empty SSH_MSG_IGNORE before every packet after the key exchange: a defence of
# CBC modes, whose IV for a packet is the last ciphertext block the attacker saw (RFC 4251 §9.3.1
# mentions it; OpenSSH does not do it).  None of the ciphers the proxy offers or accepts is CBC
# (CTR, GCM, chacha20-poly1305), and each ignore is a packet more to pad, encrypt and MAC here and
# to decrypt at the peer: they are dropped.  DBPROXY_SSH_IGNORE=1 keeps them (for an A/B run).
_DROP_IGNORE = os.environ.get("DBPROXY_SSH_IGNORE", "0") != "1"
_EMPTY_IGNORE = (asyncssh.packet.String(b""),)


def coalesce_writes(conn: Any) -> None:
    """Hand ``conn``'s outgoing packets to its socket in one write per received chunk, not one per packet.

    asyncssh writes every packet to the transport as it makes it, and an SSH_MSG_IGNORE before
    each one; with TCP_NODELAY each becomes its own ``send()`` and TCP segment.  Relaying one
    256 KiB read from a peer makes ~8 data packets (+8 ignores, + window adjusts) for the other.
    Here they are joined and written once: when the ``data_received`` of either connection of
    the session that caused them returns (so an echoed keystroke waits for no extra loop turn),
    else (packets made by a timer or a task) when the loop comes round (``call_soon``, FIFO:
    before an ``abort`` asyncssh schedules after them), or at once past ``COALESCE_LIMIT``.
    """
    transport = conn._transport
    if not _COALESCE or transport is None:
        return
    loop = asyncio.get_event_loop()
    pending: list[bytes] = []
    size = 0

    def flush() -> None:
        nonlocal size
        if not pending:
            return
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        pending.clear()
        size = 0
        if not transport.is_closing():
            try:
                transport.write(data)
            except ConnectionError:  # as asyncssh's own _send: the peer is gone, connection_lost follows
                pass

    def send(data: bytes) -> None:
        nonlocal size
        if conn._transport is None:  # as asyncssh's own _send: nothing goes out after a forced close
            return
        if not pending:
            loop.call_soon(flush)
        pending.append(data)
        size += len(data)
        if size >= COALESCE_LIMIT:
            flush()

    # The flushes of the connections on this loop (one loop per session: its client and target
    # connections), kept on the loop so they go with it.
    flushes = getattr(loop, "_dbproxy_ssh_flushes", None)
    if flushes is None:
        flushes = loop._dbproxy_ssh_flushes = []  # type: ignore[attr-defined]
    flushes.append(flush)
    receive = conn.data_received

    def data_received(data: bytes, datatype: Any = None) -> None:
        try:
            receive(data, datatype)
        finally:
            for f in flushes:
                f()

    conn._send = send
    conn.data_received = data_received


def drop_ignores(conn: Any) -> None:
    """No SSH_MSG_IGNORE before each packet ``conn`` sends (``_DROP_IGNORE``), unless it encrypts with CBC."""
    if not _DROP_IGNORE:
        return
    send_packet = conn.send_packet

    def send_packet_unpadded(pkttype: int, *args: bytes, handler: Any = None) -> None:
        if (pkttype == asyncssh.constants.MSG_IGNORE and args == _EMPTY_IGNORE
                and b"-cbc" not in (conn._enc_alg_cs if conn.is_client() else conn._enc_alg_sc)):
            return
        send_packet(pkttype, *args, handler=handler)

    conn.send_packet = send_packet_unpadded  # asyncssh calls it as self.send_packet: the instance's wins


DISC_REFUSED = asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE
DISC_UNAVAILABLE = asyncssh.DISC_SERVICE_NOT_AVAILABLE
DISC_BY_APPLICATION = asyncssh.DISC_BY_APPLICATION


@attrs.define(eq=False)
class AuthAttempt:
    """One user-authentication request (RFC 4252 §8 password / RFC 4256 keyboard-interactive, or
    §7 publickey with its signature verified — ``key`` is then the registered key it matched)."""

    username: str
    secret: str | None  # dropped by the engine as soon as it is checked
    method: str
    answer: Any  # asyncio.Future[bool] asyncssh awaits
    key: "KeyMatch | None" = None


@attrs.frozen
class KeyMatch:
    """Who a client key proves to be: ``method`` ``publickey`` (a registered key) or ``certificate``
    (an OpenSSH user certificate of the configured CA naming ``user`` as a principal)."""

    user: str
    roles: tuple[str, ...]
    method: str
    fingerprint: str
    key_id: str | None = None  # a certificate's key id (the CA's name for it)


class ClientKeys:
    """``identity.publickey`` read with asyncssh: registered keys → user, and the user CA."""

    def __init__(self, cfg: Any) -> None:
        self.roles: dict[str, tuple[str, ...]] = {}
        self.keys: dict[bytes, str] = {}
        for user, roles, path in cfg.users:
            self.roles[user] = roles
            if path is not None:
                with open(path, encoding="utf-8") as f:  # plain key lines (the config validated them)
                    for line in f:
                        line = line.strip()
                        if line and not line.startswith("#"):
                            self.keys[asyncssh.import_public_key(line).public_data] = user
        self.ca = asyncssh.read_public_key(cfg.user_ca_file).public_data if cfg.user_ca_file else None

    def lookup(self, key_data: bytes) -> KeyMatch | None:
        """The identity a key (or certificate) blob from a publickey request proves, before its signature."""
        from asyncssh.public_key import decode_ssh_certificate, decode_ssh_public_key

        try:
            cert = decode_ssh_certificate(key_data)
        except asyncssh.KeyImportError:
            cert = None
        if cert is not None:
            if cert.is_x509_chain or self.ca is None or cert.signing_key.public_data != self.ca:
                return None
            if "force-command" in cert.options:
                return None  # the proxy would not enforce it: refuse rather than silently widen the certificate
            # The first principal that is a configured user (none: the certificate proves nobody here).
            user = next((p for p in cert.principals if p in self.roles), None)
            if user is None:
                return None
            return KeyMatch(user, self.roles[user], "certificate", cert.key.get_fingerprint(), key_id=cert._key_id)
        try:
            key = decode_ssh_public_key(key_data)
        except asyncssh.KeyImportError:
            return None
        user = self.keys.get(key.public_data)
        if user is None:
            return None
        return KeyMatch(user, self.roles[user], "publickey", key.get_fingerprint())


@attrs.define(eq=False)
class Counters:
    bytes_in: int = 0
    bytes_out: int = 0


class ClientGate(asyncssh.SSHServer):
    """The client side of one SSH connection: its authentication, its channel and forwarding requests."""

    def __init__(self, session: Any, client_keys: ClientKeys | None = None) -> None:
        self.session = session
        self.client_keys = client_keys
        self.conn: asyncssh.SSHServerConnection | None = None
        self.attempt: AuthAttempt | None = None
        self.attempted = trio.Event()
        self.closed = trio.Event()
        self.close_reason: str | None = None
        self.relay: "Relay | None" = None
        self.authorized = False
        self.refused = False

    # -- connection ------------------------------------------------------------------
    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        coalesce_writes(conn)
        drop_ignores(conn)
        offer_gcm_only(conn)
        # Agent and X11 requests arrive on a session channel and asyncssh decides them in these two
        # connection methods; refusing there (and auditing) keeps its own handling of the reply.
        conn.create_agent_listener = self._refuse_agent  # type: ignore[method-assign]
        conn.attach_x11_listener = self._refuse_x11  # type: ignore[method-assign]
        if self.client_keys is not None:
            verify = conn.validate_public_key

            async def validate_public_key(username: str, key_data: bytes, msg: bytes, signature: bytes) -> bool:
                # RFC 4252 §7: a query (no signature) is answered from the registry; a signed request
                # is checked by asyncssh (signature over the session id, certificate validity and
                # source-address) and only then becomes the connection's one authentication attempt.
                match = self.client_keys.lookup(key_data)  # type: ignore[union-attr]
                if match is None:
                    return False
                if not msg:
                    return True
                # A certificate's principal is the identity, not the LOGIN@TARGET user name.
                if not await verify(match.user if match.method == "certificate" else username, key_data, msg, signature):
                    return False
                answer = self._attempt(username, None, "publickey", key=match)
                return bool(await answer) if answer is not False else False

            conn.validate_public_key = validate_public_key  # type: ignore[method-assign]

    def connection_lost(self, exc: Exception | None) -> None:
        self.close_reason = f"client connection lost: {exc}" if exc else "client closed the connection"
        self.closed.set()
        self.attempted.set()  # a handshake still waiting for an attempt sees the end
        if self.relay is not None:
            self.relay.client_gone()

    # -- authentication (RFC 4252) ------------------------------------------------------
    def begin_auth(self, username: str) -> bool:
        return True  # every client must authenticate

    def public_key_auth_supported(self) -> bool:
        return self.client_keys is not None

    # asyncssh's own checks, called from ``verify`` above once the registry matched the key.
    def validate_public_key(self, username: str, key: Any) -> bool:
        return self.client_keys is not None and self.client_keys.keys.get(key.public_data) is not None

    def validate_ca_key(self, username: str, key: Any) -> bool:
        return self.client_keys is not None and key.public_data == self.client_keys.ca

    def password_auth_supported(self) -> bool:
        return True

    def validate_password(self, username: str, password: str) -> Any:
        return self._attempt(username, password, "password")

    def kbdint_auth_supported(self) -> bool:
        return True

    def get_kbdint_challenge(self, username: str, lang: str, submethods: str) -> Any:
        return "dbproxy", "Authenticate with your dbproxy token.", "", [(KBDINT_PROMPT, False)]

    def validate_kbdint_response(self, username: str, responses: Any) -> Any:
        if len(responses) != 1:
            return False
        return self._attempt(username, responses[0], "keyboard-interactive")

    def _attempt(self, username: str, secret: str | None, method: str, key: KeyMatch | None = None) -> Any:
        if self.attempt is not None or self.refused:
            # One identification per connection: the first attempt decides (a refusal disconnects).
            return False
        answer = asyncio.get_event_loop().create_future()
        self.attempt = AuthAttempt(username, secret, method, answer, key)
        self.attempted.set()
        return answer

    def accept(self) -> None:
        """The session may start: asyncssh completes the client's authentication."""
        self.authorized = True
        if self.attempt is not None and not self.attempt.answer.done():
            self.attempt.answer.set_result(True)

    def refuse(self, message: str, code: int = DISC_REFUSED) -> None:
        """Disconnect the client with ``message`` (OpenSSH prints it: "Received disconnect …: MESSAGE")."""
        self.refused = True
        if self.conn is None or self.closed.is_set():
            return
        try:
            self.conn.disconnect(code, message)
        except Exception as exc:  # a connection already torn down: nothing left to tell
            log.debug("ssh disconnect failed: %s", exc)

    # -- channels (RFC 4254) ------------------------------------------------------------
    def session_requested(self) -> Any:
        if not self.authorized or self.relay is None:
            return False
        chan = self.conn.create_server_channel(encoding=None, window=CHANNEL_WINDOW,  # type: ignore[union-attr]
                                               max_pktsize=CHANNEL_PACKET)
        return chan, ChannelRelay(self.relay)

    def _forwarding_allowed(self, kind: str) -> bool:
        grant = self.relay.grant if self.relay is not None else None
        return grant is not None and grant.allows_forwarding(kind)

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> Any:
        # direct-tcpip (RFC 4254 §7.2): ssh -L, -D (SOCKS: one channel per connection) and -W.
        fields = dict(dest_host=dest_host, dest_port=dest_port, orig_host=orig_host, orig_port=orig_port)
        if not self._forwarding_allowed("local"):
            self._forward_refused("direct-tcpip", **fields)
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                                            "port forwarding is not allowed through this proxy")
        self._forward_allowed("direct-tcpip", **fields)
        # asyncssh opens the same channel on the target connection and pairs the two (SSHForwarder):
        # the connection to dest starts from the target, as if the client were logged in there.
        return self.relay.target.conn  # type: ignore[union-attr]

    def server_requested(self, listen_host: str, listen_port: int) -> Any:
        # tcpip-forward (RFC 4254 §7.1): ssh -R — the target listens, its connections come back to
        # the client as forwarded-tcpip channels.
        if not self._forwarding_allowed("remote"):
            self._forward_refused("tcpip-forward", listen_host=listen_host, listen_port=listen_port)
            return False
        return self._listen_on_target(listen_host, listen_port)

    async def _listen_on_target(self, listen_host: str, listen_port: int) -> Any:
        from asyncssh.forward import SSHForwarder

        bound: list[int] = [listen_port]

        async def tunnel(orig_host: str, orig_port: int) -> Any:
            if self.session.audit is not None:
                self.session.audit.emit("ssh.forward.connection", request="tcpip-forward", listen_host=listen_host,
                                        listen_port=bound[0], orig_host=orig_host, orig_port=orig_port)
            _, peer = await self.conn.create_connection(  # type: ignore[union-attr]
                SSHForwarder, listen_host, bound[0], orig_host, orig_port)
            return SSHForwarder(peer)

        try:
            listener = await self.relay.target.conn.create_server(tunnel, listen_host, listen_port)  # type: ignore[union-attr]
        except asyncssh.Error as exc:
            self._forward_refused("tcpip-forward", listen_host=listen_host, listen_port=listen_port,
                                  reason=f"the target refused to listen: {getattr(exc, 'reason', exc)}")
            return False
        bound[0] = listener.get_port() or listen_port
        self._forward_allowed("tcpip-forward", listen_host=listen_host, listen_port=listen_port, bound_port=bound[0])
        return listener

    def unix_connection_requested(self, dest_path: str) -> Any:
        self._forward_refused("direct-streamlocal", dest_path=dest_path)
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                                        "socket forwarding is not allowed through this proxy")

    def unix_server_requested(self, listen_path: str) -> bool:
        self._forward_refused("streamlocal-forward", listen_path=listen_path)
        return False

    async def _refuse_agent(self) -> bool:
        self._forward_refused("auth-agent")
        return False

    async def _refuse_x11(self, chan: Any, auth_proto: bytes, auth_data: bytes, screen: int) -> None:
        self._forward_refused("x11", screen=screen)  # never the X11 cookie
        return None

    def _forward_refused(self, request: str, **fields: Any) -> None:
        log.info("session %s: %s refused", self.session.id, request)
        fields.setdefault("reason", "forwarding is not allowed by default" if request in ("auth-agent", "x11")
                          or "streamlocal" in request else "no role of this session allows this forwarding")
        if self.session.audit is not None:
            self.session.audit.emit("ssh.forward", request=request, verdict="denied", success=False, **fields)

    def _forward_allowed(self, request: str, **fields: Any) -> None:
        log.info("session %s: %s allowed", self.session.id, request)
        if self.session.audit is not None:
            self.session.audit.emit("ssh.forward", request=request, verdict="allowed", success=True, **fields)


# -------------------------------------------------------------------------- the relay


class Relay:
    """The session after authentication: the target connection and the live channel pairs.

    Shaped like the core's ``Pipeline`` for ``dbproxy.flow`` (``run``, ``end_reason``,
    ``statistics``): ``run`` returns when either SSH connection ends, and closes the other.
    """

    def __init__(self, session: Any, gate: ClientGate, target: "TargetConnection", *,
                 recording_dir: str | None = None, grant: Any = None, env_allow: tuple = (),
                 idle_timeout: float | None = None, recording_input: bool = False) -> None:
        self.recording_input = recording_input
        self.session = session
        self.idle_timeout = idle_timeout
        self.env_allow = env_allow
        self.grant = grant
        self.recording_dir = recording_dir
        self.recordings: list[dict] = []
        self.gate = gate
        self.target = target
        self.ended = trio.Event()
        self.end_reason: str | None = None
        self.from_client = Counters()
        self.to_client = Counters()
        self.channels = 0
        self.execs = 0
        self.open_channels: set = set()
        self.channels_done = trio.Event()
        target.relay = self
        gate.relay = self

    def client_gone(self) -> None:
        self.end_reason = self.end_reason or self.gate.close_reason
        self.ended.set()

    def target_gone(self, exc: Exception | None) -> None:
        self.end_reason = self.end_reason or (f"target connection lost: {exc}" if exc else "target closed the connection")
        self.ended.set()

    async def run(self) -> None:
        if self.gate.closed.is_set():
            self.client_gone()
        async with trio.open_nursery() as nursery:
            if self.idle_timeout:
                nursery.start_soon(self._watch_idle, self.idle_timeout)
            await self.ended.wait()
            nursery.cancel_scope.cancel()
        # Whichever side ended, the other goes too (its channels with it).
        if not self.gate.closed.is_set() and self.gate.conn is not None:
            self.gate.conn.close()
        self.target.close()
        # asyncssh tells each channel's session of the close in later loop callbacks: let them run
        # (their ssh.channel.end events belong before the session's end).
        if self.open_channels:
            with trio.move_on_after(CHANNEL_CLOSE_GRACE):
                await self.channels_done.wait()

    def _traffic(self) -> int:
        return self.from_client.bytes_in + self.to_client.bytes_out

    async def _watch_idle(self, limit: float) -> None:
        """End the session after ``limit`` seconds without channel data either way.

        Polls the byte counters the callbacks keep anyway (nothing added per chunk); the
        granularity is a tenth of the limit.
        """
        seen, since = self._traffic(), trio.current_time()
        while True:
            await trio.sleep(min(max(limit / 10, 0.1), 5.0))
            now, total = trio.current_time(), self._traffic()
            if total != seen:
                seen, since = total, now
            elif now - since >= limit:
                break
        message = f"idle timeout: no traffic for {limit:g}s, the proxy closed the session"
        log.info("session %s: %s", self.session.id, message)
        self.end_reason = message
        # asyncssh closes the channels before it sends the disconnect, and OpenSSH exits on the
        # channel's close without printing the disconnect: say it on each channel's stderr first.
        for pair in list(self.open_channels):
            if not pair.closed and pair.chan is not None:
                pair.chan.write_stderr(f"\r\ndbproxy: {message}\r\n".encode())
        self.gate.refuse(message, DISC_BY_APPLICATION)
        self.ended.set()

    def channel_closed(self, pair: "ChannelRelay") -> None:
        self.open_channels.discard(pair)
        if not self.open_channels:
            self.channels_done.set()

    def statistics(self) -> tuple[Counters, Counters]:
        return self.from_client, self.to_client

    def emit(self, kind: str, **fields: Any) -> None:
        if self.session.audit is not None:
            self.session.audit.emit(kind, **fields)


class ChannelRelay(asyncssh.SSHServerSession):
    """One client session channel, relayed to a session channel on the target."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        relay.channels += 1
        self.number = relay.channels
        self.chan: Any = None
        self.target_chan: Any = None
        self.kind: str | None = None
        self.command: str | None = None
        self.subsystem: str | None = None
        self.term: tuple | None = None
        self.pending_size: tuple | None = None
        self.exit_status: int | None = None
        self.exit_signal: str | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.closed = False
        # Data asyncssh delivered before the target's channel was open (at most one window's worth:
        # the client cannot send more than the window RFC 4254 §5.2 grants it).
        self.early: list[bytes] = []
        self.early_eof = False
        self.denied: str | None = None  # why the policy refused this channel's exec
        self.sftp: SftpAudit | None = None
        # pty channels: recorded, commands observed, audited and policed (dbproxy.terminal.audit)
        self.terminal: TerminalAudit | None = None
        self._echo_timer: Any = None

    # -- requests from the client ----------------------------------------------------------
    def connection_made(self, chan: Any) -> None:
        self.chan = chan
        self.relay.open_channels.add(self)
        # Nothing is read from the client until the target's channel is open (its data waits in
        # SSH's own flow control, RFC 4254 §5.2, not in a buffer of ours).
        chan.pause_reading()

    def pty_requested(self, term_type: str, term_size: tuple, term_modes: dict) -> bool:
        self.term = (term_type, term_size, term_modes)
        return True

    def shell_requested(self) -> bool:
        self.kind = "shell"
        if getattr(self.relay.grant, "deny_commands", ()) and self.term is None:
            # Lines are policed on the terminal (echo, Enter); a shell without a pty reads a script from
            # stdin, which nothing checks: a role with deny patterns gets no such shell.
            self.denied = ("interactive shells are not available without a terminal to roles with deny_commands "
                           "(use ssh -t)")
            self.relay.emit("ssh.shell", channel=self.number, pty=self.term is not None,
                            term=self.term[0] if self.term else None, success=False, reason="shell_not_policed")
            audit_denial(self.relay.session, AccessDenied(self.denied, reason="shell_not_policed"), stage="shell")
            return True
        self.relay.emit("ssh.shell", channel=self.number, pty=self.term is not None,
                        term=self.term[0] if self.term else None)
        return True

    def exec_requested(self, command: str) -> bool:
        self.kind, self.command = "exec", command
        self.relay.execs += 1
        refused = denied_exec(self.relay.grant, command)
        if refused is not None:
            # Refused before the target sees it; the client is told why on stderr (session_started).
            piece, pattern = refused
            self.denied = f"command refused by policy: {piece!r} matches the deny pattern {pattern!r}"
            self.relay.emit("ssh.exec", channel=self.number, command=command, pty=self.term is not None,
                            success=False, denied_command=piece, denied_pattern=pattern)
            audit_denial(self.relay.session, AccessDenied(self.denied, reason="command_denied"), stage="exec",
                         command=command, pattern=pattern)
            return True
        # Audited before the target is asked to run it (the request goes out in session_started).
        self.relay.emit("ssh.exec", channel=self.number, command=command, pty=self.term is not None)
        return True

    def subsystem_requested(self, subsystem: str) -> bool:
        allowed = subsystem == "sftp"
        self.kind, self.subsystem = "subsystem", subsystem
        self.relay.emit("ssh.subsystem", channel=self.number, subsystem=subsystem, success=allowed,
                        **({} if allowed else {"reason": "only the sftp subsystem is relayed"}))
        if allowed:
            self.sftp = SftpAudit(self.relay.emit, self.number)
        return allowed

    def session_started(self) -> None:
        if self.denied is not None:
            self.chan.write_stderr(f"dbproxy: {self.denied}\r\n".encode())
            self.chan.exit(EXIT_REFUSED)
            return
        if self.term is not None:
            # Every pty channel (a shell, or an exec such as ``ssh -t host bash``) is recorded (when the
            # listener says where) and line-observed.
            term_type, (width, height, _, _), _ = self.term
            path = (os.path.join(self.relay.recording_dir, f"{self.relay.session.id}-{self.number}.cast")
                    if self.relay.recording_dir is not None else None)
            try:
                self.terminal = TerminalAudit(self.relay.session, self.relay.emit, "ssh", width=width, height=height,
                                              term=term_type, grant=self.relay.grant, split=simple_commands,
                                              recording_path=path, recording_input=self.relay.recording_input,
                                              fields={"channel": self.number})
            except OSError as exc:
                # Nothing unrecorded reaches a target: without its recording the channel does not start.
                log.error("session %s: cannot write the recording %s: %s", self.relay.session.id, path, exc)
                self.relay.emit("ssh.channel.error", channel=self.number, channel_type=self.kind,
                                error=f"recording unavailable: {exc.strerror or exc}")
                self.chan.write_stderr(b"dbproxy: the session cannot be recorded; refusing it\r\n")
                self.chan.exit(255)
                return
        asyncio.ensure_future(self._open_target())

    async def _open_target(self) -> None:
        kwargs: dict = {"encoding": None, "window": CHANNEL_WINDOW, "max_pktsize": CHANNEL_PACKET}
        if self.term is not None:
            term_type, term_size, term_modes = self.term
            kwargs.update(term_type=term_type, term_size=term_size, term_modes=term_modes)
        else:
            kwargs["request_pty"] = False
        env = self._allowed_environment()
        if env:
            kwargs["env"] = env
        if self.kind == "exec":
            kwargs["command"] = self.command
        elif self.kind == "subsystem":
            kwargs["subsystem"] = self.subsystem
        try:
            chan, _ = await self.relay.target.conn.create_session(lambda: TargetSide(self), **kwargs)
        except (asyncssh.Error, OSError) as exc:
            msg = getattr(exc, "reason", None) or str(exc)
            log.info("session %s: channel %d: the target refused the %s: %s", self.relay.session.id, self.number,
                     self.kind, msg)
            self.relay.emit("ssh.channel.error", channel=self.number, channel_type=self.kind, error=msg)
            if not self.closed:
                self.chan.write_stderr(f"dbproxy: the target refused the {self.kind}: {msg}\r\n".encode())
                self.chan.exit(255)
            return
        if self.closed:
            chan.close()
            return
        self.target_chan = chan
        if self.pending_size is not None:
            chan.change_terminal_size(*self.pending_size)
        for data in self.early:
            chan.write(data)
        self.early.clear()
        if self.early_eof:
            chan.write_eof()
        self.chan.resume_reading()

    def _observe(self, feed: Any, data: bytes, side: str) -> bool:
        """Let the SFTP audit read ``data``; False (and the channel closed, unforwarded) when it cannot."""
        try:
            feed(data)
        except ProtocolError as exc:
            log.info("session %s: channel %d: unreadable SFTP from the %s: %s", self.relay.session.id, self.number,
                     side, exc)
            self.relay.emit("audit.malformed", channel=self.number, subsystem="sftp", side=side, error=str(exc))
            self.sftp = None
            self.chan.close()
            if self.target_chan is not None:
                self.target_chan.close()
            return False
        return True

    def _allowed_environment(self) -> dict:
        """The client's environment requests the listener's ``env_allow`` globs pass (audited by name only:
        values may be secrets)."""
        sent = self.chan.get_environment_bytes()
        if not sent:
            return {}
        allowed = {k: v for k, v in sent.items()
                   if any(fnmatch.fnmatchcase(k.decode("utf-8", "replace"), g) for g in self.relay.env_allow)}
        self.relay.emit("ssh.env", channel=self.number,
                        forwarded=sorted(k.decode("utf-8", "replace") for k in allowed),
                        dropped=sorted(k.decode("utf-8", "replace") for k in sent if k not in allowed))
        return allowed

    def data_received(self, data: bytes, datatype: Any) -> None:
        self.bytes_in += len(data)
        self.relay.from_client.bytes_in += len(data)
        if self.sftp is not None and not self._observe(self.sftp.from_client, data, "client"):
            return
        if self.terminal is not None:
            self._apply(self.terminal.input(data))
            return
        self._to_target(data)

    def _to_target(self, data: bytes) -> None:
        if self.target_chan is None:
            self.early.append(data)
        else:
            self.target_chan.write(data)

    # -- the terminal (dbproxy.terminal.audit): commands audited and policed on Enter ----------------------
    def _apply(self, step: Step) -> None:
        """Do what the terminal decided (its lines are audited already): forward, tell the client, and keep
        a timer while an Enter waits for its echo."""
        if step.forward:
            self._to_target(bytes(step.forward))
        if step.to_client and not self.closed:
            self.chan.write(bytes(step.to_client))
        waiting = self.terminal is not None and self.terminal.waiting
        if waiting and self._echo_timer is None:
            self._echo_timer = asyncio.get_event_loop().call_later(self.terminal.echo_wait,  # type: ignore[union-attr]
                                                                   self._echo_timeout)
        elif self._echo_timer is not None and not waiting:
            self._echo_timer.cancel()
            self._echo_timer = None

    def _echo_timeout(self) -> None:
        self._echo_timer = None
        if self.terminal is not None and self.terminal.waiting and not self.closed:
            self._apply(self.terminal.resume(timed_out=True))

    def eof_received(self) -> bool:
        if self.target_chan is not None:
            self.target_chan.write_eof()
        else:
            self.early_eof = True
        return True  # half-close: the target's output and exit status still come back

    def terminal_size_changed(self, width: int, height: int, pixwidth: int, pixheight: int) -> None:
        if self.terminal is not None:
            self.terminal.resize(width, height)
        if self.target_chan is None:
            self.pending_size = (width, height, pixwidth, pixheight)
        else:
            self.target_chan.change_terminal_size(width, height, pixwidth, pixheight)

    def signal_received(self, signal: str) -> None:
        if self.target_chan is not None:
            self.target_chan.send_signal(signal)

    def break_received(self, msec: int) -> bool:
        if self.target_chan is not None:
            self.target_chan.send_break(msec)
        return True

    # flow control: the client cannot take more → stop reading the target, and back
    def pause_writing(self) -> None:
        if self.target_chan is not None:
            self.target_chan.pause_reading()

    def resume_writing(self) -> None:
        if self.target_chan is not None:
            self.target_chan.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        if self.target_chan is not None:
            self.target_chan.close()
        fields: dict = {"channel": self.number, "channel_type": self.kind, "bytes_from_client": self.bytes_in,
                        "bytes_to_client": self.bytes_out}
        if self.command is not None:
            fields["command"] = self.command
        if self.subsystem is not None:
            fields["subsystem"] = self.subsystem
        if self.exit_status is not None:
            fields["exit_status"] = self.exit_status
        if self.exit_signal is not None:
            fields["exit_signal"] = self.exit_signal
        if self.sftp is not None:
            self.sftp.close()
        if self.terminal is not None:
            if self._echo_timer is not None:
                self._echo_timer.cancel()
                self._echo_timer = None
            recorded, recordings = self.terminal.close()
            self.terminal = None
            fields.update(recorded)
            self.relay.recordings += recordings
        self.relay.emit("ssh.channel.end", **fields)
        self.relay.channel_closed(self)

    # -- from the target -------------------------------------------------------------------
    def target_data(self, data: bytes, datatype: Any) -> None:
        self.bytes_out += len(data)
        self.relay.to_client.bytes_out += len(data)
        if self.sftp is not None and not self._observe(self.sftp.from_server, data, "target"):
            return
        if not self.closed:
            self.chan.write(data, datatype)
        if self.terminal is not None:
            step = self.terminal.output(data)  # recorded, observed; an Enter waiting for this echo goes on
            if step is not None:
                self._apply(step)

    def target_eof(self) -> None:
        if not self.closed:
            self.chan.write_eof()

    def target_closed(self) -> None:
        if self.closed:
            return
        if self.exit_signal is not None:
            self.chan.exit_with_signal(self.exit_signal, self._core_dumped, self._signal_msg or "", self._signal_lang or "")
        elif self.exit_status is not None:
            self.chan.exit(self.exit_status)
        else:
            self.chan.close()

    _core_dumped = False
    _signal_msg: str | None = None
    _signal_lang: str | None = None


class TargetSide(asyncssh.SSHClientSession):
    """The target's end of one relayed session channel."""

    def __init__(self, pair: ChannelRelay) -> None:
        self.pair = pair

    def data_received(self, data: bytes, datatype: Any) -> None:
        self.pair.target_data(data, datatype)

    def eof_received(self) -> bool:
        self.pair.target_eof()
        return True

    def exit_status_received(self, status: int) -> None:
        self.pair.exit_status = status

    def exit_signal_received(self, signal: str, core_dumped: bool, msg: str, lang: str) -> None:
        self.pair.exit_signal = signal
        self.pair._core_dumped, self.pair._signal_msg, self.pair._signal_lang = core_dumped, msg, lang

    def pause_writing(self) -> None:
        if self.pair.chan is not None:
            self.pair.chan.pause_reading()

    def resume_writing(self) -> None:
        if self.pair.chan is not None:
            self.pair.chan.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.pair.target_closed()


# -------------------------------------------------------------------------- the target


class _TargetClient(asyncssh.SSHClient):
    def __init__(self, holder: "TargetConnection") -> None:
        self.holder = holder

    def connection_made(self, conn: Any) -> None:
        coalesce_writes(conn)
        drop_ignores(conn)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.holder.relay is not None:
            self.holder.relay.target_gone(exc)


class TargetError(Exception):
    """Logging in to the target failed; ``kind``: connect / host_key / auth."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


class TargetConnection:
    """The proxy's own SSH connection to the target, with the route's credential."""

    def __init__(self) -> None:
        self.conn: Any = None
        self.relay: Relay | None = None

    async def open(self, host: str, port: int, login: str, *, known_hosts: str, key_file: str | None,
                   password: str | None, certificate: tuple | None = None, via: str | None = None,
                   nursery: trio.Nursery | None = None) -> None:
        """``via``: dial through an agent (dbproxy.net); asyncssh then runs over one end of a socket
        pair whose other end a task in ``nursery`` (the session's) splices to the agent's stream."""
        keys = [key_file] if key_file else [certificate] if certificate else None
        sock = await _dial_via(host, port, via, nursery) if via is not None else None
        options: dict = dict(
            username=login,
            known_hosts=known_hosts,
            # Only the route's credential: no agent, no ~/.ssh keys or config of the proxy's user.
            agent_path=None, client_keys=keys, password=password,
            config=None, ignore_encrypted=True, preferred_auth="publickey" if keys else "password,keyboard-interactive",
            client_factory=lambda: _TargetClient(self), encryption_algs=TARGET_CIPHERS,
        )
        if sock is not None:
            options["sock"] = sock  # host and port still name the target for known_hosts
        try:
            self.conn = await trio_asyncio.aio_as_trio(asyncssh.connect)(host, port, **options)
        except asyncssh.HostKeyNotVerifiable as exc:
            raise TargetError(f"host key of {host}:{port} not verified against the route's known_hosts: {exc.reason}",
                              "host_key") from None
        except asyncssh.PermissionDenied as exc:
            raise TargetError(f"the target refused the proxy's credential for {login!r}: {exc.reason}", "auth") from None
        except asyncssh.DisconnectError as exc:
            raise TargetError(f"the target disconnected during login: {exc.reason}", "connect") from None
        except OSError as exc:
            raise TargetError(f"cannot connect to {host}:{port}: {exc.strerror or exc}", "connect") from None

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()

    async def aclose(self) -> None:
        if self.conn is not None:
            self.conn.close()
            with trio.move_on_after(2):
                await trio_asyncio.aio_as_trio(self.conn.wait_closed)()


async def _dial_via(host: str, port: int, via: str, nursery: trio.Nursery | None) -> socket.socket:
    from dbproxy.agent.client import splice
    from dbproxy.net import connect_backend

    if nursery is None:
        raise TargetError(f"{host}:{port} is reached via {via}, which this command path does not support", "connect")
    stream = await connect_backend(host, port, via=via)  # UpstreamError: the agent's own hint
    ours, theirs = socket.socketpair()
    local = trio.SocketStream(trio.socket.from_stdlib_socket(ours))

    async def bridge() -> None:
        try:
            await splice(stream, local)
        finally:
            await trio.aclose_forcefully(stream)
            await trio.aclose_forcefully(local)

    nursery.start_soon(bridge)
    return theirs


def session_certificate(ca_key: Any, session: Any, validity: int) -> tuple:
    """A fresh key pair and an OpenSSH user certificate (PROTOCOL.certkeys) for one session's login.

    Principal: the login (the target's sshd checks it against the user name); key id: the proxy,
    the identity and the session id, so the target's own log names who came through the proxy;
    valid from a minute ago (clock skew) for ``validity`` seconds; no agent or X11 forwarding.
    """
    import time

    key = asyncssh.generate_private_key("ssh-ed25519")
    now = int(time.time())
    cert = ca_key.generate_user_certificate(
        key, f"dbproxy:{session.identity.user}:{session.id}", principals=[session.login],
        valid_after=now - 60, valid_before=now + validity,
        permit_agent_forwarding=False, permit_x11_forwarding=False, permit_user_rc=False)
    return key, cert


# -------------------------------------------------------------------------- the client


async def serve_client(stream: Any, gate: ClientGate, host_key: Any, *, login_timeout: float,
                       keepalive_interval: float = 0, keepalive_count_max: int = 3) -> None:
    """Run asyncssh's server side on the accepted client ``stream`` until the connection ends.

    A duplicate of the socket's descriptor goes to asyncio's transport; the core still owns
    (and closes) the stream.  Returns when the SSH connection is closed.
    """
    sock = socket.socket(fileno=os.dup(stream.socket.fileno()))
    try:
        conn = await trio_asyncio.aio_as_trio(asyncssh.run_server)(
            sock,
            server_factory=lambda: gate,
            server_host_keys=[host_key],
            # Forwarding is refused (and audited) by the gate; these keep asyncssh from offering it.
            agent_forwarding=False, x11_forwarding=False, allow_pty=True,
            login_timeout=login_timeout, keepalive_interval=keepalive_interval,
            keepalive_count_max=keepalive_count_max, encryption_algs=CLIENT_CIPHERS,
            server_version="dbproxy",
        )
    except (asyncssh.Error, OSError, asyncio.TimeoutError) as exc:
        sock.close()  # our duplicate descriptor (a no-op once asyncio's transport closed it)
        log.info("ssh connection from %s ended before the session: %s", gate.session.client_addr, exc)
        gate.closed.set()
        gate.attempted.set()
        return
    await trio_asyncio.aio_as_trio(conn.wait_closed)()
