"""The disk spool every network sink writes through: a bounded, ordered, crash-safe queue.

Strategy (a write-ahead log in the Kafka/journald shape, kept small):

* Records go to append-only **segment files** ``seg-<n>.spool`` in one
  directory.  A record is a 48-byte header — payload length (u32), CRC-32C
  (u32) over the rest, the event's ``seq`` (u64) and ``hash`` (32 raw bytes)
  — then the payload: the exact bytes the sink will put on the wire for that
  event.  Each ``append`` is one ``write`` plus ``fdatasync`` (outside the
  lock, so reads and commits do not wait for the disk): once
  ``write_batch`` returns, the batch survives SIGKILL and power loss.
* The **cursor** (``cursor.json``: segment, offset) marks everything before
  it as delivered.  The sender reads from the cursor, delivers, then
  ``commit``s the end position; the cursor file is replaced atomically
  (write, fsync, rename, fsync dir).  Segments wholly behind the cursor are
  deleted.  A crash between delivery and commit re-sends that one batch on
  restart — the only at-least-once window.
* On open, the newest segment is scanned and a torn tail (a record cut by a
  crash mid-write) is truncated; records are counted from the cursor.
* **Bounded**: undelivered bytes never exceed ``max_bytes`` (disk use is at
  most ``max_bytes`` plus one segment).  Two ways to handle a full spool,
  chosen by the sink: ``append_fitting`` (fail-closed — append the longest
  prefix that fits, the caller keeps the rest) and ``append_dropping``
  (drop-oldest — advance the cursor past the oldest records to make room and
  report what was dropped).
* The newest segment is never deleted, so its last record always tells the
  recorder where the hash chain stands after a restart (``tail``).
* One process at a time: ``lock`` is held with ``flock`` for the spool's life.

All methods are synchronous and serialised by a lock; sinks call them through
``trio.to_thread.run_sync`` so the disk never stalls the event loop.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
import threading
from typing import Any, Iterator

import attrs
import crc32c
import orjson

log = logging.getLogger("dbproxy.audit.spool")

HEADER = struct.Struct(">IIQ32s")  # length, crc32c(seq..payload), seq, hash
PREFIX = "seg-"
SUFFIX = ".spool"
CURSOR = "cursor.json"
LOCK = "lock"
MAX_RECORD = 64 * 1024 * 1024


class SpoolError(Exception):
    """The spool directory cannot be used (locked by another process, unreadable)."""


@attrs.frozen(order=True)
class Position:
    segment: int
    offset: int


@attrs.frozen
class Dropped:
    count: int
    first_seq: int
    last_seq: int


@attrs.frozen
class SpoolStatistics:
    pending_events: int
    pending_bytes: int
    max_bytes: int
    segments: int
    dropped: int


def _seg_name(n: int) -> str:
    return f"{PREFIX}{n:016d}{SUFFIX}"


def encode_record(seq: int, hash_hex: str, payload: bytes) -> bytes:
    digest = bytes.fromhex(hash_hex) if hash_hex else b"\0" * 32
    body = struct.pack(">Q32s", seq, digest) + payload
    return struct.pack(">II", len(payload), crc32c.crc32c(body)) + body


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    def __init__(self, directory: str, *, max_bytes: int, segment_bytes: int | None = None) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes or max(64 * 1024, min(16 * 1024 * 1024, max_bytes // 8))
        self.dropped = 0
        self._lock = threading.Lock()
        self._cursor_lock = threading.Lock()  # the cursor file's writers (commit writes it outside _lock)
        os.makedirs(directory, exist_ok=True)
        self._lock_fd = os.open(os.path.join(directory, LOCK), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._lock_fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise SpoolError(f"spool {directory} is in use by another process or sink") from None
            raise
        self._sizes: dict[int, int] = {}
        self._counts: dict[int, int] = {}  # undelivered records per segment (from the cursor on)
        self._tail: tuple[int, str] | None = None
        self._append_file = None
        self._open()

    # -- opening and recovery ------------------------------------------------
    def _open(self) -> None:
        segments = sorted(
            int(name[len(PREFIX) : -len(SUFFIX)])
            for name in os.listdir(self.directory)
            if name.startswith(PREFIX) and name.endswith(SUFFIX) and name[len(PREFIX) : -len(SUFFIX)].isdigit()
        )
        cursor = self._read_cursor()
        if not segments:
            segments = [cursor.segment if cursor else 0]
            open(self._path(segments[0]), "ab").close()
            _fsync_dir(self.directory)
        if cursor is None or cursor.segment < segments[0]:
            cursor = Position(segments[0], 0)
        for n in segments:
            if n < cursor.segment:
                os.unlink(self._path(n))  # delivered; the unlink after the last commit did not happen
        segments = [n for n in segments if n >= cursor.segment] or [cursor.segment]
        for n in segments:
            start = cursor.offset if n == cursor.segment else 0
            size, count, last = self._scan(n, start, truncate=(n == segments[-1]))
            self._sizes[n] = size
            self._counts[n] = count
            if last is not None:
                self._tail = last
        self.cursor = Position(cursor.segment, min(cursor.offset, self._sizes[cursor.segment]))
        self._append_file = open(self._path(segments[-1]), "ab", buffering=0)
        if self.pending_events:
            log.info("spool %s: %d undelivered events (%d bytes) to replay", self.directory, self.pending_events, self.pending_bytes)

    def _scan(self, n: int, start: int, *, truncate: bool) -> tuple[int, int, tuple[int, str] | None]:
        """Walk the records of segment *n*: (valid size, records from *start* on, last (seq, hash))."""
        path = self._path(n)
        with open(path, "rb") as f:
            data = f.read()
        pos = 0
        count = 0
        last = None
        while pos + HEADER.size <= len(data):
            length, crc, seq, digest = HEADER.unpack_from(data, pos)
            end = pos + HEADER.size + length
            if length > MAX_RECORD or end > len(data) or crc32c.crc32c(data[pos + 8 : end]) != crc:
                break
            if pos >= start:
                count += 1
            last = (seq, digest.hex())
            pos = end
        if truncate and pos < len(data):
            log.warning("spool %s: truncating %d bytes of a torn record at the end of %s", self.directory, len(data) - pos, path)
            with open(path, "r+b") as f:
                f.truncate(pos)
                os.fsync(f.fileno())
        return pos, count, last

    def _read_cursor(self) -> Position | None:
        try:
            with open(os.path.join(self.directory, CURSOR), "rb") as f:
                doc = orjson.loads(f.read())
            return Position(int(doc["segment"]), int(doc["offset"]))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            raise SpoolError(f"spool {self.directory}: unreadable {CURSOR}: {exc}") from None

    def _path(self, n: int) -> str:
        return os.path.join(self.directory, _seg_name(n))

    # -- sizes -----------------------------------------------------------------
    @property
    def pending_bytes(self) -> int:
        return sum(self._sizes.values()) - self.cursor.offset

    @property
    def pending_events(self) -> int:
        return sum(self._counts.values())

    def statistics(self) -> SpoolStatistics:
        with self._lock:
            return SpoolStatistics(self.pending_events, self.pending_bytes, self.max_bytes, len(self._sizes), self.dropped)

    def tail(self) -> tuple[int, str] | None:
        """(seq, hash) of the newest record ever appended (delivered or not), if any."""
        with self._lock:
            return self._tail

    # -- appending -------------------------------------------------------------
    def _write(self, records: list[tuple[int, str, bytes]]) -> None:
        """Append *records* (seq, hash, payload) to the newest segment, rolling to a new one when it is full."""
        last = max(self._sizes)
        if self._sizes[last] >= self.segment_bytes:
            last += 1
            os.fdatasync(self._append_file.fileno())  # the caller syncs only the newest segment
            self._append_file.close()
            self._append_file = open(self._path(last), "ab", buffering=0)
            _fsync_dir(self.directory)
            self._sizes[last] = 0
            self._counts[last] = 0
        data = b"".join(encode_record(seq, h, payload) for seq, h, payload in records)
        # Not synced here: the caller fdatasyncs after releasing the lock, so the sender's reads
        # and commits do not queue behind the disk (only the drain task appends, one batch at a
        # time, and it returns only after the sync).
        self._append_file.write(data)
        self._sizes[last] += len(data)
        self._counts[last] += len(records)
        seq, h, _ = records[-1]
        self._tail = (seq, h)

    @staticmethod
    def record_size(payload: bytes) -> int:
        return HEADER.size + len(payload)

    def append_fitting(self, records: list[tuple[int, str, bytes]]) -> int:
        """Append the longest prefix of *records* that fits under ``max_bytes``; return how many."""
        with self._lock:
            room = self.max_bytes - self.pending_bytes
            n = 0
            for _, _, payload in records:
                size = self.record_size(payload)
                if size > room:
                    break
                room -= size
                n += 1
            if n:
                self._write(records[:n])
            f = self._append_file
        if n:
            os.fdatasync(f.fileno())
        return n

    def append_dropping(self, records: list[tuple[int, str, bytes]]) -> Dropped | None:
        """Append all of *records*, first dropping the oldest undelivered ones as needed to stay bounded."""
        with self._lock:
            need = sum(self.record_size(p) for _, _, p in records)
            dropped_first = dropped_last = None
            count = 0
            # A batch larger than the whole spool keeps only its newest records.
            while records and need > self.max_bytes:
                seq, _, payload = records[0]
                need -= self.record_size(payload)
                records = records[1:]
                dropped_first = seq if dropped_first is None else dropped_first
                dropped_last = seq
                count += 1
            excess = self.pending_bytes + need - self.max_bytes
            if excess > 0:
                n, first, last_seq = self._drop_head(excess)
                if n:
                    count += n
                    dropped_first = first if dropped_first is None else min(first, dropped_first)
                    dropped_last = last_seq if dropped_last is None else max(last_seq, dropped_last)
            if records:
                self._write(records)
            f = self._append_file
            if count:
                self.dropped += count
        if records:
            os.fdatasync(f.fileno())
        return Dropped(count, dropped_first, dropped_last) if count else None

    def make_room(self, nbytes: int) -> Dropped | None:
        """Drop the oldest undelivered records until *nbytes* more fit (drop-oldest)."""
        with self._lock:
            excess = self.pending_bytes + nbytes - self.max_bytes
            if excess <= 0:
                return None
            n, first, last = self._drop_head(excess)
            if not n:
                return None
            self.dropped += n
            return Dropped(n, first, last)

    def _drop_head(self, nbytes: int) -> tuple[int, int, int]:
        """Advance the cursor over at least *nbytes* of the oldest records (caller holds the lock)."""
        dropped = freed = first = last = 0
        pos = self.cursor
        if nbytes > 0:
            for _, length, seq, pos in self._records(pos):
                freed += HEADER.size + length
                self._counts[pos.segment] -= 1
                first = seq if dropped == 0 else first
                last = seq
                dropped += 1
                if freed >= nbytes:
                    break
        if dropped:
            self._set_cursor(pos)
        return dropped, first, last

    # -- reading and committing ----------------------------------------------
    def _next_segment(self, n: int) -> int | None:
        later = [m for m in self._sizes if m > n]
        return min(later) if later else None

    def _records(self, pos: Position) -> Iterator[tuple[Any, int, int, Position]]:
        """The records from *pos* on, oldest first, across segments (caller holds the lock):
        (the segment file, positioned at the payload; payload length; seq; position after it).
        The one walk ``read`` and ``_drop_head`` share; a caller may read the payload or not."""
        while True:
            size = self._sizes.get(pos.segment, 0)
            if pos.offset >= size:
                nxt = self._next_segment(pos.segment)
                if nxt is None:
                    return
                pos = Position(nxt, 0)
                continue
            with open(self._path(pos.segment), "rb") as f:
                f.seek(pos.offset)
                while pos.offset < size:
                    length, _, seq, _ = HEADER.unpack(f.read(HEADER.size))
                    pos = Position(pos.segment, pos.offset + HEADER.size + length)
                    yield f, length, seq, pos
                    f.seek(pos.offset)

    def read(self, max_events: int, max_bytes: int, after: Position | None = None) -> list[tuple[int, bytes, Position]]:
        """Undelivered records from the cursor — at least one if any, then up to *max_events* /
        *max_bytes* — as (seq, payload, position after it); ``commit`` takes such a position.
        ``after``: start there instead (a pipelining sender reads past batches still in flight);
        never before the cursor, which drop-oldest may have moved past it.

        One ``read`` call per segment, parsed in memory: this runs in a worker thread, and a
        call per record would give up the GIL a thousand times a batch — each time waiting up
        to the switch interval behind the audit worker's busy event loop."""
        with self._lock:
            out: list[tuple[int, bytes, Position]] = []
            budget = max_bytes
            if max_events <= 0:
                return out
            pos = self.cursor if after is None or after < self.cursor else after
            while len(out) < max_events:
                size = self._sizes.get(pos.segment, 0)
                if pos.offset >= size:
                    nxt = self._next_segment(pos.segment)
                    if nxt is None:
                        break
                    pos = Position(nxt, 0)
                    continue
                with open(self._path(pos.segment), "rb") as f:
                    f.seek(pos.offset)
                    chunk = f.read(min(size - pos.offset, max(budget, 0) + HEADER.size))
                    off = 0
                    full = False
                    while len(out) < max_events and off + HEADER.size <= len(chunk):
                        length, _, seq, _ = HEADER.unpack_from(chunk, off)
                        rec = HEADER.size + length
                        if out and rec > budget:
                            full = True
                            break
                        if off + rec > len(chunk):
                            if out:
                                full = True
                                break
                            # The first record, larger than the budget: read it whole.
                            f.seek(pos.offset + off + HEADER.size)
                            payload = f.read(length)
                        else:
                            payload = chunk[off + HEADER.size : off + rec]
                        off += rec
                        budget -= rec
                        out.append((seq, payload, Position(pos.segment, pos.offset + off)))
                pos = Position(pos.segment, pos.offset + off)
                if full or budget <= 0 or (off == 0 and pos.offset < size):
                    break
            return out

    def commit(self, pos: Position) -> None:
        """Mark everything before *pos* delivered (never moves the cursor backwards).

        The cursor moves in memory under the lock; its file is written and fsync'd outside it
        (under ``_cursor_lock``), so appends and reads do not wait for those two fsyncs; segments
        are deleted only once a persisted cursor is past them."""
        with self._lock:
            if pos <= self.cursor:
                return  # drop_oldest already moved past it
            cur = self.cursor
            while True:
                end = pos.offset if cur.segment == pos.segment else self._sizes[cur.segment]
                self._counts[cur.segment] -= self._count_between(cur.segment, cur.offset, end)
                nxt = self._next_segment(cur.segment)
                if cur.segment >= pos.segment or nxt is None:
                    break
                cur = Position(nxt, 0)
            self.cursor = self._skip_delivered(pos)
        with self._cursor_lock:
            persisted = self.cursor  # the newest in memory (it only grows), perhaps past *pos*
            self._write_cursor(persisted)
        with self._lock:
            self._delete_before(persisted.segment)

    def _count_between(self, n: int, start: int, end: int) -> int:
        if end <= start:
            return 0
        with open(self._path(n), "rb") as f:
            f.seek(start)
            data = f.read(end - start)
        count = off = 0
        while off + HEADER.size <= len(data):
            (length,) = struct.unpack_from(">I", data, off)
            off += HEADER.size + length
            count += 1
        return count

    def _skip_delivered(self, pos: Position) -> Position:
        newest = max(self._sizes)
        # A fully delivered segment that is not the newest is done with.
        while pos.segment < newest and pos.offset >= self._sizes[pos.segment]:
            pos = Position(self._next_segment(pos.segment), 0)
        return pos

    def _write_cursor(self, pos: Position) -> None:
        """Replace the cursor file atomically (caller holds ``_cursor_lock``)."""
        tmp = os.path.join(self.directory, CURSOR + ".tmp")
        with open(tmp, "wb") as f:
            f.write(orjson.dumps({"segment": pos.segment, "offset": pos.offset}))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(self.directory, CURSOR))
        _fsync_dir(self.directory)

    def _delete_before(self, segment: int) -> None:
        """Delete the segments wholly behind a persisted cursor (caller holds the lock)."""
        for n in [n for n in self._sizes if n < segment]:
            try:
                os.unlink(self._path(n))
            except FileNotFoundError:
                pass
            del self._sizes[n]
            del self._counts[n]

    def _set_cursor(self, pos: Position) -> None:
        """Move and persist the cursor at once (caller holds the lock: drop-oldest)."""
        pos = self._skip_delivered(pos)
        self.cursor = max(pos, self.cursor)
        with self._cursor_lock:
            self._write_cursor(self.cursor)
        self._delete_before(self.cursor.segment)

    def close(self) -> None:
        with self._lock:
            if self._append_file is not None:
                self._append_file.close()
                self._append_file = None
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None
