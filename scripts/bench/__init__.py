"""Benchmarks against real peers (not timed tests): ``scripts/bench/pg`` and its bare trio relay."""
