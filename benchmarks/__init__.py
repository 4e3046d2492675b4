"""Benchmark suites: ``python -m benchmarks SUITE [--quick] [--out DIR]``."""
