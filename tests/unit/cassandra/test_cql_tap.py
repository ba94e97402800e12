"""The Cassandra tap (``engines.cassandra.tap``): a tapped session's trail is the inline one.

Real Cassandra 5.0.9 conversations (tests/data/cassandra/real_*: v4 LZ4, v4
Snappy, v5 plain and v5 LZ4 segments, a 200 KiB INSERT and SELECT split over
segments, PREPARE, a syntax error, USE, a paged SELECT) and one built with
the codec's encoders (EXECUTE of a prepared id, BATCH, REGISTER and an EVENT,
OPTIONS, a large Rows result, STARTUP and AUTH_RESPONSE in the middle of a
batch) are replayed after their handshake, request then answer:

- inline: each direction's ``CqlDecoder``, then the stages the core runs
  inline (``SessionGuard``, ``RequestAudit`` / ``ResponseAudit``);
- tapped: each direction's ``CqlTee`` over the same decoder, in pump order
  (mark, ``next_message`` until NEED_DATA, the forwarded span), the guard on
  what the tee hands out, and the worker's ``CqlTap`` fed exactly the bytes
  the tees tapped.

Both write to one recorder each (the proxy's events and the worker's in one
queue, in the order a link would carry them); the trails must be equal
event for event (uid and time aside), the counts equal, the forwarded bytes
the received ones (or, around a refused frame, the inline rebuilt batch),
and what crossed to the worker only whole frames, never rows.
"""

from __future__ import annotations

import struct

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dbproxy.audit import events as ev
from dbproxy.audit.recorder import AuditRecorder, TemplateAudit
from dbproxy.errors import MalformedMessage
from dbproxy.pipeline import audit_malformed
from dbproxy.sansio import NEED_DATA
from dbproxy.session import Identity, Session
from dbproxy.engines.cassandra import protocol as F
from dbproxy.engines.cassandra import segments as S
from dbproxy.engines.cassandra.codec import CqlDecoder
from dbproxy.engines.cassandra.observers import CqlSessionState, RequestAudit, ResponseAudit
from dbproxy.engines.cassandra.prepared import PreparedCache
from dbproxy.engines.cassandra.stages import SessionGuard
from dbproxy.engines.cassandra import tap as T
from tests.unit.cassandra.cql_testutil import vector
from tests.unit.cassandra.test_cql_stages import _string, _value, execute_body, prepared_result

CONVERSATIONS = [("real_v4_lz4", 4, "lz4"), ("real_v4_snappy", 4, "snappy"), ("real_v5_plain", 5, None), ("real_v5_lz4", 5, "lz4")]
CLIENT, BACKEND = 0, 1


# --------------------------------------------------------------------------- conversations


def _decoder(direction: int, version: int, compression: str | None) -> CqlDecoder:
    """A decoder in the framing the session has once its handshake is over."""
    d = CqlDecoder("client" if direction == CLIENT else "server")
    d.set_framing("segments" if version >= 5 else "frames", compression)
    return d


def wire_units(data: bytes, direction: int, version: int, compression: str | None) -> list[bytes]:
    """One side of a captured connection after its handshake, cut into wire units: the bytes
    of each frame (or of the segments carrying a group of frames), in order."""
    d = CqlDecoder("client" if direction == CLIENT else "server")
    if direction == BACKEND and version < 5:
        d.set_framing("frames", compression)
    d.feed(data)
    switch_after = F.Opcode.STARTUP if direction == CLIENT else F.Opcode.AUTHENTICATE
    last_login = F.Opcode.AUTH_RESPONSE if direction == CLIENT else F.Opcode.AUTH_SUCCESS
    units: list[bytes] = []
    start = None
    while (msg := d.next_message()) is not NEED_DATA:
        if msg.opcode == switch_after:
            d.set_framing("segments" if version >= 5 else "frames", compression)
        if start is None:
            if msg.opcode == last_login:
                start = d.buffer.position
            continue
        if not d._queue:  # every frame of what was consumed is out: a unit boundary
            units.append(data[start:d.buffer.position])
            start = d.buffer.position
    assert start == len(data)
    return units


def real_steps(name: str, version: int, compression: str | None) -> list[tuple[int, bytes]]:
    requests = wire_units(vector(f"{name}.client.bin"), CLIENT, version, compression)
    answers = wire_units(vector(f"{name}.server.bin"), BACKEND, version, compression)
    assert len(requests) == len(answers) > 5  # one answer per request, in order (a sequential client)
    steps: list[tuple[int, bytes]] = []
    for request, answer in zip(requests, answers):
        steps += [(CLIENT, request), (BACKEND, answer)]
    return steps


def _req(version: int, stream: int, opcode: int, body: bytes, compression: str | None) -> bytes:
    return F.encode_frame(version, 0, stream, opcode, body, response=False, compressor=compression if version < 5 else None)


def _res(version: int, stream: int, opcode: int, body: bytes, compression: str | None, flags: int = 0) -> bytes:
    return F.encode_frame(version, flags, stream, opcode, body, response=True, compressor=compression if version < 5 else None)


def _rows(rows: int, width: int) -> bytes:
    """A Rows result of ``rows`` rows of one blob column, ``width`` bytes each (paging state set)."""
    body = struct.pack(">iii", F.ResultKind.ROWS, F.RF_GLOBAL_TABLES_SPEC | F.RF_HAS_MORE_PAGES, 1)
    body += struct.pack(">i", 4) + b"page" + _string("ks") + _string("t") + _string("v") + struct.pack(">H", 0x0003)
    return body + struct.pack(">i", rows) + b"".join(_value(bytes([i % 251]) * width) for i in range(rows))


def _prepare_body(version: int, cql: str) -> bytes:
    """PREPARE (native protocol v4/v5 §4.1.5): <query>[long string], v5 <flags>[int]."""
    body = F.pack_long_string(cql)
    return body + struct.pack(">I", 0) if version >= 5 else body


def built_steps(version: int, compression: str | None) -> list[tuple[int, bytes]]:
    """What the captures lack: EXECUTE, BATCH, REGISTER/EVENT, OPTIONS, a large Rows result, a
    warning, a USE, and STARTUP / AUTH_RESPONSE inside a batch of requests."""
    q, r = (lambda *a: _req(version, *a, compression)), (lambda *a, **k: _res(version, *a, compression, **k))
    qid = b"\x11" * 16
    select = F.query_body(version, "SELECT v FROM ks.t")
    use = F.query_body(version, 'USE "ks"')
    batch = bytes([1]) + struct.pack(">H", 2) + bytes([0]) + struct.pack(">i", 9) + b"UPDATE x1" + struct.pack(">H", 0)
    batch += bytes([1]) + struct.pack(">H", 16) + qid + struct.pack(">H", 1) + _value(b"\x00\x00\x00\x07")
    batch += struct.pack(">H", F.Consistency.QUORUM) + (struct.pack(">I", 0) if version >= 5 else b"\x00")
    warn = struct.pack(">H", 1) + _string("a warning") + struct.pack(">i", F.ResultKind.VOID)
    event = _string("SCHEMA_CHANGE") + _string("CREATED") + _string("KEYSPACE") + _string("ks")
    steps = [
        (CLIENT, q(1, F.Opcode.PREPARE, _prepare_body(version, "INSERT INTO ks.t (k) VALUES (?)"))),
        (BACKEND, r(1, F.Opcode.RESULT, prepared_result(version, qid, [("k", 0x0009)]))),
        (CLIENT, q(2, F.Opcode.EXECUTE, execute_body(version, qid, [b"\x00\x00\x00\x07"]))),
        (BACKEND, r(2, F.Opcode.RESULT, struct.pack(">i", F.ResultKind.VOID), flags=0)),
        (CLIENT, q(3, F.Opcode.REGISTER, F.pack_string_list(["SCHEMA_CHANGE"])) + q(4, F.Opcode.BATCH, batch)),
        (BACKEND, r(3, F.Opcode.READY, b"") + r(4, F.Opcode.RESULT, warn, flags=F.FLAG_WARNING)),
        (BACKEND, r(-1, F.Opcode.EVENT, event)),
        (CLIENT, q(5, F.Opcode.QUERY, use)),
        (BACKEND, r(5, F.Opcode.RESULT, struct.pack(">i", F.ResultKind.SET_KEYSPACE) + _string("ks"))),
        # A batch with a STARTUP and an AUTH_RESPONSE among requests: refused by the guard,
        # the rest forwarded (a rebuilt batch), the session goes on.
        (CLIENT, q(6, F.Opcode.QUERY, select) + q(7, F.Opcode.STARTUP, F.startup_body({"CQL_VERSION": "3.0.0"}))
         + q(8, F.Opcode.OPTIONS, b"") + q(9, F.Opcode.AUTH_RESPONSE, F.auth_token_body(b"\x00u\x00secret"))
         + q(10, F.Opcode.QUERY, select)),
        (BACKEND, r(6, F.Opcode.RESULT, _rows(300, 100)) + r(8, F.Opcode.SUPPORTED, F.supported_body({"A": ["b"]}))
         + r(10, F.Opcode.ERROR, F.error_body(F.ErrorCode.UNAVAILABLE, "not enough replicas", struct.pack(">Hii", 1, 1, 0)))),
        (CLIENT, q(11, F.Opcode.QUERY, select)),
        (BACKEND, r(11, F.Opcode.RESULT, _rows(2, 8))),
    ]
    if version >= 5:
        return [(d, S.encode_segments(data, compress=compression == "lz4")) for d, data in steps]
    return steps


SESSIONS: dict[str, tuple[int, str | None, list]] = {
    **{name: (v, c, real_steps(name, v, c)) for name, v, c in CONVERSATIONS},
    **{f"built_v{v}_{c or 'none'}": (v, c, built_steps(v, c)) for v, c in [(4, None), (4, "lz4"), (4, "snappy"), (5, None), (5, "lz4")]},
}


# --------------------------------------------------------------------------- the two modes


def new_session() -> Session:
    s = Session(listener="cql", protocol="cassandra", client_addr="127.0.0.1:40000")
    s.identity = Identity(user="alice", roles=("dev",), method="token")
    s.db_user, s.backend_addr, s.route_name = "cassandra", "127.0.0.1:9042", "main"
    s.started = True
    return s


def queued(recorder: AuditRecorder) -> list[dict]:
    return [orjson.loads(body) for body in recorder._queue]


def cut(data: bytes, sizes: list[int]) -> list[bytes]:
    if not sizes:
        return [data]
    out, pos, i = [], 0, 0
    while pos < len(data):
        out.append(data[pos:pos + sizes[i % len(sizes)]])
        pos += sizes[i % len(sizes)]
        i += 1
    return out


def pump(decoder, stages, chunk: bytes, session: Session, direction: str) -> bytes:
    """One pump batch as ``dbproxy.pipeline`` runs it; returns what it forwards (the wire span,
    or a rebuilt batch through the encoder toward the other side)."""
    decoder.feed(chunk)
    buf = decoder.buffer
    buf.mark()
    forwarded, changed = [], False
    while True:
        msg = decoder.next_message()
        if msg is NEED_DATA:
            break
        verdict = None
        for stage in stages:
            try:
                verdict = stage.handle(msg, None)
            except MalformedMessage as exc:
                audit_malformed(session, direction, msg, exc)
                raise
            if verdict is not None:
                break
        if verdict is None:
            forwarded.append(msg.raw)
        else:
            changed = True
            forwarded.extend(verdict.replace if verdict.replace is not None else [msg.raw])
    if changed:
        out = b"".join(forwarded)
        out = S.encode_segments(out, compress=decoder.decoder.compression == "lz4" if hasattr(decoder, "decoder")
                                else decoder.compression == "lz4") if _framing(decoder) == "segments" else out
    else:
        out = buf.consumed_since_mark()
    buf.compact()
    return out


def _framing(decoder) -> str:
    return getattr(decoder, "decoder", decoder).framing


def run_inline(version: int, compression: str | None, steps: list, sizes: list[int] = ()):
    recorder = AuditRecorder(sinks=[])
    session = new_session()
    audit = session.audit = recorder.session(session)
    audit._refresh_template()
    template = orjson.loads(orjson.dumps(audit._template))  # as ``tap_open`` sends it over the link
    state = CqlSessionState(backend=session.backend_addr, prepared=PreparedCache(), session=session, version=version)
    decoders = (_decoder(CLIENT, version, compression), _decoder(BACKEND, version, compression))
    stages = ([SessionGuard(audit, compressor=compression if version < 5 else None), RequestAudit(state, audit)],
              [ResponseAudit(state, audit)])
    forwarded: list[list[bytes]] = [[], []]
    for direction, data in steps:
        for chunk in cut(data, list(sizes)):
            forwarded[direction].append(pump(decoders[direction], stages[direction], chunk, session,
                                             ("client", "backend")[direction]))
    counts = {"requests": state.requests, "errors": state.errors, "events": state.events}
    return queued(recorder), counts, template, forwarded, session


def run_tapped(version: int, compression: str | None, steps: list, template: dict, sizes: list[int] = ()):
    recorder = AuditRecorder(sinks=[])
    session = new_session()
    session.id = template["sid"]  # the same session, audited the other way
    audit = session.audit = recorder.session(session)
    state = CqlSessionState(backend=session.backend_addr, prepared=PreparedCache(), session=session, version=version)
    plan = T.CqlTee.plan(state, compression if version < 5 else None)
    worker_tap = plan.tap(TemplateAudit(recorder, template), **plan.params)
    tapped: list[tuple[int, bytes]] = []

    def to_worker(direction: int):
        return lambda data: (tapped.append((direction, data)), worker_tap.feed(direction, data))

    tees = (plan.tee.over(_decoder(CLIENT, version, compression), plan.client, to_worker(CLIENT)),
            plan.tee.over(_decoder(BACKEND, version, compression), plan.backend, to_worker(BACKEND)))
    stages = ([SessionGuard(audit, compressor=compression if version < 5 else None)], [])
    forwarded: list[list[bytes]] = [[], []]
    for direction, data in steps:
        for chunk in cut(data, list(sizes)):
            forwarded[direction].append(pump(tees[direction], stages[direction], chunk, session,
                                             ("client", "backend")[direction]))
    return queued(recorder), worker_tap, tapped, forwarded, session, state


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


def frames_in(payload: bytes) -> list[tuple[int, int]]:
    """(opcode, length) of every frame of a tapped payload; whole frames only."""
    out, pos = [], 0
    while pos < len(payload):
        length = struct.unpack_from(">I", payload, pos + 5)[0]
        out.append((payload[pos + 4], length))
        pos += 9 + length
    assert pos == len(payload)
    return out


INLINE = {name: run_inline(v, c, steps) for name, (v, c, steps) in SESSIONS.items()}


@pytest.mark.parametrize("name", sorted(SESSIONS))
@pytest.mark.parametrize("step", [None, 1, 7, 4096])
def test_tap_writes_the_inline_trail(name: str, step: int | None) -> None:
    version, compression, steps = SESSIONS[name]
    inline, counts, template, inline_forwarded, inline_session = INLINE[name]
    sizes = [step] if step else []
    tapped_events, tap, tapped, forwarded, session, state = run_tapped(version, compression, steps, template, sizes)
    assert normalized(tapped_events) == normalized(inline)
    assert tap.counts() == counts
    assert b"".join(forwarded[CLIENT]) == b"".join(inline_run_forwarded(name, sizes)[CLIENT])
    assert b"".join(forwarded[BACKEND]) == b"".join(d for direction, d in steps if direction == BACKEND)
    assert session.db_name == inline_session.db_name and state.pending == {}
    # Not two empty trails: every request has its event, every answered one its result.
    kinds = [e["event"] for e in inline]
    assert kinds.count(ev.RESULT) >= 5 and counts["requests"] >= 5
    # Only whole frames crossed, the audited requests and the answers; no password, no rows.
    for direction, payload in tapped:
        for opcode, length in frames_in(payload):
            if direction == CLIENT:
                assert opcode in RequestAudit.interest
            assert length <= T.ROWS_CUT or opcode != F.Opcode.RESULT or compression in ("lz4", "snappy") and version < 5
    assert not any(b"secret" in payload for _, payload in tapped)


_FORWARDED: dict = {}


def inline_run_forwarded(name: str, sizes: list[int]) -> list[list[bytes]]:
    key = (name, tuple(sizes))
    if key not in _FORWARDED:
        version, compression, steps = SESSIONS[name]
        _FORWARDED[key] = run_inline(version, compression, steps, sizes)[3]
    return _FORWARDED[key]


def test_built_session_trail_content() -> None:
    """What the built session's tapped trail says (not just that it equals the inline one)."""
    version, compression, steps = SESSIONS["built_v5_lz4"]
    _, counts, template, _, _ = INLINE["built_v5_lz4"]
    events, tap, tapped, forwarded, session, state = run_tapped(version, compression, steps, template)
    # The proxy learnt the prepared id too (the statement policy of other sessions reads it).
    info = state.prepared.get(session.backend_addr, b"\x11" * 16)
    assert info is not None and (info.query, info.types, info.names) == ("INSERT INTO ks.t (k) VALUES (?)", (9,), ("k",))
    by_uid = {e["uid"]: e for e in events}
    execute = next(e for e in events if e["event"] == "db.session.cassandra.execute")
    assert execute["db_query"] == "INSERT INTO ks.t (k) VALUES (?)" and execute["db_query_parameters"] == ["7"]
    batch = next(e for e in events if e["event"] == "db.session.cassandra.batch")
    assert batch["batch_type"] == "UNLOGGED" and batch["children"][1]["prepared_known"]
    refused = [e["db_query"] for e in events if e["event"] == ev.QUERY and e.get("success") is False]
    assert refused == ["<STARTUP after the handshake: refused>", "<AUTH_RESPONSE after the handshake: refused>"]
    results = [e for e in events if e["event"] == ev.RESULT]
    rows = [e for e in results if e.get("result_kind") == "rows"]
    assert [(e["affected_records"], e["has_more_pages"]) for e in rows] == [(300, True), (2, True)]
    assert by_uid[results[-2]["query_uid"]]["cql_stream"] == 10 and results[-2]["error_name"] == "UNAVAILABLE"
    assert [e["db_name"] for e in events if e["event"] == ev.QUERY and e.get("cql_stream") == 6] == ["ks"]
    assert next(e for e in results if e.get("warnings"))["warnings"] == ["a warning"]
    assert counts == tap.counts() == {"requests": 8, "errors": 1, "events": 1}
    assert session.db_name == "ks"
    # The refused frames never left: the forwarded batch is the three other requests, re-framed.
    client = CqlDecoder("client")
    client.set_framing("segments", compression)
    client.feed(b"".join(forwarded[CLIENT]))
    opcodes = []
    while (msg := client.next_message()) is not NEED_DATA:
        opcodes.append((msg.stream, msg.opcode))
    assert [s for s, op in opcodes] == [1, 2, 3, 4, 5, 6, 8, 10, 11]
    # The 300-row page crossed cut after its row count.
    sizes = [length for d, p in tapped if d == BACKEND for op, length in frames_in(p) if op == F.Opcode.RESULT]
    assert max(sizes) < 100 and T.ROWS_CUT < 300 * 104


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(sorted(SESSIONS)), sizes=st.lists(st.integers(1, 300), min_size=1, max_size=8))
def test_tap_writes_the_inline_trail_random_cuts(name: str, sizes: list[int]) -> None:
    version, compression, steps = SESSIONS[name]
    inline, counts, template, _, _ = INLINE[name]
    tapped_events, tap, _, forwarded, _, _ = run_tapped(version, compression, steps, template, sizes)
    assert normalized(tapped_events) == normalized(inline)
    assert tap.counts() == counts
    assert b"".join(forwarded[BACKEND]) == b"".join(d for direction, d in steps if direction == BACKEND)


# --------------------------------------------------------------------------- malformed requests

from tests.unit.cassandra.test_cql_stages import MALFORMED_REQUESTS  # noqa: E402


@pytest.mark.parametrize("version,compression", [(4, None), (4, "lz4"), (5, None), (5, "lz4")])
@pytest.mark.parametrize("case", sorted(MALFORMED_REQUESTS))
def test_malformed_request_refused_before_forwarding(case: str, version: int, compression: str | None) -> None:
    """A request the audit cannot parse, after a good one in the same batch: the tee forwards the
    good one only, the guard raises the refusal, the trail is the inline one."""
    opcode, body = MALFORMED_REQUESTS[case]
    good = _req(version, 3, F.Opcode.QUERY, F.query_body(version, "SELECT 1"), compression)
    bad = _req(version, 4, opcode, body(version), compression)
    data = good + bad + good
    if version >= 5:
        data = S.encode_segments(data, compress=compression == "lz4")
    results = []
    for run in ("inline", "tapped"):
        recorder = AuditRecorder(sinks=[])
        session = new_session()
        session.id = "0" * 32
        audit = session.audit = recorder.session(session)
        audit._refresh_template()
        state = CqlSessionState(backend=session.backend_addr, prepared=PreparedCache(), session=session, version=version)
        guard = SessionGuard(audit, compressor=compression if version < 5 else None)
        decoder = _decoder(CLIENT, version, compression)
        tapped: list[bytes] = []
        if run == "inline":
            stages = [guard, RequestAudit(state, audit)]
        else:
            plan = T.CqlTee.plan(state, compression if version < 5 else None)
            worker = plan.tap(TemplateAudit(recorder, orjson.loads(orjson.dumps(audit._template))), **plan.params)
            decoder = plan.tee.over(decoder, plan.client, lambda data: (tapped.append(data), worker.feed(CLIENT, data)))
            stages = [guard]
        decoder.feed(data)
        decoder.buffer.mark()
        forwarded = []
        with pytest.raises(MalformedMessage) as info:
            while (msg := decoder.next_message()) is not NEED_DATA:
                for stage in stages:
                    try:
                        stage.handle(msg, None)
                    except MalformedMessage as exc:
                        audit_malformed(session, "client", msg, exc)
                        raise
                forwarded.append(msg.raw)
        assert (info.value.stream, info.value.version) == (4, version)
        results.append((normalized(queued(recorder)), forwarded, list(state.pending), tapped))
    (inline, inline_fwd, inline_pending, _), (tapped_events, fwd, pending, tapped) = results
    assert tapped_events == inline
    assert [e["event"] for e in inline] == [ev.QUERY, ev.MALFORMED]
    assert inline[1]["message_type"] == F.Opcode(opcode).name and inline[1]["direction"] == "client"
    assert fwd == inline_fwd == [good] and pending == inline_pending == [3]
    assert tapped == [good]  # the refused frame never reached the worker either


# --------------------------------------------------------------------------- the engine's wiring


class _TapAudit:
    """A session audit that can tap (as with the audit worker): notes what is opened."""

    can_tap = True

    def __init__(self) -> None:
        self.opened: list = []

    def tap_open(self, tap, params=None) -> int:
        self.opened.append((tap, params))
        return 7

    def tap(self, slot: int, direction: int, data: bytes) -> None:
        pass

    def tap_close(self, slot: int) -> None:
        pass


@pytest.mark.parametrize("policed", [False, True])
def test_the_core_taps_a_session_without_a_policy_and_keeps_a_policed_one_inline(policed: bool) -> None:
    from dbproxy.channel import MessageStream
    from dbproxy.flow import Backend, Request, assemble
    from dbproxy.roles import Grant
    from dbproxy.engines.cassandra.clientwire import ClientWire, Hello
    from tests.unit.cassandra.test_cql_stages import _engine

    session = new_session()
    session.audit = _TapAudit()
    client = MessageStream(None, _decoder(CLIENT, 4, "lz4"))
    hello = Hello(ClientWire(client), version=4, compression="lz4")
    hello.wire.compression = "lz4"
    request = Request(client, extra=hello)
    backend = Backend(None, _decoder(BACKEND, 4, "lz4"), lambda data: data)
    grant = Grant(roles=("ro",), read_only=True, restricted=True) if policed else None
    wiring = _engine().wiring(session, request, backend, grant)
    plumbing = assemble(wiring, session.audit)
    kinds = [type(s).__name__ for s in plumbing.client_stages]
    if policed:
        assert not wiring.tapped and not session.audit.opened
        assert kinds == ["SessionGuard", "RequestAudit", "CqlPolicy"]
        assert [type(s).__name__ for s in plumbing.backend_stages] == ["ResponseAudit"]
    else:
        assert wiring.tapped and session.audit.opened == [(T.CqlTap, {"compression": "lz4"})]
        assert kinds == ["SessionGuard"] and plumbing.backend_stages == []
        assert all(isinstance(d, T.CqlTee) for d in (plumbing.client_decoder, plumbing.backend_decoder))
        assert plumbing.client_decoder.buffer is client.decoder.buffer  # bytes held already are teed first
