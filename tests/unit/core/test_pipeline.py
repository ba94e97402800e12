"""The pipeline on in-memory streams: hot path, rewrites, replies, closes, errors."""

from __future__ import annotations

import struct

import attrs
import pytest
import trio
import trio.testing

from dbproxy.buffer import ReceiveBuffer
from dbproxy.errors import FrameTooLarge, RemoteProtocolError
from dbproxy.pipeline import Pipeline
from dbproxy.sansio import NEED_DATA, Verdict, reply, replace


@attrs.frozen
class Frame:
    raw: bytes

    @property
    def body(self) -> bytes:
        return self.raw[2:]


class LengthDecoder:
    """A 2-byte big-endian length-prefixed test codec; length 0 is 'garbage'."""

    def __init__(self, max_size: int = 1000) -> None:
        self.buffer = ReceiveBuffer()
        self.max_size = max_size

    def feed(self, data) -> None:
        self.buffer.feed(data)

    def next_message(self):
        if len(self.buffer) < 2:
            return NEED_DATA
        (n,) = struct.unpack(">H", bytes(self.buffer.peek(2)))
        if n == 0:
            raise RemoteProtocolError("zero length", client_hint="bad frame")
        if n > self.max_size:
            raise FrameTooLarge(n, self.max_size)
        if len(self.buffer) < 2 + n:
            return NEED_DATA
        return Frame(self.buffer.take(2 + n))


def frame(body: bytes) -> bytes:
    return struct.pack(">H", len(body)) + body


class Recorder:
    name = "recorder"

    def __init__(self) -> None:
        self.seen: list[bytes] = []

    def handle(self, msg, ctx):
        self.seen.append(msg.body)
        return None


class Rules:
    name = "rules"

    def handle(self, msg, ctx):
        if msg.body == b"secret":
            return replace(frame(b"******"))
        if msg.body == b"drop":
            return Verdict(replace=())
        if msg.body == b"ping":
            return reply(frame(b"pong"))
        if msg.body == b"bye":
            return reply(frame(b"denied"), close=True)
        return None


class Recv:
    """Collects everything a memory stream receives."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.data = b""
        self.chunks: list[bytes] = []

    async def until(self, n: int) -> bytes:
        with trio.fail_after(5):
            while len(self.data) < n:
                chunk = await self.stream.receive_some()
                if not chunk:
                    break
                self.chunks.append(chunk)
                self.data += chunk
        return self.data


def make(client_stages=None, backend_stages=None):
    client_side, proxy_client = trio.testing.memory_stream_pair()
    proxy_backend, backend_side = trio.testing.memory_stream_pair()
    errors = []
    p = Pipeline(
        session=None,
        client=proxy_client,
        backend=proxy_backend,
        client_decoder=LengthDecoder(),
        backend_decoder=LengthDecoder(),
        client_stages=client_stages or [],
        backend_stages=backend_stages or [],
        client_error=lambda exc: (errors.append(exc), frame(b"ERR:" + exc.client_hint.encode()))[1],
    )
    return p, client_side, backend_side, errors


async def test_hot_path_forwards_received_bytes_in_one_send():
    rec = Recorder()
    p, client, backend, _ = make([rec])
    async with trio.open_nursery() as n:
        n.start_soon(p.run)
        data = frame(b"a") + frame(b"bb") + frame(b"ccc")
        await client.send_all(data)
        got = Recv(backend)
        assert await got.until(len(data)) == data
        assert got.chunks == [data]  # one send, untouched
        assert rec.seen == [b"a", b"bb", b"ccc"]
        c2b, _ = p.statistics()
        assert c2b.rewritten_batches == 0 and c2b.messages == 3
        await client.aclose()
    assert p.end_reason == "client closed"


async def test_partial_frames_are_buffered_until_complete():
    rec = Recorder()
    p, client, backend, _ = make([rec])
    async with trio.open_nursery() as n:
        n.start_soon(p.run)
        data = frame(b"hello") + frame(b"world")
        for i in range(len(data)):
            await client.send_all(data[i : i + 1])
            await trio.testing.wait_all_tasks_blocked()
        got = Recv(backend)
        assert await got.until(len(data)) == data
        assert rec.seen == [b"hello", b"world"]
        n.cancel_scope.cancel()


async def test_replace_drop_and_reply():
    p, client, backend, _ = make([Rules()])
    async with trio.open_nursery() as n:
        n.start_soon(p.run)
        await client.send_all(frame(b"a") + frame(b"secret") + frame(b"drop") + frame(b"ping") + frame(b"z"))
        expected = frame(b"a") + frame(b"******") + frame(b"z")
        got = Recv(backend)
        assert await got.until(len(expected)) == expected
        back = Recv(client)
        assert await back.until(len(frame(b"pong"))) == frame(b"pong")
        c2b, _ = p.statistics()
        assert c2b.rewritten_batches == 1
        n.cancel_scope.cancel()


async def test_close_verdict_ends_both_pumps():
    p, client, backend, _ = make([Rules()])
    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            n.start_soon(p.run)
            await client.send_all(frame(b"ok") + frame(b"bye") + frame(b"never"))
    assert "closed by client-side stage" in p.end_reason
    assert await Recv(backend).until(len(frame(b"ok"))) == frame(b"ok")
    assert await Recv(client).until(len(frame(b"denied"))) == frame(b"denied")


async def test_protocol_error_sends_client_error_and_ends():
    p, client, backend, errors = make()
    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            n.start_soon(p.run)
            await client.send_all(frame(b"fine") + b"\x00\x00junk")
    assert "protocol error" in p.end_reason
    assert await Recv(client).until(len(frame(b"ERR:bad frame"))) == frame(b"ERR:bad frame")
    assert await Recv(backend).until(len(frame(b"fine"))) == frame(b"fine")


async def test_oversized_frame_rejected_before_body():
    p, client, backend, errors = make()
    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            n.start_soon(p.run)
            await client.send_all(struct.pack(">H", 5000))  # header only: body never sent
    assert isinstance(errors[0], FrameTooLarge)


async def test_backend_eof_ends_client_pump_too():
    p, client, backend, _ = make()
    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            n.start_soon(p.run)
            await backend.send_all(frame(b"last words"))
            await backend.aclose()
    assert p.end_reason == "backend closed"
    assert await Recv(client).until(len(frame(b"last words"))) == frame(b"last words")


async def test_bytes_left_from_handshake_are_decoded_first():
    rec = Recorder()
    p, client, backend, _ = make([rec])
    p.c2b.decoder.feed(frame(b"early"))
    async with trio.open_nursery() as n:
        n.start_soon(p.run)
        got = Recv(backend)
        assert await got.until(len(frame(b"early"))) == frame(b"early")
        n.cancel_scope.cancel()
    assert rec.seen == [b"early"]


class Strict:
    """A stage that finds a message body malformed (as parse_* functions do)."""

    name = "strict"

    def handle(self, msg, ctx):
        if msg.body == b"malformed":
            raise RemoteProtocolError("malformed body", client_hint="malformed body")
        return None


async def test_stage_protocol_error_still_sends_earlier_messages():
    p, client, backend, errors = make([Strict()])
    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            n.start_soon(p.run)
            await client.send_all(frame(b"one") + frame(b"two") + frame(b"malformed") + frame(b"never"))
    assert await Recv(backend).until(len(frame(b"one") + frame(b"two"))) == frame(b"one") + frame(b"two")
    assert await Recv(client).until(len(frame(b"ERR:malformed body"))) == frame(b"ERR:malformed body")
    assert errors[0].direction == "client"


def test_buffer_adopts_a_fresh_chunk_and_hands_it_back():
    buf = ReceiveBuffer()
    chunk = frame(b"abc") + frame(b"de")
    dec = LengthDecoder()
    dec.buffer = buf
    buf.feed(chunk)
    buf.mark()
    while dec.next_message() is not NEED_DATA:
        pass
    assert buf.consumed_since_mark() is chunk  # the received object itself, no copy
    buf.compact()
    # A partial frame stays buffered and later bytes append to it.
    buf.feed(frame(b"xyz")[:3])
    buf.mark()
    assert dec.next_message() is NEED_DATA
    buf.compact()
    buf.feed(frame(b"xyz")[3:])
    assert dec.next_message().raw == frame(b"xyz")
    assert buf.consumed_since_mark() == frame(b"xyz")
