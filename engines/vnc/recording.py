"""Desktop (VNC) session recordings: the RFB bytes of both directions, timestamped, zstd-compressed.

Strategy: record the wire, render later.  The proxy already has every byte the
server sent after ServerInit (and the client messages it forwarded); storing them
costs a memcpy and a compressor call, while decoding pixels in the session would
cost far more.  ``dbproxy replay`` (``render.py``) rebuilds the screen from the
file offline.  One file per session, ``<session id>.vncrec`` in the listener's
``recording.dir`` (as terminal recordings are ``<session id>.cast``); opened with
O_EXCL, mode 0600.

File format (version 1), all integers big-endian:

    magic    8 bytes  b"\\x89VNCREC\\n"   (high bit and newline catch text-mode mangling, as PNG's)
    version  u16      1
    hlen     u32      length of the header
    header   hlen     JSON object: width, height, pixel_format (32 hex digits: the 16-byte
                      PIXEL_FORMAT of ServerInit, RFC 6143 §7.4), name (desktop name),
                      started (Unix time), compression ("zstd")
    body     one zstd stream (frames are flushed as blocks) of records:
             kind u8 (0x53 "S": server→client bytes, 0x43 "C": client→server bytes),
             t    u32 milliseconds since the recorder opened (monotonic clock),
             len  u32, then len bytes.

Cost in the session: a zstd level-1 compressor call and a SHA-256 update per
chunk (level 1: raw pixels with runs shrink to ~5%, already-compressed Tight/ZRLE
data passes at memory speed; level 3 halved the throughput on incompressible
data here for no gain on it).

Crash safety without holding the session: records go into the compressor, whose
output goes to a 64 KiB buffered file; the compressor is flushed to a block
boundary every second (checked on each record: one clock read) and at close, so a
crash loses at most the last second — the reader returns every whole record
before the cut and says the file was truncated.  The SHA-256 of the bytes written
is kept as they are written; ``close`` returns it for the session end event (the
audit's hash chain then covers the recording).  What to record is the engine's
call: it passes key events only when the listener records input.  Sans-IO apart
from the file; no trio.
"""

from __future__ import annotations

import hashlib
import os
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import zstandard

MAGIC = b"\x89VNCREC\n"
VERSION = 1
SERVER, CLIENT = 0x53, 0x43  # "S", "C"
_REC = struct.Struct(">BII")
FLUSH_SECONDS = 1.0


class DesktopRecorder:
    """Writes one desktop recording; ``server``/``client`` take the bytes of each direction."""

    def __init__(self, path: str, *, width: int, height: int, pixel_format: bytes, name: str,
                 level: int = 1, now: float | None = None) -> None:
        if len(pixel_format) != 16:
            raise ValueError(f"pixel_format is the 16-byte PIXEL_FORMAT, got {len(pixel_format)} bytes")
        self.path = path
        self.started = time.monotonic()
        self.sha256 = hashlib.sha256()
        self.size = 0
        self._digest: str | None = None
        self._last_flush = self.started
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._file: Any = os.fdopen(fd, "wb", buffering=64 * 1024)
        header = orjson.dumps({"width": width, "height": height, "pixel_format": bytes(pixel_format).hex(),
                               "name": name, "started": round(now if now is not None else time.time(), 3),
                               "compression": "zstd"})
        self._write(MAGIC + struct.pack(">HI", VERSION, len(header)) + header)
        self._z = zstandard.ZstdCompressor(level=level).compressobj()
        self._file.flush()  # the header is on disk at once: even an empty session leaves a readable file

    def _write(self, data: bytes) -> None:
        if data:
            self.sha256.update(data)
            self.size += len(data)
            self._file.write(data)

    def _record(self, kind: int, data: bytes | bytearray | memoryview) -> None:
        if self._file is None or not data:
            return
        now = time.monotonic()
        ms = min(round((now - self.started) * 1000), 0xFFFFFFFF)
        self._write(self._z.compress(_REC.pack(kind, ms, len(data))))
        self._write(self._z.compress(data))
        if now - self._last_flush >= FLUSH_SECONDS:
            self.flush()

    def server(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes the server sent to the client (after ServerInit)."""
        self._record(SERVER, data)

    def client(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes the client sent that the proxy forwarded (whole client messages)."""
        self._record(CLIENT, data)

    def flush(self) -> None:
        """End the current zstd block and hand the bytes to the OS (a crash after this keeps them)."""
        if self._file is None:
            return
        self._write(self._z.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK))
        self._file.flush()
        self._last_flush = time.monotonic()

    def close(self) -> str:
        """Finish the stream, close the file; returns the SHA-256 (hex) of the file's bytes.  Idempotent."""
        if self._file is not None:
            self._write(self._z.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH))
            self._file.close()
            self._file = None
            self._digest = self.sha256.hexdigest()
        assert self._digest is not None
        return self._digest

    def fields(self) -> dict:
        """What the audit records about the file (as the terminal recorder's ``close`` returns)."""
        return {"recording": os.path.basename(self.path), "recording_bytes": self.size,
                "recording_sha256": self.close()}


@dataclass
class Recording:
    """A read recording: the header and its records ``(seconds, "s" | "c", bytes)``."""

    header: dict
    events: list[tuple[float, str, bytes]] = field(default_factory=list)
    truncated: bool = False  # the file ended inside the stream (crash, or still being written)

    @property
    def width(self) -> int:
        return int(self.header["width"])

    @property
    def height(self) -> int:
        return int(self.header["height"])

    @property
    def pixel_format(self) -> bytes:
        return bytes.fromhex(self.header["pixel_format"])

    @property
    def duration(self) -> float:
        return self.events[-1][0] if self.events else 0.0


def is_recording(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def read_recording(path: str) -> Recording:
    """Read a desktop recording; a clear ValueError for a file that is not one.  A truncated file
    yields its whole records and ``truncated=True``."""
    with open(path, "rb") as f:
        blob = f.read()
    return parse_recording(blob, name=path)


def parse_recording(blob: bytes, *, name: str = "recording") -> Recording:
    if blob[:len(MAGIC)] != MAGIC:
        raise ValueError(f"{name}: not a desktop recording (no {MAGIC!r} magic)")
    if len(blob) < len(MAGIC) + 6:
        raise ValueError(f"{name}: truncated in the header")
    version, hlen = struct.unpack_from(">HI", blob, len(MAGIC))
    if version != VERSION:
        raise ValueError(f"{name}: desktop recording version {version}, this dbproxy reads version {VERSION}")
    start = len(MAGIC) + 6
    if len(blob) < start + hlen:
        raise ValueError(f"{name}: truncated in the header")
    try:
        header = orjson.loads(blob[start:start + hlen])
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"{name}: the header is not JSON ({exc})") from None
    for key in ("width", "height", "pixel_format"):
        if key not in header:
            raise ValueError(f"{name}: the header lacks {key!r}")
    if header.get("compression", "zstd") != "zstd":
        raise ValueError(f"{name}: unknown compression {header.get('compression')!r}")
    body = blob[start + hlen:]
    rec = Recording(header)
    d = zstandard.ZstdDecompressor().decompressobj()
    try:
        plain = d.decompress(body)
        rec.truncated = not d.eof
    except zstandard.ZstdError:
        # A cut inside a block: decode the prefix up to the last whole block we can.
        plain, rec.truncated = _salvage(body), True
    rec.events, partial = list(_records(plain)), _leftover(plain)
    rec.truncated = rec.truncated or partial
    return rec


def _salvage(body: bytes) -> bytes:
    """Decompress as much of a damaged zstd stream as decodes, feeding it in slices."""
    d = zstandard.ZstdDecompressor().decompressobj()
    out = bytearray()
    step = 4096
    for i in range(0, len(body), step):
        try:
            out += d.decompress(body[i:i + step])
        except zstandard.ZstdError:
            break
    return bytes(out)


def _records(plain: bytes) -> Iterator[tuple[float, str, bytes]]:
    off = 0
    n = len(plain)
    while off + _REC.size <= n:
        kind, ms, length = _REC.unpack_from(plain, off)
        if off + _REC.size + length > n:
            return
        if kind not in (SERVER, CLIENT):
            raise ValueError(f"recording record at byte {off} of the stream has unknown kind {kind:#x}")
        body = plain[off + _REC.size:off + _REC.size + length]
        yield ms / 1000.0, "s" if kind == SERVER else "c", body
        off += _REC.size + length


def _leftover(plain: bytes) -> bool:
    """True when the stream ends inside a record."""
    off = 0
    n = len(plain)
    while off + _REC.size <= n:
        _, _, length = _REC.unpack_from(plain, off)
        off += _REC.size + length
    return off != n
