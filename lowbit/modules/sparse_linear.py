"""`SparseLinear`: an ``nn.Linear`` replacement whose pruned weight lives sparse in memory."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.modules.quant_linear import _DequantLinear
from lowbit.packed.qweight import QuantizedWeight
from lowbit.packed.sparse import SparseWeight


class SparseLinear(nn.Module):
    """y = x Wᵀ + b with W held as a `SparseWeight` (a mask and the kept values or codes).

    The stored tensors are buffers, so ``state_dict`` holds exactly the sparse form and no
    dense copy stays in memory. Forward is the reference path: rebuild the dense weight
    (pruned entries exactly 0) in the input's dtype, then ``F.linear``; under
    `dequantized_once` the dense float32 weight is built once instead.

    Input (..., in_features), output (..., out_features), in the input's float dtype.
    """

    def __init__(self, weight: SparseWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.pattern = weight.pattern
        self.spec = weight.spec
        self.group_size = None if weight.quantized is None else weight.quantized.group_size
        for name, tensor in weight.tensors().items():
            self.register_buffer(name, tensor)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.dequantized: torch.Tensor | None = None  # dense float32 weight while `dequantized_once` runs

    @property
    def qweight(self) -> SparseWeight:
        """The stored weight as a `SparseWeight` view over this module's buffers."""
        shape = (self.out_features, self.in_features)
        mask_data = self.positions if self.pattern.structured else self.bitmask
        if self.spec is None:
            return SparseWeight(shape, self.pattern, mask_data, values=self.values)
        quantized = QuantizedWeight(qdata=self.qdata, scales=self.scales, zeros=getattr(self, "zeros", None), shape=shape,
                                    group_size=self.group_size, spec=self.spec)
        return SparseWeight(shape, self.pattern, mask_data, quantized=quantized)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if torch.is_grad_enabled() and x.requires_grad:
            return _DequantLinear.apply(x, self, bias)  # trains adapters without keeping a dense copy for backward
        if self.dequantized is not None:
            return F.linear(x, self.dequantized.to(x.dtype), bias)
        return F.linear(x, self.qweight.dequantize(x.dtype), bias)

    def config(self) -> dict:
        """What a checkpoint header records to rebuild this module (tensors aside)."""
        return {**self.qweight.config(), "bias": self.bias is not None}

    @classmethod
    def from_state(cls, config: dict, tensors: dict[str, torch.Tensor], name: str) -> "SparseLinear":
        """Rebuild from `config` and the module's stored tensors (shapes checked)."""
        bias = tensors.pop("bias", None)
        return cls(SparseWeight.from_tensors(tensors, config, name), bias)

    def extra_repr(self) -> str:
        values = self.spec.describe() if self.spec is not None else str(self.values.dtype).removeprefix("torch.")
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.pattern.describe()} sparse, {values}, bias={self.bias is not None}"

