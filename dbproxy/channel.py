"""Message-at-a-time I/O for handshakes.

Before a session's pipeline starts, engines converse message by message
(startup, TLS upgrade, proxy-owned authentication).  ``MessageStream`` pairs
a stream with a sans-IO decoder and does the reading, so engine handshake
code stays free of socket handling.  Bytes read past the handshake stay in
the decoder's buffer and the pipeline decodes them first.

Memory: while ``receive_with`` waits for the rest of a message, the bytes
held are charged to the proxy's ``BufferBudget`` (when given one; engines pass
it for client streams) and released when it returns; consumed bytes are
dropped (``compact``) before each read, so a long handshake (many OPTIONS,
a SASL conversation) does not accumulate them.  Handshakes have their own
deadlines (the engines' ``fail_after``).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import trio

from .errors import BufferBudgetExceeded, ProtocolError, UpstreamError
from .pipeline import RECEIVE_SIZE
from .sansio import NEED_DATA


class PeerClosed(Exception):
    """The peer closed its side before sending what the handshake needed."""


class MessageStream:
    def __init__(self, stream: trio.abc.Stream, decoder: Any, *, receive_size: int = RECEIVE_SIZE,
                 budget: Any = None) -> None:
        self.stream = stream
        self.decoder = decoder
        self.receive_size = receive_size
        self.budget = budget  # dbproxy.buffer.BufferBudget, or None (unaccounted)

    async def receive_with(self, step: Callable[[], Any]) -> Any:
        """Call ``step`` (a decoder method) until it returns something other than NEED_DATA."""
        account = self.budget.account() if self.budget is not None else None
        try:
            while True:
                result = step()
                if result is not NEED_DATA:
                    return result
                buf = self.decoder.buffer
                held = buf.compact()
                if held and account is not None:
                    announced = getattr(self.decoder, "announced_length", None)
                    try:
                        account.hold(held, announced() if announced is not None else None)
                    except BufferBudgetExceeded:
                        buf.clear()  # the handshake ends here: its bytes go now
                        raise
                data = await self.stream.receive_some(self.receive_size)
                if not data:
                    raise PeerClosed()
                self.decoder.feed(data)
        finally:
            if account is not None:
                account.release()

    async def receive(self) -> Any:
        return await self.receive_with(self.decoder.next_message)

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


@contextlib.contextmanager
def login_errors(address: str) -> Iterator[None]:
    """Translate what can go wrong while the proxy logs in to a backend into ``UpstreamError``.

    Every engine's backend login runs inside this, so a backend that hangs up,
    breaks its protocol or loses the link is reported the same way for every
    protocol (detail for the log and the audit event, a safe hint for the client).
    """
    try:
        yield
    except PeerClosed:
        raise UpstreamError(
            f"backend {address} closed the connection during login",
            kind="closed",
            client_hint="the backend database closed the connection while the proxy was logging in",
        ) from None
    except ProtocolError as exc:
        raise UpstreamError(
            f"backend {address} broke the protocol during login: {exc}",
            kind="protocol",
            client_hint="the backend database sent an invalid response during login",
        ) from None
    except (trio.BrokenResourceError, OSError) as exc:
        raise UpstreamError(
            f"backend {address} connection failed during login: {exc}",
            kind="closed",
            client_hint="the connection to the backend database failed during login",
        ) from None
