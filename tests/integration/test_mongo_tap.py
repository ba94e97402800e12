"""Tapped Mongo sessions: real FerretDB 1.24, pymongo, ``dbproxy serve`` with and without the audit worker.

A Mongo session without an access gate is audited by the audit worker over the frames the proxy
tapped (``engines/mongo/tee.py`` → ``tap.py``); hello and the proxy's own answers stay inline.
Shown here: the same pymongo workload (inserts with document sequences, a find whose cursor needs
getMores, killCursors, updates, deletes, a command the server refuses, a w:0 write) gives the
same trail, event for event, through the worker as with ``"worker": false`` (everything inline
in the proxy) — uncompressed and with each compressor; and the commands' events were made in
the worker: an event id starts with its process's random prefix (``audit.events.new_event_id``),
and the query/result events of a tapped session do not share the prefix of its
``db.session.start``, which the proxy writes.
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path

import pymongo
import pytest

from dbproxy.audit.chain import verify_files
from tests.integration.test_malformed_mongo import ferret  # noqa: F401  (the module's FerretDB)
from tests.support import ProxyProcess, read_audit, wait_until

pytestmark = pytest.mark.integration

PASSIVE = ("insert", "find", "getMore", "killCursors", "update", "delete", "count", "noSuchCommandXyz")


def config(ferret, workdir: Path, *, worker: bool) -> dict:
    secret = workdir / "backend.secret"
    secret.write_text(ferret.password + "\n")
    backend = {"address": f"127.0.0.1:{ferret.port}", "user": ferret.user,
               "auth": {"method": "scram-sha-256", "password_file": str(secret)}}
    audit: dict = {"sinks": [{"type": "jsonl", "path": str(workdir / "audit.jsonl")}]}
    if not worker:
        audit["worker"] = False
    return {"listeners": [{"name": "mongo", "protocol": "mongo", "listen": "127.0.0.1:0",
                           "routes": [{"name": "ferret", "backend": backend}]}],
            "audit": audit, "shutdown_grace_seconds": 2}


def workload(port: int, app: str, db: str, compressor: str | None) -> None:
    kw = {"compressors": compressor} if compressor else {}
    with pymongo.MongoClient("127.0.0.1", port, appname=app, maxPoolSize=1, serverSelectionTimeoutMS=10_000, **kw) as c:
        c.drop_database(db)
        coll = c[db].items
        coll.insert_many([{"_id": i, "k": i % 3, "pad": "x" * 50} for i in range(60)])  # a document sequence
        assert len(list(coll.find({}, batch_size=25).sort("_id", 1))) == 60  # find + 2 getMores
        cursor = coll.find({}, batch_size=5)
        next(cursor)
        cursor.close()  # killCursors
        assert coll.update_many({"k": 1}, {"$set": {"seen": True}}).modified_count == 20
        assert coll.count_documents({"seen": True}) == 20
        with pytest.raises(pymongo.errors.OperationFailure):
            c[db].command("noSuchCommandXyz")
        assert coll.delete_many({"k": 2}).deleted_count == 20
        assert coll.find_one({"_id": 0}) is not None


def run(ferret, workdir: Path, *, worker: bool, compressor: str | None, app: str, db: str) -> tuple[list[dict], list[dict]]:
    """(the workload's session's events, the whole trail)."""
    workdir.mkdir()
    proxy = ProxyProcess(workdir, config(ferret, workdir, worker=worker)).start()
    path = workdir / "audit.jsonl"
    try:
        workload(proxy.port("mongo"), app, db, compressor)

        def ended() -> list[dict] | None:
            events = read_audit(path)
            sids = {e["sid"] for e in events if e.get("command") == "insert"}
            ends = [e for e in events if e["event"] == "db.session.end" and e.get("sid") in sids]
            return events if sids and len(ends) == len(sids) else None

        events = wait_until(ended, timeout=20, what="the workload session's end event")
    finally:
        proxy.stop()
    [sid] = {e["sid"] for e in events if e.get("command") == "insert"}
    assert verify_files([str(path)]).ok
    return [e for e in events if e.get("sid") == sid], events


def comparable(events: list[dict]) -> list[tuple]:
    """The session's events without ids, times, ports and server-chosen cursor ids; a result
    names its query by position, a getMore/killCursors the query that opened its cursor."""
    index: dict[str, int] = {}
    cursors: dict[int, int] = {}
    out = []
    skip = {"uid", "time", "sid", "query_uid", "cursor_query_uid", "cursor_query_uids", "cursor_id", "cursor_ids",
            "seq", "session_seq", "hash", "prev_hash", "client_addr", "client_port", "server_port",
            "bytes_from_client", "bytes_to_client", "duration_ms", "start_time", "end_time", "pid", "request_id"}
    for i, e in enumerate(events):
        index[e["uid"]] = i
        fields = {k: v for k, v in e.items() if k not in skip and not k.startswith("addr.")}
        cid = e.get("cursor_id")
        if isinstance(cid, int) and cid:
            fields["cursor"] = cursors.setdefault(cid, len(cursors) + 1)
        if "db_query" in fields:  # pymongo's session ids (lsid) are random UUIDs; cursor ids the server's
            query = re.sub(r'"\$uuid":"[0-9a-f-]+"', '"$uuid":"…"', fields["db_query"])
            for known, n in cursors.items():
                query = query.replace(str(known), f"<cursor {n}>")
            fields["db_query"] = query
        if "cursorsKilled" in fields:
            fields["cursorsKilled"] = [cursors.get(c, "?") for c in fields["cursorsKilled"]]
        if "query_uid" in e:
            fields["query"] = index.get(e["query_uid"])
        if e.get("cursor_query_uid"):
            fields["cursor_query"] = index.get(e["cursor_query_uid"])
        out.append(tuple(sorted((k, repr(v)) for k, v in fields.items())))
    return out


def prefix(event: dict) -> str:
    return event["uid"][:16]  # the writing process's random prefix (audit.events.new_event_id)


@pytest.mark.parametrize("compressor", [None, "snappy", "zlib", "zstd"])
def test_a_tapped_session_writes_the_inline_trail_from_the_worker(ferret, tmp_path, compressor):
    app, db = f"tap-{secrets.token_hex(4)}", f"tap_{secrets.token_hex(3)}"
    tapped, _ = run(ferret, tmp_path / "worker", worker=True, compressor=compressor, app=app, db=db)
    inline, _ = run(ferret, tmp_path / "inline", worker=False, compressor=compressor, app=app, db=db)

    got, want = comparable(tapped), comparable(inline)
    diff = [(i, sorted(set(a) ^ set(b))) for i, (a, b) in enumerate(zip(got, want)) if a != b]
    assert got == want, (len(got), len(want), diff[:5])
    commands = [e["command"] for e in tapped if e["event"] == "db.session.query"]
    for name in ("insert", "find", "getMore", "killCursors", "update", "delete", "noSuchCommandXyz"):
        assert name in commands, (name, commands)
    end = tapped[-1]
    assert end["event"] == "db.session.end" and end["commands"] == len(commands) and end["errors"] >= 1
    if compressor:
        assert end["compressor"] == compressor and end["compressed_requests"] >= 8
        assert {e.get("compressor") for e in tapped if e.get("command") in PASSIVE
                and e["event"] == "db.session.query"} == {compressor}

    # Who wrote what: the proxy starts and ends the session (and answers the hello inline); the
    # commands' queries and results come from the audit worker's tap.  Inline, one process.
    start = next(e for e in tapped if e["event"] == "db.session.start")
    passive = [e for e in tapped if e.get("command") in PASSIVE and e["event"].startswith("db.session.")]
    assert len(passive) >= 16
    assert prefix(end) == prefix(start)
    assert {prefix(e) for e in passive} == {prefix(passive[0])} != {prefix(start)}
    assert all(prefix(e) == prefix(start) for e in tapped if e.get("command") == "hello")
    assert {prefix(e) for e in inline} == {prefix(inline[0])}
