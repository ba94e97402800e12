"""Body checks of a tapped session's requests: do they parse, without parsing them?

The tee (``tap.CqlTee``) must not forward a request whose body the audit
cannot parse (the malformed rule).  Running the audit's parser on the proxy
would keep half of the audit's cost there, so the two requests drivers send
by the thousand — EXECUTE and QUERY (native protocol v4/v5 §4.1.4, §4.1.6) —
are walked in place: bounds, lengths, the [value] rule, UTF-8 of every
[string]/[long string] the parser decodes, no objects built.  A check
accepts only what ``requests.parse_execute`` / ``parse_query`` accept
(tests/unit/cassandra/test_cql_checks.py holds them together with
hypothesis); whatever it does not accept — and every other request, a
compressed v3/v4 body, a body with a custom payload — goes to the parser,
which decides.  So the check can make the proxy faster, never laxer.
"""

from __future__ import annotations

import struct
from typing import Any

from . import protocol as F

_H = struct.Struct(">H").unpack_from
_I = struct.Struct(">i").unpack_from
_U = struct.Struct(">I").unpack_from
# <query_parameters> flags (§4.1.4), as module constants: read per checked request.
_QF_VALUES = F.QF_VALUES
_QF_NAMES_FOR_VALUES = F.QF_NAMES_FOR_VALUES
_QF_PAGE_SIZE = F.QF_PAGE_SIZE
_QF_PAGING_STATE = F.QF_PAGING_STATE
_QF_SERIAL_CONSISTENCY = F.QF_SERIAL_CONSISTENCY
_QF_TIMESTAMP = F.QF_TIMESTAMP
_QF_KEYSPACE = F.QF_KEYSPACE
_QF_NOW_IN_SECONDS = F.QF_NOW_IN_SECONDS


def _string_end(d: Any, p: int, end: int) -> int:
    """End of the [string] at ``p`` (valid UTF-8), or -1."""
    if p + 2 > end:
        return -1
    q = p + 2 + _H(d, p)[0]
    if q > end:
        return -1
    try:
        str(d[p + 2:q], "utf-8")
    except UnicodeDecodeError:
        return -1
    return q


def _parameters_end(d: Any, p: int, end: int, version: int) -> int:
    """End of the <query_parameters> at ``p`` (§4.1.4), or -1 where the parser would refuse them."""
    if version >= 5:
        if p + 6 > end:
            return -1
        flags = _U(d, p + 2)[0]
        p += 6
    else:
        if p + 3 > end:
            return -1
        flags = d[p + 2]
        p += 3
    if flags & _QF_VALUES:
        if p + 2 > end:
            return -1
        n = _H(d, p)[0]
        p += 2
        names = flags & _QF_NAMES_FOR_VALUES
        for _ in range(n):
            if names:
                p = _string_end(d, p, end)
                if p < 0:
                    return -1
            if p + 4 > end:
                return -1
            size = _I(d, p)[0]
            p += 4
            if size >= 0:
                p += size
                if p > end:
                    return -1
            elif size != -1 and version >= 4 and size != -2:
                return -1  # [value]: -1 null, -2 unset (v4+), nothing else below 0
    if flags & _QF_PAGE_SIZE:
        p += 4
    if flags & _QF_PAGING_STATE:
        if p + 4 > end:
            return -1
        size = _I(d, p)[0]
        p += 4
        if size > 0:
            p += size
    if flags & _QF_SERIAL_CONSISTENCY:
        p += 2
    if flags & _QF_TIMESTAMP:
        p += 8
    if p > end:
        return -1
    if version >= 5:
        if flags & _QF_KEYSPACE:
            p = _string_end(d, p, end)
            if p < 0:
                return -1
        if flags & _QF_NOW_IN_SECONDS:
            p += 4
            if p > end:
                return -1
    return p


def execute_ok(d: Any, p: int, end: int, version: int) -> bool:
    """EXECUTE (§4.1.6): <id>[short bytes] (v5 <result_metadata_id>[short bytes]) <query_parameters>."""
    for _ in range(2 if version >= 5 else 1):
        if p + 2 > end:
            return False
        p += 2 + _H(d, p)[0]
    return p <= end and _parameters_end(d, p, end, version) >= 0


def query_ok(d: Any, p: int, end: int, version: int) -> bool:
    """QUERY (§4.1.4): <query>[long string] <query_parameters>."""
    if p + 4 > end:
        return False
    size = _I(d, p)[0]
    q = p + 4 + size
    if size < 0 or q > end:
        return False
    try:
        str(d[p + 4:q], "utf-8")
    except UnicodeDecodeError:
        return False
    return _parameters_end(d, q, end, version) >= 0


#: The requests checked in place; the others go to their parser.
CHECKS = {F.Opcode.EXECUTE: execute_ok, F.Opcode.QUERY: query_ok}
_NEEDS_PARSER = F.FLAG_COMPRESSION | F.FLAG_CUSTOM_PAYLOAD


def parses(frame: F.Frame) -> bool:
    """True when the request's body certainly parses (no parser run); False: ask the parser."""
    return envelope_parses(frame.opcode, frame.flags, frame.raw, frame.body_offset, frame.version)


def envelope_parses(opcode: int, flags: int, raw: bytes, body_offset: int, version: int) -> bool:
    """``parses`` over a frame's fields (``CqlDecoder.next_envelope``): no ``Frame`` needed."""
    check = CHECKS.get(opcode)
    if check is None or flags & _NEEDS_PARSER:
        return False
    return check(raw, body_offset, len(raw), version)
