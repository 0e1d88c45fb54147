"""Calibration and evaluation text."""

from lowbit.data.corpora import CORPORA, TokenSplit, calibration_samples, eval_windows, load_text, tokenize_split

__all__ = ["CORPORA", "TokenSplit", "calibration_samples", "eval_windows", "load_text", "tokenize_split"]
