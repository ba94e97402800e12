"""The worker's fast path for EXECUTE / RESULT (``engines.cassandra.tapfast``) writes the observers' trail.

Two ``CqlTap``s are fed the same frames — one as the worker runs it (``fast``
set), one with the fast path off (every frame through ``RequestAudit`` /
``ResponseAudit``) — and their events must be equal, event for event (uid
and time aside, ``query_uid`` as the index of the event it names).  The
frames are generated: EXECUTEs with every <query_parameters> flag, [value]
lengths including null, unset and invalid ones, a known and an unknown
prepared id, bodies cut short or with bytes after them, body-prefix flags;
RESULTs Void, Rows with and without metadata (simple, custom and collection
column types, paging state, a new metadata id), cut short, with warnings,
and other kinds; in v4 and v5.  A test also checks that plain frames do take
the fast path, so the comparison is not one of the slow path with itself.
"""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from dbproxy.engines.cassandra import protocol as F
from dbproxy.engines.cassandra import tap as T
from tests.unit.audit.fastpath import same_trail as compare, trail
from tests.unit.cassandra.test_cql_stages import prepared_result

TEMPLATE = {"sid": "s-1", "user": "alice", "db_protocol": "cassandra", "db_name": "ks", "db_uri": "127.0.0.1:9"}
QID = bytes.fromhex("00112233445566778899aabbccddeeff")
UNKNOWN_QID = b"\xee" * 16
CLIENT, BACKEND = 0, 1


def _short_bytes(b: bytes) -> bytes:
    return struct.pack(">H", len(b)) + b


def _string(s: str) -> bytes:
    return _short_bytes(s.encode())


def frame(version: int, stream: int, opcode: int, body: bytes, *, response: bool, flags: int = 0) -> bytes:
    return struct.pack(">BBhBI", version | (0x80 if response else 0), flags, stream, opcode, len(body)) + body


def prepare_pair(version: int, cql: str, types: list[int]) -> list[tuple[int, bytes]]:
    """A PREPARE and its RESULT Prepared (bind markers of ``types``): teaches the tap QID."""
    prepare = struct.pack(">i", len(cql)) + cql.encode() + (struct.pack(">I", 0) if version >= 5 else b"")
    result = prepared_result(version, QID, [(f"c{i}", type_id) for i, type_id in enumerate(types)])
    return [(CLIENT, frame(version, 1, F.Opcode.PREPARE, prepare, response=False)),
            (BACKEND, frame(version, 1, F.Opcode.RESULT, result, response=True))]


def run(steps: list[tuple[int, bytes]], *, fast: bool) -> tuple[list[dict], dict, int]:
    return trail(T.CqlTap, TEMPLATE, steps, fast=fast)


def same_trail(steps: list[tuple[int, bytes]]) -> int:
    """Both taps' trails, compared with their key order; returns the fast path's hits."""
    return compare(T.CqlTap, TEMPLATE, steps)


# --------------------------------------------------------------------------- generated frames


def plain_execute(version: int) -> bytes:
    """EXECUTE of QID with one int value, a page size and a timestamp (what drivers send)."""
    flags = F.QF_VALUES | F.QF_PAGE_SIZE | F.QF_TIMESTAMP | F.QF_SKIP_METADATA
    params = struct.pack(">H", 10) + (struct.pack(">I", flags) if version >= 5 else bytes([flags]))
    params += struct.pack(">Hi", 1, 4) + struct.pack(">i", 42) + struct.pack(">iq", 5000, 1_700_000_000_000_000)
    return _short_bytes(QID) + (_short_bytes(b"m" * 8) if version >= 5 else b"") + params


TYPES = st.lists(st.sampled_from([0x0009, 0x0002, 0x000D, 0x0003, 0x000C, 0x0011, 0x0004, 0x0020, 0x0000]), max_size=4)
VALUE = st.one_of(
    st.binary(max_size=20).map(lambda b: struct.pack(">i", len(b)) + b),
    st.sampled_from([-1, -2, -3, -100]).map(lambda n: struct.pack(">i", n)),
    st.binary(max_size=4).map(lambda b: struct.pack(">i", len(b) + 3) + b),  # runs past the body
)


@st.composite
def executes(draw, version: int) -> bytes:
    qid = draw(st.sampled_from([QID, UNKNOWN_QID, b""]))
    body = _short_bytes(qid)
    if version >= 5:
        body += _short_bytes(draw(st.binary(max_size=8)))
    flags = draw(st.integers(0, 0x1FF))
    body += struct.pack(">H", draw(st.sampled_from([1, 4, 6, 10, 0x99])))
    body += struct.pack(">I", flags) if version >= 5 else bytes([flags & 0xFF])
    if flags & F.QF_VALUES:
        values = draw(st.lists(VALUE, max_size=4))
        body += struct.pack(">H", len(values) + draw(st.sampled_from([0, 0, 0, 1])))
        for v in values:
            if flags & F.QF_NAMES_FOR_VALUES:
                body += _string(draw(st.sampled_from(["c0", "c1", "x"])))
            body += v
    if flags & F.QF_PAGE_SIZE:
        body += struct.pack(">i", draw(st.sampled_from([5000, -1, 0])))
    if flags & F.QF_PAGING_STATE:
        state = draw(st.one_of(st.none(), st.binary(max_size=6)))
        body += struct.pack(">i", -1) if state is None else struct.pack(">i", len(state)) + state
    if flags & F.QF_SERIAL_CONSISTENCY:
        body += struct.pack(">H", draw(st.sampled_from([8, 9, 0x77])))
    if flags & F.QF_TIMESTAMP:
        body += struct.pack(">q", 1_700_000_000_000_000)
    if version >= 5 and flags & F.QF_KEYSPACE:
        body += _string("other")
    if version >= 5 and flags & F.QF_NOW_IN_SECONDS:
        body += struct.pack(">i", 1_700_000_000)
    cut = draw(st.sampled_from([None, None, None, 1, 3, 7]))
    if cut is not None:
        body = body[:max(0, len(body) - cut)]
    return body + draw(st.sampled_from([b"", b"", b"\x00\x01"]))


def _column_type(type_id: int) -> bytes:
    if type_id == 0x0000:
        return struct.pack(">H", 0) + _string("org.apache.cassandra.db.marshal.BytesType")
    if type_id == 0x0020:
        return struct.pack(">HH", 0x0020, 0x0009)  # list<int>
    return struct.pack(">H", type_id)


@st.composite
def results(draw, version: int) -> tuple[int, bytes]:
    """(header flags, body) of a RESULT."""
    kind = draw(st.sampled_from([F.ResultKind.VOID, F.ResultKind.ROWS, F.ResultKind.ROWS, F.ResultKind.SET_KEYSPACE, 9]))
    body = struct.pack(">i", kind)
    if kind == F.ResultKind.ROWS:
        flags = draw(st.integers(0, 0xF))
        columns = draw(st.lists(st.sampled_from([0x0009, 0x000D, 0x0000, 0x0020, 0x0002]), max_size=3))
        count = len(columns) if draw(st.booleans()) else draw(st.sampled_from([-1, 0, 7]))
        body += struct.pack(">ii", flags, count)
        if flags & F.RF_HAS_MORE_PAGES:
            state = draw(st.binary(max_size=6))
            body += struct.pack(">i", len(state)) + state
        if flags & F.RF_METADATA_CHANGED and version >= 5:
            body += _short_bytes(b"n" * 4)
        if not flags & F.RF_NO_METADATA:
            if flags & F.RF_GLOBAL_TABLES_SPEC:
                body += _string("ks") + _short_bytes(draw(st.sampled_from([b"t", b"\xff"])))  # \xff: not UTF-8
            for i, type_id in enumerate(columns):
                if not flags & F.RF_GLOBAL_TABLES_SPEC:
                    body += _string("ks") + _string("t")
                body += _string(f"c{i}") + _column_type(type_id)
        body += struct.pack(">i", draw(st.integers(0, 3)))
    elif kind == F.ResultKind.SET_KEYSPACE:
        body += _string("ks2")
    cut = draw(st.sampled_from([None, None, None, 1, 5]))
    if cut is not None:
        body = body[:max(0, len(body) - cut)]
    header_flags = 0
    if draw(st.integers(0, 9)) == 0:
        header_flags = F.FLAG_WARNING
        body = struct.pack(">H", 1) + _string("careful") + body
    return header_flags, body


@st.composite
def sessions(draw) -> list[tuple[int, bytes]]:
    version = draw(st.sampled_from([4, 5]))
    steps = prepare_pair(version, "SELECT * FROM ks.t WHERE a = ? AND b = ?", draw(TYPES))
    for n in range(draw(st.integers(1, 6))):
        stream = draw(st.sampled_from([2, 3, 2]))
        request_flags = draw(st.sampled_from([0, 0, 0, F.FLAG_TRACING, F.FLAG_CUSTOM_PAYLOAD]))
        # Half of them plain (known id, one value): their answers are then audited.
        body = draw(st.one_of(executes(version), st.just(plain_execute(version))))
        if request_flags & F.FLAG_CUSTOM_PAYLOAD:
            body = struct.pack(">H", 1) + _string("k") + struct.pack(">i", 1) + b"v" + body
        steps.append((CLIENT, frame(version, stream, F.Opcode.EXECUTE, body, response=False, flags=request_flags)))
        if draw(st.booleans()):
            header_flags, result = draw(results(version))
            steps.append((BACKEND, frame(version, stream, F.Opcode.RESULT, result, response=True, flags=header_flags)))
    return steps


@settings(max_examples=400, deadline=None)
@given(sessions())
def test_fast_path_writes_the_observers_trail(steps):
    same_trail(steps)


# --------------------------------------------------------------------------- it is taken


def test_plain_execute_and_results_take_the_fast_path():
    """What a driver sends by the thousand — EXECUTE of a known id with page size and
    timestamp, its RESULT Rows (no metadata, and with simple-typed metadata) and Void — is
    audited in place, and equally."""
    for version in (4, 5):
        steps = prepare_pair(version, "SELECT v FROM ks.t WHERE k = ?", [0x0009])
        execute = plain_execute(version)
        rows = struct.pack(">iiii", F.ResultKind.ROWS, F.RF_NO_METADATA, 1, 1) + struct.pack(">i", 2) + b"ab"
        meta_rows = (struct.pack(">iii", F.ResultKind.ROWS, F.RF_GLOBAL_TABLES_SPEC, 1) + _string("ks") + _string("t")
                     + _string("v") + struct.pack(">H", 0x000D) + struct.pack(">i", 0))
        for stream, answer in ((2, rows), (3, meta_rows), (4, struct.pack(">i", F.ResultKind.VOID))):
            steps.append((CLIENT, frame(version, stream, F.Opcode.EXECUTE, execute, response=False)))
            steps.append((BACKEND, frame(version, stream, F.Opcode.RESULT, answer, response=True)))
        assert same_trail(steps) == 6
        events, counts, _ = run(steps, fast=True)
        executes_ = [e for e in events if e["event"] == "db.session.cassandra.execute"]
        assert [e["db_query_parameters"] for e in executes_] == [["42"]] * 3
        assert executes_[0]["db_query"] == "SELECT v FROM ks.t WHERE k = ?" and executes_[0]["page_size"] == 5000
        assert [e.get("affected_records") for e in events if e["event"] == "db.session.result"][-3:] == [1, 0, None]
        assert counts["requests"] == 4


def test_a_re_prepared_id_is_rendered_with_its_new_types():
    """The per-id cache follows the shared PreparedCache: a new PREPARE of the same id (other bind
    types) changes how the next EXECUTE's values are rendered, as in the observer."""
    version = 5
    steps = prepare_pair(version, "SELECT v FROM ks.t WHERE k = ?", [0x0009])
    execute = (_short_bytes(QID) + _short_bytes(b"m" * 8) + struct.pack(">HI", 1, F.QF_VALUES)
               + struct.pack(">Hi", 1, 4) + b"abcd")
    steps.append((CLIENT, frame(version, 2, F.Opcode.EXECUTE, execute, response=False)))
    steps += prepare_pair(version, "SELECT v FROM ks.t WHERE s = ?", [0x000D])
    steps.append((CLIENT, frame(version, 3, F.Opcode.EXECUTE, execute, response=False)))
    same_trail(steps)
    events, _, _ = run(steps, fast=True)
    executes_ = [e for e in events if e["event"] == "db.session.cassandra.execute"]
    assert [e["db_query_parameters"] for e in executes_] == [[str(struct.unpack(">i", b"abcd")[0])], ["abcd"]]
    assert executes_[1]["db_query"] == "SELECT v FROM ks.t WHERE s = ?"
