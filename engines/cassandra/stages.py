"""Pipeline stages of the Cassandra engine: audit of both directions.

Requests (client → backend), native protocol v4/v5 section 4.1:
  QUERY    → ``db.session.query``: CQL, consistency, keyspace (the v5
             per-query keyspace, else the session's), bound values, paging
  PREPARE  → ``db.session.cassandra.prepare``: CQL (and v5 keyspace)
  EXECUTE  → ``db.session.cassandra.execute``: the prepared id resolved to its
             CQL and bound values decoded by the prepared statement's types;
             an id the proxy never saw prepared is audited as unknown
  BATCH    → ``db.session.cassandra.batch``: every child statement (CQL or
             resolved prepared id) with its values
  REGISTER → ``db.session.cassandra.register``: the event types
  STARTUP / AUTH_RESPONSE after the handshake are answered with a
  PROTOCOL_ERROR and never forwarded (a client's password must not reach the
  backend, and the backend's framing must not change under the proxy).

Malformed requests (the rule of every engine, ARCHITECTURE.md "Audit"): a
request whose header is right but whose body does not parse — a [long
string] or [short bytes] that runs past the body, a [value] length below -2,
a BATCH announcing more children than it holds or a child kind other than
0/1, invalid UTF-8 in a [string] — is never forwarded: ``RequestAudit``
raises ``MalformedMessage`` (carrying the stream and version), the pipeline
audits it as ``audit.malformed`` and the engine ends the session with ERROR
PROTOCOL_ERROR (0x000A) on that stream.  Parsing is the grammar Cassandra
applies (native_protocol_v4/v5 §3, §4.1), so what parses here is what the
node reads.  Not malformed: values Cassandra itself refuses after parsing —
an unknown consistency code (audited as its number), an unknown batch type
(its number), flag bits no version defines (ignored here as by Cassandra's
``Flag.deserialize``), bound values that do not decode as their prepared type
(audited as base64): the record says what was sent, the node answers the
error and runs nothing.

Responses (backend → client), section 4.2: RESULT → ``db.session.result``
with its kind (void, rows + row count + has_more_pages, set_keyspace,
prepared + id, schema_change); ERROR → a failed result with code and
message.  Results name the ``query_uid`` of the request they answer: CQL
multiplexes requests by stream id, so outstanding requests are a dict keyed
by stream (v3+ ids are int16; negative ids are the server's EVENTs).

Prepared statements: the RESULT Prepared's id → (CQL, keyspace, bind types)
goes into a ``PreparedCache`` shared by every session of the engine, keyed by
backend address and id.  Cassandra derives the id from the statement text
and keyspace (MD5), and the proxy learns it only from a backend's answer to a
PREPARE it saw, so sharing is safe and lets an EXECUTE on another connection
(drivers prepare on one connection and execute on any) be resolved.

Hot path: both stages return ``None`` (forward unchanged) for everything
they audit — auditing never costs a re-encode.  RESULT Rows bodies are read
only up to the row count (metadata is skipped over, rows never touched);
EVENT frames are forwarded without parsing.
"""

from __future__ import annotations

import collections
import datetime
import ipaddress
import struct
import uuid
from typing import Any

import attrs

from dbproxy.audit import events as ev
from dbproxy.errors import MalformedMessage, ProtocolError
from dbproxy.sansio import reply

from . import protocol as F

EV_BATCH = "db.session.cassandra.batch"
EV_PREPARE = "db.session.cassandra.prepare"
EV_EXECUTE = "db.session.cassandra.execute"
EV_REGISTER = "db.session.cassandra.register"
# Teleport's event codes for its Cassandra events (TCA01I…TCA04I).
EVENT_CODES = {EV_BATCH: "TCA01I", EV_PREPARE: "TCA02I", EV_EXECUTE: "TCA03I", EV_REGISTER: "TCA04I"}

MAX_BATCH_CHILDREN = 1000

_QUERY = F.Opcode.QUERY
_EXECUTE = F.Opcode.EXECUTE
_PREPARE = F.Opcode.PREPARE
_BATCH = F.Opcode.BATCH
_REGISTER = F.Opcode.REGISTER
_RESULT = F.Opcode.RESULT
_ERROR = F.Opcode.ERROR
_EVENT = F.Opcode.EVENT

RESULT_KINDS = {1: "void", 2: "rows", 3: "set_keyspace", 4: "prepared", 5: "schema_change"}
BATCH_TYPES = {0: "LOGGED", 1: "UNLOGGED", 2: "COUNTER"}
_BATCH_BEGIN = {0: "BEGIN BATCH", 1: "BEGIN UNLOGGED BATCH", 2: "BEGIN COUNTER BATCH"}


def consistency_name(value: int | None) -> str | None:
    if value is None:
        return None
    try:
        return F.Consistency(value).name
    except ValueError:
        return str(value)


def error_name(code: int) -> str:
    try:
        return F.ErrorCode(code).name
    except ValueError:
        return f"{code:#06x}"


# --------------------------------------------------------------------------- bound values

_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
_DATE_EPOCH = datetime.date(1970, 1, 1)


def _text(b: bytes) -> str:
    return b.decode("utf-8", "replace")


def _timestamp(b: bytes) -> str:
    ms = struct.unpack(">q", b)[0]
    return (_EPOCH + datetime.timedelta(milliseconds=ms)).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _date(b: bytes) -> str:
    days = struct.unpack(">I", b)[0] - (1 << 31)  # spec 6.2x: unsigned, epoch at 2**31
    return (_DATE_EPOCH + datetime.timedelta(days=days)).isoformat()


def _time(b: bytes) -> str:
    ns = struct.unpack(">q", b)[0]
    seconds, nanos = divmod(ns, 1_000_000_000)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}.{nanos:09d}"


# [option] ids (spec 4.2.5.2) → serialisation of section 6 (v4) / 5 (v5).
_DECODERS = {
    0x0001: _text,  # ascii
    0x0002: lambda b: str(struct.unpack(">q", b)[0]),  # bigint
    0x0004: lambda b: "true" if b != b"\x00" else "false",  # boolean
    0x0005: lambda b: str(struct.unpack(">q", b)[0]),  # counter
    0x0007: lambda b: repr(struct.unpack(">d", b)[0]),  # double
    0x0008: lambda b: repr(struct.unpack(">f", b)[0]),  # float
    0x0009: lambda b: str(struct.unpack(">i", b)[0]),  # int
    0x000A: _text,  # text
    0x000B: _timestamp,
    0x000C: lambda b: str(uuid.UUID(bytes=b)),  # uuid
    0x000D: _text,  # varchar
    0x000E: lambda b: str(int.from_bytes(b, "big", signed=True)),  # varint
    0x000F: lambda b: str(uuid.UUID(bytes=b)),  # timeuuid
    0x0010: lambda b: str(ipaddress.ip_address(b)),  # inet
    0x0011: _date,
    0x0012: _time,
    0x0013: lambda b: str(struct.unpack(">h", b)[0]),  # smallint
    0x0014: lambda b: str(struct.unpack(">b", b)[0]),  # tinyint
}


def render_value(value: Any, type_id: int | None = None) -> str | None:
    """A bound [value] as audit text: decoded by its CQL type when known, else base64."""
    if value is None:
        return None
    if value is F.UNSET:
        return "<unset>"
    decode = _DECODERS.get(type_id) if type_id is not None else None
    if decode is not None:
        try:
            return ev.truncate(decode(value), ev.MAX_PARAM_CHARS)
        except (struct.error, ValueError, OverflowError):
            pass
    return ev.param_text(value, binary=True)


def render_values(values: tuple, names: tuple[str, ...] | None, info: "PreparedInfo | None") -> list | dict:
    if info is None:
        rendered = [render_value(v) for v in values]
        return dict(zip(names, rendered)) if names else rendered
    if names:
        by_name = dict(zip(info.names, info.types))
        return {n: render_value(v, by_name.get(n)) for n, v in zip(names, values)}
    types = info.types
    return [render_value(v, types[i] if i < len(types) else None) for i, v in enumerate(values)]


# --------------------------------------------------------------------------- prepared statements


@attrs.frozen
class PreparedInfo:
    query: str
    keyspace: str | None
    types: tuple[int, ...] = ()
    names: tuple[str, ...] = ()


class PreparedCache:
    """(backend address, prepared id) → PreparedInfo, least recently used out first."""

    def __init__(self, capacity: int = 20_000) -> None:
        self.capacity = capacity
        self._items: collections.OrderedDict[tuple[str, bytes], PreparedInfo] = collections.OrderedDict()

    def get(self, backend: str, prepared_id: bytes) -> PreparedInfo | None:
        key = (backend, prepared_id)
        info = self._items.get(key)
        if info is not None:
            self._items.move_to_end(key)
        return info

    def put(self, backend: str, prepared_id: bytes, info: PreparedInfo) -> None:
        key = (backend, prepared_id)
        self._items[key] = info
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


@F.guard
def parse_prepared_bind_metadata(frame: F.Frame) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Bind marker types and names of a RESULT Prepared (spec 4.2.5.4).

    <id>[<result_metadata_id> v5]<metadata>: flags, columns_count, (v4+)
    pk_count and pk indexes, [global table spec], column specs.
    """
    r = F.message_reader(frame, F.Opcode.RESULT)
    if r.int32() != F.ResultKind.PREPARED:
        return (), ()
    r.short_bytes()
    if frame.version >= 5:
        r.short_bytes()
    flags = r.int32()
    count = r.int32()
    if frame.version >= 4:
        for _ in range(r.int32()):
            r.short()
    global_spec = bool(flags & F.RF_GLOBAL_TABLES_SPEC)
    if global_spec:
        r.string()
        r.string()
    types = []
    names = []
    for _ in range(count):
        if not global_spec:
            r.string()
            r.string()
        names.append(r.string())
        types.append(r.option())
    return tuple(types), tuple(names)


# --------------------------------------------------------------------------- session state


@attrs.define(eq=False)
class _Pending:
    uid: str | None
    kind: str  # query, prepare, execute, batch, register
    query: str = ""
    keyspace: str | None = None


@attrs.define(eq=False)
class CqlSessionState:
    """What both directions of one session share."""

    backend: str
    prepared: PreparedCache
    session: Any = None
    version: int = 4
    keyspace: str | None = None
    pending: dict = attrs.field(factory=dict)  # stream id -> _Pending
    # (frame, parsed body) of the request the audit stage just read, so a later
    # stage (policy.CqlPolicy) does not parse it again.
    last_request: tuple | None = None
    requests: int = 0
    errors: int = 0
    events: int = 0


def _protocol_error(frame: F.Frame, message: str, compressor: str | None) -> bytes:
    return F.encode_error(frame.version, frame.stream, F.ErrorCode.PROTOCOL_ERROR, message, compressor=compressor)


def malformed_request(frame: F.Frame, exc: ProtocolError) -> MalformedMessage:
    """A request whose body does not parse, as the pipeline audits and answers it: ``stream`` and
    ``version`` put the engine's PROTOCOL_ERROR (0x000A) on the client's own stream."""
    name = F.Opcode(frame.opcode).name
    bad = MalformedMessage(
        f"malformed {name} request on stream {frame.stream}: {exc}",
        client_hint=getattr(exc, "client_hint", None) or f"malformed {name} message body",
        type_name=name, type_code=frame.opcode, raw=frame.raw,
    )
    bad.stream = frame.stream  # type: ignore[attr-defined]
    bad.version = frame.version  # type: ignore[attr-defined]
    return bad


class RequestAudit:
    """Client → backend."""

    name = "cql-audit-requests"

    def __init__(self, state: CqlSessionState, audit: Any, *, compressor: str | None = None) -> None:
        self.state = state
        self.audit = audit
        self.compressor = compressor

    def handle(self, msg: F.Frame, ctx: Any) -> Any:
        op = msg.opcode
        try:
            if op == _EXECUTE:
                self._execute(msg)
            elif op == _QUERY:
                self._query(msg)
            elif op == _BATCH:
                self._batch(msg)
            elif op == _PREPARE:
                self._prepare(msg)
            elif op == _REGISTER:
                self._register(msg)
            elif op == F.Opcode.STARTUP or op == F.Opcode.AUTH_RESPONSE:
                name = F.Opcode(op).name
                self.audit.emit(
                    ev.QUERY, db_query=f"<{name} after the handshake: refused>", success=False, cql_opcode=name
                )
                return reply(_protocol_error(msg, f"Unexpected message {name}: the connection is already authenticated", self.compressor))
        except ProtocolError as exc:
            # Never forward what could not be audited: the pipeline audits it (audit.malformed)
            # and ends the session with PROTOCOL_ERROR on this stream (the rule of every engine).
            raise malformed_request(msg, exc) from None
        return None

    def _common(self, msg: F.Frame, params: F.QueryParameters | None) -> dict:
        st = self.state
        fields: dict[str, Any] = {"cql_stream": msg.stream}
        if params is not None:
            fields["consistency"] = consistency_name(params.consistency)
            fields["keyspace"] = params.keyspace or st.keyspace
            if params.serial_consistency is not None:
                fields["serial_consistency"] = consistency_name(params.serial_consistency)
            if params.page_size is not None:
                fields["page_size"] = params.page_size
            if params.paging_state is not None:
                fields["next_page"] = True
        return fields

    def _track(self, msg: F.Frame, uid: str, kind: str, query: str = "", keyspace: str | None = None) -> None:
        st = self.state
        st.pending[msg.stream] = _Pending(uid, kind, query, keyspace)
        st.requests += 1

    def _query(self, msg: F.Frame) -> None:
        q = F.parse_query(msg)
        self.state.last_request = (msg, q)
        p = q.params
        fields = self._common(msg, p)
        params = render_values(p.values, p.names, None) if p.values else None
        event = self.audit.on_query(q.query, parameters=params, cql_opcode="QUERY", **fields)
        self._track(msg, event["uid"], "query", q.query)

    def _prepare(self, msg: F.Frame) -> None:
        p = F.parse_prepare(msg)
        self.state.last_request = (msg, p)
        keyspace = p.keyspace or self.state.keyspace
        event = self.audit.emit(
            EV_PREPARE, code=EVENT_CODES[EV_PREPARE], db_query=ev.truncate(p.query), keyspace=keyspace,
            cql_opcode="PREPARE", cql_stream=msg.stream,
        )
        self._track(msg, event["uid"], "prepare", p.query, keyspace)

    def _resolve(self, prepared_id: bytes) -> tuple[PreparedInfo | None, str]:
        st = self.state
        info = st.prepared.get(st.backend, prepared_id)
        if info is None:
            return None, f"<unknown prepared id 0x{prepared_id.hex()}>"
        return info, info.query

    def _execute(self, msg: F.Frame) -> None:
        e = F.parse_execute(msg)
        self.state.last_request = (msg, e)
        p = e.params
        info, query = self._resolve(e.query_id)
        fields = self._common(msg, p)
        if info is not None and info.keyspace and not p.keyspace:
            fields["keyspace"] = info.keyspace
        event = self.audit.emit(
            EV_EXECUTE,
            code=EVENT_CODES[EV_EXECUTE],
            db_query=ev.truncate(query),
            db_query_parameters=render_values(p.values, p.names, info),
            prepared_id=e.query_id.hex(),
            prepared_known=info is not None,
            cql_opcode="EXECUTE",
            **fields,
        )
        self._track(msg, event["uid"], "execute", query)

    def _batch(self, msg: F.Frame) -> None:
        b = F.parse_batch(msg)
        self.state.last_request = (msg, b)
        children = []
        queries = []
        for child in b.statements[:MAX_BATCH_CHILDREN]:
            if child.kind == 1:
                info, query = self._resolve(child.query_id)
                entry = {
                    "db_query": ev.truncate(query, ev.MAX_PARAM_CHARS * 2),
                    "db_query_parameters": render_values(child.values, None, info),
                    "prepared_id": child.query_id.hex(),
                    "prepared_known": info is not None,
                }
            else:
                query = child.query or ""
                entry = {
                    "db_query": ev.truncate(query, ev.MAX_PARAM_CHARS * 2),
                    "db_query_parameters": render_values(child.values, None, None),
                }
            children.append(entry)
            queries.append(query.strip().rstrip(";"))
        text = f"{_BATCH_BEGIN.get(b.batch_type, 'BEGIN BATCH')} " + "; ".join(queries) + "; APPLY BATCH"
        fields: dict[str, Any] = {
            "cql_stream": msg.stream,
            "consistency": consistency_name(b.consistency),
            "keyspace": b.keyspace or self.state.keyspace,
            "batch_type": BATCH_TYPES.get(b.batch_type, str(b.batch_type)),
            "children": children,
            "statements": len(b.statements),
        }
        if len(b.statements) > MAX_BATCH_CHILDREN:
            fields["children_omitted"] = len(b.statements) - MAX_BATCH_CHILDREN
        if b.serial_consistency is not None:
            fields["serial_consistency"] = consistency_name(b.serial_consistency)
        event = self.audit.emit(EV_BATCH, code=EVENT_CODES[EV_BATCH], db_query=ev.truncate(text), cql_opcode="BATCH", **fields)
        self._track(msg, event["uid"], "batch", text)

    def _register(self, msg: F.Frame) -> None:
        types = list(F.parse_register(msg))
        event = self.audit.emit(
            EV_REGISTER, code=EVENT_CODES[EV_REGISTER], event_types=types, cql_opcode="REGISTER", cql_stream=msg.stream
        )
        self._track(msg, event["uid"], "register")


class ResponseAudit:
    """Backend → client."""

    name = "cql-audit-responses"

    def __init__(self, state: CqlSessionState, audit: Any) -> None:
        self.state = state
        self.audit = audit

    def handle(self, msg: F.Frame, ctx: Any) -> None:
        op = msg.opcode
        if op == _RESULT:
            self._result(msg)
        elif op == _ERROR:
            self._error(msg)
        elif op == _EVENT:
            self.state.events += 1
        else:
            self.state.pending.pop(msg.stream, None)  # SUPPORTED (heartbeats) and the like
        return None

    def _result(self, msg: F.Frame) -> None:
        st = self.state
        pending = st.pending.pop(msg.stream, None)
        if pending is None:
            return  # nothing the proxy audited asked for this (never happens with a sane server)
        fields: dict[str, Any] = {"query_uid": pending.uid, "cql_stream": msg.stream}
        try:
            result = F.parse_result(msg)
        except ProtocolError as exc:
            self.audit.on_result(success=True, result_kind="unparsed", error=str(exc), **fields)
            return
        kind = result.kind
        fields["result_kind"] = RESULT_KINDS.get(kind, str(kind))
        if msg.flags & F.FLAG_WARNING:
            try:
                fields["warnings"] = [ev.truncate(w, ev.MAX_PARAM_CHARS) for w in F.body_prefix(msg).warnings]
            except ProtocolError:
                pass
        if kind == F.ResultKind.ROWS:
            rows = result.rows
            fields["affected_records"] = rows.row_count
            fields["has_more_pages"] = rows.has_more_pages
        elif kind == F.ResultKind.SET_KEYSPACE:
            st.keyspace = result.keyspace
            if st.session is not None:
                st.session.db_name = result.keyspace
            fields["keyspace"] = result.keyspace
        elif kind == F.ResultKind.PREPARED:
            fields["prepared_id"] = result.prepared_id.hex()
            if pending.kind == "prepare":
                try:
                    types, names = parse_prepared_bind_metadata(msg)
                except ProtocolError:
                    types, names = (), ()
                st.prepared.put(st.backend, result.prepared_id, PreparedInfo(pending.query, pending.keyspace, types, names))
        elif kind == F.ResultKind.SCHEMA_CHANGE:
            sc = result.schema_change
            fields["schema_change"] = {"change_type": sc.change_type, "target": sc.target, "options": list(sc.options)}
        self.audit.on_result(success=True, **fields)

    def _error(self, msg: F.Frame) -> None:
        st = self.state
        pending = st.pending.pop(msg.stream, None)
        st.errors += 1
        try:
            err = F.parse_error(msg)
        except ProtocolError as exc:
            self.audit.on_result(success=False, query_uid=pending.uid if pending else None, error=str(exc))
            return
        fields: dict[str, Any] = {
            "query_uid": pending.uid if pending else None,
            "cql_stream": msg.stream,
            "error": ev.truncate(err.message, ev.MAX_PARAM_CHARS),
            "error_code": err.code,
            "error_name": error_name(err.code),
        }
        if err.unprepared_id is not None:
            fields["prepared_id"] = err.unprepared_id.hex()
        self.audit.on_result(success=False, **fields)
