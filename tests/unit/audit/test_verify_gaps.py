"""``dbproxy audit verify`` finds what was never written, not only what was changed.

The trails are stamped by the real recorder (``AuditRecorder._stamp``, the one place ``session_seq`` is
counted), so every chain here is intact: each defect is a gap a hash chain alone cannot show — a hole
in a session's numbers (its events were lost before they were stamped, as when an audit worker died
with them), an end event counting more events than the trail holds, a session cut off by a restart, a
proxy run without its ``proxy.stop``.  A clean trail passes, a trail written before ``session_seq``
still verifies ("no session counts"), and events written twice by a replay are counted, not a gap.
"""

from __future__ import annotations

import hashlib

import orjson

from dbproxy.audit import events as ev
from dbproxy.audit.recorder import GENESIS_HASH, AuditRecorder
from dbproxy.audit.chain import verify_files
from dbproxy.cli import main as cli


def body(kind: str, sid: str | None = None, **fields) -> bytes:
    event = {"event": kind, "code": ev.CODES.get(kind, ""), "uid": ev.new_event_id(), "time": ev.now_iso(), **fields}
    data = orjson.dumps(event)
    if sid is not None:  # the session's common fields come last, as SessionAudit.emit writes them
        data = data[:-1] + b',"sid":"%s","user":"alice","db_protocol":"postgres"}' % sid.encode()
    return data


def start() -> bytes:
    return body(ev.PROXY_START, pid=1, version="0.1.0")


def stop() -> bytes:
    return body(ev.PROXY_STOP, pid=1, version="0.1.0")


def session(sid: str, queries: int = 2, end: bool = True) -> list[bytes]:
    out = [body(ev.SESSION_START, sid, success=True)]
    for i in range(queries):
        out.append(body(ev.QUERY, sid, db_query=f"SELECT {i}"))
        out.append(body(ev.RESULT, sid, success=True))
    if end:
        out.append(body(ev.SESSION_END, sid, reason="client terminated", queries=queries, errors=0))
    return out


class Trail:
    def __init__(self, tmp_path) -> None:
        self.path = tmp_path / "audit.jsonl"
        self.recorder = AuditRecorder(sinks=[])
        self.lines: list[bytes] = []

    def add(self, *bodies: bytes) -> "Trail":
        self.lines += self.recorder._stamp(list(bodies)).lines
        return self

    def lose(self, sid: str, n: int = 1) -> "Trail":
        """Events of ``sid`` counted but never written (lost before the sinks got them)."""
        self.recorder.session_seq[sid.encode()] = self.recorder.session_seq.get(sid.encode(), 0) + n
        return self

    def verify(self):
        self.path.write_bytes(b"".join(self.lines))
        return verify_files([str(self.path)])


def test_a_clean_trail_passes_with_its_counts(tmp_path, capsys):
    trail = Trail(tmp_path).add(start(), *session("a"), *session("b", 3), stop(), start(), *session("c"), stop())
    result = trail.verify()
    assert result.ok and result.gaps == () and result.chain_ok
    assert (result.sessions, result.counted_sessions, result.runs, result.open_sessions) == (3, 3, 2, 0)
    events = [orjson.loads(line) for line in trail.lines]
    assert [e["session_seq"] for e in events if e.get("sid") == "b"] == list(range(1, 9))
    end_b = [e for e in events if e.get("sid") == "b" and e["event"] == ev.SESSION_END][0]
    assert end_b["session_seq"] == 8  # the end carries the session's total
    assert not any("session_seq" in e for e in events if "sid" not in e)  # markers have no session
    assert trail.recorder.session_seq == {}  # counters are dropped at each session's end
    assert cli(["audit", "verify", str(trail.path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("OK: ") and "3 sessions (3 counted)" in out and "2 proxy runs" in out


def test_a_hole_in_a_sessions_numbers_is_reported(tmp_path, capsys):
    a = session("a", 3)
    trail = Trail(tmp_path).add(start(), *a[:3]).lose("a", 2).add(*a[5:], stop())
    result = trail.verify()
    assert result.chain_ok and not result.ok
    [gap] = result.gaps
    assert "session a" in gap and "2 events missing" in gap and "session_seq 4, 5 not in the trail" in gap
    assert cli(["audit", "verify", str(trail.path)]) == 3
    out = capsys.readouterr().out
    assert out.startswith("GAPS: ") and "chain intact" in out and "1 gaps" in out and "session a" in out


def test_fewer_events_than_the_end_counts_is_reported(tmp_path):
    a = session("a", 2)
    # The last query and result were lost: the numbers seen have no hole, but the end counts 6.
    trail = Trail(tmp_path).add(start(), *a[:3]).lose("a", 2).add(a[-1], stop())
    [gap] = trail.verify().gaps
    assert "session a" in gap and "its end counts 6 events" in gap and "2 events missing" in gap


def test_a_crash_is_an_unclean_restart_and_its_open_sessions_are_cut_off(tmp_path):
    failed_login = body(ev.SESSION_START, "refused", success=False, error="password authentication failed")
    trail = Trail(tmp_path).add(start(), *session("done"), *session("cut", end=False), failed_login,
                                start(), *session("running", end=False))
    result = trail.verify()
    assert not result.ok and len(result.gaps) == 2
    unclean, cut = result.gaps
    assert unclean.startswith("unclean restart") and ":1 has no proxy.stop" in unclean
    assert "session cut" in cut and "no end event" in cut and "restarted" in cut
    # A session of the last run without an end may still be running: not a gap; a failed login owes no end.
    assert result.open_sessions == 1 and not any("running" in g or "refused" in g for g in result.gaps)


def test_a_session_without_end_in_a_cleanly_stopped_run_is_cut_off(tmp_path):
    [gap] = Trail(tmp_path).add(start(), *session("cut", end=False), stop()).verify().gaps
    assert "session cut" in gap and "no end event" in gap and "stopped" in gap


def test_events_written_twice_by_a_replay_are_counted_not_a_gap(tmp_path, capsys):
    a = session("a", 2)
    trail = Trail(tmp_path).add(start(), *a[:4])
    trail.recorder.session_seq[b"a"] = 2  # a new worker continues from the last ack: events 3, 4 again
    trail.add(*a[2:], stop())
    result = trail.verify()
    assert result.ok and result.repeated == 2
    assert cli(["audit", "verify", str(trail.path)]) == 0
    assert "2 events written twice" in capsys.readouterr().out


def legacy(bodies: list[bytes]) -> list[bytes]:
    """Lines as recorders before ``session_seq`` wrote them (seq, prev_hash, hash only)."""
    prev, lines = GENESIS_HASH, []
    for seq, b in enumerate(bodies, 1):
        head = b'%b,"seq":%d,"prev_hash":"%s"' % (b[:-1], seq, prev.encode())
        prev = hashlib.sha256(head + b"}").hexdigest()
        lines.append(b'%b,"hash":"%s"}\n' % (head, prev.encode()))
    return lines


def test_a_trail_without_session_counts_still_verifies(tmp_path, capsys):
    path = tmp_path / "old.jsonl"
    path.write_bytes(b"".join(legacy(session("a") + session("b", end=False))))
    result = verify_files([str(path)])
    assert result.ok and result.counted_sessions == 0 and result.sessions == 2
    assert cli(["audit", "verify", str(path)]) == 0
    assert "no session counts" in capsys.readouterr().out


def test_counters_are_dropped_at_the_end_or_for_a_session_that_never_started(tmp_path):
    trail = Trail(tmp_path)
    recorder = trail.recorder
    trail.add(body(ev.SESSION_START, "refused", success=False), *session("open", end=False))
    assert set(recorder.session_seq) == {b"refused", b"open"}
    recorder.forget_session("refused")  # the server: a session that ends without an end event
    trail.add(*recorder._queue)
    assert set(recorder.session_seq) == {b"open"}
    assert recorder._touched is None  # in-process: no history of changes kept (only the worker acks them)


def test_an_engine_family_names_its_session_events(tmp_path):
    """An engine of another family (``event_family = "ssh"``) gets ``ssh.session.start`` /
    ``ssh.session.end`` from the same hooks, with no audit change: the recorder counts its
    events and closes its counter at its end event, and verify owes it an end like a database's."""
    from dbproxy.session import Session

    def ssh_session() -> list[bytes]:
        emitter = AuditRecorder(sinks=[])
        s = Session(listener="ssh", protocol="ssh", client_addr="127.0.0.1:1")
        s.family, s.event_family = "terminal", "ssh"
        audit = emitter.session(s)
        audit.on_session_start(success=True)
        audit.emit("ssh.command", command="uname -a")
        audit.on_session_end(reason="client closed")
        return list(emitter._queue)

    bodies = ssh_session()
    trail = Trail(tmp_path).add(start(), *bodies, stop())
    events = [orjson.loads(line) for line in trail.lines][1:-1]
    assert [e["event"] for e in events] == ["ssh.session.start", "ssh.command", "ssh.session.end"]
    assert [e["session_seq"] for e in events] == [1, 2, 3]
    assert trail.recorder.session_seq == {}  # the ssh end event closed its counter
    result = trail.verify()
    assert result.ok and result.counted_sessions == 1, result
    # Without its end event, a started ssh session cut off by a restart is a gap.
    cut = Trail(tmp_path).add(start(), *ssh_session()[:2], start())
    assert not cut.verify().ok
