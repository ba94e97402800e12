"""GSSAPI-encrypted transport toward a PostgreSQL backend (the link libpq opens with gssencmode).

After the server answers GSSENCRequest with 'G', both sides exchange
context-establishment tokens framed as Int32 length + token; once the
context is complete every packet is Int32 length + gss_wrap()ed data, at
most 16384 bytes including the length word (PqGSSSendBuffer /
PQ_GSS_MAX_PACKET_SIZE in PostgreSQL's be-secure-gssapi.c).  This class is a
``trio.abc.Stream`` so the rest of the engine and the pipeline see plain
bytes; wrap/unwrap run inline (they are local crypto, no KDC traffic).
"""

from __future__ import annotations

import struct
from typing import Any

import trio

from dbproxy.errors import UpstreamError
from dbproxy.kerberos import CLIENT_HINT

MAX_PACKET = 16384
_LEN = struct.Struct(">I")


class GssEncStream(trio.abc.Stream):
    def __init__(self, transport: trio.abc.Stream, ctx: Any) -> None:
        self.transport = transport
        self.ctx = ctx
        self._inbuf = bytearray()
        self._plain = bytearray()
        self._send_lock = trio.Lock()
        self._max_input = MAX_PACKET - 4 - 64

    async def _read_exact(self, n: int) -> bytes:
        while len(self._inbuf) < n:
            data = await self.transport.receive_some(65536)
            if not data:
                raise trio.BrokenResourceError("backend closed the GSS-encrypted link")
            self._inbuf += data
        out = bytes(self._inbuf[:n])
        del self._inbuf[:n]
        return out

    async def establish(self) -> None:
        token = await self.ctx.step(None)
        while True:
            try:
                if token:
                    await self.transport.send_all(_LEN.pack(len(token)) + token)
                if self.ctx.complete:
                    break
                head = await self._read_exact(4)
                if head[:1] == b"E":
                    raise await self._setup_error(head)
                (length,) = _LEN.unpack(head)
                if length > MAX_PACKET:
                    raise UpstreamError(f"oversized GSS token ({length} bytes) from backend", kind="protocol")
                received = await self._read_exact(length)
            except (trio.BrokenResourceError, OSError) as exc:
                # PostgreSQL does not report a token it cannot accept (an unknown
                # service key, a principal it has no key for): it logs
                # "could not accept GSSAPI security context" and hangs up.
                err = UpstreamError(
                    f"backend closed the connection during GSS encryption setup ({exc}): it did not accept"
                    " the proxy's Kerberos ticket; the server log has the reason",
                    kind="auth",
                    client_hint=CLIENT_HINT,
                )
                err.sqlstate = "28000"  # type: ignore[attr-defined]
                raise err from None
            token = await self.ctx.step(received)
        try:
            self._max_input = max(1024, self.ctx.max_wrap_input(MAX_PACKET - 4))
        except Exception:
            pass

    async def _setup_error(self, head: bytes) -> UpstreamError:
        # A server that fails before the context is up (too many connections,
        # shutting down) sends a plain ErrorResponse; libpq's pqsecure_open_gss
        # checks for 'E' the same way.  Its text is unauthenticated (nothing is
        # encrypted yet: CVE-2024-10977): it goes to the log and the audit
        # (the error's message), never to the client's hint.
        (length,) = _LEN.unpack(head[1:] + await self._read_exact(1))
        body = await self._read_exact(min(max(length - 4, 0), MAX_PACKET))
        fields = {part[:1].decode("latin-1"): part[1:].decode("utf-8", "replace") for part in body.split(b"\0") if part}
        sqlstate = fields.get("C", "28000")
        message = fields.get("M", "no message")
        auth = sqlstate.startswith("28")
        err = UpstreamError(
            f"backend refused the GSS encryption setup: {sqlstate} {message}",
            kind="auth" if auth else "protocol",
            client_hint=CLIENT_HINT if auth else f"the backend database refused the connection (SQLSTATE {sqlstate})",
        )
        err.sqlstate = sqlstate  # type: ignore[attr-defined]
        return err

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        out = []
        step = self._max_input
        for i in range(0, len(view), step):
            wrapped = self.ctx.wrap(bytes(view[i : i + step]))
            out.append(_LEN.pack(len(wrapped)))
            out.append(wrapped)
        async with self._send_lock:
            await self.transport.send_all(b"".join(out))

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        while not self._plain:
            if len(self._inbuf) < 4:
                data = await self.transport.receive_some(65536)
                if not data:
                    if self._inbuf:
                        raise trio.BrokenResourceError("backend closed mid-packet on the GSS-encrypted link")
                    return b""
                self._inbuf += data
                continue
            (length,) = _LEN.unpack_from(self._inbuf)
            if length > MAX_PACKET:
                raise trio.BrokenResourceError(f"oversized GSS packet ({length} bytes) from backend")
            if len(self._inbuf) < 4 + length:
                data = await self.transport.receive_some(65536)
                if not data:
                    raise trio.BrokenResourceError("backend closed mid-packet on the GSS-encrypted link")
                self._inbuf += data
                continue
            packet = bytes(self._inbuf[4 : 4 + length])
            del self._inbuf[: 4 + length]
            self._plain += self.ctx.unwrap(packet)
        n = len(self._plain) if max_bytes is None else min(max_bytes, len(self._plain))
        out = bytes(self._plain[:n])
        del self._plain[:n]
        return out

    async def aclose(self) -> None:
        await self.transport.aclose()
