"""Pipeline stages of the Postgres engine: audit of both directions.

Frontend stage (client → backend):
  Query      → one ``db.session.query`` per message (its SQL, as sent)
  Parse      → remembers statement name → SQL; ``…statements.parse`` event
  Bind       → remembers portal → (statement, parameters); ``…statements.bind``
  Execute    → resolved to the statement's SQL and the portal's parameters;
               ``…statements.execute`` carrying ``db_query`` and
               ``db_query_parameters`` (text values as text, binary base64)
  Close      → forgets the statement/portal
  Sync/Query/FunctionCall mark where the backend's ReadyForQuery ends a unit.

Backend stage (backend → client): CommandComplete → ``db.session.result``
with the command tag and ``affected_records``; ErrorResponse → a failed
result with SQLSTATE and message.  Results name the ``query_uid`` of the
event they answer, found through a FIFO of outstanding requests in the
order the protocol guarantees (responses come back in request order).

Both stages return ``None`` (forward unchanged) for everything: auditing
never costs a re-encode.  DataRow and CopyData — nearly all bytes of a big
result — are rejected by one integer comparison up front.
"""

from __future__ import annotations

import struct
import uuid
from collections import deque
from typing import Any

import attrs

from dbproxy.audit import events as ev

from . import messages as m

_DATA_ROW = m.BE.DATA_ROW
_COPY_DATA = m.FE.COPY_DATA


@attrs.define(eq=False)
class _Pending:
    kind: str  # "query" (simple: many results, ends at Z), "execute", "sync", "function"
    uid: str | None = None
    sql: str = ""


@attrs.define(eq=False)
class PgSessionState:
    """What both directions of one session share."""

    statements: dict = attrs.field(factory=dict)  # name -> SQL
    statement_types: dict = attrs.field(factory=dict)  # name -> parameter type OIDs
    portals: dict = attrs.field(factory=dict)  # name -> (statement name, params)
    pending: deque = attrs.field(factory=deque)
    terminated: bool = False
    queries: int = 0
    errors: int = 0


# Binary-format parameters of these types are shown as their value; others as base64.
# Formats: PostgreSQL's send/recv functions (int2send, float8send, boolsend, uuid_send…).
_BINARY_DECODERS = {
    16: lambda b: "true" if b == b"\x01" else "false",  # bool
    20: lambda b: str(struct.unpack(">q", b)[0]),  # int8
    21: lambda b: str(struct.unpack(">h", b)[0]),  # int2
    23: lambda b: str(struct.unpack(">i", b)[0]),  # int4
    26: lambda b: str(struct.unpack(">I", b)[0]),  # oid
    700: lambda b: repr(struct.unpack(">f", b)[0]),  # float4
    701: lambda b: repr(struct.unpack(">d", b)[0]),  # float8
    25: lambda b: b.decode("utf-8", "replace"),  # text
    1043: lambda b: b.decode("utf-8", "replace"),  # varchar
    19: lambda b: b.decode("utf-8", "replace"),  # name
    2950: lambda b: str(uuid.UUID(bytes=b)),  # uuid
}


def _params_for_audit(bind: m.Bind, types: tuple[int, ...]) -> list:
    out = []
    for i, value in enumerate(bind.params):
        if value is None or bind.param_format(i) == 0:
            out.append(ev.param_text(value, binary=False))
            continue
        decode = _BINARY_DECODERS.get(types[i]) if i < len(types) else None
        if decode is not None:
            try:
                out.append(ev.truncate(decode(value), ev.MAX_PARAM_CHARS))
                continue
            except (struct.error, ValueError):
                pass
        out.append(ev.param_text(value, binary=True))
    return out


class FrontendAudit:
    name = "pg-audit-frontend"
    # The only message types ``handle`` acts on (a tap sends the worker no others).
    interest = frozenset(
        (m.FE.QUERY, m.FE.PARSE, m.FE.BIND, m.FE.EXECUTE, m.FE.SYNC, m.FE.CLOSE, m.FE.FUNCTION_CALL, m.FE.TERMINATE)
    )

    def __init__(self, state: PgSessionState, audit: Any) -> None:
        self.state = state
        self.audit = audit

    def handle(self, msg: Any, ctx: Any) -> None:
        t = msg.type
        if t == _COPY_DATA:
            return None
        st = self.state
        if t == m.FE.QUERY:
            sql = m.parse_query(msg)
            event = self.audit.on_query(sql, postgres_protocol="simple")
            st.pending.append(_Pending("query", event["uid"], sql))
            st.queries += 1
        elif t == m.FE.PARSE:
            p = m.parse_parse(msg)
            st.statements[p.statement] = p.query
            st.statement_types[p.statement] = p.param_types
            self.audit.emit(
                ev.PG_PARSE, statement_name=p.statement, db_query=ev.truncate(p.query), param_types=list(p.param_types)
            )
        elif t == m.FE.BIND:
            b = m.parse_bind(msg)
            params = _params_for_audit(b, st.statement_types.get(b.statement, ()))
            st.portals[b.portal] = (b.statement, params)
            self.audit.emit(ev.PG_BIND, statement_name=b.statement, portal_name=b.portal, db_query_parameters=params)
        elif t == m.FE.EXECUTE:
            e = m.parse_execute(msg)
            stmt, params = st.portals.get(e.portal, (None, []))
            sql = st.statements.get(stmt, "") if stmt is not None else ""
            event = self.audit.emit(
                ev.PG_EXECUTE,
                portal_name=e.portal,
                statement_name=stmt,
                db_query=ev.truncate(sql) if stmt is not None else f"<unknown portal {e.portal!r}>",
                db_query_parameters=params,
                max_rows=e.max_rows,
                postgres_protocol="extended",
            )
            st.pending.append(_Pending("execute", event["uid"], sql))
            st.queries += 1
        elif t == m.FE.SYNC:
            st.pending.append(_Pending("sync"))
        elif t == m.FE.CLOSE:
            d = m.parse_describe(msg)
            if d.kind == "S":
                st.statements.pop(d.name, None)
                st.statement_types.pop(d.name, None)
            else:
                st.portals.pop(d.name, None)
        elif t == m.FE.FUNCTION_CALL:
            event = self.audit.on_query("<function call>", postgres_protocol="function_call")
            st.pending.append(_Pending("query", event["uid"], "<function call>"))
        elif t == m.FE.TERMINATE:
            st.terminated = True
        # PasswordMessage ('p') and everything else: forwarded, never recorded.
        return None


class BackendAudit:
    name = "pg-audit-backend"
    # The only message types ``handle`` acts on (a tap sends the worker no others).
    interest = frozenset(
        (m.BE.COMMAND_COMPLETE, m.BE.EMPTY_QUERY_RESPONSE, m.BE.PORTAL_SUSPENDED, m.BE.ERROR_RESPONSE,
         m.BE.READY_FOR_QUERY)
    )

    def __init__(self, state: PgSessionState, audit: Any) -> None:
        self.state = state
        self.audit = audit

    def _current(self) -> _Pending | None:
        for p in self.state.pending:
            if p.kind != "sync":
                return p
            return None
        return None

    def handle(self, msg: Any, ctx: Any) -> None:
        t = msg.type
        if t == _DATA_ROW:
            return None
        st = self.state
        if t == m.BE.COMMAND_COMPLETE:
            tag = m.parse_command_complete(msg)
            cur = self._current()
            self.audit.on_result(
                success=True,
                query_uid=cur.uid if cur else None,
                command_tag=tag,
                affected_records=m.rows_from_tag(tag),
            )
            if cur is not None and cur.kind == "execute":
                st.pending.popleft()
        elif t == m.BE.EMPTY_QUERY_RESPONSE or t == m.BE.PORTAL_SUSPENDED:
            cur = self._current()
            self.audit.on_result(
                success=True,
                query_uid=cur.uid if cur else None,
                command_tag="" if t == m.BE.EMPTY_QUERY_RESPONSE else "PORTAL SUSPENDED",
                affected_records=0 if t == m.BE.EMPTY_QUERY_RESPONSE else None,
            )
            if cur is not None and cur.kind == "execute":
                st.pending.popleft()
        elif t == m.BE.ERROR_RESPONSE:
            fields = m.parse_error_fields(msg)
            cur = self._current()
            st.errors += 1
            self.audit.on_result(
                success=False,
                query_uid=cur.uid if cur else None,
                error=fields.get("M", ""),
                sqlstate=fields.get("C", ""),
                severity=fields.get("V", fields.get("S", "")),
            )
            # An error in extended mode discards everything up to the next Sync.
            if cur is not None and cur.kind == "execute":
                while st.pending and st.pending[0].kind == "execute":
                    st.pending.popleft()
        elif t == m.BE.READY_FOR_QUERY:
            pending = st.pending
            # ReadyForQuery ends one simple query / function call, or one Sync
            # (and whatever of its batch is still outstanding).
            while pending:
                p = pending.popleft()
                if p.kind in ("sync", "query", "function"):
                    break
        return None


class LastBackendMessage:
    """Backend observer that notes the type of the last message (inline; a tapped
    session's backend ``Tee`` notes it itself): a backend that said why it is
    closing (a FATAL ErrorResponse, e.g. 57P01 after ``pg_terminate_backend``) is
    not followed by the proxy's own 08006."""

    __slots__ = ("last_type",)
    name = "pg-last-backend-message"

    def __init__(self) -> None:
        self.last_type = 0

    def handle(self, msg: Any, ctx: Any) -> None:
        self.last_type = msg.type
