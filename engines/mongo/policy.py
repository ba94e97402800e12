"""Who may run what on a Mongo connection: establishment, RBAC per command, connection limits.

Strategy.  A Mongo client authenticates *after* the connection opens (hello,
then saslStart …, or speculatively inside hello), and drivers keep separate
monitoring connections that never authenticate.  So with identity and
access configured (``services.access``) a connection has two phases:

1. **Handshake.**  Only ``HANDSHAKE_COMMANDS`` run (hello/isMaster, ping,
   buildInfo, connectionStatus, endSessions, the authentication commands) —
   what mongod itself allows unauthenticated.  Anything else is refused with ``ok: 0``
   code 13 Unauthorized ("command … requires authentication") and audited
   as ``db.session.access_denied``; it never reaches the backend.
2. **Established** (``MongoAccess.establish``), once an identity is known:
   a successful token login (SCRAM-SHA-256 / SCRAM-SHA-1 / PLAIN) or
   MONGODB-X509, or — for identities known without an exchange (a verified
   client certificate on an ``mtls`` listener, or ``anonymous`` where the
   listener allows it) — the first command beyond the handshake.  Then the
   route is authorized (``ListenerAccess.authorize``: route and database
   user; the database is checked per command, since Mongo names it in every
   command's ``$db``), the connection takes a limit slot (``admit``), the
   identity is set on the session and ``db.session.start`` is emitted — so
   a session's first event already carries user, roles, auth method and
   token id, and monitoring connections never take a slot.  A refused
   authorization answers code 13 and the connection stays unauthenticated
   (the client may log in as someone else); too many connections answers
   code 13 with "too many connections" and closes it.  One connection, one
   identity: later login attempts are refused.

Per command, once established, ``check_command`` with the identity's
``Grant`` *for the database the command names* (``ListenerAccess.authorize``
with that database, cached per session — so, as in Postgres, only the roles
that allow that database count, e.g. a read-only role for ``app`` plus a
writer role for ``app_*`` is read-only on ``app``):

* ``$db`` (and the databases a command writes to or reads from by name:
  ``$out``/``$merge`` targets, ``$lookup``/``$graphLookup`` ``from: {db}``,
  ``renameCollection``/``to``, ``bulkWrite`` ``nsInfo``, ``mapReduce``
  ``out.db``) must be allowed by some role; a command touching several
  databases is held to the strictest of their grants;
  ``DATABASE_NEUTRAL`` commands (handshake, ``endSessions``,
  ``atlasVersion``) are exempt.  So, as with mongod, a role without ``admin``
  sees mongosh's start-up probes on ``admin`` (``getParameter``, an
  ``aggregate`` on ``admin.atlascli``) refused — and audited; mongosh
  carries on.
* read-only grants run only ``READ_COMMANDS``; ``aggregate`` without
  ``$out``/``$merge`` anywhere in its pipeline, ``mapReduce`` only with
  ``out: {inline: 1}``, ``explain`` only of a command that is itself allowed.
* ``deny_commands`` globs match the command name, the command inside
  ``explain``, and the names of ``$out``/``$merge`` stages (case-insensitive,
  ``dbproxy.roles.command_matches``): ``["dropDatabase", "drop*", "$out"]``.

A refused command is answered ``ok: 0`` code 13 (``not authorized on <db> to
execute command <name> (dbproxy: why)``, mongod's wording), audited as a
query, a ``db.session.access_denied`` and a failed result, and never
forwarded; the session continues.  A refused fire-and-forget request
(OP_MSG moreToCome) is dropped, as mongod would not answer it either.

Audit of connections that never establish: their handshake commands are not
recorded one by one (a driver's monitor sends a hello every 10 s); instead
the connection is recorded once, when it closes, as
``db.session.mongo.handshake_only`` with counts per command, failed logins
and denials (each of which was also an ``access_denied`` event).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Mapping

import attrs

from dbproxy.access import audit_denial
from dbproxy.errors import AccessDenied
from dbproxy.identity import AuthFailed
from dbproxy.limits import TooManyConnections
from dbproxy.roles import Grant
from dbproxy.session import Identity

from .clientauth import AUTH_COMMANDS

log = logging.getLogger("dbproxy.mongo")

UNAUTHORIZED = 13

#: What runs before a connection is established (mongod: commands whose requiresAuth() is false).
#: ``connectionStatus`` and, before establishment, ``endSessions`` (a driver closing a client
#: that never logged in) are answered by the proxy itself.
HANDSHAKE_COMMANDS = frozenset({
    "hello", "isMaster", "ismaster", "ping", "buildInfo", "buildinfo", "connectionStatus", "endSessions",
}) | AUTH_COMMANDS
#: Not subject to the database check: they touch no data of the database they name.
DATABASE_NEUTRAL = HANDSHAKE_COMMANDS | {"atlasVersion"}
#: What a read-only grant may run (the first four are checked further, see ``read_only_violation``).
READ_COMMANDS = frozenset({
    "find", "aggregate", "count", "distinct", "mapReduce", "explain",
    "getMore", "killCursors",
    "listCollections", "listIndexes", "listDatabases",
    "dbStats", "collStats", "dataSize", "dbHash",
    "serverStatus", "hostInfo", "getCmdLineOpts", "getParameter", "getLog", "listCommands",
    "whatsmyuri", "features", "atlasVersion", "getFreeMonitoringStatus", "lockInfo",
    "endSessions", "startSession", "refreshSessions", "commitTransaction", "abortTransaction",
    "getLastError",
}) | HANDSHAKE_COMMANDS
WRITE_STAGES = ("$out", "$merge")

#: The identity of a connection before it is established.
PENDING = Identity(user="unauthenticated", roles=(), method="none")


@attrs.frozen
class Denial:
    reason: str  # audit code: database_not_allowed / read_only / command_denied
    why: str  # the dbproxy part of the client's message
    command: str


@attrs.frozen
class Refusal:
    """The answer to a request the session refuses before or while establishing."""

    message: str
    reason: str
    close: bool = False
    code: int = UNAUTHORIZED


# --------------------------------------------------------------------------- command inspection


def _pipeline_stages(pipeline: Any, depth: int = 0):
    """Every stage of an aggregation pipeline, including sub-pipelines ($facet, $lookup, $unionWith)."""
    if not isinstance(pipeline, list) or depth > 8:
        return
    for stage in pipeline:
        if not isinstance(stage, Mapping):
            continue
        for key, spec in stage.items():
            yield key, spec
            if not isinstance(spec, Mapping):
                continue
            if key == "$facet":
                for sub in spec.values():
                    yield from _pipeline_stages(sub, depth + 1)
            elif key in ("$lookup", "$unionWith"):
                yield from _pipeline_stages(spec.get("pipeline"), depth + 1)


def _ns_db(ns: Any) -> str | None:
    return ns.partition(".")[0] if isinstance(ns, str) and "." in ns else None


def _target_db(spec: Any) -> str | None:
    """``{db: …, coll: …}`` targets ($out, $merge.into, $lookup.from)."""
    if isinstance(spec, Mapping):
        db = spec.get("db")
        return db if isinstance(db, str) else None
    return None


def referenced_databases(name: str, body: Mapping[str, Any]) -> set[str]:
    """Databases a command names besides its ``$db``."""
    out: set[str] = set()
    if name == "aggregate":
        pipelines = [body.get("pipeline")]
    elif name == "explain":
        inner = body.get("explain")
        if isinstance(inner, Mapping):
            inner_name = next(iter(inner), None)
            if isinstance(inner_name, str) and inner_name != "explain":
                out |= referenced_databases(inner_name, inner)
        return out
    else:
        pipelines = []
    for pipeline in pipelines:
        for key, spec in _pipeline_stages(pipeline):
            if key == "$out":
                db = _target_db(spec)
            elif key == "$merge":
                db = _target_db(spec.get("into")) if isinstance(spec, Mapping) else None
            elif key in ("$lookup", "$graphLookup"):
                db = _target_db(spec.get("from")) if isinstance(spec, Mapping) else None
            else:
                db = None
            if db:
                out.add(db)
    if name == "renameCollection":
        for key in ("renameCollection", "to"):
            db = _ns_db(body.get(key))
            if db:
                out.add(db)
    elif name == "bulkWrite":
        ns_info = body.get("nsInfo")
        if isinstance(ns_info, list):
            for item in ns_info:
                db = _ns_db(item.get("ns")) if isinstance(item, Mapping) else None
                if db:
                    out.add(db)
    elif name == "mapReduce":
        db = _target_db(body.get("out"))
        if db:
            out.add(db)
    return out


def command_names(name: str, body: Mapping[str, Any]) -> list[str]:
    """What ``deny_commands`` patterns are matched against: the command, explain's inner command, write stages."""
    names = [name]
    if name == "explain":
        inner = body.get("explain")
        if isinstance(inner, Mapping):
            inner_name = next(iter(inner), None)
            if isinstance(inner_name, str) and inner_name != "explain":
                names += command_names(inner_name, inner)
    elif name == "aggregate":
        for key, _spec in _pipeline_stages(body.get("pipeline")):
            if key in WRITE_STAGES and key not in names:
                names.append(key)
    return names


def read_only_violation(name: str, body: Mapping[str, Any]) -> str | None:
    """Why ``name`` may not run under a read-only grant, or None."""
    if name not in READ_COMMANDS:
        return f"{name} is not allowed for a read-only role"
    if name == "aggregate":
        for key, _spec in _pipeline_stages(body.get("pipeline")):
            if key in WRITE_STAGES:
                return f"aggregate with {key} is not allowed for a read-only role"
    elif name == "mapReduce":
        out = body.get("out")
        if not (isinstance(out, Mapping) and out.get("inline")):
            return "mapReduce with an output collection is not allowed for a read-only role"
    elif name == "explain":
        inner = body.get("explain")
        inner_name = next(iter(inner), None) if isinstance(inner, Mapping) else None
        if not isinstance(inner_name, str) or inner_name == "explain":
            return "explain of this command is not allowed for a read-only role"
        why = read_only_violation(inner_name, inner)
        if why is not None:
            return f"explain of {why}"
    return None


def check_command(session_grant: Grant, grant_for: Any, name: str, db: str | None, body: Mapping[str, Any]) -> Denial | None:
    """The first reason this command is refused, or None.

    ``grant_for(db)`` is the identity's ``Grant`` for one database (the roles
    that allow the route, the database user *and that database*), or None
    when no role allows it — the same per-database grant Postgres computes at
    connect.  A command touching several databases is held to the strictest:
    every one must be allowed, the deny patterns of all apply, and it is
    read-only if any of them is.  ``DATABASE_NEUTRAL`` commands use
    ``session_grant`` (the roles that allow the route and database user).
    """
    if name in DATABASE_NEUTRAL:
        grants = [session_grant]
    else:
        if db is None:
            return Denial("database_not_allowed", "the command names no database ($db)", name)
        grants = []
        for d in (db, *sorted(referenced_databases(name, body) - {db})):
            g = grant_for(d)
            if g is None:
                return Denial("database_not_allowed", f"your roles do not allow database {d!r}", name)
            grants.append(g)
    for command in command_names(name, body):
        for g in grants:
            pattern = g.denied_command(command)
            if pattern is not None:
                return Denial("command_denied", f"{command} is denied by role policy {pattern!r}", command)
    if any(g.read_only for g in grants):
        why = read_only_violation(name, body)
        if why is not None:
            return Denial("read_only", why, name)
    return None


def denial_message(denial: Denial, name: str, db: str | None) -> str:
    """mongod's wording for a missing privilege, with the proxy's reason."""
    return f"not authorized on {db or '?'} to execute command {name} (dbproxy: {denial.why})"


# --------------------------------------------------------------------------- the session's access state


@attrs.define(eq=False)
class MongoAccess:
    """One connection's access state: before and after establishment (see the module docstring)."""

    access: Any  # dbproxy.access.ListenerAccess
    session: Any
    authenticator: Any  # clientauth.IdentityAuthenticator, or the legacy ClientAuthenticator
    route: str | None
    db_user: str | None
    start_fields: dict = attrs.field(factory=dict)
    certificate: Identity | None = None
    certificate_error: AuthFailed | None = None
    grant: Grant | None = None
    established: bool = False
    handshake: dict = attrs.field(factory=dict)  # command → count, before establishment
    denied: int = 0
    auth_failures: int = 0
    claimed_user: str | None = None  # legacy listener policies: a user name the client claimed
    claimed_mechanism: str | None = None
    _grants: dict = attrs.field(factory=dict, repr=False)

    @property
    def methods(self) -> tuple[str, ...]:
        return self.access.methods

    @property
    def identity_mode(self) -> bool:
        return "token" in self.methods or "mtls" in self.methods

    def grant_for(self, db: str) -> Grant | None:
        """The identity's grant for database ``db`` (None: no role allows it); cached per session."""
        try:
            return self._grants[db]
        except KeyError:
            pass
        try:
            grant: Grant | None = self.access.authorize(self.session.identity, route=self.route, database=db, db_user=self.db_user)
        except AccessDenied:
            grant = None
        if len(self._grants) < 256:
            self._grants[db] = grant
        return grant

    def check(self, name: str, db: str | None, body: Mapping[str, Any]) -> Denial | None:
        assert self.grant is not None
        if not self.grant.restricted:
            return None
        return check_command(self.grant, self.grant_for, name, db, body)

    # -- establishment ---------------------------------------------------------
    def establish(self, identity: Identity, *, client_auth: str, **fields: Any) -> Refusal | None:
        """Authorize ``identity`` for the route and admit it; emit ``db.session.start``.  None when established."""
        s = self.session
        s.identity = identity
        try:
            grant = self.access.authorize(identity, route=self.route, database=None, db_user=self.db_user)
            self.access.admit(s)
        except TooManyConnections as exc:
            log.info("session %s: %s refused: %s", s.id, identity.user, exc)
            audit_denial(s, exc, stage="connect", client_auth=client_auth, **self.start_fields)
            s.identity = PENDING
            self.denied += 1
            return Refusal(f"dbproxy: too many connections: {exc}", exc.reason, close=True)
        except AccessDenied as exc:
            log.info("session %s: %s refused: %s", s.id, identity.user, exc)
            audit_denial(s, exc, stage="connect", client_auth=client_auth, **self.start_fields)
            s.identity = PENDING
            self.denied += 1
            return Refusal(f"dbproxy: permission denied: {exc}", exc.reason)
        self.grant = grant
        self.established = True
        if hasattr(self.authenticator, "lock"):
            self.authenticator.lock(identity.user)
        start = dict(self.start_fields)
        start.update(fields)
        if self.claimed_user is not None:
            start.setdefault("client_user", self.claimed_user)
            start.setdefault("client_user_mechanism", self.claimed_mechanism)
        s.audit.on_session_start(
            success=True, client_auth=client_auth, granted_roles=list(grant.roles), read_only=grant.read_only,
            handshake_commands=dict(self.handshake), **start,
        )
        return None

    def establish_implicit(self, command: str, db: str | None) -> Refusal | None:
        """A command beyond the handshake on an unestablished connection: the certificate's or the anonymous
        identity if the listener allows one, else code 13 "requires authentication" (audited here)."""
        if self.certificate is not None:
            return self.establish(self.certificate, client_auth="mtls")
        if "anonymous" in self.methods:
            return self.establish(self.access.auth.anonymous(), client_auth="anonymous")
        self.denied += 1
        if "token" in self.methods:
            hint = "log in with your dbproxy token (mongosh -u USER -p TOKEN)"
        elif self.certificate_error is not None:
            hint = f"the client certificate was not accepted ({self.certificate_error.reason})"
        else:
            hint = "this listener requires a client certificate (tls with tlsCertificateKeyFile)"
        reason = "unauthenticated" if "token" in self.methods or self.certificate_error else "certificate_missing"
        audit_denial(self.session, reason, stage="command", error=f"command {command} before authentication",
                     command=command, db_name=db)
        return Refusal(f"command {command} requires authentication (dbproxy: {hint})", reason)

    def note_handshake(self, name: str) -> None:
        self.handshake[name] = self.handshake.get(name, 0) + 1

    def audit_auth_failure(self, command: str, outcome: Any) -> None:
        """A failed login: ``db.session.access_denied`` as the unauthenticated attempt, with its reason."""
        self.auth_failures += 1
        s = self.session
        log.info("session %s: client authentication failed (%s, %s): %s", s.id, outcome.mechanism, outcome.reason,
                 outcome.failure if outcome.failure is not None else outcome.reply.get("errmsg"))
        method = "mtls" if outcome.mechanism == "MONGODB-X509" else ("token" if self.identity_mode else "none")
        before = s.identity
        s.identity = Identity(user="unauthenticated", method=method)
        try:
            fields: dict[str, Any] = {"client_auth": outcome.mechanism, "command": command, "code": outcome.reply.get("code")}
            if outcome.user is not None:
                fields["attempted_user"] = outcome.user
            reason = outcome.reason or "authentication_failed"
            if outcome.failure is not None:
                audit_denial(s, outcome.failure, stage="authenticate", **fields)
            else:
                audit_denial(s, reason, stage="authenticate", error=outcome.reply.get("errmsg"), **fields)
        finally:
            s.identity = before

    def connection_status(self) -> dict:
        """The proxy's answer to ``connectionStatus``: the client's identity, never the backend login."""
        ident = self.session.identity if self.established else None
        users = [{"user": ident.user, "db": "$dbproxy"}] if ident is not None else []
        roles = [{"role": r, "db": "$dbproxy"} for r in (self.grant.roles if self.grant is not None else ())]
        return {"authInfo": {"authenticatedUsers": users, "authenticatedUserRoles": roles}, "ok": 1.0}

    def handshake_only_fields(self, *, reason: str, started: float) -> dict:
        fields: dict[str, Any] = {
            "success": self.denied == 0 and self.auth_failures == 0,
            "reason": reason,
            "duration_ms": round((time.time() - started) * 1000, 3),
            "handshake_commands": dict(self.handshake),
            "auth_failures": self.auth_failures,
            "denied": self.denied,
        }
        if self.certificate is not None:
            fields["certificate_subject"] = self.certificate.user
        for key in ("application_name", "client_driver", "client_tls"):
            if self.start_fields.get(key) is not None:
                fields[key] = self.start_fields[key]
        return fields


__all__ = [
    "DATABASE_NEUTRAL",
    "HANDSHAKE_COMMANDS",
    "PENDING",
    "READ_COMMANDS",
    "Denial",
    "MongoAccess",
    "Refusal",
    "check_command",
    "command_names",
    "denial_message",
    "read_only_violation",
    "referenced_databases",
]
