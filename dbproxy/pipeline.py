"""The session pipeline: Netty's shape, trio's semantics.

A session that has finished its handshake is two *pumps*, one per direction
(client→backend, backend→client), running in one nursery: when either ends,
both end.  Each pump owns a sans-IO ``Decoder`` (the codec turns bytes into
messages), a list of named ``Stage`` objects, and an ``Encoder`` for bytes a
stage puts in place of what it received.

Contract of a stage (synchronous, no I/O):

    stage.handle(message, ctx) -> None | Verdict

``None`` (or ``FORWARD``) means "pass it on unchanged".  A ``Verdict`` may
replace the message with other message-layer bytes (``replace``), answer the
sender directly (``reply`` goes back toward the side the message came from),
and/or end the session after sending (``close``).

Hot path: a pump decodes every complete message of a received chunk.  When
every stage forwarded every message, it sends the exact received bytes
(``buffer.consumed_since_mark()``) in one ``send_all``; nothing is
re-encoded.  Only when a stage changed something does the pump build the
batch from each forwarded message's ``raw`` plus the replacements and pass it
through the encoder (identity for most codecs; CQL v5 wraps it in segments).

I/O: on a plain TCP socket a pump reads and writes the fd itself
(``Receiver``/``Sender``: ``os.read``/``os.write`` first, waiting for
readiness only when the kernel has nothing / takes nothing, and a checkpoint
at least every ``CHECKPOINT_EVERY`` reads), because trio's ``SocketStream``
goes through the scheduler twice per call even when data is waiting — per
query, that was a third of the proxy's CPU.  TLS and GSSENC streams use
``receive_some``/``send_all``.

Decoder contract (h11's shape):

    decoder.buffer          a ``ReceiveBuffer`` (the pump reads its spans)
    decoder.feed(data)
    decoder.next_message()  -> message | NEED_DATA   (raises ProtocolError)

A decoder must only advance ``buffer.position`` past whole transport units
that yield whole messages, so the consumed span always equals the wire bytes
of the messages it returned.  Every message has ``raw``: its bytes at the
message layer (what the encoder takes back).  In a tapped session both
decoders are ``dbproxy.tee.Tee`` objects and there is no stage
(``dbproxy.flow.assemble`` decides): a Tee consumes whole frames, taps those
the audit reads and returns no message, so every batch is forwarded as
received.

Memory: bytes left in a decoder's buffer after a batch (a partly received
message) are charged to the proxy's ``BufferBudget`` (``dbproxy.buffer``);
one that cannot fit ends the session (``BufferBudgetExceeded``), and while
one is held the next read runs under its deadline (``MessageTimeout``).  A
batch that ends on a message boundary pays one integer test for this.

Audit events raised by stages are handed to the recorder without waiting;
when the recorder's bounded channel is full the pump waits for room after its
send (backpressure, never loss) — see ``audit.recorder``.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Protocol

import attrs
import trio

from dbproxy.audit.events import MALFORMED

from .errors import MalformedMessage, MessageTimeout, ProtocolError, ProxyError
# The sans-IO contract lives in the trio-free kit; re-exported here for the pumps' users.
from .sansio import FORWARD, NEED_DATA, Decoder, Stage, Verdict, drop, identity_encoder, replace, reply  # noqa: F401

log = logging.getLogger("dbproxy.pipeline")

RECEIVE_SIZE = 256 * 1024

_wait_readable = trio.lowlevel.wait_readable
_wait_writable = trio.lowlevel.wait_writable
_checkpoint = trio.lowlevel.checkpoint




@attrs.frozen
class PumpStatistics:
    direction: str
    chunks: int
    messages: int
    bytes_in: int
    bytes_out: int
    rewritten_batches: int


@attrs.define(eq=False)
class PumpContext:
    """What a stage may see of its pump: direction and the shared session state."""

    direction: str  # "client" (client→backend) or "backend" (backend→client)
    session: Any
    state: Any = None


def _socket_fd(stream: Any) -> int | None:
    """The fd of a plain ``trio.SocketStream`` (lean I/O), else None (TLS, GSSENC, memory streams)."""
    if type(stream) is trio.SocketStream:
        return stream.socket.fileno()
    return None


# A pump that keeps finding data waiting yields to the scheduler after this many
# reads without one (lean I/O only checkpoints when it has to wait).
CHECKPOINT_EVERY = 16


class Receiver:
    """Reads chunks from one stream.

    Lean I/O on a plain TCP socket: ``os.read`` first and wait for readability
    only when nothing is there, instead of ``SocketStream.receive_some``, which
    passes through the scheduler twice per call even when data is waiting.
    Cancellation and fairness still hold: every wait is a checkpoint, and a
    pump that never has to wait checkpoints every ``CHECKPOINT_EVERY`` reads.
    Other streams use their own ``receive_some``.
    """

    __slots__ = ("stream", "fd", "size", "streak")

    def __init__(self, stream: trio.abc.ReceiveStream, size: int) -> None:
        self.stream = stream
        self.fd = _socket_fd(stream)
        self.size = size
        self.streak = 0

    async def receive(self) -> bytes:
        fd = self.fd
        if fd is None:
            return await self.stream.receive_some(self.size)
        while True:
            try:
                data = os.read(fd, self.size)
            except BlockingIOError:
                self.streak = 0
                await _wait_readable(fd)
                continue
            self.streak += 1
            if self.streak >= CHECKPOINT_EVERY:
                self.streak = 0
                await _checkpoint()
            return data


class Sender:
    """Sends on one stream, one sender at a time: the pump that owns it and replies from the other pump.

    Lean I/O on a plain TCP socket (see ``Receiver``): ``os.write`` first,
    wait for writability only for what the kernel did not take.
    """

    def __init__(self, stream: trio.abc.SendStream, encoder: Callable[[bytes], bytes]) -> None:
        self.stream = stream
        self.fd = _socket_fd(stream)
        self.encoder = encoder
        self.busy = False
        self._waiting = trio.lowlevel.ParkingLot()
        self.bytes_out = 0

    async def send_wire(self, data: bytes | memoryview) -> None:
        if not data:
            return
        # Uncontended almost always (only a reply from the other pump competes).
        while self.busy:
            await self._waiting.park()
        self.busy = True
        try:
            fd = self.fd
            if fd is None:
                await self.stream.send_all(data)
            else:
                try:
                    sent = os.write(fd, data)
                except BlockingIOError:
                    sent = 0
                if sent < len(data):
                    view = memoryview(data)
                    while sent < len(view):
                        await _wait_writable(fd)
                        try:
                            sent += os.write(fd, view[sent:])
                        except BlockingIOError:
                            pass
        finally:
            self.busy = False
            if self._waiting:
                self._waiting.unpark()
        self.bytes_out += len(data)

    async def send_messages(self, data: bytes) -> None:
        if data:
            await self.send_wire(self.encoder(data))


def audit_malformed(session: Any, direction: str, msg: Any, exc: ProtocolError) -> None:
    """Record a refused message as ``audit.malformed`` on the session's audit.

    A ``MalformedMessage`` says what it was (type, length, first bytes); any
    other ProtocolError a stage raised over a decoded message is described
    from the message's own ``raw`` (every codec's messages have one).
    """
    audit = getattr(session, "audit", None)
    if audit is None:
        return
    if not isinstance(exc, MalformedMessage):
        raw = getattr(msg, "raw", None) or b""
        exc = MalformedMessage(str(exc), type_name=type(msg).__name__, raw=raw)
    audit.emit(MALFORMED, direction=direction, success=False, **exc.audit_fields())


class SessionClosed(Exception):
    """Raised inside a pump to end the session after a stage asked to close."""


@attrs.define(eq=False)
class Pump:
    name: str
    direction: str
    source: trio.abc.ReceiveStream
    decoder: Decoder
    stages: list
    ctx: PumpContext
    on_error: Callable[[ProxyError], bytes] | None = None
    after_batch: Callable[[], Any] | None = None
    account: Any = None  # dbproxy.buffer.BudgetAccount: this pump's partial-message charge
    chunks: int = 0
    messages: int = 0
    bytes_in: int = 0
    rewritten: int = 0

    def statistics(self, out: Sender) -> PumpStatistics:
        return PumpStatistics(
            direction=self.direction,
            chunks=self.chunks,
            messages=self.messages,
            bytes_in=self.bytes_in,
            bytes_out=out.bytes_out,
            rewritten_batches=self.rewritten,
        )


class Pipeline:
    """Runs the two pumps of one session.

    ``client_out`` / ``backend_out`` are the encoders for message-layer bytes
    sent *to* the client / backend.  ``client_error`` renders a ProxyError as
    the client's wire-format error (sent before closing).  ``buffers`` is the
    proxy's ``BufferBudget``: partial messages are charged to it and must
    complete within its ``message_timeout`` (None: unbounded).
    """

    def __init__(
        self,
        *,
        session: Any,
        client: trio.abc.Stream,
        backend: trio.abc.Stream,
        client_decoder: Decoder,
        backend_decoder: Decoder,
        client_stages: list,
        backend_stages: list,
        state: Any = None,
        to_client_encoder: Callable[[bytes], bytes] = identity_encoder,
        to_backend_encoder: Callable[[bytes], bytes] = identity_encoder,
        client_error: Callable[[ProxyError], bytes] | None = None,
        flush_audit: Callable[[], Any] | None = None,
        receive_size: int = RECEIVE_SIZE,
        buffers: Any = None,
    ) -> None:
        self.session = session
        self.client = client
        self.backend = backend
        self.to_client = Sender(client, to_client_encoder)
        self.to_backend = Sender(backend, to_backend_encoder)
        self.client_error = client_error
        self.flush_audit = flush_audit
        # A SessionAudit's flush has nothing to do unless events are pending;
        # checking its list saves an await per chunk on the hot path.
        self._audit_owner = getattr(flush_audit, "__self__", None)
        self.receive_size = receive_size
        self.c2b = Pump(
            "client->backend",
            "client",
            client,
            client_decoder,
            client_stages,
            PumpContext("client", session, state),
        )
        self.b2c = Pump(
            "backend->client",
            "backend",
            backend,
            backend_decoder,
            backend_stages,
            PumpContext("backend", session, state),
        )
        self.buffers = buffers
        if buffers is not None:
            self.c2b.account = buffers.account()
            self.b2c.account = buffers.account()
        self.end_reason: str | None = None
        self.error: BaseException | None = None

    def statistics(self) -> tuple[PumpStatistics, PumpStatistics]:
        return (self.c2b.statistics(self.to_backend), self.b2c.statistics(self.to_client))

    async def run(self) -> None:
        """Pump both directions until either side ends; both pumps end together."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump_task, self.c2b, self.to_backend, self.to_client, nursery)
                nursery.start_soon(self._pump_task, self.b2c, self.to_client, self.to_backend, nursery)
        finally:
            # Also on cancellation: the session's partial messages leave the budget, and
            # memory, with it (nothing decodes them any more).
            for pump in (self.c2b, self.b2c):
                if pump.account is not None:
                    pump.account.release()
                    pump.decoder.buffer.clear()

    async def _pump_task(self, pump: Pump, out: Sender, back: Sender, nursery: trio.Nursery) -> None:
        try:
            await self._pump(pump, out, back)
            if self.end_reason is None:
                self.end_reason = f"{pump.direction} closed"
        except SessionClosed:
            if self.end_reason is None:
                self.end_reason = f"closed by {pump.direction}-side stage"
        except ProtocolError as exc:
            if self.end_reason is None:
                self.end_reason = f"{pump.direction} protocol error: {exc}"
                self.error = exc
            log.warning("session %s: %s protocol error: %s", getattr(self.session, "id", "?"), pump.direction, exc)
            if self.client_error is not None:
                with trio.move_on_after(2):
                    try:
                        await self.to_client.send_wire(self.client_error(exc))
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        pass  # the lean path raises the socket's own OSError (reset, broken pipe)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            if self.end_reason is None:
                self.end_reason = f"{pump.direction} connection lost: {exc.__class__.__name__}"
        finally:
            nursery.cancel_scope.cancel()

    async def _receive_partial(self, pump: Pump, receive: Callable[[], Any], deadline: float, held: int) -> bytes:
        """A read while a partial message is held: the message must complete by ``deadline``."""
        with trio.move_on_at(deadline):
            return await receive()
        self.buffers.timeouts += 1
        exc = MessageTimeout(self.buffers.message_timeout, held)
        exc.direction = pump.direction  # type: ignore[attr-defined]
        raise exc

    @staticmethod
    def _hold_partial(pump: Pump, held: int, announced_length: Callable[[], int | None] | None) -> None:
        """Charge a partial message to the budget (``BufferBudgetExceeded`` when it cannot fit)."""
        try:
            pump.account.hold(held, announced_length() if announced_length is not None else None)
        except ProtocolError as exc:
            exc.direction = pump.direction  # type: ignore[attr-defined]
            raise

    async def _pump(self, pump: Pump, out: Sender, back: Sender) -> None:
        decoder = pump.decoder
        buf = decoder.buffer
        stages = pump.stages
        ctx = pump.ctx
        receive = Receiver(pump.source, self.receive_size).receive
        next_message = decoder.next_message
        flush_audit = self.flush_audit
        audit_owner = self._audit_owner if hasattr(self._audit_owner, "halted") else None
        # Durability "ack" (audit.recorder.DurableSessionAudit): what the backend answers,
        # and a stage's own answer (a refusal), reach the client only once the session's
        # audit events are durable.
        durable_replies = getattr(audit_owner, "wait_durable", None)
        wait_durable = durable_replies if pump is self.b2c else None
        # Bytes handed over from the handshake phase are decoded before the first read.
        pending = bool(buf)
        # A partial message (bytes left after a batch) is charged to the proxy's budget
        # and must complete by ``deadline``.  None pending (the common case) costs one
        # integer test per batch and reads without a cancel scope.
        account = pump.account
        announced_length = getattr(decoder, "announced_length", None)
        partial = False
        deadline = 0.0
        while True:
            if not pending:
                if not partial:
                    data = await receive()
                else:
                    data = await self._receive_partial(pump, receive, deadline, len(buf))
                if not data:
                    return
                pump.chunks += 1
                pump.bytes_in += len(data)
                decoder.feed(data)
            pending = False
            buf.mark()
            forwarded: list[bytes] = []  # message-layer bytes, used only if something changed
            changed = False
            replies: list[bytes] | None = None
            close = False
            failure: ProtocolError | None = None
            count = 0
            while True:
                msg = NEED_DATA
                try:
                    msg = next_message()
                    if msg is NEED_DATA:
                        break
                    count += 1
                    verdict = None
                    for stage in stages:
                        verdict = stage.handle(msg, ctx)
                        if verdict is not None:
                            break
                except ProtocolError as exc:
                    # Raised by the decoder or by a stage parsing a body.  Messages
                    # before the bad one are valid: they are sent first; the bad
                    # one is not forwarded.
                    exc.direction = pump.direction  # type: ignore[attr-defined]
                    failure = exc
                    if msg is not NEED_DATA:
                        # A stage refused a message the decoder already consumed:
                        # the received span includes it, so send the rebuilt batch.
                        changed = True
                    if msg is not NEED_DATA or isinstance(exc, MalformedMessage):
                        # It framed but its body did not parse: the refused message is
                        # itself audited before anything of this batch is sent.
                        audit_malformed(self.session, pump.direction, msg, exc)
                    break
                if verdict is None:
                    forwarded.append(msg.raw)
                    continue
                changed = True
                if verdict.replace is not None:
                    forwarded.extend(verdict.replace)
                else:
                    forwarded.append(msg.raw)
                if verdict.reply:
                    if replies is None:
                        replies = []
                    replies.append(verdict.reply)
                if verdict.close:
                    close = True
                    break
            pump.messages += count
            if audit_owner is not None and audit_owner.halted:
                # The audit trail is gone (fail-closed): nothing more is forwarded
                # unaudited; flush ends the session with the client's error.
                await flush_audit()
            if wait_durable is not None:
                await wait_durable()
            if not changed:
                await out.send_wire(buf.consumed_since_mark())
            else:
                pump.rewritten += 1
                await out.send_messages(b"".join(forwarded))
            if replies:
                if durable_replies is not None:
                    await durable_replies()
                await back.send_messages(b"".join(replies))
            held = buf.compact()
            if flush_audit is not None and (audit_owner is None or audit_owner._pending):
                await flush_audit()
            if failure is not None:
                raise failure
            if close:
                raise SessionClosed()
            if (held or partial) and account is not None:
                if not held:
                    partial = False
                    account.release()
                else:
                    self._hold_partial(pump, held, announced_length)
                    if not partial or count:
                        # A new partial message, or complete ones arrived: the clock restarts.
                        partial = True
                        deadline = trio.current_time() + self.buffers.message_timeout
