"""One Serial-over-LAN activation through the proxy (trio): relay, timers, recording, audit.

Strategy.  The IPMI engine owns both RMCP+ sessions (the proxy is the BMC
toward the client, a console toward the real BMC) and hands SOL this much:

- ``check_activate(data)`` before it relays a client's Activate Payload
  (App 48h, already allowed by the role's ``ipmi`` list as
  ``sol.activate_payload``): a completion code to answer at once (bad
  request, already active here), or None to relay it;
- ``activated(request, response)`` with the BMC's answer: on success the
  relay starts (``bmc.ipmi.sol.start``) and the client gets the answer with
  the *proxy's* UDP port and payload sizes (ipmitool refuses a port other
  than the one it talks to);
- ``deactivated(...)`` when the client's Deactivate Payload (49h) was
  relayed, ``from_client(payload)`` / ``from_bmc(payload)`` for payload
  type 01h packets of either session (decrypted, integrity checked), and
  ``close(reason)`` when the IPMI session ends for any reason;
- ``run()`` in the session's nursery: the retransmit timer of both legs.

Each leg acknowledges and retransmits on its own (``sol.SolRelay``, §15.10).
What the BMC sends is written to an asciicast v2 recording (the terminal
engines' ``TerminalAudit``: the recording, the shell observer, and
``bmc.ipmi.sol.shell.command`` / ``.hidden_input`` for typed lines) before it
is sent to the client; what the client types goes through the same observer,
so a line typed without echo (a serial ``login``'s password) is reported
only by its length — typed input is never logged, only (opt-in, echoed keys
only) in the input recording.  ``bmc.ipmi.sol.end`` carries the reason, the
counters and the recording's SHA-256, and the IPMI session's end event lists
the recording (``recordings``) so the hash chain covers it.

A leg that stops acknowledging (``SolRetriesExhausted``) ends the SOL
activation with reason ``bmc_unresponsive`` / ``client_unresponsive`` and
tells the client the payload is deactivating (status bit 10h, §15.9); a
malformed packet from either side ends it too (``*_protocol_error``).
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Awaitable, Callable

import trio

from dbproxy.terminal.audit import TerminalAudit
from dbproxy.terminal.linepolicy import simple_commands
from dbproxy.terminal.observer import Step

from . import sol
from .sol import (ActivatePayloadRequest, ActivatePayloadResponse, DeactivatePayloadRequest, SolError, SolPacket,
                  SolRelay, SolRetriesExhausted, SolStatus)

log = logging.getLogger("dbproxy.ipmi.sol")

Send = Callable[[bytes], Awaitable[Any]]

# What the proxy tells the client it takes and sends per SOL packet (header included): the
# most the one-byte accepted character count allows.  The BMC's own sizes apply on its leg.
PROXY_PAYLOAD_SIZE = sol.HEADER_SIZE + sol.MAX_CHARACTERS

# Ends that are nobody's failure (the others: a leg unresponsive, a protocol error, the BMC lost).
_CLEAN_ENDS = frozenset({"deactivated by the client", "deactivated by the BMC", "session closed",
                         "client closed the session"})


class SolSession:
    def __init__(self, session: Any, *, send_client: Send, send_bmc: Send, listener_port: int,
                 recording_dir: str | None = None, recording_input: bool = False, grant: Any = None,
                 retry_interval: float = 1.0, max_retries: int = 5,
                 on_failure: Callable[[str], Any] | None = None) -> None:
        self.session = session
        self.send_client = send_client
        self.send_bmc = send_bmc
        self.listener_port = listener_port
        self.recording_dir = recording_dir
        self.recording_input = recording_input
        self.grant = grant
        self.retry_interval = retry_interval
        self.max_retries = max_retries
        self.on_failure = on_failure
        self.relay: SolRelay | None = None
        self.instance = 0
        self.terminal: TerminalAudit | None = None
        self.recordings: list[dict] = []
        self.end_reason: str | None = None
        self.bytes_in = 0     # typed by the client, accepted
        self.bytes_out = 0    # console output from the BMC
        self.activations = 0
        self._started = 0.0
        self._order = trio.Lock()
        self._wake = trio.Event()
        self._timer_armed = False
        self._nursery: Any = None

    @property
    def active(self) -> bool:
        return self.relay is not None

    def emit(self, kind: str, **fields: Any) -> None:
        if self.session.audit is not None:
            self.session.audit.emit(kind, **fields)

    # -- activation ---------------------------------------------------------------------------
    def check_activate(self, data: bytes) -> int | None:
        """A completion code to answer the client's Activate Payload with at once, or None: relay it."""
        try:
            req = ActivatePayloadRequest.decode(data)
        except SolError:
            return sol.CC_REQUEST_LENGTH_INVALID if len(data) != 6 else sol.CC_INVALID_DATA_FIELD
        if req.payload_type != sol.PAYLOAD_TYPE_SOL:
            return None  # another payload type: not SOL's business
        if self.active:
            return sol.CC_PAYLOAD_ALREADY_ACTIVE
        return None

    async def activated(self, request: bytes, response: bytes) -> bytes:
        """The BMC answered the client's Activate Payload (``response``: completion code + data).
        Returns what the client gets."""
        try:
            req = ActivatePayloadRequest.decode(request)
            if req.payload_type != sol.PAYLOAD_TYPE_SOL:
                return response
            rsp = ActivatePayloadResponse.decode(response)
        except SolError as exc:
            log.info("session %s: SOL activation answer unusable: %s", self.session.id, exc)
            self.emit("bmc.ipmi.sol.error", success=False, error=f"BMC answered Activate Payload badly: {exc}")
            return bytes((sol.CC_UNSPECIFIED,))
        if rsp.completion_code != sol.CC_OK:
            self.emit("bmc.ipmi.sol.refused", success=False, instance=req.instance,
                      completion_code=rsp.completion_code, by="bmc")
            return response
        if self.active:
            return bytes((sol.CC_PAYLOAD_ALREADY_ACTIVE,))
        path = None
        if self.recording_dir:
            self.activations += 1
            suffix = "" if self.activations == 1 else f".{self.activations}"
            path = os.path.join(self.recording_dir, f"{self.session.id}.sol{suffix}.cast")
        try:
            self.terminal = TerminalAudit(self.session, self.emit, "bmc.ipmi.sol", width=80, height=24, term=None,
                                          grant=self.grant, split=simple_commands, recording_path=path,
                                          recording_input=self.recording_input,
                                          fields={"instance": req.instance})
        except OSError as exc:
            # Nothing unrecorded reaches a target: no recording, no console.  The BMC already
            # activated the payload for the proxy; the caller deactivates it (``deactivate_request``).
            log.error("session %s: cannot write the SOL recording %s: %s", self.session.id, path, exc)
            self.emit("bmc.ipmi.sol.recording.error", success=False,
                      error=f"recording unavailable: {exc.strerror or exc}")
            self.pending_bmc_deactivate = True
            return bytes((sol.CC_PAYLOAD_DISABLED,))
        self.instance = req.instance
        self.relay = SolRelay.create(bmc_chunk=rsp.characters_in, retry_interval=self.retry_interval,
                                     max_retries=self.max_retries)
        self.end_reason = None
        self.bytes_in = self.bytes_out = 0
        self._started = time.monotonic()
        fields: dict = {"instance": req.instance, "encrypted": req.encrypt, "authenticated": req.authenticate,
                        "bmc_inbound_size": rsp.inbound_size, "bmc_outbound_size": rsp.outbound_size}
        if self.terminal.recorder is not None:
            fields["recording"] = os.path.basename(self.terminal.recorder.path)
        self.emit("bmc.ipmi.sol.start", **fields)
        self._wake.set()
        return ActivatePayloadResponse(aux=rsp.aux, inbound_size=PROXY_PAYLOAD_SIZE,
                                       outbound_size=PROXY_PAYLOAD_SIZE, port=self.listener_port).encode()

    pending_bmc_deactivate = False

    def deactivate_request(self) -> bytes:
        """The Deactivate Payload body for the proxy's own deactivation at the BMC."""
        return DeactivatePayloadRequest(instance=self.instance or 1).encode()

    async def deactivated(self, request: bytes, response: bytes) -> bytes:
        """The client's Deactivate Payload was relayed; ends the relay (whatever the BMC said)."""
        try:
            req = DeactivatePayloadRequest.decode(request)
        except SolError:
            return response
        if req.payload_type == sol.PAYLOAD_TYPE_SOL and self.active and req.instance == self.instance:
            await self.close("deactivated by the client")
        return response

    # -- packets ------------------------------------------------------------------------------
    async def from_client(self, payload: bytes) -> None:
        if self.relay is None:
            return  # not activated (or already ended): ipmitool's last ACKs land here
        async with self._order:
            if self.relay is None:
                return
            try:
                step = self.relay.from_client(SolPacket.decode(payload), now=trio.current_time(), forward=False)
            except SolError as exc:
                await self._fail(exc, "client")
                return
            await self._apply(step)

    async def from_bmc(self, payload: bytes) -> None:
        if self.relay is None:
            return
        async with self._order:
            if self.relay is None:
                return
            try:
                step = self.relay.from_bmc(SolPacket.decode(payload), now=trio.current_time())
            except SolError as exc:
                await self._fail(exc, "bmc")
                return
            await self._apply(step)

    async def _apply(self, step: sol.RelayStep) -> None:
        """Record, observe and send what one relay step decided (the caller holds ``_order``)."""
        assert self.relay is not None and self.terminal is not None
        now = trio.current_time()
        decided: Step | None = None
        if step.output:
            self.bytes_out += len(step.output)
            # Recorded before it is sent: a cancelled send must not leave seen bytes unrecorded.
            decided = self.terminal.output(step.output)
        for p in step.to_bmc:
            await self.send_bmc(p.encode())
        for p in step.to_client:
            await self.send_client(p.encode())
        if step.client_flags:
            # A serial BREAK can be a Magic SysRq on the host: the operations the client asked for
            # are audited (the characters are not: they go through the observer below).
            self.emit("bmc.ipmi.sol.operation", instance=self.instance,
                      operations=sol.describe_flags(step.client_flags, from_bmc=False))
        if step.input:
            self.bytes_in += len(step.input)
            await self._terminal_step(self.terminal.input(step.input), now)
        if decided is not None:
            await self._terminal_step(decided, now)
        if step.bmc_flags & SolStatus.DEACTIVATING:
            await self._end("deactivated by the BMC", notify=True)
            return
        self._wake.set()

    async def _terminal_step(self, step: Step, now: float) -> None:
        """Keys the observer released go to the BMC leg; its own words to the client leg."""
        assert self.relay is not None and self.terminal is not None
        if step.forward:
            for p in self.relay.bmc.send(bytes(step.forward), now=now):
                await self.send_bmc(p.encode())
        if step.to_client:
            for p in self.relay.client.send(bytes(step.to_client), now=now):
                await self.send_client(p.encode())
        if self.terminal.waiting and not self._timer_armed and self._nursery is not None:
            self._timer_armed = True
            self._nursery.start_soon(self._echo_timer)

    async def _echo_timer(self) -> None:
        """An Enter waiting for its echo is decided without it after ``echo_wait`` (see telnet/relay.py)."""
        try:
            while self.terminal is not None and self.terminal.waiting:
                left = self.terminal.wait_started + self.terminal.echo_wait - time.monotonic()
                if left > 0:
                    await trio.sleep(left)
                    continue
                async with self._order:
                    if self.terminal is not None and self.relay is not None and self.terminal.waiting:
                        await self._terminal_step(self.terminal.resume(timed_out=True), trio.current_time())
        finally:
            self._timer_armed = False

    # -- the retransmit timer -------------------------------------------------------------------
    async def run(self) -> None:
        """Retransmissions of both legs, until cancelled (start it in the IPMI session's nursery)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            while True:
                relay = self.relay
                deadline = relay.next_deadline() if relay is not None else None
                self._wake = trio.Event()
                with trio.move_on_at(deadline if deadline is not None else math.inf):
                    await self._wake.wait()
                async with self._order:
                    if self.relay is None:
                        continue
                    try:
                        step = self.relay.tick(trio.current_time())
                    except SolError as exc:
                        await self._fail(exc, exc.leg or "bmc")
                        continue
                    for p in step.to_bmc:
                        await self.send_bmc(p.encode())
                    for p in step.to_client:
                        await self.send_client(p.encode())

    async def _fail(self, exc: SolError, leg: str) -> None:
        if isinstance(exc, SolRetriesExhausted):
            reason = f"{leg}_unresponsive"
        else:
            reason = f"{leg}_protocol_error"
        log.info("session %s: SOL ended: %s: %s", self.session.id, reason, exc)
        await self._end(reason, notify=leg != "client" or not isinstance(exc, SolRetriesExhausted), error=str(exc))
        if self.on_failure is not None:
            # In a task of its own: it may ask the BMC something, and the caller may be the BMC
            # reader itself (``from_bmc``), which has to be free to read the answer.
            if self._nursery is not None:
                self._nursery.start_soon(self._call_failure, reason)
            else:
                await self._call_failure(reason)

    async def _call_failure(self, reason: str) -> None:
        assert self.on_failure is not None
        result = self.on_failure(reason)
        if hasattr(result, "__await__"):
            await result

    # -- the end ------------------------------------------------------------------------------
    async def close(self, reason: str) -> None:
        """End the activation (the client deactivated, or the IPMI session ends)."""
        async with self._order:
            await self._end(reason, notify=False)

    async def _end(self, reason: str, *, notify: bool, error: str | None = None) -> None:
        relay, terminal = self.relay, self.terminal
        if relay is None:
            return
        self.relay = None
        self.end_reason = reason
        fields: dict = {"instance": self.instance, "reason": reason, "bytes_in": self.bytes_in,
                        "bytes_out": self.bytes_out, "duration_ms": int((time.monotonic() - self._started) * 1000),
                        "retransmits": relay.client.retransmits + relay.bmc.retransmits,
                        "duplicates": relay.client.duplicates + relay.bmc.duplicates}
        if error:
            fields["error"] = error
        if terminal is not None:
            recorded, recordings = terminal.close()
            self.terminal = None
            fields.update(recorded)
            self.recordings += recordings
        fields["success"] = reason in _CLEAN_ENDS
        self.emit("bmc.ipmi.sol.end", **fields)
        if notify:
            # §15.9 status 10h: the payload is being deactivated (ipmitool: "SOL inactive").
            with trio.move_on_after(1):
                try:
                    await self.send_client(SolPacket(flags=SolStatus.DEACTIVATING).encode())
                except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
        self._wake.set()


# -- the engine hook ------------------------------------------------------------------------------

NETFN_APP = sol.NETFN_APP


def attach(ipmi: Any) -> SolSession:
    """Register SOL on one established IPMI session (``engines/ipmi/engine.py``'s hook: called
    after RAKP 3 succeeded, with ``ipmi.bmc`` logged in and ``ipmi.nursery`` running).

    - payload type 01h from the client → ``from_client``; from the BMC → ``from_bmc``;
    - Activate / Deactivate Payload (already allowed by the role and audited as
      ``bmc.ipmi.command``) are relayed here so the answers can be read and rewritten;
    - ``run`` (the retransmit timer) in the session's nursery; ``close`` when it ends, its
      recordings into the session's end event.
    """
    extra = ipmi.engine.listener.extra
    listener = getattr(ipmi.channel, "listener", None)
    port = listener.sock.getsockname()[1] if listener is not None else 623

    async def send_client(raw: bytes) -> None:
        await ipmi.send_to_client(sol.PAYLOAD_TYPE_SOL, raw)

    async def send_bmc(raw: bytes) -> None:
        await ipmi.bmc.send_payload(sol.PAYLOAD_TYPE_SOL, raw)

    async def failed(reason: str) -> None:
        # The SOL activation is over; the IPMI session goes on (ipmitool's keepalive decides).
        # The BMC still holds the payload active (the client went silent or broke the protocol):
        # free it, best effort.  A BMC that stopped answering is not asked.
        if reason != "bmc_unresponsive" and ipmi.bmc is not None:
            with trio.move_on_after(3):
                try:
                    await ipmi.bmc.request(NETFN_APP, sol.CMD_DEACTIVATE_PAYLOAD, solx.deactivate_request())
                except Exception as exc:  # noqa: BLE001 - best effort; the reason is already audited
                    log.info("session %s: SOL deactivation at the BMC failed: %s", ipmi.session.id, exc)

    solx = SolSession(ipmi.session, send_client=send_client, send_bmc=send_bmc, listener_port=port,
                      recording_dir=extra.get("recording_dir"), recording_input=extra.get("recording_input", False),
                      on_failure=failed)

    async def activate(req: Any) -> Any:
        cc = solx.check_activate(req.data)
        if cc is not None:
            return req.response(cc, b"")
        bmc_resp = await ipmi.bmc.request(req.netfn, req.cmd, req.data, rs_lun=req.rs_lun)
        answer = await solx.activated(req.data, bytes((bmc_resp.cc,)) + bmc_resp.data)
        if solx.pending_bmc_deactivate:
            solx.pending_bmc_deactivate = False
            with trio.move_on_after(3):
                await ipmi.bmc.request(NETFN_APP, sol.CMD_DEACTIVATE_PAYLOAD, solx.deactivate_request())
        return req.response(answer[0], answer[1:])

    async def deactivate(req: Any) -> Any:
        bmc_resp = await ipmi.bmc.request(req.netfn, req.cmd, req.data, rs_lun=req.rs_lun)
        answer = await solx.deactivated(req.data, bytes((bmc_resp.cc,)) + bmc_resp.data)
        return req.response(answer[0], answer[1:])

    async def closing() -> dict | None:
        # The IPMI session's own end reason ("client closed the session", "BMC connection lost: …").
        await solx.close(ipmi.session.details.get("end_reason") or "session closed")
        return {"recordings": list(solx.recordings)} if solx.recordings else None

    ipmi.payload_handlers[sol.PAYLOAD_TYPE_SOL] = solx.from_client
    ipmi.bmc.payload_handlers[sol.PAYLOAD_TYPE_SOL] = solx.from_bmc
    ipmi.command_hooks[(NETFN_APP, sol.CMD_ACTIVATE_PAYLOAD)] = activate
    ipmi.command_hooks[(NETFN_APP, sol.CMD_DEACTIVATE_PAYLOAD)] = deactivate
    ipmi.on_close.append(closing)
    ipmi.nursery.start_soon(solx.run)
    ipmi.sol = solx
    return solx
