"""The optimised audit path against a plain reference, byte for byte.

``SessionAudit.emit`` / ``TemplateAudit`` splice pre-serialised template bytes into
each event and ``AuditRecorder._stamp`` builds each line with byte formatting and a
streamed hash — all for speed.  Here the same events are built the obvious way:
one dict per event (own fields, then the session's common fields it does not override), ``session_seq`` (per
session, dropped at its end event), ``seq``, ``prev_hash``, serialised by orjson, and
``hash`` = SHA-256 over that serialisation — and the JSONL file the real recorder
wrote must equal those lines exactly, across batches and with a Forget marker.
"""

from __future__ import annotations

import hashlib

import orjson
import trio

from dbproxy.audit import events as ev
from dbproxy.audit.recorder import GENESIS_HASH, AuditRecorder, TemplateAudit
from dbproxy.audit.sinks.jsonl import JsonlSink
from dbproxy.session import Identity, Session

TEMPLATE = {"sid": "s-tmpl", "user": "alice", "roles": ["dba"], "auth_method": "token",
            "db_protocol": "cassandra", "listener": "cql", "db_name": "ks", "db_user": "cassandra",
            "db_uri": "127.0.0.1:9042", "addr.remote": "127.0.0.1:5000"}


def reference_lines(emitted: list[tuple[dict, dict]]) -> list[bytes]:
    """``emitted``: (event's own fields as ``emit`` returned them, the session's template)."""
    counts: dict = {}
    prev, seq, lines = GENESIS_HASH, 0, []
    for own, template in emitted:
        # The event's own fields first, then the common fields it does not override.
        full = {**own, **{k: v for k, v in template.items() if k not in own}}
        sid = full["sid"]
        n = counts.get(sid, 0) + 1
        if full["event"].endswith(".session.end"):
            counts.pop(sid, None)
        else:
            counts[sid] = n
        seq += 1
        full.update(session_seq=n, seq=seq, prev_hash=prev)
        prev = hashlib.sha256(orjson.dumps(full)).hexdigest()
        full["hash"] = prev
        lines.append(orjson.dumps(full) + b"\n")
    return lines


async def test_recorder_writes_the_reference_lines(tmp_path):
    path = str(tmp_path / "audit.jsonl")
    sink = JsonlSink(path=path, fsync="never")
    sink.write_in_thread = False
    recorder = AuditRecorder([sink])
    recorder.track_changes()
    emitted: list[tuple[dict, dict]] = []

    s = Session(listener="pg", protocol="postgres", client_addr="127.0.0.1:6000")
    s.identity = Identity(user="bob", roles=("dba", "ops"), method="scram-sha-256", token_id="t-1")
    s.db_name, s.db_user, s.route_name = "app", "u_scram", "scram"
    live = recorder.session(s)
    tmpl = TemplateAudit(recorder, dict(TEMPLATE))

    def live_emit(method, *args, **kw):
        emitted.append((getattr(live, method)(*args, **kw), dict(live._template)))

    def tmpl_emit(method, *args, **kw):
        emitted.append((getattr(tmpl, method)(*args, **kw), dict(tmpl.template)))

    async with trio.open_nursery() as nursery:
        await nursery.start(recorder.run)
        live_emit("on_session_start", success=True, backend_tls=False)
        for i, sql in enumerate(["select 1", 'select "q", \'é 日本 🙂\'', "select '\x1f\\'\n--"]):
            tmpl.when = 1_700_000_000.25 + i * 0.000001
            tmpl_emit("on_query", sql, parameters=[str(i), None], cql_opcode="QUERY")
            tmpl_emit("on_result", success=True, affected_records=i, duration_ms=0.5)
            live_emit("on_query", sql, parameters=["x"])
            live_emit("on_result", success=False, error='no "such"', sqlstate="42P01")
            await trio.sleep(0.02)  # several batches: the chain continues across them
        tmpl.update_template(db_name="other")
        tmpl_emit("emit", ev.QUERY, db_name="override", db_query="use x")  # overrides a common field
        tmpl_emit("emit", ev.QUERY, db_name="again", db_query="use y")  # the same field set again
        tmpl.update_template(db_user="changed")  # the kept JSON without db_name is rebuilt
        tmpl_emit("emit", ev.QUERY, db_name="third", db_query="use z")
        s.db_name = "app2"  # the live session's template is rebuilt
        live_emit("on_result", success=True, affected_records=0)
        # An end event that overrides a common field still ends its session's count.
        tmpl_emit("on_session_end", reason="client closed", db_name="last")
        tmpl_emit("emit", ev.QUERY, db_query="after the end")  # session_seq starts again at 1
        live_emit("on_session_end", reason="done", duration_ms=1.0)
        await recorder.aclose()

    with open(path, "rb") as f:
        written = f.readlines()
    assert written == reference_lines(emitted)
    assert len(written) == 20
