"""The Postgres tap (the core ``Tee`` with ``engines.postgres.tap``'s sides; its ``Tap``) against the real
decoders and the inline audit stages.

Proven here, on the captured streams of tests/data/postgres (``test_pg_codec``'s fixtures) and on
streams built by hypothesis:

- the ``Tee`` ("framer" below) frames exactly as ``FrontendDecoder`` / ``BackendDecoder`` do.  Both are fed the same
  chunks (whole, one byte at a time, random cuts); after every feed + ``next_message`` the bytes the
  Framer consumed (``consumed_since_mark``, what the pump forwards and taps) are exactly the ``raw`` of
  the messages the real decoder returned, the bytes left buffered are the same, and the Framer never
  returns a message.  A bad length (< 4) or an oversized frame raises the same exception class with the
  same message, hint and size/limit, after consuming the same valid prefix; an oversized frame is
  refused from its header alone, before any of its body is in.
- ``terminated`` (Terminate in the Tee's ``seen``) turns on only once a whole Terminate ('X') frame has been consumed.
- ``Tap`` over a session's forwarded bytes (psql simple queries with an error, an empty query and a
  notification; psycopg's extended protocol with binary, text and NULL parameters, a named statement,
  a batch under one Sync and a failed execute; psycopg COPY in/out; and a constructed session with a
  named portal, PortalSuspended, Close, FunctionCall and an unknown portal) queues the same audit event
  bodies as ``FrontendAudit`` / ``BackendAudit`` run inline with a ``SessionAudit`` — every field equal
  but ``uid`` and ``time``, every result's ``query_uid`` naming the same query, which is the query the
  result answers — whatever the cuts of the forwarded bytes, and ``Tap.counts()`` equals the inline
  ``PgSessionState``'s queries and errors.
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
from dbproxy.errors import FrameTooLarge, ProtocolError, RemoteProtocolError
from dbproxy.sansio import NEED_DATA
from dbproxy.session import Identity, Session
from dbproxy.engines.postgres import messages as m
from dbproxy.engines.postgres.codec import DEFAULT_MAX_MESSAGE_SIZE, BackendDecoder, FrontendDecoder
from dbproxy.engines.postgres.stages import BackendAudit, FrontendAudit, PgSessionState
from dbproxy.engines.postgres.tap import BACKEND_SIDE, FRONTEND_SIDE, Tap
from dbproxy.tee import Tee
from tests.unit.postgres.test_pg_codec import CAPTURES, decode_backend, decode_frontend, load

FE, BE = 0, 1  # tap directions: client -> backend, backend -> client


def pg(t: str | bytes, body: bytes = b"") -> bytes:
    return m.encode_message(t, body)


def Framer(buffer: ReceiveBuffer, *, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE, tap=None, side=FRONTEND_SIDE) -> Tee:
    """The Tee a tapped session's pump uses (``dbproxy.flow.assemble``); frontend side by default."""
    return Tee(buffer, side, limit=max_message_size, tap=tap)


def terminated(framer: Tee) -> bool:
    return m.FE.TERMINATE in framer.seen


# --------------------------------------------------------------------------
# The typed part of the captured streams (what a session's pumps frame).


def typed_stream(name: str, side: str) -> bytes:
    """The capture after its start-up packets (frontend) or SSL answer byte (backend)."""
    if side == "fe":
        _, msgs = decode_frontend(load(name, "fe"))
        startup = sum(len(x.raw) for x in msgs if not x.type)
        return load(name, "fe")[startup:]
    data = load(name, "be")
    return data[1:] if name == "psql_sslprefer" else data


TYPED = [(name, side) for name in CAPTURES for side in ("fe", "be") if typed_stream(name, side)]
REAL = {"frontend": lambda limit: FrontendDecoder(startup=False, max_message_size=limit),
        "backend": lambda limit: BackendDecoder(max_message_size=limit)}


def cut(data: bytes, sizes: list[int]) -> list[bytes]:
    """``data`` in chunks of the given sizes (cycled; the last chunk takes the rest)."""
    chunks, pos, i = [], 0, 0
    while pos < len(data):
        n = sizes[i % len(sizes)] if sizes else len(data)
        chunks.append(data[pos:pos + n])
        pos += n
        i += 1
    return chunks


def compare(chunks: list[bytes], real, framer: Tee) -> tuple[bytes, ProtocolError | None]:
    """Feed both the same chunks as a pump would; check them step by step.

    Returns the bytes consumed in all and the error both raised (None if none)."""
    consumed = bytearray()
    messages = 0
    was_terminated = False
    for chunk in chunks:
        real.feed(chunk)
        framer.feed(chunk)
        real.buffer.mark()
        framer.buffer.mark()
        got, real_exc, framer_exc = [], None, None
        try:
            while (msg := real.next_message()) is not NEED_DATA:
                got.append(msg)
        except ProtocolError as exc:
            real_exc = exc
        try:
            assert framer.next_message() is NEED_DATA  # never a message
        except ProtocolError as exc:
            framer_exc = exc
        step = b"".join(x.raw for x in got)
        assert framer.buffer.consumed_since_mark() == step == real.buffer.consumed_since_mark()
        assert len(framer.buffer) == len(real.buffer)
        consumed += step
        messages += len(got)
        was_terminated = was_terminated or any(x.type == m.FE.TERMINATE for x in got)
        assert framer.frames == messages
        assert terminated(framer) == was_terminated
        assert type(framer_exc) is type(real_exc)
        if real_exc is not None:
            assert str(framer_exc) == str(real_exc)
            assert framer_exc.client_hint == real_exc.client_hint
            if isinstance(real_exc, FrameTooLarge):
                assert (framer_exc.size, framer_exc.limit) == (real_exc.size, real_exc.limit)
            return bytes(consumed), real_exc
        real.buffer.compact()
        framer.buffer.compact()
    assert framer.next_message() is NEED_DATA
    return bytes(consumed), None


def pair(kind: str, limit: int = DEFAULT_MAX_MESSAGE_SIZE):
    return REAL[kind](limit), Framer(ReceiveBuffer(), max_message_size=limit)


# --------------------------------------------------------------------------
# Framer vs the real decoders.


@pytest.mark.parametrize("name,side", TYPED)
@pytest.mark.parametrize("step", [None, 1, 7])
@pytest.mark.parametrize("tail", [b"", b"D\x00\x00", b"Q\x00\x00\x00\x20sel"])
def test_framer_on_captures(name: str, side: str, step: int | None, tail: bytes) -> None:
    data = typed_stream(name, side)
    real, framer = pair("frontend" if side == "fe" else "backend")
    consumed, exc = compare(cut(data + tail, [step] if step else []), real, framer)
    assert exc is None and consumed == data
    assert len(framer.buffer) == len(tail)
    assert terminated(framer) == (side == "fe" and data.endswith(m.encode_terminate()))


@settings(max_examples=150, deadline=None)
@given(which=st.sampled_from(TYPED), sizes=st.lists(st.integers(1, 300), min_size=1, max_size=12),
       limit=st.one_of(st.just(DEFAULT_MAX_MESSAGE_SIZE), st.integers(4, 400)))
def test_framer_on_captures_random_cuts(which, sizes: list[int], limit: int) -> None:
    """Random cuts; a small limit makes some captured message oversized mid-stream."""
    name, side = which
    data = typed_stream(name, side)
    real, framer = pair("frontend" if side == "fe" else "backend", limit)
    consumed, exc = compare(cut(data, sizes), real, framer)
    assert data.startswith(consumed)
    biggest = max(struct.unpack_from(">i", x.raw, 1)[0] for x in decode_backend(data)[2])
    if biggest > limit:
        assert isinstance(exc, FrameTooLarge)
    else:
        assert exc is None and consumed == data


frame_types = st.sampled_from(b"QPBDESXHCZTdcn\xfe~")
good_frames = st.lists(st.builds(lambda t, body: pg(bytes([t]), body), frame_types, st.binary(max_size=40)),
                       max_size=8)


@st.composite
def streams(draw):
    """Valid frames, then an ending: none, a partial frame, a bad length, or an oversized header
    (with part of its body) — each followed by frames that must never be consumed."""
    limit = draw(st.integers(4, 64))
    frames = [f for f in draw(good_frames) if len(f) - 1 <= limit]
    ending = draw(st.sampled_from(["none", "partial", "bad", "oversize"]))
    t = bytes([draw(frame_types)])
    if ending == "partial":
        whole = pg(t, draw(st.binary(max_size=limit - 4)))
        tail = whole[:draw(st.integers(1, len(whole) - 1))]
    elif ending == "bad":
        tail = t + struct.pack(">i", draw(st.one_of(st.integers(-(2**31), 3), st.sampled_from([-1, 0, 3]))))
    elif ending == "oversize":
        size = draw(st.one_of(st.integers(limit + 1, 2**31 - 1), st.just(limit + 1)))
        tail = t + struct.pack(">i", size) + draw(st.binary(max_size=20))
    else:
        tail = b""
    after = b"".join(draw(good_frames)) if ending in ("bad", "oversize") else b""
    return b"".join(frames), tail + after, ending, limit


@settings(max_examples=400, deadline=None)
@given(stream=streams(), sizes=st.lists(st.integers(1, 40), max_size=8), kind=st.sampled_from(sorted(REAL)))
def test_framer_on_built_streams(stream, sizes: list[int], kind: str) -> None:
    good, rest, ending, limit = stream
    real, framer = pair(kind, limit)
    consumed, exc = compare(cut(good + rest, sizes), real, framer)
    assert consumed == good  # the valid frames, and nothing of what follows them
    expected = {"none": None, "partial": None, "bad": RemoteProtocolError, "oversize": FrameTooLarge}[ending]
    assert (type(exc) if exc is not None else None) is expected


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200), sizes=st.lists(st.integers(1, 30), max_size=6),
       limit=st.integers(4, 100), kind=st.sampled_from(sorted(REAL)))
def test_framer_on_random_bytes(data: bytes, sizes: list[int], limit: int, kind: str) -> None:
    real, framer = pair(kind, limit)
    compare(cut(data, sizes), real, framer)


@pytest.mark.parametrize("kind", sorted(REAL))
@pytest.mark.parametrize("length", [-(2**31), -1, 0, 3])
@pytest.mark.parametrize("step", [None, 1])
def test_bad_length_after_valid_frames(kind: str, length: int, step: int | None) -> None:
    good = m.encode_query("select 1") + m.encode_sync()
    bad = b"D" + struct.pack(">i", length)
    real, framer = pair(kind)
    consumed, exc = compare(cut(good + bad + m.encode_sync(), [step] if step else []), real, framer)
    assert consumed == good
    assert type(exc) is RemoteProtocolError and "invalid message length" in str(exc)
    assert bytes(framer.buffer.peek(len(bad))) == bad  # the bad frame is not consumed


@pytest.mark.parametrize("kind", sorted(REAL))
@pytest.mark.parametrize("step", [None, 1])
def test_oversize_refused_from_the_header_alone(kind: str, step: int | None) -> None:
    good = m.encode_query("select 1") + m.encode_sync()
    header = b"D" + struct.pack(">i", 1001)
    real, framer = pair(kind, 1000)
    consumed, exc = compare(cut(good + header, [step] if step else []), real, framer)  # no body byte fed
    assert consumed == good
    assert isinstance(exc, FrameTooLarge) and (exc.size, exc.limit) == (1001, 1000)
    assert "message 'D'" in str(exc)
    # Exactly the limit: waits for the body, then consumes the frame.
    real, framer = pair(kind, 1000)
    frame = b"D" + struct.pack(">i", 1000) + b"x" * 996
    consumed, exc = compare([frame[:5], frame[5:-1], frame[-1:]], real, framer)
    assert exc is None and consumed == frame


# --------------------------------------------------------------------------
# terminated.


def test_terminated_only_after_a_whole_terminate_frame() -> None:
    framer = Framer(ReceiveBuffer())
    framer.feed(pg("Q", b"X\0\0\0\x04\0") + b"X\0\0\0")  # an 'X' inside a body, then 4 bytes of one
    assert framer.next_message() is NEED_DATA
    assert not terminated(framer) and framer.frames == 1
    framer.feed(b"\x04")
    assert framer.next_message() is NEED_DATA
    assert terminated(framer) and framer.frames == 2 and len(framer.buffer) == 0

    framer = Framer(ReceiveBuffer())  # a Terminate with a body: terminated once its last byte is in
    framer.feed(m.encode_sync() + b"X\0\0\0\x06a")
    framer.next_message()
    assert not terminated(framer) and len(framer.buffer) == 6
    framer.feed(b"b")
    framer.next_message()
    assert terminated(framer)


@pytest.mark.parametrize("header,error", [(b"X" + struct.pack(">i", 3), RemoteProtocolError),
                                          (b"X" + struct.pack(">i", 101), FrameTooLarge)])
def test_a_refused_terminate_header_does_not_terminate(header: bytes, error) -> None:
    framer = Framer(ReceiveBuffer(), max_message_size=100)
    framer.feed(m.encode_sync() + header)
    with pytest.raises(error):
        framer.next_message()
    assert not terminated(framer) and framer.frames == 1


def test_terminate_before_a_bad_frame_is_consumed_and_noted() -> None:
    framer = Framer(ReceiveBuffer())
    framer.buffer.mark()
    framer.feed(m.encode_terminate() + b"Q" + struct.pack(">i", 2))
    with pytest.raises(RemoteProtocolError):
        framer.next_message()
    assert terminated(framer) and framer.buffer.consumed_since_mark() == m.encode_terminate()


def test_terminated_at_the_last_byte_of_a_captured_session() -> None:
    data = typed_stream("psql_simple", "fe")
    framer = Framer(ReceiveBuffer())
    for i in range(len(data)):
        framer.feed(data[i:i + 1])
        framer.next_message()
        assert terminated(framer) == (i == len(data) - 1)


# --------------------------------------------------------------------------
# Tap vs the inline audit stages.


def units(msgs: list, ends: bytes) -> list[bytes]:
    """Messages grouped into the runs one side sends before the other must answer."""
    out, cur = [], b""
    for x in msgs:
        cur += x.raw
        if x.type in ends:
            out.append(cur)
            cur = b""
    assert cur == b""
    return out


def captured_session(name: str, pipelined: bool) -> list[tuple[int, bytes]]:
    """The bytes a proxy forwards after its hello, in order: each client request then its answer,
    or (pipelined) all requests before all answers."""
    _, fe = decode_frontend(load(name, "fe"))
    _, _, be = decode_backend(load(name, "be"), ssl_answer=name == "psql_sslprefer")
    fe = [x for x in fe if x.type and x.type != m.FE.PASSWORD]  # start-up and authentication: not tapped
    first_ready = next(i for i, x in enumerate(be) if x.type == m.BE.READY_FOR_QUERY)
    requests = units(fe, b"QSXc")
    answers = units(be[first_ready + 1:], b"ZG")
    assert requests[-1] == m.encode_terminate() and len(requests) == len(answers) + 1
    if pipelined:
        return [(FE, b"".join(requests[:-1])), (BE, b"".join(answers)), (FE, requests[-1])]
    steps = []
    for req, ans in zip(requests, answers):
        steps += [(FE, req), (BE, ans)]
    return steps + [(FE, requests[-1])]


def parse(name: str, sql: str, types: tuple[int, ...] = ()) -> bytes:
    return pg("P", f"{name}\0{sql}\0".encode() + struct.pack(f">h{len(types)}i", len(types), *types))


def bind(portal: str, stmt: str, formats: tuple[int, ...], params: tuple[bytes | None, ...]) -> bytes:
    body = f"{portal}\0{stmt}\0".encode() + struct.pack(f">h{len(formats)}h", len(formats), *formats)
    body += struct.pack(">h", len(params))
    for p in params:
        body += struct.pack(">i", -1) if p is None else struct.pack(">i", len(p)) + p
    return pg("B", body + struct.pack(">h", 0))


def execute(portal: str, max_rows: int = 0) -> bytes:
    return pg("E", f"{portal}\0".encode() + struct.pack(">i", max_rows))


def close(kind: str, name: str) -> bytes:
    return pg("C", f"{kind}{name}\0".encode())


def row(*values: bytes) -> bytes:
    return pg("D", struct.pack(">h", len(values)) + b"".join(struct.pack(">i", len(v)) + v for v in values))


READY = m.encode_ready_for_query()
CONSTRUCTED = [
    # A named statement and portal, fetched one row at a time.
    (FE, parse("s1", "select * from t where a = $1 and b = $2 and c = $3", (23, 25, 16))
     + bind("p1", "s1", (1, 0, 1), (struct.pack(">i", 42), "hé".encode(), b"\x01"))
     + execute("p1", 1)),
    (FE, execute("p1") + close("P", "p1") + close("S", "s1") + m.encode_sync()),
    (BE, pg("1") + pg("2") + row(b"42") + pg("s") + row(b"43") + m.encode_command_complete("SELECT 1")
     + pg("3") + pg("3") + READY),
    # The closed statement is forgotten; an unknown portal fails.
    (FE, bind("p2", "s1", (), ()) + execute("p2") + execute("nope") + m.encode_sync()),
    (BE, m.encode_error("ERROR", "26000", 'prepared statement "s1" does not exist') + READY),
    (FE, m.encode_query("") + pg("F", struct.pack(">ihhh", 1598, 0, 0, 0))),
    (BE, m.encode_empty_query_response() + READY + pg("V", struct.pack(">i", -1)) + READY),
    (FE, m.encode_query("delete from t; select nope") + m.encode_terminate()),
    (BE, m.encode_command_complete("DELETE 3") + m.encode_error("ERROR", "42703", 'column "nope" does not exist')
     + READY),
]

SESSIONS = {
    "psql_simple": captured_session("psql_simple", False),
    "psql_simple/pipelined": captured_session("psql_simple", True),
    "psycopg_extended": captured_session("psycopg_extended", False),
    "psycopg_extended/pipelined": captured_session("psycopg_extended", True),
    "psycopg_copy": captured_session("psycopg_copy", False),
    "constructed": CONSTRUCTED,
}

# For each result (in order): its tag or SQLSTATE, and the SQL and parameters of the query it answers.
_SIMPLE = [("SELECT 1", "select 1 as one, 'x' as two, null as three"), ("CREATE TABLE", "create table t(a int, b text)"),
           ("INSERT 0 3", "insert into t values (1, 'a'), (2, 'b'), (3, 'c')"),
           ("UPDATE 2", "update t set b = 'z' where a >= 2"), ("DELETE 1", "delete from t where a = 1"),
           ("DO", "do $$ begin raise notice 'hello notice'; end $$"), ("22012", "select 1/0"),
           ("LISTEN", "listen chan; notify chan, 'payload-1'"), ("NOTIFY", "listen chan; notify chan, 'payload-1'"),
           ("", ""), ("BEGIN", "begin; select 1; "), ("SELECT 1", "begin; select 1; ")]
_INSERT = "insert into e values ($1, $2)"
_EXTENDED = [("CREATE TABLE", "create temp table e(a int, b text)", None),
             ("INSERT 0 1", _INSERT, ["1", "hé"]), ("INSERT 0 1", _INSERT, ["2", None]),
             ("SELECT 2", "select a, b from e where a > $1 order by a", ["0"]),
             ("INSERT 0 1", _INSERT, ["3", "x"]), ("INSERT 0 1", _INSERT, ["4", "y"]),
             ("22012", "select $1::int / 0", ["5"])]
_FIND = "select * from t where a = $1 and b = $2 and c = $3"
EXPECTED = {
    "psql_simple": ([(tag, sql, None) for tag, sql in _SIMPLE], 10, 1),
    "psycopg_extended": (_EXTENDED, 7, 1),
    "psycopg_copy": ([("CREATE TABLE", "create temp table c(a int, b text)", None),
                      ("COPY 10", "copy c from stdin", None), ("COPY 10", "copy c to stdout", None)], 3, 0),
    "constructed": ([("PORTAL SUSPENDED", _FIND, ["42", "hé", "true"]), ("SELECT 1", _FIND, ["42", "hé", "true"]),
                     ("26000", "", []), ("", "", None), ("DELETE 3", "delete from t; select nope", None),
                     ("42703", "delete from t; select nope", None)], 6, 2),
}


def new_session() -> Session:
    s = Session(listener="pg", protocol="postgres", client_addr="127.0.0.1:5432")
    s.identity = Identity(user="alice", roles=("dba",), method="scram-sha-256")
    s.db_name, s.db_user, s.backend_addr, s.route_name = "app", "app_rw", "127.0.0.1:5433", "main"
    s.started = True
    return s


def queued(recorder: AuditRecorder) -> list[dict]:
    return [orjson.loads(body) for body in recorder._queue]


def run_inline(steps: list[tuple[int, bytes]]) -> tuple[list[dict], PgSessionState, dict]:
    """The stages as the pipeline runs them when the session is not tapped."""
    recorder = AuditRecorder(sinks=[])
    audit = recorder.session(new_session())
    state = PgSessionState()
    decoders = (FrontendDecoder(startup=False), BackendDecoder())
    stages = (FrontendAudit(state, audit), BackendAudit(state, audit))
    for direction, data in steps:
        decoders[direction].feed(data)
        while (msg := decoders[direction].next_message()) is not NEED_DATA:
            assert stages[direction].handle(msg, None) is None
        assert len(decoders[direction].buffer) == 0
    audit._refresh_template()
    template = orjson.loads(orjson.dumps(audit._template))  # as ``tap_open`` sends it over the link
    return queued(recorder), state, template


def run_tap(steps: list[tuple[int, bytes]], template: dict, sizes: list[int], through_framer: bool):
    """The proxy's pumps (a Tee each, as ``dbproxy.flow.assemble`` builds them) tap the frames the audit
    stages read; the worker's Tap is fed those.  Without the Framers, the Tap gets every byte
    in the raw cuts (it must then step over the rest itself)."""
    recorder = AuditRecorder(sinks=[])
    tap = Tap(TemplateAudit(recorder, template))
    tapped: list[bytes] = []

    def sink(direction):
        return lambda data: (tapped.append(data), tap.feed(direction, data))

    framers = (Framer(ReceiveBuffer(), tap=sink(FE), side=FRONTEND_SIDE),
               Framer(ReceiveBuffer(), tap=sink(BE), side=BACKEND_SIDE))
    for direction, data in steps:
        for chunk in cut(data, sizes):
            if through_framer:
                framer = framers[direction]
                framer.feed(chunk)
                framer.buffer.mark()
                assert framer.next_message() is NEED_DATA
                framer.buffer.compact()
            else:
                tap.feed(direction, chunk)
    if through_framer:
        # Only the frames the stages act on crossed over: no DataRow, CopyData or password.
        for payload in tapped:
            assert type(payload) is bytes
            for frame_type in types_in(payload):
                assert frame_type in FrontendAudit.interest | BackendAudit.interest
                assert frame_type not in (ord("D"), ord("d"), ord("p"))
        if through_framer:
            assert len(framers[direction].buffer) == 0  # every step ends on a frame boundary
    assert terminated(framers[FE]) == through_framer
    return queued(recorder), tap


def types_in(payload: bytes) -> list[int]:
    out, pos = [], 0
    while pos < len(payload):
        out.append(payload[pos])
        pos += 1 + int.from_bytes(payload[pos + 1:pos + 5], "big")
    assert pos == len(payload)  # whole frames only
    return out


def normalized(events: list[dict]) -> list[dict]:
    """uid and time dropped; ``query_uid`` replaced by the index of the event it names."""
    index = {e["uid"]: i for i, e in enumerate(events)}
    out = []
    for e in events:
        e = {k: v for k, v in e.items() if k not in ("uid", "time")}
        if e.get("query_uid") is not None:
            e["query_uid"] = index[e["query_uid"]]  # KeyError: a link to no event of this session
        out.append(e)
    return out


def answered(events: list[dict]) -> list[tuple]:
    """Each result: (tag or SQLSTATE, SQL and parameters of the query event it links to)."""
    by_uid = {e["uid"]: e for e in events}
    out = []
    for e in events:
        if e["event"] != ev.RESULT:
            continue
        q = by_uid[e["query_uid"]]
        assert q["event"] in (ev.QUERY, ev.PG_EXECUTE)
        out.append((e["command_tag"] if e["success"] else e["sqlstate"], q["db_query"], q.get("db_query_parameters")))
    return out


INLINE = {name: run_inline(steps) for name, steps in SESSIONS.items()}


@pytest.mark.parametrize("name", sorted(SESSIONS))
@pytest.mark.parametrize("through_framer", [True, False])
@pytest.mark.parametrize("step", [None, 1, 13])
def test_tap_writes_the_inline_trail(name: str, through_framer: bool, step: int | None) -> None:
    inline, state, template = INLINE[name]
    tapped, tap = run_tap(SESSIONS[name], template, [step] if step else [], through_framer)
    assert normalized(tapped) == normalized(inline)
    assert tap.counts() == {"queries": state.queries, "errors": state.errors}
    # Not two empty trails: the results answer the queries they should.
    results, queries, errors = EXPECTED[name.split("/")[0]]
    assert answered(tapped) == answered(inline) == results
    assert tap.counts() == {"queries": queries, "errors": errors}
    assert all(e["sid"] == template["sid"] and e["user"] == "alice" for e in tapped)


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(sorted(SESSIONS)), sizes=st.lists(st.integers(1, 200), min_size=1, max_size=10),
       through_framer=st.booleans())
def test_tap_writes_the_inline_trail_random_cuts(name: str, sizes: list[int], through_framer: bool) -> None:
    inline, state, template = INLINE[name]
    tapped, tap = run_tap(SESSIONS[name], template, sizes, through_framer)
    assert normalized(tapped) == normalized(inline)
    assert tap.counts() == {"queries": state.queries, "errors": state.errors}


def test_extended_trail_content() -> None:
    """The tapped trail of psycopg's extended session, event by event."""
    inline, _, template = INLINE["psycopg_extended"]
    tapped, _ = run_tap(SESSIONS["psycopg_extended"], template, [], True)
    kinds = [e["event"].rsplit(".", 1)[-1] for e in tapped]
    assert kinds == (["query", "result"] + ["parse", "bind", "execute", "result"] + ["parse"]
                     + ["bind", "execute", "result"] + ["parse", "bind", "execute", "result"]
                     + ["bind", "execute", "bind", "execute", "result", "result"]
                     + ["parse", "bind", "execute", "result"])
    first_parse = tapped[2]
    assert (first_parse["db_query"], first_parse["param_types"]) == (_INSERT, [21, 0])
    named = tapped[6]
    assert (named["statement_name"], named["db_query"]) == ("_pg3_0", _INSERT)
    error = tapped[-1]
    assert (error["success"], error["sqlstate"], error["error"]) == (False, "22012", "division by zero")
    assert all(e["code"] == ev.CODES[e["event"]] for e in tapped)


def test_framer_taps_the_audited_frames_before_a_refused_one() -> None:
    """The frames before a bad one are forwarded, so their audited ones are tapped first;
    frames the stages never read (DataRow here) are not tapped at all."""
    got: list[bytes] = []
    framer = Framer(ReceiveBuffer(), tap=got.append, side=BACKEND_SIDE)
    complete = pg(b"C", b"SELECT 1\0")
    framer.feed(pg(b"D", b"\0\x01\0\0\0\x011") + complete + pg(b"D", b"\0\0") + pg(b"Z", b"I") + b"E\0\0\0\x02")
    with pytest.raises(RemoteProtocolError):
        framer.next_message()
    assert got == [complete + pg(b"Z", b"I")]  # one tap: the frames that matter, joined, in order
    assert framer.frames == 4 and len(framer.buffer) == 5
