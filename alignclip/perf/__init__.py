"""Performance measurement: benchmarks that print figures and ratios (DESIGN.md section 12), not timed tests."""
