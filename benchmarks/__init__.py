"""Benchmarks: the micro-batch sweep (`python -m benchmarks.sweep`, see docs/sweep.md)."""
