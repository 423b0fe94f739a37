"""Timing benchmarks that run the real code paths (`python -m gridvqa.benchmarks.<name> --help`)."""
