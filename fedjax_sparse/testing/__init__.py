"""Helpers for tests and benchmarks: independent implementations to compare with."""
