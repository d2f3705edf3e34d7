"""Benchmarks: the micro-batch sweep (`python -m launchers sweep (benchmarks.sweep forwards to it)`, see docs/sweep.md)."""
