"""Command templates over SSH: the ``ssh-commands`` protocol (the core's command API, run by asyncssh).

Strategy.  The API, templates, jobs, scopes and audit are the core's
(``dbproxy.commands``); this module supplies the one hook it leaves to a
protocol, ``execute``: log in to the target exactly as an SSH session's
backend login does (``bridge.TargetConnection``: the route's key, password or
a per-run certificate the route's CA signs, the host key checked against the
route's known_hosts; no agent, no ~/.ssh of the proxy's user), open one
session channel with an exec request (RFC 4254 §6.5) carrying the template's
command line, and report its output (channel data and extended data, §5.2)
and exit status or signal (§6.10).  asyncssh runs on a trio-asyncio loop
opened for the run inside its own trio task, as for a terminal session.

Stopping a run (timeout, cancel, output limit — a trio cancellation here).
RFC 4254 §6.9's "signal" request is sent first, but OpenSSH's sshd honours it
only for sessions under privilege separation ("session signalling requires
privilege separation": never for root logins), and closing the channel does
not stop a command that writes nothing.  So the line the target runs begins
by telling the proxy its process id on stderr
(``printf 'dbproxy-pid:%s\\n' "$$" >&2; exec …``; the runner takes that line
out of the output): sshd starts every exec in a session of its own
(``setsid``), so that id is also the command's process group, and on a stop
the proxy opens a second exec channel on the same connection running
``kill -KILL -- -PGID`` — the command and whatever it started die, whatever
they do with SIGHUP.  That kill is audited (``command.kill``) like anything
else that reaches the target.  Then the channel and the connection close.
"""

from __future__ import annotations

import logging
from typing import Any

import asyncssh
import trio
import trio_asyncio

from dbproxy.commands.api import CommandsEngine, TargetUnavailable

from . import config as sshconfig
from .bridge import TargetConnection
from .target import TargetError, TargetLogins, hint

log = logging.getLogger("dbproxy.ssh.commands")

# After a stop, how long the signal, channel close and disconnect may take.
STOP_GRACE = 3.0
# A run stopped before the target's shell reported its pid waits this long for it.
PID_WAIT = 1.0


PID_MARK = b"dbproxy-pid:"
PID_PREFIX = "printf 'dbproxy-pid:%s\\n' \"$$\" >&2; "
# stderr held back while looking for the pid line (a login shell's own noise may come first).
MAX_PREAMBLE = 4096


class _Exec(asyncssh.SSHClientSession):
    """One exec channel's callbacks (asyncio side): output and exit go straight to the run."""

    def __init__(self, run: Any, done: trio.Event) -> None:
        self.run = run
        self.done = done
        self.pid: int | None = None
        self.pid_known = trio.Event()
        self._preamble: bytearray | None = bytearray()

    def data_received(self, data: bytes, datatype: Any) -> None:
        if datatype != asyncssh.EXTENDED_DATA_STDERR:
            self.run.output("stdout", data)
            return
        if self._preamble is None:
            self.run.output("stderr", data)
            return
        self._preamble.extend(data)
        while self._preamble is not None and b"\n" in self._preamble:
            line, _, rest = bytes(self._preamble).partition(b"\n")
            if line.startswith(PID_MARK) and line[len(PID_MARK):].isdigit():
                self.pid = int(line[len(PID_MARK):])
                self.pid_known.set()
                self._preamble = None
                self.run.output("stderr", rest)
                return
            self.run.output("stderr", line + b"\n")
            self._preamble = bytearray(rest)
        if self._preamble is not None and len(self._preamble) > MAX_PREAMBLE:
            held, self._preamble = bytes(self._preamble), None
            self.run.output("stderr", held)

    def exit_status_received(self, status: int) -> None:
        self.run.exit_status = status

    def exit_signal_received(self, signal: str, core_dumped: bool, msg: str, lang: str) -> None:
        self.run.exit_signal = signal

    def connection_lost(self, exc: Exception | None) -> None:
        self.done.set()


class SSHCommandsEngine(CommandsEngine):
    protocol = "ssh-commands"
    auth_methods = ("publickey", "password", "certificate")
    password_methods = ("password",)
    backend_keys = sshconfig.BACKEND_KEYS
    validate_auth = staticmethod(sshconfig.validate_auth)
    validate_backend = staticmethod(sshconfig.validate_backend)

    def __init__(self, listener: Any, services: Any) -> None:
        super().__init__(listener, services)
        self._logins = TargetLogins()

    def command_line(self, job: Any) -> str:
        return PID_PREFIX + job.command

    async def execute(self, run: Any, route: Any, session: Any) -> None:
        backend = route.backend
        auth = backend.auth
        unavailable: TargetUnavailable | None = None
        # The loop is opened outside the run's scope: when the run is stopped, asyncssh must still
        # be running to send the kill.
        async with trio_asyncio.open_loop():
            with run.scope:
                unavailable = await self._connect_and_run(run, backend, auth, session)
        if unavailable is not None:
            raise unavailable

    async def _connect_and_run(self, run: Any, backend: Any, auth: Any, session: Any) -> TargetUnavailable | None:
        try:
            target = await self._logins.open(backend, run.login, session)
        except TargetError as exc:
            # Raised outside the loop's nursery, which would wrap it in an ExceptionGroup.
            return TargetUnavailable(str(exc), kind=exc.kind, hint=hint(exc.kind, run.target, run.login))
        try:
            await self._exec(target, run, session)
        finally:
            with trio.CancelScope(shield=True):
                await target.aclose()
        return None

    async def _exec(self, target: TargetConnection, run: Any, session: Any) -> None:
        done = trio.Event()
        handler = _Exec(run, done)
        chan, _ = await trio_asyncio.aio_as_trio(target.conn.create_session)(
            lambda: handler, run.command_line, encoding=None)
        try:
            await done.wait()
        finally:
            if not done.is_set():
                # Stopped (timeout, cancel, output limit): kill the command's process group, then close.
                with trio.CancelScope(shield=True), trio.move_on_after(STOP_GRACE):
                    await self._kill(target, chan, handler, run, session)
                    chan.close()
                    await done.wait()

    async def _kill(self, target: TargetConnection, chan: Any, handler: _Exec, run: Any, session: Any) -> None:
        try:
            chan.send_signal("KILL")
        except Exception as exc:  # a channel already closing: the group kill below still applies
            log.debug("signal to %s failed: %s", run.target, exc)
        if handler.pid is None and not handler.done.is_set():
            # Stopped right after the start: the pid line is the shell's first output, on its way.
            with trio.move_on_after(PID_WAIT):
                await handler.pid_known.wait()
        if handler.pid is None:
            # The shell never said who it is (it is gone, or stopped before it began): closing is all there is.
            session.audit.emit("command.kill", job_id=run.job.id, reason=run.stop_reason or "timeout", pid=None)
            return
        line = f"kill -KILL -- -{handler.pid}"
        session.audit.emit("command.kill", job_id=run.job.id, reason=run.stop_reason or "timeout",
                           pid=handler.pid, command=line)
        try:
            await trio_asyncio.aio_as_trio(target.conn.run)(line, check=False)
        except (asyncssh.Error, OSError) as exc:
            log.info("job %s: kill on %s failed: %s", run.job.id, run.target, exc)
