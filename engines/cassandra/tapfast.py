"""The audit worker's fast path for what tapped CQL sessions carry by the thousand: EXECUTE and RESULT.

A driver's load is prepared statements: EXECUTE requests and their RESULT
Rows / Void answers.  ``CqlTap`` (``audit.frametap.FrameTap.fast``) hands
each such frame here first, as the tapped bytes and its offset: the body is
read in place with ``struct`` (native protocol v4/v5 §4.1.6 EXECUTE and its
§4.1.4 <query_parameters>, §4.2.5 RESULT, §4.2.5.2 Rows metadata), no
``Frame``, ``Reader`` or parsed records are built, and the event is the one
``observers.RequestAudit._execute`` / ``ResponseAudit._result`` write: same
fields, same order, same values.  Per prepared id the statement's audit text
and hex id are kept with the ``PreparedInfo`` they came from (``_known``),
so an EXECUTE of a known statement renders only its bound values.

Only the plain case is taken: no body prefix (tracing id, warnings, custom
payload), no v3/v4 compressed body, no named values, no per-query keyspace,
no RESULT metadata but simple column types.  Anything else — and anything
that does not fit its lengths, which the observer then audits as malformed
or unparsed — returns False *before* anything is recorded or any stream is
popped, and the observer reads the frame as it always did.  So the fast path
can make the worker faster, never change its trail
(tests/unit/cassandra/test_cql_tapfast.py compares the two).
"""

from __future__ import annotations

import struct
from typing import Any

from dbproxy.audit import events as ev

from . import protocol as F
from .checks import _string_end  # the [string] walk the in-place request checks use (valid UTF-8, or -1)
from .observers import EV_EXECUTE, EVENT_CODES, _Pending
from .values import consistency_name, render_values

_H = struct.Struct(">H").unpack_from
_h = struct.Struct(">h").unpack_from
_i = struct.Struct(">i").unpack_from
_I = struct.Struct(">I").unpack_from
_II = struct.Struct(">ii").unpack_from

_EXECUTE = F.Opcode.EXECUTE
_RESULT = F.Opcode.RESULT
_ROWS = F.ResultKind.ROWS
_VOID = F.ResultKind.VOID
_RESULT_EVENT = ev.RESULT
_EXECUTE_CODE = EVENT_CODES[EV_EXECUTE]
_UNSET = F.UNSET
_VERSION_MASK = F.VERSION_MASK
_COMPRESSION = F.FLAG_COMPRESSION
_FIRST_SEGMENT_VERSION = F.FIRST_SEGMENT_VERSION
_REQUEST_PREFIX = F.FLAG_CUSTOM_PAYLOAD  # a request's body prefix is its custom payload only (v5 §4)
_RESPONSE_PREFIX = F.FLAG_TRACING | F.FLAG_WARNING | F.FLAG_CUSTOM_PAYLOAD
_QF_VALUES = F.QF_VALUES
_QF_PAGE_SIZE = F.QF_PAGE_SIZE
_QF_PAGING_STATE = F.QF_PAGING_STATE
_QF_SERIAL = F.QF_SERIAL_CONSISTENCY
_QF_TIMESTAMP = F.QF_TIMESTAMP
_QF_NAMES = F.QF_NAMES_FOR_VALUES
_QF_KEYSPACE = F.QF_KEYSPACE
_QF_NOW = F.QF_NOW_IN_SECONDS
_RF_GLOBAL = F.RF_GLOBAL_TABLES_SPEC
_RF_MORE = F.RF_HAS_MORE_PAGES
_RF_NO_METADATA = F.RF_NO_METADATA
_RF_CHANGED = F.RF_METADATA_CHANGED
_KNOWN_LIMIT = 4096
_SIMPLE_TYPES_END = 0x0020  # [option] ids below 0x20 but 0 (custom) are one [short], no parameters (§4.2.5.2)


def _plain(d: Any, pos: int, opcode: int, prefix: int) -> int:
    """The version of the frame at ``pos`` if it is ``opcode`` with no body prefix (``prefix``: the
    header flags that announce one) and no v3/v4 compressed body; else 0."""
    flags = d[pos + 1]
    version = d[pos] & _VERSION_MASK
    if d[pos + 4] != opcode or flags & prefix or (flags & _COMPRESSION and version < _FIRST_SEGMENT_VERSION):
        return 0
    return version


class FastCqlAudit:
    """``CqlTap.fast``: ``request`` / ``response`` audit a frame in place or return False."""

    __slots__ = ("state", "audit", "_known")

    def __init__(self, state: Any, audit: Any) -> None:
        self.state = state
        self.audit = audit
        # prepared id -> (PreparedInfo or None, audit text, hex id): valid while the shared
        # cache still maps the id to that very PreparedInfo (a re-PREPARE replaces it).
        self._known: dict[bytes, tuple] = {}

    def request(self, d: Any, pos: int, size: int) -> bool:
        """An EXECUTE (§4.1.6): <id>[short bytes], v5 <result_metadata_id>[short bytes], <query_parameters>."""
        version = _plain(d, pos, _EXECUTE, _REQUEST_PREFIX)
        if not version:
            return False
        end = pos + size
        p = pos + 9
        if p + 2 > end:
            return False
        q = p + 2 + _H(d, p)[0]
        if q > end:
            return False
        query_id = bytes(d[p + 2:q])
        p = q
        if version >= 5:
            if p + 2 > end:
                return False
            p += 2 + _H(d, p)[0]
        # <query_parameters> (§4.1.4): <consistency><flags>[<n><value_i>...][<result_page_size>]
        # [<paging_state>][<serial_consistency>][<timestamp>][<keyspace>][<now_in_seconds>]
        if version >= 5:
            if p + 6 > end:
                return False
            consistency = _H(d, p)[0]
            flags = _I(d, p + 2)[0]
            p += 6
        else:
            if p + 3 > end:
                return False
            consistency = _H(d, p)[0]
            flags = d[p + 2]
            p += 3
        if flags & _QF_NAMES or (flags & _QF_KEYSPACE and version >= 5):
            return False  # named values, a per-query keyspace (v5 only): the observer's parser
        values: list = []
        if flags & _QF_VALUES:
            if p + 2 > end:
                return False
            count = _H(d, p)[0]
            p += 2
            append = values.append
            for _ in range(count):
                if p + 4 > end:
                    return False
                n = _i(d, p)[0]
                p += 4
                if n >= 0:
                    q = p + n
                    if q > end:
                        return False
                    value = d[p:q]
                    append(value if type(value) is bytes else bytes(value))
                    p = q
                elif n == -1 or version < 4:
                    append(None)
                elif n == -2:
                    append(_UNSET)
                else:
                    return False  # an invalid [value] length: the observer's parser refuses it
        page_size = None
        if flags & _QF_PAGE_SIZE:
            if p + 4 > end:
                return False
            page_size = _i(d, p)[0]
            p += 4
        next_page = False
        if flags & _QF_PAGING_STATE:
            if p + 4 > end:
                return False
            n = _i(d, p)[0]
            p += 4
            if n >= 0:
                p += n
                if p > end:
                    return False
                next_page = True
        serial = None
        if flags & _QF_SERIAL:
            if p + 2 > end:
                return False
            serial = _H(d, p)[0]
            p += 2
        if flags & _QF_TIMESTAMP:
            p += 8
            if p > end:
                return False
        if version >= 5 and flags & _QF_NOW and p + 4 > end:
            return False

        st = self.state
        info = st.prepared.get(st.backend, query_id)
        known = self._known.get(query_id)
        if known is None or known[0] is not info:
            if len(self._known) >= _KNOWN_LIMIT:
                self._known.clear()  # ids a client made up: bounded, as the shared cache is
            query = info.query if info is not None else f"<unknown prepared id 0x{query_id.hex()}>"
            known = self._known[query_id] = (info, query, ev.truncate(query), query_id.hex())
        query = known[1]
        stream = _h(d, pos + 2)[0]
        # Fields in ``RequestAudit._common``'s order, then the EXECUTE's (``_execute``).
        fields: dict[str, Any] = {"cql_stream": stream, "consistency": consistency_name(consistency),
                                  "keyspace": st.keyspace}
        if serial is not None:
            fields["serial_consistency"] = consistency_name(serial)
        if page_size is not None:
            fields["page_size"] = page_size
        if next_page:
            fields["next_page"] = True
        if info is not None and info.keyspace:
            fields["keyspace"] = info.keyspace
        event = self.audit.emit(
            EV_EXECUTE, code=_EXECUTE_CODE, db_query=known[2],
            db_query_parameters=render_values(values, None, info), prepared_id=known[3],
            prepared_known=info is not None, cql_opcode="EXECUTE", **fields,
        )
        st.pending[stream] = _Pending(event["uid"], "execute", query)
        st.requests += 1
        return True

    def response(self, d: Any, pos: int, size: int) -> bool:
        """A RESULT Void or Rows (§4.2.5.1, §4.2.5.2) answering an audited request."""
        version = _plain(d, pos, _RESULT, _RESPONSE_PREFIX)
        if not version:
            return False
        end = pos + size
        p = pos + 9
        if p + 4 > end:
            return False
        kind = _i(d, p)[0]
        p += 4
        if kind == _ROWS:
            # <metadata>: <flags><columns_count>[<paging_state>][<new_metadata_id>][<global_table_spec>?<col_spec_i>*]
            if p + 8 > end:
                return False
            flags, count = _II(d, p)
            p += 8
            if flags & _RF_MORE:
                if p + 4 > end:
                    return False
                n = _i(d, p)[0]
                p += 4
                if n > 0:
                    p += n
            if version >= 5 and flags & _RF_CHANGED:
                if p + 2 > end:
                    return False
                p += 2 + _H(d, p)[0]
            if not flags & _RF_NO_METADATA:
                if count < 0:
                    return False
                glob = flags & _RF_GLOBAL
                if glob:
                    p = _string_end(d, p, end)
                    if p < 0:
                        return False
                    p = _string_end(d, p, end)
                for _ in range(count):
                    if not glob:
                        if p < 0:
                            return False
                        p = _string_end(d, p, end)
                        if p < 0:
                            return False
                        p = _string_end(d, p, end)
                    if p < 0:
                        return False
                    p = _string_end(d, p, end)  # the column's name
                    if p < 0 or p + 2 > end:
                        return False
                    type_id = _H(d, p)[0]
                    if type_id == 0 or type_id >= _SIMPLE_TYPES_END:
                        return False  # a custom or parametrised type: the observer's parser walks it
                    p += 2
            if p < 0 or p + 4 > end:
                return False
            rows = _i(d, p)[0]
            pending = self.state.pending.pop(_h(d, pos + 2)[0], None)
            if pending is not None:
                self.audit.emit(_RESULT_EVENT, success=True, query_uid=pending.uid, cql_stream=_h(d, pos + 2)[0],
                                result_kind="rows", affected_records=rows, has_more_pages=bool(flags & _RF_MORE))
            return True
        if kind == _VOID:
            stream = _h(d, pos + 2)[0]
            pending = self.state.pending.pop(stream, None)
            if pending is not None:
                self.audit.emit(_RESULT_EVENT, success=True, query_uid=pending.uid, cql_stream=stream,
                                result_kind="void")
            return True
        return False


__all__ = ["FastCqlAudit"]
