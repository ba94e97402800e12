"""What the proxy itself says to a CQL client, in the connection's current framing.

``ClientWire`` renders the proxy's own frames — errors, refusals, the
handshake's answers — at the client's version and v3/v4 compression, through
the encoder toward the client (segments from the v5 switch on).  The
session's error answers live here too (``pipeline_error``):

- a client's protocol error: PROTOCOL_ERROR on the offending stream;
- the backend broke the protocol or went away: SERVER_ERROR on every stream
  still waiting for an answer, so drivers fail fast instead of timing out;
- a memory bound of the proxy (``dbproxy.buffer``): OVERLOADED for the
  buffer budget — Cassandra's own answer when its in-flight request bytes
  are exhausted (native_transport_max_request_data_in_flight) — or
  PROTOCOL_ERROR for the deadline, on the stream of the frame the client was
  still sending when its header is in ('frames' framing), then SERVER_ERROR
  for every waiting request.
"""

from __future__ import annotations

from typing import Any

import attrs

from dbproxy.channel import MessageStream
from dbproxy.errors import BufferBudgetExceeded, FrameTooLarge, MessageTimeout, ProtocolError, ProxyError

from . import protocol as F
from .backend import BackendProtocolError
from .codec import CqlDecoder, CqlEncoder

BACKEND_LOST = "the connection to the backend database was lost"


class ClientWire:
    """Frames the proxy itself sends the client, in the connection's current framing."""

    def __init__(self, channel: MessageStream) -> None:
        self.channel = channel
        self.version: int | None = None
        self.compression: str | None = None  # v3/v4 per-frame compression, from STARTUP on
        self.encoder = CqlEncoder()

    def error(self, stream: int, code: int, message: str) -> bytes:
        version = self.version or F.CURRENT_VERSION
        return self.encoder(F.encode_error(version, stream, code, message, compressor=self.compression))

    def protocol_error(self, exc: Exception) -> bytes:
        """The PROTOCOL_ERROR for a client's ProtocolError, on its stream when known."""
        if self.version is None:
            if isinstance(exc, F.UnsupportedProtocolVersion):
                return F.protocol_error_reply(exc)
            # A bad first header is answered in the server's current version
            # (Cassandra does); an oversized one in its own, which is valid.
            version = getattr(exc, "version", None)
            if not (isinstance(exc, FrameTooLarge) and version in F.SUPPORTED_VERSIONS):
                version = F.CURRENT_VERSION
            return F.protocol_error_reply(exc, version=version)
        return self.encoder(F.protocol_error_reply(exc, version=self.version, compressor=self.compression))

    async def send(self, data: bytes) -> None:
        await self.channel.send(data)

    # -- the session's error answers ------------------------------------------------------
    def fail_pending(self, state: Any, message: str) -> bytes:
        """SERVER_ERROR on every stream still waiting for an answer (then the session closes)."""
        streams = list(state.pending)
        state.pending.clear()
        if not streams:
            return b""
        version = self.version or F.CURRENT_VERSION
        frames = b"".join(
            F.encode_error(version, s, F.ErrorCode.SERVER_ERROR, message, compressor=self.compression) for s in streams
        )
        return self.encoder(frames)

    def pipeline_error(self, state: Any, exc: ProxyError) -> bytes:
        if isinstance(exc, BackendProtocolError):
            return self.fail_pending(state, exc.client_hint)
        if isinstance(exc, (BufferBudgetExceeded, MessageTimeout)):
            return self.limit_error(state, exc)
        return self.protocol_error(exc)

    def limit_error(self, state: Any, exc: ProtocolError) -> bytes:
        """The proxy ends the session for a memory bound (see the module docstring)."""
        out = b""
        stream = partial_stream(self.channel.decoder) if getattr(exc, "direction", None) == "client" else None
        if stream is not None:
            code = F.ErrorCode.OVERLOADED if isinstance(exc, BufferBudgetExceeded) else F.ErrorCode.PROTOCOL_ERROR
            state.pending.pop(stream, None)
            out = self.error(stream, code, exc.client_hint)
        return out + self.fail_pending(state, exc.client_hint)


def partial_stream(decoder: CqlDecoder) -> int | None:
    """Stream id of the frame partly received at the decoder's read position ('frames' framing)."""
    buf = decoder.buffer
    if decoder.framing != "frames" or not buf:
        return None
    size = F.header_size_for(buf.peek_byte())
    if len(buf) < size:
        return None
    return F.parse_header(bytes(buf.peek(size)))[2]


@attrs.define(eq=False)
class Hello:
    """The engine's part of a ``Request``: what the handshake and the client's login settled."""

    wire: ClientWire
    version: int = 0
    options: dict = attrs.field(factory=dict)
    compression: str | None = None
    reply_stream: int = 0  # where AUTHENTICATE / AUTH_SUCCESS / READY / a refusal go: the last frame's stream
    user: str | None = None  # the user name the client logged in with (None: it sent no credentials)
    authenticated: bool = False  # AUTHENTICATE was sent: the client waits for AUTH_SUCCESS, not READY
    policy: Any = None  # the statement policy stage, when the grant has rules
