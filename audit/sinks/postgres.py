"""PostgreSQL table sink (``"type": "pg_table"``): the audit trail as rows, batched with COPY, behind the disk spool.

Each event becomes one row of ``table``::

    chain     text         which proxy's hash chain (config ``chain``, default the host name)
    seq       bigint       the chain's sequence number      } primary key (chain, seq)
    time      timestamptz  the event's time
    event     text         its type (db.session.query, ssh.exec, …)
    sid       text         the session id, if any
    usr       text         the proxy identity, if any
    prev_hash text, hash text   the chain fields
    line      text         the event's JSON line exactly as stamped (the bytes ``hash`` covers:
                           ``dbproxy audit verify`` works on ``SELECT line … ORDER BY seq``)
    body      jsonb        the same event, queryable (``body->>'db_query'``)

Strategy: the spooled base writes each batch to the disk spool first and
delivers from it in order (outages, restarts).  Each batch is one
transaction in a worker thread (psycopg is synchronous there, the audit
worker's trio loop never blocks): the batch's lines, joined and escaped at
once as ``COPY`` text, into a one-column temporary table, then ``INSERT …
SELECT`` the columns read by the server out of each ``line::jsonb`` ``… ON
CONFLICT (chain, seq) DO NOTHING`` — a batch re-sent after a lost commit
acknowledgement, or replayed by a restarted audit worker, lands once.  No
per-event Python: the columns parsed in Python and written by psycopg's COPY
row writer cost 25-45 µs an event in a thread that shares the audit worker's
GIL, and the sink fell behind the proxy.  The sink is pipelined: up to 4 batches
are read from the spool and submitted ahead, their transactions run one
after another on the one connection, in ``seq`` order (a batch behind a
failed one does not run), and the base moves the spool cursor in its own
task.  Batches are large by default (``batch_max_events`` 5000,
``batch_max_bytes`` 8 MiB; the spool keys override them).  One 500-event
batch at a time — read, COPY, commit (a WAL flush), cursor commit — stored
1189 events/s against 5394/s recorded while the audit database used 5 % of
a core; as it is now, the sink keeps up with ~8,000 events/s for five minutes
(scripts/bench/README.md, "Network audit sinks").
The table is created if missing.  The DSN (it may hold
a password) comes from a file or an environment variable and is never
logged; TLS is libpq's (``sslmode``/``sslrootcert`` in the DSN).
"""

from __future__ import annotations

import logging
import re
import socket
from typing import Any

import trio

from .spooled import DeliveryFailed, SpooledSink

log = logging.getLogger("dbproxy.audit.postgres")

TABLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}(\.[A-Za-z_][A-Za-z0-9_]{0,62})?$")
BATCH_MAX_EVENTS = 5000  # default batch_max_events / batch_max_bytes for this sink (see __init__)
BATCH_MAX_BYTES = 8 * 1024 * 1024
COLUMNS = ("chain", "seq", "time", "event", "sid", "usr", "prev_hash", "hash", "line", "body")


def copy_text(payloads: list[bytes]) -> bytes:
    """The lines as the data of ``COPY … (line) FROM STDIN`` (text format): one row a line,
    backslash, CR and tab escaped.  A JSON line holds no raw newline, so the whole batch is
    joined and escaped at once; should a payload hold one, each is escaped alone."""
    if not payloads:
        return b""
    block = b"\n".join(payloads)
    if block.count(b"\n") != len(payloads) - 1:
        return b"".join(_copy_escape(p).replace(b"\n", b"\\n") + b"\n" for p in payloads)
    return _copy_escape(block) + b"\n"


def _copy_escape(data: bytes) -> bytes:
    return data.replace(b"\\", b"\\\\").replace(b"\r", b"\\r").replace(b"\t", b"\\t")


class _Ticket:
    """One submitted batch: set ``done`` when its transaction ended, ``error`` if it failed."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery  # the pipeline attempt it belongs to (a retry starts a new one)
        self.done = trio.Event()
        self.error: Exception | None = None


class PostgresSink(SpooledSink):
    kind = "postgres"
    pipelined = True

    def __init__(self, *, dsn: Any, table: str = "dbproxy_audit", chain: str | None = None,
                 connect_timeout: float = 10.0, **spool: Any) -> None:
        # Big batches: each is one transaction (COPY, INSERT, a commit that waits for the WAL
        # flush), a spool read and thread hops in the busy audit worker; 500-event batches one at
        # a time stored 1189 events/s against 5394/s recorded (scripts/bench/pg --sink pg_table).
        spool.setdefault("batch_max_events", BATCH_MAX_EVENTS)
        spool.setdefault("batch_max_bytes", BATCH_MAX_BYTES)
        super().__init__(**spool)
        if not TABLE_NAME.match(table):
            raise ValueError(f"table {table!r}: a table name, optionally schema-qualified")
        self._dsn = dsn  # a SecretRef: read when connecting, never kept in logs
        self.table = table
        self.chain = chain or socket.gethostname()
        self.connect_timeout = connect_timeout
        self._conn: Any = None
        self._limiter = trio.CapacityLimiter(1)  # one thread at a time uses the connection
        # Pipelined: while one batch's transaction runs, the next batches are read from the spool
        # and wait their turn, and confirmed ones move the cursor (two fsyncs) in the base's own
        # task — one batch at a time, those steps added to each transaction's time.
        self.max_in_flight = 4
        self._last: _Ticket | None = None
        # The server reads the columns out of each line (see the module doc: no per-event Python).
        self._insert = (
            f"INSERT INTO {self.table} ({', '.join(COLUMNS)}) "
            "SELECT %s, (b->>'seq')::bigint, (b->>'time')::timestamptz, coalesce(b->>'event', ''), b->>'sid', "
            "b->>'user', b->>'prev_hash', b->>'hash', line, b "
            # OFFSET 0 keeps the subquery whole: pulled up, each b->>… would parse the line again
            # (eight parses a row; the audit database then spent ~100 µs of CPU an event).
            "FROM (SELECT line, line::jsonb AS b FROM dbproxy_audit_lines OFFSET 0) AS batch "
            "ON CONFLICT (chain, seq) DO NOTHING")

    # -- the connection (in the worker thread) -------------------------------------------
    def _connect(self) -> Any:
        import psycopg

        conn = psycopg.connect(self._dsn.reveal(), connect_timeout=max(1, int(self.connect_timeout)),
                               application_name="dbproxy-audit")
        with conn.transaction():
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {self.table} ("
                "chain text NOT NULL, seq bigint NOT NULL, time timestamptz, event text NOT NULL, sid text, "
                "usr text, prev_hash text NOT NULL, hash text NOT NULL, line text NOT NULL, body jsonb NOT NULL, "
                "PRIMARY KEY (chain, seq))")
        return conn

    def _deliver_sync(self, block: bytes) -> None:
        """One transaction: *block* (the batch's lines in COPY text format) into a temporary
        one-column table, then the rows made from it by the server."""
        import psycopg

        try:
            if self._conn is None or self._conn.closed:
                self._conn = self._connect()
            conn = self._conn
            with conn.transaction():
                conn.execute("CREATE TEMP TABLE IF NOT EXISTS dbproxy_audit_lines (line text NOT NULL) "
                             "ON COMMIT DELETE ROWS")
                with conn.cursor() as cur:
                    with cur.copy("COPY dbproxy_audit_lines (line) FROM STDIN") as copy:
                        copy.write(block)
                    cur.execute(self._insert, (self.chain,))
        except psycopg.Error as exc:
            self._close_sync()
            # psycopg's messages name host, port and database, never the password.
            raise DeliveryFailed(f"PostgreSQL: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from None
        except OSError as exc:
            self._close_sync()
            raise DeliveryFailed(f"PostgreSQL: {exc.strerror or exc}") from None

    def _close_sync(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # a broken connection may fail to close; it is dropped either way
                pass

    # -- the spooled sink's interface ----------------------------------------------------
    def _store_sync(self, payloads: list[bytes]) -> None:
        self._deliver_sync(copy_text(payloads))

    async def submit(self, payloads: list[bytes], nursery: trio.Nursery) -> _Ticket:
        prev = self._last if self._last is not None and self._last.nursery is nursery else None
        ticket = self._last = _Ticket(nursery)
        nursery.start_soon(self._transact, payloads, prev, ticket)
        return ticket

    async def _transact(self, payloads: list[bytes], prev: _Ticket | None, ticket: _Ticket) -> None:
        """One batch's transaction, after the one before it (rows land in ``seq`` order): trio's
        tasks start in no set order, and a batch behind a failed one must not land."""
        try:
            if prev is not None:
                await prev.done.wait()
                if prev.error is not None:
                    raise DeliveryFailed("PostgreSQL: an earlier batch failed")
            await trio.to_thread.run_sync(self._store_sync, payloads, limiter=self._limiter)
        except Exception as exc:  # noqa: BLE001 - handed to confirm, which reports it
            ticket.error = exc
        finally:
            ticket.done.set()

    async def confirm(self, ticket: _Ticket) -> None:
        await ticket.done.wait()
        if ticket.error is not None:
            raise ticket.error

    async def disconnect(self) -> None:
        await trio.to_thread.run_sync(self._close_sync, limiter=self._limiter)
