"""Benchmarks against real peers (not timed tests): ``scripts/bench/pg`` and its bare trio relay.

Shared by the benchmarks that interleave targets round by round (``cql_bench``, ``mongo_bench``):
``round_order`` and ``round_ratios``.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence


def round_order(targets: Sequence[str], rnd: int) -> list[str]:
    """The targets in round ``rnd``'s order (1-based), from a Williams design.

    A load that writes leaves work behind in the backend (Cassandra's memtable
    flushes and compactions, FerretDB's growing SQLite file): with one fixed
    order the same target always runs last, right after the same neighbour,
    and pays for it every round.  Here the first ``n`` rounds (``n`` targets)
    put every target in every position once; over a full cycle (``n`` rounds
    for an even ``n``, ``2n`` for an odd one) every target also runs right
    after every other one equally often.
    """
    n = len(targets)
    base, low, high = [0], 1, n - 1
    while len(base) < n:
        if len(base) % 2:
            base.append(low)
            low += 1
        else:
            base.append(high)
            high -= 1
    rows = [[(i + shift) % n for i in base] for shift in range(n)]
    if n % 2:
        rows += [row[::-1] for row in rows]
    return [targets[i] for i in rows[(rnd - 1) % len(rows)]]


def round_ratios(rate: Callable[[str, int], float | None], a: str, b: str, rounds: int) -> list[float]:
    """``a``'s rate over ``b``'s in each round both ran (``rate(target, rnd)``: None if it did not):
    the paired ratios, each taken within one round, under that round's machine state."""
    out = []
    for rnd in range(1, rounds + 1):
        ra, rb = rate(a, rnd), rate(b, rnd)
        if ra is not None and rb:
            out.append(ra / rb)
    return out


def describe_ratios(ratios: list[float]) -> str:
    """``0.91 / 0.98 / 1.04 (median 0.98)``."""
    if not ratios:
        return "-"
    return f"{' / '.join(f'{r:.2f}' for r in ratios)} (median {statistics.median(ratios):.2f})"
