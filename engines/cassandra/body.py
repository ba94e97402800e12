"""CQL message bodies: the spec's notations and the layout every body shares.

Strategy: one bounds-checked ``Reader`` over a ``memoryview`` reads the
notations of v4 spec section 3 / v5 section 3 ([short], [int], [string],
[long string], [bytes], [value], [string map], [option]...) and raises
``CqlProtocolError`` (never ``struct.error``/``IndexError``) when a body is
shorter than its lengths say; the ``pack_*`` writers are their inverse for
the bodies the proxy originates.  ``message_reader`` positions a reader
past the optional body prefix (v4 section 2.2, v5 section 4: tracing id,
warnings, custom payload, driven by the header flags) so the per-opcode
parsers in ``requests.py`` / ``responses.py`` start at the message itself;
``guard`` holds those parsers to raising ProtocolErrors only (the fuzz tests
check it).
"""

from __future__ import annotations

import struct
from typing import Any, Iterable

import attrs

from dbproxy.errors import LocalProtocolError

from .frames import FLAG_CUSTOM_PAYLOAD, FLAG_TRACING, FLAG_WARNING, CqlProtocolError, Frame, Opcode

__all__ = [
    "SHORT", "INT", "UINT", "LONG", "Unset", "UNSET", "Reader", "BodyPrefix", "body_prefix", "message_reader",
    "guard", "pack_string", "pack_long_string", "pack_bytes", "pack_value", "pack_string_list",
    "auth_token_body",
]

SHORT = struct.Struct(">H")
INT = struct.Struct(">i")
UINT = struct.Struct(">I")
LONG = struct.Struct(">q")

_MAX_TYPE_DEPTH = 64


class Unset:
    __slots__ = ()

    def __repr__(self) -> str:
        return "UNSET"


UNSET = Unset()
"""A bound value sent as ``not set`` ([value] length -2, v4+)."""


_SHORT_FROM = SHORT.unpack_from
_INT_FROM = INT.unpack_from
_UINT_FROM = UINT.unpack_from
_LONG_FROM = LONG.unpack_from


def _truncated(what: str) -> CqlProtocolError:
    return CqlProtocolError(f"truncated CQL message body while reading {what}", client_hint="malformed CQL message body")


# --- body reader ----------------------------------------------------------------


class Reader:
    """Bounds-checked reads of the spec's notations (section 3) over a memoryview.

    Fixed-size fields are unpacked in place (``unpack_from``), not through a
    slice: the audit reads every request and result this way."""

    __slots__ = ("buf", "pos", "version", "end")

    def __init__(self, buf: bytes | memoryview, version: int, pos: int = 0) -> None:
        self.buf = memoryview(buf)
        self.pos = pos
        self.version = version
        self.end = len(self.buf)

    def _take(self, n: int, what: str) -> memoryview:
        start = self.pos
        end = start + n
        if n < 0 or end > self.end:
            raise _truncated(what)
        self.pos = end
        return self.buf[start:end]

    def _fixed(self, unpack: Any, size: int, what: str) -> int:
        start = self.pos
        if start + size > self.end:
            raise _truncated(what)
        self.pos = start + size
        return unpack(self.buf, start)[0]

    def byte(self) -> int:
        start = self.pos
        if start >= self.end:
            raise _truncated("[byte]")
        self.pos = start + 1
        return self.buf[start]

    def short(self) -> int:
        return self._fixed(_SHORT_FROM, 2, "[short]")

    def int32(self) -> int:
        return self._fixed(_INT_FROM, 4, "[int]")

    def uint32(self) -> int:
        return self._fixed(_UINT_FROM, 4, "[int]")

    def int64(self) -> int:
        return self._fixed(_LONG_FROM, 8, "[long]")

    def flags(self) -> int:
        """Query/batch flags: [byte] before v5, [int] from v5 (v5 spec section 9)."""
        if self.version >= 5:
            return self.uint32()
        return self.byte()

    def _text(self, raw: memoryview, what: str) -> str:
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError:
            raise CqlProtocolError(f"invalid UTF-8 in {what}", client_hint=f"invalid UTF-8 in {what}") from None

    def string(self) -> str:
        return self._text(self._take(self.short(), "[string]"), "[string]")

    def long_string(self) -> str:
        n = self.int32()
        if n < 0:
            raise CqlProtocolError("negative [long string] length", client_hint="malformed CQL message body")
        return self._text(self._take(n, "[long string]"), "[long string]")

    def bytes_(self) -> bytes | None:
        n = self.int32()
        if n < 0:
            return None
        return bytes(self._take(n, "[bytes]"))

    def short_bytes(self) -> bytes:
        return bytes(self._take(self.short(), "[short bytes]"))

    def value(self) -> bytes | None | Unset:
        n = self.int32()
        if n >= 0:
            return bytes(self._take(n, "[value]"))
        if n == -1 or self.version < 4:
            return None
        if n == -2:
            return UNSET
        raise CqlProtocolError(f"invalid [value] length {n}", client_hint="malformed bound value")

    def uuid(self) -> bytes:
        return bytes(self._take(16, "[uuid]"))

    def string_list(self) -> tuple[str, ...]:
        return tuple(self.string() for _ in range(self.short()))

    def string_map(self) -> dict[str, str]:
        out = {}
        for _ in range(self.short()):
            k = self.string()
            out[k] = self.string()
        return out

    def string_multimap(self) -> dict[str, list[str]]:
        out = {}
        for _ in range(self.short()):
            k = self.string()
            out[k] = list(self.string_list())
        return out

    def bytes_map(self) -> dict[str, bytes | None]:
        out = {}
        for _ in range(self.short()):
            k = self.string()
            out[k] = self.bytes_()
        return out

    def consistency(self) -> int:
        return self.short()

    def option(self, depth: int = 0) -> int:
        """Skip an [option] type description (spec 4.2.5.2); returns its id."""
        if depth > _MAX_TYPE_DEPTH:
            raise CqlProtocolError("CQL type description nested too deeply", client_hint="malformed type description")
        type_id = self.short()
        if type_id == 0x0000:  # custom: class name
            self._take(self.short(), "[string]")
        elif type_id in (0x0020, 0x0022):  # list, set
            self.option(depth + 1)
        elif type_id == 0x0021:  # map
            self.option(depth + 1)
            self.option(depth + 1)
        elif type_id == 0x0030:  # UDT
            self._take(self.short(), "[string]")
            self._take(self.short(), "[string]")
            for _ in range(self.short()):
                self._take(self.short(), "[string]")
                self.option(depth + 1)
        elif type_id == 0x0031:  # tuple
            for _ in range(self.short()):
                self.option(depth + 1)
        return type_id


# --- body prefix (tracing id, warnings, custom payload) ---------------------------


@attrs.frozen
class BodyPrefix:
    tracing_id: bytes | None
    warnings: tuple[str, ...]
    custom_payload: dict[str, bytes | None] | None
    size: int


def body_prefix(frame: Frame) -> BodyPrefix:
    """The optional elements that precede the message in the body (v4 2.2 / v5 4)."""
    r = Reader(frame.body(), frame.version)
    return _read_prefix(frame, r)


def _read_prefix(frame: Frame, r: Reader) -> BodyPrefix:
    tracing_id = None
    warnings: tuple[str, ...] = ()
    payload = None
    response = frame.is_response
    if response and frame.flags & FLAG_TRACING:
        tracing_id = r.uuid()
    if response and frame.flags & FLAG_WARNING:
        warnings = r.string_list()
    if frame.flags & FLAG_CUSTOM_PAYLOAD:
        payload = r.bytes_map()
    return BodyPrefix(tracing_id, warnings, payload, r.pos)


def message_reader(frame: Frame, *expected: int) -> Reader:
    if expected and frame.opcode not in expected:
        names = "/".join(Opcode(o).name for o in expected)
        raise LocalProtocolError(f"frame opcode {frame.opcode:#04x} is not {names}")
    r = Reader(frame.body(), frame.version)
    _read_prefix(frame, r)
    return r


def guard(fn):
    """Body parsers raise only ProtocolError subclasses (the fuzz tests hold us to it)."""

    def wrapper(frame: Frame, *args, **kwargs):
        try:
            return fn(frame, *args, **kwargs)
        except (struct.error, IndexError, ValueError) as exc:
            raise CqlProtocolError(
                f"malformed {fn.__name__.removeprefix('parse_').upper()} body: {exc}",
                client_hint="malformed CQL message body",
                stream=frame.stream,
                version=frame.version,
            ) from None

    wrapper.__name__ = fn.__name__
    wrapper.__qualname__ = fn.__qualname__
    wrapper.__doc__ = fn.__doc__
    return wrapper


# --- writers ----------------------------------------------------------------------

def pack_string(s: str) -> bytes:
    b = s.encode("utf-8")
    if len(b) > 0xFFFF:
        raise LocalProtocolError("[string] longer than 65535 bytes")
    return SHORT.pack(len(b)) + b


def pack_long_string(s: str) -> bytes:
    b = s.encode("utf-8")
    return INT.pack(len(b)) + b


def pack_bytes(b: bytes | None) -> bytes:
    if b is None:
        return INT.pack(-1)
    return INT.pack(len(b)) + bytes(b)


def pack_value(v: bytes | None | Unset) -> bytes:
    if v is UNSET:
        return INT.pack(-2)
    return pack_bytes(v)  # type: ignore[arg-type]


def pack_string_list(items: Iterable[str]) -> bytes:
    items = list(items)
    return SHORT.pack(len(items)) + b"".join(pack_string(s) for s in items)


def auth_token_body(token: bytes | None) -> bytes:
    """Body of AUTH_RESPONSE, AUTH_CHALLENGE and AUTH_SUCCESS: one [bytes]."""
    return pack_bytes(token)
