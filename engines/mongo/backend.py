"""The proxy's own login to a Mongo-wire backend.

Strategy: connect (TLS from the first byte when the route's ``tls.mode`` is
not ``disable``, as mongod's TLS ports expect), send one handshake —
``OP_MSG {hello: 1, $db: "admin"}``, or ``OP_QUERY isMaster`` with backend
option ``handshake: "isMaster"`` for old servers — then authenticate with the
route's credential, strictly by the route's ``auth.method``:

    scram-sha-256 / scram-sha-1   saslStart + saslContinue (auth.md); the
                                  server's signature is verified, so a backend
                                  that does not know the password is refused
    plain                         one saslStart with PLAIN
    none                          no login

The auth database is backend option ``auth_source``, else the route's
``database``, else ``admin``.  The handshake carries the *client's* metadata
(``client`` of its first hello, driver name suffixed ``|dbproxy`` as driver
wrappers do): mongod accepts client metadata only in the first hello of a
connection (ClientMetadataCannotBeMutated), so the client's own hello is
later forwarded without it.  The handshake never offers compression: the
backend link stays uncompressed and every backend reply can be forwarded to
any client as received.

PBKDF2 (10–15k rounds) runs in a worker thread, off the event loop.  Every
failure is an ``UpstreamError`` whose message has the detail (for the log and
audit) and whose ``client_hint`` is safe for the client; no password is ever
part of either.
"""

from __future__ import annotations

import logging
from typing import Any

import attrs
import trio

from dbproxy.channel import MessageStream, login_errors
from dbproxy.config import RouteConfig
from dbproxy.errors import UpstreamError
from dbproxy.net import connect_backend
from dbproxy.tls import wrap_backend

from . import protocol as wire
from . import scram
from .codec import MongoDecoder

log = logging.getLogger("dbproxy.mongo")

HANDSHAKES = ("hello", "isMaster")
MECHANISM_FOR_METHOD = {
    "scram-sha-256": scram.SCRAM_SHA_256,
    "scram-sha-1": scram.SCRAM_SHA_1,
    "plain": "PLAIN",
    "none": "none",
}
PROXY_DRIVER = "dbproxy"


@attrs.define(eq=False)
class BackendLink:
    channel: MessageStream
    hello: dict = attrs.field(repr=False)  # the backend's answer to the proxy's handshake
    tls: bool
    mechanism: str
    auth_source: str | None

    @property
    def max_message_size(self) -> int:
        size = self.hello.get("maxMessageSizeBytes")
        return int(size) if isinstance(size, int) and size > 0 else wire.DEFAULT_MAX_MESSAGE_SIZE


def auth_source(route: RouteConfig) -> str:
    b = route.backend
    return b.options.get("auth_source") or b.database or "admin"


def handshake_metadata(client_metadata: Any) -> dict | None:
    """The client's ``client`` document, with the proxy appended to the driver name."""
    if not isinstance(client_metadata, dict):
        return None
    meta = dict(client_metadata)
    driver = dict(meta.get("driver") or {}) if isinstance(meta.get("driver"), dict) else {}
    name = driver.get("name") if isinstance(driver.get("name"), str) else "unknown"
    driver["name"] = f"{name}|{PROXY_DRIVER}"
    driver.setdefault("version", "")
    meta["driver"] = driver
    return meta


async def open_backend(
    route: RouteConfig, *, client_metadata: dict | None = None, max_message_size: int = wire.DEFAULT_MAX_MESSAGE_SIZE
) -> BackendLink:
    b = route.backend
    stream: Any = await connect_backend(b.host, b.port, via=b.via)
    try:
        tls = b.tls.mode != "disable"
        if tls:
            stream = await wrap_backend(stream, b.tls, b.host)
        channel = MessageStream(stream, MongoDecoder(max_message_size=max_message_size))
        return await _login(channel, route, client_metadata, tls)
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise


async def _login(channel: MessageStream, route: RouteConfig, client_metadata: dict | None, tls: bool) -> BackendLink:
    b = route.backend
    with login_errors(b.address):
        hello = await _handshake(channel, route, client_metadata)
        method = b.auth.method
        source = auth_source(route) if method != "none" else None
        mechanism = MECHANISM_FOR_METHOD[method]
        if method in ("scram-sha-256", "scram-sha-1"):
            await _scram(channel, route, mechanism, source)
        elif method == "plain":
            await _plain(channel, route, source)
        return BackendLink(channel, hello, tls, mechanism, source)


async def command(channel: MessageStream, doc: dict, *, op_query: bool = False) -> dict:
    """Send one command and return its reply document (fully decoded; login replies are small)."""
    if op_query:
        db = doc.pop("$db", "admin")
        data = wire.encode_op_query(f"{db}.$cmd", doc)
    else:
        data = wire.encode_op_msg(doc)
    request_id = wire.HEADER.unpack_from(data)[1]
    await channel.send(data)
    msg = await channel.receive()
    if msg.response_to != request_id:
        raise wire.RemoteProtocolError(
            f"reply answers request {msg.response_to}, expected {request_id}", client_hint="unexpected reply"
        )
    msg = wire.decompress(msg)
    if msg.op_code == wire.OP_MSG:
        return wire.decode_document(wire.parse_op_msg(msg).body_raw)
    if msg.op_code == wire.OP_REPLY:
        docs = wire.parse_op_reply(msg).documents
        if not docs:
            raise wire.RemoteProtocolError("OP_REPLY without a document", client_hint="unexpected reply")
        return wire.decode_document(docs[0])
    raise wire.RemoteProtocolError(f"reply with opcode {msg.op_code}", client_hint="unexpected reply")


async def _handshake(channel: MessageStream, route: RouteConfig, client_metadata: dict | None) -> dict:
    b = route.backend
    style = b.options.get("handshake", "hello")
    if style == "isMaster":
        doc: dict[str, Any] = {"isMaster": 1, "helloOk": True, "$db": "admin"}
    else:
        doc = {"hello": 1, "$db": "admin"}
    meta = handshake_metadata(client_metadata)
    if meta is not None:
        doc["client"] = meta
    reply = await command(channel, doc, op_query=style == "isMaster")
    if not reply.get("ok"):
        raise UpstreamError(
            f"backend {b.address} refused the handshake: {reply.get('errmsg', '')} (code {reply.get('code')})",
            kind="protocol",
            client_hint="the backend database refused the proxy's handshake",
        )
    return reply


def _auth_failed(route: RouteConfig, exc: UpstreamError) -> UpstreamError:
    return UpstreamError(
        f"backend {route.backend.address} refused the proxy's login as {route.backend.user!r}"
        f" ({route.backend.auth.method}): {exc}",
        kind="auth",
        client_hint="authentication failed",
    )


async def _scram(channel: MessageStream, route: RouteConfig, mechanism: str, source: str | None) -> None:
    b = route.backend
    client = scram.ScramClient(mechanism, b.user or "", b.auth.secret.reveal())  # type: ignore[union-attr]
    try:
        r = scram.parse_sasl_reply(await command(channel, scram.sasl_start(mechanism, client.client_first(), db=source)))
        final = await trio.to_thread.run_sync(client.client_final, r.payload)
        r = scram.parse_sasl_reply(await command(channel, scram.sasl_continue(r.conversation_id, final, db=source)))
        client.verify_server_final(r.payload)
        for _ in range(3):  # servers that ignore skipEmptyExchange want one empty step
            if r.done:
                return
            r = scram.parse_sasl_reply(await command(channel, scram.sasl_continue(r.conversation_id, b"", db=source)))
    except UpstreamError as exc:
        raise _auth_failed(route, exc) from None
    raise UpstreamError(
        f"backend {b.address} did not finish SCRAM", kind="auth", client_hint="authentication failed"
    )


async def _plain(channel: MessageStream, route: RouteConfig, source: str | None) -> None:
    b = route.backend
    payload = b"\x00" + (b.user or "").encode("utf-8") + b"\x00" + b.auth.secret.reveal().encode("utf-8")  # type: ignore[union-attr]
    try:
        r = scram.parse_sasl_reply(await command(channel, scram.sasl_start("PLAIN", payload, db=source)))
        if not r.done:
            r = scram.parse_sasl_reply(await command(channel, scram.sasl_continue(r.conversation_id, b"", db=source)))
    except UpstreamError as exc:
        raise _auth_failed(route, exc) from None
    if not r.done:
        raise UpstreamError(f"backend {b.address} did not finish PLAIN", kind="auth", client_hint="authentication failed")
