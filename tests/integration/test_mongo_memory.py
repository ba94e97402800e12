"""The buffer budget and the partial-message deadline in the Mongo engine (issue 13 §3).

Real FerretDB 1.24, the real proxy, pymongo for a well-behaved client; raw
sockets send the partial messages (no driver sends half a message on
purpose).  A request refused for the budget or ended by the deadline gets
``ok: 0`` on its own requestID, then the connection closes; other clients go on.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path

import pytest

from tests.integration.test_mongo_proxy import OP_MSG, closed, connect, ferret, raw_session, recv_reply  # noqa: F401
from tests.integration.test_mongo_proxy import build_config
from tests.support import ProxyProcess, read_audit, wait_until

pytestmark = pytest.mark.integration

BUDGET = 4 * 1024 * 1024
TIMEOUT = 3.0


@pytest.fixture(scope="module")
def proxy(ferret, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("mongomem")
    config = build_config(ferret, workdir)
    config["buffers"] = {"budget_bytes": BUDGET, "message_timeout_seconds": TIMEOUT}
    proc = ProxyProcess(workdir, config).start()
    proc.audit_path = workdir / "audit.jsonl"
    yield proc
    proc.stop()


def _partial_op_msg(announced: int, request_id: int, sent: int) -> bytes:
    """The first ``sent`` bytes of an OP_MSG announcing ``announced`` bytes (flagBits, kind 0, a BSON start)."""
    head = struct.pack("<iiii", announced, request_id, 0, OP_MSG) + struct.pack("<I", 0) + b"\x00"
    return (head + b"\x00" * sent)[:sent]


def _session_end(proxy, text: str) -> list[dict]:
    def check():
        return [e for e in read_audit(proxy.audit_path) if e["event"] == "db.session.end" and text in e.get("reason", "")]

    return wait_until(check, timeout=15, what=f"session end with {text!r}")


def test_request_that_cannot_fit_the_budget_gets_ok0(proxy):
    sock, _ = raw_session(proxy)
    with sock, connect(proxy) as other:
        # 10 MB is within Mongo's 48 MB maxMessageSizeBytes, but not within the proxy's 4 MiB budget.
        sock.sendall(_partial_op_msg(10_000_000, 7, 1000))
        opcode, response_to, doc = recv_reply(sock)
        assert (opcode, response_to, doc["ok"], doc["code"]) == (OP_MSG, 7, 0.0, 17)
        assert doc["errmsg"].startswith("dbproxy: the proxy is out of buffer memory for this message (10000000 bytes needed")
        assert closed(sock)
        assert other.admin.command("ping")["ok"] == 1.0  # other sessions go on
    _session_end(proxy, "buffer budget exceeded")


def test_request_not_completed_in_time_gets_ok0(proxy):
    sock, _ = raw_session(proxy)
    with sock:
        start = time.monotonic()
        sock.sendall(_partial_op_msg(2000, 8, 100))
        opcode, response_to, doc = recv_reply(sock)
        elapsed = time.monotonic() - start
        assert (opcode, response_to, doc["ok"]) == (OP_MSG, 8, 0.0)
        assert doc["errmsg"] == f"dbproxy: message not received in time (the proxy waits {TIMEOUT:g} s for a message to complete)"
        assert TIMEOUT - 0.5 <= elapsed < TIMEOUT + 5
        assert closed(sock)
    _session_end(proxy, "message not received in time")
