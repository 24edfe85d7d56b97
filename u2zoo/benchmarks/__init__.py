"""Parity comparison, timing, the benchmark matrix and cross-hardware reports."""
