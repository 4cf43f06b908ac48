"""Benchmarks for rope-compile (run as scripts; see benchmarks/README.md)."""
