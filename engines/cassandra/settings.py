"""Configuration rules of Cassandra listeners and routes (``Engine.validate_*``).

Listener options: ``client_auth`` (``password``: the client's SASL PLAIN user
name is taken, its password dropped; ``none``) and ``expected_user`` (a
glob); route options: ``expected_user``.  A backend has no ``database``
(clients choose keyspaces), a ``password`` backend needs a ``user``, a
``tls`` object needs a ``mode``.  A ``gssapi`` backend (SASL GSSAPI, RFC
4752) takes the shared Kerberos keys (``dbproxy.kerberos.validate_gssapi``:
principal, keytab_file or ccache, service — default ``cassandra`` —, host,
krb5_config, renew_margin_seconds) plus ``authorization_id`` (the SASL
authorization identity, for authenticators that let a principal act as
another role; default none: the node maps the principal).  Every mistake
names its JSON path (``dbproxy.config``'s validator).
"""

from __future__ import annotations

from typing import Any

from dbproxy.kerberos import validate_gssapi

CLIENT_AUTH_MODES = ("password", "none")
LISTENER_OPTIONS = frozenset({"client_auth", "expected_user"})
ROUTE_OPTIONS = frozenset({"expected_user"})


def validate_auth(v: Any, method: str, ad: dict, path: str) -> dict:
    extra = sorted(k for k in ad if k not in {"method", "password_file", "password_env"})
    if method == "gssapi":
        if "password_file" in ad or "password_env" in ad:
            v.err(path, "no password for method gssapi (the proxy proves itself with its Kerberos principal)")
        return validate_gssapi(v, ad, path, set(extra), extra_keys={"authorization_id": None})
    for k in extra:
        v.err(f"{path}.{k}", f"no key {k!r} for method {method}")
    if method == "none" and ("password_file" in ad or "password_env" in ad):
        v.err(path, "no password for method none (use method \"password\")")
    return {}


def validate_listener(v: Any, d: dict, path: str) -> None:
    needs_user = False
    opts = d.get("options", {})
    client_auth = None
    if isinstance(opts, dict):
        op = f"{path}.options"
        for k in opts:
            if k not in LISTENER_OPTIONS:
                v.err(f"{op}.{k}", f"a cassandra listener option ({', '.join(sorted(LISTENER_OPTIONS))})")
        if "client_auth" in opts:
            client_auth = v.string(opts, "client_auth", op, choices=CLIENT_AUTH_MODES)
        if "expected_user" in opts:
            needs_user = True
            v.string(opts, "expected_user", op)
    routes = d.get("routes")
    for j, r in enumerate(routes if isinstance(routes, list) else []):
        if not isinstance(r, dict):
            continue
        rp = f"{path}.routes[{j}]"
        ropts = r.get("options", {})
        if isinstance(ropts, dict):
            for k in ropts:
                if k not in ROUTE_OPTIONS:
                    v.err(f"{rp}.options.{k}", f"a cassandra route option ({', '.join(sorted(ROUTE_OPTIONS))})")
            if "expected_user" in ropts:
                needs_user = True
                v.string(ropts, "expected_user", f"{rp}.options")
        if isinstance(r.get("match"), dict) and "user" in r["match"]:
            needs_user = True
        backend = r.get("backend")
        if not isinstance(backend, dict):
            continue
        bp = f"{rp}.backend"
        if "database" in backend:
            v.err(f"{bp}.database", "no \"database\" for cassandra: clients choose keyspaces themselves (USE, or per statement)")
        auth = backend.get("auth")
        if isinstance(auth, dict) and auth.get("method") == "password" and not backend.get("user"):
            v.err(bp, "a \"user\" for auth method password (the role the proxy logs in as)")
        tls = backend.get("tls")
        if isinstance(tls, dict) and "mode" not in tls:
            v.err(f"{bp}.tls", "a \"mode\" (verify-full, verify-ca, require or disable): a tls object without one would silently mean disable")
    if client_auth == "none" and needs_user:
        v.err(f"{path}.options.client_auth", "\"password\": routes match on \"user\" or expected_user is set, which needs the client's user name")
