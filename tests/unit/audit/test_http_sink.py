"""The HTTP sink against a local receiver (http.server in a thread): 413 splitting, refused tokens, keep-alive.

Retries after 5xx, gzip and the HEC/NDJSON shapes through the real proxy are
in tests/integration/test_audit_shipping.py.
"""

from __future__ import annotations

import gzip
import http.server
import logging
import threading
import time

import orjson
import pytest
import trio

from dbproxy.audit.recorder import chain_hash
from dbproxy.audit.sinks.http import HttpSink
from dbproxy.config import SecretRef


class Receiver:
    def __init__(self, decide):
        self.requests: list[dict] = []
        self.connections: set[int] = set()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                events = [orjson.loads(x) for x in gzip.decompress(body).splitlines()]
                status = decide(self, events)
                receiver.requests.append({"status": status, "events": events, "auth": self.headers.get("Authorization")})
                receiver.connections.add(self.client_address[1])
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/ingest"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def delivered(self):
        return [e for r in self.requests if r["status"] == 200 for e in r["events"]]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def events(n, start=1):
    out = []
    prev = "0" * 64
    for seq in range(start, start + n):
        e = {"event": "db.session.query", "uid": f"u{seq}", "time": "2024-05-01T10:00:00.000001Z", "seq": seq, "prev_hash": prev}
        prev = e["hash"] = chain_hash(e)
        out.append(e)
    return out


async def run_sink(sink, batches, done, timeout=10):
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        for batch in batches:
            await sink.write_batch(batch)
        with trio.fail_after(timeout):
            while not done():
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    await sink.aclose()


@pytest.fixture
def make_receiver():
    made = []

    def make(decide):
        r = Receiver(decide)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


async def test_413_splits_the_batch(tmp_path, make_receiver):
    r = make_receiver(lambda h, evs: 413 if len(evs) > 3 else 200)
    sink = HttpSink(url=r.url, format="ndjson", name="h", spool_dir=str(tmp_path), retry_initial_seconds=0.01)
    await run_sink(sink, [events(10)], lambda: len(r.delivered()) >= 10)
    assert [e["seq"] for e in r.delivered()] == list(range(1, 11))
    assert r.requests[0]["status"] == 413 and max(len(x["events"]) for x in r.requests if x["status"] == 200) <= 3
    assert len(r.connections) == 1  # one kept-alive connection for every request


async def test_refused_token_is_logged_and_retried_never_dropped(tmp_path, make_receiver, caplog):
    caplog.set_level(logging.ERROR, logger="dbproxy.audit.http")
    token = tmp_path / "token"
    token.write_text("wrong\n")
    r = make_receiver(lambda h, evs: 200 if h.headers["Authorization"] == "Splunk right" else 403)
    sink = HttpSink(url=r.url, format="hec", token=SecretRef(file=str(token)), name="h", spool_dir=str(tmp_path / "s"),
                    retry_initial_seconds=0.01, retry_max_seconds=0.05)

    def fix_token_after_two_refusals():
        if sum(x["status"] == 403 for x in r.requests) >= 2:
            token.write_text("right\n")  # rotated on disk: read at the next request
        return len(r.delivered()) >= 5

    await run_sink(sink, [events(5)], fix_token_after_two_refusals)
    assert [w["event"]["seq"] for w in r.delivered()] == [1, 2, 3, 4, 5]
    assert any("refused the batch (HTTP 403" in rec.getMessage() for rec in caplog.records)
    assert all("right" not in rec.getMessage() and "wrong" not in rec.getMessage() for rec in caplog.records)


def _slow_counting(delay, fail_first=0):
    """A decide() that holds each request *delay* s and records how many overlap; the first
    *fail_first* requests get 503."""
    state = {"now": 0, "max": 0, "seen": 0}
    lock = threading.Lock()

    def decide(handler, evs):
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
            state["seen"] += 1
            fail = state["seen"] <= fail_first
        time.sleep(delay)
        with lock:
            state["now"] -= 1
        return 503 if fail else 200

    return decide, state


@pytest.mark.parametrize("in_flight", [1, 4])
async def test_concurrent_batches_on_kept_alive_connections(tmp_path, make_receiver, in_flight):
    decide, state = _slow_counting(0.1)
    r = make_receiver(decide)
    sink = HttpSink(url=r.url, format="ndjson", name="h", spool_dir=str(tmp_path), batch_max_events=10, max_in_flight=in_flight)
    await run_sink(sink, [events(200)], lambda: sink.statistics().pending_events == 0, timeout=30)
    got = r.delivered()
    assert sorted(e["seq"] for e in got) == list(range(1, 201)) and len(got) == 200  # each once
    assert state["max"] == in_flight  # that many requests at once, never more
    assert len(r.connections) == in_flight  # each connection kept alive and reused
    if in_flight == 1:
        assert [e["seq"] for e in got] == list(range(1, 201))  # one at a time: in order


async def test_a_failed_batch_among_concurrent_ones_is_resent_nothing_lost(tmp_path, make_receiver):
    decide, state = _slow_counting(0.05, fail_first=1)
    r = make_receiver(decide)
    sink = HttpSink(url=r.url, format="ndjson", name="h", spool_dir=str(tmp_path), batch_max_events=10, max_in_flight=4,
                    retry_initial_seconds=0.01)
    await run_sink(sink, [events(100)], lambda: sink.statistics().pending_events == 0, timeout=30)
    seqs = [e["seq"] for e in r.delivered()]
    assert set(seqs) == set(range(1, 101))  # the failed batch (and any behind it) sent again
    assert [r_["status"] for r_ in r.requests].count(503) == 1
    assert sink.delivered >= 100 and sink.statistics().in_flight == 0
