"""Benchmarks: figures side by side with the alternatives, as ratios and medians.

Run with ``python -m bench``.
"""
