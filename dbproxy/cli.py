"""Command line: ``dbproxy serve``, ``dbproxy check-config``."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import logging
import signal
import sys

from typing import Any

import trio

from .config import load_config
from .errors import ConfigErrors
from .logs import LOG_FORMATS, configure, parse_levels
from .registry import default_registry

log = logging.getLogger("dbproxy")


def _registry():
    return default_registry()


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file, _registry())
    except ConfigErrors as exc:
        for err in exc.errors:
            print(f"error: {err}", file=sys.stderr)
        print(f"{args.file}: {len(exc.errors)} error(s)", file=sys.stderr)
        return 2
    routes = sum(len(lc.routes) for lc in config.listeners)
    print(f"{args.file}: OK ({len(config.listeners)} listener(s), {routes} route(s), {len(config.audit.sinks)} audit sink(s))")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    registry = _registry()
    try:
        config = load_config(args.config, registry)
    except ConfigErrors as exc:
        for err in exc.errors:
            print(f"error: {err}", file=sys.stderr)
        print("refusing to start: fix the configuration (dbproxy check-config)", file=sys.stderr)
        return 2
    _configure_logging(args, config.logging)
    if args.pid_file:
        with open(args.pid_file, "w") as f:
            f.write(f"{os.getpid()}\n")
    try:
        if config.workers > 1:  # a supervisor of N proxy processes (dbproxy.workers)
            from .workers import supervise

            trio.run(supervise, config, registry)
        else:
            trio.run(_serve_main, config, registry)
    finally:
        if args.pid_file:
            with contextlib.suppress(OSError):
                os.unlink(args.pid_file)
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    """Check the file as ``serve`` would (a bad file is refused here, with every error), then
    SIGHUP the proxy; the proxy checks again and keeps its running config on any problem."""
    if cmd_check_config(argparse.Namespace(file=args.config)) != 0:
        print("not reloading: the running proxy keeps its config", file=sys.stderr)
        return 2
    if args.pid_file:
        try:
            pids = [int(open(args.pid_file).read().split()[0])]
        except (OSError, ValueError, IndexError) as exc:
            print(f"error: {args.pid_file}: no process id ({exc})", file=sys.stderr)
            return 2
    else:
        pids = _serving(args.config)
        if not pids:
            print(f"error: no running 'dbproxy serve --config {args.config}' found (give --pid-file)", file=sys.stderr)
            return 2
    for pid in pids:
        try:
            os.kill(pid, signal.SIGHUP)
        except OSError as exc:
            print(f"error: process {pid}: {exc.strerror or exc}", file=sys.stderr)
            return 2
        print(f"dbproxy: reload signalled to process {pid}")
    return 0


def _serving(config_file: str) -> list[int]:
    """Process ids of ``dbproxy serve`` processes started with ``config_file`` (from /proc)."""
    target = os.path.realpath(config_file)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue
        if "serve" not in argv or "--config" not in argv or not any("dbproxy" in a for a in argv):
            continue
        i = argv.index("--config")
        if i + 1 < len(argv) and os.path.realpath(os.path.join(cwd, argv[i + 1])) == target:
            found.append(int(entry))
    return found


def _configure_logging(args: argparse.Namespace, from_config: Any = None) -> None:
    """The config's ``"logging"`` section, with ``--log-format`` / ``--log-level`` winning where given."""
    fmt, level, levels = "text", "INFO", {}
    if from_config is not None:
        fmt, level, levels = from_config.format, from_config.level, dict(from_config.levels)
    fmt = args.log_format or fmt
    if args.log_level:
        root, modules = parse_levels(args.log_level)
        level = root or level
        levels.update(modules)
    configure(level=level, fmt=fmt, levels=levels)


async def _serve_main(config, registry) -> None:
    from .server import ProxyServer

    server = ProxyServer(config, registry)
    server_scope = trio.CancelScope()
    async with trio.open_nursery() as nursery:

        async def watch_signals(task_status=trio.TASK_STATUS_IGNORED) -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
                task_status.started()
                count = 0
                async for signum in signals:
                    if signum == signal.SIGHUP:  # dbproxy reload: new sessions get the re-read config
                        log.info("received SIGHUP: reloading %s", config.file)
                        await server.reload()
                        continue
                    count += 1
                    if count == 1:
                        log.info("received %s: graceful shutdown (grace %.1fs)", signal.Signals(signum).name, config.shutdown_grace)
                        server.stop()
                    else:
                        log.warning("second signal: ending all sessions now")
                        server_scope.cancel()

        await nursery.start(watch_signals)
        with server_scope:
            async with trio.open_nursery() as inner:
                bound = await inner.start(server.run)
                for b in bound:
                    kind = "" if b.kind == "tcp" else f" ({b.kind})"
                    print(f"dbproxy: {b.name} ({b.protocol}) listening on {b.host}:{b.port}{kind}", flush=True)
                if server.admin_address is not None:
                    host, port = server.admin_address
                    print(f"dbproxy: admin listening on {host}:{port} (/metrics, /healthz, /readyz)", flush=True)
                if server.agents is not None and server.agents.address is not None:
                    host, port = server.agents.address
                    print(f"dbproxy: agents (agent-links) listening on {host}:{port}", flush=True)
        nursery.cancel_scope.cancel()
    log.info("stopped")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dbproxy", description="Privileged-access proxy")
    parser.add_argument("--log-level", default=None, metavar="LEVELS",
                        help="INFO (default), or per module too: INFO,dbproxy.engines.ssh=DEBUG,asyncssh=WARNING")
    parser.add_argument("--log-format", default=None, choices=LOG_FORMATS,
                        help="text (default) or json: one JSON object per line, the session id on each")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the listeners of a config file")
    p.add_argument("--config", required=True)
    p.set_defaults(func=cmd_serve)
    p.add_argument("--pid-file", default=None, help="write the process id here (for dbproxy reload --pid-file)")
    p = sub.add_parser("reload", help="validate a config file, then make the running proxy re-read it (SIGHUP)")
    p.add_argument("--config", required=True, help="the config file the proxy was started with")
    p.add_argument("--pid-file", default=None, help="the running proxy's --pid-file (default: find "
                   "the 'dbproxy serve' processes of --config)")
    p.set_defaults(func=cmd_reload)
    p = sub.add_parser("check-config", help="validate a config file")
    p.add_argument("file")
    p.set_defaults(func=cmd_check_config)
    # Subcommand groups live beside the code they drive.
    for module in ("dbproxy.audit_cli", "dbproxy.token_cli", "dbproxy.replay_cli", "dbproxy.run_cli", "dbproxy.agent.cli"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _configure_logging(args)
    except ValueError as exc:
        parser.error(f"--log-level: {exc}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
