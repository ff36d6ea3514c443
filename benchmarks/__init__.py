"""Benchmark suite of street2shop: metrics, grid runner, feature cache, speed measurements."""
