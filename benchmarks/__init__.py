"""Benchmarks: scripts that print a table. Run each from the repository root as a module,
e.g. ``python -m benchmarks.kmeans`` (see benchmarks/common.py)."""
