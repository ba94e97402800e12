"""Sans-IO CQL decoder and encoders, with switchable framing.

A CQL connection starts with bare frames ('frames' framing): OPTIONS,
SUPPORTED, STARTUP and its READY/AUTHENTICATE answer are never wrapped (v5
spec 2.3.1).  For v3/v4 it stays that way; for v5+ each side switches to
CRC-protected segments right after READY/AUTHENTICATE.  The engine flips each
decoder (and the matching ``CqlEncoder``) with ``set_framing`` between two
``next_message`` calls; bytes not yet decoded are read with the new framing.

When to switch (checked against Cassandra 5.0.9, see tests/unit/cassandra/
test_cql_real.py): v3/v4 with compression: both decoders get
``set_framing('frames', algo)`` as soon as the client's STARTUP asks for it,
because Cassandra already compresses its READY/AUTHENTICATE.  v5+: client
decoder ``set_framing('segments', algo)`` right after returning STARTUP, server
decoder right after returning READY/AUTHENTICATE (both unframed and
uncompressed); the encoders toward each side switch at the same points.

'frames': a message is one frame; ``raw`` is its exact wire bytes and the
buffer advances past it.

'segments': the decoder CRC-checks a whole segment, advances the buffer past
it and queues its frames (``raw`` = the uncompressed frame bytes);
``next_message`` hands out queued frames before reading the next segment.  The
pump's batch ends only on NEED_DATA, when the queue is empty, so the span the
pump forwards on its hot path (``buffer.consumed_since_mark()``) is always
whole segments whose frames were all returned.  A frame split over
non-self-contained segments is consumed only once its last segment is in; the
scan of the earlier ones is remembered (offsets relative to the read position,
which compaction does not change) so a 256 MiB frame arriving in small reads
is not re-verified from its start on every read.

Lengths are checked against ``max_message_size`` as soon as a frame header
is seen, before its body is buffered (FrameTooLarge).
"""

from __future__ import annotations

import collections
from typing import Literal

from dbproxy.buffer import ReceiveBuffer
from dbproxy.errors import LocalProtocolError
from dbproxy.sansio import NEED_DATA, identity_encoder

from .frames import (
    BETA_VERSIONS,
    DEFAULT_MAX_MESSAGE_SIZE,
    HEADER,
    REQUEST_OPCODES,
    RESPONSE_BIT,
    RESPONSE_OPCODES,
    SUPPORTED_VERSIONS,
    FIRST_SEGMENT_VERSION,
    HEADER_SIZE,
    VERSION_MASK,
    CqlProtocolError,
    Frame,
    check_header,
    frame_too_large,
    header_size_for,
    parse_envelope_header,
    parse_header,
)
from .segments import (
    COMPRESSED_HEADER,
    CRC24_SEEN,
    CRC24_SIZE,
    CRC32_SIZE,
    PAYLOAD_MASK,
    UNCOMPRESSED_HEADER,
    decode_segment,
    encode_segments,
    header_size,
    parse_header_fields,
)

Framing = Literal["frames", "segments"]
_COMPRESSIONS = (None, "lz4", "snappy")

#: ``first byte << 8 | opcode`` of the headers ``check_header`` passes without looking at the
#: flags (every supported non-beta version, the opcode's own direction): one set look-up
#: for the frames inside segments; anything else goes through ``check_header`` itself.
_GOOD_REQUEST_HEADERS = frozenset(v << 8 | op for v in SUPPORTED_VERSIONS if v not in BETA_VERSIONS
                                  for op in REQUEST_OPCODES)
_GOOD_RESPONSE_HEADERS = frozenset((v | RESPONSE_BIT) << 8 | op for v in SUPPORTED_VERSIONS if v not in BETA_VERSIONS
                                   for op in RESPONSE_OPCODES)
_UNPACK_HEADER = HEADER.unpack_from


def peek_version(buffer: ReceiveBuffer) -> int | None:
    """Protocol version of the next frame (direction bit masked off), or None if no byte yet."""
    if not buffer:
        return None
    return buffer.peek_byte() & VERSION_MASK


class CqlDecoder:
    """Decoder for one direction of a CQL connection.

    ``direction``: ``'client'`` decodes what the client sends (requests),
    ``'server'`` what the server sends (responses and events).

    Every header gets Cassandra's checks, in Cassandra's order, as soon as it
    is in (before its body is buffered): an unsupported version raises
    ``UnsupportedProtocolVersion``, a v6 request without USE_BETA or a frame
    whose direction bit is wrong raise ``CqlProtocolError``, a length over
    ``max_message_size`` raises ``FrameTooLarge``.  All carry ``stream`` and
    ``version``; ``responses.protocol_error_reply(exc)`` renders the answer.
    """

    def __init__(
        self,
        direction: Literal["client", "server"] = "client",
        *,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        if direction not in ("client", "server"):
            raise ValueError(f"direction must be 'client' or 'server', not {direction!r}")
        self.buffer = ReceiveBuffer()
        self.direction = direction
        self.max_message_size = max_message_size
        self._from_client = direction == "client"
        self._framing: Framing = "frames"
        self._compression: str | None = None
        # Envelopes: ``Frame``'s fields as a tuple (``next_envelope``).
        self._queue: collections.deque[tuple] = collections.deque()
        self._good_headers = _GOOD_REQUEST_HEADERS if self._from_client else _GOOD_RESPONSE_HEADERS
        # Scan state of a frame split over non-self-contained segments.
        self._split_scanned = 0
        self._split_parts: list[bytes | memoryview] = []
        self._split_have = 0
        self._split_need = -1

    # --- configuration --------------------------------------------------------

    @property
    def framing(self) -> Framing:
        return self._framing

    @property
    def compression(self) -> str | None:
        return self._compression

    def set_framing(self, framing: Framing, compression: str | None = None) -> None:
        """Switch framing for the bytes not yet decoded.

        'frames' + 'lz4'/'snappy': v3/v4 per-frame compression (bodies are
        decompressed lazily by ``Frame.body()``).  'segments' + 'lz4': v5+
        compressed segments; Snappy does not exist for segments.
        """
        if framing not in ("frames", "segments"):
            raise LocalProtocolError(f"unknown CQL framing {framing!r}")
        if compression not in _COMPRESSIONS:
            raise LocalProtocolError(f"unknown CQL compression {compression!r}")
        if framing == "segments" and compression == "snappy":
            raise LocalProtocolError("protocol v5 segments support only LZ4 compression")
        if self._queue:
            raise LocalProtocolError("cannot switch CQL framing with decoded frames still queued")
        self._framing = framing
        self._compression = compression
        self._reset_split()

    # --- decoder contract ---------------------------------------------------------

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self.buffer.feed(data)

    def next_message(self) -> Frame | object:
        envelope = self.next_envelope()
        return envelope if envelope is NEED_DATA else Frame(*envelope)

    def next_envelope(self) -> tuple | object:
        """``next_message`` without the ``Frame``: its fields as a tuple ``(version, flags, stream,
        opcode, raw, body_offset, compression)`` (``Frame(*envelope)`` is the frame).  For a
        caller that builds frames only for the few it reads (``tap.CqlTee``)."""
        if self._queue:
            return self._queue.popleft()
        if self._framing == "frames":
            return self._next_frame()
        return self._next_from_segments()

    def announced_length(self) -> int | None:
        """Wire length of the partly received frame, from its header (None: not known yet).

        For the proxy's buffer budget, only while a frame is incomplete.  Segments:
        the length of a frame split over segments, once its header is in (each
        segment itself is at most 128 KiB of payload, v5 spec 2.2).
        """
        if self._framing == "segments":
            return self._split_need if self._split_need >= 0 else None
        buf = self.buffer
        available = len(buf)
        if not available:
            return None
        first = buf.peek_byte()
        size = header_size_for(first)
        if available < size:
            return None
        length = parse_header(bytes(buf.peek(size)))[4]
        return size + length

    # --- 'frames' ---------------------------------------------------------------

    def _check_header(self, first: int, version: int, flags: int, stream: int, opcode: int, length: int) -> None:
        check_header(first, version, flags, stream, opcode, from_client=self._from_client)
        if length > self.max_message_size:
            raise frame_too_large(length, self.max_message_size, stream=stream, version=version)

    def _next_frame(self) -> tuple | object:
        buf = self.buffer
        available = len(buf)
        if not available:
            return NEED_DATA
        first = buf.peek_byte()
        size = header_size_for(first)
        if available < size:
            return NEED_DATA
        version, flags, stream, opcode, length, size = parse_header(buf.peek(size))
        self._check_header(first, version, flags, stream, opcode, length)
        if available < size + length:
            return NEED_DATA
        compression = self._compression if version < FIRST_SEGMENT_VERSION else None
        return version, flags, stream, opcode, buf.take(size + length), size, compression

    # --- 'segments' -------------------------------------------------------------

    def _reset_split(self) -> None:
        self._split_scanned = 0
        self._split_parts = []
        self._split_have = 0
        self._split_need = -1

    def _peek_segment(self, offset: int) -> tuple[tuple[int, int, bool, int], int] | None:
        """The header fields (``segments.parse_header_fields``) and size of the whole segment at
        ``offset`` past the read position, once it is all in; nothing is consumed."""
        buf = self.buffer
        compressed = self._compression == "lz4"
        hsize = header_size(compressed)
        if len(buf) - offset < hsize:
            return None
        # Copies (here and of whole segments below): an exception's traceback must
        # never pin a memoryview of the receive buffer, or the next feed() fails.
        header = parse_header_fields(bytes(buf.peek(hsize, offset)), compressed)
        total = header[3] + header[0] + 4  # header + CRC24, payload, CRC32
        if len(buf) - offset < total:
            return None
        return header, total

    def _next_from_segments(self) -> tuple | object:
        # One self-contained segment per round, every step inline (this runs for each
        # segment of a v5 session, in both directions): the header and its CRC24 as one
        # integer (the CRC24 remembered; a header that fails is redone by ``segments``' own
        # function, which raises its error), then the payload's CRC32 and LZ4 over the
        # buffer's data in place, the frames.  No memoryview of the receive buffer: an
        # exception's traceback must never pin one, or the next feed() fails.
        buf = self.buffer
        if not buf:
            return NEED_DATA  # the common end of a batch (a split frame's scan needs more bytes too)
        compressed = self._compression == "lz4"
        n = COMPRESSED_HEADER if compressed else UNCOMPRESSED_HEADER
        hsize = n + CRC24_SIZE
        value_mask = (1 << 8 * n) - 1
        crc_shift = 8 * n
        crcs = CRC24_SEEN
        while True:
            if self._split_scanned:
                return self._continue_split()
            data, pos, end = buf.span()
            available = end - pos
            if available < hsize:
                return NEED_DATA
            word = int.from_bytes(data[pos:pos + hsize], "little")
            value = word & value_mask
            crc = crcs.get(value | n << 48)
            if crc is None or crc != word >> crc_shift:
                length, uncompressed, self_contained, _ = parse_header_fields(buf.copy(hsize), compressed)  # raises if bad
            else:
                length = value & PAYLOAD_MASK
                if compressed:
                    uncompressed = (value >> 17) & PAYLOAD_MASK
                    self_contained = (value >> 34) & 1
                else:
                    uncompressed = 0
                    self_contained = (value >> 17) & 1
            total = hsize + length + CRC32_SIZE
            if available < total:
                return NEED_DATA
            if not self_contained:
                return self._continue_split()
            payload = decode_segment(data, pos + hsize, length, uncompressed)  # CRC32, LZ4
            frames = self._split_payload(payload)
            buf.skip(total)
            if frames:
                if len(frames) == 1:
                    return frames[0]
                self._queue.extend(frames)
                return self._queue.popleft()
            # An empty self-contained segment carries nothing: consume it and read on.

    def _split_payload(self, payload: bytes | bytearray | memoryview) -> list[tuple]:
        if type(payload) is not bytes:
            payload = bytes(payload)
        end = len(payload)
        pos = 0
        frames = []
        good = self._good_headers
        limit = self.max_message_size
        while pos < end:
            if end - pos < HEADER_SIZE:
                raise CqlProtocolError(
                    "partial CQL frame header at the end of a self-contained segment",
                    client_hint="malformed CQL segment",
                )
            first, flags, stream, opcode, length = _UNPACK_HEADER(payload, pos)
            version = first & VERSION_MASK
            if first << 8 | opcode not in good or length > limit:  # else check_header passes it
                self._check_header(first, version, flags, stream, opcode, length)
            stop = pos + HEADER_SIZE + length
            if stop > end:
                raise CqlProtocolError(
                    "CQL frame crosses the end of a self-contained segment",
                    client_hint="malformed CQL segment",
                    stream=stream,
                    version=version,
                )
            # The frame's own bytes (a slice, so a copy: it does not pin the payload); a frame
            # that is the whole payload (a driver's every request and answer) as it is.
            raw = payload if stop == end and not pos else payload[pos:stop]
            frames.append((version, flags, stream, opcode, raw, HEADER_SIZE, None))
            pos = stop
        return frames

    def _continue_split(self) -> tuple | object:
        buf = self.buffer
        while True:
            peeked = self._peek_segment(self._split_scanned)
            if peeked is None:
                return NEED_DATA
            (length, uncompressed, self_contained, hsize), total = peeked
            if self_contained:
                raise CqlProtocolError(
                    "self-contained CQL segment inside a frame split over segments",
                    client_hint="malformed CQL segment sequence",
                )
            data, pos, _ = buf.span()
            part = decode_segment(data, pos + self._split_scanned + hsize, length, uncompressed)
            self._split_scanned += total
            self._split_parts.append(part)
            self._split_have += len(part)
            if self._split_need < 0 and self._split_have >= HEADER_SIZE:
                head = b"".join(self._split_parts)[:HEADER_SIZE]
                first = head[0]
                version, flags, stream, opcode, length = parse_envelope_header(head)
                self._check_header(first, version, flags, stream, opcode, length)
                self._split_need = HEADER_SIZE + length
            if self._split_need >= 0 and self._split_have >= self._split_need:
                break
        raw = b"".join(self._split_parts)
        consumed = self._split_scanned
        need = self._split_need
        self._reset_split()
        if len(raw) != need:
            raise CqlProtocolError(
                "CQL segments of a split frame carry bytes past the frame",
                client_hint="malformed CQL segment sequence",
            )
        version, flags, stream, opcode, _ = parse_envelope_header(raw)
        buf.skip(consumed)
        return version, flags, stream, opcode, raw, HEADER_SIZE, None


# --- encoders --------------------------------------------------------------------------


def frames_encoder(data: bytes) -> bytes:
    """Encoder for 'frames' framing: message-layer bytes are the wire bytes."""
    return data


class SegmentEncoder:
    """Encoder for v5+ 'segments' framing: concatenated whole frames -> segments."""

    __slots__ = ("compress",)

    def __init__(self, compress: bool = False) -> None:
        self.compress = compress

    def __call__(self, data: bytes) -> bytes:
        return encode_segments(data, compress=self.compress)


class CqlEncoder:
    """The pipeline encoder for one direction, switched together with a decoder.

    The encoder toward the backend follows the client decoder, the encoder
    toward the client follows the server decoder: same ``set_framing``
    arguments at the same handshake step.  Switch it only after the batch that
    carried STARTUP / READY / AUTHENTICATE went out, or those unframed frames
    would be wrapped in segments on the rewrite path.
    """

    __slots__ = ("_framing", "_compression", "_encode")

    def __init__(self) -> None:
        self._framing: Framing = "frames"
        self._compression: str | None = None
        self._encode = identity_encoder

    @property
    def framing(self) -> Framing:
        return self._framing

    def set_framing(self, framing: Framing, compression: str | None = None) -> None:
        if framing not in ("frames", "segments"):
            raise LocalProtocolError(f"unknown CQL framing {framing!r}")
        if compression not in _COMPRESSIONS:
            raise LocalProtocolError(f"unknown CQL compression {compression!r}")
        if framing == "segments":
            if compression == "snappy":
                raise LocalProtocolError("protocol v5 segments support only LZ4 compression")
            self._encode = SegmentEncoder(compression == "lz4")
        else:
            # v3/v4 frames keep their own (already compressed) bodies: nothing to add.
            self._encode = frames_encoder
        self._framing = framing
        self._compression = compression

    def __call__(self, data: bytes) -> bytes:
        return self._encode(data)
