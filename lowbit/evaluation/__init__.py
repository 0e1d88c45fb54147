"""Evaluation: perplexity, KLD and top-1 against a reference; storage; tables and JSON."""

from lowbit.evaluation.metrics import EvalResult, evaluate, linear_bits_per_weight, model_bytes
from lowbit.evaluation.report import results_table, write_json

__all__ = ["EvalResult", "evaluate", "linear_bits_per_weight", "model_bytes", "results_table", "write_json"]
