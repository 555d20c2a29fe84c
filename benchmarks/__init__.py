"""Benchmarks for specpipe (`specpipe bench latency`, or `python -m benchmarks.latency`)."""
