"""Reproducible benchmarks: `python -m benchmarks.bench_<name> [--json]`."""
