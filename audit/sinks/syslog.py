"""Syslog sink: RFC 5424 messages over TCP (RFC 6587 octet counting), TLS (RFC 5425) or UDP (RFC 5426).

Formatting (``Rfc5424Formatter``, pure, unit-tested):

    <PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID [SD-ID k="v" ...] MSG

PRI = facility * 8 + severity (§6.2.1; severity 6 info, 4 warning for
failures and ``…W`` codes); TIMESTAMP is the event's own ``time`` (RFC 3339
with microseconds, §6.2.3); MSGID the event code (``TDB02I``).  Two bodies:

* ``json`` (default): SD holds ``seq``, ``uid``, ``event``, ``sid``,
  ``user`` for indexing, MSG is the event's exact JSON — the receiver can
  recompute the hash chain.
* ``structured``: every scalar field is an SD-PARAM (nested values as JSON
  text), MSG a one-line human summary.

PARAM-VALUE escapes ``"``, ``\\`` and ``]`` (§6.3.3); SD-NAMEs are cut to
their 32 printable-ASCII characters.  The header fields are cut to their
maximum lengths (§6: HOSTNAME 255, APP-NAME 48, PROCID 128, MSGID 32).

Delivery over TCP/TLS gets a receipt from a protocol that has none.  Plain
syslog has no acknowledgement, and a receiver that is shutting down keeps
its connections open without reading for a while before it closes them
(rsyslog: ~0.2 s), so "sent", "acknowledged by the peer's kernel" and
"still connected" all prove nothing.  What does: TCP half-close.  Each batch
goes over its own connection; right behind the batch the sink sends its FIN
(over TLS: close_notify in the same write, then FIN) and waits for the
receiver to close in turn.  A receiver sees our FIN only after it has read
every byte before it, so a clean close back (EOF, every byte acknowledged, no reset) proves the batch
was read; a reset, or no close within ``confirm_timeout``, means it may not
have been, and the batch is sent again.  Checked against rsyslog stopped
with SIGTERM mid-stream: every event arrives exactly once.  The price is a
connect (and TLS handshake) per batch, amortised by batching.

The price of that receipt is a connect (and TLS handshake) per batch.  With
``confirm: "none"`` the sink instead keeps one connection open and streams
batch after batch over it, committing a batch once the kernel has taken it:
far cheaper, but RFC 6587 has no acknowledgement, so events written just
before the receiver goes away (or while it is going away) can be lost
without any sign.  That mode suits a local relay that is itself reliable;
for acknowledged delivery at the proxy's peak rate use the ``relp`` sink
(``audit/sinks/relp.py``), which pipelines over one connection and is told
which messages arrived.  A connection the receiver closed is noticed before
the next batch (a zero-byte peek) and replaced.

UDP has no such check: a datagram sent just before the receiver went away is
lost without a trace — use it only where that is acceptable.
"""

from __future__ import annotations

import fcntl
import functools
import os
import socket
import ssl
import struct
import sys
import termios
from typing import Any

import attrs
import orjson
import trio

from .spooled import DeliveryFailed, SpooledSink, reason

FACILITIES = {
    "kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5, "lpr": 6, "news": 7,
    "uucp": 8, "cron": 9, "authpriv": 10, "ftp": 11, "ntp": 12, "security": 13, "console": 14,
    "solaris-cron": 15, "local0": 16, "local1": 17, "local2": 18, "local3": 19, "local4": 20,
    "local5": 21, "local6": 22, "local7": 23,
}
SEVERITY_INFO = 6
SEVERITY_WARNING = 4
NILVALUE = "-"
# 32473 is the Private Enterprise Number reserved for documentation (RFC 5612);
# a deployment with its own PEN sets "sd_id".
DEFAULT_SD_ID = "dbproxy@32473"
INDEX_FIELDS = ("seq", "uid", "event", "sid", "user")
UTF8_BOM = b"\xef\xbb\xbf"
UDP_MAX = 65507
CONFIRM_MODES = ("close", "none")


# Memoised: the header fields and SD-NAMEs are a handful of distinct strings (host, app, event
# codes, field names), and cleaning them char by char per event cost more than the rest of format().
@functools.lru_cache(maxsize=4096)
def _printusascii(text: str, limit: int) -> str:
    """RFC 5424 §6 header fields: PRINTUSASCII (33-126) only, at most *limit* characters."""
    out = "".join(c if 33 <= ord(c) <= 126 else "_" for c in text)[:limit]
    return out or NILVALUE


@functools.lru_cache(maxsize=4096)
def sd_name(text: str) -> str:
    """SD-NAME (§6.3.3): 1-32 PRINTUSASCII except '=', SP, ']' and '"'."""
    out = "".join(c if 33 <= ord(c) <= 126 and c not in '="]' else "_" for c in text)[:32]
    return out or "_"


def sd_escape(value: str) -> str:
    if "\\" not in value and '"' not in value and "]" not in value:
        return value
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def _sd_value(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return str(value)
    return orjson.dumps(value).decode()


def severity_of(event: dict) -> int:
    code = event.get("code") or ""
    if code.endswith(("W", "E")) or event.get("success") is False:
        return SEVERITY_WARNING
    return SEVERITY_INFO


@attrs.frozen
class Rfc5424Formatter:
    facility: int = FACILITIES["authpriv"]
    app_name: str = "dbproxy"
    hostname: str = attrs.field(factory=socket.gethostname)
    # The proxy's pid, also when the audit worker process sends (it exports DBPROXY_PID).
    procid: str = attrs.field(factory=lambda: os.environ.get("DBPROXY_PID") or str(os.getpid()))
    body: str = "json"  # or "structured"
    sd_id: str = DEFAULT_SD_ID
    utf8_bom: bool = False

    def format(self, event: dict, raw: bytes | None = None) -> bytes:
        """``raw``: the event's stamped JSON line; the JSON body carries it as is, so a
        receiver can check its ``hash`` over the very bytes (``audit.recorder.line_hash``)."""
        pri = self.facility * 8 + severity_of(event)
        timestamp = event.get("time") or NILVALUE
        msgid = _printusascii(event.get("code") or event.get("event") or NILVALUE, 32)
        header = f"<{pri}>1 {timestamp} {_printusascii(self.hostname, 255)} {_printusascii(self.app_name, 48)} {_printusascii(self.procid, 128)} {msgid}"
        if self.body == "structured":
            fields = dict(event)
            msg = describe_short(event).encode()
        else:
            fields = {k: event[k] for k in INDEX_FIELDS if k in event}
            msg = raw if raw is not None else orjson.dumps(event)
        params = []
        for key, value in fields.items():
            text = _sd_value(value)
            if text is not None:
                params.append(f'{sd_name(key)}="{sd_escape(text)}"')
        sd = f"[{sd_name(self.sd_id)}{' ' if params else ''}{' '.join(params)}]"
        return f"{header} {sd} ".encode() + (UTF8_BOM if self.utf8_bom else b"") + msg


def describe_short(event: dict) -> str:
    from dbproxy.audit.tail import describe

    return describe(event, with_time=False)


def octet_frame(message: bytes) -> bytes:
    """RFC 6587 §3.4.1 octet counting: MSG-LEN SP SYSLOG-MSG."""
    return b"%d " % len(message) + message


def _outq(fd: int) -> int:
    """Bytes in our send queue not yet acknowledged by the peer (Linux SIOCOUTQ)."""
    return struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0\0\0\0"))[0]


class SyslogSink(SpooledSink):
    kind = "syslog"

    def __init__(
        self,
        *,
        host: str,
        port: int,
        transport: str = "tcp",
        formatter: Rfc5424Formatter | None = None,
        ssl_context: ssl.SSLContext | None = None,
        server_name: str | None = None,
        confirm_timeout: float = 30.0,
        connect_timeout: float = 10.0,
        confirm: str = "close",
        **spool_kw: Any,
    ) -> None:
        if confirm not in CONFIRM_MODES:
            raise ValueError(f"confirm must be one of {CONFIRM_MODES}")
        spool_kw.setdefault("batch_max_bytes", 256 * 1024)
        spool_kw.setdefault("batch_linger_seconds", 0.02)
        super().__init__(**spool_kw)
        self.host = host
        self.port = port
        self.transport = transport
        self.formatter = formatter or Rfc5424Formatter()
        self.ssl_context = ssl_context
        self.server_name = server_name or host
        self.confirm_timeout = confirm_timeout
        self.connect_timeout = connect_timeout
        self.confirm_mode = confirm
        # Streaming: through the pipelined sender, so spool reads overlap the sends and the
        # cursor commits (fsyncs) are coalesced; "delivered" is "in the kernel's send buffer".
        self.pipelined = confirm == "none" and transport != "udp"
        self.max_in_flight = 16
        self._stream: Any = None
        self._raw: socket.socket | None = None
        self._tls: tuple[ssl.SSLObject, ssl.MemoryBIO] | None = None
        self._udp: Any = None

    def encode(self, event: dict, line: bytes | None = None) -> bytes:
        return self.formatter.format(event, line.rstrip(b"\n") if line is not None else None)

    # -- connections ---------------------------------------------------------------
    async def _connect(self) -> None:
        try:
            with trio.fail_after(self.connect_timeout):
                stream = await trio.open_tcp_stream(self.host, self.port)
                self._stream = stream
                # Our own descriptor of the socket, for the half-close and the wait in _confirm.
                self._raw = socket.socket(fileno=os.dup(stream.socket.fileno()))
                self._raw.setblocking(False)
                if self.transport == "tls":
                    await self._tls_handshake(stream)
        except trio.TooSlowError:
            raise DeliveryFailed(f"connect to {self.host}:{self.port} timed out") from None
        except (ssl.SSLError, ssl.CertificateError) as exc:
            raise DeliveryFailed(f"TLS handshake with {self.host}:{self.port} failed: {exc}") from None
        except (OSError, trio.BrokenResourceError) as exc:
            raise DeliveryFailed(f"connect to {self.host}:{self.port}: {reason(exc)}") from None

    async def _tls_handshake(self, stream: Any) -> None:
        # TLS sans-IO (ssl.SSLObject over memory BIOs) rather than trio.SSLStream, so that a batch
        # and its close_notify leave in one write: the receiver then reads both in one go.
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = self.ssl_context.wrap_bio(incoming, outgoing, server_hostname=self.server_name)
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if outgoing.pending:
                    await stream.send_all(outgoing.read())
                data = await stream.receive_some(65536)
                if not data:
                    raise DeliveryFailed(f"{self.host}:{self.port} closed the connection during the TLS handshake")
                incoming.write(data)
        if outgoing.pending:
            await stream.send_all(outgoing.read())
        self._tls = (tls, outgoing)

    async def disconnect(self) -> None:
        stream, self._stream = self._stream, None
        self._tls = None
        if stream is not None:
            await trio.aclose_forcefully(stream)
        if self._raw is not None:
            self._raw.close()
            self._raw = None
        if self._udp is not None:
            self._udp.close()
            self._udp = None

    # -- delivery --------------------------------------------------------------------
    async def deliver(self, payloads: list[bytes]) -> None:
        if self.transport == "udp":
            await self._deliver_udp(payloads)
            return
        if self.confirm_mode == "none":
            await self._deliver_streaming(payloads)
            return
        await self._connect()
        try:
            data = b"".join(octet_frame(p) for p in payloads)
            if self._tls is not None:
                tls, outgoing = self._tls
                tls.write(data)
                try:
                    tls.unwrap()  # close_notify, right behind the batch
                except ssl.SSLWantReadError:
                    pass
                data = outgoing.read()
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise DeliveryFailed(f"send to {self.host}:{self.port}: {reason(exc)}") from None
            await self._confirm()
        finally:
            await self.disconnect()

    def _peer_closed(self) -> bool:
        """Did the receiver close (or reset) our kept connection since the last batch?"""
        try:
            return self._raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True

    async def submit(self, payloads: list[bytes], nursery: Any) -> None:
        await self._deliver_streaming(payloads)

    async def confirm(self, ticket: Any) -> None:
        """Nothing to wait for: RFC 6587 has no acknowledgement (see the module doc)."""

    async def _deliver_streaming(self, payloads: list[bytes]) -> None:
        """``confirm: "none"``: the batch onto the kept connection; delivered once the kernel took it."""
        if self._stream is not None and self._peer_closed():
            await self.disconnect()
        if self._stream is None:
            await self._connect()
        data = b"".join(octet_frame(p) for p in payloads)
        if self._tls is not None:
            tls, outgoing = self._tls
            tls.write(data)
            data = outgoing.read()
        try:
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise DeliveryFailed(f"send to {self.host}:{self.port}: {reason(exc)}") from None

    async def _confirm(self) -> None:
        """Half-close and wait for the receiver to close after reading everything (see the module doc)."""
        raw = self._raw
        try:
            raw.shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise DeliveryFailed(f"the receiver dropped the connection: {exc.strerror or exc}") from None
        with trio.move_on_after(self.confirm_timeout):
            while True:
                await trio.lowlevel.wait_readable(raw)
                try:
                    data = raw.recv(65536)  # TLS: session tickets, the receiver's close_notify
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as exc:
                    raise DeliveryFailed(f"the receiver reset the connection ({exc.strerror or exc}); the batch may be unread") from None
                if not data:
                    break
            # EOF.  A receiver that closed before our bytes arrived answers them with a reset:
            # wait until they are all acknowledged, or the reset shows.
            if sys.platform.startswith("linux"):
                while _outq(raw.fileno()) > 0 and not raw.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    await trio.sleep(0.001)
            err = raw.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise DeliveryFailed(f"the receiver reset the connection ({os.strerror(err)}); the batch may be unread")
            return
        raise DeliveryFailed(f"the receiver did not confirm the batch within {self.confirm_timeout:.0f}s")

    async def _deliver_udp(self, payloads: list[bytes]) -> None:
        if self._udp is None:
            try:
                infos = await trio.socket.getaddrinfo(self.host, self.port, type=socket.SOCK_DGRAM)
                family, stype, proto, _, addr = infos[0]
                sock = trio.socket.socket(family, stype, proto)
                await sock.connect(addr)
            except OSError as exc:
                raise DeliveryFailed(f"udp {self.host}:{self.port}: {exc}") from None
            self._udp = sock
        for i, payload in enumerate(payloads):
            try:
                # RFC 5426 §3.2: one message per datagram; a receiver may truncate a long one.
                await self._udp.send(payload[:UDP_MAX])
            except OSError as exc:
                # A connected UDP socket reports an earlier ICMP port-unreachable here.
                raise DeliveryFailed(f"udp {self.host}:{self.port}: {exc.strerror or exc}", delivered=i) from None
