"""The interleaved benchmarks' round order: no target keeps one position or one predecessor."""

from __future__ import annotations

from collections import Counter

import pytest

from scripts.bench import describe_ratios, round_order, round_ratios


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_every_target_takes_every_position_in_the_first_n_rounds(n):
    targets = [f"t{i}" for i in range(n)]
    rows = [round_order(targets, rnd) for rnd in range(1, n + 1)]
    assert all(sorted(row) == targets for row in rows)
    for position in range(n):
        assert sorted(row[position] for row in rows) == targets


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_over_a_full_cycle_every_target_follows_every_other_equally_often(n):
    targets = [f"t{i}" for i in range(n)]
    cycle = n if n % 2 == 0 else 2 * n
    rows = [round_order(targets, rnd) for rnd in range(1, cycle + 1)]
    follows = Counter((row[i], row[i + 1]) for row in rows for i in range(n - 1))
    assert set(follows) == {(a, b) for a in targets for b in targets if a != b}
    assert len(set(follows.values())) == 1
    # The cycle repeats after that.
    assert round_order(targets, cycle + 1) == rows[0]


def test_the_three_target_order_is_not_a_plain_rotation():
    # A rotation (abc, bca, cab) keeps c right after b in every round: the bias this removes.
    rows = [round_order(["direct", "relay", "dbproxy"], rnd) for rnd in range(1, 7)]
    after_relay = {row[row.index("relay") + 1] for row in rows if row.index("relay") < 2}
    assert after_relay == {"direct", "dbproxy"}


def test_round_ratios_pair_each_round_and_skip_a_missing_one():
    rates = {("a", 1): 90.0, ("b", 1): 100.0, ("a", 2): 120.0, ("b", 2): 100.0, ("a", 3): 50.0}
    ratios = round_ratios(lambda t, r: rates.get((t, r)), "a", "b", 3)
    assert ratios == pytest.approx([0.9, 1.2])
    assert describe_ratios(ratios) == "0.90 / 1.20 (median 1.05)"
    assert describe_ratios([]) == "-"
