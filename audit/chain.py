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

An intact chain only proves nothing was changed after it was written; what
was never written shows as *gaps* (``SessionCounter``):

* every event of a session carries ``session_seq`` (1, 2, 3… per ``sid``,
  counted by the recorder) and its ``db.session.end`` the session's total:
  a hole in the numbers, or fewer events than the end's total, is a session
  with missing events;
* ``proxy.start`` / ``proxy.stop`` mark each run of the proxy: a start with
  no stop since the previous start is an unclean restart (crash, SIGKILL),
  and a session that started (a successful ``db.session.start``) with no
  end event from before a later start (or a clean stop) was cut off — a
  session of the last run may simply still be open (a failed login has no
  end event);
* a ``session_seq`` seen twice is counted, not a gap: after an audit worker
  died, its input since the last ack is handed to the next one, which may
  write again what the dead one wrote but had not acked (at least once).

A trail written before ``session_seq`` existed verifies as before ("no
session counts").  A trail given from a later file on (rotation) is checked
for holes from each session's first number seen.
"""

from __future__ import annotations

import gzip
from typing import Iterable, Iterator

import attrs
import orjson

from . import events as ev
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
    gaps: tuple[str, ...] = ()  # sessions with missing events, cut-off sessions, unclean restarts
    sessions: int = 0
    counted_sessions: int = 0  # sessions whose events carry session_seq
    open_sessions: int = 0  # no end yet, in the last run: may still be running
    repeated: int = 0  # events written twice (replayed after an audit worker restart)
    runs: int = 0  # proxy.start markers

    @property
    def chain_ok(self) -> bool:
        return self.error is None

    @property
    def ok(self) -> bool:
        return self.error is None and not self.gaps


_PROXY_START = "proxy.start"
_PROXY_STOP = "proxy.stop"


class SessionCounter:
    """Feed events in order; ``gaps`` lists what the trail shows was never written."""

    def __init__(self) -> None:
        # sid -> [numbers seen, end total or None, run index, "file:line" of the first event, repeats,
        #         started (a successful db.session.start: only such a session owes an end event)]
        self.sessions: dict[str, list] = {}
        self.uncounted: set[str] = set()
        self.run = -1  # index of the current proxy.start (-1: before any)
        self.stopped: list[bool] = []
        self.starts: list[str] = []
        self.unclean: list[str] = []

    def feed(self, event: dict, where: str) -> None:
        kind = event.get("event")
        if kind == _PROXY_START:
            if self.run >= 0 and not self.stopped[self.run]:
                self.unclean.append(
                    f"unclean restart: the proxy run started at {self.starts[self.run]} has no proxy.stop "
                    f"before the next start at {where} (crashed or killed: its open sessions have no end)")
            self.run += 1
            self.stopped.append(False)
            self.starts.append(where)
            return
        if kind == _PROXY_STOP:
            if self.run >= 0:
                self.stopped[self.run] = True
            return
        sid = event.get("sid")
        if not isinstance(sid, str):
            return
        entry = self.sessions.get(sid)
        if entry is None:
            entry = self.sessions[sid] = [set(), None, self.run, where, 0, False]
        if ev.is_session_start(kind) and event.get("success") is True:
            entry[5] = True
        n = event.get("session_seq")
        if not isinstance(n, int):
            self.uncounted.add(sid)
        else:
            if n in entry[0]:
                entry[4] += 1
            entry[0].add(n)
            if ev.is_session_end(kind):
                entry[1] = n
        if ev.is_session_end(kind) and entry[1] is None:
            entry[1] = -1  # ended, uncounted

    def result(self, from_start: bool) -> tuple[list[str], int, int, int]:
        """(gaps, counted sessions, sessions maybe still open, repeated events)."""
        gaps = list(self.unclean)
        last_run = self.run
        still_open = repeated = counted = 0
        for sid, (seen, total, run, where, repeats, started) in self.sessions.items():
            repeated += repeats
            if seen:
                counted += 1
                top = total if total is not None and total > 0 else max(seen)
                low = 1 if from_start else min(seen)
                missing = top - low + 1 - len([n for n in seen if low <= n <= top])
                if missing > 0:
                    holes = sorted(set(range(low, top + 1)) - seen)
                    shown = ", ".join(map(str, holes[:10])) + (" …" if len(holes) > 10 else "")
                    what = f"its end counts {total} events" if total is not None and total > 0 else f"up to {top}"
                    gaps.append(f"session {sid} (first event {where}): {missing} events missing "
                                f"({what}; session_seq {shown} not in the trail)")
            if total is None and started:
                if run < last_run or (run >= 0 and self.stopped[run]):
                    gaps.append(f"session {sid} (first event {where}): no end event, and the proxy "
                                f"{'restarted' if run < last_run else 'stopped'} since")
                else:
                    still_open += 1
        return gaps, counted, still_open, repeated


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
    counter = SessionCounter()
    for path in ordered:
        try:
            for number, line in iter_lines(path):
                if not line.strip():
                    continue
                event = None
                if not line.endswith(b"\n"):
                    reason = "truncated last line (no newline)"
                else:
                    try:
                        event = orjson.loads(line)
                        reason = checker.check(event, line)
                    except orjson.JSONDecodeError as exc:
                        reason = f"not valid JSON ({exc})"
                if reason is not None:
                    return _result(checker, counter, ordered, Break(path, number, reason))
                counter.feed(event, f"{path}:{number}")
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            return _result(checker, counter, ordered, Break(path, 0, f"cannot read: {exc}"))
    return _result(checker, counter, ordered, None)


def _result(checker: ChainChecker, counter: SessionCounter, files: list[str], error: Break | None) -> VerifyResult:
    gaps, counted, still_open, repeated = counter.result(checker.first_seq == 1)
    return VerifyResult(checker.count, checker.first_seq, checker.prev_seq, checker.prev_hash, tuple(files), error,
                        gaps=tuple(gaps), sessions=len(counter.sessions), counted_sessions=counted,
                        open_sessions=still_open, repeated=repeated, runs=counter.run + 1)
