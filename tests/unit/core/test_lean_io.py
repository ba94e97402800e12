"""Lean socket I/O of the pipeline (``Receiver`` / ``Sender``) on real loopback TCP.

What is proven, and how:

- A ``Pipeline`` between two real ``trio.SocketStream`` pairs relays 32 MiB each
  way intact and in order while the receiving peers read in small bites through
  shrunken socket buffers; a counting stand-in for the module's ``os`` and
  ``_wait_writable`` shows the kernel took only part of some writes and the
  ``Sender`` waited for writability to send the rest.
- A flooded pump (data always waiting, so lean reads never have to wait) still
  lets other tasks run: a ticker task advances at least once per two
  ``CHECKPOINT_EVERY`` reads, and cancelling the pipeline's scope ends it while
  the flood still has data queued.  A dropping stage keeps the flooded pump
  from ever waiting on its output, so only the ``Receiver``'s own checkpoints
  can give the scheduler a turn.
- Two concurrent ``send_wire`` calls on one ``Sender`` never interleave, on a
  socket (partial writes) and on a memory stream (which would raise
  ``BusyResourceError`` on concurrent ``send_all``).
- Streams that are not a plain ``trio.SocketStream`` go through
  ``receive_some`` / ``send_all``.
- EOF, reset and a closed peer: ``receive`` returns ``b""`` at EOF and raises
  on reset, ``send_wire`` raises an ``OSError`` and frees the sender, and the
  pipeline's ``end_reason`` says ``closed`` or ``connection lost``.
"""

from __future__ import annotations

import os
import random
import socket
import struct

import attrs
import pytest
import trio
import trio.testing

from dbproxy import pipeline
from dbproxy.buffer import ReceiveBuffer
from dbproxy.pipeline import CHECKPOINT_EVERY, NEED_DATA, Pipeline, Receiver, Sender, drop, identity_encoder

BULK = 32 * 1024 * 1024
SMALL_BUFFER = 16 * 1024  # SO_SNDBUF / SO_RCVBUF (the kernel doubles it)


class Passthrough:
    """Consumes every buffered byte without producing a message: the pump's hot path."""

    def __init__(self) -> None:
        self.buffer = ReceiveBuffer()

    def feed(self, data) -> None:
        self.buffer.feed(data)

    def next_message(self):
        self.buffer.skip(len(self.buffer))
        return NEED_DATA


@attrs.frozen
class Chunk:
    raw: bytes


class OneMessagePerRead(Passthrough):
    """Everything buffered is one message, so a stage sees every read."""

    def next_message(self):
        if not self.buffer:
            return NEED_DATA
        return Chunk(self.buffer.take_rest())


class CountingOS:
    """Stands in for ``os`` inside ``dbproxy.pipeline``: counts writes the kernel took only part of."""

    def __init__(self) -> None:
        self.short_writes = 0
        self.would_block = 0

    def __getattr__(self, name):
        return getattr(os, name)

    def write(self, fd, data) -> int:
        try:
            n = os.write(fd, data)
        except BlockingIOError:
            self.would_block += 1
            raise
        if n < len(data):
            self.short_writes += 1
        return n


@pytest.fixture
async def tcp():
    """Makes connected loopback pairs of real ``trio.SocketStream``; closes them all at teardown."""
    made: list[trio.SocketStream] = []

    async def pair() -> tuple[trio.SocketStream, trio.SocketStream]:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        listener = listeners[0]
        port = listener.socket.getsockname()[1]
        near = await trio.open_tcp_stream("127.0.0.1", port)
        far = await listener.accept()
        for extra in listeners:
            await extra.aclose()
        assert type(near) is trio.SocketStream and type(far) is trio.SocketStream
        made.extend((near, far))
        return near, far

    yield pair
    for stream in made:
        await stream.aclose()


def shrink(sender_side: trio.SocketStream, receiver_side: trio.SocketStream) -> None:
    sender_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
    receiver_side.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)


def fill(stream: trio.SocketStream) -> int:
    """Write into ``stream`` until the kernel takes no more (nobody reads yet); bytes written."""
    fd = stream.socket.fileno()
    chunk = b"f" * 65536
    total = 0
    while True:
        try:
            total += os.write(fd, chunk)
        except BlockingIOError:
            return total


def reset(stream: trio.SocketStream) -> None:
    """Close with SO_LINGER 0: the peer gets a RST instead of a FIN."""
    stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    stream.socket.close()


async def read_exactly(stream: trio.abc.ReceiveStream, n: int, into: bytearray, bite: int = 16384) -> None:
    while len(into) < n:
        chunk = await stream.receive_some(bite)
        if not chunk:
            return
        into += chunk


def assert_same(got: bytes | bytearray, want: bytes, what: str) -> None:
    """Byte-exact comparison that reports the first difference instead of dumping megabytes."""
    same = got == want
    if not same:
        first = next((i for i, (x, y) in enumerate(zip(got, want)) if x != y), min(len(got), len(want)))
        raise AssertionError(f"{what}: {len(got)} bytes received, {len(want)} sent, first difference at {first}")


def longest_run(values: list[int]) -> int:
    best = run = 0
    previous = object()
    for v in values:
        run = run + 1 if v == previous else 1
        previous = v
        best = max(best, run)
    return best


def make_pipeline(client, backend, *, decoder=Passthrough, client_stages=(), receive_size=pipeline.RECEIVE_SIZE):
    return Pipeline(
        session=None,
        client=client,
        backend=backend,
        client_decoder=decoder(),
        backend_decoder=decoder(),
        client_stages=list(client_stages),
        backend_stages=[],
        receive_size=receive_size,
    )


async def test_bulk_relay_both_ways_through_partial_writes(tcp, monkeypatch):
    counting = CountingOS()
    monkeypatch.setattr(pipeline, "os", counting)
    waits = 0
    real_wait_writable = pipeline._wait_writable

    async def counting_wait_writable(fd):
        nonlocal waits
        waits += 1
        await real_wait_writable(fd)

    monkeypatch.setattr(pipeline, "_wait_writable", counting_wait_writable)

    client, proxy_client = await tcp()
    proxy_backend, backend = await tcp()
    shrink(proxy_backend, backend)
    shrink(proxy_client, client)
    rng = random.Random(20240611)
    up, down = rng.randbytes(BULK), rng.randbytes(BULK)
    got_up, got_down = bytearray(), bytearray()
    p = make_pipeline(proxy_client, proxy_backend)

    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(p.run)
            async with trio.open_nursery() as peers:
                peers.start_soon(client.send_all, up)
                peers.start_soon(backend.send_all, down)
                peers.start_soon(read_exactly, backend, BULK, got_up)
                peers.start_soon(read_exactly, client, BULK, got_down)
            await client.aclose()  # the client pump sees EOF; both pumps end

    assert_same(got_up, up, "client->backend")
    assert_same(got_down, down, "backend->client")
    assert p.end_reason == "client closed"
    c2b, b2c = p.statistics()
    assert (c2b.bytes_in, c2b.bytes_out, b2c.bytes_in, b2c.bytes_out) == (BULK, BULK, BULK, BULK)
    # The slow readers made the kernel take only part of some writes; the rest
    # went out after waiting for writability.
    assert counting.short_writes > 0
    assert waits > 0


async def test_flooded_pump_lets_other_tasks_run(tcp):
    client, proxy_client = await tcp()
    proxy_backend, backend = await tcp()
    read_size = 1024
    prefilled = fill(client)  # waiting before the pump's first read
    assert prefilled // read_size > 4 * CHECKPOINT_EVERY

    ticks = 0
    seen: list[int] = []  # the ticker's count when the pump handled each read
    enough = trio.Event()

    class Sink:
        name = "sink"

        def handle(self, message, ctx):
            seen.append(ticks)
            if len(seen) >= 2000:
                enough.set()
            return drop()  # nothing to send: the pump never waits on its output

    async def ticker():
        nonlocal ticks
        while True:
            ticks += 1
            await trio.sleep(0)

    async def flood():
        chunk = b"F" * 65536
        while True:
            await client.send_all(chunk)

    p = make_pipeline(proxy_client, proxy_backend, decoder=OneMessagePerRead, client_stages=[Sink()], receive_size=read_size)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(p.run)
            nursery.start_soon(ticker)
            nursery.start_soon(flood)
            await enough.wait()
            nursery.cancel_scope.cancel()

    # Every CHECKPOINT_EVERY reads the pump yields; the ticker runs once per
    # scheduler batch, so it advances at least once per two such stretches.
    assert longest_run(seen) <= 2 * CHECKPOINT_EVERY, longest_run(seen)
    assert seen[-1] - seen[0] >= len(seen) // (2 * CHECKPOINT_EVERY) - 1


async def test_cancelling_a_flooded_pipeline_ends_it_promptly(tcp):
    client, proxy_client = await tcp()
    proxy_backend, backend = await tcp()
    read_size = 1024
    prefilled = fill(client)
    assert prefilled // read_size > 4 * CHECKPOINT_EVERY

    handled = 0
    flooding = trio.Event()

    class Sink:
        name = "sink"

        def handle(self, message, ctx):
            nonlocal handled
            handled += 1
            flooding.set()
            return drop()

    p = make_pipeline(proxy_client, proxy_backend, decoder=OneMessagePerRead, client_stages=[Sink()], receive_size=read_size)
    scope = trio.CancelScope()
    ended = trio.Event()
    at_cancel = None

    async def run_pipeline():
        with scope:
            await p.run()
        ended.set()

    async def flood():
        chunk = b"F" * 65536
        while True:
            await client.send_all(chunk)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_pipeline)
        nursery.start_soon(flood)
        await flooding.wait()
        at_cancel = handled
        scope.cancel()
        with trio.fail_after(2):
            await ended.wait()
        nursery.cancel_scope.cancel()

    # The cancel landed at the pump's next periodic checkpoint, long before the
    # data already waiting in the socket ran out.
    assert handled - at_cancel <= CHECKPOINT_EVERY
    assert handled < prefilled // read_size


async def test_lean_receive_checkpoints_only_every_few_reads(tcp):
    near, far = await tcp()
    fill(near)
    r = Receiver(far, 512)
    assert r.fd == far.socket.fileno()
    for _ in range(3):
        for _ in range(CHECKPOINT_EVERY - 1):
            with trio.testing.assert_no_checkpoints():
                assert len(await r.receive()) == 512
        with trio.testing.assert_checkpoints():
            assert len(await r.receive()) == 512
    s = Sender(far, identity_encoder)
    with trio.testing.assert_no_checkpoints():
        await s.send_wire(b"taken whole by the kernel")
    assert await near.receive_some(100) == b"taken whole by the kernel"


async def test_concurrent_sends_on_a_socket_never_interleave(tcp):
    near, far = await tcp()
    shrink(near, far)
    rng = random.Random(7)
    a, b = rng.randbytes(4 * 1024 * 1024), rng.randbytes(4 * 1024 * 1024)
    s = Sender(near, identity_encoder)
    got = bytearray()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(s.send_wire, a)
            nursery.start_soon(s.send_wire, b)
            nursery.start_soon(read_exactly, far, len(a) + len(b), got)
    first_is_a = got[:16] == a[:16]
    assert_same(got, a + b if first_is_a else b + a, "two concurrent send_wire calls")
    assert s.bytes_out == len(a) + len(b)
    assert not s.busy


async def test_memory_streams_use_the_generic_path():
    near, far = trio.testing.memory_stream_pair()
    r = Receiver(far, 1000)
    s = Sender(near, identity_encoder)
    assert r.fd is None and s.fd is None
    # Two concurrent sends: without the sender's own queue the memory stream
    # would raise BusyResourceError.
    a, b = b"a" * 5000, b"b" * 7000
    got = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(s.send_wire, a)
        nursery.start_soon(s.send_wire, b)
    await near.aclose()
    while chunk := await r.receive():
        assert len(chunk) <= 1000
        got += chunk
    assert got in (a + b, b + a)
    assert s.bytes_out == len(a) + len(b)
    assert await r.receive() == b""


async def test_memory_stream_pipeline_relays_both_ways():
    client, proxy_client = trio.testing.memory_stream_pair()
    proxy_backend, backend = trio.testing.memory_stream_pair()
    p = make_pipeline(proxy_client, proxy_backend)
    up, down = bytearray(), bytearray()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(p.run)
            await client.send_all(b"query" * 1000)
            await backend.send_all(b"rows" * 1000)
            await read_exactly(backend, 5000, up)
            await read_exactly(client, 4000, down)
            await backend.aclose()
    assert up == b"query" * 1000 and down == b"rows" * 1000
    assert p.end_reason == "backend closed"


async def test_receive_at_eof_and_on_reset(tcp):
    near, far = await tcp()
    r = Receiver(far, 1000)
    await near.send_all(b"last words")
    await near.aclose()
    with trio.fail_after(5):
        assert await r.receive() == b"last words"
        assert await r.receive() == b""
        assert await r.receive() == b""

    near, far = await tcp()
    r = Receiver(far, 1000)
    reset(near)
    with trio.fail_after(5), pytest.raises(ConnectionResetError):
        await r.receive()


async def test_send_to_a_closed_peer_raises_and_frees_the_sender(tcp):
    near, far = await tcp()
    await far.aclose()
    s = Sender(near, identity_encoder)
    with trio.fail_after(5), pytest.raises(OSError) as caught:
        while True:  # the first writes may still be taken; the peer's RST ends them
            await s.send_wire(b"x" * 65536)
    assert isinstance(caught.value, (BrokenPipeError, ConnectionResetError))
    assert not s.busy  # a later send (e.g. an error reply) does not wait forever
    with trio.fail_after(5), pytest.raises(OSError):
        await s.send_wire(b"y")


async def test_pipeline_end_reasons_on_socket_close_and_reset(tcp):
    # Backend closes after a last message: it is relayed, then the session ends.
    client, proxy_client = await tcp()
    proxy_backend, backend = await tcp()
    p = make_pipeline(proxy_client, proxy_backend)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(p.run)
            await backend.send_all(b"goodbye")
            await backend.aclose()
    assert p.end_reason == "backend closed"
    assert await client.receive_some(100) == b"goodbye"

    # An idle client resets: the client pump's read fails.
    client, proxy_client = await tcp()
    proxy_backend, backend = await tcp()
    p = make_pipeline(proxy_client, proxy_backend)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(p.run)
            await trio.testing.wait_all_tasks_blocked()
            reset(client)
    assert p.end_reason == "client connection lost: ConnectionResetError"

    # The client resets while the backend floods toward it: whichever pump
    # notices first (read or write), the session ends as a lost connection.
    client, proxy_client = await tcp()
    proxy_backend, backend = await tcp()
    shrink(proxy_client, client)
    p = make_pipeline(proxy_client, proxy_backend)
    received = 0

    async def flood():
        chunk = b"B" * 65536
        while True:
            await backend.send_all(chunk)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(flood)
            async with trio.open_nursery() as session:
                session.start_soon(p.run)
                while received < 1024 * 1024:
                    received += len(await client.receive_some(65536))
                reset(client)
            nursery.cancel_scope.cancel()
    assert "connection lost" in p.end_reason, p.end_reason


async def test_protocol_error_then_client_reset_ends_the_session_cleanly():
    """A client that sends garbage and resets: the error to it cannot be sent (the lean path
    raises the socket's own ConnectionResetError), and the session still ends with its
    protocol error as the reason instead of an exception out of ``Pipeline.run``."""
    import socket as _socket

    from dbproxy.errors import RemoteProtocolError
    from dbproxy.pipeline import Pipeline

    class Refuse:
        def __init__(self):
            from dbproxy.buffer import ReceiveBuffer

            self.buffer = ReceiveBuffer()

        def feed(self, data):
            self.buffer.feed(data)

        def next_message(self):
            if self.buffer:
                raise RemoteProtocolError("bad", client_hint="bad")
            return NEED_DATA

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client_peer = await trio.open_tcp_stream("127.0.0.1", port)
    client = await listeners[0].accept()
    backend_peer = await trio.open_tcp_stream("127.0.0.1", port)
    backend = await listeners[0].accept()
    await client_peer.send_all(b"BAD")
    client_peer.socket.setsockopt(_socket.SOL_SOCKET, _socket.SO_LINGER, struct.pack("ii", 1, 0))
    client_peer.socket.close()  # a reset, before the proxy answers
    await trio.sleep(0.05)
    pipeline = Pipeline(session=None, client=client, backend=backend, client_decoder=Refuse(),
                        backend_decoder=Refuse(), client_stages=[], backend_stages=[],
                        client_error=lambda exc: b"E" * 100_000)
    with trio.fail_after(5):
        await pipeline.run()
    assert pipeline.end_reason == "client protocol error: bad"
    for s in (client, backend, backend_peer):
        await s.aclose()
    for listener in listeners:
        await listener.aclose()
