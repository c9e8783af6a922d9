"""Benchmarks: each measures this engine against a baseline in the same run and reports ratios."""
