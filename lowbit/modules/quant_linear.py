"""`QuantLinear`: an ``nn.Linear`` replacement whose weight lives packed in memory."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.numerics.double_quant import DoubleQuant
from lowbit.numerics.spec import QuantSpec
from lowbit.packed.qweight import QuantizedWeight


class _DequantLinear(torch.autograd.Function):
    """y = x Wᵀ + b for a frozen packed W, saving no float copy of W for backward."""

    @staticmethod
    def forward(ctx, x, module, bias):
        ctx.module = module
        ctx.has_bias = bias is not None
        return F.linear(x, module.qweight.dequantize(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out):
        weight = ctx.module.qweight.dequantize(grad_out.dtype)
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_out @ weight, None, grad_bias


class QuantLinear(nn.Module):
    """y = x W^T + b with W held as a `QuantizedWeight` (packed codes, scales, zeros).

    The packed tensors are buffers, so ``state_dict`` holds exactly the stored form and the
    float weight never stays in memory. Forward is the reference path: dequantise the whole
    weight to the input's dtype, then ``F.linear``. Faster kernels replace ``forward`` for
    formats they support and are tested against this path.

    Input (..., in_features), output (..., out_features), in the input's float dtype.
    """

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.spec = weight.spec
        self.group_size = weight.group_size
        self.scale_shape = tuple(weight.scales.shape)
        for name, tensor in weight.tensors().items():
            self.register_buffer(name, tensor)
        for optional in ("scales", "zeros", "g_idx"):
            if optional not in weight.tensors():
                setattr(self, optional, None)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.dequantized: torch.Tensor | None = None  # float32 weight while `dequantized_once` runs

    @property
    def qweight(self) -> QuantizedWeight:
        """The packed weight as a `QuantizedWeight` view over this module's buffers
        (double-quantised scales are expanded here, so they stay 8-bit in memory)."""
        shape = (self.out_features, self.in_features)
        if self.spec.ggml is not None:
            return QuantizedWeight.from_ggml(self.qdata, shape, self.spec)
        scale_dq = None
        if self.spec.double_quant:
            scale_dq = DoubleQuant(self.scales_q, self.scales_block, self.scales_offset, self.scale_shape)
        return QuantizedWeight(
            qdata=self.qdata,
            scales=scale_dq.dequantize() if scale_dq is not None else self.scales,
            zeros=self.zeros,
            shape=(self.out_features, self.in_features),
            group_size=self.group_size,
            spec=self.spec,
            g_idx=self.g_idx,
            scale_dq=scale_dq,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if torch.is_grad_enabled() and x.requires_grad:
            # training through a frozen quantised layer (QLoRA): keep only the packed weight
            # for backward and dequantise it again there, as bitsandbytes does
            return _DequantLinear.apply(x, self, bias)
        if self.dequantized is not None:
            return F.linear(x, self.dequantized.to(x.dtype), bias)
        return F.linear(x, self.qweight.dequantize(x.dtype), bias)

    def config(self) -> dict:
        """What a checkpoint header records to rebuild this module (tensors aside)."""
        return {"shape": [self.out_features, self.in_features], "group_size": self.group_size, "bias": self.bias is not None, "spec": self.spec.to_dict()}

    @classmethod
    def from_state(cls, config: dict, tensors: dict[str, torch.Tensor], name: str) -> "QuantLinear":
        """Rebuild from `config` and the module's stored tensors (shapes checked)."""
        bias = tensors.pop("bias", None)
        weight = QuantizedWeight.from_tensors(tensors, tuple(config["shape"]), config["group_size"], QuantSpec.from_dict(config["spec"]), name)
        return cls(weight, bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.spec.describe()}, bias={self.bias is not None}"


@contextmanager
def dequantized_once(model: nn.Module) -> Iterator[None]:
    """Inside the block, every `QuantLinear` (and `SparseLinear`) of ``model`` computes with its weight
    dequantised once, in float32, instead of on every call.

    The numbers are the same (the reference path dequantises the same codes the same way on
    every call, then casts to the input's dtype); the cost is a float32 copy of the
    quantised weights while the block runs. Evaluation uses it: scoring hundreds of 512-token
    windows, dequantising per call made a W4 model slower to score than its float source.
    """
    from lowbit.modules.sparse_linear import SparseLinear  # it builds on this module

    layers = [m for m in model.modules() if isinstance(m, (QuantLinear, SparseLinear))]
    try:
        for layer in layers:
            layer.dequantized = layer.qweight.dequantize(torch.float32)
        yield
    finally:
        for layer in layers:
            layer.dequantized = None
