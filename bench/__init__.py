"""Troupe benchmarks: a load generator and side-by-side comparisons with bare Ray Serve.

Run from the repository root: ``.venv/bin/python -m bench.run_bench`` (see bench/README.md).
"""
