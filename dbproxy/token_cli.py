"""``dbproxy token …``: issue, revoke and list the proxy's login tokens; make token keys.

    dbproxy token keygen --algorithm EdDSA --key-file token.key --public-key-file token.pub
    dbproxy token issue  --config proxy.json --user alice --roles analyst --ttl 8h
    dbproxy token issue  --config proxy.json --user alice --roles ops --vnc --target desk-1    (--code vnc)
    dbproxy token issue  --config proxy.json --user alice --roles ops --ipmi --target bmc-1    (--code ipmi)
    dbproxy token revoke --config proxy.json TOKEN_OR_ID
    dbproxy token list   --config proxy.json

Only the ``identity`` and ``roles`` sections of the config are read (an
operator issuing tokens need not hold the backend secrets).  ``issue``
prints the token — and nothing else — on stdout, and records its SCRAM
verifiers in ``identity.token.registry_file`` when one is configured (see
``dbproxy.identity``); ``revoke`` appends the token id to
``identity.token.revocation_file`` (the proxy re-reads it on change) and
drops the token's verifiers from the registry.  ``issue --code KIND``
(aliases ``--vnc``, ``--ipmi``) prints a single-use code instead of a
token, for clients that can only send a short password, in the form its
engine declares (``Engine.onetime_codes``: e.g. 8 characters for classic
VNC authentication, a 20-character IPMI password); it is recorded in the
codes file (``identity.token.codes_file``, default next to the registry:
``dbproxy.onetime``), which the running proxy reads.  Nothing here logs a
token or a code.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from typing import Any


from .errors import AuthFailed, ConfigError, ConfigErrors
from .identity.authority import TokenAuthority
from .identity.config import TokenConfig, validate_identity
from .identity.files import FileLock
from .identity.keys import TokenKeys, generate_keys
from .identity.registry import DEFAULT_FLAVOURS
from .identity.tokens import looks_like_token, parse_ttl
from .validate import Validator, read_json


def _iso(ts: int) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def load_token_config(path: str) -> tuple[TokenConfig, dict | None]:
    """``identity.token`` and ``roles`` of a config file, validated; raises ConfigErrors."""
    from .access import engine_role_keys
    from .cli import _registry
    from .roles import validate_roles

    v = Validator(path)
    doc = read_json(path)
    if not isinstance(doc, dict) or "identity" not in doc:
        raise ConfigErrors([ConfigError(path, "", "an \"identity\" section with \"token\"")])
    identity = validate_identity(v, doc["identity"])
    roles = validate_roles(v, doc["roles"], engine_keys=engine_role_keys(_registry())) if "roles" in doc else None
    if not v.errors and (identity is None or identity.token is None):
        v.err("identity", "a key \"token\"")
    if v.errors:
        raise ConfigErrors(v.errors)
    assert identity is not None and identity.token is not None
    return identity.token, roles


def _fail(msg: str) -> int:
    print(f"dbproxy token: {msg}", file=sys.stderr)
    return 2


def _load(args: argparse.Namespace, *, need_signing: bool) -> tuple[TokenConfig, dict | None, TokenAuthority] | int:
    try:
        cfg, roles = load_token_config(args.config)
    except ConfigErrors as exc:
        for err in exc.errors:
            print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        keys = TokenKeys.from_config(cfg, need_signing=need_signing)
    except (OSError, ValueError) as exc:
        return _fail(f"cannot load the token key: {exc}")
    return cfg, roles, TokenAuthority(cfg, keys, flavours=scram_flavours())


def scram_flavours() -> tuple:
    """The SCRAM verifiers ``issue`` records: the core's SCRAM-SHA-256 and what the engines declare
    (``Engine.scram_flavours``, e.g. Mongo's SCRAM-SHA-1 digest); the core knows no protocol's digest."""
    from .registry import default_registry as _registry

    registry = _registry()
    flavours = list(DEFAULT_FLAVOURS)
    for protocol in registry.names():
        flavours.extend(getattr(registry.get(protocol), "scram_flavours", ()))
    return tuple(flavours)


def cmd_issue(args: argparse.Namespace) -> int:
    loaded = _load(args, need_signing=True)
    if isinstance(loaded, int):
        return loaded
    cfg, roles, authority = loaded
    if args.target and not args.code:
        return _fail("--target is for single-use codes (--code KIND, --ipmi, --vnc); a token reaches what its roles "
                     "grant")
    if args.node is not None and args.code:
        return _fail("--node issues an agent's node token; --code/--ipmi/--vnc a user's single-use code: one of them")
    role_names = [r.strip() for r in args.roles.split(",") if r.strip()] if args.roles and args.node is None else []
    unknown = [r for r in role_names if roles is None or r not in roles]
    if unknown:
        return _fail(f"role(s) not defined in the config's \"roles\": {', '.join(unknown)}")
    if args.code:
        return _issue_code(args, cfg, authority, role_names)
    try:
        ttl = parse_ttl(args.ttl or "8h")
    except ValueError as exc:
        return _fail(str(exc))
    if ttl > cfg.max_ttl:
        return _fail(f"--ttl {args.ttl or '8h'} is longer than identity.token.max_ttl_seconds ({cfg.max_ttl}s)")
    if args.node is not None:
        return _issue_node(args, authority, ttl)
    token, claims = authority.codec.issue(args.user, role_names, ttl)
    if authority.registry is not None:
        authority.registry.add(claims, token, revoked=authority.revocations.get())
    print(token, flush=True)
    print(
        f"token id {claims.jti} for {claims.sub!r} (roles: {', '.join(claims.roles) or 'none'}) expires {_iso(claims.exp)}"
        + ("" if authority.registry is not None else " — no registry_file: SCRAM logins (Postgres without TLS, Mongo SCRAM) will not work"),
        file=sys.stderr,
    )
    return 0


def onetime_kinds() -> dict:
    """The single-use code kinds the engines accept (``Engine.onetime_codes``), defaults filled in
    (``dbproxy.onetime.kind_spec``)."""
    from .onetime import kind_spec
    from .registry import default_registry as _registry

    registry = _registry()
    kinds: dict = {}
    for protocol in registry.names():
        for kind, spec in getattr(registry.get(protocol), "onetime_codes", {}).items():
            kinds[kind] = kind_spec(spec)
    return kinds


def _issue_code(args: argparse.Namespace, cfg: TokenConfig, authority: TokenAuthority, role_names: list) -> int:
    """``issue --code KIND`` (``--ipmi``, ``--vnc``): a single-use code for an engine whose protocol cannot
    carry a token (``dbproxy.onetime``), in the form the engine declares; only the code goes to stdout."""
    from .onetime import NO_CODES_FILE, CodeStore, codes_path

    spec = onetime_kinds().get(args.code)
    if spec is None:
        return _fail(f"no engine accepts single-use codes of kind {args.code!r} (kinds: "
                     f"{', '.join(sorted(onetime_kinds())) or 'none'})")
    path = codes_path(cfg)
    if path is None:
        return _fail(NO_CODES_FILE)
    if not args.target:
        return _fail(f"--target is required with --code {args.code} (the code reaches one target)")
    if spec["max_name"] == 0:
        if args.login:
            return _fail(f"--login: a {args.code} code is bound to no login name (the protocol carries none)")
        name = ""
    else:
        name = args.login or args.user
        if len(name.encode()) > spec["max_name"]:
            return _fail(f"the login name {name!r} is longer than {spec['max_name']} bytes: pass --login NAME")
    ttl = spec["ttl"]
    if args.ttl:
        try:
            ttl = parse_ttl(args.ttl)
        except ValueError as exc:
            return _fail(str(exc))
        if ttl > spec["max_ttl"]:
            return _fail(f"--ttl {args.ttl}: a single-use {args.code} code lives at most {spec['max_ttl']}s")
    store = CodeStore(path, authority.keys)
    try:
        code = store.issue(args.code, name, args.user, tuple(role_names), args.target, ttl, length=spec["length"],
                           alphabet=spec["alphabet"])
    except ValueError as exc:  # not a codes file (or an older format): say which file, leave it alone
        return _fail(f"{path}: {exc}")
    print(code.secret.decode(), flush=True)
    login = (f"login name {name!r}, " if name else "")
    print(f"single-use {args.code} code {code.id} for {args.user!r} ({login}roles: {', '.join(code.roles) or 'none'}, "
          f"target {args.target!r}) expires {_iso(code.exp)}"
          + ("; a new code for the same login name replaces this one" if name else ""), file=sys.stderr)
    return 0


def _issue_node(args: argparse.Namespace, authority: TokenAuthority, ttl: int) -> int:
    """A node token (dbproxy.agent.tokens): an agent serving NODE presents it; no user login accepts it."""
    from .agent.config import NODE_NAME
    from .agent.tokens import NodeTokens

    if not NODE_NAME.match(args.node):
        return _fail(f"--node: letters, digits, '.', '_', '-' (at most 63), got {args.node!r}")
    if args.roles:
        return _fail("--roles is for user tokens; a node token carries none")
    token, claims = NodeTokens(authority).issue(args.node, ttl)
    print(token, flush=True)
    print(f"node token id {claims.jti} for node {claims.sub!r} expires {_iso(claims.exp)}", file=sys.stderr)
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    loaded = _load(args, need_signing=False)
    if isinstance(loaded, int):
        return loaded
    cfg, _, authority = loaded
    if not cfg.revocation_file:
        return _fail("identity.token.revocation_file is not configured: nowhere to record revocations")
    what = args.token_or_id.strip()
    subject = None
    if looks_like_token(what):
        try:
            claims = authority.codec.decode(what)  # signature checked; expired tokens may still be revoked
        except AuthFailed as exc:
            return _fail(f"not a valid token of this proxy ({exc.reason}); pass its token id instead")
        jti, subject = claims.jti, claims.sub
    else:
        jti = what
        entry = authority.registry.entries().get(jti) if authority.registry is not None else None
        subject = entry.claims.sub if entry is not None else None
    if any(c.isspace() or c == "#" for c in jti):
        return _fail("a token id has no spaces or '#'")
    if authority.revoked(jti):
        print(f"token id {jti} is already revoked", file=sys.stderr)
    else:
        stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
        note = f"  # revoked {stamp}" + (f" user={subject}" if subject else "")
        with FileLock(cfg.revocation_file):
            fd = os.open(cfg.revocation_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            with os.fdopen(fd, "a", encoding="utf-8") as f:
                f.write(f"{jti}{note}\n")
        print(f"revoked token id {jti}" + (f" of {subject!r}" if subject else ""), file=sys.stderr)
    if authority.registry is not None:
        authority.registry.remove(jti)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    loaded = _load(args, need_signing=False)
    if isinstance(loaded, int):
        return loaded
    _, _, authority = loaded
    if authority.registry is None:
        return _fail("identity.token.registry_file is not configured: issued tokens are not recorded")
    import time

    now = time.time()
    rows = sorted(authority.registry.entries().values(), key=lambda e: (e.claims.sub, e.claims.iat))
    for e in rows:
        c = e.claims
        state = "revoked" if authority.revoked(c.jti) else ("expired" if c.exp <= now else "active")
        if state != "active" and not args.all:
            continue
        print(f"{c.jti}\t{c.sub}\t{','.join(c.roles)}\t{_iso(c.iat)}\t{_iso(c.exp)}\t{state}")
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    if args.algorithm == "EdDSA" and not args.public_key_file:
        return _fail("EdDSA needs --public-key-file too")
    try:
        generate_keys(args.algorithm, args.key_file, args.public_key_file)
    except FileExistsError as exc:
        return _fail(f"{exc.filename} exists: refusing to overwrite a key")
    print(f"wrote {args.key_file}" + (f" and {args.public_key_file}" if args.public_key_file else ""), file=sys.stderr)
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("token", help="issue, revoke and list login tokens")
    tsub = p.add_subparsers(dest="token_command", required=True)

    q = tsub.add_parser("issue", help="sign a token for a user, or for an agent's node (printed on stdout)")
    q.add_argument("--config", required=True)
    who = q.add_mutually_exclusive_group(required=True)
    who.add_argument("--user")
    who.add_argument("--node", help="a node token for `dbproxy agent --name NODE` (not a login token)")
    q.add_argument("--roles", default="", help="comma-separated role names from the config")
    q.add_argument("--ttl", default=None, help="lifetime, e.g. 30m, 8h, 1d (default 8h, at most "
                   "identity.token.max_ttl_seconds; a code's: its engine's, e.g. 60s for --vnc, 5m for --ipmi)")
    q.add_argument("--code", metavar="KIND", help="issue a single-use code of an engine instead of a token "
                   "(the engines' kinds: ipmi, vnc); needs --target")
    q.add_argument("--ipmi", dest="code", action="store_const", const="ipmi",
                   help="a single-use IPMI password (20 characters): the same as --code ipmi")
    q.add_argument("--vnc", dest="code", action="store_const", const="vnc",
                   help="a one-time 8-character code for classic VNC authentication: the same as --code vnc")
    q.add_argument("--target", help="with --code: the one target the code reaches (the route's match key)")
    q.add_argument("--login", help="with --code: the login name the client presents (default: --user)")
    q.set_defaults(func=cmd_issue)

    q = tsub.add_parser("revoke", help="revoke a token (by the token or its id)")
    q.add_argument("--config", required=True)
    q.add_argument("token_or_id")
    q.set_defaults(func=cmd_revoke)

    q = tsub.add_parser("list", help="tokens recorded in the registry")
    q.add_argument("--config", required=True)
    q.add_argument("--all", action="store_true", help="include expired and revoked tokens")
    q.set_defaults(func=cmd_list)

    q = tsub.add_parser("keygen", help="create a token signing key")
    q.add_argument("--algorithm", choices=("EdDSA", "HS256"), default="EdDSA")
    q.add_argument("--key-file", required=True)
    q.add_argument("--public-key-file")
    q.set_defaults(func=cmd_keygen)
