"""Evaluation: metrics and intervals, statistical tests, CAMs, lung energy, plots."""
