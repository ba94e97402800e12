"""PostgreSQL frontend/backend protocol v3 messages: classes, parsers, encoders.

Strategy: a decoded message is a tiny slotted ``Message(type, raw)`` whose
``raw`` holds its exact wire bytes (type byte + int32 length + body).  Nothing
in the body is parsed when the message is decoded, because almost all traffic
(DataRow, CopyData, …) is only forwarded.  The functions ``parse_*`` read the
body on demand with ``struct`` and ``bytes.index(b"\\0")`` (no per-byte
loops) and raise ``RemoteProtocolError`` on a malformed body.

Startup-phase packets have no type byte (protocol docs §55.2.1, "Start-up";
§55.7 "Message Formats": StartupMessage, SSLRequest, GSSENCRequest,
CancelRequest).  They are rare, so the decoder parses them eagerly into their
own classes, which also carry ``type == 0`` and ``raw``.

Encoders (``encode_*``) build the messages the proxy itself originates:
errors and notices in the client's wire format, the authentication exchange
it plays towards the client, and the startup/auth messages it sends to the
backend.

Text: identifiers, query text and error fields are decoded as UTF-8 with
``errors="replace"`` (the proxy looks at them for audit and policy; what it
forwards is ``raw``).  Passwords and SASL payloads stay ``bytes``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from typing import ClassVar

import attrs

from dbproxy.errors import MalformedMessage, RemoteProtocolError

# --------------------------------------------------------------------------
# Constants (§55.7; src/include/libpq/protocol.h PqMsg_*).


class FE:
    """Type bytes of frontend (client → server) messages."""

    BIND = ord("B")
    CLOSE = ord("C")
    COPY_DATA = ord("d")
    COPY_DONE = ord("c")
    COPY_FAIL = ord("f")
    DESCRIBE = ord("D")
    EXECUTE = ord("E")
    FLUSH = ord("H")
    FUNCTION_CALL = ord("F")
    # PasswordMessage, SASLInitialResponse, SASLResponse and GSSResponse share 'p';
    # only the authentication state tells them apart.
    PASSWORD = ord("p")
    PARSE = ord("P")
    QUERY = ord("Q")
    SYNC = ord("S")
    TERMINATE = ord("X")


class BE:
    """Type bytes of backend (server → client) messages."""

    AUTHENTICATION = ord("R")
    BACKEND_KEY_DATA = ord("K")
    BIND_COMPLETE = ord("2")
    CLOSE_COMPLETE = ord("3")
    COMMAND_COMPLETE = ord("C")
    COPY_DATA = ord("d")
    COPY_DONE = ord("c")
    COPY_IN_RESPONSE = ord("G")
    COPY_OUT_RESPONSE = ord("H")
    COPY_BOTH_RESPONSE = ord("W")
    DATA_ROW = ord("D")
    EMPTY_QUERY_RESPONSE = ord("I")
    ERROR_RESPONSE = ord("E")
    FUNCTION_CALL_RESPONSE = ord("V")
    NEGOTIATE_PROTOCOL_VERSION = ord("v")
    NO_DATA = ord("n")
    NOTICE_RESPONSE = ord("N")
    NOTIFICATION_RESPONSE = ord("A")
    PARAMETER_DESCRIPTION = ord("t")
    PARAMETER_STATUS = ord("S")
    PARSE_COMPLETE = ord("1")
    PORTAL_SUSPENDED = ord("s")
    READY_FOR_QUERY = ord("Z")
    ROW_DESCRIPTION = ord("T")


# Authentication request subtypes (§55.7 Authentication*).
AUTH_OK = 0
AUTH_KERBEROS_V5 = 2
AUTH_CLEARTEXT_PASSWORD = 3
AUTH_MD5_PASSWORD = 5
AUTH_GSS = 7
AUTH_GSS_CONTINUE = 8
AUTH_SSPI = 9
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12

# Startup-phase request codes (§55.7): 1234.5678 / 1234.5679 / 1234.5680.
PROTOCOL_3_0 = 196608  # (3 << 16) | 0
CANCEL_REQUEST_CODE = 80877102
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104

# ReadyForQuery transaction status indicators.
TX_IDLE = "I"
TX_IN_TRANSACTION = "T"
TX_FAILED = "E"

_I16 = struct.Struct(">h")
_I32 = struct.Struct(">i")
_U32 = struct.Struct(">I")
_II = struct.Struct(">ii")
_HDR = struct.Struct(">Bi")


def _text(b: bytes | memoryview) -> str:
    return bytes(b).decode("utf-8", "replace")


# --------------------------------------------------------------------------
# Message classes.


class Message:
    """One typed protocol message: ``raw`` = type byte + int32 length + body.

    A plain slotted class rather than attrs: the decoders build one per
    message on the hot path, and a frozen attrs ``__init__`` costs three times
    as much.  Immutable by convention; equal when type and bytes are equal.
    """

    __slots__ = ("type", "raw")

    def __init__(self, type: int, raw: bytes) -> None:
        self.type = type
        self.raw = raw

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not Message:
            return NotImplemented
        return self.type == other.type and self.raw == other.raw  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((self.type, self.raw))

    def __repr__(self) -> str:
        return f"Message(type={self.type!r}, raw={self.raw!r})"

    @property
    def body(self) -> bytes:
        return self.raw[5:]

    @property
    def type_char(self) -> str:
        return chr(self.type)


@attrs.frozen
class StartupMessage:
    """StartupMessage: protocol version (major << 16 | minor) and parameters.

    Parameters whose name starts with ``_pq_.`` are protocol options; a 3.x
    minor version above 0 or such options mean the engine should answer with
    NegotiateProtocolVersion (§55.2.1).
    """

    type: ClassVar[int] = 0
    protocol: int
    params: dict[str, str]
    raw: bytes

    @property
    def major(self) -> int:
        return self.protocol >> 16

    @property
    def minor(self) -> int:
        return self.protocol & 0xFFFF


@attrs.frozen
class SSLRequest:
    type: ClassVar[int] = 0
    raw: bytes


@attrs.frozen
class GSSENCRequest:
    type: ClassVar[int] = 0
    raw: bytes


@attrs.frozen
class CancelRequest:
    """CancelRequest.  ``secret`` is bytes: 4 in protocol 3.0, up to 256 in 3.2."""

    type: ClassVar[int] = 0
    pid: int
    secret: bytes
    raw: bytes


# Parsed bodies, returned by the parse_* functions.


@attrs.frozen
class Parse:
    statement: str
    query: str
    param_types: tuple[int, ...]


@attrs.frozen
class Bind:
    portal: str
    statement: str
    param_formats: tuple[int, ...]
    params: tuple[bytes | None, ...]
    result_formats: tuple[int, ...]

    def param_format(self, i: int) -> int:
        """The format code (0 text, 1 binary) of parameter ``i`` (§55.7 Bind)."""
        n = len(self.param_formats)
        if n == 0:
            return 0
        if n == 1:
            return self.param_formats[0]
        return self.param_formats[i]


@attrs.frozen
class Execute:
    portal: str
    max_rows: int


@attrs.frozen
class DescribeOrClose:
    kind: str  # "S" prepared statement, "P" portal
    name: str


@attrs.frozen
class Authentication:
    subtype: int
    data: bytes


@attrs.frozen
class BackendKeyData:
    pid: int
    secret: bytes


@attrs.frozen
class Notification:
    pid: int
    channel: str
    payload: str


@attrs.frozen
class NegotiateProtocolVersion:
    version: int  # the server's full version number, (3 << 16) | newest minor
    unrecognized_options: tuple[str, ...]


@attrs.frozen
class SASLInitialResponse:
    mechanism: str
    data: bytes | None


# --------------------------------------------------------------------------
# Body reader for the parsers.


class _Reader:
    __slots__ = ("raw", "pos")

    def __init__(self, msg: Message | bytes, offset: int = 5) -> None:
        self.raw = msg if isinstance(msg, (bytes, bytearray)) else msg.raw
        self.pos = offset

    def cstr(self) -> bytes:
        end = self.raw.index(b"\0", self.pos)
        out = self.raw[self.pos:end]
        self.pos = end + 1
        return out

    def i16(self) -> int:
        v = _I16.unpack_from(self.raw, self.pos)[0]
        self.pos += 2
        return v

    def i32(self) -> int:
        v = _I32.unpack_from(self.raw, self.pos)[0]
        self.pos += 4
        return v

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.raw):
            raise ValueError("field runs past the end of the message")
        out = self.raw[self.pos:self.pos + n]
        self.pos += n
        return out

    def int16s(self, n: int) -> tuple[int, ...]:
        if n < 0:
            raise ValueError("negative count")
        v = struct.unpack_from(f">{n}h", self.raw, self.pos)
        self.pos += 2 * n
        return v

    def rest(self) -> bytes:
        out = self.raw[self.pos:]
        self.pos = len(self.raw)
        return out


def _malformed(what: str, exc: Exception, msg: Message | bytes, *, secret: bool = False) -> MalformedMessage:
    """The error of a body that does not parse: a ``MalformedMessage`` naming the message
    (the pipeline audits it as ``audit.malformed``).  ``secret`` bodies (passwords, SASL
    data) keep no bytes."""
    raw = msg if isinstance(msg, (bytes, bytearray)) else msg.raw
    code = chr(raw[0]) if raw else None
    if what == "Describe/Close" and code is not None:
        what = "Close" if code == "C" else "Describe"
    return MalformedMessage(
        f"malformed {what} message: {exc}", client_hint=f"malformed {what} message",
        type_name=what, type_code=code, raw=b"" if secret else raw, length=len(raw),
    )


# --------------------------------------------------------------------------
# Parsers: frontend messages.


def parse_query(msg: Message) -> str:
    """Query ('Q'): the SQL text."""
    try:
        return _text(_Reader(msg).cstr())
    except (ValueError, struct.error) as exc:
        raise _malformed("Query", exc, msg) from None


def parse_parse(msg: Message) -> Parse:
    """Parse ('P'): statement name, query, parameter type OIDs."""
    try:
        r = _Reader(msg)
        name = _text(r.cstr())
        query = _text(r.cstr())
        n = r.i16()
        if n < 0:
            raise ValueError("negative parameter count")
        types = struct.unpack_from(f">{n}I", r.raw, r.pos)
        return Parse(name, query, types)
    except (ValueError, struct.error) as exc:
        raise _malformed("Parse", exc, msg) from None


def parse_bind(msg: Message) -> Bind:
    """Bind ('B'): portal, statement, parameter formats and values (None = NULL)."""
    try:
        r = _Reader(msg)
        portal = _text(r.cstr())
        stmt = _text(r.cstr())
        formats = r.int16s(r.i16())
        n = r.i16()
        if n < 0:
            raise ValueError("negative parameter count")
        params: list[bytes | None] = []
        append = params.append
        for _ in range(n):
            ln = r.i32()
            append(None if ln == -1 else r.take(ln))
        results = r.int16s(r.i16())
        return Bind(portal, stmt, formats, tuple(params), results)
    except (ValueError, struct.error) as exc:
        raise _malformed("Bind", exc, msg) from None


def parse_execute(msg: Message) -> Execute:
    """Execute ('E' from the frontend): portal and row limit (0 = no limit)."""
    try:
        r = _Reader(msg)
        portal = _text(r.cstr())
        return Execute(portal, r.i32())
    except (ValueError, struct.error) as exc:
        raise _malformed("Execute", exc, msg) from None


def parse_describe(msg: Message) -> DescribeOrClose:
    """Describe ('D' from the frontend) or Close ('C' from the frontend)."""
    try:
        r = _Reader(msg)
        kind = chr(r.take(1)[0])
        return DescribeOrClose(kind, _text(r.cstr()))
    except (ValueError, struct.error) as exc:
        raise _malformed("Describe/Close", exc, msg) from None


parse_close = parse_describe


def parse_password(msg: Message) -> bytes:
    """PasswordMessage ('p' during cleartext/md5 auth): the password bytes."""
    try:
        return _Reader(msg).cstr()
    except ValueError as exc:
        raise _malformed("PasswordMessage", exc, msg, secret=True) from None


def parse_sasl_initial_response(msg: Message) -> SASLInitialResponse:
    """SASLInitialResponse ('p' after AuthenticationSASL): mechanism + initial data."""
    try:
        r = _Reader(msg)
        mech = _text(r.cstr())
        n = r.i32()
        data = None if n == -1 else r.take(n)
        return SASLInitialResponse(mech, data)
    except (ValueError, struct.error) as exc:
        raise _malformed("SASLInitialResponse", exc, msg, secret=True) from None


def parse_sasl_response(msg: Message) -> bytes:
    """SASLResponse / GSSResponse ('p'): the whole body is mechanism data."""
    return msg.raw[5:]


parse_gss_response = parse_sasl_response


def parse_copy_data(msg: Message) -> bytes:
    return msg.raw[5:]


# --------------------------------------------------------------------------
# Parsers: backend messages.


def parse_command_complete(msg: Message) -> str:
    """CommandComplete ('C' from the backend): the command tag, e.g. ``INSERT 0 5``."""
    try:
        return _text(_Reader(msg).cstr())
    except ValueError as exc:
        raise _malformed("CommandComplete", exc, msg) from None


# Tags whose last word is a row count (§55.7 CommandComplete).
_ROW_COUNT_TAGS = frozenset({"INSERT", "DELETE", "UPDATE", "MERGE", "SELECT", "MOVE", "FETCH", "COPY"})


def rows_from_tag(tag: str) -> int | None:
    """The affected/returned row count in a command tag, or None if it has none.

    ``INSERT 0 5`` → 5, ``UPDATE 3`` → 3, ``SELECT 7`` → 7, ``COPY 10`` → 10,
    ``CREATE TABLE`` → None.
    """
    parts = tag.split()
    if len(parts) < 2 or parts[0] not in _ROW_COUNT_TAGS:
        return None
    last = parts[-1]
    return int(last) if last.isdigit() else None


def parse_error_fields(msg: Message) -> dict[str, str]:
    """ErrorResponse / NoticeResponse: {field code: value} (§55.8), e.g. S, V, C, M, D, H."""
    body = msg.raw[5:]
    if not body or body[-1] != 0:
        raise _malformed("ErrorResponse/NoticeResponse", ValueError("missing terminator"), msg)
    fields: dict[str, str] = {}
    for part in body[:-1].split(b"\0"):
        if not part:
            break
        fields[chr(part[0])] = _text(part[1:])
    return fields


parse_notice_fields = parse_error_fields


def parse_parameter_status(msg: Message) -> tuple[str, str]:
    """ParameterStatus ('S' from the backend): (name, value)."""
    try:
        r = _Reader(msg)
        return _text(r.cstr()), _text(r.cstr())
    except ValueError as exc:
        raise _malformed("ParameterStatus", exc, msg) from None


def parse_backend_key_data(msg: Message) -> BackendKeyData:
    """BackendKeyData ('K'): process id and secret key (4 bytes in 3.0, ≤256 in 3.2)."""
    try:
        r = _Reader(msg)
        pid = r.i32()
        secret = r.rest()
        if not 4 <= len(secret) <= 256:
            raise ValueError(f"secret key of {len(secret)} bytes")
        return BackendKeyData(pid, secret)
    except (ValueError, struct.error) as exc:
        raise _malformed("BackendKeyData", exc, msg) from None


def parse_authentication(msg: Message) -> Authentication:
    """Authentication* ('R'): subtype (AUTH_*) and the subtype's data."""
    try:
        r = _Reader(msg)
        return Authentication(r.i32(), r.rest())
    except struct.error as exc:
        raise _malformed("Authentication", exc, msg) from None


def sasl_mechanisms(data: bytes) -> list[str]:
    """The mechanism list of an AuthenticationSASL's data, in the server's order."""
    return [_text(m) for m in data.split(b"\0") if m]


def parse_ready_for_query(msg: Message) -> str:
    """ReadyForQuery ('Z'): transaction status "I", "T" or "E"."""
    if len(msg.raw) != 6:
        raise _malformed("ReadyForQuery", ValueError(f"{len(msg.raw)} bytes"), msg)
    return chr(msg.raw[5])


def parse_notification(msg: Message) -> Notification:
    """NotificationResponse ('A'): sender pid, channel, payload."""
    try:
        r = _Reader(msg)
        pid = r.i32()
        return Notification(pid, _text(r.cstr()), _text(r.cstr()))
    except (ValueError, struct.error) as exc:
        raise _malformed("NotificationResponse", exc, msg) from None


def parse_negotiate_protocol_version(msg: Message) -> NegotiateProtocolVersion:
    """NegotiateProtocolVersion ('v'): server version and the options it did not recognise."""
    try:
        r = _Reader(msg)
        version = r.i32()
        n = r.i32()
        if n < 0:
            raise ValueError("negative option count")
        return NegotiateProtocolVersion(version, tuple(_text(r.cstr()) for _ in range(n)))
    except (ValueError, struct.error) as exc:
        raise _malformed("NegotiateProtocolVersion", exc, msg) from None


def parse_startup_params(body: bytes) -> dict[str, str]:
    """The name/value pairs of a StartupMessage body after the version word.

    The list is NUL-separated pairs closed by one extra NUL (PostgreSQL
    rejects a packet whose last byte is not that terminator).
    """
    if not body or body[-1] != 0:
        raise RemoteProtocolError(
            "invalid startup packet layout: expected terminator as last byte",
            client_hint="invalid startup packet layout",
        )
    parts = body[:-1].split(b"\0")
    # body[:-1] ends with the NUL of the last value, so split leaves one empty tail.
    if parts[-1] != b"" or len(parts) % 2 != 1:
        raise RemoteProtocolError(
            "invalid startup packet layout: parameter without value",
            client_hint="invalid startup packet layout",
        )
    params: dict[str, str] = {}
    for i in range(0, len(parts) - 1, 2):
        if not parts[i]:
            raise RemoteProtocolError(
                "invalid startup packet layout: empty parameter name",
                client_hint="invalid startup packet layout",
            )
        params[_text(parts[i])] = _text(parts[i + 1])
    return params


# --------------------------------------------------------------------------
# Encoders.


def encode_message(type_: int | bytes | str, body: bytes = b"") -> bytes:
    """A typed message: type byte, int32 length (self-inclusive), body."""
    if isinstance(type_, str):
        type_ = ord(type_)
    elif isinstance(type_, bytes):
        type_ = type_[0]
    return _HDR.pack(type_, len(body) + 4) + body


def _cstr(s: str | bytes) -> bytes:
    b = s.encode("utf-8") if isinstance(s, str) else bytes(s)
    if b"\0" in b:
        raise ValueError("protocol strings cannot contain NUL")
    return b + b"\0"


def _fields_message(type_: int, severity: str, sqlstate: str, message: str,
                    detail: str | None, hint: str | None) -> bytes:
    # S is the localized severity, V (9.6+) the non-localized one; clients read either.
    parts = [b"S", _cstr(severity), b"V", _cstr(severity), b"C", _cstr(sqlstate), b"M", _cstr(message)]
    if detail is not None:
        parts += [b"D", _cstr(detail)]
    if hint is not None:
        parts += [b"H", _cstr(hint)]
    parts.append(b"\0")
    return encode_message(type_, b"".join(parts))


def encode_error(severity: str, sqlstate: str, message: str,
                 detail: str | None = None, hint: str | None = None) -> bytes:
    """ErrorResponse with fields S, V, C, M (+ D, H).  Severity: ERROR / FATAL / PANIC."""
    return _fields_message(BE.ERROR_RESPONSE, severity, sqlstate, message, detail, hint)


def encode_notice(severity: str, sqlstate: str, message: str,
                  detail: str | None = None, hint: str | None = None) -> bytes:
    """NoticeResponse.  Severity: WARNING / NOTICE / DEBUG / INFO / LOG."""
    return _fields_message(BE.NOTICE_RESPONSE, severity, sqlstate, message, detail, hint)


def encode_ready_for_query(status: str | bytes = TX_IDLE) -> bytes:
    s = status.encode("ascii") if isinstance(status, str) else status
    if s not in (b"I", b"T", b"E"):
        raise ValueError(f"invalid transaction status {status!r}")
    return b"Z\0\0\0\x05" + s


def encode_auth_request(subtype: int, data: bytes = b"") -> bytes:
    """Authentication* ('R') with any subtype and its raw data."""
    return encode_message(BE.AUTHENTICATION, _I32.pack(subtype) + data)


def encode_auth_ok() -> bytes:
    return encode_auth_request(AUTH_OK)


def encode_auth_cleartext() -> bytes:
    return encode_auth_request(AUTH_CLEARTEXT_PASSWORD)


def encode_auth_md5(salt: bytes) -> bytes:
    if len(salt) != 4:
        raise ValueError("the MD5 salt is 4 bytes")
    return encode_auth_request(AUTH_MD5_PASSWORD, salt)


def encode_auth_sasl(mechanisms: Iterable[str]) -> bytes:
    """AuthenticationSASL: NUL-terminated mechanism names and a final NUL."""
    return encode_auth_request(AUTH_SASL, b"".join(_cstr(m) for m in mechanisms) + b"\0")


def encode_auth_sasl_continue(data: bytes) -> bytes:
    return encode_auth_request(AUTH_SASL_CONTINUE, data)


def encode_auth_sasl_final(data: bytes) -> bytes:
    return encode_auth_request(AUTH_SASL_FINAL, data)


def encode_backend_key_data(pid: int, secret: bytes | int) -> bytes:
    if isinstance(secret, int):
        secret = _I32.pack(secret)
    return encode_message(BE.BACKEND_KEY_DATA, _I32.pack(pid) + secret)


def encode_parameter_status(name: str, value: str) -> bytes:
    return encode_message(BE.PARAMETER_STATUS, _cstr(name) + _cstr(value))


def encode_negotiate_protocol_version(minor: int, unrecognized_options: Iterable[str] = ()) -> bytes:
    """NegotiateProtocolVersion: newest 3.x minor we support + options we ignored.

    The int32 on the wire is the full version number ``(3 << 16) | minor``:
    PostgreSQL sends PG_PROTOCOL_LATEST / FrontendProtocol there and libpq
    compares it as a full version.
    """
    opts = list(unrecognized_options)
    body = _II.pack((3 << 16) | minor, len(opts)) + b"".join(_cstr(o) for o in opts)
    return encode_message(BE.NEGOTIATE_PROTOCOL_VERSION, body)


def encode_command_complete(tag: str) -> bytes:
    return encode_message(BE.COMMAND_COMPLETE, _cstr(tag))


def encode_empty_query_response() -> bytes:
    return b"I\0\0\0\x04"


def _startup_packet(body: bytes) -> bytes:
    return _I32.pack(len(body) + 4) + body


def encode_startup(params: Mapping[str, str], protocol: int = PROTOCOL_3_0) -> bytes:
    """StartupMessage (no type byte): version, name/value pairs, final NUL."""
    body = _I32.pack(protocol) + b"".join(_cstr(k) + _cstr(v) for k, v in params.items()) + b"\0"
    return _startup_packet(body)


def encode_ssl_request() -> bytes:
    return _startup_packet(_I32.pack(SSL_REQUEST_CODE))


def encode_gssenc_request() -> bytes:
    return _startup_packet(_I32.pack(GSSENC_REQUEST_CODE))


def encode_cancel_request(pid: int, secret: bytes | int) -> bytes:
    if isinstance(secret, int):
        secret = _I32.pack(secret)
    return _startup_packet(_II.pack(CANCEL_REQUEST_CODE, pid) + secret)


def encode_password(password: str | bytes) -> bytes:
    """PasswordMessage ('p'): cleartext password or the md5 response."""
    return encode_message(FE.PASSWORD, _cstr(password))


def encode_sasl_initial(mechanism: str, data: bytes | None) -> bytes:
    """SASLInitialResponse ('p'): mechanism, int32 length (-1: none), data."""
    tail = _I32.pack(-1) if data is None else _I32.pack(len(data)) + data
    return encode_message(FE.PASSWORD, _cstr(mechanism) + tail)


def encode_sasl_response(data: bytes) -> bytes:
    return encode_message(FE.PASSWORD, data)


def encode_gss_response(data: bytes) -> bytes:
    return encode_message(FE.PASSWORD, data)


def encode_query(sql: str) -> bytes:
    return encode_message(FE.QUERY, _cstr(sql))


def encode_terminate() -> bytes:
    return b"X\0\0\0\x04"


def encode_sync() -> bytes:
    return b"S\0\0\0\x04"
