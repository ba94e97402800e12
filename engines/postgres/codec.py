"""Sans-IO decoders for the PostgreSQL v3 wire protocol (h11 shape).

Framing (protocol docs §55.1, §55.7): after the start-up phase every message
is ``Byte1 type`` + ``Int32 length`` (the length counts itself and the body,
not the type byte).  In the start-up phase the frontend sends untyped
packets: ``Int32 length`` + ``Int32 code`` + body, where the code is a
protocol version (StartupMessage) or one of the magic request codes
(SSLRequest, GSSENCRequest, CancelRequest).  The answer to SSLRequest /
GSSENCRequest is a single unframed byte, or an unauthenticated ErrorResponse
that ``read_refusal`` reads (bounded) for the caller to log, never to show.

Typed messages are framed by ``FRAMES``, a ``dbproxy.sansio.LengthPrefixed``:
the one frame loop the decoders here, the audit tee of a tapped session
(``dbproxy.tee.Tee``) and the audit worker (``tap.Tap``) share, so they
agree on every frame and every error.  ``next_message`` checks the header
and ``take``s the message; the body is never looked at (see ``messages``
for lazy parsers).  A length above ``max_message_size`` raises
``FrameTooLarge`` as soon as the header is in, before the body is buffered.
Unknown type bytes are forwarded (newer servers may add messages); lengths
below 4 are garbage and raise ``RemoteProtocolError``.

Start-up packets are capped at 10000 bytes like PostgreSQL
(MAX_STARTUP_PACKET_LENGTH) and parsed eagerly; they are rare.
"""

from __future__ import annotations

import struct

import attrs

from dbproxy.buffer import ReceiveBuffer
from dbproxy.errors import FrameTooLarge, RemoteProtocolError
from dbproxy.sansio import NEED_DATA, LengthPrefixed

from .messages import (
    CANCEL_REQUEST_CODE,
    GSSENC_REQUEST_CODE,
    SSL_REQUEST_CODE,
    CancelRequest,
    GSSENCRequest,
    Message,
    SSLRequest,
    StartupMessage,
    parse_error_fields,
    parse_startup_params,
)

# PostgreSQL's own ceiling for one message is MaxAllocSize (1 GiB - 1); the
# engine passes its configured limit.
DEFAULT_MAX_MESSAGE_SIZE = 0x3FFFFFFF
MAX_STARTUP_PACKET_LENGTH = 10000
# An error answering SSLRequest/GSSENCRequest: libpq's MAX_ERRLEN (fe-connect.c),
# the size above which it stops believing a length is an error's.
MAX_REFUSAL_LENGTH = 30000
# CancelRequest: 16 bytes in 3.0; protocol 3.2 allows a secret key of up to 256 bytes.
_MAX_CANCEL_LENGTH = 12 + 256

_II = struct.Struct(">ii")


def _bad_length(length: int, what: str = "message") -> RemoteProtocolError:
    return RemoteProtocolError(
        f"invalid {what} length {length}", client_hint=f"invalid {what} length"
    )


def _what(data, pos: int) -> str:
    return f"message {chr(data[pos])!r}"


#: The typed-message frame loop (§55.7: type byte, then an Int32 length that counts itself, not
#: the type byte; below 4 is garbage), shared by the decoders, the audit tee and the audit worker.
FRAMES = LengthPrefixed(header_size=5, length_format=">i", length_offset=1, extra=1, min_length=4,
                        bad_length=_bad_length, what=_what)


class _TypedDecoder:
    __slots__ = ("buffer", "max_message_size")

    def __init__(self, *, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
                 buffer: ReceiveBuffer | None = None) -> None:
        self.buffer = buffer if buffer is not None else ReceiveBuffer()
        self.max_message_size = max_message_size

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self.buffer.feed(data)

    def _next_typed(self) -> Message | object:
        frame = FRAMES.next_frame(self.buffer, self.max_message_size)
        if frame is NEED_DATA:
            return NEED_DATA
        return Message(frame[0], frame)

    next_message = _next_typed

    def announced_length(self) -> int | None:
        """Wire length of the partly received message, from its header (None: header incomplete).

        For the proxy's buffer budget (``dbproxy.buffer.BudgetAccount``): only called
        while a message is incomplete, never on the hot path.
        """
        return FRAMES.announced(self.buffer)


class BackendDecoder(_TypedDecoder):
    """Decodes what a server sends: typed messages, plus the SSL/GSS answer byte.

    After an 'S' / 'G' answer the next byte from the server must come through
    the TLS/GSS layer (§55.2.10, §55.2.11: the server sends the single byte and
    waits for the handshake).  Plaintext behind the answer is refused the same
    way whether it came in the answer's read or in a later one: ``feed`` raises
    until the caller, having set up the encrypted transport, calls
    ``encryption_established()``.  So no split of the stream can make the
    decoder read a byte an attacker put before the handshake (CVE-2021-23222).
    """

    __slots__ = ("_sealed",)

    def __init__(self, *, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
                 buffer: ReceiveBuffer | None = None) -> None:
        super().__init__(max_message_size=max_message_size, buffer=buffer)
        self._sealed = False

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._sealed and data:
            raise _unencrypted_after_answer()
        self.buffer.feed(data)

    def encryption_established(self) -> None:
        """The TLS/GSS layer is up: what is fed from now on was decrypted by it."""
        self._sealed = False

    def _read_answer(self, accept: bytes) -> bytes | object:
        buf = self.buffer
        if not buf:
            return NEED_DATA
        b = buf.peek_byte()
        if b == 0x45:
            # 'E': ErrorResponse from a server too old to know the request or refusing
            # the connection.  Not consumed: ``read_refusal`` reads it for the log.
            return b"E"
        if b not in accept:
            raise RemoteProtocolError(
                f"invalid answer byte {b:#04x} to an encryption request",
                client_hint="the server sent an invalid answer to the encryption request",
            )
        if b != 0x4E:
            if len(buf) > 1:
                # Bytes that arrived before the TLS/GSS handshake were not protected by
                # it and could have been injected (CVE-2021-23222): refuse them.  The
                # answer stays unconsumed: it was not returned.
                raise _unencrypted_after_answer()
            self._sealed = True
        buf.skip(1)
        return bytes((b,))

    def read_ssl_answer(self) -> bytes | object:
        """The answer to SSLRequest: ``b"S"`` / ``b"N"`` (consumed), ``b"E"`` (not
        consumed: a refusal, read it with ``read_refusal``) or NEED_DATA.
        After ``b"S"``: ``encryption_established()`` once TLS is up."""
        return self._read_answer(b"SN")

    def read_gssenc_answer(self) -> bytes | object:
        """The answer to GSSENCRequest: ``b"G"`` / ``b"N"`` / ``b"E"`` as above."""
        return self._read_answer(b"GN")

    def read_refusal(self) -> Refusal | object:
        """After an answer ``b"E"``: the server's error, consumed, or NEED_DATA.

        The server is not authenticated yet, so the caller must treat this as a
        refusal of the request and never show the text to a user (§55.2.10,
        §55.2.11; CVE-2024-10977); it is for the proxy's log.  Two shapes, told
        apart like libpq does (fe-connect.c, CONNECTION_AWAITING_RESPONSE): a v3
        ErrorResponse whose length is plausible for an error, else a pre-3.0 error
        (servers before 14 used it for failures before the startup packet, e.g. a
        fork failure): ``'E'`` + text + NUL.  Both are capped at ``MAX_REFUSAL_LENGTH`` (libpq's
        MAX_ERRLEN) before more is buffered; what follows is ignored (the server
        closes the connection after it).
        """
        buf = self.buffer
        avail = len(buf)
        if not avail:
            return NEED_DATA
        if buf.peek_byte() != 0x45:
            raise RemoteProtocolError(
                "read_refusal: the answer is not an ErrorResponse",
                client_hint="the server sent an invalid answer to the encryption request",
            )
        if avail < 5:
            return NEED_DATA
        length = buf.i32_be(1)
        if 8 <= length <= MAX_REFUSAL_LENGTH:
            if avail <= length:
                return NEED_DATA
            raw = buf.take(length + 1)
            return Refusal(parse_error_fields(Message(0x45, raw)), raw)
        if buf.peek_byte(1) == 0:
            # A v3 length (the text of a pre-3.0 error never starts with NUL) out of bounds.
            if length > MAX_REFUSAL_LENGTH:
                raise FrameTooLarge(length, MAX_REFUSAL_LENGTH, what="error response to an encryption request")
            raise _bad_length(length, "error response")
        # Pre-3.0 format: the text runs to a NUL.
        data, start, end = buf.span()
        stop = min(end, start + 1 + MAX_REFUSAL_LENGTH)
        nul = data.find(b"\0", start + 1, stop)
        if nul < 0:
            if stop - start > MAX_REFUSAL_LENGTH:
                raise FrameTooLarge(MAX_REFUSAL_LENGTH + 1, MAX_REFUSAL_LENGTH, what="error response to an encryption request")
            return NEED_DATA
        raw = buf.take(nul + 1 - start)
        return Refusal({"M": raw[1:-1].decode("utf-8", "replace").rstrip("\n")}, raw)


@attrs.frozen
class Refusal:
    """An unauthenticated error answering SSLRequest / GSSENCRequest: ``fields`` as
    ``parse_error_fields`` gives them (only ``M`` for a pre-3.0 error), ``raw`` its
    bytes.  For the log only (see ``BackendDecoder.read_refusal``)."""

    fields: dict[str, str]
    raw: bytes


def _unencrypted_after_answer() -> RemoteProtocolError:
    return RemoteProtocolError(
        "unencrypted data after the encryption answer",
        client_hint="the server sent unencrypted data after accepting encryption",
    )


class FrontendDecoder(_TypedDecoder):
    """Decodes what a client sends.

    With ``startup=True`` the first packets are untyped start-up packets.
    After a StartupMessage the decoder switches to typed messages by itself;
    SSLRequest / GSSENCRequest keep it in start-up mode (another start-up
    packet follows).  ``set_startup_done()`` switches explicitly.

    After answering SSLRequest/GSSENCRequest with 'S'/'G', the engine must
    check that ``decoder.buffer`` is empty: plaintext sent before the
    handshake could be injected (CVE-2021-23214).
    """

    __slots__ = ("_startup",)

    def __init__(self, *, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
                 startup: bool = True, buffer: ReceiveBuffer | None = None) -> None:
        super().__init__(max_message_size=max_message_size, buffer=buffer)
        self._startup = startup

    @property
    def in_startup(self) -> bool:
        return self._startup

    def set_startup_done(self) -> None:
        self._startup = False

    def announced_length(self) -> int | None:
        if self._startup:
            buf = self.buffer
            return buf.i32_be() if len(buf) >= 4 else None
        return super().announced_length()

    def next_message(self):  # -> Message | StartupMessage | SSLRequest | ... | NEED_DATA
        if self._startup:
            return self._next_startup()
        return self._next_typed()

    def _next_startup(self):
        buf = self.buffer
        avail = len(buf)
        if avail < 4:
            return NEED_DATA
        length = buf.i32_be()
        # PostgreSQL (ProcessStartupPacket): length counts itself and must also hold the code.
        if length < 8:
            raise _bad_length(length, "startup packet")
        if length > MAX_STARTUP_PACKET_LENGTH:
            raise FrameTooLarge(length, MAX_STARTUP_PACKET_LENGTH, what="startup packet")
        if avail < length:
            return NEED_DATA
        code = buf.i32_be(4)
        if code == SSL_REQUEST_CODE or code == GSSENC_REQUEST_CODE:
            if length != 8:
                raise _bad_length(length, "SSLRequest" if code == SSL_REQUEST_CODE else "GSSENCRequest")
            raw = buf.take(8)
            return SSLRequest(raw) if code == SSL_REQUEST_CODE else GSSENCRequest(raw)
        if code == CANCEL_REQUEST_CODE:
            if not 16 <= length <= _MAX_CANCEL_LENGTH:
                raise _bad_length(length, "CancelRequest")
            raw = buf.take(length)
            return CancelRequest(_II.unpack_from(raw, 8)[0], raw[12:], raw)
        major = code >> 16
        if major != 3:
            raise RemoteProtocolError(
                f"unsupported frontend protocol {major}.{code & 0xFFFF}",
                client_hint=f"unsupported frontend protocol {major}.{code & 0xFFFF}: "
                "the proxy supports protocol 3.x",
            )
        raw = bytes(buf.peek(length))
        params = parse_startup_params(raw[8:])
        buf.skip(length)
        self._startup = False
        return StartupMessage(code, params, raw)
