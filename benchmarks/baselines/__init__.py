"""Baseline servers the benchmark compares notifier against (benchmark-only code)."""
