"""Bound values and codes as audit text (native protocol v4 section 6, v5 section 5).

A bound [value] is rendered by its CQL type when the prepared statement's
bind types are known (``PreparedInfo.types``), else as base64; a value that
does not decode as its type is audited as base64 too (the node will refuse
it; the record says what was sent).  Consistency levels and error codes are
named, unknown ones kept as numbers.
"""

from __future__ import annotations

import datetime
import ipaddress
import struct
import uuid
from typing import TYPE_CHECKING, Any

from dbproxy.audit import events as ev

from . import protocol as F

if TYPE_CHECKING:
    from .prepared import PreparedInfo


#: Names by value: a dict look-up per audited request instead of an enum construction.
_CONSISTENCY_NAMES = {c.value: c.name for c in F.Consistency}


def consistency_name(value: int | None) -> str | None:
    if value is None:
        return None
    name = _CONSISTENCY_NAMES.get(value)
    return name if name is not None else str(value)


def error_name(code: int) -> str:
    try:
        return F.ErrorCode(code).name
    except ValueError:
        return f"{code:#06x}"


_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
_DATE_EPOCH = datetime.date(1970, 1, 1)


def _text(b: bytes) -> str:
    return b.decode("utf-8", "replace")


def _timestamp(b: bytes) -> str:
    ms = struct.unpack(">q", b)[0]
    return (_EPOCH + datetime.timedelta(milliseconds=ms)).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _date(b: bytes) -> str:
    days = struct.unpack(">I", b)[0] - (1 << 31)  # spec 6.2x: unsigned, epoch at 2**31
    return (_DATE_EPOCH + datetime.timedelta(days=days)).isoformat()


def _time(b: bytes) -> str:
    ns = struct.unpack(">q", b)[0]
    seconds, nanos = divmod(ns, 1_000_000_000)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}.{nanos:09d}"


# [option] ids (spec 4.2.5.2) → serialisation of section 6 (v4) / 5 (v5).
_DECODERS = {
    0x0001: _text,  # ascii
    0x0002: lambda b: str(struct.unpack(">q", b)[0]),  # bigint
    0x0004: lambda b: "true" if b != b"\x00" else "false",  # boolean
    0x0005: lambda b: str(struct.unpack(">q", b)[0]),  # counter
    0x0007: lambda b: repr(struct.unpack(">d", b)[0]),  # double
    0x0008: lambda b: repr(struct.unpack(">f", b)[0]),  # float
    0x0009: lambda b: str(struct.unpack(">i", b)[0]),  # int
    0x000A: _text,  # text
    0x000B: _timestamp,
    0x000C: lambda b: str(uuid.UUID(bytes=b)),  # uuid
    0x000D: _text,  # varchar
    0x000E: lambda b: str(int.from_bytes(b, "big", signed=True)),  # varint
    0x000F: lambda b: str(uuid.UUID(bytes=b)),  # timeuuid
    0x0010: lambda b: str(ipaddress.ip_address(b)),  # inet
    0x0011: _date,
    0x0012: _time,
    0x0013: lambda b: str(struct.unpack(">h", b)[0]),  # smallint
    0x0014: lambda b: str(struct.unpack(">b", b)[0]),  # tinyint
}


def render_value(value: Any, type_id: int | None = None) -> str | None:
    """A bound [value] as audit text: decoded by its CQL type when known, else base64."""
    if value is None:
        return None
    if value is F.UNSET:
        return "<unset>"
    decode = _DECODERS.get(type_id) if type_id is not None else None
    if decode is not None:
        try:
            return ev.truncate(decode(value), ev.MAX_PARAM_CHARS)
        except (struct.error, ValueError, OverflowError):
            pass
    return ev.param_text(value, binary=True)


def render_values(values: tuple, names: tuple[str, ...] | None, info: "PreparedInfo | None") -> list | dict:
    if info is None:
        rendered = [render_value(v) for v in values]
        return dict(zip(names, rendered)) if names else rendered
    if names:
        by_name = dict(zip(info.names, info.types))
        return {n: render_value(v, by_name.get(n)) for n, v in zip(names, values)}
    types = info.types
    return [render_value(v, types[i] if i < len(types) else None) for i, v in enumerate(values)]
