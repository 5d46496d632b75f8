"""Benchmarks: figures side by side with the alternatives, as ratios and medians (``python -m bench``)."""
