"""The Telnet session after both logins: two pumps, the terminal observer between them.

Strategy.  Shaped like the core's ``Pipeline`` for ``dbproxy.flow``
(``run``, ``end_reason``, ``statistics``); ``run`` returns when either side
ends (or the idle timeout), and the core closes both streams.

- client → target: the client leg's codec turns bytes into keys (IAC IAC
  unescaped, ``CR NUL`` / ``CR LF`` one Enter; Telnet's IP, EC, EL become
  Ctrl-C, DEL, Ctrl-U), which go through the core's ``TerminalAudit``
  (observer, line policy at Enter, the audit of each line); what it returns
  is encoded for the target (RFC 854 NVT: IAC doubled, CR as ``CR NUL``).
  NAWS from the client (a window change) is passed on as NAWS to the target
  and resizes the recording and the observer's screen.
- target → client: the target's output is recorded and observed; a chunk
  that held no Telnet command is forwarded as received (the hot path: no
  re-encoding), else its data is re-encoded around the commands the proxy
  answered itself.  The target's ECHO/SGA changes are mirrored to the client
  (the proxy offered both at its own login prompt), so the client's local
  echo follows the target's.
- An Enter waiting for its echo (the observer's ``waiting``) is decided when
  output arrives or after ``echo_wait`` by a timer task.

Sends to one leg are serialized by the leg's lock (the pumps and the timer
may send to the same side).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import attrs
import trio

from dbproxy.errors import ProtocolError
from dbproxy.terminal.audit import TerminalAudit
from dbproxy.terminal.linepolicy import simple_commands
from dbproxy.terminal.observer import Step

from . import codec as tn
from .codec import Command, Data, OptionChanged, Subnegotiation, TelnetProtocol

log = logging.getLogger("dbproxy.telnet")

_LOST = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
# Telnet's editing commands (RFC 854) as the keys a pty reads for them.
_COMMAND_KEYS = {tn.IP: b"\x03", tn.EC: b"\x7f", tn.EL: b"\x15"}


@attrs.define(eq=False)
class Counters:
    bytes_in: int = 0
    bytes_out: int = 0


class TelnetRelay:
    def __init__(self, session: Any, client: Any, target: Any, *, grant: Any = None,
                 recording_dir: str | None = None, recording_input: bool = False,
                 idle_timeout: float | None = None) -> None:
        self.session = session
        self.client = client
        self.target = target
        self.grant = grant
        self.recording_dir = recording_dir
        self.recording_input = recording_input
        self.idle_timeout = idle_timeout
        self.end_reason: str | None = None
        self.from_client = Counters()
        self.to_client = Counters()
        self.recordings: list[dict] = []
        self.commands = 0
        self.terminal: TerminalAudit | None = None
        self._nursery: Any = None
        self._timer_armed = False
        self._last_traffic = 0.0
        # The observer's steps are applied (sent) in the order it made them: a step is made and sent
        # under this lock (fair, FIFO), whichever task made it — the client pump, the target pump, the
        # echo timer.  Otherwise a refusal decided by the timer could reach the target before the Enter
        # of the line before it, still waiting behind a send to the client.
        self._order = trio.Lock()

    def statistics(self) -> tuple[Counters, Counters]:
        return self.from_client, self.to_client

    def emit(self, kind: str, **fields: Any) -> None:
        if kind.endswith(".shell.command"):
            self.commands += 1
        if self.session.audit is not None:
            self.session.audit.emit(kind, **fields)

    async def run(self) -> None:
        client = self.client
        width, height = client.width or 80, client.height or 24
        path = os.path.join(self.recording_dir, f"{self.session.id}.cast") if self.recording_dir else None
        try:
            self.terminal = TerminalAudit(self.session, self.emit, "telnet", width=width, height=height,
                                          term=client.term, grant=self.grant, split=simple_commands,
                                          recording_path=path, recording_input=self.recording_input)
        except OSError as exc:
            # Nothing unrecorded reaches a target: without its recording the session does not start.
            log.error("session %s: cannot write the recording %s: %s", self.session.id, path, exc)
            self.emit("telnet.recording.error", error=f"recording unavailable: {exc.strerror or exc}")
            self.end_reason = "recording unavailable"
            await client.send(b"\r\ndbproxy: the session cannot be recorded; refusing it\r\n")
            return
        self._last_traffic = trio.current_time()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                # The target's ECHO/SGA as negotiated during the login, mirrored to the client.
                for option in (tn.ECHO, tn.SGA):
                    client.proto.request_local(option, self.target.proto.remote_enabled(option))
                await client.flush()
                # The client's window may have changed during the login (or the target learnt none).
                await self.target.send(self.target.naws())
                nursery.start_soon(self._pump, self._client_side, "client")
                nursery.start_soon(self._pump, self._target_side, "target")
                if self.idle_timeout:
                    nursery.start_soon(self._watch_idle, self.idle_timeout)
        finally:
            fields, recordings = self.terminal.close()
            self.recordings += recordings

    async def _pump(self, side: Any, name: str) -> None:
        try:
            await side()
        except ProtocolError as exc:
            self.end_reason = self.end_reason or f"{name} protocol error: {exc}"
            log.info("session %s: %s", self.session.id, self.end_reason)
        except _LOST as exc:
            self.end_reason = self.end_reason or f"{name} connection lost: {exc.__class__.__name__}"
        self._nursery.cancel_scope.cancel()

    # -- client → target ------------------------------------------------------------------
    async def _client_side(self) -> None:
        client, target = self.client, self.target
        events, client.pending = client.pending, []
        while True:
            keys = bytearray()
            for event in events:
                if isinstance(event, Data):
                    keys += event.data
                elif isinstance(event, Command):
                    if event.code in _COMMAND_KEYS:
                        keys += _COMMAND_KEYS[event.code]
                    elif event.code in (tn.BRK, tn.AO, tn.AYT):
                        await self._keys(keys)
                        keys.clear()
                        await target.send(TelnetProtocol.encode_command(event.code))
                elif isinstance(event, Subnegotiation):
                    client.note(event)
                    if event.option == tn.NAWS and client.width:
                        self.terminal.resize(client.width, client.height)
                        if target.proto.local_enabled(tn.NAWS):
                            await target.send(target.naws())
                        elif target.proto.state("local", tn.NAWS) == tn.NO:
                            target.proto.request_local(tn.NAWS, True)  # a window the target never heard of
                            await target.flush()
            await self._keys(keys)
            data = await client.receive()
            if not data:
                self.end_reason = self.end_reason or "client closed the connection"
                return
            self.from_client.bytes_in += len(data)
            self._last_traffic = trio.current_time()
            await client.flush()
            events = client.proto.events()

    async def _keys(self, keys: bytearray) -> None:
        if keys:
            async with self._order:
                await self._apply(self.terminal.input(bytes(keys)))

    async def _apply(self, step: Step) -> None:
        """Send what a step decided (the caller holds ``_order``)."""
        if step.forward:
            await self.target.send(TelnetProtocol.encode_data(bytes(step.forward)))
        if step.to_client:
            out = TelnetProtocol.encode_data(bytes(step.to_client))
            self.to_client.bytes_out += len(out)
            await self.client.send(out)
        if self.terminal.waiting and not self._timer_armed:
            self._timer_armed = True
            self._nursery.start_soon(self._echo_timer)

    async def _echo_timer(self) -> None:
        """An Enter waits for the echo of the keys before it: decided without it ``echo_wait`` after it began
        waiting (the observer's clock), unless output settled it first."""
        try:
            while self.terminal.waiting:
                left = self.terminal.wait_started + self.terminal.echo_wait - time.monotonic()
                if left <= 0:
                    async with self._order:
                        if self.terminal.waiting and time.monotonic() >= self.terminal.wait_started + \
                                self.terminal.echo_wait:
                            await self._apply(self.terminal.resume(timed_out=True))
                    continue
                await trio.sleep(left)
        finally:
            self._timer_armed = False

    # -- target → client ------------------------------------------------------------------
    async def _target_side(self) -> None:
        client, target = self.client, self.target
        events, target.pending = target.pending, []
        raw: bytes | None = None
        while True:
            out = bytearray()
            shown = bytearray()
            plain = raw is not None  # the chunk held nothing but data: forward it as received
            for event in events:
                if isinstance(event, Data):
                    shown += event.data
                    if not plain:
                        out += TelnetProtocol.encode_data(event.data)
                elif isinstance(event, OptionChanged):
                    if event.side == "remote" and event.option in (tn.ECHO, tn.SGA):
                        client.proto.request_local(event.option, event.enabled)
                        out += client.proto.data_to_send()
                    else:
                        await target.send(target.answer(event))
                elif isinstance(event, Subnegotiation):
                    await target.send(target.answer(event))
                elif isinstance(event, Command) and event.code in (tn.BRK, tn.AYT):
                    out += TelnetProtocol.encode_command(event.code)
                # The target's Synch (IAC DM after an interrupt, RFC 854 p. 8) is not passed on: a client
                # takes it as "discard the output buffered so far", which would also discard the proxy's
                # own words just sent (a policy refusal answered by the target's ^C).
            if plain:
                out = bytearray(raw)  # type: ignore[arg-type]
            async with self._order:
                # Recorded (and observed) before it is sent: a cancellation inside the send (the client
                # went away) must not leave bytes the client saw out of the recording.
                step = self.terminal.output(bytes(shown)) if shown else None
                if out:
                    self.to_client.bytes_out += len(out)
                    await client.send(bytes(out))
                if step is not None:
                    await self._apply(step)
            data = await target.receive_raw()
            if not data:
                self.end_reason = self.end_reason or "target closed the connection"
                return
            self._last_traffic = trio.current_time()
            fast = target.proto.idle and b"\xff" not in data
            target.proto.feed(data)
            await target.flush()
            events = target.proto.events()
            raw = data if fast else None

    # -- idle timeout -------------------------------------------------------------------------
    async def _watch_idle(self, limit: float) -> None:
        while True:
            remaining = self._last_traffic + limit - trio.current_time()
            if remaining <= 0:
                break
            await trio.sleep(remaining)
        message = f"idle timeout: no traffic for {limit:g}s, the proxy closed the session"
        log.info("session %s: %s", self.session.id, message)
        self.end_reason = message
        with trio.move_on_after(2):
            try:
                await self.client.send(f"\r\ndbproxy: {message}\r\n".encode())
            except _LOST:
                pass
        self._nursery.cancel_scope.cancel()
