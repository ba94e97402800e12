"""Roles and grants: which routes, databases and database users an identity may reach, and what it may run.

Strategy.  Deny by default.  Roles in the config (root ``roles``) name the
routes, database names and database users they allow (globs) and may be
``read_only`` or deny command patterns.  Terminal sessions (the ``terminal``
family: SSH) are granted by their own keys, ``targets`` (hosts) and
``logins`` (accounts on them), never by ``databases``/``db_users``: a role
grants databases, terminals or both, and one that names neither kind is a
config error.  ``port_forwarding`` (``"local"``: direct-tcpip, i.e. ``ssh
-L``/``-D``/``-W``; ``"remote"``: tcpip-forward, ``ssh -R``) is off unless a
granting role names it.  BMC sessions (the ``bmc`` family: Redfish, IPMI) are
granted by ``bmcs`` (globs on the BMC targets), desktop sessions (the
``desktop`` family: VNC) by ``desktops`` (globs on the desktop targets; a
terminal role's ``targets`` never grant a screen), and what may be done there by
a protocol's own key (``redfish``: rules on method, path and action),
declared and validated by its engine (``role_keys`` / ``validate_role_key``,
handed in by ``dbproxy.access``); a granting role's value of such a key
reaches the engine through ``Grant.policy(key)``.  Desktop sessions (the
``desktop`` family: RDP) are granted by ``desktops`` (globs on the desktop
targets; the login happens inside the protocol's own TLS, nothing to grant
"as whom").  ``scopes`` (names, not
globs) are what command templates ask of a caller (``dbproxy.commands``).
An identity's roles come from its
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

ROLE_KEYS = {"routes", "databases", "db_users", "targets", "logins", "read_only", "deny_commands", "port_forwarding",
             "bmcs", "desktops", "scopes"}
FORWARDING_KINDS = ("local", "remote")
# Which pair of role keys grants a session of each family (what it reaches, as whom).
FAMILY_KEYS = {"database": ("databases", "db_users"), "terminal": ("targets", "logins"), "bmc": ("bmcs",),
               "desktop": ("desktops",)}


@attrs.frozen
class RoleConfig:
    name: str
    routes: tuple[str, ...]
    databases: tuple[str, ...]
    db_users: tuple[str, ...]
    read_only: bool = False
    deny_commands: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    logins: tuple[str, ...] = ()
    port_forwarding: tuple[str, ...] = ()
    bmcs: tuple[str, ...] = ()
    desktops: tuple[str, ...] = ()
    # Engine-owned keys (``redfish``): (key, what the engine's validator made of it).
    policies: tuple[tuple[str, Any], ...] = ()
    # Command templates (dbproxy.commands): a template runs only for a caller whose roles carry all its scopes.
    scopes: tuple[str, ...] = ()

    def grants(self, family: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(what, as whom) globs this role grants for a session family (empty: none)."""
        if family == "terminal":
            return self.targets, self.logins
        if family == "bmc":
            return self.bmcs, ()  # the BMC login is the proxy's: nothing to grant "as whom"
        if family == "desktop":
            return self.desktops, ()  # so is the desktop's
        return self.databases, self.db_users


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


def validate_roles(v: Any, raw: Any, path: str = "roles", engine_keys: dict | None = None) -> dict[str, RoleConfig]:
    """``engine_keys``: role key → ``validate(v, value, path)`` of the engines that own one (``redfish``)."""
    engine_keys = engine_keys or {}
    d = v.obj(raw, path, "an object of role name → role")
    out: dict[str, RoleConfig] = {}
    for name, item in (d or {}).items():
        rp = f"{path}.{name}"
        rd = v.section(item, rp, ROLE_KEYS | set(engine_keys))
        if rd is None:
            continue
        present = [pair for pair in FAMILY_KEYS.values() if any(k in rd for k in pair)]
        if not present:
            v.err(rp, 'what the role grants: "databases" and "db_users" (database sessions) and/or "targets" and '
                      '"logins" (terminal sessions) and/or "bmcs" (BMC sessions) and/or "desktops" (desktop '
                      'sessions), arrays of globs')
        policies = []
        for key, validate in engine_keys.items():
            if key in rd:
                requires = getattr(validate, "requires", "bmcs")
                if requires not in rd:
                    v.err(rp, f'a key "{requires}" (the targets the role\'s "{key}" rules apply to)')
                value = validate(v, rd[key], f"{rp}.{key}")
                if value is not None:
                    policies.append((key, value))
        grants: dict[str, tuple[str, ...]] = {}
        for pair in present:
            for key in pair:  # a pair is all or nothing: half a grant is a mistake, not a wildcard
                grants[key] = glob_list(v, rd, key, rp, required=True)
        forwarding = glob_list(v, rd, "port_forwarding", rp, required=False)
        for i, kind in enumerate(forwarding):
            if kind not in FORWARDING_KINDS:
                v.err(f"{rp}.port_forwarding[{i}]", f"one of {', '.join(FORWARDING_KINDS)}, got {kind!r}")
        out[name] = RoleConfig(
            name=name,
            routes=glob_list(v, rd, "routes", rp, required=True),
            databases=grants.get("databases", ()),
            db_users=grants.get("db_users", ()),
            targets=grants.get("targets", ()),
            logins=grants.get("logins", ()),
            read_only=v.boolean(rd, "read_only", rp),
            deny_commands=glob_list(v, rd, "deny_commands", rp, required=False),
            port_forwarding=tuple(k for k in forwarding if k in FORWARDING_KINDS),
            bmcs=grants.get("bmcs", ()),
            desktops=grants.get("desktops", ()),
            policies=tuple(policies),
            scopes=glob_list(v, rd, "scopes", rp, required=False),
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
    # Terminal sessions: the forwarding kinds some granting role allows (``FORWARDING_KINDS``).
    port_forwarding: tuple[str, ...] = ()
    # Engine-owned role keys of the granting roles: (key, (one value per granting role that has it)).
    policies: tuple[tuple[str, tuple], ...] = ()

    def policy(self, key: str) -> tuple | None:
        """The granting roles' values of an engine-owned role key (``redfish``), one per role that
        names it; None for an unrestricted session (no RBAC configured)."""
        if not self.restricted:
            return None
        for name, values in self.policies:
            if name == key:
                return values
        return ()

    def allows_forwarding(self, kind: str) -> bool:
        """Deny by default: an unrestricted session (no RBAC configured) forwards nothing either."""
        return kind in self.port_forwarding

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

    def authorize(self, identity: Identity, *, route: str | None, database: str | None, db_user: str | None,
                  family: str = "database") -> Grant:
        """The session's Grant, or AccessDenied.  ``database=None`` defers the database check to ``Grant.allows_database``.

        ``family``: a terminal session's ``database``/``db_user`` are its target and login, checked
        against the roles' ``targets``/``logins`` (a role naming none grants no terminal)."""
        if not self.enforced:
            return UNRESTRICTED
        granting = []
        for name in identity.roles:
            role = self.roles.get(name)
            if role is None:
                continue
            if not _matches(route, role.routes):
                continue
            targets, logins = role.grants(family)
            if not targets:
                continue
            if database is not None and not _matches(database, targets):
                continue
            if db_user is not None and not _matches(db_user, logins):
                continue
            granting.append(role)
        if not granting:
            names = {"terminal": ("target", "login"), "bmc": ("BMC", "login"),
                     "desktop": ("desktop", "login")}.get(family, ("database", "database user"))
            what = f"route {route!r}" + (f", {names[0]} {database!r}" if database is not None else "") + (f", {names[1]} {db_user!r}" if db_user is not None else "")
            roles = ", ".join(identity.roles) or "none"
            raise AccessDenied(f"no role of {identity.user!r} (roles: {roles}) allows {what}", reason="no_role_allows")
        deny: list[str] = []
        databases: list[str] = []
        forwarding: list[str] = []
        policies: dict[str, list] = {}
        for r in granting:
            for key, value in r.policies:
                policies.setdefault(key, []).append(value)
            deny.extend(p for p in r.deny_commands if p not in deny)
            databases.extend(g for g in r.grants(family)[0] if g not in databases)
            forwarding.extend(k for k in r.port_forwarding if k not in forwarding)
        return Grant(
            roles=tuple(r.name for r in granting),
            read_only=all(r.read_only for r in granting),
            deny_commands=tuple(deny),
            databases=tuple(databases),
            restricted=True,
            port_forwarding=tuple(forwarding),
            policies=tuple((k, tuple(vals)) for k, vals in policies.items()),
        )

