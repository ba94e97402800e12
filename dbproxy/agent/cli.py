"""``dbproxy agent``: run an agent next to targets the proxy cannot reach; ``dbproxy agent login``.

    dbproxy agent --proxy proxy.example:7443 --name site-a --token-file node.token \\
                  --ca-file proxy-ca.pem --allow 10.0.0.5:5432 --allow 10.0.1.0/24:22
    dbproxy token issue --config proxy.json --node site-a --ttl 30d | dbproxy agent login --name site-a --token-stdin
    dbproxy agent --proxy proxy.example:7443 --name site-a --ca-file proxy-ca.pem --allow '*.db.internal:5432'

Without ``--token-file``/``--token-stdin`` the token ``agent login`` stored
for the node is used (``$XDG_CONFIG_HOME/dbproxy/agent/NODE.token``, mode
0600).  The token file is re-read at each connection, so a renewed token is
picked up without a restart.  Exit codes: 2 usage, 3 the proxy refused the
token.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from .config import NODE_NAME


def token_path(node: str) -> str:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "dbproxy", "agent", f"{node}.token")


def _read_token(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read().strip()


def _fail(msg: str) -> int:
    print(f"dbproxy agent: {msg}", file=sys.stderr)
    return 2


def cmd_agent(args: argparse.Namespace) -> int:
    if not args.name or not NODE_NAME.match(args.name):
        return _fail("--name NODE (letters, digits, '.', '_', '-') is required")
    if args.action == "login":
        return _login(args)
    import trio

    from .. import __version__
    from .client import Agent, AgentOptions, AllowList

    if not args.proxy:
        return _fail("--proxy HOST:PORT is required")
    host, sep, port = args.proxy.rpartition(":")
    if not sep or not host or not port.isdigit():
        return _fail(f"--proxy wants HOST:PORT, got {args.proxy!r}")
    if not args.allow:
        return _fail("at least one --allow HOST:PORT: the agent dials only what it allows")
    try:
        allow = AllowList.parse(args.allow)
    except ValueError as exc:
        return _fail(str(exc))
    if args.token_stdin:
        secret = sys.stdin.readline().strip()
        if not secret:
            return _fail("--token-stdin: no token on standard input")
        token = lambda: secret  # noqa: E731
    else:
        path = args.token_file or token_path(args.name)
        try:
            _read_token(path)
        except OSError as exc:
            hint = "" if args.token_file else f" (store one with: dbproxy agent login --name {args.name} --token-stdin)"
            return _fail(f"cannot read the token file {path}: {exc.strerror or exc}{hint}")
        token = lambda: _read_token(path)  # noqa: E731
    if args.ca_file and not os.path.isfile(args.ca_file):
        return _fail(f"--ca-file {args.ca_file} is not a readable file")
    options = AgentOptions(proxy_host=host.strip("[]"), proxy_port=int(port), node=args.name, token=token,
                           allow=allow, ca_file=args.ca_file, server_name=args.server_name, version=__version__,
                           backoff_initial=args.backoff_initial, backoff_max=args.backoff_max)
    try:
        return trio.run(Agent(options).run)
    except KeyboardInterrupt:
        return 0


def _login(args: argparse.Namespace) -> int:
    if args.token_stdin:
        secret = sys.stdin.readline().strip()
    elif args.token_file:
        try:
            secret = _read_token(args.token_file)
        except OSError as exc:
            return _fail(f"cannot read {args.token_file}: {exc.strerror or exc}")
    else:
        import getpass

        secret = getpass.getpass(f"node token for {args.name}: ").strip()
    if secret.count(".") != 2:
        return _fail("that is not a node token (dbproxy token issue --node NODE prints one)")
    path = token_path(args.name)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(secret + "\n")
    os.replace(path + ".tmp", path)
    print(f"stored the token of node {args.name} in {path}", file=sys.stderr)
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("agent", help="run an outbound agent for targets the proxy cannot reach (or: agent login)")
    p.add_argument("action", nargs="?", choices=("run", "login"), default="run",
                   help="run (default) or login: store the node token for later runs")
    p.add_argument("--proxy", help="HOST:PORT of the proxy's agents listener")
    p.add_argument("--name", required=True, help="the node this agent serves (routes say \"via\": \"agent:NODE\")")
    p.add_argument("--token-file", help="a file holding the node token (default: the one agent login stored)")
    p.add_argument("--token-stdin", action="store_true", help="read the node token from standard input")
    p.add_argument("--ca-file", help="CA certificate(s) the proxy's certificate must chain to (default: the system's)")
    p.add_argument("--server-name", help="the name the proxy's certificate must carry (default: the --proxy host)")
    p.add_argument("--allow", action="append", default=[], metavar="HOST:PORT",
                   help="a target this agent may dial (repeatable): name, *.domain, address or CIDR; port, LOW-HIGH or *")
    p.add_argument("--backoff-initial", type=float, default=0.5, help=argparse.SUPPRESS)
    p.add_argument("--backoff-max", type=float, default=30.0, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_agent)
