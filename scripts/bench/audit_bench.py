"""Micro-benchmark of the audit worker's core path: emit → stamp → JSONL sink.

N query/result event pairs of realistic ``db.session.query`` / ``db.session.result``
shapes (a CQL session's template and fields) go through the real ``TemplateAudit``
(the audit worker's session view), ``AuditRecorder`` (drain, ``_stamp``: session_seq,
seq, hash chain) and ``JsonlSink`` (written in-loop, as the worker does) into a file in
a temporary directory.  Reports CPU time (``time.process_time``: all threads) per event,
best of ``--rounds``, and optionally a cProfile of one round.

    python scripts/bench/audit_bench.py                  # 20000 pairs, 5 rounds
    python scripts/bench/audit_bench.py --profile 25     # + top 25 cProfile entries
    python scripts/bench/audit_bench.py --core 400       # least of 400 short samples, no trio
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time

import trio

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from dbproxy.audit.recorder import AuditRecorder, TemplateAudit  # noqa: E402
from dbproxy.audit.sinks.jsonl import JsonlSink  # noqa: E402

TEMPLATE = {
    "sid": "7f3c2a1e-4b5d-4c6e-8f90-a1b2c3d4e5f6",
    "user": "alice@example.com",
    "roles": ["dba", "readers"],
    "auth_method": "token",
    "db_protocol": "cassandra",
    "listener": "cql",
    "db_name": "bench",
    "db_user": "cassandra",
    "db_uri": "127.0.0.1:9042",
    "addr.remote": "127.0.0.1:53412",
    "token_id": "tok-0123456789abcdef",
    "route": "cql-main",
}


async def one_round(path: str, pairs: int, sessions: int) -> tuple[float, int]:
    sink = JsonlSink(path=path, fsync="never")
    sink.write_in_thread = False  # the audit worker writes in its own loop
    recorder = AuditRecorder([sink], capacity=100_000)
    recorder.track_changes()
    audits = []
    for i in range(sessions):
        t = dict(TEMPLATE, sid=TEMPLATE["sid"][:-2] + f"{i:02d}")
        audits.append(TemplateAudit(recorder, t))
    async with trio.open_nursery() as nursery:
        await nursery.start(recorder.run)
        start = time.process_time()
        now = time.time()
        for n in range(pairs):
            audit = audits[n % sessions]
            audit.when = now + n * 1e-5
            q = audit.on_query("SELECT id, name, value FROM bench.kv WHERE id = ?", parameters=[str(n)],
                               cql_opcode="EXECUTE", consistency="LOCAL_ONE", stream=n & 0x7FFF, page_size=5000)
            audit.on_result(success=True, query_uid=q["uid"], result_kind="rows", affected_records=1,
                            has_more_pages=False, duration_ms=0.412)
            if n % 512 == 511:
                for a in audits:
                    await a.flush()
                await trio.sleep(0)  # let the drain task take a batch, as the worker's loop does
        for a in audits:
            await a.flush()
        await recorder.aclose()
        elapsed = time.process_time() - start
    return elapsed, recorder.written


def core_samples(path: str, samples: int, pairs: int, sessions: int) -> float:
    """The same events without trio: emit, ``_stamp``, and the JSONL sink's write, in short
    samples; the least CPU per event over all samples (robust on a shared, busy machine:
    some samples run undisturbed)."""
    sink = JsonlSink(path=path, fsync="never")
    recorder = AuditRecorder([sink], capacity=1_000_000)
    recorder.track_changes()
    audits = [TemplateAudit(recorder, dict(TEMPLATE, sid=TEMPLATE["sid"][:-2] + f"{i:02d}")) for i in range(sessions)]
    queue = recorder._queue
    best = float("inf")
    now = time.time()
    for _ in range(samples):
        start = time.process_time()
        for n in range(pairs):
            audit = audits[n % sessions]
            audit.when = now + n * 1e-5
            q = audit.on_query("SELECT id, name, value FROM bench.kv WHERE id = ?", parameters=[str(n)],
                               cql_opcode="EXECUTE", consistency="LOCAL_ONE", stream=n & 0x7FFF, page_size=5000)
            audit.on_result(success=True, query_uid=q["uid"], result_kind="rows", affected_records=1,
                            has_more_pages=False, duration_ms=0.412)
        batch = list(queue)
        queue.clear()
        sink._write(b"".join(recorder._stamp(batch).lines))
        best = min(best, (time.process_time() - start) / (2 * pairs))
    sink._file.close()
    return best * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=20_000, help="query/result pairs per round")
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="cProfile one round, print top N")
    ap.add_argument("--core", type=int, default=0, metavar="SAMPLES",
                    help="instead: SAMPLES short samples (256 pairs) of emit+stamp+write without trio, report the least")
    args = ap.parse_args(argv)
    if args.core:
        with tempfile.TemporaryDirectory() as tmp:
            print(f"core: least {core_samples(os.path.join(tmp, 'core.jsonl'), args.core, 256, args.sessions):.2f} µs/event")
        return 0
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            cpu, written = trio.run(one_round, os.path.join(tmp, f"audit-{r}.jsonl"), args.pairs, args.sessions)
            results.append(cpu / written * 1e6)
            print(f"round {r}: {written} events, {cpu:.3f} s CPU, {results[-1]:.2f} µs/event")
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            trio.run(one_round, os.path.join(tmp, "audit-prof.jsonl"), args.pairs, args.sessions)
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(args.profile)
    results.sort()
    print(f"best {results[0]:.2f} µs/event, median {results[len(results) // 2]:.2f} µs/event")
    return 0


if __name__ == "__main__":
    sys.exit(main())
