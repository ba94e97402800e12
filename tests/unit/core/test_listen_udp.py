"""UDP datagram sessions on real loopback sockets (dbproxy.listen.udp through the real ProxyServer)."""

from __future__ import annotations

import socket

import pytest
import trio

from .listen_support import listener, running, wait_until

pytestmark = pytest.mark.timeout(60)


async def _client() -> trio.socket.SocketType:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))
    return sock


async def _ask(sock, port: int, data: bytes, timeout: float = 3.0) -> tuple[str, int, bytes]:
    await sock.sendto(data, ("127.0.0.1", port))
    with trio.fail_after(timeout):
        reply, _ = await sock.recvfrom(65536)
    head, _, echoed = reply.partition(b":")
    sid, n = head.decode().split()
    return sid, int(n), echoed


async def _no_reply(sock, timeout: float) -> bool:
    with trio.move_on_after(timeout):
        await sock.recvfrom(65536)
        return False
    return True


def _ends(events: list[dict]) -> dict[str, dict]:
    return {e["sid"]: e for e in events if e["event"].endswith("session.end")}


async def test_two_peers_interleaved_get_their_own_sessions(tmp_path):
    async with running(tmp_path, [listener("u", "udpecho", kind="udp")]) as run:
        port = run.ports["u"]
        a, b = await _client(), await _client()
        seen = {"a": set(), "b": set()}
        for i in range(1, 6):
            for name, sock in (("a", a), ("b", b)):
                sid, n, echoed = await _ask(sock, port, f"{name}{i}".encode())
                assert (n, echoed) == (i, f"{name}{i}".encode())  # each peer's own sequence, in order
                seen[name].add(sid)
        assert len(seen["a"]) == len(seen["b"]) == 1 and seen["a"] != seen["b"]
        assert run.udp("u").statistics().sessions == 2
    ends = _ends(run.events())
    (sid_a,), (sid_b,) = seen["a"], seen["b"]
    assert ends[sid_a]["datagrams_received"] == ends[sid_b]["datagrams_received"] == 5
    assert ends[sid_a]["addr.remote"].endswith(f":{a.getsockname()[1]}")


async def test_idle_timeout_ends_the_session(tmp_path):
    async with running(tmp_path, [listener("u", "udpecho", kind="udp", udp={"idle_timeout_seconds": 0.3})]) as run:
        port = run.ports["u"]
        sock = await _client()
        first, _, _ = await _ask(sock, port, b"x")
        for i in range(2, 6):  # active for 0.6 s, twice the idle timeout: every datagram pushes it back
            await trio.sleep(0.15)
            again, n, _ = await _ask(sock, port, b"y")
            assert (again, n) == (first, i)
        await wait_until(lambda: run.udp("u").statistics().sessions == 0, timeout=3)
        later, n, _ = await _ask(sock, port, b"z")
        assert later != first and n == 1  # a new session for the same peer
    ends = _ends(run.events())
    assert ends[first]["reason"] == "idle timeout"


async def test_session_cap_drops_new_peers_until_a_slot_frees(tmp_path):
    async with running(tmp_path, [listener("u", "udpecho", kind="udp", udp={"max_sessions": 2})]) as run:
        port = run.ports["u"]
        a, b, c = await _client(), await _client(), await _client()
        await _ask(a, port, b"a")
        await _ask(b, port, b"b")
        await c.sendto(b"c", ("127.0.0.1", port))
        assert await _no_reply(c, 0.5)
        stats = run.udp("u").statistics()
        assert (stats.sessions, stats.refused) == (2, 1)
        await a.sendto(b"bye", ("127.0.0.1", port))
        await wait_until(lambda: run.udp("u").statistics().sessions == 1)
        _, n, echoed = await _ask(c, port, b"c")
        assert (n, echoed) == (1, b"c")


async def test_burst_over_the_queue_bound_is_dropped_and_counted(tmp_path):
    async with running(tmp_path, [listener("u", "udpecho", kind="udp", udp={"queue_datagrams": 4})]) as run:
        port = run.ports["u"]
        sock = await _client()
        await sock.sendto(b"hold:0.5", ("127.0.0.1", port))
        await wait_until(lambda: run.udp("u").statistics().sessions == 1)
        for i in range(50):
            await sock.sendto(f"m{i}".encode(), ("127.0.0.1", port))
        await wait_until(lambda: run.udp("u").statistics().received == 51)
        replies = []
        with trio.move_on_after(1.5):
            while True:
                data, _ = await sock.recvfrom(65536)
                replies.append(data.partition(b":")[2])
        # The held datagram, then the 4 the queue kept (the first four: later ones found it full).
        assert replies == [b"hold:0.5", b"m0", b"m1", b"m2", b"m3"]
        assert run.udp("u").statistics().dropped == 46
        await sock.sendto(b"bye", ("127.0.0.1", port))
    (end,) = _ends(run.events()).values()
    assert (end["datagrams_received"], end["datagrams_dropped"], end["datagrams_sent"]) == (6, 46, 5)


async def test_listener_survives_a_session_crash(tmp_path, caplog):
    async with running(tmp_path, [listener("u", "udpecho", kind="udp")]) as run:
        port = run.ports["u"]
        a, b = await _client(), await _client()
        sid_b, _, _ = await _ask(b, port, b"before")
        first, _, _ = await _ask(a, port, b"x")
        await a.sendto(b"crash", ("127.0.0.1", port))
        await wait_until(lambda: run.udp("u").statistics().sessions == 1)
        again, n, _ = await _ask(a, port, b"y")
        assert again != first and n == 1
        same_b, n_b, _ = await _ask(b, port, b"after")
        assert (same_b, n_b) == (sid_b, 2)  # the other peer's session never noticed
    ends = _ends(run.events())
    assert ends[first]["reason"] == "internal error: RuntimeError"
    assert "the test engine crashed on purpose" in caplog.text


async def test_engine_key_function_splits_one_peer_into_sessions(tmp_path):
    async with running(tmp_path, [listener("k", "udpkeyed", kind="udp")]) as run:
        port = run.ports["k"]
        sock = await _client()
        s1, n1, _ = await _ask(sock, port, b"1a")
        s2, n2, _ = await _ask(sock, port, b"2a")
        s1b, n1b, _ = await _ask(sock, port, b"1b")
        assert s1 != s2 and s1b == s1 and (n1, n2, n1b) == (1, 1, 2)
        await sock.sendto(b"", ("127.0.0.1", port))  # the key function says None: dropped, counted
        await wait_until(lambda: run.udp("k").statistics().unkeyed == 1)
        await sock.sendto(b"!", ("127.0.0.1", port))  # an unhashable key: dropped, the listener goes on
        await wait_until(lambda: run.udp("k").statistics().unkeyed == 2)
        s1c, n1c, _ = await _ask(sock, port, b"1c")
        assert (s1c, n1c) == (s1, 3)


async def test_shutdown_ends_datagram_sessions(tmp_path):
    async with running(tmp_path, [listener("u", "udpecho", kind="udp")]) as run:
        sock = await _client()
        sid, _, _ = await _ask(sock, run.ports["u"], b"x")
        started = trio.current_time()
    # The session saw EndOfChannel at stop, well within the 1 s grace: not cancelled at its end.
    assert trio.current_time() - started < 1.0
    assert sid in _ends(run.events())


async def test_queued_datagrams_are_charged_to_the_buffer_budget(tmp_path):
    # 1 MiB for the whole proxy (the smallest budget allowed); a queue of 64 would hold 2.5 MB of these.
    lst = listener("u", "udpecho", kind="udp", udp={"queue_datagrams": 64})
    async with running(tmp_path, [lst], buffers={"budget_bytes": 1024 * 1024}) as run:
        port, udp = run.ports["u"], run.udp("u")
        try:  # the kernel must not be the one dropping here (root may exceed rmem_max)
            udp.sock.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), 8 * 1024 * 1024)
        except OSError:
            udp.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
        sock = await _client()
        await sock.sendto(b"hold:0.5", ("127.0.0.1", port))
        await wait_until(lambda: udp.statistics().sessions == 1)
        for i in range(40):
            await sock.sendto(b"%02d" % i + b"x" * 39998, ("127.0.0.1", port))
        await wait_until(lambda: udp.statistics().received == 41)
        budget = run.server.services.buffers
        fits = 1024 * 1024 // 40000  # 26
        assert (udp.statistics().dropped, budget.used) == (40 - fits, fits * 40000)
        replies = []
        with trio.move_on_after(1.5):
            while True:
                data, _ = await sock.recvfrom(65536)
                replies.append(data.partition(b":")[2][:2])
        assert replies == [b"ho"] + [b"%02d" % i for i in range(fits)]
        assert budget.used == 0  # every queued datagram was read: the charge is back to zero
