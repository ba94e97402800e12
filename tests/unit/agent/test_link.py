"""The h2 link on in-memory streams: CONNECT tunnels, refusals, and per-stream flow control
(a stalled consumer stops only its own stream)."""

from __future__ import annotations

import trio
import trio.testing

from dbproxy.agent import link as link_mod
from dbproxy.agent.link import H2Link, LinkLost, LinkStream, StreamRefused


async def echo_or_refuse(stream: LinkStream) -> None:
    """The agent's side in these tests: ``refused:N`` is refused, ``sink:N`` takes nothing
    (a stalled consumer), anything else is echoed."""
    link = stream.link
    if stream.authority.startswith("refused"):
        await link.respond(stream, 403, "not on the allow-list")
        return
    await link.respond(stream, 200)
    if stream.authority.startswith("sink"):
        await trio.sleep_forever()
    while data := await stream.receive_some():
        await stream.send_all(data)
    await stream.send_eof()


async def pair(nursery: trio.Nursery, handler=echo_or_refuse) -> tuple[H2Link, H2Link]:
    proxy_side, agent_side = trio.testing.memory_stream_pair()
    proxy = H2Link(proxy_side, client=True)
    agent = H2Link(agent_side, client=False, handler=handler)
    await nursery.start(agent.run)
    await nursery.start(proxy.run)
    return proxy, agent


async def test_connect_echo_and_eof() -> None:
    async with trio.open_nursery() as nursery:
        proxy, _ = await pair(nursery)
        with trio.fail_after(5):
            stream = await proxy.open_stream("db", 5432)
            await stream.send_all(b"hello")
            got = b""
            while len(got) < 5:
                got += await stream.receive_some()
            assert got == b"hello"
            await stream.send_eof()
            assert await stream.receive_some() == b""
            await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_refused_carries_status_and_reason() -> None:
    async with trio.open_nursery() as nursery:
        proxy, _ = await pair(nursery)
        with trio.fail_after(5):
            try:
                await proxy.open_stream("refused", 1)
            except StreamRefused as exc:
                assert exc.status == 403 and exc.reason == "not on the allow-list"
            else:
                raise AssertionError("the CONNECT was not refused")
        nursery.cancel_scope.cancel()


async def test_stalled_stream_does_not_stall_another() -> None:
    """A consumer that never reads holds one stream window; a second stream keeps moving
    far more than every window together (connection window included)."""
    async with trio.open_nursery() as nursery:
        proxy, agent = await pair(nursery)
        with trio.fail_after(30):
            stalled = await proxy.open_stream("sink", 1)
            sent = 0
            block = b"x" * 65536

            async def flood() -> None:
                nonlocal sent
                while True:
                    await stalled.send_all(block)
                    sent += len(block)

            nursery.start_soon(flood)
            # The stalled stream's sender stops at its window: credit comes only from reads.
            while sent < link_mod.STREAM_WINDOW:
                await trio.sleep(0.01)
            await trio.sleep(0.2)
            assert link_mod.STREAM_WINDOW <= sent <= link_mod.STREAM_WINDOW + len(block)
            stuck_at = sent
            # Meanwhile another stream carries 10x the window, both ways.
            other = await proxy.open_stream("echo", 2)
            total = 10 * link_mod.STREAM_WINDOW
            payload = b"y" * 262144

            async def send() -> None:
                for _ in range(total // len(payload)):
                    await other.send_all(payload)

            nursery.start_soon(send)
            got = 0
            while got < total:
                got += len(await other.receive_some())
            assert got == total
            assert sent == stuck_at  # still stalled: the other stream took no credit from it
        nursery.cancel_scope.cancel()


async def test_stalled_stream_resumes_when_read() -> None:
    released = trio.Event()

    async def slow(stream: LinkStream) -> None:
        await stream.link.respond(stream, 200)
        await released.wait()
        while await stream.receive_some():
            pass

    async with trio.open_nursery() as nursery:
        proxy, _ = await pair(nursery, slow)
        with trio.fail_after(30):
            stream = await proxy.open_stream("slow", 1)
            done = trio.Event()

            async def send() -> None:
                await stream.send_all(b"z" * (3 * link_mod.STREAM_WINDOW))
                done.set()

            nursery.start_soon(send)
            await trio.sleep(0.3)
            assert not done.is_set()
            released.set()
            await done.wait()
        nursery.cancel_scope.cancel()


async def test_many_concurrent_streams() -> None:
    async with trio.open_nursery() as nursery:
        proxy, _ = await pair(nursery)
        results: list[bytes] = []

        async def one(i: int) -> None:
            stream = await proxy.open_stream("echo", i)
            message = f"stream {i} ".encode() * 1000
            await stream.send_all(message)
            await stream.send_eof()
            got = b""
            while data := await stream.receive_some():
                got += data
            assert got == message
            results.append(got)
            await stream.aclose()

        with trio.fail_after(30):
            async with trio.open_nursery() as inner:
                for i in range(100):
                    inner.start_soon(one, i)
        assert len(results) == 100
        assert not proxy.streams
        nursery.cancel_scope.cancel()


async def test_link_lost_breaks_every_stream() -> None:
    proxy_side, agent_side = trio.testing.memory_stream_pair()
    proxy = H2Link(proxy_side, client=True)
    agent = H2Link(agent_side, client=False, handler=echo_or_refuse)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_quietly, agent.run)
        nursery.start_soon(_quietly, proxy.run)
        with trio.fail_after(5):
            await proxy._started.wait()
            stream = await proxy.open_stream("echo", 1)
            await agent_side.aclose()  # the agent's end of the wire goes away
            try:
                while True:
                    await stream.receive_some()
            except LinkLost:
                pass
            assert not proxy.alive
            try:
                await proxy.open_stream("echo", 2)
            except LinkLost:
                pass
            else:
                raise AssertionError("a dead link opened a stream")
        nursery.cancel_scope.cancel()


async def test_missed_heartbeat_loses_the_link() -> None:
    """A peer that stops answering (a frozen agent: bytes stop, nothing closes) is noticed."""
    proxy_side, agent_side = trio.testing.memory_stream_pair()
    proxy = H2Link(proxy_side, client=True, heartbeat=0.05, heartbeat_timeout=0.2)
    agent = H2Link(agent_side, client=False, handler=echo_or_refuse)
    async with trio.open_nursery() as nursery:
        agent_scope = trio.CancelScope()

        async def agent_run() -> None:
            with agent_scope:
                await agent.run()

        nursery.start_soon(agent_run)
        nursery.start_soon(_quietly, proxy.run)
        with trio.fail_after(5):
            await proxy._started.wait()
            stream = await proxy.open_stream("echo", 1)
            agent_scope.cancel()  # its tasks stop; its transport stays open (no EOF)
            try:
                await stream.receive_some()
            except LinkLost as exc:
                assert "heartbeat" in str(exc)
            else:
                raise AssertionError("the stream outlived a silent peer")
        nursery.cancel_scope.cancel()


async def _quietly(fn) -> None:
    try:
        await fn()
    except LinkLost:
        pass


class FragileStream(trio.abc.Stream):
    """Like trio.SSLStream: a send_all cancelled half-way leaves the stream broken for good."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.broken = False

    async def send_all(self, data) -> None:
        if self.broken:
            raise trio.BrokenResourceError("broken by an earlier cancelled send_all")
        view = memoryview(data)
        try:
            for i in range(0, len(view), 16384):
                await self.inner.send_all(view[i:i + 16384])
                await trio.sleep(0)
        except trio.Cancelled:
            self.broken = True
            raise

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes=None) -> bytes:
        if self.broken:
            raise trio.BrokenResourceError("broken by an earlier cancelled send_all")
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_cancelled_sender_does_not_break_the_link() -> None:
    """A session cancelled in the middle of a write (its client left) must not cut a TLS record in
    half: every other stream of the link lives on."""
    proxy_side, agent_side = trio.testing.memory_stream_pair()
    fragile = FragileStream(proxy_side)
    proxy = H2Link(fragile, client=True)
    agent = H2Link(agent_side, client=False, handler=echo_or_refuse)
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        await nursery.start(proxy.run)
        with trio.fail_after(10):
            leaving = await proxy.open_stream("echo", 1)
            staying = await proxy.open_stream("echo", 2)
            with trio.CancelScope() as scope:
                nursery.start_soon(_cancel_soon, scope)
                await leaving.send_all(b"x" * 1_000_000)
            assert scope.cancel_called
            await leaving.aclose()
            assert not fragile.broken and proxy.alive
            await staying.send_all(b"still here")
            got = b""
            while len(got) < 10:
                got += await staying.receive_some()
            assert got == b"still here"
        nursery.cancel_scope.cancel()


async def _cancel_soon(scope: trio.CancelScope) -> None:
    await trio.sleep(0)
    await trio.sleep(0)
    scope.cancel()
