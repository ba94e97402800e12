"""The disk spool: order, restart, torn tails, the byte bound (fail-closed and drop-oldest), segments, locking."""

from __future__ import annotations

import hashlib
import os

import pytest

from dbproxy.audit.sinks.spool import HEADER, Position, Spool, SpoolError


def rec(seq: int, size: int = 100) -> tuple[int, str, bytes]:
    payload = (f"event-{seq}:".encode() + b"x" * size)[:size]
    return seq, hashlib.sha256(payload).hexdigest(), payload


def drain(spool: Spool, batch: int = 7) -> list[int]:
    out = []
    while True:
        records = spool.read(batch, 1 << 20)
        if not records:
            return out
        out.extend(seq for seq, _, _ in records)
        spool.commit(records[-1][2])


def test_fifo_order_and_commit(tmp_path):
    s = Spool(str(tmp_path), max_bytes=1 << 20)
    assert s.append_fitting([rec(i) for i in range(1, 11)]) == 10
    first = s.read(3, 1 << 20)
    assert [r[0] for r in first] == [1, 2, 3]
    assert [r[0] for r in s.read(3, 1 << 20)] == [1, 2, 3]  # nothing moves without a commit
    s.commit(first[-1][2])
    assert s.pending_events == 7
    assert drain(s) == list(range(4, 11))
    assert s.pending_events == 0 and s.pending_bytes == 0
    assert s.tail() == (10, rec(10)[1])


def test_read_respects_max_bytes_but_returns_at_least_one(tmp_path):
    s = Spool(str(tmp_path), max_bytes=1 << 20)
    s.append_fitting([rec(1, 5000), rec(2, 10), rec(3, 10)])
    assert [r[0] for r in s.read(100, 100)] == [1]
    small = HEADER.size + 10
    assert [r[0] for r in s.read(100, HEADER.size + 5000 + small)] == [1, 2]
    assert [r[0] for r in s.read(100, HEADER.size + 5000 + 2 * small)] == [1, 2, 3]
    assert [r[0] for r in s.read(2, 1 << 20)] == [1, 2]


def test_restart_replays_undelivered_in_order(tmp_path):
    s = Spool(str(tmp_path), max_bytes=1 << 20, segment_bytes=1024)
    s.append_fitting([rec(i) for i in range(1, 51)])
    records = s.read(12, 1 << 20)
    s.commit(records[-1][2])
    s.close()  # same as a kill: every append and commit was already fsync'd
    s2 = Spool(str(tmp_path), max_bytes=1 << 20, segment_bytes=1024)
    assert s2.pending_events == 38
    assert s2.tail() == (50, rec(50)[1])
    s2.append_fitting([rec(i) for i in range(51, 61)])
    assert drain(s2) == list(range(13, 61))


def test_segments_roll_and_delivered_ones_are_deleted(tmp_path):
    s = Spool(str(tmp_path), max_bytes=1 << 20, segment_bytes=1024)
    for i in range(1, 101):
        s.append_fitting([rec(i)])
    segments = lambda: sorted(p for p in os.listdir(tmp_path) if p.endswith(".spool"))  # noqa: E731
    assert len(segments()) > 5
    assert drain(s) == list(range(1, 101))
    assert len(segments()) == 1  # the newest stays: it holds the chain's last link
    s.close()
    s2 = Spool(str(tmp_path), max_bytes=1 << 20, segment_bytes=1024)
    assert s2.pending_events == 0 and s2.tail() == (100, rec(100)[1])


def test_torn_tail_is_truncated_on_open(tmp_path):
    s = Spool(str(tmp_path), max_bytes=1 << 20)
    s.append_fitting([rec(i) for i in range(1, 6)])
    s.close()
    [seg] = [p for p in os.listdir(tmp_path) if p.endswith(".spool")]
    with open(tmp_path / seg, "ab") as f:
        f.write(HEADER.pack(100, 0, 6, b"\0" * 32) + b"half a rec")  # a crash mid-write
    s2 = Spool(str(tmp_path), max_bytes=1 << 20)
    assert s2.pending_events == 5 and s2.tail()[0] == 5
    s2.append_fitting([rec(6)])
    assert drain(s2) == [1, 2, 3, 4, 5, 6]


def test_corrupt_record_stops_the_scan(tmp_path):
    s = Spool(str(tmp_path), max_bytes=1 << 20)
    s.append_fitting([rec(i) for i in range(1, 4)])
    s.close()
    [seg] = [p for p in os.listdir(tmp_path) if p.endswith(".spool")]
    data = bytearray((tmp_path / seg).read_bytes())
    data[-5] ^= 0xFF  # flip a byte in the last record's payload: its CRC no longer matches
    (tmp_path / seg).write_bytes(bytes(data))
    s2 = Spool(str(tmp_path), max_bytes=1 << 20)
    assert drain(s2) == [1, 2]


def test_fail_closed_bound_appends_only_what_fits(tmp_path):
    size = HEADER.size + 100
    s = Spool(str(tmp_path), max_bytes=10 * size)
    assert s.append_fitting([rec(i) for i in range(1, 8)]) == 7
    assert s.append_fitting([rec(i) for i in range(8, 15)]) == 3  # 8, 9, 10 fit; 11.. stay with the caller
    assert s.pending_bytes == 10 * size
    assert s.append_fitting([rec(11)]) == 0
    records = s.read(4, 1 << 20)
    s.commit(records[-1][2])
    assert s.append_fitting([rec(i) for i in range(11, 15)]) == 4
    assert drain(s) == list(range(5, 15))
    assert s.dropped == 0


def test_drop_oldest_bound_counts_the_loss(tmp_path):
    size = HEADER.size + 100
    s = Spool(str(tmp_path), max_bytes=10 * size, segment_bytes=3 * size)
    assert s.append_dropping([rec(i) for i in range(1, 11)]) is None
    d = s.append_dropping([rec(i) for i in range(11, 15)])
    assert (d.count, d.first_seq, d.last_seq) == (4, 1, 4)
    assert s.pending_bytes <= 10 * size
    d = s.append_dropping([rec(15)])
    assert (d.count, d.first_seq, d.last_seq) == (1, 5, 5)
    assert s.dropped == 5
    assert drain(s) == list(range(6, 16))
    s.close()
    s2 = Spool(str(tmp_path), max_bytes=10 * size, segment_bytes=3 * size)
    assert s2.pending_events == 0


def test_drop_oldest_batch_bigger_than_the_spool_keeps_its_newest(tmp_path):
    size = HEADER.size + 100
    s = Spool(str(tmp_path), max_bytes=5 * size)
    s.append_dropping([rec(1), rec(2)])
    d = s.append_dropping([rec(i) for i in range(3, 11)])
    assert d.count == 5 and (d.first_seq, d.last_seq) == (1, 5)
    assert drain(s) == [6, 7, 8, 9, 10]


def test_commit_behind_a_drop_does_not_move_the_cursor_back(tmp_path):
    size = HEADER.size + 100
    s = Spool(str(tmp_path), max_bytes=4 * size)
    s.append_dropping([rec(i) for i in range(1, 5)])
    in_flight = s.read(2, 1 << 20)  # the sender holds 1, 2 ...
    s.append_dropping([rec(5), rec(6), rec(7)])  # ... while 1-3 are dropped
    s.commit(in_flight[-1][2])
    assert s.cursor > in_flight[-1][2]
    assert drain(s) == [4, 5, 6, 7]


def test_one_process_per_spool(tmp_path):
    s = Spool(str(tmp_path), max_bytes=1 << 20)
    with pytest.raises(SpoolError, match="in use"):
        Spool(str(tmp_path), max_bytes=1 << 20)
    s.close()
    Spool(str(tmp_path), max_bytes=1 << 20).close()


def test_positions_order():
    assert Position(1, 500) < Position(2, 0) < Position(2, 1)
