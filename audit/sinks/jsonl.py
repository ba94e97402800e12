"""JSON-lines file sink.

Each batch is serialised with orjson and appended with one write, then
flushed, in a worker thread so a slow disk stalls only the drain task, never
the trio loop the sessions run on.
"""

from __future__ import annotations

import os

import orjson
import trio


class JsonlSink:
    def __init__(self, *, path: str, name: str = "jsonl") -> None:
        self.name = name
        self.path = path
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        self._file = open(path, "ab", buffering=0)

    def _write(self, data: bytes) -> None:
        self._file.write(data)

    async def write_batch(self, batch: list[dict]) -> None:
        data = b"".join(orjson.dumps(e) + b"\n" for e in batch)
        await trio.to_thread.run_sync(self._write, data)

    async def aclose(self) -> None:
        self._file.close()
