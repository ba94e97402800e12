"""The audit hash chain byte by byte: ``recorder.line_hash``, ``AuditRecorder._stamp`` and ``audit.chain``.

Proven here: the recorder stamps each event body into one line ``{…body…,"seq":N,"prev_hash":P,"hash":H}``
where H is SHA-256 over the line as written up to ``,"hash"`` (closed with ``}``), P the previous line's H
(the genesis hash first) and N counts on across batches; ``line_hash`` recomputes H from the line and gives
None for any line that does not end with that member.  Such lines verify (``ChainChecker.check`` and
``verify_files``); changing any single byte of any line, to any value, makes verification fail at that
very line — even where the edit leaves the parsed event unchanged (``\\u001f`` vs ``\\u001F``); trails whose
links are the legacy canonical ``chain_hash`` (sorted-key JSON, written either key order) still verify, on
their own and continued by a new recorder; deleting, duplicating or reordering lines (within a file or
across rotated files) breaks the chain at the first line out of place, and a seq 1 not linked to the
genesis hash is refused.

The bodies are real ones (``SessionAudit.emit`` into a recorder without sinks, read from its queue) with
quotes, backslashes, control characters, non-ASCII text and NULL parameters in them.
"""

from __future__ import annotations

import copy
import hashlib
import re

import orjson
import pytest

from dbproxy.audit.recorder import GENESIS_HASH, AuditRecorder, chain_hash, line_hash
from dbproxy.audit.chain import ChainChecker, verify_files
from dbproxy.session import Identity, Session

QUERIES = [
    "select 1",
    'select "quoted", \'it\'\'s\', E\'back\\\\slash\'',
    "select 'é ü 日本 🙂'",
    "select '\x1f\x01\t'\nfrom t -- a newline and control characters",
]


def event_bodies() -> list[bytes]:
    recorder = AuditRecorder(sinks=[])
    s = Session(listener="pg", protocol="postgres", client_addr="127.0.0.1:5000")
    s.identity = Identity(user="bob", roles=("dba", "ops"), method="scram-sha-256")
    s.db_name, s.db_user, s.route_name = "app", "u_scram", "scram"
    audit = recorder.session(s)
    audit.on_session_start(success=True, backend_tls=False)
    for sql in QUERIES:
        q = audit.on_query(sql, parameters=["1", None, "base64:AAE="])
        audit.on_result(success=True, query_uid=q["uid"], command_tag="SELECT 1", affected_records=1)
    audit.on_result(success=False, error='relation "nope" does not exist', sqlstate="42P01")
    audit.on_session_end(reason="client terminated", duration_ms=1.5, queries=len(QUERIES))
    return list(recorder._queue)


BODIES = event_bodies()


def stamped(bodies: list[bytes] = BODIES, recorder: AuditRecorder | None = None) -> list[bytes]:
    return (recorder or AuditRecorder(sinks=[]))._stamp(bodies).lines


def check_all(lines: list[bytes]) -> tuple[int, str] | None:
    """``ChainChecker`` over lines in order: (1-based line, reason) of the first break, or None."""
    checker = ChainChecker()
    for number, line in enumerate(lines, 1):
        try:
            event = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            return number, f"not valid JSON ({exc})"
        reason = checker.check(event, line)
        if reason is not None:
            return number, reason
    return None


def write(path, lines: list[bytes]) -> str:
    path.write_bytes(b"".join(lines))
    return str(path)


# --------------------------------------------------------------------------
# Stamping and line_hash.


def test_stamped_lines_are_the_body_then_seq_prev_hash_and_their_own_hash() -> None:
    recorder = AuditRecorder(sinks=[])
    lines = stamped(BODIES[:5], recorder) + stamped(BODIES[5:], recorder)  # two batches: one chain
    prev = GENESIS_HASH
    per_session: dict = {}
    for seq, (body, line) in enumerate(zip(BODIES, lines), 1):
        m = re.fullmatch(rb'(.*),"hash":"([0-9a-f]{64})"\}\n', line, re.S)
        assert m is not None, line
        core, own = m.group(1) + b"}", m.group(2).decode()
        sid = orjson.loads(body).get("sid")
        counted = b""
        if sid is not None:  # a session's event also gets its running count, before seq
            per_session[sid] = per_session.get(sid, 0) + 1
            counted = b',"session_seq":%d' % per_session[sid]
        assert core == body[:-1] + counted + b',"seq":%d,"prev_hash":"%s"}' % (seq, prev.encode())  # the body as sent
        assert own == hashlib.sha256(core).hexdigest() == line_hash(line)
        event = orjson.loads(line)
        assert list(event)[-3:] == ["seq", "prev_hash", "hash"]
        assert {k: v for k, v in event.items() if k not in ("seq", "prev_hash", "hash", "session_seq")} == orjson.loads(body)
        assert (event["seq"], event["prev_hash"], event["hash"]) == (seq, prev, own)
        prev = own
    assert (recorder.last_seq, recorder.last_hash) == (len(BODIES), prev)
    assert check_all(lines) is None


def test_stamped_batch_parses_its_lines() -> None:
    batch = AuditRecorder(sinks=[])._stamp(BODIES)
    assert len(batch) == len(BODIES)
    assert batch[2] == orjson.loads(batch.lines[2]) and list(batch) == [orjson.loads(x) for x in batch.lines]


def test_line_hash_ignores_the_line_ending_only() -> None:
    line = stamped()[3]
    own = orjson.loads(line)["hash"]
    bare = line.rstrip(b"\n")
    assert line_hash(bare) == line_hash(bare + b"\r\n") == line_hash(line) == own
    assert line_hash(bare[:-1] + b" }") is None  # anything else is part of the line


_H = "ab" * 32
_BODY = b'{"event":"db.session.query","seq":1,"prev_hash":"%s"' % GENESIS_HASH.encode()


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"\n",
        b"{}\n",
        _BODY + b"}\n",  # no hash member
        _BODY + b',"hash":"%s","x":1}\n' % _H.encode(),  # hash not the last member
        b'{"hash":"%s",' % _H.encode() + _BODY[1:] + b"}\n",  # hash first (legacy sorted keys put it mid-line)
        _BODY + b',"hash":"%s"}\n' % _H[:-1].encode(),  # 63 digits
        _BODY + b',"hash":"%s0"}\n' % _H.encode(),  # 65 digits
        _BODY + b',"hash": "%s"}\n' % _H.encode(),  # not the member as the recorder writes it
        _BODY + b',"hash":"%s"} \n' % _H.encode(),  # trailing blank
        _BODY + b',"hash":"%s"\n' % _H.encode(),  # torn: no closing brace
        b'{"hash":"%s"}\n' % _H.encode(),  # nothing before the hash to link
        _BODY + b',"hash":%s}\n' % (b"1" * 66),  # not a string
    ],
)
def test_line_hash_none_without_the_trailing_hash_member(line: bytes) -> None:
    assert line_hash(line) is None


def test_line_hash_is_over_the_bytes_not_the_hash_value() -> None:
    line = _BODY + b',"hash":"%s"}\n' % _H.encode()
    assert line_hash(line) == hashlib.sha256(_BODY + b"}").hexdigest()
    assert line_hash(line.replace(_H.encode(), b"0" * 64)) == line_hash(line)


# --------------------------------------------------------------------------
# Single-byte edits.


def test_every_single_byte_edit_fails_at_that_line(tmp_path) -> None:
    """Every byte of every line (hash member and newline included), changed two ways (low bit, case /
    blank bit), through the real ``verify_files`` on a file."""
    lines = stamped()
    path = tmp_path / "audit.jsonl"
    assert verify_files([write(path, lines)]).ok
    for i, line in enumerate(lines):
        for pos in range(len(line)):
            for new in (line[pos] ^ 0x01, line[pos] ^ 0x20):
                edited = list(lines)
                edited[i] = line[:pos] + bytes([new]) + line[pos + 1:]
                error = verify_files([write(path, edited)]).error
                assert error is not None and error.line == i + 1, (i, pos, new, error)


def test_every_value_of_every_content_byte_fails_that_line() -> None:
    """All 256 values at every content position (up to the hash member) of the line with the most
    escapes in it, through ``ChainChecker.check`` with the line, after the unchanged lines before it."""
    lines = stamped()
    i = next(n for n, x in enumerate(lines) if b"\\u001f" in x)
    checker = ChainChecker()
    for line in lines[:i]:
        assert checker.check(orjson.loads(line), line) is None
    line = lines[i]
    for pos in range(line.rindex(b',"hash":"')):
        for new in range(256):
            if new == line[pos]:
                continue
            edited = line[:pos] + bytes([new]) + line[pos + 1:]
            try:
                event = orjson.loads(edited)
            except orjson.JSONDecodeError:
                continue  # verify stops here: not valid JSON
            reason = copy.copy(checker).check(event, edited)
            assert reason is not None, (pos, new)


def test_an_edit_that_keeps_the_parsed_event_still_fails() -> None:
    lines = stamped()
    i = next(n for n, x in enumerate(lines) if b"\\u001f" in x)
    edited = lines[i].replace(b"\\u001f", b"\\u001F")
    assert orjson.loads(edited) == orjson.loads(lines[i])  # the same event once parsed
    assert check_all(lines[:i] + [edited] + lines[i + 1:]) == (i + 1, f"hash mismatch at seq {i + 1}: the event was modified")


def test_a_stamped_event_needs_its_line() -> None:
    """The link is over the line's bytes: the parsed event alone does not verify (only a legacy one does)."""
    line = stamped()[0]
    assert ChainChecker().check(orjson.loads(line), line) is None
    assert "hash mismatch" in ChainChecker().check(orjson.loads(line))


# --------------------------------------------------------------------------
# Legacy trails (links over canonical sorted-key JSON).


def legacy_lines(bodies: list[bytes], *, sorted_keys: bool, seq: int = 0, prev: str = GENESIS_HASH) -> list[bytes]:
    out = []
    for body in bodies:
        seq += 1
        event = orjson.loads(body)
        event.update(seq=seq, prev_hash=prev)
        event["hash"] = prev = chain_hash(event)
        out.append(orjson.dumps(event, option=orjson.OPT_SORT_KEYS if sorted_keys else 0) + b"\n")
    return out


@pytest.mark.parametrize("sorted_keys", [True, False])
def test_legacy_trail_verifies_and_continues_under_line_hashes(tmp_path, sorted_keys: bool) -> None:
    old = legacy_lines(BODIES, sorted_keys=sorted_keys)
    # The hash member is last only when the keys were not sorted; either way it is not the line's hash.
    assert all(line_hash(x) != orjson.loads(x)["hash"] for x in old)
    assert check_all(old) is None
    result = verify_files([write(tmp_path / "old.jsonl", old)])
    assert result.ok and (result.events, result.last_seq) == (len(BODIES), len(BODIES))
    # An upgraded proxy continues the chain from the legacy file's last link (``recover_tail``).
    last = orjson.loads(old[-1])
    new = stamped(BODIES, AuditRecorder(sinks=[], last_seq=last["seq"], last_hash=last["hash"]))
    assert orjson.loads(new[0])["prev_hash"] == last["hash"]
    both = old + new
    assert check_all(both) is None
    result = verify_files([write(tmp_path / "both.jsonl", both)])
    assert result.ok and result.events == 2 * len(BODIES)
    # And a legacy line is still protected by its link.
    event = orjson.loads(old[3])
    event["db_query"] = "select forged"
    old[3] = orjson.dumps(event, option=orjson.OPT_SORT_KEYS if sorted_keys else 0) + b"\n"
    error = verify_files([write(tmp_path / "edited.jsonl", old)]).error
    assert (error.line, error.reason) == (4, "hash mismatch at seq 4: the event was modified")


def test_legacy_event_verifies_without_its_line() -> None:
    (line,) = legacy_lines(BODIES[:1], sorted_keys=True)
    assert ChainChecker().check(orjson.loads(line)) is None


# --------------------------------------------------------------------------
# Deleted, duplicated, reordered lines.


def break_of(tmp_path, lines: list[bytes]):
    return verify_files([write(tmp_path / "audit.jsonl", lines)]).error


def test_deleting_any_inner_line_breaks_at_its_place(tmp_path) -> None:
    lines = stamped()
    for i in range(1, len(lines) - 1):
        error = break_of(tmp_path, lines[:i] + lines[i + 1:])
        assert (error.line, error.reason) == (i + 1, f"sequence break: expected seq {i + 1}, found {i + 2} "
                                                     "(events missing, inserted or reordered)")


def test_swapping_or_duplicating_a_line_breaks_at_the_first_out_of_place(tmp_path) -> None:
    lines = stamped()
    for i in range(len(lines) - 1):
        swapped = list(lines)
        swapped[i], swapped[i + 1] = swapped[i + 1], swapped[i]
        error = break_of(tmp_path, swapped)
        # Moved to the front, seq 2 reads as a trail that starts later; the break is then at seq 1.
        assert error.line == (2 if i == 0 else i + 1) and "sequence break" in error.reason
        error = break_of(tmp_path, lines[:i + 1] + [lines[i]] + lines[i + 1:])  # a replayed line
        assert error.line == i + 2 and f"expected seq {i + 2}, found {i + 1}" in error.reason


def test_a_relinked_line_breaks_the_next_link(tmp_path) -> None:
    """Moving a line by rewriting its seq (and re-hashing it) still leaves the next prev_hash dangling."""
    lines = stamped()
    del lines[3]
    for i in range(3, len(lines)):  # renumber and re-hash the rest as a forger would, except the links
        event = orjson.loads(lines[i])
        core = lines[i][:lines[i].rindex(b',"seq":')] + b',"seq":%d,"prev_hash":"%s"}' % (i + 1, event["prev_hash"].encode())
        lines[i] = core[:-1] + b',"hash":"%s"}\n' % hashlib.sha256(core).hexdigest().encode()
    assert line_hash(lines[3]) == orjson.loads(lines[3])["hash"]
    error = break_of(tmp_path, lines)
    assert (error.line, error.reason) == (4, "chain break at seq 4: prev_hash does not match the hash of seq 3")


def test_head_and_tail_deletions_leave_a_shorter_chain_that_says_where_it_starts_and_ends(tmp_path) -> None:
    """What a chain alone cannot see: a trail may start later (rotation) and end anywhere; verify
    reports its first and last seq so a missing head or tail shows."""
    lines = stamped()
    result = verify_files([write(tmp_path / "audit.jsonl", lines[1:-1])])
    assert result.ok and (result.first_seq, result.last_seq) == (2, len(lines) - 1)
    assert result.last_hash == orjson.loads(lines[-2])["hash"]


def test_seq_1_must_link_to_genesis(tmp_path) -> None:
    lines = stamped(BODIES, AuditRecorder(sinks=[], last_seq=0, last_hash="1" * 64))
    assert line_hash(lines[0]) == orjson.loads(lines[0])["hash"]  # its own hash is right
    error = break_of(tmp_path, lines)
    assert (error.line, error.reason) == (1, "seq 1 does not start from the genesis hash")


def test_across_rotated_files(tmp_path) -> None:
    lines = stamped()
    first, second = tmp_path / "audit.jsonl.1", tmp_path / "audit.jsonl"
    write(first, lines[:5])
    write(second, lines[5:])
    result = verify_files([str(second), str(first)])  # put in order by their first seq
    assert result.ok and result.events == len(lines)
    write(second, lines[6:])  # the first line of the newer file deleted
    error = verify_files([str(first), str(second)]).error
    assert (error.file, error.line) == (str(second), 1) and "expected seq 6, found 7" in error.reason
    write(first, lines[:4] + lines[5:6])  # a line moved from one file to the other
    write(second, lines[4:5] + lines[6:])
    error = verify_files([str(first), str(second)]).error
    assert (error.file, error.line) == (str(first), 5) and "expected seq 5, found 6" in error.reason


def test_family_fields():
    """``db`` sessions keep Teleport's field and event names; another family (``ssh``) carries none of them."""
    from dbproxy.access import audit_denial
    from dbproxy.errors import AccessDenied

    recorder = AuditRecorder(sinks=[])
    for family, protocol in (("db", "postgres"), ("ssh", "ssh")):
        s = Session(listener="l", protocol=protocol, client_addr="127.0.0.1:5000")
        s.event_family = family
        s.identity = Identity(user="bob", roles=("ops",), method="token")
        s.target, s.login, s.backend_addr = "web-1", "deploy", "10.0.0.5:22"
        s.audit = recorder.session(s)
        audit_denial(s, AccessDenied("no", reason="no_role_allows"), stage="connect")
    db, ssh = [orjson.loads(b) for b in recorder._queue]
    assert db["event"] == "db.session.access_denied" and db["code"] == "TDB10W"
    assert (db["db_protocol"], db["db_name"], db["db_user"], db["db_uri"]) == ("postgres", "web-1", "deploy", "10.0.0.5:22")
    assert ssh["event"] == "ssh.session.access_denied"
    assert not {"db_protocol", "db_name", "db_user", "db_uri"} & set(ssh)
    assert (ssh["protocol"], ssh["target"], ssh["login"], ssh["target_addr"]) == ("ssh", "web-1", "deploy", "10.0.0.5:22")
