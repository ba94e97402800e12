"""RELP, rsyslog's Reliable Event Logging Protocol: a sans-IO codec and the client session state.

Framing (librelp's ``doc/relp.html``, "RELP Frame"; the same grammar both ways):

    RELP-FRAME = TXNR SP COMMAND SP DATALEN [SP DATA] TRAILER
    TXNR       = 1*9DIGIT       ; 1..999999999, the client's transaction number
    COMMAND    = 1*32ALPHA      ; open, syslog, close, rsp, serverclose
    DATALEN    = 1*9DIGIT       ; octets of DATA; 0 means no SP and no DATA
    TRAILER    = LF             ; checked: a wrong byte here is a framing error

A response is ``TXNR rsp DATALEN SP CODE [SP TEXT] [LF CMDDATA]``: it reuses the
TXNR of the command it answers (``200`` ok, ``500`` refused).  The server may
send ``0 serverclose 0`` as a hint that it is going away.

A session (``RelpClient``): ``open`` offers ``relp_version=0`` and
``commands=syslog``; then each event is one ``syslog`` frame with the next
TXNR.  Frames are pipelined: the client keeps up to a window of unanswered
frames and the server answers each in order.  A ``200`` for TXNR n means the
server took message n (rsyslog has queued it); anything still unanswered when
the connection breaks may or may not have been taken and is sent again on a
new connection, so a receiver may see a message twice (RELP is
at-least-once; the event's ``seq`` tells a reader which ones are repeats).
TXNR wraps from 999999999 to 1 (relp.html, "Transaction Numbers").

The decoder keeps one ``bytearray`` and a read offset, compacts after a
frame is taken only when the consumed prefix is large, and refuses a
DATALEN above ``max_data`` before buffering the data.  No trio here.
"""

from __future__ import annotations

import collections
import re

import attrs

from dbproxy.errors import FrameTooLarge, LocalProtocolError, RemoteProtocolError
from dbproxy.sansio import NEED_DATA

MAX_TXNR = 999_999_999
MAX_DIGITS = 9
MAX_COMMAND = 32
DEFAULT_MAX_DATA = 128 * 1024 * 1024
OFFERS = b"relp_version=0\nrelp_software=dbproxy\ncommands=syslog"
_HEADER = re.compile(rb"([0-9]{1,9}) ([A-Za-z]{1,32}) ([0-9]{1,9})[ \n]")


@attrs.frozen
class Frame:
    txnr: int
    command: str
    data: bytes = b""


@attrs.frozen
class Response:
    """The DATA of an ``rsp`` frame, split: ``code`` (200 ok), ``text``, and for ``open`` the offers."""

    code: int
    text: str
    extra: bytes = b""

    @property
    def ok(self) -> bool:
        return self.code == 200


_OK = Response(200, "OK")


def encode_frame(txnr: int, command: str, data: bytes = b"") -> bytes:
    if not 0 <= txnr <= MAX_TXNR:
        raise LocalProtocolError(f"RELP txnr {txnr} out of range")
    if not (command.isascii() and command.isalpha() and 1 <= len(command) <= MAX_COMMAND):
        raise LocalProtocolError(f"RELP command {command!r} is not 1-32 letters")
    if len(data) > MAX_TXNR:
        raise LocalProtocolError(f"RELP data of {len(data)} bytes exceeds DATALEN's 9 digits")
    if data:
        return b"%d %s %d %b\n" % (txnr, command.encode(), len(data), data)
    return b"%d %s 0\n" % (txnr, command.encode())


def parse_response(data: bytes) -> Response:
    """``CODE [SP TEXT] [LF EXTRA]`` (relp.html, "rsp")."""
    head, _, extra = data.partition(b"\n")
    code_b, _, text = head.partition(b" ")
    if not (code_b.isdigit() and len(code_b) == 3):
        raise RemoteProtocolError(f"RELP rsp without a 3-digit status code: {bytes(data[:40])!r}")
    return Response(int(code_b), text.decode("utf-8", "replace"), extra)


class RelpDecoder:
    """Bytes in, ``Frame`` out (or ``NEED_DATA``); ``RemoteProtocolError`` on a malformed frame."""

    def __init__(self, max_data: int = DEFAULT_MAX_DATA) -> None:
        self.max_data = max_data
        self._buf = bytearray()
        self._pos = 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def _field(self, start: int, what: str, maxlen: int, digits: bool) -> tuple[bytes, int] | None:
        """The token from *start* up to the next SP/LF: (token, index of the delimiter), or None if incomplete."""
        buf = self._buf
        end = start
        limit = min(len(buf), start + maxlen + 1)
        while end < limit and buf[end] not in (0x20, 0x0A):
            end += 1
        token = bytes(buf[start:end])
        if len(token) > maxlen:
            raise RemoteProtocolError(f"RELP {what} longer than {maxlen} characters")
        ok = token.isdigit() if digits else (token.isalpha() and token.isascii())
        if token and not ok:
            raise RemoteProtocolError(f"RELP {what} malformed: {token[:40]!r}")
        if end >= len(buf):
            return None
        if not token:
            raise RemoteProtocolError(f"RELP frame with an empty {what}")
        return token, end

    def next_frame(self) -> Frame | object:
        buf = self._buf
        start = self._pos
        # Fast path: a well-formed header, matched in C; anything else goes the checking way below.
        m = _HEADER.match(buf, start)
        if m is not None:
            datalen = int(m[3])
            if datalen > self.max_data:
                raise FrameTooLarge(datalen, self.max_data, what="RELP frame data")
            i = m.end()
            if datalen == 0:
                if buf[i - 1] != 0x0A:
                    raise RemoteProtocolError("RELP frame with DATALEN 0 not followed by its LF trailer")
                return self._take(i, int(m[1]), m[2], b"")
            if buf[i - 1] != 0x20:
                raise RemoteProtocolError("RELP DATALEN not followed by SP")
            end = i + datalen + 1
            if len(buf) < end:
                return NEED_DATA
            if buf[end - 1] != 0x0A:
                raise RemoteProtocolError(f"RELP frame trailer is {bytes(buf[end - 1:end])!r}, not LF (DATALEN {datalen} wrong?)")
            return self._take(end, int(m[1]), m[2], bytes(buf[i : end - 1]))
        got = self._field(start, "TXNR", MAX_DIGITS, True)
        if got is None:
            return NEED_DATA
        txnr_b, i = got
        if buf[i] != 0x20:
            raise RemoteProtocolError("RELP frame ends after its TXNR")
        got = self._field(i + 1, "command", MAX_COMMAND, False)
        if got is None:
            return NEED_DATA
        command_b, i = got
        if buf[i] != 0x20:
            raise RemoteProtocolError("RELP frame ends after its command")
        got = self._field(i + 1, "DATALEN", MAX_DIGITS, True)
        if got is None:
            return NEED_DATA
        datalen_b, i = got
        datalen = int(datalen_b)
        if datalen > self.max_data:
            raise FrameTooLarge(datalen, self.max_data, what="RELP frame data")
        if datalen == 0:
            if buf[i] != 0x0A:
                raise RemoteProtocolError("RELP frame with DATALEN 0 not followed by its LF trailer")
            end = i + 1
            data = b""
        else:
            if buf[i] != 0x20:
                raise RemoteProtocolError("RELP DATALEN not followed by SP")
            end = i + 1 + datalen + 1
            if len(buf) < end:
                return NEED_DATA
            if buf[end - 1] != 0x0A:
                raise RemoteProtocolError(f"RELP frame trailer is {bytes(buf[end - 1:end])!r}, not LF (DATALEN {datalen} wrong?)")
            data = bytes(buf[i + 1 : end - 1])
        return self._take(end, int(txnr_b), command_b, data)

    def _take(self, end: int, txnr: int, command: bytes, data: bytes) -> Frame:
        self._pos = end
        if self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif self._pos > 65536 and self._pos * 2 > len(self._buf):
            del self._buf[: self._pos]
            self._pos = 0
        return Frame(txnr, command.decode("ascii"), data)

    next_message = next_frame


class RelpClient:
    """Client session state, sans-IO: what to send, and which messages the server has taken.

    ``open()`` → bytes of the open command; ``send(payload)`` → (txnr, frame bytes);
    ``receive_data(bytes)`` → the TXNRs of ``syslog`` frames acknowledged in that data, in order.
    Raises ``RemoteProtocolError`` on a refusal (``500``), an answer to nothing we sent,
    or ``serverclose``; the caller then reconnects and re-sends what was not acknowledged.
    """

    def __init__(self, max_data: int = 1024 * 1024) -> None:
        self.decoder = RelpDecoder(max_data=max_data)
        self._next = 1
        self._pending: collections.OrderedDict[int, str] = collections.OrderedDict()  # txnr -> command
        self.opened = False
        self.closed = False

    @property
    def unacknowledged(self) -> int:
        return sum(1 for c in self._pending.values() if c == "syslog")

    def _take_txnr(self) -> int:
        txnr = self._next
        self._next = 1 if txnr >= MAX_TXNR else txnr + 1
        return txnr

    def open(self) -> bytes:
        txnr = self._take_txnr()
        self._pending[txnr] = "open"
        return encode_frame(txnr, "open", OFFERS)

    def send(self, payload: bytes) -> tuple[int, bytes]:
        if not self.opened and "open" not in self._pending.values():
            raise LocalProtocolError("RELP: syslog before open")
        txnr = self._take_txnr()
        self._pending[txnr] = "syslog"
        return txnr, encode_frame(txnr, "syslog", payload)

    def close(self) -> bytes:
        txnr = self._take_txnr()
        self._pending[txnr] = "close"
        return encode_frame(txnr, "close")

    def receive_data(self, data: bytes) -> list[int]:
        self.decoder.feed(data)
        acked: list[int] = []
        while True:
            frame = self.decoder.next_frame()
            if frame is NEED_DATA:
                return acked
            if frame.command == "serverclose":
                self.closed = True
                raise RemoteProtocolError("RELP server is closing the session (serverclose)")
            if frame.command != "rsp":
                raise RemoteProtocolError(f"RELP server sent {frame.command!r}; a client expects rsp")
            command = self._pending.pop(frame.txnr, None)
            if command is None:
                raise RemoteProtocolError(f"RELP rsp for txnr {frame.txnr}, which has no command outstanding")
            # The common answer, without building a Response for each of thousands a second.
            rsp = _OK if frame.data == b"200 OK" else parse_response(frame.data)
            if not rsp.ok:
                raise RemoteProtocolError(f"RELP server refused {command} (txnr {frame.txnr}): {rsp.code} {rsp.text}")
            if command == "open":
                self.opened = True
            elif command == "close":
                self.closed = True
            elif command == "syslog":
                acked.append(frame.txnr)
