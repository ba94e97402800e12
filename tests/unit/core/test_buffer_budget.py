"""The proxy-wide buffer budget and the partial-message deadline, on in-memory streams.

A partly received message is charged to one ``BufferBudget`` shared by every
session; a session whose partial message would take the proxy over it ends
with its protocol's error (``BufferBudgetExceeded``) while the others go on;
a partial message that does not complete within ``message_timeout`` ends the
session (``MessageTimeout``); every charge is given back when the message
completes or the session ends, however it ends.
"""

from __future__ import annotations

import struct

import pytest
import trio
import trio.testing

from dbproxy.buffer import BufferBudget, ReceiveBuffer
from dbproxy.channel import MessageStream
from dbproxy.errors import BufferBudgetExceeded, MessageTimeout
from dbproxy.pipeline import Pipeline

from .test_pipeline import LengthDecoder, Recorder, Recv, frame


class AnnouncingDecoder(LengthDecoder):
    """The test codec, telling the pump the announced length of a partial frame (as real codecs do)."""

    def announced_length(self):
        return 2 + struct.unpack(">H", bytes(self.buffer.peek(2)))[0] if len(self.buffer) >= 2 else None


def make(budget: BufferBudget, *, decoder=AnnouncingDecoder, max_size: int = 1000):
    client_side, proxy_client = trio.testing.memory_stream_pair()
    proxy_backend, backend_side = trio.testing.memory_stream_pair()
    errors: list = []
    rec = Recorder()
    p = Pipeline(
        session=None,
        client=proxy_client,
        backend=proxy_backend,
        client_decoder=decoder(max_size),
        backend_decoder=decoder(max_size),
        client_stages=[rec],
        backend_stages=[],
        client_error=lambda exc: (errors.append(exc), frame(b"ERR:" + exc.client_hint.encode()[:200]))[1],
        buffers=budget,
    )
    return p, client_side, backend_side, errors, rec


# --- the accounting objects ---------------------------------------------------------------


def test_compact_returns_what_stays():
    buf = ReceiveBuffer()
    buf.feed(b"abcdef")
    assert buf.compact() == 6  # nothing consumed: all of it stays
    buf.skip(6)
    assert buf.compact() == 0
    buf.feed(b"xyz")
    buf.skip(1)
    assert buf.compact() == 2
    assert bytes(buf.peek(2)) == b"yz"


def test_account_charges_releases_and_refuses():
    budget = BufferBudget(100)
    a, b = budget.account(), budget.account()
    a.hold(60)
    b.hold(30)
    assert budget.used == 90
    a.hold(70)  # growing by 10: exactly at the limit
    assert budget.used == 100 and budget.peak == 100
    with pytest.raises(BufferBudgetExceeded) as info:
        b.hold(31)
    assert info.value.sqlstate == "53200" and info.value.free == 30
    assert b.held == 30 and budget.used == 100  # held until its owner releases it (the bytes still are)
    b.release()
    a.release()
    a.release()  # idempotent
    assert budget.used == 0 and budget.statistics().refused == 1


def test_announced_length_refused_before_the_body_arrives():
    budget = BufferBudget(100)
    other = budget.account()
    other.hold(50)
    acc = budget.account()
    acc.hold(5, announced=50)  # fits exactly in what is left: charged only what it holds
    assert budget.used == 55
    with pytest.raises(BufferBudgetExceeded) as info:
        acc.hold(6, announced=51)
    assert info.value.needed == 51 and info.value.free == 50
    acc.release()
    assert budget.used == 50


# --- the pumps --------------------------------------------------------------------------


async def test_partial_message_is_charged_until_it_completes():
    budget = BufferBudget(10_000)
    p, client, backend, errors, rec = make(budget)
    data = frame(b"x" * 500)
    async with trio.open_nursery() as n:
        n.start_soon(p.run)
        await client.send_all(data[:300])
        await trio.testing.wait_all_tasks_blocked()
        assert budget.used == 300
        await client.send_all(data[300:] + frame(b"y")[:2])
        await trio.testing.wait_all_tasks_blocked()
        assert budget.used == 2  # the next frame's header
        await client.send_all(frame(b"y")[2:])
        assert await Recv(backend).until(len(data) + 3) == data + frame(b"y")
        await trio.testing.wait_all_tasks_blocked()
        assert budget.used == 0
        n.cancel_scope.cancel()
    assert rec.seen == [b"x" * 500, b"y"] and not errors


async def test_session_over_budget_ends_with_its_error_others_go_on():
    budget = BufferBudget(1000)
    p1, client1, backend1, errors1, _ = make(budget)
    p2, client2, backend2, errors2, rec2 = make(budget, max_size=60_000)
    big = frame(b"a" * 800)
    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            n.start_soon(p1.run)
            n.start_soon(p2.run)
            await client1.send_all(big[:700])
            await trio.testing.wait_all_tasks_blocked()
            assert budget.used == 700
            # Session 2 announces 2 + 400 bytes: only 300 are free -> refused at the header.
            await client2.send_all(frame(b"b" * 400)[:10])
            await trio.testing.wait_all_tasks_blocked()
            assert isinstance(errors2[0], BufferBudgetExceeded)
            assert p2.end_reason.startswith("client protocol error: buffer budget exceeded")
            assert b"ERR:the proxy is out of buffer memory for this message (402 bytes needed, 300 free)" in await Recv(client2).until(20)
            # Session 1 is untouched: it completes its message.
            await client1.send_all(big[700:])
            assert await Recv(backend1).until(len(big)) == big
            await trio.testing.wait_all_tasks_blocked()
            assert budget.used == 0 and not errors1
            n.cancel_scope.cancel()
    assert budget.used == 0 and budget.refused == 1


async def test_error_reaches_the_client_of_the_refused_session():
    budget = BufferBudget(100)
    p, client, backend, errors, _ = make(budget)
    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            n.start_soon(p.run)
            await client.send_all(frame(b"z" * 500)[:50])  # announces 502 bytes: can never fit
    got = await Recv(client).until(10)
    assert b"ERR:the proxy is out of buffer memory for this message (502 bytes needed, 100 free)" in got
    assert budget.used == 0
    # The bytes go with the charge (an ended session's decoder may stay reachable for a while).
    assert p.c2b.decoder.buffer._data == b""


async def test_growing_partial_without_announced_length_is_refused_when_over():
    # A decoder that cannot tell the announced length is bounded by what it holds.
    budget = BufferBudget(1000)
    p, client, backend, errors, _ = make(budget, decoder=LengthDecoder, max_size=60_000)
    payload = frame(b"q" * 2000)
    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            n.start_soon(p.run)
            await client.send_all(payload[:900])
            await trio.testing.wait_all_tasks_blocked()
            assert budget.used == 900 and not errors
            await client.send_all(payload[900:1000])  # 1000 held: still within
            await trio.testing.wait_all_tasks_blocked()
            assert budget.used == 1000 and not errors
            await client.send_all(payload[1000:1001])  # one more byte held: over
    assert isinstance(errors[0], BufferBudgetExceeded) and budget.used == 0


async def test_backend_partial_messages_are_charged_too():
    budget = BufferBudget(100)
    p, client, backend, errors, _ = make(budget)
    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            n.start_soon(p.run)
            await backend.send_all(frame(b"r" * 500)[:20])
    assert isinstance(errors[0], BufferBudgetExceeded)
    assert errors[0].direction == "backend" and p.end_reason.startswith("backend protocol error: buffer budget")
    assert budget.used == 0


async def test_charge_released_when_the_session_is_cancelled():
    budget = BufferBudget(10_000)
    p, client, backend, errors, _ = make(budget)
    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            n.start_soon(p.run)
            await client.send_all(frame(b"c" * 900)[:600])
            await backend.send_all(frame(b"d" * 900)[:300])
            await trio.testing.wait_all_tasks_blocked()
            assert budget.used == 900
            n.cancel_scope.cancel()
    assert budget.used == 0 and not errors


# --- the deadline ------------------------------------------------------------------------


async def test_trickled_message_ends_after_the_deadline(autojump_clock):
    budget = BufferBudget(10_000, message_timeout=30)
    p, client, backend, errors, _ = make(budget)
    data = frame(b"t" * 200)
    start = trio.current_time()
    async with trio.open_nursery() as n:
        n.start_soon(p.run)

        async def trickle():
            for i in range(len(data) - 1):  # never the last byte
                await client.send_all(data[i:i + 1])
                await trio.sleep(1)

        n.start_soon(trickle)
        got = b""
        with trio.fail_after(100):
            while len(got) < 10:
                got += await client.receive_some()
        n.cancel_scope.cancel()
    elapsed = trio.current_time() - start
    assert 30 <= elapsed < 32  # trickling bytes is not progress: only a complete message is
    assert isinstance(errors[0], MessageTimeout)
    assert p.end_reason.startswith("client protocol error: message not received in time")
    assert b"ERR:message not received in time" in got
    assert budget.used == 0 and budget.timeouts == 1


async def test_completed_messages_restart_the_deadline(autojump_clock):
    budget = BufferBudget(10_000, message_timeout=30)
    p, client, backend, errors, rec = make(budget)
    async with trio.open_nursery() as n:
        n.start_soon(p.run)
        # Every 20 s a message completes and the next one starts: always a partial pending,
        # never one older than 30 s.
        await client.send_all(frame(b"0")[:2])
        for i in range(1, 10):
            await trio.sleep(20)
            await client.send_all(frame(str(i - 1).encode())[2:] + frame(str(i).encode())[:2])
        await trio.testing.wait_all_tasks_blocked()
        assert not errors and p.end_reason is None
        assert rec.seen == [str(i).encode() for i in range(9)]
        n.cancel_scope.cancel()


async def test_idle_session_without_partial_message_has_no_deadline(autojump_clock):
    budget = BufferBudget(10_000, message_timeout=5)
    p, client, backend, errors, rec = make(budget)
    async with trio.open_nursery() as n:
        n.start_soon(p.run)
        await client.send_all(frame(b"hello"))
        await trio.sleep(3600)
        assert p.end_reason is None and not errors
        await client.send_all(frame(b"still here"))
        assert await Recv(backend).until(len(frame(b"hello")) + len(frame(b"still here"))) == frame(b"hello") + frame(b"still here")
        n.cancel_scope.cancel()


# --- handshakes (MessageStream) ------------------------------------------------------------


async def test_message_stream_charges_while_waiting_and_releases():
    budget = BufferBudget(1000)
    left, right = trio.testing.memory_stream_pair()
    ms = MessageStream(right, AnnouncingDecoder(), budget=budget)
    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            result = []

            async def receive():
                result.append(await ms.receive())

            n.start_soon(receive)
            await left.send_all(frame(b"m" * 400)[:250])
            await trio.testing.wait_all_tasks_blocked()
            assert budget.used == 250
            await left.send_all(frame(b"m" * 400)[250:])
    assert result[0].body == b"m" * 400 and budget.used == 0


async def test_message_stream_refuses_a_message_over_budget():
    budget = BufferBudget(100)
    left, right = trio.testing.memory_stream_pair()
    ms = MessageStream(right, AnnouncingDecoder(), budget=budget)
    await left.send_all(frame(b"m" * 400)[:50])
    with trio.fail_after(5), pytest.raises(BufferBudgetExceeded):
        await ms.receive()
    assert budget.used == 0 and ms.decoder.buffer._data == b""


async def test_message_stream_drops_consumed_handshake_bytes():
    # Many small handshake messages (e.g. CQL OPTIONS) must not pile up in the buffer.
    left, right = trio.testing.memory_stream_pair()
    ms = MessageStream(right, AnnouncingDecoder(), budget=BufferBudget(1000))
    with trio.fail_after(5):
        for _ in range(200):
            await left.send_all(frame(b"o" * 100) + frame(b"p")[:1])
            assert (await ms.receive()).body == b"o" * 100
            await left.send_all(frame(b"p")[1:])
            assert (await ms.receive()).body == b"p"
    # What stays is at most the last read, not the 20 KiB of 200 handshake rounds.
    assert len(ms.decoder.buffer._data) <= len(frame(b"p"))
