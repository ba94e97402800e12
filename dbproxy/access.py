"""What an identity may reach, per listener: authentication methods, roles, limits, and the denial event.

Strategy.  This module composes the access facilities for the server and
the engines; each concern lives in its own module:

- ``dbproxy.roles``: roles, ``Grant`` (deny by default; read-only only if
  every granting role is; deny patterns a union) and ``AccessPolicy``;
- ``dbproxy.limits``: live sessions per listener and per identity;
- ``dbproxy.identity``: tokens, SCRAM verifiers, mTLS mappings;
- ``dbproxy.statements``: the dialect interface an engine passes to
  ``Grant.refusal`` (the SQL and CQL lexers live with their engines).

Engines get everything through ``services.access`` (an ``AccessControl``,
``None`` when the config has no ``identity``/``roles``/``limits``: then every
listener is anonymous and unrestricted, as before):

    acc = services.access.listener(listener.name)    # ListenerAccess
    acc.auth                 # identity.ClientAuthenticator: methods, tokens, SCRAM, mTLS
    grant = acc.authorize(identity, route=…, database=…, db_user=…)   # raises AccessDenied
    acc.admit(session)       # raises TooManyConnections; released by the server at session end
    grant.refusal(sql, dialect)         → a Refusal (deny pattern / read-only) or None
    grant.denied_command("dropDatabase")  → the matching pattern or None
    audit_denial(session, exc, stage="connect")   # the db.session.access_denied event

Config (validated here, called from ``dbproxy.config``): root ``roles``,
``limits`` and listener ``auth`` (``identity`` in ``dbproxy.identity``).  An
``anonymous`` listener must be on a loopback address unless it says
``"i_know_this_is_open": true``.
"""

from __future__ import annotations

import functools
import ipaddress
from typing import Any

import attrs

from .errors import AccessDenied
from .identity.authenticator import ClientAuthenticator
from .identity.authority import TokenAuthority
from .identity.config import IdentityConfig, validate_identity
from .limits import ConnectionLimits, TooManyConnections, validate_limits  # noqa: F401  (TooManyConnections: engines import it from here)
from .roles import AccessPolicy, Grant, glob_list, validate_roles
from .session import Identity


CLIENT_AUTH_METHODS = ("token", "mtls", "publickey", "anonymous")


@attrs.frozen
class ListenerAuth:
    methods: tuple[str, ...]
    i_know_this_is_open: bool = False
    anonymous_roles: tuple[str, ...] = ()
    explicit: bool = True


LISTENER_AUTH_KEYS = {"methods", "i_know_this_is_open", "anonymous_roles"}


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
            if identity.publickey is not None and "publickey" in supported:
                methods.append("publickey")
            if not methods:
                v.err(path, f"a key \"auth\": identity is configured, but no method of it applies to this {lc.protocol} listener "
                            f"(it supports {', '.join(supported)}; say {{\"methods\": [\"anonymous\"]}} to leave it open)")
                return None
            auth = ListenerAuth(methods=tuple(methods), explicit=False)
    else:
        d = v.section(raw, ap, LISTENER_AUTH_KEYS)
        if d is None:
            return None
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
        if "publickey" in methods and (identity is None or identity.publickey is None):
            v.err(ap, "identity.publickey to be configured for method \"publickey\" (users' keys and/or a user CA)")
        if "mtls" in methods:
            if identity is None or identity.mtls is None:
                v.err(ap, "identity.mtls to be configured for method \"mtls\"")
            if not has_client_ca:
                v.err(ap, f"{path}.tls.client_ca_file for method \"mtls\" (the CA that signs client certificates)")
        anon_roles = glob_list(v, d, "anonymous_roles", ap, required=False)
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


def engine_role_keys(registry: Any) -> dict:
    """Role keys engines own (``redfish``: Redfish rules) → their validators (``validate_role_key``)."""
    keys: dict = {}
    for name in registry.names() if registry is not None else ():
        cls = registry.get(name)
        for key in getattr(cls, "role_keys", ()):
            keys[key] = functools.partial(cls.validate_role_key, key)
            # The family key a role naming this key must also name (its targets): "bmcs" unless the engine says.
            keys[key].requires = getattr(cls, "role_key_requires", "bmcs")
    return keys


def validate_access(v: Any, root: dict, listeners: list[tuple[int, dict, Any]], registry: Any) -> tuple[Any, Any, Any, dict]:
    """Validate ``identity``, ``roles``, ``limits`` and every listener's ``auth``.

    ``listeners``: (index, raw dict, ListenerConfig) of the listeners that
    validated.  Returns (identity, roles or None, limits, {listener: ListenerAuth}).
    """
    identity = validate_identity(v, root["identity"]) if "identity" in root else None
    roles = validate_roles(v, root["roles"], engine_keys=engine_role_keys(registry)) if "roles" in root else None
    limits = validate_limits(v, root["limits"]) if "limits" in root else None
    if identity is not None and identity.mtls is not None:
        for pattern, granted in identity.mtls.users:
            for r in granted:
                if roles is None or r not in roles:
                    v.err(f"identity.mtls.users.{pattern}", f"roles defined in \"roles\", {r!r} is not")
    if identity is not None and identity.publickey is not None:
        for user, granted, _ in identity.publickey.users:
            for r in granted:
                if roles is None or r not in roles:
                    v.err(f"identity.publickey.users.{user}.roles", f"roles defined in \"roles\", {r!r} is not")
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

    def authorize(self, identity: Identity, *, route: str | None, database: str | None, db_user: str | None,
                  family: str = "database") -> Grant:
        return self.policy.authorize(identity, route=route, database=database, db_user=db_user, family=family)

    def admit(self, session: Any) -> None:
        self.limits.admit(session)

    def release(self, session: Any) -> None:
        self.limits.release(session)


class AccessControl:
    """``services.access``: one per proxy process."""

    def __init__(self, config: Any, *, limits: ConnectionLimits | None = None) -> None:
        identity = config.identity
        self.authority = TokenAuthority(identity.token) if identity is not None and identity.token is not None else None
        self.policy = AccessPolicy(config.roles, enforced=identity is not None or config.roles is not None)
        if limits is None:
            limits = ConnectionLimits(config.limits)
        else:  # a reload: the live counts go on, under the new limits
            limits.reconfigure(config.limits)
        self.limits = limits
        self._listeners: dict[str, ListenerAccess] = {}
        for lc in config.listeners:
            la = lc.auth or ListenerAuth(methods=("anonymous",), explicit=False)
            auth = ClientAuthenticator(
                la.methods,
                authority=self.authority,
                mtls=identity.mtls if identity is not None else None,
                anonymous_roles=la.anonymous_roles,
                publickey=identity.publickey if identity is not None else None,
            )
            self._listeners[lc.name] = ListenerAccess(lc.name, auth, self.policy, self.limits)

    def listener(self, name: str) -> ListenerAccess:
        return self._listeners[name]

    def release(self, session: Any) -> None:
        self.limits.release(session)


def build_access(config: Any, *, limits: ConnectionLimits | None = None) -> AccessControl | None:
    """None when the config says nothing about identity, roles or limits (every listener anonymous,
    unrestricted).  ``limits``: the running ``ConnectionLimits`` a reload carries over."""
    if config.identity is None and config.roles is None and config.limits is None:
        return None
    return AccessControl(config, limits=limits)


def audit_denial(session: Any, exc: AccessDenied | str, *, stage: str, **fields: Any) -> dict | None:
    """Emit ``db.session.access_denied`` (``<family>.session.access_denied`` for other event families)
    (success false) with the reason; never secrets."""
    from dbproxy.audit import events as ev

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
    kind = ev.access_denied_event(getattr(session, "event_family", "db"))
    return session.audit.emit(kind, success=False, stage=stage, reason=reason, error=error, **fields)
