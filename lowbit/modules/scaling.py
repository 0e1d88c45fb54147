"""Exact per-channel rescaling of a group's input, for SmoothQuant and AWQ.

A linear group computes Y = X Wᵀ from an input X that some operation produced. With a
positive per-channel scale s (in_features,),

    X Wᵀ = (X diag(s)⁻¹) (W diag(s))ᵀ                                           (§7.4)

so dividing the source's output channels by s and multiplying the group's weight columns
by s leaves the float model unchanged. The source is a norm (RMSNorm, Gemma's (1 + w)
RMSNorm, or LayerNorm with a bias) or a linear (whose output rows, bias included, are
divided; for a quantised one its row scales are, which is exact for per-row and group-wise
scales since every row scales alone).
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.modules.int8 import W8A8Linear
from lowbit.modules.quant_linear import QuantLinear


@torch.no_grad()
def divide_norm_output(norm: nn.Module, s: torch.Tensor, offset: float = 0.0) -> None:
    """Make ``norm``'s output channel j come out divided by s_j.

    The norm multiplies by (offset + weight); the new weight solves
    offset + w' = (offset + w) / s. A LayerNorm's bias is divided too.
    """
    weight = getattr(norm, "weight", None)
    if weight is None or weight.shape != s.shape:
        raise LowbitError(f"{type(norm).__name__} has no per-channel weight of {tuple(s.shape)} to fold a scale into")
    weight.copy_(((offset + weight.float()) / s - offset).to(weight.dtype))
    bias = getattr(norm, "bias", None)
    if bias is not None:
        bias.copy_((bias.float() / s).to(bias.dtype))


@torch.no_grad()
def divide_linear_output(linear: nn.Module, s: torch.Tensor) -> None:
    """Make ``linear``'s output row i come out divided by s_i (float or already quantised)."""
    if isinstance(linear, QuantLinear):
        if linear.spec.double_quant:
            raise LowbitError("cannot rescale the rows of a layer whose scales are double-quantised")
        if linear.spec.ggml is not None:
            from lowbit.numerics.ggml_blocks import divide_rows

            linear.qdata.copy_(divide_rows(linear.spec.ggml, linear.qdata, s))
        elif linear.scales.shape[0] != linear.out_features:
            raise LowbitError("cannot rescale the rows of a per-tensor quantised layer exactly; quantise it per channel or per group")
        else:
            linear.scales.copy_((linear.scales.float() / s[:, None]).to(linear.scales.dtype))
            if linear.spec.has_zero and linear.spec.zero_point == "float":
                linear.zeros.copy_((linear.zeros.float() / s[:, None]).to(linear.zeros.dtype))
    elif isinstance(linear, W8A8Linear):
        linear.weight_scale.div_(s)
    elif isinstance(linear, nn.Linear):
        linear.weight.copy_((linear.weight.float() / s[:, None]).to(linear.weight.dtype))
    else:
        raise LowbitError(f"cannot rescale the output of {type(linear).__name__}")
    if linear.bias is not None:
        linear.bias.copy_((linear.bias.float() / s).to(linear.bias.dtype))


@torch.no_grad()
def multiply_linear_input(linear: nn.Linear, s: torch.Tensor) -> None:
    """Multiply a float linear's input columns by s: W <- W diag(s)."""
    linear.weight.copy_((linear.weight.float() * s[None, :]).to(linear.weight.dtype))


def fold_input_scale(block: nn.Module, source: str, source_kind: str, linears: list[nn.Linear], s: torch.Tensor, norm_offset: float) -> None:
    """Divide the group's input by s at its source and multiply the group's weights by s."""
    module = block.get_submodule(source)
    if source_kind == "norm":
        divide_norm_output(module, s, norm_offset)
    else:
        divide_linear_output(module, s)
    for linear in linears:
        multiply_linear_input(linear, s)


def source_can_fold(block: nn.Module, source: str, source_kind: str, in_features: int) -> bool:
    """Whether the source's output channels map one to one onto the group's inputs.

    Not so for v_proj -> o_proj under grouped-query attention: v_proj has fewer output
    channels than o_proj has inputs (each is shared by several query heads); the scale would
    have to agree across those heads, and like the AWQ reference code we skip that pair.
    """
    module = block.get_submodule(source)
    if source_kind == "norm":
        weight = getattr(module, "weight", None)
        return weight is not None and weight.shape == (in_features,)
    return getattr(module, "out_features", None) == in_features
