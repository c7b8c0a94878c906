"""Benchmarks: training throughput, recipe wall time and artifact latency, measured interleaved."""
