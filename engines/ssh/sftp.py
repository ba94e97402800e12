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
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any, Callable

import attrs

from dbproxy.buffer import ReceiveBuffer
from dbproxy.errors import RemoteProtocolError
from dbproxy.sansio import NEED_DATA, LengthPrefixed

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

    def add(self, offset: int, data: bytes) -> None:
        if offset != self.next_offset:
            self.sequential = False
        self.bytes += len(data)
        self.next_offset = offset + len(data)
        if self.sequential:
            self.sha256.update(data)

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


class SftpAudit:
    """Observes one sftp channel; ``emit(kind, **fields)`` writes the audit events."""

    def __init__(self, emit: Callable[..., Any], channel: int) -> None:
        self.emit = emit
        self.channel = channel
        self._up = ReceiveBuffer()
        self._down = ReceiveBuffer()
        self._opens: dict[int, tuple[str, str]] = {}  # request id -> (path, mode)
        self._reads: dict[int, tuple[bytes, int]] = {}  # request id -> (handle, offset)
        self._files: dict[bytes, _File] = {}

    # -- client → server ----------------------------------------------------------------
    def from_client(self, data: bytes) -> None:
        self._up.feed(data)
        while (frame := FRAMES.next_frame(self._up, MAX_PACKET)) is not NEED_DATA:
            self._client_packet(frame)

    def _client_packet(self, frame: bytes) -> None:
        kind = frame[4]
        if kind == INIT:
            return
        r = _Reader(frame)
        r.pos = 5
        rid = r.u32()
        if kind == WRITE:
            handle, offset, data = r.string(), r.u64(), r.string()
            f = self._files.get(handle)
            if f is not None:
                f.written.add(offset, data)
        elif kind == READ:
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
        while (frame := FRAMES.next_frame(self._down, MAX_PACKET)) is not NEED_DATA:
            self._server_packet(frame)

    def _server_packet(self, frame: bytes) -> None:
        kind = frame[4]
        if kind not in (HANDLE, DATA, STATUS):
            return
        r = _Reader(frame)
        r.pos = 5
        rid = r.u32()
        if kind == HANDLE:
            opened = self._opens.pop(rid, None)
            if opened is not None:
                self._files[r.string()] = _File(*opened)
        elif kind == DATA:
            read = self._reads.pop(rid, None)
            if read is not None:
                handle, offset = read
                f = self._files.get(handle)
                if f is not None:
                    f.read.add(offset, r.string())
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
