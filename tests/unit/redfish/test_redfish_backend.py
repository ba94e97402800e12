"""The proxy's HTTP/1.1 client toward a BMC (engines/redfish/backend.py): keep-alive, a stale kept-alive
connection, streamed bodies both ways.

A FAKE BMC (a scripted h11 server on a loopback socket), named as such: the real peer of the integration
tests, sushy-emulator under werkzeug, answers every request with ``Connection: close`` (werkzeug's
serving.py does not do keep-alive), so it can exercise neither the reuse of a BMC connection nor a
kept-alive connection the BMC closed while idle — the fault this client retries on.
"""

from __future__ import annotations

import functools

import h11
import pytest
import trio

from dbproxy.configtypes import BackendTLS
from dbproxy.engines.redfish.backend import BmcConnection, BmcError

pytestmark = pytest.mark.timeout(30)


class FakeBmc:
    """Serves scripted responses; ``close_idle_after``: close a kept-alive connection after that many
    requests without saying so (as a BMC whose idle timer fired)."""

    def __init__(self, close_idle_after: int | None = None) -> None:
        self.connections = 0
        self.requests: list[tuple[str, bytes, list]] = []
        self.close_idle_after = close_idle_after
        self.port = 0

    async def handler(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        conn = h11.Connection(h11.SERVER)
        served = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                conn.receive_data(data)
                if not data:
                    return
                continue
            if isinstance(event, h11.Request):
                body = b""
                while True:
                    e = conn.next_event()
                    if e is h11.NEED_DATA:
                        conn.receive_data(await stream.receive_some(65536))
                    elif isinstance(e, h11.Data):
                        body += e.data
                    elif isinstance(e, h11.EndOfMessage):
                        break
                self.requests.append((event.target.decode(), body, list(event.headers)))
                payload = b'{"n": %d, "echo": %d}' % (len(self.requests), len(body))
                if event.target == b"/chunked":
                    await stream.send_all(conn.send(h11.Response(status_code=200, headers=[])))
                    for part in (b'{"parts": ', b"[1, 2, 3]", b"}"):
                        await stream.send_all(conn.send(h11.Data(data=part)))
                else:
                    await stream.send_all(conn.send(h11.Response(
                        status_code=200, headers=[("content-length", str(len(payload)))])) + conn.send(h11.Data(data=payload)))
                await stream.send_all(conn.send(h11.EndOfMessage()))
                served += 1
                if self.close_idle_after is not None and served >= self.close_idle_after:
                    await stream.aclose()
                    return
                conn.start_next_cycle()
                continue
            return


async def _start(nursery: trio.Nursery, fake: FakeBmc) -> BmcConnection:
    listeners = await nursery.start(functools.partial(trio.serve_tcp, fake.handler, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    return BmcConnection("127.0.0.1", port, BackendTLS())


async def _get(bmc: BmcConnection, path: str = "/redfish/v1", body=None, length=None) -> bytes:
    exchange = await bmc.request("GET" if body is None else "POST", path, [("host", bmc.authority)], body,
                                 length=length)
    assert exchange.status == 200
    data, whole = await exchange.read(1 << 20)
    assert whole
    return data


async def test_requests_reuse_one_kept_alive_connection():
    fake = FakeBmc()
    async with trio.open_nursery() as nursery:
        bmc = await _start(nursery, fake)
        assert await _get(bmc) == b'{"n": 1, "echo": 0}'
        assert await _get(bmc) == b'{"n": 2, "echo": 0}'
        assert await _get(bmc, body=b"12345") == b'{"n": 3, "echo": 5}'
        assert fake.connections == 1
        await bmc.aclose()
        nursery.cancel_scope.cancel()


async def test_a_stale_connection_is_retried_on_a_new_one():
    fake = FakeBmc(close_idle_after=1)
    async with trio.open_nursery() as nursery:
        bmc = await _start(nursery, fake)
        assert await _get(bmc) == b'{"n": 1, "echo": 0}'
        await trio.sleep(0.05)  # the BMC closed the idle connection without a word
        assert await _get(bmc, body=b"abc") == b'{"n": 2, "echo": 3}'
        assert fake.connections == 2
        # A streamed body cannot be sent again: the client is told, not given a wrong answer.
        await trio.sleep(0.05)

        async def chunks():
            yield b"x" * 10

        with pytest.raises(BmcError):
            await _get(bmc, body=chunks(), length=10)
        await bmc.aclose()
        nursery.cancel_scope.cancel()


async def test_bodies_stream_both_ways():
    fake = FakeBmc()
    async with trio.open_nursery() as nursery:
        bmc = await _start(nursery, fake)

        async def chunks():
            for _ in range(4):
                yield b"y" * 1000

        assert await _get(bmc, body=chunks()) == b'{"n": 1, "echo": 4000}'  # chunked: no length known
        _, _, headers = fake.requests[-1]
        assert (b"transfer-encoding", b"chunked") in headers
        assert await _get(bmc, body=chunks(), length=4000) == b'{"n": 2, "echo": 4000}'
        _, _, headers = fake.requests[-1]
        assert (b"content-length", b"4000") in headers
        exchange = await bmc.request("GET", "/chunked", [("host", bmc.authority)], None)
        parts = [chunk async for chunk in exchange.body()]
        assert b"".join(parts) == b'{"parts": [1, 2, 3]}' and len(parts) == 3
        assert await _get(bmc) == b'{"n": 4, "echo": 0}'
        assert fake.connections == 1
        await bmc.aclose()
        nursery.cancel_scope.cancel()


async def test_unreachable_bmc():
    with trio.socket.socket() as s:
        await s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bmc = BmcConnection("127.0.0.1", port, BackendTLS())
    with pytest.raises(BmcError) as info:
        await _get(bmc)
    assert info.value.kind == "connect" and info.value.client_hint == "the BMC is unreachable"
