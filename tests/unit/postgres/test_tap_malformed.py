"""Malformed bodies in a tapped PostgreSQL session (issue 13 §1: a malformed message must not blind the audit).

Proven here:

- The tapped ``Tee``'s body checks (``FRONTEND_CHECKS`` / ``BACKEND_CHECKS``) accept exactly the frames
  the audit stage's own ``parse_*`` accepts (hypothesis: random bodies, and valid bodies cut short or
  extended), also when the frame sits inside a larger buffer whose following bytes would complete it
  (a Query without its NUL followed by a frame that has one).
- A Tee with the checks (a framer, below) refuses the first malformed frame of a stream fed whole, byte by byte, or with
  more frames after it: it raises ``MalformedMessage`` (type, code, length, first 64 bytes), the frames
  before it are consumed and tapped, the bad frame and what follows are neither.
- The captured sessions of ``test_tap`` pass the checks unchanged.
- The worker's ``Tap`` never drops a session's audit for one frame: a frame its stage cannot parse
  (a malformed backend CommandComplete, or bytes that did not come through a Tee) is audited as
  ``audit.malformed`` and the next statements are audited as before.
"""

from __future__ import annotations

import struct

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dbproxy.audit import events as ev
from dbproxy.audit.recorder import AuditRecorder, TemplateAudit
from dbproxy.buffer import ReceiveBuffer
from dbproxy.errors import MalformedMessage
from dbproxy.sansio import NEED_DATA
from dbproxy.engines.postgres import messages as m
from dbproxy.engines.postgres.stages import BackendAudit, FrontendAudit
from dbproxy.engines.postgres.codec import DEFAULT_MAX_MESSAGE_SIZE
from dbproxy.engines.postgres.tap import BACKEND_CHECKS, BACKEND_SIDE, FRONTEND_CHECKS, FRONTEND_SIDE, Tap
from dbproxy.tee import Tee
from tests.unit.postgres.test_tap import SESSIONS, bind, close, execute, parse, pg

PARSERS = {
    ("fe", m.FE.QUERY): m.parse_query,
    ("fe", m.FE.PARSE): m.parse_parse,
    ("fe", m.FE.BIND): m.parse_bind,
    ("fe", m.FE.EXECUTE): m.parse_execute,
    ("fe", m.FE.CLOSE): m.parse_close,
    ("be", m.BE.COMMAND_COMPLETE): m.parse_command_complete,
    ("be", m.BE.ERROR_RESPONSE): m.parse_error_fields,
}
CHECKS = {"fe": FRONTEND_CHECKS, "be": BACKEND_CHECKS}


def test_every_type_the_audit_parses_is_checked() -> None:
    assert {t for side, t in PARSERS if side == "fe"} == set(FRONTEND_CHECKS)
    assert {t for side, t in PARSERS if side == "be"} == set(BACKEND_CHECKS)
    assert set(FRONTEND_CHECKS) <= FrontendAudit.interest and set(BACKEND_CHECKS) <= BackendAudit.interest


VALID_BODIES = {
    ("fe", m.FE.QUERY): m.encode_query("insert into t values (1)")[5:],
    ("fe", m.FE.PARSE): parse("s1", "select $1", (23,))[5:],
    ("fe", m.FE.BIND): bind("p", "s1", (1,), (struct.pack(">i", 7), None))[5:],
    ("fe", m.FE.EXECUTE): execute("p", 5)[5:],
    ("fe", m.FE.CLOSE): close("S", "s1")[5:],
    ("be", m.BE.COMMAND_COMPLETE): m.encode_command_complete("INSERT 0 1")[5:],
    ("be", m.BE.ERROR_RESPONSE): m.encode_error("ERROR", "42P01", 'relation "t" does not exist')[5:],
}


@st.composite
def bodies(draw):
    key = draw(st.sampled_from(sorted(PARSERS)))
    valid = VALID_BODIES[key]
    how = draw(st.sampled_from(["random", "cut", "extended", "nul-free", "mutated", "mutated-cut"]))
    if how == "random":
        body = draw(st.binary(max_size=60))
    elif how.startswith("mutated"):
        body = bytearray(valid)
        for _ in range(draw(st.integers(1, 3))):
            body[draw(st.integers(0, len(body) - 1))] = draw(st.sampled_from([0, 0xFF, 0x7F, 0x80, 1, 2, 0x41]))
        body = bytes(body)
        if how == "mutated-cut":
            body = body[:draw(st.integers(0, len(body)))]
    elif how == "cut":
        body = valid[:draw(st.integers(0, len(valid)))]
    elif how == "extended":
        body = valid + draw(st.binary(max_size=12))
    else:
        body = valid.replace(b"\0", b"x")
    return key, body


def parser_accepts(key, frame: bytes) -> bool:
    try:
        PARSERS[key](m.Message(frame[0], frame))
    except MalformedMessage:
        return False
    return True  # any other exception propagates: the parsers raise only MalformedMessage


@settings(max_examples=3000, deadline=None)
@given(case=bodies(), before=st.binary(max_size=8), after=st.binary(max_size=8))
def test_checks_agree_with_the_parsers(case, before: bytes, after: bytes) -> None:
    (side, t), body = case
    frame = pg(bytes([t]), body)
    accepted = parser_accepts((side, t), frame)
    for data in (frame, bytearray(before + frame + after)):
        pos = len(data) - len(frame) - (len(after) if data is not frame else 0)
        try:
            CHECKS[side][t](data, pos, len(frame))
        except MalformedMessage as exc:
            assert not accepted
            assert exc.length == len(frame) and exc.prefix == frame[:64]
        else:
            assert accepted


def test_a_query_without_nul_is_refused_even_when_the_next_frame_has_one() -> None:
    data = b"Q\x00\x00\x00\x0cselect 1" + m.encode_query("select 2")
    with pytest.raises(MalformedMessage):
        FRONTEND_CHECKS[m.FE.QUERY](data, 0, 13)


# --------------------------------------------------------------------------
# The Tee with the checks, as dbproxy.flow.assemble builds it.

BAD_QUERY = bytes.fromhex("510000000c73656c6563742031")  # the example: 'select 1' without its NUL
GOOD = m.encode_query("select 1") + parse("", "select $1", (23,)) + bind("", "", (), (b"1",)) + execute("") + m.encode_sync()
BAD_FRONTEND = {
    "query": (BAD_QUERY, "Query", "Q"),
    "parse": (pg("P", b"s\0select 1\0\x00\x02\x00\x00"), "Parse", "P"),
    "bind": (pg("B", b"\0\0\x00\x00\x00\x01\x00\x00\x00\x09ab"), "Bind", "B"),
    "execute": (pg("E", b"portal-without-nul"), "Execute", "E"),
    "close": (pg("C", b""), "Close", "C"),
    "long-query": (pg("Q", b"insert into t values ('" + b"x" * 200 + b"')"), "Query", "Q"),
}


def framer(side: str = "fe") -> tuple[Tee, list[bytes]]:
    tapped: list[bytes] = []
    f = Tee(ReceiveBuffer(), FRONTEND_SIDE if side == "fe" else BACKEND_SIDE, limit=DEFAULT_MAX_MESSAGE_SIZE,
            tap=tapped.append)
    return f, tapped


def test_the_sides_check_what_the_stages_read() -> None:
    assert (FRONTEND_SIDE.checks, BACKEND_SIDE.checks) == (FRONTEND_CHECKS, BACKEND_CHECKS)
    assert (FRONTEND_SIDE.interest, BACKEND_SIDE.interest) == (FrontendAudit.interest, BackendAudit.interest)


def run(f: Tee, chunks: list[bytes]) -> tuple[bytes, MalformedMessage | None]:
    consumed = b""
    for chunk in chunks:
        f.feed(chunk)
        f.buffer.mark()
        try:
            assert f.next_message() is NEED_DATA
        except MalformedMessage as exc:
            return consumed + f.buffer.consumed_since_mark(), exc
        consumed += f.buffer.consumed_since_mark()
        f.buffer.compact()
    return consumed, None


@pytest.mark.parametrize("case", sorted(BAD_FRONTEND))
@pytest.mark.parametrize("feed", ["whole", "bytes", "trailing"])
def test_framer_refuses_a_malformed_body_before_forwarding_it(case: str, feed: str) -> None:
    bad, name, code = BAD_FRONTEND[case]
    after = m.encode_query("insert into t values (666)") + m.encode_sync()
    stream = GOOD + bad + (after if feed == "trailing" else b"")
    chunks = [stream[i:i + 1] for i in range(len(stream))] if feed == "bytes" else [stream]
    f, tapped = framer()
    consumed, exc = run(f, chunks)
    assert exc is not None, "the malformed frame was accepted"
    assert consumed == GOOD  # forwarded: the frames before it, never it or what follows
    assert b"".join(tapped) == GOOD  # and the audit got them all
    assert bytes(f.buffer.peek(len(bad))) == bad  # still there, unconsumed
    assert (exc.type_name, exc.type_code, exc.length) == (name, code, len(bad))
    assert exc.prefix == bad[:64] and exc.prefix.hex() == exc.audit_fields()["prefix_hex"]
    assert exc.audit_fields()["truncated"] == (len(bad) > 64)
    assert "malformed" in exc.client_hint


@pytest.mark.parametrize("bad,name", [(pg("C", b"INSERT 0 1"), "CommandComplete"),
                                      (pg("E", b"SERROR\0C42P01"), "ErrorResponse/NoticeResponse"),
                                      (pg("C", b""), "CommandComplete")])
def test_framer_checks_backend_bodies_the_audit_reads(bad: bytes, name: str) -> None:
    good = pg("T", b"\x00\x00") + pg("D", b"no NUL needed here") + m.encode_command_complete("SELECT 1")
    f, tapped = framer("be")
    consumed, exc = run(f, [good + bad + m.encode_ready_for_query()])
    assert exc is not None and exc.type_name == name
    assert consumed == good and b"".join(tapped) == m.encode_command_complete("SELECT 1")


@pytest.mark.parametrize("name", sorted(SESSIONS))
@pytest.mark.parametrize("step", [None, 1])
def test_captured_sessions_pass_the_checks(name: str, step: int | None) -> None:
    framers = {0: framer("fe"), 1: framer("be")}
    for direction, data in SESSIONS[name]:
        f, _ = framers[direction]
        chunks = [data[i:i + step] for i in range(0, len(data), step)] if step else [data]
        consumed, exc = run(f, chunks)
        assert exc is None and consumed == data


def test_framer_without_a_tap_checks_nothing() -> None:
    """The checks guard what the audit will parse: a Tee that taps nothing has none to run."""
    f = Tee(ReceiveBuffer(), FRONTEND_SIDE, limit=DEFAULT_MAX_MESSAGE_SIZE)
    consumed, exc = run(f, [BAD_QUERY])
    assert exc is None and consumed == BAD_QUERY


# --------------------------------------------------------------------------
# The worker's Tap carries on.


def template() -> dict:
    return {"sid": "s-1", "user": "alice", "db_protocol": "postgres"}


def events(recorder: AuditRecorder) -> list[dict]:
    return [orjson.loads(body) for body in recorder._queue]


@pytest.mark.parametrize("step", [None, 1])
def test_tap_audits_an_unparsable_frame_and_carries_on(step: int | None) -> None:
    recorder = AuditRecorder(sinks=[])
    tap = Tap(TemplateAudit(recorder, template()))
    steps = [
        (0, m.encode_query("select 1")),
        (1, pg("C", b"SELECT 1") + m.encode_ready_for_query()),  # a CommandComplete without its NUL
        (0, BAD_QUERY),  # bytes that never went through a Tee
        (0, m.encode_query("insert into t values (2)")),
        (1, m.encode_command_complete("INSERT 0 1") + m.encode_ready_for_query()),
    ]
    for direction, data in steps:
        chunks = [data[i:i + step] for i in range(0, len(data), step)] if step else [data]
        for chunk in chunks:
            tap.feed(direction, chunk)
    got = events(recorder)
    kinds = [(e["event"], e.get("direction"), e.get("db_query") or e.get("command_tag")) for e in got]
    assert kinds == [
        (ev.QUERY, None, "select 1"),
        (ev.MALFORMED, "backend", None),
        (ev.MALFORMED, "client", None),
        (ev.QUERY, None, "insert into t values (2)"),
        (ev.RESULT, None, "INSERT 0 1"),
    ]
    bad_be, bad_fe = got[1], got[2]
    assert bad_be["message_type"] == "CommandComplete" and bad_be["message_code"] == "C"
    assert bad_be["prefix_hex"] == pg("C", b"SELECT 1").hex() and bad_be["truncated"] is False
    assert bad_fe["prefix_hex"] == BAD_QUERY.hex() and bad_fe["length"] == 13
    assert bad_fe["code"] == ev.CODES[ev.MALFORMED] and bad_fe["success"] is False
    assert got[4]["query_uid"] == got[3]["uid"]  # the later statement is audited and answered
