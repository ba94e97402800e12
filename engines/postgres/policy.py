"""Per-statement access policy for Postgres sessions: denied commands and read-only roles.

Strategy.  The frontend stage looks at the SQL of every Query and Parse
(and refuses FunctionCall for read-only sessions, since a fast-path call by
OID cannot be inspected) through ``Grant.refusal(sql, SQL)``: ``SQL`` is
this engine's dialect (``dbproxy.statements.Dialect``), the lexer of
``sql.py`` (both string readings) plus the read-only rules below.  A
statement is refused when its command matches one of the grant's
``deny_commands`` patterns, or — for a read-only grant — when it is not on
the read-only allow-list below.

How a refusal reaches the client.  The proxy does not answer by itself: it
*replaces* the refused message with one that makes the backend fail at
that exact point — a Query or Parse whose text is a per-session marker
identifier, which PostgreSQL rejects as a syntax error — and the backend
stage rewrites that ErrorResponse into ``ERROR 42501 permission denied …``.
So the backend does what it does for any error: in the extended protocol
it discards messages until Sync and then sends ReadyForQuery; it aborts the
implicit transaction (or marks an explicit one failed, status 'E'); and the
client gets every response in request order even with pipelining, because
the error travels in the backend's own response stream.  The session
continues exactly as after a native permission error.

Read-only sessions are enforced twice: the proxy refuses writes and
read-write bypasses (below), and the backend session itself runs with
``default_transaction_read_only = on`` (``make_backend_read_only``), so a
write the proxy did not recognise (a function that writes) is still refused
by PostgreSQL.  Bypass attempts refused: ``SET``/``RESET`` of
``transaction_read_only`` / ``default_transaction_read_only`` (any case,
quoted or not), ``SET SESSION CHARACTERISTICS … READ WRITE``, ``SET
TRANSACTION READ WRITE``, ``BEGIN``/``START TRANSACTION … READ WRITE``,
``RESET ALL``, ``DISCARD ALL``, any ``set_config(…)``, ``U&"…"``
identifiers (they could spell any name), two-phase commit commands.

Limits: the policy sees statements, not what server-side code does — a
``DO`` block or a function can run any SQL inside.  Roles with
``deny_commands`` should also deny ``DO``, ``CALL`` and ``CREATE FUNCTION``;
read-only roles refuse them anyway.
"""

from __future__ import annotations

import re
import secrets
import struct
from typing import Any

import attrs

from dbproxy.audit import events as ev
from dbproxy.access import audit_denial
from dbproxy.roles import Grant
from dbproxy.sansio import replace
from dbproxy.statements import Statement

from . import messages as m
from . import sql as lexer

# Statements a read-only session may run (first keyword), subject to the checks in read_only_violation.
READ_ONLY_COMMANDS = frozenset({
    "SELECT", "VALUES", "TABLE", "WITH", "SHOW", "EXPLAIN",
    "BEGIN", "START", "COMMIT", "END", "ROLLBACK", "ABORT", "SAVEPOINT", "RELEASE",
    "PREPARE", "EXECUTE", "DEALLOCATE", "DECLARE", "FETCH", "MOVE", "CLOSE",
    "LISTEN", "UNLISTEN", "SET", "RESET", "DISCARD", "COPY",
})
GUARDED_SETTINGS = frozenset({"transaction_read_only", "default_transaction_read_only"})
# Keywords that make a query-shaped statement write (SELECT … INTO creates a table;
# WITH … DELETE, EXPLAIN ANALYZE UPDATE, COPY (DELETE … RETURNING) TO modify data).
WRITE_WORDS = frozenset({"INSERT", "UPDATE", "DELETE", "MERGE", "INTO", "TRUNCATE"})
_QUERY_SHAPED = frozenset({"SELECT", "VALUES", "TABLE", "WITH", "EXPLAIN", "PREPARE", "DECLARE", "COPY"})


@attrs.frozen
class Denial:
    reason: str  # audit code: command_denied / read_only
    message: str  # for the client's ErrorResponse and the audit event
    command: str


def _has_sequence(words: list[str], a: str, b: str) -> bool:
    return any(words[i] == a and words[i + 1] == b for i in range(len(words) - 1))


def _copy_from(words: list[str]) -> bool:
    """Is this COPY a load (``COPY table [(cols)] FROM …``)?

    ``COPY (query) TO …`` starts its query with a reserved word and can only
    go TO; otherwise the first FROM/TO word is the direction (a column named
    "from" or "to" would have to be quoted, so it is not a word token).
    """
    if len(words) > 1 and words[1] in ("SELECT", "WITH", "VALUES", "TABLE"):
        return False
    for w in words[1:]:
        if w in ("FROM", "TO"):
            return w == "FROM"
    return True  # no direction: not valid COPY; refuse rather than guess


def read_only_violation(stmt: Statement) -> str | None:
    """Why ``stmt`` may not run in a read-only session, or None."""
    words = stmt.words
    if not words:
        return None
    head = words[0]
    names = stmt.names()
    if "set_config" in names:
        return "set_config() is not allowed in a read-only session"
    if any(t.kind == "uident" for t in stmt.tokens):
        return "Unicode-escaped identifiers are not allowed in a read-only session"
    if head not in READ_ONLY_COMMANDS:
        return f"{stmt.command} is not allowed in a read-only session"
    if head in ("SET", "RESET") and names & GUARDED_SETTINGS:
        return f"{head} of {', '.join(sorted(names & GUARDED_SETTINGS))} is not allowed in a read-only session"
    if _has_sequence(words, "READ", "WRITE"):
        return "READ WRITE is not allowed in a read-only session"
    second = words[1] if len(words) > 1 else ""
    if head == "RESET" and second == "ALL":
        return "RESET ALL is not allowed in a read-only session"
    if head == "DISCARD" and second == "ALL":
        return "DISCARD ALL is not allowed in a read-only session"
    if (head in ("COMMIT", "ROLLBACK") and "PREPARED" in words) or (head == "PREPARE" and second == "TRANSACTION"):
        return "two-phase commit is not allowed in a read-only session"
    if head == "COPY" and _copy_from(words):
        return "COPY … FROM is not allowed in a read-only session"
    if head in _QUERY_SHAPED:
        found = sorted(set(words) & WRITE_WORDS)
        if found:
            return f"{found[0]} is not allowed in a read-only session"
    return None


class SqlDialect:
    """PostgreSQL's SQL for ``Grant.refusal``: ``sql.py``'s lexer and ``read_only_violation``."""

    name = "sql"

    def statements(self, text: str) -> list[Statement]:
        return lexer.split_statements(text)

    def variants(self, text: str) -> list[list[Statement]]:
        return lexer.statement_variants(text)

    def commands(self, stmt: Statement) -> list[str]:
        return stmt.commands()

    def read_only_violation(self, stmt: Statement) -> str | None:
        return read_only_violation(stmt)


SQL = SqlDialect()


def check_sql(sql: str, grant: Grant) -> Denial | None:
    """The first reason ``sql`` (one or more statements) is refused under ``grant``, or None."""
    refusal = grant.refusal(sql, SQL)
    if refusal is None:
        return None
    if refusal.reason == "command_denied":
        return Denial("command_denied", f"permission denied: {refusal.command} is not allowed for this session (role policy \"{refusal.detail}\")", refusal.command)
    return Denial("read_only", f"permission denied: {refusal.detail}", refusal.command)


def encode_parse(statement: str, query: str) -> bytes:
    """Parse ('P') with no parameter types (§55.7)."""
    body = statement.encode("utf-8") + b"\0" + query.encode("utf-8") + b"\0" + struct.pack(">h", 0)
    return m.encode_message(m.FE.PARSE, body)


@attrs.define(eq=False)
class PolicyState:
    """Refusals in flight: marker number → Denial, until the backend's error for it comes back."""

    nonce: str = attrs.field(factory=lambda: secrets.token_hex(6))
    counter: int = 0
    outstanding: dict = attrs.field(factory=dict)
    denied: int = 0

    def marker(self, denial: Denial) -> str:
        self.counter += 1
        self.denied += 1
        if len(self.outstanding) > 1000:  # markers the backend skipped (an earlier error in the batch)
            self.outstanding.pop(next(iter(self.outstanding)))
        self.outstanding[self.counter] = denial
        return f"dbproxy_policy_denied_{self.nonce}_{self.counter}"

    def take(self, error_text: str) -> Denial | None:
        match = re.search(rf"dbproxy_policy_denied_{self.nonce}_(\d+)", error_text)
        if match is None:
            return None
        n = int(match.group(1))
        for stale in [k for k in self.outstanding if k < n]:
            del self.outstanding[stale]
        return self.outstanding.pop(n, None)


class FrontendPolicy:
    """Client → backend: refuse denied statements by swapping in a failing marker statement."""

    name = "pg-policy-frontend"

    def __init__(self, state: PolicyState, grant: Grant, session: Any) -> None:
        self.state = state
        self.grant = grant
        self.session = session

    def handle(self, msg: Any, ctx: Any) -> Any:
        t = msg.type
        if t == m.FE.QUERY:
            sql, protocol = m.parse_query(msg), "simple"
        elif t == m.FE.PARSE:
            parse = m.parse_parse(msg)
            sql, protocol = parse.query, "extended"
        elif t == m.FE.FUNCTION_CALL and self.grant.read_only:
            denial = Denial("read_only", "permission denied: fast-path function calls are not allowed in a read-only session", "FUNCTION CALL")
            self._audit(denial, "<function call>", "function_call")
            return replace(m.encode_query(self.state.marker(denial)))
        else:
            return None
        denial = check_sql(sql, self.grant)
        if denial is None:
            return None
        self._audit(denial, sql, protocol)
        marker = self.state.marker(denial)
        if t == m.FE.QUERY:
            return replace(m.encode_query(marker))
        return replace(encode_parse(parse.statement, marker))

    def _audit(self, denial: Denial, sql: str, protocol: str) -> None:
        audit_denial(
            self.session, denial.reason, stage="statement", error=denial.message,
            command=denial.command, db_query=ev.truncate(sql), postgres_protocol=protocol,
        )


class BackendPolicy:
    """Backend → client: turn the marker's syntax error into the 42501 the client should see.

    It runs before the backend's observers (``dbproxy.flow.Wiring``): a message
    it replaces ends the stage loop, so it shows the ``observers`` (the
    BackendAudit…) the rewritten message itself, and the result event carries
    42501 and the policy's message.
    """

    name = "pg-policy-backend"

    def __init__(self, state: PolicyState, observers: tuple = ()) -> None:
        self.state = state
        self.observers = observers

    def handle(self, msg: Any, ctx: Any) -> Any:
        if msg.type != m.BE.ERROR_RESPONSE or not self.state.outstanding:
            return None
        fields = m.parse_error_fields(msg)
        denial = self.state.take(fields.get("M", "") + " " + fields.get("q", ""))
        if denial is None:
            return None
        raw = m.encode_error("ERROR", "42501", denial.message, hint="your dbproxy roles do not allow this statement")
        rewritten = m.Message(m.BE.ERROR_RESPONSE, raw)
        for observer in self.observers:
            observer.handle(rewritten, ctx)
        return replace(raw)
