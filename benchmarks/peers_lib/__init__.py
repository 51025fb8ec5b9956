"""Helpers of ``benchmarks/peers.py``: the row registry, one module per library, storage counting, the report."""
