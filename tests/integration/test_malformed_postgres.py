"""A malformed message must not blind the audit (issue 13 §1): PostgreSQL 15, the real proxy, raw sockets.

The rule: a client message that frames correctly but whose body the audit cannot parse is refused
before it is forwarded, audited as ``audit.malformed`` (direction, type, length, first 64 bytes in hex,
truncated marker), and the session ends with FATAL 08P01.  Every case runs with the audit worker (the
default: the proxy only frames, the worker parses) and with ``"audit": {"worker": false}``.

Each case sends, after a real login and in one TCP chunk, a valid INSERT, then the malformed message,
then another INSERT; then, if the session is still open, one more INSERT.  Checked: the client gets
FATAL 08P01 and the connection closes; the trail has the malformed event with the frame's hex prefix;
the first INSERT was audited and executed, the malformed statement and everything after it were not
executed; every row the session inserted has its audit record (the old failure: later statements ran
unaudited); another session works.
"""

from __future__ import annotations

import socket
import struct
import time
import uuid
from pathlib import Path

import pytest

from tests.support import ProxyProcess, jsonl_audit, pg_connect, pg_scram_config, pg_session, wait_audit

pytestmark = pytest.mark.integration

TABLE = "malformed_t"


def config(pg, workdir: Path, *, worker: bool) -> dict:
    return pg_scram_config(pg, workdir, jsonl_audit(workdir, worker=None if worker else False))


@pytest.fixture(scope="module", params=[True, False], ids=["worker", "in-process"])
def proxy(request, pg, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("malformed-worker" if request.param else "malformed-inline")
    proc = ProxyProcess(workdir, config(pg, workdir, worker=request.param)).start()
    proc.audit_path = workdir / "audit.jsonl"
    with pg_connect(proc) as conn:
        conn.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (v text)")
    yield proc
    proc.stop()


def msg(t: bytes, body: bytes) -> bytes:
    return t + struct.pack(">i", len(body) + 4) + body


def query(sql: str) -> bytes:
    return msg(b"Q", sql.encode() + b"\0")


def insert(value: str) -> str:
    return f"insert into {TABLE} values ('{value}')"


def login(proxy) -> socket.socket:
    return pg_session(proxy.port(), user="alice", database="app")[0]


def read_answer(s: socket.socket, timeout: float = 5.0) -> tuple[bytes, bool]:
    """What the proxy sends until it closes (True) or, the session going on, a quiet ReadyForQuery (False)."""
    data = b""
    s.settimeout(timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            return data, True
        except socket.timeout:
            break
        if not chunk:
            return data, True
        data += chunk
    return data, False


def bad_cases(tag: str) -> dict[str, bytes]:
    bad_sql = insert(f"bad-{tag}").encode()
    return {
        # The example: 'select 1' without its terminating NUL.
        "issue-example": bytes.fromhex("510000000c73656c6563742031"),
        "query-without-nul": msg(b"Q", bad_sql),
        "parse-short-oids": msg(b"P", b"s_" + tag[:8].encode() + b"\0" + bad_sql + b"\0" + struct.pack(">h", 2)),
        "bind-value-overruns": msg(b"B", b"\0\0" + struct.pack(">hhi", 0, 1, 50) + b"abc"),
        "execute-without-nul": msg(b"E", b"unterminated-portal"),
        "close-empty": msg(b"C", b""),
    }


CASES = sorted(bad_cases("x"))


def audited(proxy, predicate, what: str, timeout: float = 15.0) -> list[dict]:
    return wait_audit(proxy.audit_path, predicate, timeout=timeout, what=what)


def rows(proxy, tag: str) -> set[str]:
    with pg_connect(proxy) as conn:
        return {v for (v,) in conn.execute(f"select v from {TABLE} where v like %s", (f"%-{tag}",))}


@pytest.mark.parametrize("case", CASES)
def test_malformed_client_message_is_refused_audited_and_ends_the_session(proxy, case: str) -> None:
    tag = uuid.uuid4().hex[:12]
    bad = bad_cases(tag)[case]
    s = login(proxy)
    s.sendall(query(insert(f"before-{tag}")) + bad + query(insert(f"after-{tag}")))
    data, closed = read_answer(s)
    if not closed:  # the old failure: the session goes on; what it runs next must still be audited
        s.sendall(query(insert(f"later-{tag}")))
        more, closed = read_answer(s)
        data += more
    s.close()
    assert b"FATAL\0" in data and b"C08P01\0" in data and b"malformed" in data, data
    assert closed, "the session must end after a malformed message"

    events = audited(proxy, lambda evs: any(e.get("event") == "db.session.end" and e.get("sid") == sid_of(evs, tag)
                                             for e in evs), f"the end of session {tag}")
    sid = sid_of(events, tag)
    mine = [e for e in events if e.get("sid") == sid]
    [bad_event] = [e for e in mine if e["event"] == "audit.malformed"]
    assert bad_event["direction"] == "client" and bad_event["code"] == "TAU01W" and bad_event["success"] is False
    assert bad_event["message_code"] == chr(bad[0]) and bad_event["length"] == len(bad)
    assert bad_event["prefix_hex"] == bad[:64].hex()
    assert bad_event["truncated"] is (len(bad) > 64)
    # The order of the trail is the order of the wire: the INSERT before, then the refused message.
    order = [e["event"] for e in mine]
    assert order.index("db.session.query") < order.index("audit.malformed") < order.index("db.session.end")

    # The backend ran the statement before the malformed one, and nothing from it on.
    present = rows(proxy, tag)
    assert present == {f"before-{tag}"}
    # Nothing ran unaudited: every row of this session has its query in the trail.
    queries = [e.get("db_query") for e in mine if e["event"] == "db.session.query"]
    for value in present:
        assert insert(value) in queries
    assert not any(f"after-{tag}" in (q or "") or f"later-{tag}" in (q or "") for q in queries)


def sid_of(events: list[dict], tag: str) -> str | None:
    for e in events:
        if e.get("event") == "db.session.query" and f"before-{tag}" in (e.get("db_query") or ""):
            return e["sid"]
    return None


def test_other_sessions_keep_working_while_one_sends_malformed_messages(proxy) -> None:
    tag = uuid.uuid4().hex[:12]
    with pg_connect(proxy) as other:
        other.execute(insert(f"other1-{tag}"))
        s = login(proxy)
        s.sendall(query(insert(f"before-{tag}")) + bad_cases(tag)["query-without-nul"])
        data, closed = read_answer(s)
        s.close()
        assert closed and b"C08P01\0" in data
        other.execute(insert(f"other2-{tag}"))
        assert other.execute("select 'still here'").fetchone() == ("still here",)
    assert rows(proxy, tag) == {f"before-{tag}", f"other1-{tag}", f"other2-{tag}"}
    audited(proxy, lambda evs: sum(1 for e in evs if f"-{tag}" in (e.get("db_query") or "")) == 3,
            "the three valid inserts audited")
