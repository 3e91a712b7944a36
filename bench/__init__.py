"""Benchmarks of the VideoBooth cross-frame attention op (pytest-benchmark), the report, and
profiling entry points. See docs/bench.md."""
