"""Hash-chain verification of JSONL audit files (``dbproxy audit verify``).

Each event carries ``seq``, ``prev_hash`` and ``hash`` = SHA-256 of its
line as written without the trailing ``hash`` member (``recorder.line_hash``;
the canonical-JSON link of older trails, ``recorder.chain_hash``, is also
accepted).  A file verifies
when every line is a JSON object whose ``hash`` matches its content, whose
``seq`` is one more than the line before, and whose ``prev_hash`` is the
line before's ``hash``.  An edited line fails its own hash; a deleted,
inserted or reordered line breaks ``seq``/``prev_hash`` at the next line.
The first event of a trail (``seq`` 1) must link to the genesis hash; a file
that starts later (rotation) is checked from its first line on.

Several files (rotated ``.gz`` ones too) are one trail: they are put in
order by the ``seq`` of their first event and the chain must run across
them.  The first break is reported with its file and line number.
"""

from __future__ import annotations

import gzip
from typing import Iterable, Iterator

import attrs
import orjson

from .recorder import GENESIS_HASH, chain_hash, line_hash


@attrs.frozen
class Break:
    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


@attrs.frozen
class VerifyResult:
    events: int
    first_seq: int | None
    last_seq: int | None
    last_hash: str | None
    files: tuple[str, ...]
    error: Break | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def open_trail(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def iter_lines(path: str) -> Iterator[tuple[int, bytes]]:
    with open_trail(path) as f:
        for number, line in enumerate(f, 1):
            yield number, line


def _first_seq(path: str) -> int:
    for _, line in iter_lines(path):
        if line.strip():
            try:
                seq = orjson.loads(line).get("seq")
            except (orjson.JSONDecodeError, AttributeError):
                return -1
            return seq if isinstance(seq, int) else -1
    return -1


class ChainChecker:
    """Feed events in order; ``check`` returns the reason the chain breaks at this one, or None."""

    def __init__(self) -> None:
        self.prev_seq: int | None = None
        self.prev_hash: str | None = None
        self.first_seq: int | None = None
        self.count = 0

    def check(self, event: object, line: bytes | None = None) -> str | None:
        """``line``: the raw line ``event`` was parsed from (its hash is over those bytes)."""
        if not isinstance(event, dict):
            return "not a JSON object"
        seq, prev_hash, own = event.get("seq"), event.get("prev_hash"), event.get("hash")
        if not isinstance(seq, int) or not isinstance(prev_hash, str) or not isinstance(own, str):
            return "missing seq/prev_hash/hash"
        if (line is None or line_hash(line) != own) and chain_hash(event) != own:
            return f"hash mismatch at seq {seq}: the event was modified"
        if self.prev_seq is None:
            if seq == 1 and prev_hash != GENESIS_HASH:
                return "seq 1 does not start from the genesis hash"
        else:
            if seq != self.prev_seq + 1:
                return f"sequence break: expected seq {self.prev_seq + 1}, found {seq} (events missing, inserted or reordered)"
            if prev_hash != self.prev_hash:
                return f"chain break at seq {seq}: prev_hash does not match the hash of seq {self.prev_seq}"
        if self.first_seq is None:
            self.first_seq = seq
        self.prev_seq, self.prev_hash = seq, own
        self.count += 1
        return None


def verify_files(paths: Iterable[str]) -> VerifyResult:
    ordered = sorted(paths, key=_first_seq)
    checker = ChainChecker()
    for path in ordered:
        try:
            for number, line in iter_lines(path):
                if not line.strip():
                    continue
                if not line.endswith(b"\n"):
                    reason = "truncated last line (no newline)"
                else:
                    try:
                        reason = checker.check(orjson.loads(line), line)
                    except orjson.JSONDecodeError as exc:
                        reason = f"not valid JSON ({exc})"
                if reason is not None:
                    return _result(checker, ordered, Break(path, number, reason))
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            return _result(checker, ordered, Break(path, 0, f"cannot read: {exc}"))
    return _result(checker, ordered, None)


def _result(checker: ChainChecker, files: list[str], error: Break | None) -> VerifyResult:
    return VerifyResult(checker.count, checker.first_seq, checker.prev_seq, checker.prev_hash, tuple(files), error)
