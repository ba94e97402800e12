"""What an identity may reach: RBAC roles, connection limits, statement classification.

Strategy.  Deny by default.  Roles in the config name the routes,
database names and database users they allow (globs) and may be
``read_only`` or deny command patterns.  An identity's roles come from its
token or its certificate mapping; the roles that match a connection's
(route, database, database user) are its *granting* roles, and they form one
``Grant`` for the session:

- allowed at all: at least one granting role (else ``AccessDenied``);
- read-only: only if *every* granting role is read-only (allows are a union);
- denied commands: the union of the granting roles' ``deny_commands`` (a
  deny always wins).

Engines get everything through ``services.access`` (an ``AccessControl``,
``None`` when the config has no ``identity``/``roles``/``limits``: then every
listener is anonymous and unrestricted, as before):

    acc = services.access.listener(listener.name)    # ListenerAccess
    acc.auth                 # identity.ClientAuthenticator: methods, tokens, SCRAM, mTLS
    grant = acc.authorize(identity, route=…, database=…, db_user=…)   # raises AccessDenied
    acc.admit(session)       # raises TooManyConnections; released by the server at session end
    grant.denied_command("DROP TABLE")  → the matching pattern or None
    audit_denial(session, exc, stage="connect")   # the db.session.access_denied event

Statement classification (``split_statements``) is a regex lexer that knows
just enough of SQL/CQL lexical structure — comments (PostgreSQL's nest),
quoted strings, ``E''`` strings, dollar quoting, quoted identifiers — to find
statement boundaries and keywords without being fooled by text inside
literals.  It never executes or fully parses anything: the protocol-specific
rules (e.g. what read-only means in Postgres) live in each engine.

Config (validated here, called from ``dbproxy.config``): root ``roles``,
``limits`` and listener ``auth`` (``identity`` in ``dbproxy.identity``).  An
``anonymous`` listener must be on a loopback address unless it says
``"i_know_this_is_open": true``.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from typing import Any, Iterable

import attrs

from .errors import AccessDenied
from .identity import ClientAuthenticator, IdentityConfig, TokenAuthority, validate_identity
from .session import Identity

CLIENT_AUTH_METHODS = ("token", "mtls", "anonymous")


# --------------------------------------------------------------------------- config


@attrs.frozen
class RoleConfig:
    name: str
    routes: tuple[str, ...]
    databases: tuple[str, ...]
    db_users: tuple[str, ...]
    read_only: bool = False
    deny_commands: tuple[str, ...] = ()


@attrs.frozen
class LimitsConfig:
    per_identity: int | None = None
    per_listener: int | None = None
    identities: dict = attrs.field(factory=dict)  # user -> limit
    listeners: dict = attrs.field(factory=dict)  # listener name -> limit


@attrs.frozen
class ListenerAuth:
    methods: tuple[str, ...]
    i_know_this_is_open: bool = False
    anonymous_roles: tuple[str, ...] = ()
    explicit: bool = True


ROLE_KEYS = {"routes", "databases", "db_users", "read_only", "deny_commands"}
LIMITS_KEYS = {"max_connections_per_identity", "max_connections_per_listener", "identities", "listeners"}
LISTENER_AUTH_KEYS = {"methods", "i_know_this_is_open", "anonymous_roles"}


def _globs(v: Any, d: dict, key: str, path: str, *, required: bool) -> tuple[str, ...]:
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
        rd = v.obj(item, rp)
        if rd is None:
            continue
        v.unknown_keys(rd, ROLE_KEYS, rp)
        out[name] = RoleConfig(
            name=name,
            routes=_globs(v, rd, "routes", rp, required=True),
            databases=_globs(v, rd, "databases", rp, required=True),
            db_users=_globs(v, rd, "db_users", rp, required=True),
            read_only=v.boolean(rd, "read_only", rp),
            deny_commands=_globs(v, rd, "deny_commands", rp, required=False),
        )
    return out


def validate_limits(v: Any, raw: Any, path: str = "limits") -> LimitsConfig | None:
    d = v.obj(raw, path)
    if d is None:
        return None
    v.unknown_keys(d, LIMITS_KEYS, path)
    maps = {}
    for key in ("identities", "listeners"):
        sub = d.get(key, {})
        sd = v.obj(sub, f"{path}.{key}", "an object of name → connection limit")
        maps[key] = {}
        for name in sd or {}:
            limit = v.integer(sd, name, f"{path}.{key}", minimum=1)
            if limit is not None:
                maps[key][name] = limit
    return LimitsConfig(
        per_identity=v.integer(d, "max_connections_per_identity", path, minimum=1),
        per_listener=v.integer(d, "max_connections_per_listener", path, minimum=1),
        identities=maps["identities"],
        listeners=maps["listeners"],
    )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _listener_auth(v: Any, listener_raw: dict, path: str, lc: Any, engine_cls: Any, identity: IdentityConfig | None, roles: dict | None) -> ListenerAuth | None:
    raw = listener_raw.get("auth")
    supported = tuple(getattr(engine_cls, "client_auth_methods", ("anonymous",))) if engine_cls else CLIENT_AUTH_METHODS
    # From the raw "tls" too: a missing CA file is reported there, not again as "mtls needs a CA".
    raw_tls = listener_raw.get("tls") if isinstance(listener_raw.get("tls"), dict) else {}
    has_client_ca = bool(lc.tls and lc.tls.client_ca_file) or "client_ca_file" in raw_tls
    ap = f"{path}.auth"
    if raw is None:
        if identity is None:
            auth = ListenerAuth(methods=("anonymous",), explicit=False)
        else:
            methods = []
            if identity.token is not None and "token" in supported:
                methods.append("token")
            if identity.mtls is not None and has_client_ca and "mtls" in supported:
                methods.append("mtls")
            if not methods:
                v.err(path, f"a key \"auth\": identity is configured, but no method of it applies to this {lc.protocol} listener "
                            f"(it supports {', '.join(supported)}; say {{\"methods\": [\"anonymous\"]}} to leave it open)")
                return None
            auth = ListenerAuth(methods=tuple(methods), explicit=False)
    else:
        d = v.obj(raw, ap)
        if d is None:
            return None
        v.unknown_keys(d, LISTENER_AUTH_KEYS, ap)
        methods_raw = d.get("methods")
        if not isinstance(methods_raw, list) or not methods_raw or not all(isinstance(m, str) for m in methods_raw):
            v.err(ap, f"a key \"methods\": a non-empty array of {', '.join(CLIENT_AUTH_METHODS)}")
            return None
        methods = []
        for i, m in enumerate(methods_raw):
            mp = f"{ap}.methods[{i}]"
            if m not in CLIENT_AUTH_METHODS:
                v.err(mp, f"one of {', '.join(CLIENT_AUTH_METHODS)}, got {m!r}")
            elif m not in supported:
                v.err(mp, f"a method the {lc.protocol} engine supports ({', '.join(supported)}), got {m!r}")
            elif m in methods:
                v.err(mp, f"each method once, {m!r} is listed twice")
            else:
                methods.append(m)
        if "token" in methods and (identity is None or identity.token is None):
            v.err(ap, "identity.token to be configured for method \"token\"")
        if "mtls" in methods:
            if identity is None or identity.mtls is None:
                v.err(ap, "identity.mtls to be configured for method \"mtls\"")
            if not has_client_ca:
                v.err(ap, f"{path}.tls.client_ca_file for method \"mtls\" (the CA that signs client certificates)")
        anon_roles = _globs(v, d, "anonymous_roles", ap, required=False)
        if anon_roles and "anonymous" not in methods:
            v.err(f"{ap}.anonymous_roles", "method \"anonymous\" in \"methods\" (these roles are for anonymous clients)")
        for i, r in enumerate(anon_roles):
            if roles is None or r not in roles:
                v.err(f"{ap}.anonymous_roles[{i}]", f"a role defined in \"roles\", {r!r} is not")
        auth = ListenerAuth(
            methods=tuple(methods),
            i_know_this_is_open=v.boolean(d, "i_know_this_is_open", ap),
            anonymous_roles=anon_roles,
        )
    if auth.methods == ("anonymous",) and roles is not None and not auth.anonymous_roles:
        v.err(ap if raw is not None else path,
              "\"anonymous_roles\" for an anonymous-only listener when \"roles\" are configured "
              "(deny by default: without them every connection is refused)")
    if "anonymous" in auth.methods and not is_loopback(lc.host) and not auth.i_know_this_is_open:
        v.err(
            f"{path}.listen",
            f"a loopback address for an anonymous listener: anyone who reaches {lc.host}:{lc.port} would use the proxy's "
            "database credentials (configure \"identity\" and auth methods, or set "
            "\"auth\": {\"methods\": [\"anonymous\"], \"i_know_this_is_open\": true})",
        )
    return auth


def validate_access(v: Any, root: dict, listeners: list[tuple[int, dict, Any]], registry: Any) -> tuple[Any, Any, Any, dict]:
    """Validate ``identity``, ``roles``, ``limits`` and every listener's ``auth``.

    ``listeners``: (index, raw dict, ListenerConfig) of the listeners that
    validated.  Returns (identity, roles or None, limits, {listener: ListenerAuth}).
    """
    identity = validate_identity(v, root["identity"]) if "identity" in root else None
    roles = validate_roles(v, root["roles"]) if "roles" in root else None
    limits = validate_limits(v, root["limits"]) if "limits" in root else None
    if identity is not None and identity.mtls is not None:
        for pattern, granted in identity.mtls.users:
            for r in granted:
                if roles is None or r not in roles:
                    v.err(f"identity.mtls.users.{pattern}", f"roles defined in \"roles\", {r!r} is not")
    names = {lc.name for _, _, lc in listeners}
    if limits is not None:
        for name in limits.listeners:
            if name not in names:
                v.err(f"limits.listeners.{name}", f"the name of a listener, {name!r} is none")
    auths: dict[str, ListenerAuth] = {}
    for i, item, lc in listeners:
        engine_cls = registry.get(lc.protocol) if lc.protocol in registry.names() else None
        auth = _listener_auth(v, item, f"listeners[{i}]", lc, engine_cls, identity, roles)
        if auth is not None:
            auths[lc.name] = auth
    return identity, roles, limits, auths


# --------------------------------------------------------------------------- policy


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


UNRESTRICTED = Grant()


class TooManyConnections(AccessDenied):
    def __init__(self, message: str, *, scope: str) -> None:
        super().__init__(message, reason=f"too_many_connections_{scope}")
        self.scope = scope  # "listener" or "identity"


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


class ConnectionLimits:
    """Live sessions per listener and per identity (user name).  Single trio thread: no locks."""

    def __init__(self, cfg: LimitsConfig | None) -> None:
        self.cfg = cfg or LimitsConfig()
        self.by_listener: dict[str, int] = {}
        self.by_identity: dict[str, int] = {}
        self._admitted: dict[str, tuple[str, str]] = {}

    def admit(self, session: Any) -> None:
        if session.id in self._admitted:
            return
        listener, user = session.listener, session.identity.user
        lim = self.cfg.listeners.get(listener, self.cfg.per_listener)
        if lim is not None and self.by_listener.get(listener, 0) >= lim:
            raise TooManyConnections(f"listener {listener!r} has {lim} connections (its limit)", scope="listener")
        lim = self.cfg.identities.get(user, self.cfg.per_identity)
        if lim is not None and self.by_identity.get(user, 0) >= lim:
            raise TooManyConnections(f"{user!r} has {lim} connections (the limit per identity)", scope="identity")
        self.by_listener[listener] = self.by_listener.get(listener, 0) + 1
        self.by_identity[user] = self.by_identity.get(user, 0) + 1
        self._admitted[session.id] = (listener, user)

    def release(self, session: Any) -> None:
        found = self._admitted.pop(session.id, None)
        if found is None:
            return
        listener, user = found
        self.by_listener[listener] -= 1
        self.by_identity[user] -= 1


class ListenerAccess:
    """One listener's view: its authenticator, the policy, the limits."""

    def __init__(self, name: str, auth: ClientAuthenticator, policy: AccessPolicy, limits: ConnectionLimits) -> None:
        self.name = name
        self.auth = auth
        self.policy = policy
        self.limits = limits

    @property
    def methods(self) -> tuple[str, ...]:
        return self.auth.methods

    def authorize(self, identity: Identity, *, route: str | None, database: str | None, db_user: str | None) -> Grant:
        return self.policy.authorize(identity, route=route, database=database, db_user=db_user)

    def admit(self, session: Any) -> None:
        self.limits.admit(session)

    def release(self, session: Any) -> None:
        self.limits.release(session)


class AccessControl:
    """``services.access``: one per proxy process."""

    def __init__(self, config: Any) -> None:
        identity = config.identity
        self.authority = TokenAuthority(identity.token) if identity is not None and identity.token is not None else None
        self.policy = AccessPolicy(config.roles, enforced=identity is not None or config.roles is not None)
        self.limits = ConnectionLimits(config.limits)
        self._listeners: dict[str, ListenerAccess] = {}
        for lc in config.listeners:
            la = lc.auth or ListenerAuth(methods=("anonymous",), explicit=False)
            auth = ClientAuthenticator(
                la.methods,
                authority=self.authority,
                mtls=identity.mtls if identity is not None else None,
                anonymous_roles=la.anonymous_roles,
            )
            self._listeners[lc.name] = ListenerAccess(lc.name, auth, self.policy, self.limits)

    def listener(self, name: str) -> ListenerAccess:
        return self._listeners[name]

    def release(self, session: Any) -> None:
        self.limits.release(session)


def build_access(config: Any) -> AccessControl | None:
    """None when the config says nothing about identity, roles or limits (every listener anonymous, unrestricted)."""
    if config.identity is None and config.roles is None and config.limits is None:
        return None
    return AccessControl(config)


def audit_denial(session: Any, exc: AccessDenied | str, *, stage: str, **fields: Any) -> dict | None:
    """Emit ``db.session.access_denied`` (success false) with the reason; never secrets."""
    from audit import events as ev

    if session.audit is None:
        return None
    if isinstance(exc, AccessDenied):
        reason, error = exc.reason, str(exc)
        token_id = getattr(exc, "token_id", None)
        if token_id and "attempted_token_id" not in fields:
            fields["attempted_token_id"] = token_id
    else:
        reason, error = exc, exc
    error = fields.pop("error", error)
    return session.audit.emit(ev.ACCESS_DENIED, success=False, stage=stage, reason=reason, error=error, **fields)


# --------------------------------------------------------------------------- statement lexer


@attrs.frozen
class Token:
    """word (value upper-cased), ident (quoted, as written), uident (U&"…").

    CQL only: ``dot`` (a ``.`` between tokens, so ``ks.table`` is readable)
    and ``sep`` (anything else that is not blank — literals, numbers,
    punctuation — so that tokens are adjacent only when nothing but blanks
    and comments stood between them, as in the CQL grammar).  Literals and
    operators themselves are never kept.
    """

    kind: str
    value: str


_SEP = Token("sep", "")
_DOT = Token("dot", ".")


@attrs.frozen
class Statement:
    tokens: tuple[Token, ...]

    @property
    def words(self) -> list[str]:
        return [t.value for t in self.tokens if t.kind == "word"]

    def names(self) -> set[str]:
        """Every identifier and keyword, lower-cased (quoted ones too: GUC and function lookups ignore case)."""
        return {t.value.lower() for t in self.tokens if t.kind in ("word", "ident")}

    @property
    def command(self) -> str:
        """``SELECT``, ``DROP TABLE``, ``CREATE INDEX``, ``ALTER SYSTEM`` … ('' for an empty statement)."""
        words = self.words
        if not words:
            return ""
        head = words[0]
        if head in _OBJECT_VERBS:
            rest = [w for w in words[1:8] if w not in _MODIFIERS]
            if rest:
                obj = rest[0]
                if obj in _TWO_WORD_OBJECTS and len(rest) > 1:
                    obj = f"{obj} {rest[1]}"
                return f"{head} {obj}"
        return head

    def commands(self) -> list[str]:
        """The command plus data-modifying commands nested in it (``WITH … DELETE``, ``EXPLAIN ANALYZE UPDATE``)."""
        main = self.command
        out = [main] if main else []
        if main.split(" ", 1)[0] in _NESTING_HEADS:
            for w in self.words[1:]:
                if w in _NESTED_COMMANDS and w not in out:
                    out.append(w)
        return out


_OBJECT_VERBS = frozenset({"CREATE", "DROP", "ALTER", "COMMENT", "SECURITY"})
_MODIFIERS = frozenset({"OR", "REPLACE", "TEMP", "TEMPORARY", "UNLOGGED", "GLOBAL", "LOCAL", "UNIQUE", "TRUSTED", "PROCEDURAL", "RECURSIVE", "DEFAULT", "CONSTRAINT", "CUSTOM", "ON"})
_TWO_WORD_OBJECTS = frozenset({"MATERIALIZED", "FOREIGN", "EVENT", "TEXT", "ACCESS", "USER"})
# BEGIN: a CQL ``BEGIN BATCH … APPLY BATCH`` is one statement (its children are
# nested); a PostgreSQL BEGIN never contains these words.
_NESTING_HEADS = frozenset({"WITH", "EXPLAIN", "PREPARE", "DECLARE", "COPY", "CREATE", "BEGIN"})
_NESTED_COMMANDS = frozenset({"INSERT", "UPDATE", "DELETE", "MERGE", "TRUNCATE", "DROP"})


def _token_regex(dialect: str, backslash_strings: bool = False) -> re.Pattern:
    if dialect == "cql":
        comment = r"--[^\n]*|//[^\n]*"
        prefixed = r"| (?P<dollar>\$\$)"
        # "." is a token of its own in CQL (keyspace.table), except before a digit (1.5, .5)
        run = r"[\s0-9,+*=<>!%^|~#@?:\[\]{}&()]+|\$\d+|\.(?=[0-9])"
    else:
        run = r"[\s0-9,.+*=<>!%^|~#@?:\[\]{}&()]+|\$\d+"
        comment = r"--[^\n]*"
        prefixed = r"""
        | (?P<estr>[eE]')
        | (?P<ustr>[uU]&')
        | (?P<uident>[uU]&")
        | (?P<pstr>[bBxXnN]')
        | (?P<dollar>\$(?:[A-Za-z_\u0080-\U0010ffff][A-Za-z_0-9\u0080-\U0010ffff]*)?\$)
        """
    # Unrolled-loop forms ('[^']*(?:''[^']*)*'): the engine scans runs, not one alternation per character.
    string = r"'[^'\\]*(?:(?:\\.|'')[^'\\]*)*'" if backslash_strings else r"'[^']*(?:''[^']*)*'"
    # One match for a whole run of what the rules never read: whitespace, digits, operators,
    # parentheses, parameters and complete plain string literals (a multi-row VALUES list is
    # a handful of matches).  "-" and "/" stay out (they may open a comment); letters, "$",
    # '"' and ";" start the other tokens; an unterminated literal falls to (?P<str>).
    return re.compile(
        rf"""
          (?P<ws>(?:{run}|{string})+)
        | (?P<lcomment>{comment})
        | (?P<bcomment>/\*)
        {prefixed}
        | (?P<str>')
        | (?P<qident>")
        | (?P<word>[A-Za-z_\u0080-\U0010ffff][A-Za-z_0-9$\u0080-\U0010ffff]*)
        | (?P<semi>;)
        | (?P<op>.)
        """,
        re.X | re.S,
    )


_REGEX = {
    ("postgres", False): _token_regex("postgres"),
    ("postgres", True): _token_regex("postgres", True),
    ("cql", False): _token_regex("cql"),
}
_STD_STRING = re.compile(r"[^']*(?:''[^']*)*'", re.S)
_BACKSLASH_STRING = re.compile(r"[^'\\]*(?:(?:\\.|'')[^'\\]*)*'", re.S)
_QIDENT = re.compile(r'[^"]*(?:""[^"]*)*"', re.S)
_COMMENT_EDGE = re.compile(r"/\*|\*/")


def _skip_nested_comment(text: str, pos: int, nested: bool) -> int:
    """``pos`` is just after ``/*``; return the position after the matching ``*/`` (or the end)."""
    if not nested:
        end = text.find("*/", pos)
        return len(text) if end < 0 else end + 2
    depth = 1
    for m in _COMMENT_EDGE.finditer(text, pos):
        depth += 1 if m.group() == "/*" else -1
        if depth == 0:
            return m.end()
    return len(text)


def split_statements(text: str, dialect: str = "postgres", *, backslash_strings: bool = False) -> list[Statement]:
    """Statements of ``text`` (split at ``;`` outside literals/comments), each as its word tokens.

    Only keywords and identifiers are kept: a 1.5 MB multi-row INSERT lexes
    in milliseconds, because runs of literals, digits and punctuation are one
    regex match each.

    ``backslash_strings``: lex plain ``'…'`` literals with backslash escapes
    (PostgreSQL with ``standard_conforming_strings = off``).  A policy that
    must not be fooled lexes both ways (``statement_variants``).

    CQL: ``BEGIN [UNLOGGED|COUNTER] BATCH … APPLY BATCH`` is one statement
    (the ``;`` between its children do not end it: CQL grammar
    ``batchStatement``), so the writes inside stay visible as nested
    commands; ``dot`` and ``sep`` tokens keep qualified names readable (see
    ``Token``).
    """
    regex = _REGEX[(dialect, backslash_strings and dialect == "postgres")]
    plain = _BACKSLASH_STRING if backslash_strings else _STD_STRING
    nested = dialect == "postgres"
    cql = dialect == "cql"
    out: list[Statement] = []
    cur: list[Token] = []
    words = 0  # CQL: words in ``cur`` so far
    batch = 0  # CQL: 0 no batch, 1 inside BEGIN … BATCH, 2 after APPLY inside it, 3 applied
    pos, n = 0, len(text)
    while pos < n:
        m = regex.match(text, pos)
        assert m is not None  # (?P<op>.) matches anything
        kind = m.lastgroup
        end = m.end()
        if kind == "word":
            word = m.group().upper()
            if cql:
                if batch == 0:
                    if word == "BATCH" and words in (1, 2) and cur[0].value == "BEGIN":
                        batch = 1
                elif batch == 1:
                    if word == "APPLY":
                        batch = 2
                elif batch == 2:
                    batch = 3 if word == "BATCH" else 1
                words += 1
            cur.append(Token("word", word))
        elif kind == "semi":
            if cql and batch in (1, 2):
                cur.append(_SEP)
            else:
                if cur:
                    out.append(Statement(tuple(cur)))
                cur = []
                words = batch = 0
        elif kind == "bcomment":
            end = _skip_nested_comment(text, end, nested)
        elif kind in ("str", "pstr", "ustr", "estr"):
            body = (_BACKSLASH_STRING if kind == "estr" else plain).match(text, end)
            end = body.end() if body else n
            if cql:
                cur.append(_SEP)
        elif kind in ("qident", "uident"):
            body = _QIDENT.match(text, end)
            end = body.end() if body else n
            value = text[m.end(): end - 1].replace('""', '"') if body else text[m.end():]
            cur.append(Token("ident" if kind == "qident" else "uident", value))
        elif kind == "dollar":
            tag = m.group()
            close = text.find(tag, end)
            end = n if close < 0 else close + len(tag)
            if cql:
                cur.append(_SEP)
        elif cql:
            if kind == "op":
                cur.append(_DOT if m.group() == "." else _SEP)
            elif kind == "ws" and not m.group().isspace():
                cur.append(_SEP)
        # otherwise ws, comments, operators: nothing the rules read
        pos = end
    if cur:
        out.append(Statement(tuple(cur)))
    return out


def statement_variants(text: str, dialect: str = "postgres") -> list[list[Statement]]:
    """How ``text`` may lex: with standard strings, and (if it has a backslash) with backslash escapes too.

    A client can switch ``standard_conforming_strings`` off in the same
    pipeline, and the two readings can disagree on where a literal ends;
    checking both means no reading hides a statement from the policy.
    """
    variants = [split_statements(text, dialect)]
    if dialect == "postgres" and "\\" in text:
        variants.append(split_statements(text, dialect, backslash_strings=True))
    return variants
