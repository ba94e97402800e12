"""Capture real PostgreSQL wire traffic into ``*.fe.bin`` / ``*.be.bin`` (run by hand).

    python3 tests/data/postgres/capture.py

Starts a throwaway PostgreSQL 15 (``tests/unit/postgres/pg_throwaway.py``),
puts a recording TCP relay in front of it, and runs real clients through the
relay: psql (system libpq 15) and psycopg (its bundled libpq).  For every
scenario it writes the frontend stream (``NAME.fe.bin``) and the backend
stream (``NAME.be.bin``) of one connection, exactly as sent.  The codec tests
read these files; they check what the scenarios below control (query text,
tags, error codes) and not per-run values (pids, nonces, salts).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "unit" / "postgres"))

import pg_throwaway  # noqa: E402
from pg_throwaway import MD5_PASSWORD, MD5_USER, SCRAM_PASSWORD, SCRAM_USER  # noqa: E402


class Relay:
    """Accepts connections on a loopback port and forwards them, recording both directions."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections: list[tuple[bytearray, bytearray]] = []
        self.done = threading.Condition()
        self.finished = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            rec = (bytearray(), bytearray())
            self.connections.append(rec)
            state = {"open": 2}
            for src, dst, buf in ((client, upstream, rec[0]), (upstream, client, rec[1])):
                threading.Thread(target=self._pipe, args=(src, dst, buf, state), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, buf: bytearray, state: dict) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                buf += data
                dst.sendall(data)
        except OSError:
            pass
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        with self.done:
            state["open"] -= 1
            if state["open"] == 0:
                src.close()
                dst.close()
                self.finished += 1
                self.done.notify_all()

    def wait_finished(self, n: int) -> None:
        with self.done:
            if not self.done.wait_for(lambda: self.finished >= n, timeout=30):
                raise RuntimeError("relay connections did not finish")


def save(name: str, rec: tuple[bytearray, bytearray]) -> None:
    (HERE / f"{name}.fe.bin").write_bytes(bytes(rec[0]))
    (HERE / f"{name}.be.bin").write_bytes(bytes(rec[1]))
    print(f"{name}: frontend {len(rec[0])} bytes, backend {len(rec[1])} bytes")


def run_psql(port: int, user: str, password: str, sslmode: str, *commands: str) -> None:
    args = [str(pg_throwaway.PG_BIN / "psql"), "-X", "-w",
            f"host=127.0.0.1 port={port} user={user} dbname=postgres sslmode={sslmode} gssencmode=disable"]
    for c in commands:
        args += ["-c", c]
    env = dict(os.environ, PGPASSWORD=password, PGAPPNAME="capture")
    subprocess.run(args, env=env, capture_output=True, timeout=30)


def capture(relay: Relay, name: str, fn, connections: int = 1) -> None:
    start = len(relay.connections)
    fn()
    relay.wait_finished(start + connections)
    recs = relay.connections[start:start + connections]
    if connections == 1:
        save(name, recs[0])
    else:
        for i, rec in enumerate(recs):
            save(f"{name}{i}", rec)


def main() -> None:
    import psycopg

    with pg_throwaway.ThrowawayPostgres() as pg:
        relay = Relay(pg.port)
        p = relay.port

        capture(relay, "psql_simple", lambda: run_psql(
            p, SCRAM_USER, SCRAM_PASSWORD, "disable",
            "select 1 as one, 'x' as two, null as three",
            "create table t(a int, b text)",
            "insert into t values (1, 'a'), (2, 'b'), (3, 'c')",
            "update t set b = 'z' where a >= 2",
            "delete from t where a = 1",
            "do $$ begin raise notice 'hello notice'; end $$",
            "select 1/0",
            "listen chan; notify chan, 'payload-1'",
            "",
            "begin; select 1; ",
        ))
        capture(relay, "psql_sslprefer", lambda: run_psql(p, SCRAM_USER, SCRAM_PASSWORD, "prefer", "select 42"))
        capture(relay, "psql_badpw", lambda: run_psql(p, SCRAM_USER, "wrong", "disable", "select 1"))

        conninfo = f"host=127.0.0.1 port={p} dbname=postgres sslmode=disable gssencmode=disable"

        def extended() -> None:
            with psycopg.connect(conninfo, user=SCRAM_USER, password=SCRAM_PASSWORD, autocommit=True) as conn:
                conn.execute("create temp table e(a int, b text)")
                conn.execute("insert into e values (%s, %s)", (1, "h\u00e9"))
                conn.execute("insert into e values (%s, %s)", (2, None), prepare=True)
                conn.execute("select a, b from e where a > %s order by a", (0,), binary=True).fetchall()
                with conn.cursor() as cur:
                    cur.executemany("insert into e values (%s, %s)", [(3, "x"), (4, "y")])
                try:
                    conn.execute("select %s::int / 0", (5,))
                except psycopg.errors.DivisionByZero:
                    pass

        capture(relay, "psycopg_extended", extended)

        def copy() -> None:
            with psycopg.connect(conninfo, user=SCRAM_USER, password=SCRAM_PASSWORD, autocommit=True) as conn:
                conn.execute("create temp table c(a int, b text)")
                with conn.cursor() as cur:
                    with cur.copy("copy c from stdin") as cp:
                        for i in range(10):
                            cp.write_row((i, f"row{i}"))
                    with cur.copy("copy c to stdout") as cp:
                        for _ in cp:
                            pass

        capture(relay, "psycopg_copy", copy)

        def md5() -> None:
            with psycopg.connect(conninfo, user=MD5_USER, password=MD5_PASSWORD) as conn:
                conn.execute("select current_user").fetchone()

        capture(relay, "psycopg_md5", md5)

        def proto32() -> None:
            # libpq 18 asks for 3.2 when told to; PostgreSQL 15 answers NegotiateProtocolVersion.
            with psycopg.connect(conninfo + " max_protocol_version=3.2", user=SCRAM_USER,
                                 password=SCRAM_PASSWORD) as conn:
                conn.execute("select 1").fetchone()

        capture(relay, "psycopg_proto32", proto32)

        def cancel() -> None:
            with psycopg.connect(conninfo, user=SCRAM_USER, password=SCRAM_PASSWORD, autocommit=True) as conn:
                t = threading.Timer(0.5, conn.cancel_safe)
                t.start()
                try:
                    conn.execute("select pg_sleep(5)")
                except psycopg.errors.QueryCanceled:
                    pass
                t.join()

        # Two connections: the session (0) and the CancelRequest (1).
        capture(relay, "psycopg_cancel", cancel, connections=2)


if __name__ == "__main__":
    main()
