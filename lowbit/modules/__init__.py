"""Quantised modules and the plumbing that puts them into a model."""

from lowbit.modules.quant_linear import QuantLinear
from lowbit.modules.swap import DEFAULT_SKIP, linear_layers, set_module

__all__ = ["DEFAULT_SKIP", "QuantLinear", "linear_layers", "set_module"]
