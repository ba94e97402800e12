"""Memory stays bounded whatever clients send (issue 13 §3), measured on the real proxy.

Real PostgreSQL 15, the real ``dbproxy serve`` subprocess, psycopg for the
well-behaved clients.  The hostile clients are raw sockets — no client library
sends half a message on purpose: each logs in through the proxy, sends a
Query header announcing an 8 MiB body, bursts 6 MiB of it and then trickles
a few bytes at a time, never finishing.

With a 32 MiB ``buffers.budget_bytes``: the proxy's RSS (VmRSS of the
``dbproxy serve`` process) stays within the budget above its baseline; the
connections whose message cannot fit get ErrorResponse 53200 (out_of_memory);
the ones that fit are ended after ``message_timeout_seconds`` with 08P01
"message not received in time"; both are audited as the session's end
reason; psycopg sessions keep working all along.  Without the budget the
proxy holds every byte sent (12 × 6 MiB) and never ends the tricklers.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
import time
from pathlib import Path

import psycopg
import pytest

from tests.integration.test_postgres_proxy import build_config
from tests.support import read_audit, wait_until

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
BUDGET = 32 * MiB
TIMEOUT = 6.0
SLOW_CLIENTS = 12
ANNOUNCED = 8 * MiB  # each Query body announced
BURST = 6 * MiB  # sent at once; the rest trickles
TRICKLE_FOR = 25.0  # a client gives up trickling after this (the proxy must end it well before)


def vm_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _startup(user: str, database: str) -> bytes:
    body = struct.pack(">i", 196608) + b"user\0" + user.encode() + b"\0database\0" + database.encode() + b"\0\0"
    return struct.pack(">i", len(body) + 4) + body


def _read_until_ready(sock: socket.socket) -> None:
    data = b""
    while True:
        chunk = sock.recv(65536)
        assert chunk, f"proxy closed during login: {data!r}"
        data += chunk
        pos = 0
        while len(data) - pos >= 5:
            mtype = data[pos:pos + 1]
            (length,) = struct.unpack_from(">i", data, pos + 1)
            if len(data) - pos - 1 < length:
                break
            if mtype == b"E":
                raise AssertionError(f"login refused: {data[pos:pos + 1 + length]!r}")
            if mtype == b"Z":
                return
            pos += 1 + length


def _error_fields(data: bytes) -> dict[str, str] | None:
    """The fields of the first ErrorResponse in ``data`` (code letter -> value)."""
    pos = 0
    while len(data) - pos >= 5:
        mtype = data[pos:pos + 1]
        (length,) = struct.unpack_from(">i", data, pos + 1)
        body = data[pos + 5:pos + 1 + length]
        if mtype == b"E":
            fields = {}
            for part in body.split(b"\0"):
                if part:
                    fields[chr(part[0])] = part[1:].decode()
            return fields
        pos += 1 + length
    return None


class SlowBody(threading.Thread):
    """Logs in, then sends a Query of ANNOUNCED bytes: BURST at once, then a trickle that never ends it."""

    def __init__(self, port: int, user: str) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.user = user
        self.received = b""
        self.sent = 0
        self.ended_after: float | None = None
        self.failure: BaseException | None = None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # reported by the test
            self.failure = exc

    def _run(self) -> None:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        try:
            sock.sendall(_startup(self.user, "app"))
            _read_until_ready(sock)
            start = time.monotonic()
            header = b"Q" + struct.pack(">i", ANNOUNCED + 4)
            chunk = b"x" * (256 * 1024)
            try:
                sock.sendall(header)
                self.sent = len(header)
                while self.sent - len(header) < BURST and not self._readable(sock, 0):
                    sock.sendall(chunk)
                    self.sent += len(chunk)
                while time.monotonic() - start < TRICKLE_FOR and not self._readable(sock, 0.25):
                    sock.sendall(b"y" * 16)
                    self.sent += 16
            except OSError:
                pass  # the proxy ended the session while we were sending: read what it said
            sock.settimeout(10)
            while True:
                try:
                    data = sock.recv(65536)
                except OSError:
                    break
                if not data:
                    break
                self.received += data
            self.ended_after = time.monotonic() - start
        finally:
            sock.close()

    @staticmethod
    def _readable(sock: socket.socket, timeout: float) -> bool:
        return bool(select.select([sock], [], [], timeout)[0])


class Steady(threading.Thread):
    """A psycopg client running queries until told to stop; every failure is kept."""

    def __init__(self, port: int, user: str, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.port, self.user, self.stop = port, user, stop
        self.ok = 0
        self.failures: list[BaseException] = []

    def run(self) -> None:
        try:
            with psycopg.connect(host="127.0.0.1", port=self.port, user=self.user, dbname="app", sslmode="disable",
                                 password="client-password-not-used", connect_timeout=10, autocommit=True) as conn:
                while not self.stop.is_set():
                    row = conn.execute("select %s::int + 1, repeat('z', 2000)", (self.ok,)).fetchone()
                    assert row[0] == self.ok + 1 and row[1] == "z" * 2000
                    self.ok += 1
                    time.sleep(0.02)
        except BaseException as exc:
            self.failures.append(exc)


def test_slow_bodies_stay_within_budget_while_others_work(pg, proxy_factory, tmp_path: Path):
    config = build_config(pg, tmp_path)
    config["buffers"] = {"budget_bytes": BUDGET, "message_timeout_seconds": TIMEOUT}
    proxy = proxy_factory(config)
    port = proxy.port()
    pid = proxy.proc.pid
    user = "trust"

    # Baseline: the proxy after it has served a session (imports and first-use allocations done).
    with psycopg.connect(host="127.0.0.1", port=port, user=user, dbname="app", sslmode="disable", connect_timeout=10) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    time.sleep(0.3)
    baseline = vm_rss(pid)

    stop = threading.Event()
    steady = [Steady(port, user, stop) for _ in range(2)]
    for t in steady:
        t.start()
    slow = [SlowBody(port, user) for _ in range(SLOW_CLIENTS)]
    for t in slow:
        t.start()
    peak = baseline
    deadline = time.monotonic() + TRICKLE_FOR + 20
    while any(t.is_alive() for t in slow) and time.monotonic() < deadline:
        peak = max(peak, vm_rss(pid))
        time.sleep(0.05)
    stop.set()
    for t in steady:
        t.join(15)
    growth = peak - baseline
    print(f"\nproxy RSS: baseline {baseline / MiB:.1f} MiB, peak {peak / MiB:.1f} MiB, "
          f"growth {growth / MiB:.1f} MiB (budget {BUDGET / MiB:.0f} MiB); "
          f"sent by slow clients {sum(t.sent for t in slow) / MiB:.1f} MiB")

    for t in slow:
        assert t.failure is None, t.failure
    outcomes = []
    for t in slow:
        fields = _error_fields(t.received)
        assert fields is not None, f"a slow client got no ErrorResponse (sent {t.sent} bytes, got {t.received[:200]!r})"
        outcomes.append((fields["C"], fields["M"], t.ended_after))
    over = [o for o in outcomes if o[0] == "53200"]
    timed_out = [o for o in outcomes if o[0] == "08P01"]
    print(f"slow clients: {len(over)} refused with 53200, {len(timed_out)} ended by the deadline with 08P01")
    assert len(over) + len(timed_out) == SLOW_CLIENTS, outcomes
    # 12 × 6 MiB cannot fit in 32 MiB: some are refused, the rest fit and are ended by the deadline.
    assert over and timed_out, outcomes
    for code, message, _ in over:
        assert message.startswith("the proxy is out of buffer memory for this message"), message
    for code, message, ended in timed_out:
        assert message == f"protocol violation: message not received in time (the proxy waits {TIMEOUT:g} s for a message to complete)"
        assert TIMEOUT - 1 <= ended < TIMEOUT + 5, outcomes  # the deadline, not the client, ended it

    # RSS: bounded by the budget plus what it does not charge, one read (256 KiB) in flight per
    # connection — not by what was sent.
    assert growth < BUDGET + SLOW_CLIENTS * 256 * 1024, f"RSS grew {growth / MiB:.1f} MiB with a {BUDGET / MiB:.0f} MiB budget"

    # The well-behaved clients were served all along.
    for t in steady:
        assert not t.failures, t.failures
        assert t.ok > 50, t.ok

    # Each hostile session's end is audited with its reason.
    def ends():
        return [e for e in read_audit(tmp_path / "audit.jsonl") if e["event"] == "db.session.end"
                and ("buffer budget exceeded" in e.get("reason", "") or "message not received in time" in e.get("reason", ""))]

    found = wait_until(lambda: len(ends()) >= SLOW_CLIENTS and ends(), what="audited session ends")
    reasons = sorted(e["reason"].split(":")[1].strip() for e in found)
    assert sum(r.startswith("buffer budget exceeded") for r in reasons) == len(over)
    assert sum(r.startswith("message not received in time") for r in reasons) == len(timed_out)

    # And the proxy still serves new sessions.
    with psycopg.connect(host="127.0.0.1", port=port, user=user, dbname="app", sslmode="disable", connect_timeout=10) as conn:
        assert conn.execute("select 2").fetchone() == (2,)


@pytest.mark.parametrize("worker", [True, False], ids=["tap", "in-process"])
def test_backend_row_over_budget_gives_one_error(pg, proxy_factory, tmp_path: Path, worker: bool):
    """A result row larger than the budget (the backend's DataRow announces it) ends the
    session with 53200 — and only that: the proxy's "backend lost" 08006 must not follow
    an error the pipeline already sent (the client would read two FATALs)."""
    config = build_config(pg, tmp_path)
    config["buffers"] = {"budget_bytes": BUDGET, "message_timeout_seconds": TIMEOUT}
    if not worker:
        config.setdefault("audit", {})["worker"] = False
    proxy = proxy_factory(config)
    sock = socket.create_connection(("127.0.0.1", proxy.port()), timeout=20)
    try:
        sock.sendall(_startup("trust", "app"))
        _read_until_ready(sock)
        sql = f"select repeat('x', {BUDGET + MiB})".encode() + b"\0"
        sock.sendall(b"Q" + struct.pack(">i", len(sql) + 4) + sql)
        data = b""
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            data += chunk
    finally:
        sock.close()
    errors = []
    pos = 0
    while len(data) - pos >= 5:
        (length,) = struct.unpack_from(">i", data, pos + 1)
        if data[pos:pos + 1] == b"E":
            errors.append(_error_fields(data[pos:pos + 1 + length]))
        pos += 1 + length
    assert [e["C"] for e in errors] == ["53200"], errors
