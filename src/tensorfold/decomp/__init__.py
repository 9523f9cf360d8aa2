"""Decompositions: one algorithm per module, each returning a result type from ``results``."""
