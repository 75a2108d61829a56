"""Benchmarks that write tables and plots (never timed tests)."""
