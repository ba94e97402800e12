"""Roles and grants: which routes, databases and database users an identity may reach, and what it may run.

Strategy.  Deny by default.  Roles in the config (root ``roles``) name the
routes, database names and database users they allow (globs) and may be
``read_only`` or deny command patterns.  An identity's roles come from its
token or its certificate mapping; the roles that match a connection's
(route, database, database user) are its *granting* roles, and they form one
``Grant`` for the session:

- allowed at all: at least one granting role (else ``AccessDenied``);
- read-only: only if *every* granting role is read-only (allows are a union);
- denied commands: the union of the granting roles' ``deny_commands`` (a
  deny always wins).

The core knows no query language: an engine whose protocol carries
statements passes its dialect (``dbproxy.statements.Dialect``) to
``Grant.refusal(text, dialect)``, which applies the deny patterns to the
commands the dialect names and asks the dialect what read-only forbids.
Protocols that name commands themselves (Mongo) call ``denied_command``.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Iterable

import attrs

from .errors import AccessDenied
from .session import Identity
from .statements import Dialect, Refusal

ROLE_KEYS = {"routes", "databases", "db_users", "read_only", "deny_commands"}


@attrs.frozen
class RoleConfig:
    name: str
    routes: tuple[str, ...]
    databases: tuple[str, ...]
    db_users: tuple[str, ...]
    read_only: bool = False
    deny_commands: tuple[str, ...] = ()


def glob_list(v: Any, d: dict, key: str, path: str, *, required: bool) -> tuple[str, ...]:
    if key not in d:
        if required:
            v.err(path, f"a key {key!r} (an array of globs; [\"*\"] for any)")
        return ()
    value = d[key]
    if not isinstance(value, list) or not all(isinstance(g, str) and g for g in value):
        v.err(f"{path}.{key}", "an array of non-empty strings")
        return ()
    return tuple(value)


def validate_roles(v: Any, raw: Any, path: str = "roles") -> dict[str, RoleConfig]:
    d = v.obj(raw, path, "an object of role name → role")
    out: dict[str, RoleConfig] = {}
    for name, item in (d or {}).items():
        rp = f"{path}.{name}"
        rd = v.section(item, rp, ROLE_KEYS)
        if rd is None:
            continue
        out[name] = RoleConfig(
            name=name,
            routes=glob_list(v, rd, "routes", rp, required=True),
            databases=glob_list(v, rd, "databases", rp, required=True),
            db_users=glob_list(v, rd, "db_users", rp, required=True),
            read_only=v.boolean(rd, "read_only", rp),
            deny_commands=glob_list(v, rd, "deny_commands", rp, required=False),
        )
    return out


def _matches(value: str | None, globs: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(value or "", g) for g in globs)


def command_matches(command: str, pattern: str) -> bool:
    """Case-insensitive glob on a command (``"DROP TABLE"``, ``"dropDatabase"``) or on its first word."""
    c, p = command.upper(), pattern.upper()
    return fnmatch.fnmatchcase(c, p) or fnmatch.fnmatchcase(c.split(" ", 1)[0], p)


@attrs.frozen
class Grant:
    """What one session may do, from its granting roles."""

    roles: tuple[str, ...] = ()
    read_only: bool = False
    deny_commands: tuple[str, ...] = ()
    databases: tuple[str, ...] = ("*",)
    restricted: bool = False  # RBAC applies (False: a legacy/unrestricted session)

    def denied_command(self, command: str) -> str | None:
        """The deny pattern ``command`` matches, or None."""
        for pattern in self.deny_commands:
            if command_matches(command, pattern):
                return pattern
        return None

    def allows_database(self, name: str) -> bool:
        """For protocols that name the database per command (Mongo): check each one."""
        return _matches(name, self.databases)

    @property
    def has_statement_rules(self) -> bool:
        return self.read_only or bool(self.deny_commands)

    def refusal(self, text: str, dialect: Dialect) -> Refusal | None:
        """The first reason ``text`` (one or more statements in ``dialect``) is refused, or None.

        Every reading the dialect gives is checked (``Dialect.variants``);
        within a statement a deny pattern is reported before read-only.
        """
        for statements in dialect.variants(text):
            for stmt in statements:
                refusal = self.statement_refusal(stmt, dialect)
                if refusal is not None:
                    return refusal
        return None

    def statement_refusal(self, stmt: Any, dialect: Dialect) -> Refusal | None:
        """Why one statement of ``dialect`` is refused, or None."""
        command = ""
        for c in dialect.commands(stmt):
            command = command or c
            pattern = self.denied_command(c)
            if pattern is not None:
                return Refusal("command_denied", c, pattern)
        if self.read_only:
            why = dialect.read_only_violation(stmt)
            if why is not None:
                return Refusal("read_only", command, why)
        return None


UNRESTRICTED = Grant()


class AccessPolicy:
    def __init__(self, roles: dict[str, RoleConfig] | None, *, enforced: bool) -> None:
        self.roles = roles or {}
        self.enforced = enforced

    def authorize(self, identity: Identity, *, route: str | None, database: str | None, db_user: str | None) -> Grant:
        """The session's Grant, or AccessDenied.  ``database=None`` defers the database check to ``Grant.allows_database``."""
        if not self.enforced:
            return UNRESTRICTED
        granting = []
        for name in identity.roles:
            role = self.roles.get(name)
            if role is None:
                continue
            if not _matches(route, role.routes):
                continue
            if database is not None and not _matches(database, role.databases):
                continue
            if db_user is not None and not _matches(db_user, role.db_users):
                continue
            granting.append(role)
        if not granting:
            what = f"route {route!r}" + (f", database {database!r}" if database is not None else "") + (f", database user {db_user!r}" if db_user is not None else "")
            roles = ", ".join(identity.roles) or "none"
            raise AccessDenied(f"no role of {identity.user!r} (roles: {roles}) allows {what}", reason="no_role_allows")
        deny: list[str] = []
        databases: list[str] = []
        for r in granting:
            deny.extend(p for p in r.deny_commands if p not in deny)
            databases.extend(g for g in r.databases if g not in databases)
        return Grant(
            roles=tuple(r.name for r in granting),
            read_only=all(r.read_only for r in granting),
            deny_commands=tuple(deny),
            databases=tuple(databases),
            restricted=True,
        )

