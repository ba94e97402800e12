"""Terminal recordings in asciicast v2 (what ``asciinema play`` / ``asciinema cat`` read).

Strategy: one file per pty channel, ``<dir>/<session id>-<channel>.cast``: a
JSON header line (``version`` 2, ``width``, ``height``, ``timestamp``,
``env.TERM``), then one JSON array per event — ``[seconds, "o", text]`` for
what the target sent to the terminal, ``[seconds, "r", "WxH"]`` for a resize
(asciicast v2, https://docs.asciinema.org/manual/asciicast/v2/).  Output is
decoded with an incremental UTF-8 decoder, so a character split across SSH
packets is not mangled.  Only the target's output is recorded: what the
client types (passwords at prompts included) never is.

The SHA-256 of the bytes written is kept as they are written; the engine
puts it, with the file name, into ``ssh.channel.end`` and the session's end
event, so the audit's hash chain covers the recording.  Writes go through a
buffered file (to the page cache, flushed at close): no sync I/O per packet
beyond a memcpy.  Sans-IO apart from that file; no trio.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import time
from typing import Any

import orjson


class AsciicastWriter:
    def __init__(self, path: str, width: int, height: int, term: str | None, *, now: float | None = None) -> None:
        self.path = path
        self.started = time.monotonic()
        self.sha256 = hashlib.sha256()
        self.size = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._file: Any = os.fdopen(fd, "wb", buffering=64 * 1024)
        header: dict = {"version": 2, "width": width or 80, "height": height or 24,
                        "timestamp": int(now if now is not None else time.time())}
        if term:
            header["env"] = {"TERM": term}
        self._write(header)

    def _write(self, obj: Any) -> None:
        line = orjson.dumps(obj) + b"\n"
        self.sha256.update(line)
        self.size += len(line)
        self._file.write(line)

    def _elapsed(self) -> float:
        return round(time.monotonic() - self.started, 6)

    def output(self, data: bytes) -> None:
        text = self._decoder.decode(data)
        if text:
            self._write([self._elapsed(), "o", text])

    def resize(self, width: int, height: int) -> None:
        self._write([self._elapsed(), "r", f"{width}x{height}"])

    def close(self) -> dict:
        """Flush and close; returns the fields the audit records (file, size, SHA-256)."""
        if self._file is not None:
            tail = self._decoder.decode(b"", final=True)
            if tail:
                self._write([self._elapsed(), "o", tail])
            self._file.close()
            self._file = None
        return {"recording": os.path.basename(self.path), "recording_bytes": self.size,
                "recording_sha256": self.sha256.hexdigest()}
