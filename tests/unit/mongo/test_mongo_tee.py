"""The proxy's side of a tapped Mongo session (``engines/mongo/tee.py``) on captured-style bytes.

Checked: ``check_request`` accepts exactly the OP_MSG requests the audit worker's stages read
(``read_request`` + ``render_command``; hypothesis over corrupted bytes); the tee taps passive
requests and their replies, returns hello/SASL/legacy frames to the stages (after a
``PassedRun`` of the passive frames before them, so a rewritten batch keeps them), refuses a
malformed request before consuming it with the frames before it tapped, gives the same result
however the bytes are split, and the worker's ``MongoTap`` audits what the tee tapped.
"""

from __future__ import annotations

import bson
from bson.datetime_ms import DatetimeMS
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dbproxy.errors import MalformedMessage
from dbproxy.sansio import NEED_DATA
from dbproxy.engines.mongo import protocol as wire
from dbproxy.engines.mongo.codec import MongoDecoder
from dbproxy.engines.mongo.errors import AttributingDecoder
from dbproxy.engines.mongo.stages.render import render_command
from dbproxy.engines.mongo.stages.session import PARSE_ERRORS, MongoSessionState, read_request
from dbproxy.engines.mongo.tap import MongoTap
from dbproxy.engines.mongo.tee import ACTIVE_COMMANDS, PassedRun, TeeState, check_request
from tests.unit.mongo.test_mongo_malformed import CASES


def op_msg(doc: dict, request_id: int, *, response_to: int = 0, flags: int = 0, sequences: dict | None = None) -> bytes:
    return wire.encode_op_msg(doc, request_id=request_id, response_to=response_to, flags=flags, sequences=sequences)


VALID = [
    op_msg({"find": "c", "filter": {"a": {"$gt": 1}}, "$db": "d"}, 1),
    op_msg({"insert": "c", "$db": "d"}, 2, sequences={"documents": [{"_id": i, "s": "x" * i} for i in range(4)]}),
    op_msg({"getMore": bson.int64.Int64(77), "collection": "c", "$db": "d"}, 3),
    op_msg({"update": "c", "updates": [{"q": {}, "u": {"$set": {"b": 2}}}], "$db": "d"}, 4, flags=wire.CHECKSUM_PRESENT),
]


def worker_reads(raw: bytes) -> str:
    """What the audit worker does with a request (raises what it raises)."""
    r = read_request(MongoSessionState(auth=None, max_message_size=wire.DEFAULT_MAX_MESSAGE_SIZE), wire.WireMessage.from_bytes(raw))
    if r.name not in ACTIVE_COMMANDS:
        render_command(r.body, r.name, r.sequences)
    return r.name


def verdict(fn, raw: bytes):
    try:
        return fn(raw)
    except PARSE_ERRORS:
        return "refused"


DATES = [  # valid BSON whose dates Python cannot hold: refused at the top level, rendered leniently inside
    op_msg({"find": "c", "d": DatetimeMS(2**62), "$db": "d"}, 5),
    op_msg({"find": "c", "filter": {"d": DatetimeMS(-2**62)}, "$db": "d"}, 6),
    op_msg({"insert": "c", "$db": "d"}, 8, sequences={"documents": [{"d": DatetimeMS(2**62)}]}),
]


@pytest.mark.parametrize("raw", VALID + DATES + [CASES[c] for c in sorted(CASES) if CASES[c][12:16] == wire.OP_MSG.to_bytes(4, "little")])
def test_check_request_agrees_with_the_worker(raw: bytes) -> None:
    assert verdict(check_request, raw) == verdict(worker_reads, raw)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(VALID[:3] + DATES), st.lists(st.tuples(st.integers(20, 400), st.integers(0, 255)), min_size=1, max_size=3))
def test_check_request_agrees_with_the_worker_on_corrupted_bytes(raw: bytes, flips: list) -> None:
    data = bytearray(raw)
    for at, value in flips:
        data[at % len(data)] = value
    data[:4] = len(data).to_bytes(4, "little")  # the frame stays whole: only its body lies
    data[12:16] = wire.OP_MSG.to_bytes(4, "little")  # the tee reads OP_MSG frames with it
    data[16:20] = b"\x00\x00\x00\x00"  # no checksum: that is the frame check's business
    assert verdict(check_request, bytes(data)) == verdict(worker_reads, bytes(data))



def _with_sections(body: dict, *sections: bytes) -> bytes:
    """An OP_MSG of flags 0: ``body`` as its kind-0 section, then ``sections`` as given (raw)."""
    rest = b"\x00" + bson.encode(body) + b"".join(sections)
    return (16 + 4 + len(rest)).to_bytes(4, "little") + (9).to_bytes(4, "little") + bytes(4) \
        + wire.OP_MSG.to_bytes(4, "little") + bytes(4) + rest


def _sequence(ident: bytes, *docs: bytes, size_delta: int = 0) -> bytes:
    payload = ident + b"\x00" + b"".join(docs)
    return b"\x01" + (4 + len(payload) + size_delta).to_bytes(4, "little", signed=True) + payload


_DOC = bson.encode({"_id": 1, "v": "x"})
_INSERT = {"insert": "c", "$db": "d"}
#: Sections after the body, the tee's fast path (``render.plain_sequences``) or its fallback.
SEQUENCES = {
    "one": _with_sections(_INSERT, _sequence(b"documents", _DOC, _DOC)),
    "two": _with_sections({"update": "c", "$db": "d"}, _sequence(b"updates", _DOC), _sequence(b"other", _DOC)),
    "empty sequence": _with_sections(_INSERT, _sequence(b"documents")),
    "repeated identifier": _with_sections(_INSERT, _sequence(b"documents", _DOC), _sequence(b"documents", _DOC)),
    "identifier not UTF-8": _with_sections(_INSERT, _sequence(b"doc\xffs", _DOC)),
    "identifier without NUL": _with_sections(_INSERT, b"\x01" + (4 + 9).to_bytes(4, "little") + b"documents"),
    "document size lies": _with_sections(_INSERT, _sequence(b"documents", _DOC[:-2] + b"\x00")),
    "document under 5 bytes": _with_sections(_INSERT, _sequence(b"documents", b"\x04\x00\x00\x00")),
    "sequence size past the end": _with_sections(_INSERT, _sequence(b"documents", _DOC, size_delta=3)),
    "sequence size under 5": _with_sections(_INSERT, b"\x01\x04\x00\x00\x00"),
    "truncated sequence size": _with_sections(_INSERT, b"\x01\x10\x00"),
    "second body": _with_sections(_INSERT, _sequence(b"documents", _DOC), b"\x00" + _DOC),
    "unknown kind": _with_sections(_INSERT, b"\x02" + _DOC),
}


@pytest.mark.parametrize("case", sorted(SEQUENCES))
def test_check_request_agrees_with_the_worker_on_document_sequences(case: str) -> None:
    raw = SEQUENCES[case]
    expected = "refused" if case not in ("one", "two", "empty sequence") else raw[21 + 4:].split(b"\x00")[0][1:].decode()
    assert verdict(worker_reads, raw) == expected  # the case is what its name says
    assert verdict(check_request, raw) == expected

def tees(log: list | None = None) -> tuple[TeeState, AttributingDecoder, AttributingDecoder, list, list]:
    """A session's two tees; ``log`` gets every tap as (direction, bytes), in order."""
    state = MongoSessionState(auth=None, max_message_size=wire.DEFAULT_MAX_MESSAGE_SIZE)
    t = TeeState(state)
    taps: tuple[list, list] = ([], [])
    log = [] if log is None else log

    def tap(direction: int):
        def put(data: bytes) -> None:
            taps[direction].append(data)
            log.append((direction, data))
        return put

    client = t.over(AttributingDecoder(MongoDecoder(), "client"), t.sides[0], tap(0))
    backend = t.over(AttributingDecoder(MongoDecoder(), "backend"), t.sides[1], tap(1))
    return t, client, backend, taps[0], taps[1]


def drain(decoder) -> list:
    out = []
    while (m := decoder.next_message()) is not NEED_DATA:
        out.append(m)
    return out


HELLO = op_msg({"hello": 1, "$db": "admin"}, 10)
FIND = VALID[0]
INSERT = VALID[1]


@pytest.mark.parametrize("split", [None, 1, 7])
def test_passive_frames_are_tapped_and_active_ones_returned(split) -> None:
    t, client, backend, client_taps, backend_taps = tees()
    stream = FIND + HELLO + INSERT
    got = []
    chunks = [stream] if split is None else [stream[i:i + split] for i in range(0, len(stream), split)]
    for chunk in chunks:
        client.feed(chunk)
        got.extend(drain(client))
    kinds = [type(m).__name__ for m in got]
    if split is None:
        # One batch: the find was consumed before the hello, so it comes first as a run of its own.
        assert kinds == ["PassedRun", "WireMessage"] and got[0] == PassedRun(FIND)
    else:
        assert kinds == ["WireMessage"]
    assert got[-1].raw == HELLO
    assert b"".join(client_taps) == FIND + INSERT
    assert set(t.pending) == {1, 2}
    # Replies: to a passive request tapped; to the hello (an inline request) returned.
    reply_find = op_msg({"cursor": {"id": bson.int64.Int64(0), "ns": "d.c", "firstBatch": []}, "ok": 1.0}, 100, response_to=1)
    reply_hello = op_msg({"ok": 1.0, "isWritablePrimary": True}, 101, response_to=10)
    backend.feed(reply_find + reply_hello)
    got = drain(backend)
    assert [type(m).__name__ for m in got] == ["PassedRun", "WireMessage"] and got[1].raw == reply_hello
    assert backend_taps == [reply_find] and set(t.pending) == {2}


def test_a_malformed_request_is_refused_before_it_is_consumed() -> None:
    t, client, _, client_taps, _ = tees()
    bad = CASES["nested-string-length-lies"]
    client.feed(FIND + bad)
    with pytest.raises(MalformedMessage) as info:
        client.next_message()
    assert client_taps == [FIND]  # the frame before it is tapped (and forwarded), it is not
    assert client.buffer.peek(len(bad)).tobytes() == bad
    assert info.value.mongo_side == "client" and info.value.mongo_header.request_id == 7
    assert t.state.errors == 1


def test_garbage_is_refused_as_the_decoder_refuses_it() -> None:
    for data in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 8):
        _, client, _, _, _ = tees()
        decoder = AttributingDecoder(MongoDecoder(), "client")
        client.feed(data)
        decoder.feed(data)
        with pytest.raises(Exception) as tee_error:
            drain(client)
        with pytest.raises(Exception) as decoder_error:
            drain(decoder)
        assert (type(tee_error.value), str(tee_error.value)) == (type(decoder_error.value), str(decoder_error.value))


class Audit:
    def __init__(self) -> None:
        self.events: list[dict] = []

    def emit(self, event: str, **fields) -> dict:
        e = {"event": event, "uid": f"u{len(self.events)}", **fields}
        self.events.append(e)
        return e

    def on_query(self, query: str, **fields) -> dict:
        return self.emit("db.session.query", db_query=query, **fields)

    def on_result(self, **fields) -> dict:
        return self.emit("db.session.result", **fields)


def test_the_worker_audits_what_the_tee_tapped_and_the_notes() -> None:
    log: list = []
    t, client, backend, _, _ = tees(log)
    client.feed(FIND + INSERT)
    drain(client)
    backend.feed(op_msg({"n": 4, "ok": 1.0}, 100, response_to=2))
    drain(backend)
    t.note(add={"commands": 1, "errors": 0, "compressed_requests": 0})
    from dbproxy.engines.mongo.tee import lost_passive_replies
    answers = lost_passive_replies(t, "gone", 6)
    assert wire.WireMessage.from_bytes(answers).response_to == 1
    audit = Audit()
    tap = MongoTap(audit)
    for direction, data in log:
        tap.feed(direction, data)
    assert [(e["event"], e.get("command"), e.get("success")) for e in audit.events] == [
        ("db.session.query", "find", None), ("db.session.query", "insert", None),
        ("db.session.result", "insert", True), ("db.session.result", "find", False)]
    assert audit.events[1]["document_count"] == 4 and audit.events[2]["affected_records"] == 4
    assert audit.events[3]["errmsg"] == "gone" and audit.events[3]["query_uid"] == audit.events[0]["uid"]
    assert tap.counts() == {"commands": 3, "errors": 1, "compressed_requests": 0}


def test_exhaust_replies_stay_passive_and_are_audited_once_each() -> None:
    """getMore with exhaustAllowed: each reply with moreToCome is answered by the next one
    (OP_MSG.md), so the tee re-keys its pending request as ``read_reply`` does."""
    log: list = []
    t, client, backend, _, backend_taps = tees(log)
    client.feed(op_msg({"getMore": bson.int64.Int64(9), "collection": "c", "$db": "d"}, 40, flags=wire.EXHAUST_ALLOWED))
    assert drain(client) == [] and set(t.pending) == {40}
    batch = {"cursor": {"nextBatch": [{"a": 1}], "id": bson.int64.Int64(9), "ns": "d.c"}, "ok": 1.0}
    last = {"cursor": {"nextBatch": [], "id": bson.int64.Int64(0), "ns": "d.c"}, "ok": 1.0}
    replies = [op_msg(batch, 41, response_to=40, flags=wire.MORE_TO_COME), op_msg(batch, 42, response_to=41, flags=wire.MORE_TO_COME),
               op_msg(last, 43, response_to=42)]
    for r in replies:
        backend.feed(r)
        assert drain(backend) == []
    assert b"".join(backend_taps) == b"".join(replies) and not t.pending
    audit = Audit()
    tap = MongoTap(audit)
    for direction, data in log:
        tap.feed(direction, data)
    results = [e for e in audit.events if e["event"] == "db.session.result"]
    assert [r["batch_size"] for r in results] == [1, 1, 0] and {r["query_uid"] for r in results} == {audit.events[0]["uid"]}


class TapAudit(Audit):
    """What ``flow.assemble`` needs of a session's audit to tap (``SessionAudit``'s tap methods)."""

    can_tap = True

    def __init__(self) -> None:
        super().__init__()
        self.opened: list = []
        self.tapped: list = []

    def tap_open(self, tap, params=None) -> int:
        self.opened.append(tap)
        return 5

    def tap(self, slot: int, direction: int, data: bytes) -> None:
        self.tapped.append((slot, direction, data))

    def tap_close(self, slot: int) -> None:
        self.opened.append(("closed", slot))


def test_the_core_taps_a_plan_with_active_frames_and_runs_the_stages_on_them() -> None:
    """``dbproxy.flow.assemble``: active stages keep a session inline unless its plan's tees
    return the frames those stages act on (``TapPlan.active_frames``, the Mongo plan)."""
    import attrs

    from dbproxy.flow import Wiring, assemble
    from dbproxy.tee import TapPlan

    state = MongoSessionState(auth=None, max_message_size=wire.DEFAULT_MAX_MESSAGE_SIZE)
    t = TeeState(state)
    stages = [object()]

    def wiring(plan) -> Wiring:
        return Wiring(AttributingDecoder(MongoDecoder(), "client"), AttributingDecoder(MongoDecoder(), "backend"),
                      stages, [], state, lambda exc: b"", tap=plan)

    audit = TapAudit()
    plan = TapPlan(MongoTap, *t.sides, tee=t, active_frames=True)
    plumbing = assemble(wiring(plan), audit)
    assert audit.opened == [MongoTap] and plumbing.client_stages == stages and t.tapping
    plumbing.client_decoder.feed(FIND + HELLO)
    assert plumbing.client_decoder.next_message().raw == FIND  # a PassedRun, then the hello for the stages
    assert plumbing.client_decoder.next_message().raw == HELLO
    assert audit.tapped == [(5, 0, FIND)]
    plumbing.close()
    assert audit.opened[-1] == ("closed", 5)
    # The same stages with a plan that cannot return frames: inline.
    inline = assemble(wiring(attrs.evolve(plan, active_frames=False)), TapAudit())
    assert inline.close is None and type(inline.client_decoder.inner).__name__ == "MongoDecoder"


def _outcome(decoder, chunks: list) -> tuple:
    """(frames consumed, error) after feeding ``chunks`` one at a time."""
    consumed = 0
    for chunk in chunks:
        decoder.feed(chunk)
        try:
            while (m := decoder.next_message()) is not NEED_DATA:
                consumed += len(m.raw)
        except Exception as exc:  # the error is what is compared
            return consumed, (type(exc).__name__, str(exc))
    return consumed, None


BAD_HEADERS = {
    "short-length": (8).to_bytes(4, "little") + b"\x00" * 12,
    "too-large": (10**8).to_bytes(4, "little") + (1).to_bytes(4, "little") + b"\x00" * 4 + wire.OP_MSG.to_bytes(4, "little"),
    "http": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "tls": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 8,
    "unknown-opcode": (40).to_bytes(4, "little") + b"\x00" * 8 + (4242).to_bytes(4, "little") + b"\x00" * 24,
}


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
@pytest.mark.parametrize("split", [None, 1, 3, 5, 17])
def test_the_tee_refuses_a_bad_header_as_the_decoder_does(case: str, split) -> None:
    """The same error, at the same byte, however the bytes arrive (the one frame loop)."""
    data = FIND + BAD_HEADERS[case]
    chunks = [data] if split is None else [data[i:i + split] for i in range(0, len(data), split)]
    _, client, _, _, _ = tees()
    decoder = AttributingDecoder(MongoDecoder(max_message_size=1 << 20), "client")
    client.inner.limit = 1 << 20
    tee_error = _outcome(client, chunks)[1]
    decoder_error = _outcome(decoder, chunks)[1]
    assert tee_error == decoder_error and tee_error is not None
