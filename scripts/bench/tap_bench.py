"""Micro-benchmark of the audit worker's taps: tapped frames → observers → events → JSONL.

What ``scripts/bench/audit_bench.py`` leaves out: the engine's worker-side tap
(``FrameTap.feed``: the frame loop, the message, the observers, the value
rendering) in front of the same recorder path.  No servers: the frames are
the ones the end-to-end benchmarks produce, built here —

    cql select   EXECUTE of ``SELECT v FROM bench.kv WHERE k = ?`` (v5, one int
                 bound, page size, timestamp, skip-metadata: cassandra-driver's
                 own encoding) + RESULT Rows with one text row, no metadata
    cql insert   EXECUTE of ``INSERT INTO bench.kv_w (k, v) VALUES (?, ?)``
                 (bigint, 100-char text) + RESULT Void
    mongo find   OP_MSG ``find`` with filter {_id: k}, limit 1, singleBatch
                 (pymongo's ``find_one``) + its reply (one small document)
    mongo insert OP_MSG ``insert`` with a document sequence of one document
                 + ``{n: 1, ok: 1}``
    pg select    pgbench -S -M simple: a Query + RowDescription, DataRow,
                 CommandComplete, ReadyForQuery

— fed to the engine's tap class (``CqlTap`` / ``MongoTap``) over a real
``TemplateAudit`` + ``AuditRecorder`` + ``JsonlSink`` (written in the loop,
``fsync: never``), ``--batch`` request/answer pairs per feed (what a busy
session's pump hands over at once).  Reports CPU per request/answer pair:
the least over ``--samples`` short samples (robust on a shared, busy
machine — some samples run undisturbed), and optionally a cProfile.

    python scripts/bench/tap_bench.py                       # every workload
    python scripts/bench/tap_bench.py --workloads cql-select --profile 25
    python scripts/bench/tap_bench.py --worker 300 --batch 1  # the real worker process, 300 writes/s
    python scripts/bench/tap_bench.py --tee --workloads mongo-find,cql-insert  # the proxy's tees

``--tee``: instead, the proxy's side of a tapped Mongo or CQL session — the
two tees (``engines/mongo/tee.py``, ``engines/cassandra/tap.py``'s
``CqlTee``: framing — for CQL v5 the LZ4 segments with their CRCs, as the
benchmark's driver sends them —, the request check that keeps "nothing
unaudited", the tap) over the same frames, one wire chunk per feed.

``--worker RATE``: instead, the real audit worker process (``python -m
dbproxy.audit.worker``, a JSONL sink) is fed over its stdin as the proxy's
link feeds it — an O frame opening the tap, then T frames, requests and
answers in alternate writes, ``RATE`` writes a second, ``--batch`` pairs per
write — for ``--seconds``; reported: the worker's CPU (``/proc``, user+sys)
per pair.  It shows what the in-process figures leave out: the worker's
cost per wake-up (trio's loop, the pipe read, the recorder's batch and
write, acks), which dominates when a slow load hands over a frame or two
per write.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import struct
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from dbproxy.audit.recorder import AuditRecorder, TemplateAudit  # noqa: E402
from dbproxy.audit.sinks.jsonl import JsonlSink  # noqa: E402

from scripts.bench.audit_bench import TEMPLATE  # noqa: E402  (a CQL session's common fields)
WORKLOADS = ("cql-select", "cql-insert", "mongo-find", "mongo-insert", "pg-select")
CLIENT, BACKEND = 0, 1


# --------------------------------------------------------------------------- CQL


def _cql_string(s: str) -> bytes:
    b = s.encode()
    return struct.pack(">H", len(b)) + b


def _cql_frame(version: int, stream: int, opcode: int, body: bytes, response: bool) -> bytes:
    return struct.pack(">BBhBI", version | (0x80 if response else 0), 0, stream, opcode, len(body)) + body


def cql_session(workload: str, pairs: int):
    """(tap class, params, setup feeds, per-pair (request, answer) frames) of a CQL workload."""
    from cassandra.protocol import ExecuteMessage, ProtocolHandler
    from cassandra.query import ConsistencyLevel

    from dbproxy.engines.cassandra import tap as T

    version = 5
    query_id = bytes.fromhex("3bf1e5c0a1d24c0e9f8a7b6c5d4e3f21")
    meta_id = bytes.fromhex("0011223344556677")
    if workload == "cql-select":
        cql = "SELECT v FROM bench.kv WHERE k = ?"
        bind = [("k", struct.pack(">H", 0x0009))]
    else:
        cql = "INSERT INTO bench.kv_w (k, v) VALUES (?, ?)"
        bind = [("k", struct.pack(">H", 0x0002)), ("v", struct.pack(">H", 0x000D))]
    prepare = struct.pack(">i", len(cql)) + cql.encode() + struct.pack(">I", 0)
    prepared = (struct.pack(">i", 4) + _cql_string_bytes(query_id) + _cql_string_bytes(meta_id)
                + struct.pack(">iii", 0x0001, len(bind), 1) + struct.pack(">H", 0)
                + _cql_string("bench") + _cql_string(workload.split("-")[1] == "select" and "kv" or "kv_w")
                + b"".join(_cql_string(n) + t for n, t in bind) + struct.pack(">ii", 0x0004, 0))
    setup = [(CLIENT, _cql_frame(version, 1, 0x09, prepare, False)),
             (BACKEND, _cql_frame(version, 1, 0x08, prepared, True))]
    steps = []
    for n in range(pairs):
        stream = n % 64 + 2
        if workload == "cql-select":
            values = [struct.pack(">i", n)]
            answer = (struct.pack(">iii", 2, 0x0004, 1) + struct.pack(">i", 1)
                      + struct.pack(">i", 36) + (f"value-{n:05d}" * 3)[:36].encode())
            answer = _cql_frame(version, stream, 0x08, answer, True)
        else:
            values = [struct.pack(">q", (1 << 50) + n), b"w" * 100]
            answer = _cql_frame(version, stream, 0x08, struct.pack(">i", 1), True)
        msg = ExecuteMessage(query_id, values, ConsistencyLevel.LOCAL_ONE, fetch_size=5000, timestamp=1_700_000_000_000_000 + n,
                             skip_meta=workload == "cql-select", result_metadata_id=meta_id)
        request = ProtocolHandler.encode_message(msg, stream, version, None, False)
        steps.append((request, answer))
    return T.CqlTap, {}, setup, steps, b'"db.session.cassandra.execute"'


def _cql_string_bytes(b: bytes) -> bytes:
    return struct.pack(">H", len(b)) + b


# --------------------------------------------------------------------------- Mongo


def _op_msg(request_id: int, response_to: int, sections: bytes, flags: int = 0) -> bytes:
    body = struct.pack("<I", flags) + sections
    return struct.pack("<iiii", 16 + len(body), request_id, response_to, 2013) + body


def mongo_session(workload: str, pairs: int):
    import bson

    from dbproxy.engines.mongo import tap as T

    steps = []
    session_id = {"id": bson.Binary(bytes(range(16)), 4)}
    cluster_time = {"clusterTime": bson.Timestamp(1_700_000_000, 1),
                    "signature": {"hash": bson.Binary(b"\0" * 20), "keyId": 0}}
    for n in range(pairs):
        rid = n + 100
        if workload == "mongo-find":
            cmd = {"find": "kv", "filter": {"_id": n}, "limit": 1, "singleBatch": True, "lsid": session_id,
                   "$clusterTime": cluster_time, "$db": "bench"}
            request = _op_msg(rid, 0, b"\x00" + bson.encode(cmd))
            reply = {"cursor": {"firstBatch": [{"_id": n, "v": f"value-{n}" * 4}], "id": bson.Int64(0), "ns": "bench.kv"},
                     "ok": 1.0}
        else:
            cmd = {"insert": "kv_w", "ordered": True, "lsid": session_id, "$clusterTime": cluster_time, "$db": "bench"}
            doc = bson.encode({"_id": bson.ObjectId(), "k": n, "v": "w" * 100})
            seq = b"documents\x00" + doc
            request = _op_msg(rid, 0, b"\x00" + bson.encode(cmd) + b"\x01" + struct.pack("<i", 4 + len(seq)) + seq)
            reply = {"n": 1, "ok": 1.0}
        answer = _op_msg(n + 10_000_000, rid, b"\x00" + bson.encode(reply))
        steps.append((request, answer))
    return T.MongoTap, {}, [], steps, b'"db.session.query"'


# --------------------------------------------------------------------------- PostgreSQL


def _pg(mtype: bytes, body: bytes) -> bytes:
    return mtype + struct.pack(">i", 4 + len(body)) + body


def pg_session(workload: str, pairs: int):
    """pgbench -S -M simple: Query, then RowDescription, DataRow, CommandComplete, ReadyForQuery."""
    from dbproxy.engines.postgres import tap as T

    steps = []
    row_description = _pg(b"T", struct.pack(">h", 1) + b"abalance\x00" + struct.pack(">ihihih", 16384, 3, 23, 4, -1, 0))
    for n in range(pairs):
        query = _pg(b"Q", f"SELECT abalance FROM pgbench_accounts WHERE aid = {n * 7 + 1};".encode() + b"\x00")
        answer = (row_description + _pg(b"D", struct.pack(">hi", 1, 1) + b"0") + _pg(b"C", b"SELECT 1\x00")
                  + _pg(b"Z", b"I"))
        steps.append((query, answer))
    return T.Tap, {}, [], steps, b'"db.session.query"'


# --------------------------------------------------------------------------- run


def build(workload: str, pairs: int):
    if workload.startswith("pg"):
        return pg_session(workload, pairs)
    return cql_session(workload, pairs) if workload.startswith("cql") else mongo_session(workload, pairs)


def run(workload: str, samples: int, pairs: int, batch: int, profile: int) -> tuple[float, int]:
    tap_cls, params, setup, steps, mark = build(workload, pairs)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "tap.jsonl")
        sink = JsonlSink(path=path, fsync="never")
        recorder = AuditRecorder([sink], capacity=10_000_000)
        recorder.track_changes()
        template = dict(TEMPLATE, db_protocol={"cql": "cassandra", "mon": "mongodb", "pg-": "postgres"}[workload[:3]])
        audit = TemplateAudit(recorder, template)
        tap = tap_cls(audit, **params)
        for direction, data in setup:
            tap.feed(direction, data)
        queue = recorder._queue
        # Batches: ``batch`` requests in one feed, their answers in the next (a pump's batch).
        feeds = []
        for i in range(0, len(steps), batch):
            chunk = steps[i:i + batch]
            feeds.append((b"".join(r for r, _ in chunk), b"".join(a for _, a in chunk)))
        best = float("inf")
        prof = cProfile.Profile() if profile else None
        now = time.time()
        for s in range(samples):
            start = time.process_time()
            if prof is not None and s == samples - 1:
                prof.enable()
            for requests, answers in feeds:
                audit.when = now
                tap.feed(CLIENT, requests)
                tap.feed(BACKEND, answers)
            batch_events = list(queue)
            queue.clear()
            sink._write(b"".join(recorder._stamp(batch_events).lines))
            if prof is not None and s == samples - 1:
                prof.disable()
            best = min(best, (time.process_time() - start) / len(steps))
        sink._file.close()
        with open(path, "rb") as f:
            audited = sum(1 for line in f if mark in line)
        if prof is not None:
            print(f"--- cProfile of one sample of {workload}")
            pstats.Stats(prof).sort_stats("tottime").print_stats(profile)
    return best * 1e6, audited


def worker_rate(workload: str, rate: float, seconds: float, batch: int) -> tuple[float, int]:
    """CPU per pair of the real worker process fed ``rate`` writes a second (see the docstring)."""
    import json
    import subprocess

    from dbproxy.audit.link import CLOSE, OPEN, QUIT, TAP
    from dbproxy.audit.link import FRAME as LINK_FRAME

    tap_cls, params, setup, steps, _ = build(workload, 4096)

    def frame(kind: int, direction: int, payload: bytes) -> bytes:
        return LINK_FRAME.pack(kind, len(payload), 1, direction, time.time()) + payload

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with tempfile.TemporaryDirectory() as tmp:
        config = os.path.join(tmp, "worker.json")
        with open(config, "w") as f:
            json.dump({"listeners": [], "audit": {"sinks": [{"type": "jsonl", "path": os.path.join(tmp, "a.jsonl")}]}}, f)
        env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.Popen([sys.executable, "-m", "dbproxy.audit.worker", config, "WARNING"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, env=env, cwd=root)
        try:
            proc.stdout.readline()  # {"ready": true, ...}
            out = proc.stdin.fileno()
            template = dict(TEMPLATE, db_protocol={"cql": "cassandra", "mon": "mongodb", "pg-": "postgres"}[workload[:3]])
            spec = {"tap": f"{tap_cls.__module__}:{tap_cls.__qualname__}", "template": template, "params": params}
            os.write(out, frame(OPEN, 0, json.dumps(spec).encode()))
            for direction, data in setup:
                os.write(out, frame(TAP, direction, data))
            time.sleep(0.5)

            def cpu() -> float:
                with open(f"/proc/{proc.pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

            start_cpu, start, pairs = cpu(), time.monotonic(), 0
            while time.monotonic() - start < seconds:
                chunk = [steps[(pairs + k) % len(steps)] for k in range(batch)]
                os.write(out, frame(TAP, CLIENT, b"".join(r for r, _ in chunk)))
                time.sleep(1 / rate)
                os.write(out, frame(TAP, BACKEND, b"".join(a for _, a in chunk)))
                time.sleep(1 / rate)
                pairs += batch
            time.sleep(0.3)  # the last batch's write and ack
            used = cpu() - start_cpu
            os.write(out, frame(CLOSE, 0, b"") + frame(QUIT, 0, b""))
        finally:
            proc.stdin.close()
            proc.wait(30)
    return used / pairs * 1e6, pairs


def _mongo_tees(workload: str, pairs: int, tap: Any):
    from dbproxy.engines.mongo.codec import MongoDecoder
    from dbproxy.engines.mongo.errors import AttributingDecoder
    from dbproxy.engines.mongo.stages.session import MongoSessionState
    from dbproxy.engines.mongo.tee import TeeState

    _, _, _, steps, _ = mongo_session(workload, pairs)
    tees = TeeState(MongoSessionState(auth=None, max_message_size=48_000_000))
    client = tees.over(AttributingDecoder(MongoDecoder(), "client"), tees.sides[0], tap)
    backend = tees.over(AttributingDecoder(MongoDecoder(), "backend"), tees.sides[1], tap)
    return client, backend, steps, lambda: bool(tees.pending)


def _cql_tees(workload: str, pairs: int, tap: Any):
    """A v5 session as the benchmark's driver runs it: LZ4 segments, one frame per segment."""
    from dbproxy.engines.cassandra.codec import CqlDecoder
    from dbproxy.engines.cassandra.observers import CqlSessionState
    from dbproxy.engines.cassandra.prepared import PreparedCache
    from dbproxy.engines.cassandra.segments import encode_segments
    from dbproxy.engines.cassandra.tap import CqlTee

    _, _, _, steps, _ = cql_session(workload, pairs)
    state = CqlSessionState(backend="127.0.0.1:9042", prepared=PreparedCache(), version=5)
    decoders = CqlDecoder("client"), CqlDecoder("server")
    for decoder in decoders:
        decoder.set_framing("segments", "lz4")
    client = CqlTee(decoders[0], tap, state, client=True)
    backend = CqlTee(decoders[1], tap, state, client=False)
    steps = [(encode_segments(r, compress=True), encode_segments(a, compress=True)) for r, a in steps]
    return client, backend, steps, lambda: bool(state.pending)


def tee_cost(workload: str, samples: int, pairs: int) -> float:
    """The proxy's side of a tapped session: µs CPU per request+answer through the two tees
    (``engines.mongo.tee`` / ``engines.cassandra.tap.CqlTee``: frame, check, tap), one wire
    chunk per feed as a synchronous client's pump receives them; the least over ``samples``."""
    tapped: list = []
    build_tees = _cql_tees if workload.startswith("cql-") else _mongo_tees
    client, backend, steps, pending = build_tees(workload, pairs, tapped.append)
    best = float("inf")
    for _ in range(samples):
        start = time.process_time()
        for request, answer in steps:
            client.feed(request)
            client.next_message()
            client.buffer.compact()
            backend.feed(answer)
            backend.next_message()
            backend.buffer.compact()
        best = min(best, (time.process_time() - start) / len(steps))
        if len(tapped) != 2 * len(steps) or pending():
            raise AssertionError("the tees did not tap every frame as passive")
        tapped.clear()
    return best * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--samples", type=int, default=60)
    ap.add_argument("--pairs", type=int, default=512, help="request/answer pairs per sample")
    ap.add_argument("--batch", type=int, default=16, help="pairs per feed")
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="cProfile the last sample, print top N")
    ap.add_argument("--worker", type=float, default=0, metavar="RATE",
                    help="instead: the real worker process fed RATE writes/s (--batch pairs each)")
    ap.add_argument("--seconds", type=float, default=5.0, help="with --worker: how long")
    ap.add_argument("--tee", action="store_true",
                    help="instead: the proxy's tees of a tapped session (cql-* and mongo-* workloads)")
    args = ap.parse_args(argv)
    if args.tee:
        for workload in args.workloads.split(","):
            if workload.startswith("pg-"):
                continue  # PostgreSQL's tees are the core's ``dbproxy.tee.Tee``: not measured here
            us = tee_cost(workload, args.samples, args.pairs)
            print(f"{workload:13s} proxy tees: least {us:6.2f} µs CPU per request+answer")
        return 0
    if args.worker:
        for workload in args.workloads.split(","):
            us, pairs = worker_rate(workload, args.worker, args.seconds, args.batch)
            print(f"{workload:13s} worker process: {us:7.1f} µs CPU per request+answer  "
                  f"({pairs} pairs, {args.worker:.0f} writes/s, {args.batch} per write)")
        return 0
    for workload in args.workloads.split(","):
        if workload not in WORKLOADS:
            ap.error(f"unknown workload {workload!r}")
        us, audited = run(workload, args.samples, args.pairs, args.batch, args.profile)
        expected = args.pairs * args.samples
        print(f"{workload:13s} least {us:6.2f} µs CPU per request+answer  (audited {audited}/{expected})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
