"""Benchmarks of med2e3: run as ``python -m benchmarks.<name>`` from the repository root (see docs/performance.md)."""
