"""An ErrorResponse during GSS encryption setup: unauthenticated text never reaches the client.

Nothing is encrypted before the GSS context is up, so a man in the middle
could write that text (CVE-2024-10977): the proxy keeps it for its log and
audit (the error's message) and gives the client its own words.
"""

from __future__ import annotations

import trio
import trio.testing

from dbproxy.engines.postgres import messages as m
from dbproxy.engines.postgres.gssenc import GssEncStream


class _Ctx:
    complete = False

    async def step(self, token):
        return b"first-token"


async def _setup_error_for(sqlstate: str) -> Exception:
    proxy_side, server_side = trio.testing.memory_stream_pair()
    stream = GssEncStream(proxy_side, _Ctx())
    error = m.encode_error("FATAL", sqlstate, "INJECTED-PRE-AUTH-TEXT")
    with trio.fail_after(5):
        await server_side.send_all(error)
        try:
            await stream.establish()
        except Exception as exc:  # the UpstreamError under test
            return exc
    raise AssertionError("establish() accepted an ErrorResponse")


async def test_non_auth_setup_error_keeps_the_servers_text_from_the_client():
    exc = await _setup_error_for("53300")
    assert "INJECTED-PRE-AUTH-TEXT" not in exc.client_hint
    assert "53300" in exc.client_hint
    assert "INJECTED-PRE-AUTH-TEXT" in str(exc)  # for the log and the audit event
    assert exc.sqlstate == "53300"


async def test_auth_setup_error_gives_the_kerberos_hint():
    exc = await _setup_error_for("28000")
    assert "INJECTED-PRE-AUTH-TEXT" not in exc.client_hint
    assert exc.kind == "auth"
