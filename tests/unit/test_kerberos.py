"""The Kerberos credential layer and the GSS-encrypted Postgres transport, without a KDC.

``KerberosCredential`` gets a fake blocking acquisition (a thread that sleeps),
so sharing, failure fan-out, background renewal, cancellation and "the loop
keeps running" are checked deterministically; ``GssEncStream`` runs over an
in-memory stream pair with a fake security context whose wrap adds a marker
byte.  The real KDC and PostgreSQL are in tests/integration/test_postgres_kerberos.py.
"""

from __future__ import annotations

import json
import struct
import threading
import time

import pytest
import trio
import trio.testing

from dbproxy.config import load_config
from dbproxy.errors import ConfigErrors, UpstreamError
from dbproxy.kerberos import CLIENT_HINT, KerberosCredential, _described, _describe
from dbproxy.engines import default_registry
from dbproxy.engines.postgres.gssenc import MAX_PACKET, GssEncStream


class FakeKdc:
    def __init__(self, *, delay: float = 0.2, lifetime: float = 3600.0, fail: str | None = None) -> None:
        self.delay, self.lifetime, self.fail = delay, lifetime, fail
        self.calls = 0
        self.threads: set[int] = set()

    def acquire(self, serial: int):
        self.calls += 1
        self.threads.add(threading.get_ident())
        time.sleep(self.delay)  # a blocking KDC round trip
        if self.fail:
            raise RuntimeError(self.fail)
        return f"creds-{self.calls}", self.lifetime, "dbproxy@TEST"


def credential(kdc: FakeKdc, renew_margin: float = 300.0) -> KerberosCredential:
    cred = KerberosCredential(principal="dbproxy@TEST", keytab="/k/dbproxy.keytab", ccache=None, renew_margin=renew_margin)
    cred._acquire_blocking = kdc.acquire
    return cred


async def test_twenty_sessions_one_acquisition():
    kdc = FakeKdc()
    cred = credential(kdc)
    got = []

    async def session():
        got.append(await cred.get())

    async with trio.open_nursery() as n:
        for _ in range(20):
            n.start_soon(session)
    assert got == ["creds-1"] * 20
    assert kdc.calls == 1 and cred.acquisitions == 1
    assert threading.get_ident() not in kdc.threads  # never on the trio thread
    assert await cred.get() == "creds-1" and kdc.calls == 1


async def test_loop_runs_while_acquiring():
    kdc = FakeKdc(delay=0.5)
    cred = credential(kdc)
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await trio.sleep(0.01)
            ticks += 1

    async with trio.open_nursery() as n:
        n.start_soon(ticker)
        await cred.get()
        n.cancel_scope.cancel()
    assert ticks >= 20


async def test_one_failure_answers_all_waiters_then_retries():
    kdc = FakeKdc(fail="Cannot contact any KDC for realm 'TEST'")
    cred = credential(kdc)
    errors = []

    async def session():
        try:
            await cred.get()
        except UpstreamError as exc:
            errors.append(exc)

    async with trio.open_nursery() as n:
        for _ in range(10):
            n.start_soon(session)
    assert kdc.calls == 1 and len(errors) == 10
    for exc in errors:
        assert exc.kind == "auth" and exc.client_hint == CLIENT_HINT
        assert "dbproxy@TEST" in str(exc) and "keytab /k/dbproxy.keytab" in str(exc) and "Cannot contact any KDC" in str(exc)
        for word in ("KDC", "keytab", "@", "/"):
            assert word not in exc.client_hint
    kdc.fail = None
    assert await cred.get() == "creds-2"  # the next session tries again at once
    assert cred.acquisitions == 1


async def test_cancelled_session_does_not_abandon_the_attempt():
    kdc = FakeKdc(delay=0.3)
    cred = credential(kdc)
    with trio.move_on_after(0.05) as scope:
        await cred.get()
    assert scope.cancelled_caught
    assert await cred.get() == "creds-1"  # joined the same attempt
    assert kdc.calls == 1


async def test_renewal_in_background_before_expiry():
    kdc = FakeKdc(delay=0.3, lifetime=8.0)
    cred = credential(kdc, renew_margin=7.0)  # renew 1 s after acquisition, expiry after 8 s
    assert await cred.get() == "creds-1"
    assert await cred.get() == "creds-1" and kdc.calls == 1
    await trio.sleep(1.1)
    t0 = time.monotonic()
    assert await cred.get() == "creds-1"  # still good: no waiting for the KDC
    assert time.monotonic() - t0 < 0.1
    assert cred.acquisitions == 1  # the renewal is under way in its thread
    await trio.sleep(0.5)
    assert kdc.calls == 2 and cred.acquisitions == 2
    assert await cred.get() == "creds-2"


async def test_failed_background_renewal_keeps_the_current_ticket():
    kdc = FakeKdc(delay=0.05, lifetime=10.0)
    cred = credential(kdc, renew_margin=9.5)  # renew after 0.5 s
    assert await cred.get() == "creds-1"
    await trio.sleep(0.6)
    kdc.fail = "KDC down"
    assert await cred.get() == "creds-1"
    await trio.sleep(0.2)
    assert kdc.calls == 2 and cred.acquisitions == 1
    assert await cred.get() == "creds-1"  # within RETRY_AFTER: no new attempt
    await trio.sleep(0.1)
    assert kdc.calls == 2


async def test_expired_credential_means_waiting_for_a_new_one():
    kdc = FakeKdc(delay=0.05, lifetime=5.5)  # under EXPIRY_SLACK + 0.5 s: never handed out once 0.5 s old
    cred = credential(kdc, renew_margin=0.0)
    assert await cred.get() == "creds-1"
    await trio.sleep(0.6)
    assert await cred.get() == "creds-2"


def test_failure_described_in_the_failing_thread():
    class GssLike(Exception):
        def gen_message(self):
            return "Server nosuch/db@TEST not found in Kerberos database"

    def fails():
        raise GssLike()

    with pytest.raises(Exception) as info:
        _described(fails)
    assert _describe(info.value) == "Server nosuch/db@TEST not found in Kerberos database (GssLike)"


# --------------------------------------------------------------------------- config


def _config(tmp_path, krb5_configs: list[str | None]) -> str:
    keytab = tmp_path / "kt"
    keytab.write_bytes(b"\x05\x02")
    routes = []
    for i, conf in enumerate(krb5_configs):
        auth = {"method": "gssapi", "principal": "dbproxy@R", "keytab_file": str(keytab)}
        if conf:
            (tmp_path / conf).write_text("[libdefaults]\n")
            auth["krb5_config"] = str(tmp_path / conf)
        routes.append({"match": {"user": f"u{i}"}, "backend": {"address": "db:5432", "auth": auth}})
    doc = {"listeners": [{"name": "pg", "protocol": "postgres", "listen": "127.0.0.1:0", "routes": routes}]}
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(doc))
    return str(path)


def test_one_krb5_config_per_process(tmp_path):
    reg = default_registry()
    load_config(_config(tmp_path, ["a.conf", None, "a.conf"]), reg)
    with pytest.raises(ConfigErrors) as info:
        load_config(_config(tmp_path, ["a.conf", "b.conf"]), reg)
    (err,) = info.value.errors
    assert err.path == "listeners[0].routes[1].backend.auth.krb5_config"
    assert "listeners[0].routes[0].backend.auth" in err.expected and "one KRB5_CONFIG" in err.expected


# --------------------------------------------------------------------------- GSSENC framing


class FakeContext:
    """wrap = marker byte + data; establishment takes two round trips."""

    def __init__(self) -> None:
        self.complete = False
        self.steps: list[bytes | None] = []

    async def step(self, token):
        self.steps.append(token)
        if token is None:
            return b"first-token"
        if token == b"server-1":
            return b"second-token"
        if token == b"server-2":
            self.complete = True
            return None
        raise AssertionError(token)

    def wrap(self, data: bytes) -> bytes:
        assert len(data) <= MAX_PACKET - 4 - 1
        return b"W" + data

    def unwrap(self, data: bytes) -> bytes:
        assert data[:1] == b"W"
        return data[1:]

    def max_wrap_input(self, limit: int) -> int:
        return limit - 1


def _packet(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


async def _read_packets(stream, count: int) -> list[bytes]:
    buf = b""
    out = []
    while len(out) < count:
        while len(buf) < 4 or len(buf) < 4 + struct.unpack(">I", buf[:4])[0]:
            buf += await stream.receive_some(65536)
        (n,) = struct.unpack(">I", buf[:4])
        out.append(buf[4 : 4 + n])
        buf = buf[4 + n :]
    return out


async def test_gssenc_establish_then_wrap_and_unwrap_across_packet_boundaries():
    proxy_side, server_side = trio.testing.memory_stream_pair()
    ctx = FakeContext()
    stream = GssEncStream(proxy_side, ctx)

    async def server():
        assert await _read_packets(server_side, 1) == [b"first-token"]
        await server_side.send_all(_packet(b"server-1"))
        assert await _read_packets(server_side, 1) == [b"second-token"]
        await server_side.send_all(_packet(b"server-2"))

    async with trio.open_nursery() as n:
        n.start_soon(server)
        await stream.establish()
    assert ctx.complete and ctx.steps == [None, b"server-1", b"server-2"]

    payload = bytes(range(256)) * 400  # 102400 bytes
    async with trio.open_nursery() as n:
        n.start_soon(stream.send_all, payload)
        packets = await _read_packets(server_side, 7)
    assert all(len(p) <= MAX_PACKET - 4 for p in packets)
    assert b"".join(p[1:] for p in packets) == payload

    wire = b"".join(_packet(b"W" + payload[i : i + 5000]) for i in range(0, len(payload), 5000))
    received = bytearray()

    async def trickle():
        for i in range(0, len(wire), 777):  # chunks that split length words and bodies
            await server_side.send_all(wire[i : i + 777])

    async with trio.open_nursery() as n:
        n.start_soon(trickle)
        while len(received) < len(payload):
            received += await stream.receive_some(3000)
    assert bytes(received) == payload


async def test_gssenc_server_hangs_up_during_setup_is_an_auth_failure():
    proxy_side, server_side = trio.testing.memory_stream_pair()
    stream = GssEncStream(proxy_side, FakeContext())

    async def server():
        await _read_packets(server_side, 1)
        await server_side.aclose()

    async with trio.open_nursery() as n:
        n.start_soon(server)
        with pytest.raises(UpstreamError) as info:
            await stream.establish()
    assert info.value.kind == "auth" and info.value.sqlstate == "28000"
    assert info.value.client_hint == CLIENT_HINT
    assert "did not accept the proxy's Kerberos ticket" in str(info.value)


@pytest.mark.parametrize("code,kind", [("28000", "auth"), ("53300", "protocol")])
async def test_gssenc_error_response_during_setup(code, kind):
    proxy_side, server_side = trio.testing.memory_stream_pair()
    stream = GssEncStream(proxy_side, FakeContext())
    body = b"SFATAL\0C" + code.encode() + b"\0Msorry, too many clients already\0\0"
    error = b"E" + struct.pack(">I", 4 + len(body)) + body

    async def server():
        await _read_packets(server_side, 1)
        await server_side.send_all(error)

    async with trio.open_nursery() as n:
        n.start_soon(server)
        with pytest.raises(UpstreamError) as info:
            await stream.establish()
    assert info.value.kind == kind and info.value.sqlstate == code
    assert f"{code} sorry, too many clients already" in str(info.value)


async def test_gssenc_rejects_oversized_packet():
    proxy_side, server_side = trio.testing.memory_stream_pair()
    stream = GssEncStream(proxy_side, FakeContext())
    await server_side.send_all(struct.pack(">I", MAX_PACKET + 1))
    with pytest.raises(trio.BrokenResourceError, match="oversized"):
        await stream.receive_some(100)
