"""The JSONL sink (rotation, gzip, fsync policies, torn tails), ``audit verify`` and ``audit tail``.

The CLI is driven through ``dbproxy.cli.main`` as a user would call it; the
trails are written by the real recorder, so the hashes are the real ones.
"""

from __future__ import annotations

import gzip
import os
import threading
import time

import orjson
import pytest
import trio

from dbproxy.audit import events as ev
from dbproxy.audit.recorder import AuditRecorder
from dbproxy.audit.sinks.jsonl import JsonlSink
from dbproxy.audit.tail import describe, follow, matcher
from dbproxy.audit.chain import verify_files
from dbproxy.cli import main as cli
from dbproxy.session import Identity, Session


async def write_trail(path, n_sessions=3, queries=4, **sink_kw) -> AuditRecorder:
    sink = JsonlSink(path=str(path), **sink_kw)
    recorder = AuditRecorder([sink])
    async with trio.open_nursery() as nursery:
        await nursery.start(recorder.run)
        for i in range(n_sessions):
            s = Session(listener="pg", protocol="postgres", client_addr=f"127.0.0.1:{5000 + i}")
            s.identity = Identity(user=f"user{i}")
            s.db_name, s.db_user, s.route_name = "app", "u_scram", "scram"
            audit = recorder.session(s)
            audit.on_session_start(success=True)
            for q in range(queries):
                audit.on_query(f"SELECT {i}, {q}")
                audit.on_result(success=True, command_tag="SELECT 1", affected_records=1)
            audit.on_session_end(reason="client terminated", duration_ms=1.5, queries=queries)
            await audit.flush()
            await trio.sleep(0.01)  # separate batches
        await recorder.aclose()
    return recorder


def lines_of(path):
    return path.read_bytes().splitlines(keepends=True)


async def test_verify_ok_and_cli_exit_status(tmp_path, capsys):
    path = tmp_path / "audit.jsonl"
    await write_trail(path)
    n = 3 * (2 + 2 * 4)
    result = verify_files([str(path)])
    assert result.ok and result.events == n and (result.first_seq, result.last_seq) == (1, n)
    assert cli(["audit", "verify", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"OK: {n} events, seq 1-{n}" in out


@pytest.mark.parametrize(
    "tamper,line,reason",
    [
        ("edit", 7, "hash mismatch"),
        ("delete", 7, "sequence break"),
        ("swap", 7, "sequence break"),
        ("rehash", 7, "chain break"),
        ("garbage", 7, "not valid JSON"),
    ],
)
async def test_tampering_fails_at_that_line(tmp_path, capsys, tamper, line, reason):
    from dbproxy.audit.recorder import chain_hash

    path = tmp_path / "audit.jsonl"
    await write_trail(path)
    lines = lines_of(path)
    event = orjson.loads(lines[line - 1])
    if tamper == "edit":
        event["db_query"] = "SELECT nothing_to_see_here"
        lines[line - 1] = orjson.dumps(event) + b"\n"
    elif tamper == "delete":
        del lines[line - 1]
    elif tamper == "swap":
        lines[line - 1], lines[line] = lines[line], lines[line - 1]
    elif tamper == "rehash":  # edit *and* recompute its own hash: the next link still catches it
        event["db_query"] = "SELECT forged"
        event["hash"] = chain_hash(event)
        lines[line - 1] = orjson.dumps(event) + b"\n"
        line += 1
    else:
        lines[line - 1] = b"{not json\n"
    path.write_bytes(b"".join(lines))
    assert cli(["audit", "verify", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"{path}:{line}: " in out and reason in out
    assert verify_files([str(path)]).error.line == line


async def test_rotation_by_size_with_gzip_verifies_across_files(tmp_path, capsys):
    path = tmp_path / "audit.jsonl"
    await write_trail(path, n_sessions=6, rotate_bytes=4096, gzip=True)
    rotated = sorted(p for p in os.listdir(tmp_path) if p.startswith("audit.jsonl."))
    assert len(rotated) >= 2 and all(p.endswith(".gz") for p in rotated), rotated
    files = [str(tmp_path / p) for p in rotated] + [str(path)]
    with gzip.open(files[0], "rb") as f:
        assert orjson.loads(f.readline())["seq"] == 1
    result = verify_files(list(reversed(files)))  # any order: sorted by first seq
    assert result.ok and result.events == 6 * 10
    assert cli(["audit", "verify", *files]) == 0
    assert "OK: 60 events, seq 1-60" in capsys.readouterr().out
    # Without the first file the rest still verifies, starting later.
    assert cli(["audit", "verify", *files[1:]]) == 0
    assert "starts at seq" in capsys.readouterr().out
    # Without a middle file there is a gap.
    if len(files) >= 3:
        assert cli(["audit", "verify", files[0], *files[2:]]) == 1


async def test_rotation_by_age(tmp_path):
    path = tmp_path / "audit.jsonl"
    sink = JsonlSink(path=str(path), rotate_seconds=1.0)
    sink._opened_at -= 5  # the file is "old"
    await sink.write_batch([{"seq": 1, "hash": "x"}])
    assert sink.rotations == 0  # never rotates an empty file
    sink._opened_at -= 5
    await sink.write_batch([{"seq": 2, "hash": "y"}])
    assert sink.rotations == 1
    await sink.aclose()
    assert [orjson.loads(x)["seq"] for x in lines_of(path)] == [2]


async def test_chain_recovers_from_the_rotated_file_and_torn_tail(tmp_path):
    path = tmp_path / "audit.jsonl"
    await write_trail(path, n_sessions=2, rotate_bytes=2048, gzip=True)
    last = orjson.loads(lines_of(path)[-1])
    path.write_bytes(b"")  # as if the proxy died right after a rotation
    assert JsonlSink(path=str(path)).recover_tail()[0] < last["seq"]  # falls back to the newest .gz
    path.unlink()
    await write_trail(path, n_sessions=1)
    with open(path, "ab") as f:
        f.write(b'{"event": "torn by a cra')
    sink = JsonlSink(path=str(path))  # repairs the torn line
    assert path.read_bytes().endswith(b"\n")
    seq, _ = sink.recover_tail()
    await sink.aclose()
    await write_trail(path, n_sessions=1)
    assert orjson.loads(lines_of(path)[-1])["seq"] == seq + 10


@pytest.mark.parametrize("policy", ["always", "interval", "never"])
async def test_fsync_policies_write_everything(tmp_path, policy):
    path = tmp_path / "audit.jsonl"
    await write_trail(path, n_sessions=1, fsync=policy, fsync_interval_seconds=0.05)
    assert verify_files([str(path)]).events == 10


async def test_tail_formats_and_filters(tmp_path, capsys):
    path = tmp_path / "audit.jsonl"
    await write_trail(path)
    assert cli(["audit", "tail", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 30
    assert " START u_scram@app via scram from 127.0.0.1:5000" in out[0] and " #1 user0 " in out[0]
    assert out[1].endswith("QUERY u_scram@app: SELECT 0, 0")
    assert out[2].endswith("RESULT ok SELECT 1 rows=1")
    assert "END u_scram@app client terminated (1.5 ms, 4 queries)" in out[9]
    assert cli(["audit", "tail", str(path), "--user", "user1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 10 and all(" user1 " in line for line in out)
    sid = orjson.loads(lines_of(path)[-1])["sid"]
    assert cli(["audit", "tail", str(path), "--session", sid[:6], "-n", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[-1].split()[1] == "#30" and "END" in out[-1]


def test_describe_other_events():
    loss = {"event": ev.AUDIT_LOSS, "seq": 9, "time": "t", "sink": "siem", "dropped": 5, "dropped_first_seq": 1, "dropped_last_seq": 5, "dropped_total": 5}
    assert describe(loss) == "t #9 - - AUDIT LOSS sink=siem dropped=5 (seq 1-5, 5 in total)"
    failed = {"event": ev.RESULT, "seq": 3, "user": "bob", "sid": "abcdef0123", "success": False, "sqlstate": "42P01", "error": "no such table"}
    assert describe(failed, with_time=False) == "#3 bob abcdef01 RESULT error 42P01 no such table"
    assert matcher(user="bob")(failed) and not matcher(user="eve")(failed)
    assert matcher(session="abc")(failed) and not matcher(session="abd")(failed)


def test_follow_prints_new_events_across_rotation(tmp_path):
    path = tmp_path / "audit.jsonl"
    path.write_bytes(orjson.dumps({"event": ev.QUERY, "seq": 1, "db_query": "SELECT 1"}) + b"\n")
    seen: list[str] = []
    done = threading.Event()
    t = threading.Thread(target=follow, args=(str(path), path.stat().st_size, matcher(), seen.append), kwargs={"interval": 0.02, "stop": done.is_set})
    t.start()
    try:
        with open(path, "ab") as f:
            f.write(orjson.dumps({"event": ev.QUERY, "seq": 2, "db_query": "SELECT 2"}) + b"\n")
            f.write(b'{"event": "db.session.query", "seq": 3, "db_qu')  # half a line: waits for the rest
        time.sleep(0.2)
        assert [line.split()[1] for line in seen] == ["#2"]
        with open(path, "ab") as f:
            f.write(b'ery": "SELECT 3"}\n')
        os.rename(path, str(path) + ".1")
        path.write_bytes(orjson.dumps({"event": ev.QUERY, "seq": 4, "db_query": "SELECT 4"}) + b"\n")
        deadline = time.monotonic() + 5
        while len(seen) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        done.set()
        t.join(5)
    assert [line.split()[1] for line in seen] == ["#2", "#3", "#4"]
