"""Terminal recordings in asciicast v2 (what ``asciinema play`` / ``asciinema cat`` read).

Strategy: one file per terminal (pty channel): a JSON header line
(``version`` 2, ``width``, ``height``, ``timestamp``, ``env.TERM``), then one
JSON array per event — ``[seconds, "o", text]`` for what the target sent to
the terminal, ``[seconds, "r", "WxH"]`` for a resize (asciicast v2,
https://docs.asciinema.org/manual/asciicast/v2/).  Output is decoded with an
incremental UTF-8 decoder, so a character split across packets is not mangled.

Input (what the client typed) is never in the output recording.  When an
engine's listener turns input recording on, a second file holds it as
``[seconds, "i", text]`` events (same header, same clock as the output file,
so the two can be merged by time); the engine only hands it keystrokes the
observer (``observer.py``) saw echoed — a line typed while the terminal did
not echo (a password prompt) never reaches it.

The SHA-256 of the bytes written is kept as they are written; the engine
puts it, with the file name, into its channel/session end events so the
audit's hash chain covers the recording.  Writes go through a buffered file
(to the page cache, flushed at close): no sync I/O per packet beyond a
memcpy.  Sans-IO apart from that file; no trio.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import time
from typing import Any

import orjson


class AsciicastWriter:
    """One asciicast v2 file; ``kind`` is the event code of :meth:`output` (``"o"``, or ``"i"`` for input)."""

    def __init__(self, path: str, width: int, height: int, term: str | None, *, now: float | None = None,
                 started: float | None = None, kind: str = "o") -> None:
        self.path = path
        self.kind = kind
        self.started = started if started is not None else time.monotonic()
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

    def elapsed(self) -> float:
        return round(time.monotonic() - self.started, 6)

    def output(self, data: bytes) -> None:
        text = self._decoder.decode(data)
        if text:
            self._write([self.elapsed(), self.kind, text])

    def resize(self, width: int, height: int) -> None:
        self._write([self.elapsed(), "r", f"{width}x{height}"])

    def close(self) -> dict:
        """Flush and close; returns the fields the audit records (file, size, SHA-256)."""
        if self._file is not None:
            tail = self._decoder.decode(b"", final=True)
            if tail:
                self._write([self.elapsed(), self.kind, tail])
            self._file.close()
            self._file = None
        return {"recording": os.path.basename(self.path), "recording_bytes": self.size,
                "recording_sha256": self.sha256.hexdigest()}


def read_cast(path: str) -> tuple[dict, list[tuple[float, str, str]]]:
    """(header, events) of an asciicast v2 file; a clear ValueError for anything else."""
    with open(path, "rb") as f:
        lines = f.read().splitlines()
    if not lines:
        raise ValueError(f"{path}: empty file, not an asciicast")
    try:
        header = orjson.loads(lines[0])
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"{path}: line 1: not JSON ({exc})") from None
    if not isinstance(header, dict) or header.get("version") != 2:
        raise ValueError(f"{path}: line 1: not an asciicast v2 header (expected {{\"version\": 2, ...}})")
    events = []
    for n, raw in enumerate(lines[1:], start=2):
        if not raw.strip():
            continue
        try:
            ev = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"{path}: line {n}: not JSON ({exc})") from None
        if not (isinstance(ev, list) and len(ev) == 3 and isinstance(ev[0], (int, float))
                and isinstance(ev[1], str) and isinstance(ev[2], str)):
            raise ValueError(f"{path}: line {n}: expected [seconds, code, data]")
        events.append((float(ev[0]), ev[1], ev[2]))
    return header, events
