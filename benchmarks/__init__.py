"""Reproducible comparisons of the sidecar against in-process TiledWriter.

Run them all with ``make bench`` (``python -m benchmarks.run``); see
``benchmarks/run.py`` for the options and ``benchmarks/RESULTS.md`` for the
last results on this machine.
"""
