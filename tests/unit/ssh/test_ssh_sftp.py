"""The SFTP audit observer on packets built per draft-ietf-secsh-filexfer-02 §3 (whole, byte by byte, malformed)."""

from __future__ import annotations

import hashlib
import struct

import pytest

from dbproxy.engines.ssh import sftp as s
from dbproxy.errors import FrameTooLarge, ProtocolError


def string(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def packet(kind: int, body: bytes) -> bytes:
    return struct.pack(">IB", len(body) + 1, kind) + body


def rid(n: int) -> bytes:
    return struct.pack(">I", n)


INIT = packet(s.INIT, struct.pack(">I", 3))
UP = [
    INIT,
    packet(s.OPEN, rid(1) + string(b"/srv/a.bin") + struct.pack(">I", s.PFLAG_WRITE | s.PFLAG_CREAT | s.PFLAG_TRUNC) + struct.pack(">I", 0)),
    packet(s.WRITE, rid(2) + string(b"H1") + struct.pack(">Q", 0) + string(b"hello ")),
    packet(s.WRITE, rid(3) + string(b"H1") + struct.pack(">Q", 6) + string(b"world")),
    packet(s.CLOSE, rid(4) + string(b"H1")),
    packet(s.OPEN, rid(5) + string(b"/srv/a.bin") + struct.pack(">I", s.PFLAG_READ) + struct.pack(">I", 0)),
    packet(s.READ, rid(6) + string(b"H2") + struct.pack(">Q", 0) + struct.pack(">I", 32768)),
    packet(s.READ, rid(7) + string(b"H2") + struct.pack(">Q", 11) + struct.pack(">I", 32768)),
    packet(s.CLOSE, rid(8) + string(b"H2")),
    packet(s.RENAME, rid(9) + string(b"/srv/a.bin") + string(b"/srv/b.bin")),
    packet(s.REMOVE, rid(10) + string(b"/srv/b.bin")),
    packet(s.OPEN, rid(11) + string(b"/root/secret") + struct.pack(">I", s.PFLAG_READ) + struct.pack(">I", 0)),
]
DOWN = [
    packet(s.VERSION, struct.pack(">I", 3)),
    packet(s.HANDLE, rid(1) + string(b"H1")),
    packet(s.HANDLE, rid(5) + string(b"H2")),
    packet(s.DATA, rid(6) + string(b"hello world")),
    packet(s.STATUS, rid(7) + struct.pack(">I", 1) + string(b"EOF") + string(b"")),
    packet(s.STATUS, rid(11) + struct.pack(">I", 3) + string(b"Permission denied") + string(b"")),
]


def run(chunks_up, chunks_down) -> list[tuple]:
    events: list[tuple] = []
    audit = s.SftpAudit(lambda kind, **f: events.append((kind, f)), channel=1)
    # The order a real session interleaves them: each request, then its answer.
    order = [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (0, 3), (0, 4), (0, 5), (1, 2), (0, 6), (0, 7), (1, 3), (1, 4),
             (0, 8), (0, 9), (0, 10), (0, 11), (1, 5)]
    for side, i in order:
        data = (chunks_up if side == 0 else chunks_down)[i]
        feed = audit.from_client if side == 0 else audit.from_server
        for piece in data:
            feed(piece)
    audit.close()
    return events


def expected() -> list[tuple]:
    digest = hashlib.sha256(b"hello world").hexdigest()
    return [
        ("ssh.sftp", {"channel": 1, "operation": "open", "path": "/srv/a.bin", "mode": "write", "create": True, "truncate": True}),
        ("ssh.sftp.file", {"channel": 1, "path": "/srv/a.bin", "mode": "write", "bytes_written": 11, "sha256_written": digest,
                           "sequential": True}),
        ("ssh.sftp", {"channel": 1, "operation": "open", "path": "/srv/a.bin", "mode": "read", "create": False, "truncate": False}),
        ("ssh.sftp.file", {"channel": 1, "path": "/srv/a.bin", "mode": "read", "bytes_read": 11, "sha256_read": digest,
                           "sequential": True}),
        ("ssh.sftp", {"channel": 1, "operation": "rename", "path": "/srv/a.bin", "new_path": "/srv/b.bin"}),
        ("ssh.sftp", {"channel": 1, "operation": "remove", "path": "/srv/b.bin"}),
        ("ssh.sftp", {"channel": 1, "operation": "open", "path": "/root/secret", "mode": "read", "create": False, "truncate": False}),
        ("ssh.sftp", {"channel": 1, "operation": "open_failed", "path": "/root/secret", "mode": "read", "status": 3, "success": False}),
    ]


def test_whole_packets():
    assert run([[p] for p in UP], [[p] for p in DOWN]) == expected()


def test_byte_by_byte():
    def split(p: bytes) -> list[bytes]:
        return [p[i:i + 1] for i in range(len(p))]
    assert run([split(p) for p in UP], [split(p) for p in DOWN]) == expected()


def test_not_sequential_has_no_hash():
    events: list[tuple] = []
    audit = s.SftpAudit(lambda kind, **f: events.append((kind, f)), channel=2)
    audit.from_client(UP[1])
    audit.from_server(DOWN[1])
    audit.from_client(packet(s.WRITE, rid(2) + string(b"H1") + struct.pack(">Q", 100) + string(b"x")))
    audit.close()
    kind, fields = events[-1]
    assert kind == "ssh.sftp.file" and fields["sequential"] is False and fields["sha256_written"] is None
    assert fields["closed"] is False  # the channel ended with the file still open


def test_malformed_packets_raise():
    audit = s.SftpAudit(lambda kind, **f: None, channel=1)
    with pytest.raises(ProtocolError):
        audit.from_client(packet(s.OPEN, rid(1) + struct.pack(">I", 1000) + b"short"))
    with pytest.raises(FrameTooLarge):
        s.SftpAudit(lambda kind, **f: None, channel=1).from_client(struct.pack(">IB", s.MAX_PACKET + 1, s.WRITE))
    with pytest.raises(ProtocolError):
        s.SftpAudit(lambda kind, **f: None, channel=1).from_client(struct.pack(">I", 0))


def _download(size: int, block: int = 32768) -> tuple[list[bytes], list[bytes], bytes]:
    """An OpenSSH-like download of ``size`` bytes: READ requests and DATA answers of ``block`` bytes
    (the last item of the answers: all of them joined, the stream the server sends)."""
    body = bytes(range(256)) * (size // 256)
    up = [UP[5]]
    down = [DOWN[2]]
    for n, at in enumerate(range(0, size, block)):
        up.append(packet(s.READ, rid(100 + n) + string(b"H2") + struct.pack(">QI", at, block)))
        down.append(packet(s.DATA, rid(100 + n) + string(body[at:at + block])))
    up.append(packet(s.CLOSE, rid(99) + string(b"H2")))
    return up, [*down, b"".join(down[1:])], body


def _feed_interleaved(audit, up: list[bytes], down: list[bytes], cut: int) -> None:
    """Requests then answers, each direction's bytes re-cut into ``cut``-byte chunks (SSH channel
    packets do not follow SFTP packet boundaries)."""
    audit.from_client(up[0])
    audit.from_server(down[0])
    stream = down[-1]
    for i, req in enumerate(up[1:-1]):
        audit.from_client(req)
        if i % 64 == 63 or i == len(up) - 3:  # the client keeps many reads in flight
            end = min((i + 1) * len(down[1]), len(stream))
            start = (i // 64) * 64 * len(down[1])
            for at in range(start, end, cut):
                audit.from_server(stream[at:min(at + cut, end)])
    audit.from_client(up[-1])


@pytest.mark.parametrize("cut", [32768, 32768 + 9, 4093])
def test_transfer_hashed_as_it_passes_memory_stays_small(cut):
    """However the stream is cut, the hash is the file's, and what the observer holds stays small
    (the payload is hashed from the chunks, not buffered) however much went by."""
    import tracemalloc

    up, down, body = _download(8 * 1024 * 1024)
    events: list[tuple] = []
    audit = s.SftpAudit(lambda kind, **f: events.append((kind, f)), channel=1)
    tracemalloc.start()
    try:
        _feed_interleaved(audit, up, down, cut)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    (fields,) = [f for kind, f in events if kind == "ssh.sftp.file"]
    assert fields["bytes_read"] == len(body) and fields["sha256_read"] == hashlib.sha256(body).hexdigest()
    assert peak < 1024 * 1024, f"the observer held {peak} bytes for an 8 MiB transfer"
