"""The Postgres statement policy on text: the SQL lexer (engines/postgres/sql.py) and the rules (policy.check_sql).

The SQL dialect goes through the core's ``Grant.refusal``;
tests/integration/test_postgres_identity.py proves the same refusals
against a real server.
"""

from __future__ import annotations

import pytest

from dbproxy.roles import Grant
from dbproxy.engines.postgres.policy import check_sql
from dbproxy.engines.postgres.sql import split_statements, statement_variants


# --------------------------------------------------------------------------- lexer


def commands(sql: str) -> list[str]:
    return [s.command for s in split_statements(sql)]


def test_lexer_splits_statements_outside_literals_and_comments():
    sql = """
        select 'a;b', "we;ird" from t; -- drop table x;
        /* outer /* nested; drop */ still comment; */ insert into t values ($$;drop$$, $tag$ ; $ $tag$, e'\\';drop', 1.5e3);
        CREATE OR REPLACE TEMP VIEW v AS select 1;
        drop materialized view if exists mv;;
        ALTER SYSTEM SET work_mem = '1MB'
    """
    assert commands(sql) == ["SELECT", "INSERT", "CREATE VIEW", "DROP MATERIALIZED VIEW", "ALTER SYSTEM"]


def test_object_names_are_not_part_of_the_command():
    # USER takes a second word only as USER MAPPING: DROP USER alice is DROP USER, so a
    # deny pattern "DROP USER" catches it (it used to read "DROP USER ALICE" and slip by).
    assert commands(
        "create user alice; drop user if exists bob; alter user carol nologin; "
        "create user mapping for alice server s; create materialized view v as select 1; drop foreign table f"
    ) == ["CREATE USER", "DROP USER", "ALTER USER", "CREATE USER MAPPING", "CREATE MATERIALIZED VIEW", "DROP FOREIGN TABLE"]
    g = Grant(deny_commands=("CREATE USER", "DROP USER"), restricted=True)
    assert check_sql("CREATE USER alice PASSWORD 'x'", g).command == "CREATE USER"
    assert check_sql("drop user bob", g).command == "DROP USER"
    assert check_sql("create user mapping for alice server s", g) is None


def test_lexer_unterminated_literals_swallow_the_rest():
    assert commands("select 'abc; drop table t") == ["SELECT"]
    assert commands("select $x$ abc; drop table t") == ["SELECT"]
    assert commands('select "abc; drop table t') == ["SELECT"]
    assert commands("select 1 /* abc; drop table t") == ["SELECT"]


def test_backslash_reading_is_checked_too():
    # standard_conforming_strings=off: 'a\'' is a string ending after the escaped quote,
    # so "drop" is a statement; with standard strings it is inside the literal.
    sql = "select 'a\\'' ; drop table t; --'"
    standard, backslash = statement_variants(sql)
    assert [s.command for s in standard] == ["SELECT"]
    assert [s.command for s in backslash] == ["SELECT", "DROP TABLE"]
    assert check_sql(sql, Grant(deny_commands=("DROP",))) is not None


def test_nested_commands():
    assert split_statements("with d as (delete from t returning *) select * from d")[0].commands() == ["WITH", "DELETE"]
    assert split_statements("explain analyze update t set a = 1")[0].commands() == ["EXPLAIN", "UPDATE"]
    assert split_statements("create table t (a int references u on delete cascade)")[0].commands() == ["CREATE TABLE", "DELETE"]
    assert split_statements("select * from t for update")[0].commands() == ["SELECT"]


# --------------------------------------------------------------------------- Postgres statement rules

RO = Grant(read_only=True, restricted=True)

READ_ONLY_ALLOWED = [
    "select 1",
    "SELECT * FROM t WHERE note = 'insert into x; set transaction_read_only = off'",
    "with x as (select 1) select * from x",
    "values (1), (2)",
    "table t",
    "show default_transaction_read_only",
    "show all",
    "explain select * from t",
    "begin",
    "BEGIN READ ONLY",
    "start transaction isolation level repeatable read, read only",
    "commit; rollback; savepoint a; release a",
    "prepare p (int) as select $1",
    "execute p(1)",
    "deallocate p",
    "declare c cursor for select 1",
    "fetch 10 from c; close c",
    "set search_path = app, public",
    "set statement_timeout to 1000",
    "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
    "reset search_path",
    "discard plans",
    "copy t to stdout",
    "copy (select * from t) to stdout with (format csv)",
    "listen chan; unlisten chan",
    "select current_setting('transaction_read_only')",
    "",
    ";;",
]

READ_ONLY_REFUSED = [
    "insert into t values (1)",
    "update t set a = 1",
    "delete from t",
    "merge into t using u on true when matched then delete",
    "truncate t",
    "create table t2 (a int)",
    "create temp table t2 (a int)",
    "drop table t",
    "alter table t add column b int",
    "grant select on t to public",
    "select * into t2 from t",
    "with d as (delete from t returning *) select * from d",
    "explain analyze delete from t",
    "prepare p as insert into t values (1)",
    "declare c cursor for select * from t for update",
    "copy t from stdin",
    "copy (delete from t returning *) to stdout",
    "do $$ begin perform 1; end $$",
    "call proc()",
    "vacuum t",
    "notify chan",
    "lock table t in access exclusive mode",
    "select 1; insert into t values (1)",
    # the read-write bypasses
    "SET transaction_read_only = off",
    "SET default_transaction_read_only = off",
    "set default_transaction_read_only to default",
    "SET LOCAL transaction_read_only TO off",
    'SET "Transaction_Read_Only" = off',
    "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
    "SET TRANSACTION READ WRITE",
    "set transaction isolation level serializable, read write",
    "BEGIN READ WRITE",
    "begin isolation level serializable read write",
    "START TRANSACTION READ WRITE",
    "RESET transaction_read_only",
    "RESET default_transaction_read_only",
    "RESET ALL",
    "DISCARD ALL",
    "SELECT set_config('default_transaction_read_only', 'off', false)",
    "select pg_catalog.set_config('transaction_read_only', 'off', true)",
    'select "pg_catalog"."SET_CONFIG"(\'x\', \'y\', false)',
    'select U&"\\0073et_config"(\'transaction_read_only\', \'off\', false)',
    "select 1 /* harmless */; set default_transaction_read_only = off",
    "commit prepared 'x'",
    "prepare transaction 'x'",
]


@pytest.mark.parametrize("sql", READ_ONLY_ALLOWED)
def test_read_only_allows(sql):
    assert check_sql(sql, RO) is None


@pytest.mark.parametrize("sql", READ_ONLY_REFUSED)
def test_read_only_refuses(sql):
    denial = check_sql(sql, RO)
    assert denial is not None and denial.reason == "read_only" and denial.message.startswith("permission denied")


def test_deny_patterns_on_sql():
    g = Grant(deny_commands=("DROP", "TRUNCATE", "ALTER SYSTEM", "DELETE"), restricted=True)
    assert check_sql("drop table t", g).command == "DROP TABLE"
    assert check_sql("select 1; TRUNCATE t", g).command == "TRUNCATE"
    assert check_sql("alter system set x = 1", g).command == "ALTER SYSTEM"
    assert check_sql("with d as (delete from t returning 1) select 1", g).command == "DELETE"
    assert check_sql("select 'drop table t'", g) is None
    assert check_sql("alter table t add b int", g) is None
    assert check_sql("insert into t values (1)", g) is None
    assert check_sql("-- drop table t\nselect 1", g) is None
