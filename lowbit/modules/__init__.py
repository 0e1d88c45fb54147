"""Quantised modules and the plumbing that puts them into a model."""

from lowbit.modules.int8 import LLMInt8Linear, W8A8Linear
from lowbit.modules.quant_linear import QuantLinear
from lowbit.modules.sparse_linear import SparseLinear
from lowbit.modules.swap import linear_layers, set_module

# Every module type a checkpoint may hold, by the name its header records.
QUANTIZED_MODULES = {cls.__name__: cls for cls in (QuantLinear, W8A8Linear, LLMInt8Linear, SparseLinear)}


def storage_bytes(module) -> int:
    """Bytes a quantised module stores for its weight (buffers; the bias excluded)."""
    return sum(b.numel() * b.element_size() for b in module.buffers(recurse=False))


__all__ = ["LLMInt8Linear", "QUANTIZED_MODULES", "QuantLinear", "SparseLinear", "W8A8Linear", "linear_layers", "set_module", "storage_bytes"]
