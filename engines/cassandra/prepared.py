"""Prepared statements: what an EXECUTE's id stands for (native protocol v4/v5 section 4.2.5.4).

The RESULT Prepared's id → (CQL, keyspace, bind types and names) goes into a
``PreparedCache`` shared by every session of the engine (inline audit) or of
the audit worker (tapped sessions), keyed by backend address and id.
Cassandra derives the id from the statement text and keyspace (MD5), and the
proxy learns it only from a backend's answer to a PREPARE it saw, so sharing
is safe and lets an EXECUTE on another connection (drivers prepare on one
connection and execute on any) be resolved.
"""

from __future__ import annotations

import collections

import attrs

from dbproxy.errors import ProtocolError

from . import protocol as F


@attrs.frozen
class PreparedInfo:
    query: str
    keyspace: str | None
    types: tuple[int, ...] = ()
    names: tuple[str, ...] = ()


class PreparedCache:
    """(backend address, prepared id) → PreparedInfo, least recently used out first."""

    def __init__(self, capacity: int = 20_000) -> None:
        self.capacity = capacity
        self._items: collections.OrderedDict[tuple[str, bytes], PreparedInfo] = collections.OrderedDict()

    def get(self, backend: str, prepared_id: bytes) -> PreparedInfo | None:
        key = (backend, prepared_id)
        info = self._items.get(key)
        if info is not None:
            self._items.move_to_end(key)
        return info

    def put(self, backend: str, prepared_id: bytes, info: PreparedInfo) -> None:
        key = (backend, prepared_id)
        self._items[key] = info
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


@F.guard
def parse_prepared_bind_metadata(frame: F.Frame) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Bind marker types and names of a RESULT Prepared (spec 4.2.5.4).

    <id>[<result_metadata_id> v5]<metadata>: flags, columns_count, (v4+)
    pk_count and pk indexes, [global table spec], column specs.
    """
    r = F.message_reader(frame, F.Opcode.RESULT)
    if r.int32() != F.ResultKind.PREPARED:
        return (), ()
    r.short_bytes()
    if frame.version >= 5:
        r.short_bytes()
    flags = r.int32()
    count = r.int32()
    if frame.version >= 4:
        for _ in range(r.int32()):
            r.short()
    global_spec = bool(flags & F.RF_GLOBAL_TABLES_SPEC)
    if global_spec:
        r.string()
        r.string()
    types = []
    names = []
    for _ in range(count):
        if not global_spec:
            r.string()
            r.string()
        names.append(r.string())
        types.append(r.option())
    return tuple(types), tuple(names)


def learn_prepared(cache: PreparedCache, backend: str, frame: F.Frame, prepared_id: bytes, query: str,
                   keyspace: str | None) -> None:
    """A RESULT Prepared answering a PREPARE of ``query``: its id now stands for it (bind types
    and names when its metadata parses)."""
    try:
        types, names = parse_prepared_bind_metadata(frame)
    except ProtocolError:
        types, names = (), ()
    cache.put(backend, prepared_id, PreparedInfo(query, keyspace, types, names))
