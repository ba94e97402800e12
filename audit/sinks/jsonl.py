"""JSON-lines file sink: append-only, rotated by size and/or age, optional gzip, fsync policy.

Each batch is serialised with orjson and appended with one ``write`` in a
worker thread, so a slow disk stalls only the drain task, never the trio
loop the sessions run on.

* ``fsync``: ``always`` (fdatasync after every batch: a written event
  survives power loss), ``interval`` (the sink's task syncs every
  ``fsync_interval_seconds`` when something was written), ``never`` (the OS
  decides).
* Rotation is checked before each write: when the file has reached
  ``rotate_bytes`` or is older than ``rotate_seconds`` it is renamed to
  ``<path>.<UTC timestamp>`` and a new file is started, so the current file
  always ends with the newest event (the recorder reads the chain's last
  link from there after a restart).  With ``gzip`` the rotated file is
  compressed by the sink's task to ``….gz`` (written aside, then renamed, so
  a crash never leaves a half file under the final name).
* A line cut short by a crash is truncated on open (it never held a whole
  event) and logged; the chain resumes from the last whole line.
"""

from __future__ import annotations

import datetime as _dt
import glob
import gzip
import logging
import os
import shutil
import threading
import time
from typing import Any

import orjson
import trio

from dbproxy.audit.events import PROXY_STOP

log = logging.getLogger("dbproxy.audit.jsonl")

FSYNC_POLICIES = ("always", "interval", "never")


def _stamp() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")


def previous_run(sinks: Any) -> dict:
    """``previous_stopped_cleanly`` for a ``proxy.start`` event: whether the trail's last event
    (in the first JSONL sink of the configured ``sinks``) is a ``proxy.stop``; {} when unknown
    (no JSONL sink, an empty or unreadable trail)."""
    for sink in sinks:
        if sink.type == "jsonl" and sink.path:
            try:
                last = last_event_of(sink.path)
            except OSError:
                return {}
            return {} if last is None else {"previous_stopped_cleanly": last.get("event") == PROXY_STOP}
    return {}


def last_event_of(path: str) -> dict | None:
    """The last whole JSON line of a JSONL file (plain or .gz), or None."""
    if path.endswith(".gz"):
        last = None
        with gzip.open(path, "rb") as f:
            for line in f:
                if line.endswith(b"\n") and line.strip():
                    last = line
        return _parse(last)
    try:
        with open(path, "rb") as f:
            end = f.seek(0, os.SEEK_END)
            size = 64 * 1024
            while True:
                start = max(0, end - size)
                f.seek(start)
                lines = f.read(end - start).split(b"\n")
                # The part after the last newline is empty or torn; the first part may be cut by *start*.
                for line in reversed(lines[1:-1] if start > 0 else lines[:-1]):
                    event = _parse(line)
                    if event is not None:
                        return event
                if start == 0:
                    return None
                size *= 4
    except FileNotFoundError:
        return None


def _parse(line: bytes | None) -> dict | None:
    if not line or not line.strip():
        return None
    try:
        event = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    return event if isinstance(event, dict) else None


class JsonlSink:
    kind = "jsonl"

    def __init__(
        self,
        *,
        path: str,
        name: str = "jsonl",
        fsync: str = "interval",
        fsync_interval_seconds: float = 1.0,
        rotate_bytes: int | None = None,
        rotate_seconds: float | None = None,
        gzip: bool = False,
    ) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync must be one of {FSYNC_POLICIES}")
        self.name = name
        self.path = path
        self.fsync = fsync
        self.fsync_interval = fsync_interval_seconds
        self.rotate_bytes = rotate_bytes
        self.rotate_seconds = rotate_seconds
        self.gzip = gzip
        self.rotations = 0
        self._dirty = False
        self._lock = threading.Lock()  # the write thread and the fsync thread share the file
        # Write batches from a worker thread (the proxy's own loop must never wait on a disk);
        # the audit worker process sets False.
        self.write_in_thread = True
        self._wake = trio.Event()
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        self._repair_torn_tail()
        self._file = open(path, "ab", buffering=0)
        self._size = self._file.tell()
        self._opened_at = self._birth_time()

    # -- opening ---------------------------------------------------------------------
    def _repair_torn_tail(self) -> None:
        try:
            with open(self.path, "r+b") as f:
                end = f.seek(0, os.SEEK_END)
                if end == 0:
                    return
                pos = end
                while pos > 0:
                    step = min(64 * 1024, pos)
                    f.seek(pos - step)
                    chunk = f.read(step)
                    nl = chunk.rfind(b"\n")
                    if nl >= 0:
                        keep = pos - step + nl + 1
                        break
                    pos -= step
                else:
                    keep = 0
                if keep < end:
                    log.warning("audit file %s: truncating a torn last line (%d bytes) left by a crash", self.path, end - keep)
                    f.truncate(keep)
                    os.fsync(f.fileno())
        except FileNotFoundError:
            pass

    def _birth_time(self) -> float:
        # The first event's time would be exact, but mtime of an empty file is close enough for age rotation.
        if self._size == 0:
            return time.time()
        first = None
        with open(self.path, "rb") as f:
            first = _parse(f.readline())
        try:
            return _dt.datetime.fromisoformat(first["time"].replace("Z", "+00:00")).timestamp()
        except (TypeError, KeyError, ValueError, AttributeError):
            return os.stat(self.path).st_mtime

    # -- the recorder's interface ------------------------------------------------------
    def rotated_files(self) -> list[str]:
        return sorted(p for p in glob.glob(glob.escape(self.path) + ".*") if not p.endswith(".tmp"))

    def recover_tail(self) -> tuple[int, str] | None:
        event = last_event_of(self.path)
        if event is None:
            for path in reversed(self.rotated_files()):
                event = last_event_of(path)
                if event is not None:
                    break
        if event is None or not isinstance(event.get("seq"), int) or not isinstance(event.get("hash"), str):
            return None
        return event["seq"], event["hash"]

    def _due(self) -> bool:
        if self._size == 0:
            return False
        if self.rotate_bytes is not None and self._size >= self.rotate_bytes:
            return True
        return self.rotate_seconds is not None and time.time() - self._opened_at >= self.rotate_seconds

    def _rotate(self) -> str:
        self._sync()
        self._file.close()
        target = f"{self.path}.{_stamp()}"
        os.rename(self.path, target)
        self._file = open(self.path, "ab", buffering=0)
        self._size = 0
        self._opened_at = time.time()
        self.rotations += 1
        log.info("audit file %s rotated to %s", self.path, target)
        return target

    def _write(self, data: bytes) -> str | None:
        with self._lock:
            rotated = self._rotate() if self._due() else None
            self._file.write(data)
            self._size += len(data)
            if self.fsync == "always":
                os.fdatasync(self._file.fileno())
            else:
                self._dirty = True
            return rotated

    def _sync(self) -> None:
        if self._dirty and not self._file.closed:
            self._dirty = False
            os.fdatasync(self._file.fileno())

    def _locked_sync(self) -> None:
        with self._lock:
            self._sync()

    async def write_batch(self, batch: list[dict]) -> None:
        lines = getattr(batch, "lines", None)  # serialised once by the recorder's stamp
        data = b"".join(lines) if lines is not None else b"".join(orjson.dumps(e) + b"\n" for e in batch)
        if self.write_in_thread or self.fsync == "always":
            rotated = await trio.to_thread.run_sync(self._write, data)
        else:
            # In the audit worker a slow disk only delays the worker (the proxy's link
            # absorbs it, then pushes back): the page-cache write is done right here.
            rotated = self._write(data)
        if rotated and self.gzip:
            self._wake.set()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """fsync every interval (policy ``interval``) and gzip rotated files, off the drain task."""
        task_status.started()
        if self.gzip:
            await trio.to_thread.run_sync(self._compress_pending)
        while True:
            with trio.move_on_after(self.fsync_interval if self.fsync == "interval" else 3600):
                await self._wake.wait()
            self._wake = trio.Event()
            try:
                if self.fsync == "interval":
                    await trio.to_thread.run_sync(self._locked_sync)
                if self.gzip:
                    await trio.to_thread.run_sync(self._compress_pending)
            except OSError:
                log.exception("audit file %s: fsync/compression failed", self.path)

    def _compress_pending(self) -> None:
        for path in self.rotated_files():
            if path.endswith(".gz"):
                continue
            tmp = path + ".gz.tmp"
            with open(path, "rb") as src, gzip.open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1024 * 1024)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path + ".gz")
            os.unlink(path)

    async def aclose(self) -> None:
        def close() -> None:
            with self._lock:
                if self.fsync != "never":
                    self._sync()
                self._file.close()
            if self.gzip:
                # A clean shutdown leaves every rotated file compressed, even if the
                # background compressor was cancelled before it got to the last one.
                self._compress_pending()

        await trio.to_thread.run_sync(close)
