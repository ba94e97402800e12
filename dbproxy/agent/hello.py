"""The agent's hello: one JSON line each way before the link turns into HTTP/2.

    agent → proxy   {"agent": "dbproxy-agent/1", "node": "site-a", "token": "…", "version": "0.1.0"}\\n
    proxy → agent   {"ok": true, "node": "site-a"}\\n
                    {"ok": false, "reason": "token_expired", "message": "…"}\\n   (then the proxy closes)

The token travels inside TLS (the agent verified the proxy's certificate
first) and only here: never in HTTP/2 headers, logs or the audit trail.  A
line is at most ``MAX_LINE`` bytes; what a read brought after the newline is
returned with the line (it belongs to HTTP/2).
"""

from __future__ import annotations

from typing import Any

import orjson
import trio

MAX_LINE = 16 * 1024
PROTOCOL = "dbproxy-agent/1"


class HelloError(Exception):
    """The peer's hello line is missing, too long or not a JSON object."""


def encode(message: dict) -> bytes:
    return orjson.dumps(message) + b"\n"


async def read_line(stream: trio.abc.Stream) -> tuple[dict, bytes]:
    """One JSON object line from ``stream`` and the bytes read past it.  The caller sets the deadline."""
    buf = bytearray()
    while b"\n" not in buf:
        if len(buf) > MAX_LINE:
            raise HelloError(f"hello longer than {MAX_LINE} bytes")
        data = await stream.receive_some(4096)
        if not data:
            raise HelloError("the peer closed before its hello")
        buf += data
    line, _, rest = bytes(buf).partition(b"\n")
    try:
        message: Any = orjson.loads(line)
    except orjson.JSONDecodeError:
        raise HelloError("hello is not JSON") from None
    if not isinstance(message, dict):
        raise HelloError("hello is not a JSON object")
    return message, rest
