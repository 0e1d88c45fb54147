"""Inference: the lean decode loop and the quantised KV cache."""
