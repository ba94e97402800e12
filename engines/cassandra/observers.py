"""The Cassandra engine's audit observers: read-only, both directions.

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
  (STARTUP / AUTH_RESPONSE after the handshake are refused by the active
  ``stages.SessionGuard``, which audits them itself.)

Observers only look: ``handle`` always returns None.  The core runs them in
the proxy's pumps, or — when nothing in the session acts on messages — the
pumps only frame and *tee* the frames they read (``interest``) to the audit
worker, which runs these same observers there (``tap.py``).

Malformed requests (the rule of every engine, ARCHITECTURE.md "Audit"): a
request whose header is right but whose body does not parse — a [long
string] or [short bytes] that runs past the body, a [value] length below -2,
a BATCH announcing more children than it holds or a child kind other than
0/1, invalid UTF-8 in a [string] — is never forwarded: ``RequestAudit``
raises ``MalformedMessage`` (carrying the stream and version; the proxy's tee
runs the same parsers before forwarding, ``tap.REQUEST_PARSERS``), the pipeline
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

Prepared statements: ``prepared.py``; bound values: ``values.py``.

Hot path: both stages return ``None`` (forward unchanged) for everything
they audit — auditing never costs a re-encode.  RESULT Rows bodies are read
only up to the row count (metadata is skipped over, rows never touched);
EVENT frames are forwarded without parsing.
"""

from __future__ import annotations

from typing import Any

import attrs

from dbproxy.audit import events as ev
from dbproxy.errors import MalformedMessage, ProtocolError

from . import protocol as F
from .prepared import PreparedCache, PreparedInfo, learn_prepared
from .values import consistency_name, error_name, render_values

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

#: The request parsers of what ``RequestAudit`` reads (its ``interest``): the proxy's tee runs
#: these same functions before forwarding, so a body the worker will parse is known to parse.
REQUEST_PARSERS = {
    _QUERY: F.parse_query,
    _PREPARE: F.parse_prepare,
    _EXECUTE: F.parse_execute,
    _BATCH: F.parse_batch,
    _REGISTER: F.parse_register,
}


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
    """Client → backend (read-only: returns None; a body that does not parse raises ``MalformedMessage``)."""

    name = "cql-audit-requests"
    interest = frozenset(REQUEST_PARSERS)

    def __init__(self, state: CqlSessionState, audit: Any) -> None:
        self.state = state
        self.audit = audit

    def handle(self, msg: F.Frame, ctx: Any) -> None:
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
    """Backend → client (read-only: returns None).  Every response pops its stream's pending
    request, so every opcode is of interest; RESULT Rows are read up to the row count."""

    name = "cql-audit-responses"
    interest = frozenset(range(256))

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
                learn_prepared(st.prepared, st.backend, msg, result.prepared_id, pending.query, pending.keyspace)
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
