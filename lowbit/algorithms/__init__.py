"""Quantisation algorithms: pure functions from a float weight (and statistics) to a QuantizedWeight."""

from lowbit.algorithms.rtn import rtn_quantize

__all__ = ["rtn_quantize"]
