"""Telnet on the wire, sans-IO: commands, subnegotiation, NVT newlines and option negotiation.

Strategy (h11's shape).  ``TelnetProtocol`` is one end of one Telnet
connection: ``feed(bytes)`` takes what the peer sent, ``next_event()``
returns ``Data`` / ``Command`` / ``Subnegotiation`` / ``OptionChanged`` or
``NEED_DATA``, and ``data_to_send()`` hands out the negotiation answers the
fed bytes called for.  No sockets, no trio: the same events come out however
the input is split (``tests/unit/telnet``).

- RFC 854: ``IAC`` (255) starts a command; ``IAC IAC`` is a data byte 255.
  NOP, DM, BRK, IP, AO, AYT, EC, EL, GA come out as ``Command``.  The NVT's
  newline conventions: ``CR NUL`` is a bare carriage return, ``CR LF`` a
  newline.  Data comes out with the NUL after a CR removed; ``enter=True``
  (the client's side of the proxy: a keyboard's Enter) also drops the LF of
  ``CR LF``, so either form is one ``\\r`` (what a pty reads for Enter, and
  what telnetd makes of both, RFC 854 p. 11).
- RFC 855: ``IAC SB option … IAC SE``, with ``IAC IAC`` inside unescaped,
  capped at ``max_subnegotiation`` bytes (``FrameTooLarge`` past it).
- RFC 1143's Q method for WILL/WONT/DO/DONT: per option, our side (``us``)
  and the peer's (``him``) are NO / YES / WANTNO / WANTYES with a queue bit,
  so negotiation never loops and a request crossing the peer's is settled.
  The peer's offers are accepted only for the options in ``accept_local``
  (what we agree to do when asked DO) and ``accept_remote`` (what we let the
  peer do when it says WILL); everything else is refused (WONT / DONT).
  Each settled change comes out as ``OptionChanged``.

Helpers for the options the proxy speaks: NAWS (RFC 1073, window size),
TTYPE (RFC 1091, terminal type), ECHO (RFC 857), SGA (RFC 858).

Encoding the other way: ``encode_data`` (IAC doubled, a CR not followed by LF
sent as ``CR NUL``), ``encode_command``, ``encode_subnegotiation``.
"""

from __future__ import annotations

import re
import struct
from collections import deque

import attrs

from dbproxy.errors import FrameTooLarge
from dbproxy.sansio import NEED_DATA

# RFC 854 command codes
SE, NOP, DM, BRK, IP, AO, AYT, EC, EL, GA, SB = 240, 241, 242, 243, 244, 245, 246, 247, 248, 249, 250
WILL, WONT, DO, DONT, IAC = 251, 252, 253, 254, 255
COMMAND_NAMES = {SE: "SE", NOP: "NOP", DM: "DM", BRK: "BRK", IP: "IP", AO: "AO", AYT: "AYT", EC: "EC", EL: "EL",
                 GA: "GA", SB: "SB", WILL: "WILL", WONT: "WONT", DO: "DO", DONT: "DONT", IAC: "IAC"}

# Options
BINARY, ECHO, SGA, STATUS, TIMING_MARK = 0, 1, 3, 5, 6
TTYPE, NAWS, TSPEED, LFLOW, LINEMODE, XDISPLOC, ENVIRON, AUTHENTICATION, ENCRYPT, NEW_ENVIRON = \
    24, 31, 32, 33, 34, 35, 36, 37, 38, 39

# TTYPE subnegotiation verbs (RFC 1091)
TTYPE_IS, TTYPE_SEND = 0, 1

CR, LF, NUL = 0x0D, 0x0A, 0x00

DEFAULT_MAX_SUBNEGOTIATION = 4096

_IAC = b"\xff"
_SPECIAL = re.compile(rb"[\r\xff]")
_BARE_CR = re.compile(rb"\r(?!\n)")
_CR_NUL = re.compile(rb"\r\x00")
_ENTER = re.compile(rb"\r[\x00\n]")


@attrs.frozen
class Data:
    data: bytes


@attrs.frozen
class Command:
    code: int  # NOP, DM, BRK, IP, AO, AYT, EC, EL, GA


@attrs.frozen
class Subnegotiation:
    option: int
    payload: bytes  # IAC IAC already unescaped


@attrs.frozen
class OptionChanged:
    side: str  # "local" (we do it) | "remote" (the peer does it)
    option: int
    enabled: bool


# Q method states (RFC 1143 §7)
NO, YES, WANTNO, WANTYES = "NO", "YES", "WANTNO", "WANTYES"
EMPTY, OPPOSITE = False, True


@attrs.define
class _Q:
    state: str = NO
    queue: bool = EMPTY


# parser states
_DATA, _CR, _IAC_S, _NEG, _SB_OPT, _SB, _SB_IAC = range(7)


class TelnetProtocol:
    """One end of a Telnet connection (see the module docstring)."""

    def __init__(self, *, accept_local: set[int] | frozenset[int] = frozenset(),
                 accept_remote: set[int] | frozenset[int] = frozenset(), enter: bool = False,
                 max_subnegotiation: int = DEFAULT_MAX_SUBNEGOTIATION) -> None:
        self.accept_local = set(accept_local)
        self.accept_remote = set(accept_remote)
        self.enter = enter
        self.max_subnegotiation = max_subnegotiation
        self._us: dict[int, _Q] = {}
        self._him: dict[int, _Q] = {}
        self._events: deque = deque()
        self._out = bytearray()
        self._state = _DATA
        self._neg = 0
        self._sb_option = 0
        self._sb = bytearray()

    # -- option state ------------------------------------------------------------------
    def local_enabled(self, option: int) -> bool:
        q = self._us.get(option)
        return q is not None and q.state == YES

    def remote_enabled(self, option: int) -> bool:
        q = self._him.get(option)
        return q is not None and q.state == YES

    def state(self, side: str, option: int) -> str:
        table = self._us if side == "local" else self._him
        q = table.get(option)
        return q.state if q is not None else NO

    def request_local(self, option: int, enable: bool) -> None:
        """Offer (WILL) or withdraw (WONT) an option on our side (RFC 1143 §7, "we decide to…")."""
        self._request(self._us.setdefault(option, _Q()), option, enable, WILL, WONT, "local")

    def request_remote(self, option: int, enable: bool) -> None:
        """Ask the peer to start (DO) or stop (DONT) an option."""
        self._request(self._him.setdefault(option, _Q()), option, enable, DO, DONT, "remote")

    def _request(self, q: _Q, option: int, enable: bool, yes_cmd: int, no_cmd: int, side: str) -> None:
        if enable:
            if q.state == NO:
                q.state = WANTYES
                self._send_neg(yes_cmd, option)
            elif q.state == WANTNO and q.queue == EMPTY:
                q.queue = OPPOSITE
            elif q.state == WANTYES and q.queue == OPPOSITE:
                q.queue = EMPTY
        else:
            if q.state == YES:
                q.state = WANTNO
                self._send_neg(no_cmd, option)
                self._events.append(OptionChanged(side, option, False))
            elif q.state == WANTNO and q.queue == OPPOSITE:
                q.queue = EMPTY
            elif q.state == WANTYES and q.queue == EMPTY:
                q.queue = OPPOSITE

    def _send_neg(self, cmd: int, option: int) -> None:
        self._out += bytes((IAC, cmd, option))

    def _receive_neg(self, cmd: int, option: int) -> None:
        if cmd in (WILL, WONT):
            q = self._him.setdefault(option, _Q())
            agree = option in self.accept_remote
            self._receive(q, option, cmd == WILL, agree, DO, DONT, "remote")
        else:
            q = self._us.setdefault(option, _Q())
            agree = option in self.accept_local
            self._receive(q, option, cmd == DO, agree, WILL, WONT, "local")

    def _receive(self, q: _Q, option: int, positive: bool, agree: bool, yes_cmd: int, no_cmd: int,
                 side: str) -> None:
        was = q.state == YES
        if positive:  # WILL (him) / DO (us)
            if q.state == NO:
                if agree:
                    q.state = YES
                    self._send_neg(yes_cmd, option)
                else:
                    self._send_neg(no_cmd, option)
            elif q.state == WANTNO:
                # An answer of WILL to our DONT is an error (§7); with the queue bit it is what we now want.
                q.state = YES if q.queue == OPPOSITE else NO
                q.queue = EMPTY
            elif q.state == WANTYES:
                if q.queue == EMPTY:
                    q.state = YES
                else:
                    q.state = WANTNO
                    q.queue = EMPTY
                    self._send_neg(no_cmd, option)
        else:  # WONT (him) / DONT (us)
            if q.state == YES:
                q.state = NO
                self._send_neg(no_cmd, option)
            elif q.state == WANTNO:
                if q.queue == EMPTY:
                    q.state = NO
                else:
                    q.state = WANTYES
                    q.queue = EMPTY
                    self._send_neg(yes_cmd, option)
            elif q.state == WANTYES:
                q.state = NO
                q.queue = EMPTY
        now = q.state == YES
        if now != was:
            self._events.append(OptionChanged(side, option, now))

    # -- input -------------------------------------------------------------------------
    def feed(self, data: bytes | bytearray | memoryview) -> None:
        buf = bytes(data)
        n = len(buf)
        i = 0
        events = self._events
        while i < n:
            st = self._state
            if st == _DATA:
                # Data runs to the next IAC; newlines are normalized in one C-level pass per run (a
                # terminal's output has one CR per line: no Python work per line).
                j = buf.find(_IAC, i)
                end = n if j < 0 else j
                if end > i:
                    run = buf[i:end] if (i or end != n) else buf
                    if b"\r" in run:
                        cr_at_end = run[-1] == CR
                        run = (_ENTER if self.enter else _CR_NUL).sub(b"\r", run)
                    else:
                        cr_at_end = False
                    events.append(Data(run))
                else:
                    cr_at_end = False
                if j < 0:
                    if cr_at_end:
                        self._state = _CR  # the byte after it (NUL, or a client's LF) may come in the next chunk
                    return
                self._state = _IAC_S
                i = j + 1
            elif st == _CR:
                b = buf[i]
                self._state = _DATA
                if b == NUL or (b == LF and self.enter):
                    i += 1  # CR NUL is a bare CR; a client's CR LF is one Enter
                # else: the byte is processed in the data state (LF kept: a newline)
            elif st == _IAC_S:
                b = buf[i]
                i += 1
                if b == IAC:
                    events.append(Data(_IAC))
                    self._state = _DATA
                elif b in (WILL, WONT, DO, DONT):
                    self._neg = b
                    self._state = _NEG
                elif b == SB:
                    self._state = _SB_OPT
                else:
                    if b != SE:  # a stray SE outside a subnegotiation means nothing
                        events.append(Command(b))
                    self._state = _DATA
            elif st == _NEG:
                self._receive_neg(self._neg, buf[i])
                i += 1
                self._state = _DATA
            elif st == _SB_OPT:
                self._sb_option = buf[i]
                self._sb.clear()
                i += 1
                self._state = _SB
            elif st == _SB:
                j = buf.find(_IAC, i)
                end = n if j < 0 else j
                if len(self._sb) + end - i > self.max_subnegotiation:
                    raise FrameTooLarge(len(self._sb) + end - i, self.max_subnegotiation, what="telnet subnegotiation")
                self._sb += buf[i:end]
                i = end
                if j >= 0:
                    i += 1
                    self._state = _SB_IAC
            else:  # _SB_IAC
                b = buf[i]
                if b == IAC:
                    self._sb.append(IAC)
                    i += 1
                    self._state = _SB
                    continue
                events.append(Subnegotiation(self._sb_option, bytes(self._sb)))
                self._sb.clear()
                if b == SE:
                    i += 1
                    self._state = _DATA
                else:
                    # IAC <command> inside a subnegotiation (RFC 855 leaves it open): end it there and
                    # take the command as one (what BSD telnetd does with a missing SE).
                    self._state = _IAC_S

    def next_event(self):
        if self._events:
            return self._events.popleft()
        return NEED_DATA

    def events(self) -> list:
        """Every event the fed bytes made, in order (a convenience around ``next_event``)."""
        out = list(self._events)
        self._events.clear()
        return out

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    @property
    def idle(self) -> bool:
        """Between commands and subnegotiations (a chunk without IAC then is plain data)."""
        return self._state in (_DATA, _CR)

    # -- output --------------------------------------------------------------------------
    @staticmethod
    def encode_data(data: bytes) -> bytes:
        if not _SPECIAL.search(data):
            return data
        return _BARE_CR.sub(b"\r\0", data.replace(_IAC, b"\xff\xff"))

    @staticmethod
    def encode_command(code: int) -> bytes:
        return bytes((IAC, code))

    @staticmethod
    def encode_subnegotiation(option: int, payload: bytes) -> bytes:
        return bytes((IAC, SB, option)) + payload.replace(_IAC, b"\xff\xff") + bytes((IAC, SE))


# -- the options' payloads ------------------------------------------------------------------


def naws_payload(width: int, height: int) -> bytes:
    """RFC 1073: width and height as two 16-bit big-endian numbers (0: unknown)."""
    return struct.pack(">HH", max(0, min(width, 0xFFFF)), max(0, min(height, 0xFFFF)))


def parse_naws(payload: bytes) -> tuple[int, int] | None:
    if len(payload) != 4:
        return None
    width, height = struct.unpack(">HH", payload)
    return width, height


def ttype_send() -> bytes:
    return TelnetProtocol.encode_subnegotiation(TTYPE, bytes((TTYPE_SEND,)))


def ttype_is(name: str) -> bytes:
    return TelnetProtocol.encode_subnegotiation(TTYPE, bytes((TTYPE_IS,)) + name.encode("ascii", "replace"))


def parse_ttype(payload: bytes) -> tuple[str, str | None] | None:
    """("send", None) or ("is", NAME) for a TTYPE subnegotiation (RFC 1091), None for anything else."""
    if payload[:1] == bytes((TTYPE_SEND,)) and len(payload) == 1:
        return "send", None
    if payload[:1] == bytes((TTYPE_IS,)):
        name = payload[1:].decode("ascii", "replace")
        # A terminal type is letters, digits, '-', '/', '.', ':' ... (RFC 1091 §"IS"); anything else is dropped.
        name = "".join(c for c in name if c.isalnum() or c in "-_/.:+")[:40]
        return "is", name
    return None


__all__ = [
    "AO", "AYT", "BINARY", "BRK", "Command", "DM", "DO", "DONT", "Data", "EC", "ECHO", "EL", "GA", "IAC", "IP",
    "NAWS", "NEED_DATA", "NOP", "OptionChanged", "SB", "SE", "SGA", "Subnegotiation", "TTYPE", "TelnetProtocol",
    "WILL", "WONT", "naws_payload", "parse_naws", "parse_ttype", "ttype_is", "ttype_send",
]
