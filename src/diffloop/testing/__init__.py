"""Helpers for tests and benchmarks: tiny random-weight models built from configs (nothing
downloaded)."""
