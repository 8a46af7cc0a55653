"""Benchmark code behind tools/bench_*.py (not part of the installed library): print figures and ratios."""
