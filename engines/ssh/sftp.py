"""SFTP audit: an observer of the sftp subsystem's packets, per file (sans-IO, no trio).

Strategy.  SFTP (draft-ietf-secsh-filexfer-02, the version OpenSSH speaks,
§3) frames every packet as ``uint32 length`` + ``byte type`` + body; the
frame loop is the core's ``LengthPrefixed``.  The observer reads both
directions of a relayed ``sftp`` channel and never changes a byte:

- client → server, *before* the bytes are forwarded: ``OPEN`` (§6.3: path,
  pflags) → ``ssh.sftp`` operation ``open``; ``REMOVE``, ``RENAME``,
  ``MKDIR``, ``RMDIR``, ``SETSTAT``, ``SYMLINK`` (§6.5, §6.6, §6.9) →
  ``ssh.sftp`` with their paths; ``WRITE`` data (§6.4) is counted and hashed
  per handle;
- server → client: ``HANDLE`` ties an open's request id to its handle,
  ``DATA`` answers a ``READ`` (counted and hashed per handle), ``STATUS``
  tells whether an open failed;
- ``CLOSE`` (§6.3) of a file handle → ``ssh.sftp.file``: path, mode, bytes
  written / read and the SHA-256 of those bytes.  The hash is over the
  transfer in offset order; a transfer that is not sequential (a seek, a
  resumed upload) is reported with ``sequential: false`` and no hash.

A packet that cannot be parsed raises ``ProtocolError``: the engine then
closes the channel without forwarding it ("nothing unaudited").

The bulk of a transfer passes without being buffered: a ``DATA`` or
``WRITE`` packet is held only up to its header (13 bytes, plus the handle
and offset for ``WRITE``); its payload is then fed to the file's SHA-256
straight from the received chunks as they go by.  Other packets (small:
requests, handles, statuses, names) are held whole until complete.  So what
the observer keeps per direction is at most one header or one small packet,
whatever the size of the transfer.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any, Callable

import attrs

from dbproxy.errors import RemoteProtocolError
from dbproxy.sansio import LengthPrefixed

# OpenSSH's sftp-server refuses packets above 256 KiB (SFTP_MAX_MSG_LENGTH); room for the header.
MAX_PACKET = 256 * 1024 + 1024

INIT, VERSION, OPEN, CLOSE, READ, WRITE = 1, 2, 3, 4, 5, 6
SETSTAT, OPENDIR, REMOVE, MKDIR, RMDIR, RENAME, SYMLINK = 9, 11, 13, 14, 15, 18, 20
STATUS, HANDLE, DATA = 101, 102, 103
PFLAG_READ, PFLAG_WRITE, PFLAG_APPEND, PFLAG_CREAT, PFLAG_TRUNC = 0x1, 0x2, 0x4, 0x8, 0x10

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")

FRAMES = LengthPrefixed(header_size=4, length_format=">I", length_offset=0, extra=4, min_length=1,
                        bad_length=lambda n: RemoteProtocolError(f"SFTP packet length {n}",
                                                                 client_hint="malformed SFTP packet"),
                        what=lambda data, pos: "SFTP packet")


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def u32(self) -> int:
        if self.pos + 4 > len(self.data):
            raise RemoteProtocolError("truncated SFTP packet", client_hint="malformed SFTP packet")
        value = _U32.unpack_from(self.data, self.pos)[0]
        self.pos += 4
        return value

    def u64(self) -> int:
        if self.pos + 8 > len(self.data):
            raise RemoteProtocolError("truncated SFTP packet", client_hint="malformed SFTP packet")
        value = _U64.unpack_from(self.data, self.pos)[0]
        self.pos += 8
        return value

    def string(self) -> bytes:
        n = self.u32()
        if self.pos + n > len(self.data):
            raise RemoteProtocolError("truncated SFTP string", client_hint="malformed SFTP packet")
        value = self.data[self.pos:self.pos + n]
        self.pos += n
        return value

    def text(self) -> str:
        return self.string().decode("utf-8", "replace")


@attrs.define(eq=False)
class _Transfer:
    bytes: int = 0
    next_offset: int = 0
    sequential: bool = True
    sha256: Any = attrs.field(factory=hashlib.sha256)

    def add(self, offset: int, size: int) -> bool:
        """``size`` bytes at ``offset`` are coming; True while they extend a sequential transfer
        (the caller then hashes them)."""
        if offset != self.next_offset:
            self.sequential = False
        self.bytes += size
        self.next_offset = offset + size
        return self.sequential

    def fields(self, prefix: str) -> dict:
        return {f"bytes_{prefix}": self.bytes,
                f"sha256_{prefix}": self.sha256.hexdigest() if self.sequential else None}


@attrs.define(eq=False)
class _File:
    path: str
    mode: str
    written: _Transfer = attrs.field(factory=_Transfer)
    read: _Transfer = attrs.field(factory=_Transfer)


def _mode(pflags: int) -> str:
    r, w = bool(pflags & PFLAG_READ), bool(pflags & (PFLAG_WRITE | PFLAG_APPEND))
    return "read-write" if r and w else "write" if w else "read"


def _truncated() -> int:
    raise RemoteProtocolError("truncated SFTP packet", client_hint="malformed SFTP packet")


class _Direction:
    """One direction's packet reader: small packets whole, one bulk kind (``DATA`` / ``WRITE``) streamed.

    ``head`` holds the packet being read until it is complete, or for the bulk kind until
    ``header(head, size)`` (→ header length, transfer, bytes to hash) knows where the payload starts;
    the rest of that packet (``left`` bytes, of which the first ``hash_left`` are the file's data)
    goes from each chunk to the transfer's SHA-256 without being kept.
    """

    __slots__ = ("bulk", "header", "packet", "head", "want", "left", "hash_left", "transfer")

    def __init__(self, bulk: int, header: Callable, packet: Callable) -> None:
        self.bulk, self.header, self.packet = bulk, header, packet
        self.head = bytearray()
        self.want = 5  # length + type: enough to tell a bulk packet from the rest
        self.left = self.hash_left = 0
        self.transfer: _Transfer | None = None

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        pos, end = 0, len(data)
        head = self.head
        while pos < end:
            if self.left:
                n = min(self.left, end - pos)
                h = min(self.hash_left, n)
                if h:
                    self.transfer.sha256.update(view[pos:pos + h])  # type: ignore[union-attr]
                    self.hash_left -= h
                self.left -= n
                pos += n
                continue
            n = min(self.want - len(head), end - pos)
            head += view[pos:pos + n]
            pos += n
            # The length is checked (too short, too long: raises) as soon as its 4 bytes are in.
            size = FRAMES.size_at(head, 0, len(head), MAX_PACKET)
            if len(head) < self.want:
                continue
            if head[4] != self.bulk:
                if self.want < size:  # the whole packet next
                    self.want = size
                    continue
                self.packet(bytes(head))
            else:
                start, transfer, hashed = self.header(head, size)
                if start > len(head):  # the header is longer than first thought (a WRITE's handle)
                    self.want = start
                    continue
                self.left, self.hash_left, self.transfer = size - start, hashed, transfer
            head.clear()
            self.want = 5


class SftpAudit:
    """Observes one sftp channel; ``emit(kind, **fields)`` writes the audit events."""

    def __init__(self, emit: Callable[..., Any], channel: int) -> None:
        self.emit = emit
        self.channel = channel
        self._up = _Direction(WRITE, self._write_header, self._client_packet)
        self._down = _Direction(DATA, self._data_header, self._server_packet)
        self._opens: dict[int, tuple[str, str]] = {}  # request id -> (path, mode)
        self._reads: dict[int, tuple[bytes, int]] = {}  # request id -> (handle, offset)
        self._files: dict[bytes, _File] = {}

    # -- client → server ----------------------------------------------------------------
    def from_client(self, data: bytes) -> None:
        self._up.feed(data)

    def _write_header(self, head: bytearray, size: int) -> tuple[int, _Transfer | None, int]:
        """A ``WRITE`` (§6.4) up to its data's length: (header length, the file's transfer or None,
        data length); 0 while ``head`` is too short to say."""
        if len(head) < 13:
            return 13 if size >= 13 else _truncated(), None, 0
        end = 13 + _U32.unpack_from(head, 9)[0] + 12
        if end > size:
            raise RemoteProtocolError("truncated SFTP packet", client_hint="malformed SFTP packet")
        if len(head) < end:
            return end, None, 0
        handle = bytes(head[13:end - 12])
        offset, length = _U64.unpack_from(head, end - 12)[0], _U32.unpack_from(head, end - 4)[0]
        f = self._files.get(handle)
        return end, (f.written if f is not None else None), self._bulk(offset, length, size - end, f and f.written)

    def _client_packet(self, frame: bytes) -> None:
        kind = frame[4]
        if kind == INIT:
            return
        r = _Reader(frame)
        r.pos = 5
        rid = r.u32()
        if kind == READ:
            handle, offset = r.string(), r.u64()
            if handle in self._files:
                self._reads[rid] = (handle, offset)
        elif kind == OPEN:
            path, pflags = r.text(), r.u32()
            mode = _mode(pflags)
            self._opens[rid] = (path, mode)
            self.emit("ssh.sftp", channel=self.channel, operation="open", path=path, mode=mode,
                      create=bool(pflags & PFLAG_CREAT), truncate=bool(pflags & PFLAG_TRUNC))
        elif kind == CLOSE:
            f = self._files.pop(r.string(), None)
            if f is not None:
                self._file_event(f)
        elif kind in (REMOVE, MKDIR, RMDIR, SETSTAT, OPENDIR):
            name = {REMOVE: "remove", MKDIR: "mkdir", RMDIR: "rmdir", SETSTAT: "setstat", OPENDIR: "opendir"}[kind]
            if kind != OPENDIR:  # listing a directory is reading metadata: not a file operation
                self.emit("ssh.sftp", channel=self.channel, operation=name, path=r.text())
        elif kind in (RENAME, SYMLINK):
            first, second = r.text(), r.text()
            if kind == RENAME:
                self.emit("ssh.sftp", channel=self.channel, operation="rename", path=first, new_path=second)
            else:
                # OpenSSH sends SYMLINK's arguments in the reverse of the draft's order (its PROTOCOL file,
                # "sftp: Reversal of arguments to SSH_FXP_SYMLINK"): target first, then the link.
                self.emit("ssh.sftp", channel=self.channel, operation="symlink", path=second, target=first)

    # -- server → client ----------------------------------------------------------------
    def from_server(self, data: bytes) -> None:
        self._down.feed(data)

    def _data_header(self, head: bytearray, size: int) -> tuple[int, _Transfer | None, int]:
        """A ``DATA`` (§7) up to its data's length: as ``_write_header``; it answers the ``READ`` of
        the same request id."""
        if len(head) < 13:
            return 13 if size >= 13 else _truncated(), None, 0
        rid, length = _U32.unpack_from(head, 5)[0], _U32.unpack_from(head, 9)[0]
        read = self._reads.pop(rid, None)
        f = self._files.get(read[0]) if read is not None else None
        return 13, (f.read if f is not None else None), self._bulk(read[1] if read else 0, length, size - 13,
                                                                    f and f.read)

    @staticmethod
    def _bulk(offset: int, length: int, room: int, transfer: _Transfer | None) -> int:
        """How many of the payload's bytes go to the hash (``length`` must fit the packet)."""
        if length > room:
            raise RemoteProtocolError("truncated SFTP string", client_hint="malformed SFTP packet")
        if transfer is None:
            return 0
        return length if transfer.add(offset, length) else 0

    def _server_packet(self, frame: bytes) -> None:
        kind = frame[4]
        if kind not in (HANDLE, STATUS):
            return
        r = _Reader(frame)
        r.pos = 5
        rid = r.u32()
        if kind == HANDLE:
            opened = self._opens.pop(rid, None)
            if opened is not None:
                self._files[r.string()] = _File(*opened)
        else:
            self._reads.pop(rid, None)  # EOF or an error answering a READ
            opened = self._opens.pop(rid, None)
            if opened is not None:
                code = r.u32()
                self.emit("ssh.sftp", channel=self.channel, operation="open_failed", path=opened[0],
                          mode=opened[1], status=code, success=False)

    def _file_event(self, f: _File, **extra: Any) -> None:
        fields: dict = {"channel": self.channel, "path": f.path, "mode": f.mode, **extra}
        if f.mode != "read":
            fields.update(f.written.fields("written"))
        if f.mode != "write":
            fields.update(f.read.fields("read"))
        fields["sequential"] = f.written.sequential and f.read.sequential
        self.emit("ssh.sftp.file", **fields)

    def close(self) -> None:
        """The channel ended: files still open are reported as not closed."""
        for f in self._files.values():
            self._file_event(f, closed=False)
        self._files.clear()
