"""Benchmarks for rtbserve (``python -m bench.core``); not part of the installed package."""
