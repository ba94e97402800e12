"""Per-statement access policy for Cassandra sessions: read-only, denied commands, keyspaces.

Strategy.  A client stage placed after the audit stage looks at every
QUERY, PREPARE, EXECUTE and BATCH (native protocol v4/v5 section 4.1) of a
session whose grant carries rules, and classifies the CQL lexed by
``cql.split_statements`` — a lexer that knows CQL's comments, strings,
``$$`` literals and quoted identifiers, keeps ``.`` between names and treats
``BEGIN BATCH … APPLY BATCH`` as one statement with its children visible.
Nothing is executed or fully parsed.  ``CQL`` is the dialect
(``dbproxy.statements.Dialect``) the grant's deny patterns and read-only
rule are applied through (``Grant.statement_refusal``); the keyspace rules
are CQL's own, below.

A refused request is answered by the proxy itself: an ERROR frame
UNAUTHORIZED (0x2100) on the request's stream id, in the connection's
framing (v3/v4 per-frame compression here, v5 segments by the pipeline's
encoder toward the client), and it is never forwarded.  CQL multiplexes
requests by stream id, so the answer may overtake answers still pending
from the node, as native errors do; the session goes on.  Each refusal is
audited twice: the request's result event (``success: false``, code and
message) and ``db.session.access_denied`` with the identity, reason, command
and CQL.

Rules, from the session's ``Grant`` (``dbproxy.roles``):

- ``deny_commands``: globs on the statement kind (``SELECT``, ``INSERT``,
  ``DROP TABLE``, ``CREATE INDEX``, ``TRUNCATE``, ``BATCH`` …; COLUMNFAMILY
  reads as TABLE, SCHEMA as KEYSPACE, DESC as DESCRIBE).  A batch is checked
  as ``BATCH`` and as each of its children.
- ``read_only``: only SELECT, USE, DESCRIBE and LIST run; everything else
  is refused (fail closed on kinds the proxy does not know), and so is every
  BATCH (CQL batches only hold writes).
- keyspaces: when the grant's ``databases`` globs are not ``*`` they are
  keyspace globs.  Names are found where CQL puts them — after FROM, INTO,
  UPDATE, TRUNCATE, TABLE, INDEX, VIEW, TYPE, FUNCTION, AGGREGATE, TRIGGER,
  ON (with IF [NOT] EXISTS skipped), KEYSPACE/SCHEMA and USE, and ``ALL
  KEYSPACES`` — not in select lists, where ``a.b`` is a UDT field.  A
  qualified name's keyspace is checked; an unqualified one resolves to the
  request's v5 keyspace, else the session's (tracked from SET_KEYSPACE
  results; for EXECUTE the keyspace it was prepared in).  USE needs a
  keyspace the globs allow.  Reads of the system keyspaces drivers need
  (``system``, ``system_schema``, ``system_virtual_schema``,
  ``system_views``) are always allowed; ``system_auth``, ``system_traces``
  and ``system_distributed`` only if the globs allow them.  DESCRIBE is not
  checked against keyspaces: schema is readable through ``system_schema``
  anyway (drivers read all of it at connect).  Function calls are not
  checked: a UDF cannot read tables.

Prepared statements.  PREPARE is checked like a QUERY, so a refused write
never gets an id.  EXECUTE (and a BATCH's prepared children) is checked
against the CQL the proxy saw prepared (``stages.PreparedCache``, shared by
the engine's sessions).  Cassandra's ids are ``MD5(keyspace + CQL)`` or
``MD5(CQL)`` (``QueryProcessor.computeId``); the proxy recomputes them, so a
cache entry whose keyspace does not match its id (a USE racing a PREPARE)
is not trusted.  An id the proxy cannot vouch for gets UNPREPARED (0x2500)
with that id, which drivers answer by preparing the statement again on
this connection — through this policy — and retrying.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any

import attrs

from dbproxy.audit import events as ev
from dbproxy.access import audit_denial
from dbproxy.roles import Grant
from dbproxy.sansio import reply
from dbproxy.statements import Refusal, Statement, Token

from . import protocol as F
from .cql import split_statements
from .observers import CqlSessionState
from .prepared import PreparedInfo

READ_COMMANDS = frozenset({"SELECT", "USE", "DESCRIBE", "LIST"})
SYSTEM_READABLE = frozenset({"system", "system_schema", "system_virtual_schema", "system_views"})

# Cassandra 5.0's reserved keywords (src/resources/org/apache/cassandra/cql3/reserved_keywords.txt):
# never an unquoted name, so never the name after an introducer.
RESERVED = frozenset("""
    ADD ALLOW ALTER AND APPLY ASC AUTHORIZE BATCH BEGIN BY COLUMNFAMILY CREATE DELETE DESC DESCRIBE
    DROP ENTRIES EXECUTE FROM FULL GRANT IF IN INDEX INFINITY INSERT INTO IS KEYSPACE LIMIT
    MATERIALIZED MODIFY NAN NORECURSIVE NOT NULL OF ON OR ORDER PRIMARY RENAME REVOKE SCHEMA SELECT
    SET TABLE TO TOKEN TRUNCATE UNLOGGED UPDATE USE USING VIEW WHERE WITH
""".split())
TABLE_INTRODUCERS = frozenset({
    "FROM", "INTO", "UPDATE", "TRUNCATE", "TABLE", "COLUMNFAMILY", "INDEX", "VIEW",
    "TYPE", "FUNCTION", "AGGREGATE", "TRIGGER", "ON",
})
KEYSPACE_INTRODUCERS = frozenset({"KEYSPACE", "SCHEMA", "USE"})
_INTRODUCERS = TABLE_INTRODUCERS | KEYSPACE_INTRODUCERS
_SKIPPED = frozenset({"IF", "NOT", "EXISTS"})
_NOT_TABLES_AFTER_ON = frozenset({"ROLE", "ROLES", "MBEAN", "MBEANS", "ALL"})
_BATCH_CHILDREN = frozenset({"INSERT", "UPDATE", "DELETE"})
_KIND_ALIASES = {"COLUMNFAMILY": "TABLE", "SCHEMA": "KEYSPACE"}
_NAMES = ("word", "ident")
ALL_KEYSPACES = "*"  # the reference of ``… ON ALL KEYSPACES`` / ``ALL FUNCTIONS``

UNAUTHORIZED = F.ErrorCode.UNAUTHORIZED
UNPREPARED = F.ErrorCode.UNPREPARED


# --------------------------------------------------------------------------- classification


@attrs.frozen
class Ref:
    """A name the statement reaches: ``keyspace`` None means "unqualified" (resolved later)."""

    keyspace: str | None


@attrs.frozen
class CqlStatement:
    command: str  # SELECT, INSERT, DROP TABLE, BATCH …
    commands: tuple[str, ...]  # command plus a batch's children
    refs: tuple[Ref, ...]

    @property
    def read(self) -> bool:
        return self.command in READ_COMMANDS


def _name(tok: Token) -> str:
    # CQL folds unquoted identifiers to lower case; the lexer upper-cases words.
    return tok.value.lower() if tok.kind == "word" else tok.value


def _normalize(command: str) -> str:
    head, _, obj = command.partition(" ")
    if head == "DESC":
        head = "DESCRIBE"
    obj = _KIND_ALIASES.get(obj, obj)
    return f"{head} {obj}" if obj else head


def _is_name_ahead(tokens: tuple[Token, ...], i: int) -> bool:
    """Is ``tokens[i]`` the start of a name (an identifier, or a word that is not reserved)?"""
    if i >= len(tokens):
        return False
    t = tokens[i]
    return t.kind == "ident" or (t.kind == "word" and (t.value not in RESERVED or _qualified_at(tokens, i)))


def _qualified_at(tokens: tuple[Token, ...], i: int) -> bool:
    return i + 2 < len(tokens) and tokens[i + 1].kind == "dot" and tokens[i + 2].kind in _NAMES


def references(tokens: tuple[Token, ...]) -> tuple[Ref, ...]:
    """The keyspace-relevant names of one statement (see the module docstring)."""
    refs: list[Ref] = []
    expect: str | None = None  # "table" / "keyspace": the next name is one
    after_on = False
    i, n = 0, len(tokens)
    while i < n:
        t = tokens[i]
        if t.kind == "word" and t.value == "ALL" and i + 1 < n and tokens[i + 1].kind == "word" and tokens[i + 1].value in ("KEYSPACES", "FUNCTIONS"):
            in_keyspace = i + 2 < n and tokens[i + 2].kind == "word" and tokens[i + 2].value == "IN"
            if not in_keyspace:  # ALL FUNCTIONS IN KEYSPACE ks names ks next
                refs.append(Ref(ALL_KEYSPACES))
            expect, after_on = None, False
            i += 2
            continue
        if expect is not None and t.kind in _NAMES:
            if t.kind == "word" and t.value in _SKIPPED and not _qualified_at(tokens, i):
                i += 1
                continue
            if after_on and t.kind == "word" and t.value in _NOT_TABLES_AFTER_ON and not _qualified_at(tokens, i):
                expect, after_on = None, False
                i += 1
                continue
            if _qualified_at(tokens, i):
                refs.append(Ref(_name(t)))
                expect, after_on = None, False
                i += 3
                continue
            keyword = t.kind == "word" and (t.value in RESERVED or (t.value in _INTRODUCERS and _is_name_ahead(tokens, i + 1)))
            if not keyword:
                refs.append(Ref(_name(t) if expect == "keyspace" else None))
                expect, after_on = None, False
                i += 1
                continue
        expect, after_on = None, False
        if t.kind == "word":
            if t.value in TABLE_INTRODUCERS:
                expect, after_on = "table", t.value == "ON"
            elif t.value in KEYSPACE_INTRODUCERS:
                expect = "keyspace"
        i += 1
    return tuple(refs)


def classify(stmt: Statement) -> CqlStatement:
    words = stmt.words
    if words and words[0] == "BEGIN" and "BATCH" in words[1:3]:
        children = tuple(w for w in words if w in _BATCH_CHILDREN)
        return CqlStatement("BATCH", ("BATCH",) + tuple(dict.fromkeys(children)), references(stmt.tokens))
    command = _normalize(stmt.command)
    return CqlStatement(command, (command,) if command else (), references(stmt.tokens))


def classify_cql(text: str) -> list[CqlStatement]:
    return [classify(s) for s in split_statements(text)]


class CqlDialect:
    """CQL for ``Grant.statement_refusal``: classified statements, read-only = READ_COMMANDS only."""

    name = "cql"

    def statements(self, text: str) -> list[CqlStatement]:
        return classify_cql(text)

    def variants(self, text: str) -> list[list[CqlStatement]]:
        return [classify_cql(text)]  # CQL strings have no backslash escapes (Lexer.g STRING_LITERAL): one reading

    def commands(self, stmt: CqlStatement) -> tuple[str, ...]:
        return stmt.commands

    def read_only_violation(self, stmt: CqlStatement) -> str | None:
        # Fail closed: a kind the proxy does not know is not a read; every BATCH holds writes.
        return None if stmt.read else f"{stmt.command} is not allowed"


CQL = CqlDialect()


# --------------------------------------------------------------------------- rules

# A BATCH message (opcode 0x0D) as a statement: checked as BATCH first, then child by child.
BATCH_MESSAGE = CqlStatement("BATCH", ("BATCH",), ())


@attrs.frozen
class Denial:
    reason: str  # audit code: command_denied / read_only / keyspace_denied
    message: str  # for the client's ERROR and the audit event
    command: str
    keyspace: str | None = None


def needs_policy(grant: Grant | None) -> bool:
    """Does this grant have anything to check per statement?"""
    return grant is not None and grant.restricted and (grant.has_statement_rules or "*" not in grant.databases)


@attrs.define(eq=False)
class CqlRules:
    """A grant's rules in CQL terms; ``user`` only shapes the messages."""

    grant: Grant
    user: str = "this user"

    @property
    def keyspaces_restricted(self) -> bool:
        return "*" not in self.grant.databases

    def allows_keyspace(self, keyspace: str, *, read: bool) -> bool:
        if not self.keyspaces_restricted:
            return True
        if read and keyspace in SYSTEM_READABLE:
            return True
        return self.grant.allows_database(keyspace)

    def check_statement(self, st: CqlStatement, keyspace: str | None) -> Denial | None:
        """``keyspace``: where unqualified names resolve (None: nowhere yet — Cassandra will refuse them)."""
        refusal = self.grant.statement_refusal(st, CQL)
        if refusal is not None:
            return self.denial(refusal)
        if self.keyspaces_restricted and st.command != "DESCRIBE":
            for ref in st.refs:
                ks = ref.keyspace if ref.keyspace is not None else keyspace
                if ks is None:
                    continue
                # USE changes where later writes resolve: it needs a keyspace the globs allow.
                if not self.allows_keyspace(ks, read=st.read and st.command != "USE"):
                    where = "all keyspaces" if ks == ALL_KEYSPACES else f"keyspace {ks}"
                    return Denial("keyspace_denied", f"User {self.user} has no access to {where} through this proxy", st.command, ks)
        return None

    def denial(self, refusal: Refusal) -> Denial:
        """A grant's refusal in the words Cassandra uses for its own UNAUTHORIZED errors."""
        if refusal.reason == "command_denied":
            message = f"User {self.user} may not run {refusal.command} through this proxy (role policy \"{refusal.detail}\")"
        else:
            message = f"User {self.user} has read-only access through this proxy: {refusal.detail}"
        return Denial(refusal.reason, message, refusal.command)

    def check_cql(self, text: str, keyspace: str | None) -> Denial | None:
        for st in CQL.statements(text):
            denial = self.check_statement(st, keyspace)
            if denial is not None:
                return denial
        return None

    def check_batch(self, children: list[tuple[str, str | None]]) -> Denial | None:
        """A BATCH message: ``children`` are (CQL, keyspace it resolves in)."""
        refusal = self.grant.statement_refusal(BATCH_MESSAGE, CQL)
        if refusal is not None:
            return self.denial(refusal)
        for text, keyspace in children:
            denial = self.check_cql(text, keyspace)
            if denial is not None:
                return denial
        return None


def prepared_id_for(query: str, keyspace: str | None) -> bytes:
    """Cassandra's id of a prepared statement (QueryProcessor.computeId: MD5 of keyspace + CQL, UTF-8)."""
    text = query if keyspace is None else keyspace + query
    return hashlib.md5(text.encode("utf-8")).digest()


def vouched(info: PreparedInfo | None, prepared_id: bytes) -> PreparedInfo | None:
    """``info`` if its CQL and keyspace are what the id says, else None."""
    if info is None:
        return None
    if info.keyspace is not None and prepared_id == prepared_id_for(info.query, info.keyspace):
        return info
    if prepared_id == prepared_id_for(info.query, None):
        return info
    return None


# --------------------------------------------------------------------------- the stage


class _Unknown(Exception):
    def __init__(self, prepared_id: bytes) -> None:
        self.prepared_id = prepared_id


class CqlPolicy:
    """Client → backend, after the audit stage: answer refused requests with UNAUTHORIZED."""

    name = "cql-policy"

    def __init__(self, state: CqlSessionState, grant: Grant, session: Any, audit: Any, *, compressor: str | None = None) -> None:
        self.state = state
        self.session = session
        self.audit = audit
        self.compressor = compressor
        user = getattr(getattr(session, "identity", None), "user", None) or "this user"
        self.rules = CqlRules(grant, user)
        self.denied = 0

    def handle(self, msg: F.Frame, ctx: Any) -> Any:
        op = msg.opcode
        try:
            if op == F.Opcode.QUERY:
                q = self._parsed(msg, F.parse_query)
                text, keyspace, opcode = q.query, q.params.keyspace or self.state.keyspace, "QUERY"
                denial = self.rules.check_cql(text, keyspace)
            elif op == F.Opcode.PREPARE:
                p = self._parsed(msg, F.parse_prepare)
                text, keyspace, opcode = p.query, p.keyspace or self.state.keyspace, "PREPARE"
                denial = self.rules.check_cql(text, keyspace)
            elif op == F.Opcode.EXECUTE:
                e = self._parsed(msg, F.parse_execute)
                info = self._prepared(e.query_id)
                text, keyspace, opcode = info.query, info.keyspace, "EXECUTE"
                denial = self.rules.check_cql(text, keyspace)
            elif op == F.Opcode.BATCH:
                b = self._parsed(msg, F.parse_batch)
                children = []
                for child in b.statements:
                    if child.kind == 1:
                        info = self._prepared(child.query_id)
                        children.append((info.query, info.keyspace))
                    else:
                        children.append((child.query or "", b.keyspace or self.state.keyspace))
                text, keyspace, opcode = "; ".join(c[0] for c in children), b.keyspace or self.state.keyspace, "BATCH"
                denial = self.rules.check_batch(children)
            else:
                return None
        except _Unknown as unknown:
            return self._unprepared(msg, unknown.prepared_id)
        if denial is None:
            return None
        return self._refuse(msg, denial, text, keyspace, opcode)

    def _parsed(self, msg: F.Frame, parse: Any) -> Any:
        last = self.state.last_request
        self.state.last_request = None
        if last is not None and last[0] is msg:
            return last[1]
        return parse(msg)

    def _prepared(self, prepared_id: bytes) -> PreparedInfo:
        st = self.state
        info = vouched(st.prepared.get(st.backend, prepared_id), prepared_id)
        if info is None:
            raise _Unknown(prepared_id)
        return info

    def _settle(self, msg: F.Frame, code: int, message: str, **fields: Any) -> str | None:
        """The request will get no answer from the node: close its audit trail."""
        st = self.state
        pending = st.pending.pop(msg.stream, None)
        st.errors += 1
        uid = pending.uid if pending is not None else None
        self.audit.on_result(
            success=False, query_uid=uid, cql_stream=msg.stream, error=message, error_code=code,
            error_name=F.ErrorCode(code).name, refused_by="dbproxy", **fields,
        )
        return uid

    def _refuse(self, msg: F.Frame, denial: Denial, text: str, keyspace: str | None, opcode: str) -> Any:
        self.denied += 1
        uid = self._settle(msg, UNAUTHORIZED, denial.message)
        fields: dict[str, Any] = {"command": denial.command, "db_query": ev.truncate(text), "cql_opcode": opcode, "query_uid": uid}
        if denial.keyspace is not None or keyspace is not None:
            fields["keyspace"] = denial.keyspace or keyspace
        audit_denial(self.session, denial.reason, stage="statement", error=denial.message, **fields)
        return reply(F.encode_error(msg.version, msg.stream, UNAUTHORIZED, denial.message, compressor=self.compressor))

    def _unprepared(self, msg: F.Frame, prepared_id: bytes) -> Any:
        self.denied += 1
        message = f"Prepared query with ID {prepared_id.hex()} not known to the proxy: prepare it again on this connection"
        uid = self._settle(msg, UNPREPARED, message, prepared_id=prepared_id.hex())
        audit_denial(
            self.session, "prepared_id_unknown", stage="statement", error=message, prepared_id=prepared_id.hex(),
            cql_opcode=F.Opcode(msg.opcode).name, query_uid=uid,
        )
        extra = struct.pack(">H", len(prepared_id)) + prepared_id
        return reply(F.encode_error(msg.version, msg.stream, UNPREPARED, message, extra=extra, compressor=self.compressor))
