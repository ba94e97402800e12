"""scripts/bench/pg's sink report: endpoint rates and the least-squares fit over the steady window."""

from __future__ import annotations

from scripts.bench.pg_bench import delivery_report


def _samples(lags: list[int], rate: int = 5000) -> list[tuple]:
    """One sample a second: (time, events recorded, events delivered, spool bytes)."""
    return [(float(t), rate * (t + 1), rate * (t + 1) - lag, 0) for t, lag in enumerate(lags)]


def test_a_sink_that_keeps_up_fits_one_whatever_batch_is_in_flight_at_the_ends():
    lags = [2500, 0, 5000] * 40  # a 5000-event batch in flight or not, at random phases
    lags[30] = 0  # the window starts 30 s in
    lags[-2] = 5000
    st = delivery_report(_samples(lags), [], 0.0)["steady"]
    assert st["lag_from"] == 0 and st["lag_to"] == 5000
    assert st["rate_ratio"] < 0.99  # the endpoints alone: one batch in flight at the window's end
    assert abs(st["fit_rate_ratio"] - 1.0) < 0.002 and abs(st["fit_lag_per_s"]) < 10


def test_a_sink_that_falls_behind_fits_below_one():
    st = delivery_report(_samples([t * 100 for t in range(120)]), [], 0.0)["steady"]
    assert abs(st["fit_lag_per_s"] - 100) < 1
    assert abs(st["fit_rate_ratio"] - 0.98) < 0.001
