"""Quantisation-aware training with the straight-through estimator (report §5.2).

The forward pass uses the fake-quantised weight Ŵ = S · Clamp(Round(W / S), q_min, q_max)
(Eq. 3.1 then 3.2, symmetric); Round has a zero derivative almost everywhere, so the
backward pass treats it as the identity (STE, ∂L/∂x ≈ ∂L/∂Q(x), §5.2), while Clamp keeps its
true derivative: weights inside the representable range get the gradient unchanged, weights
clipped beyond it get none.

With ``lsq`` the step sizes S (one per group) are parameters too (LSQ, Esser et al. 2020):
their gradient through Ŵ = S · Clamp(Round(W/S)) with the STE is Round(W/S) - W/S inside the
range and q_min or q_max outside, scaled by 1 / sqrt(numel · q_max) so steps learn at a rate
comparable to the weights.

After training, `convert_qat` stores each layer in real packed form with the learned steps,
so the saved model computes exactly what was trained.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.methods.config import DEFAULT_SKIP
from lowbit.modules.quant_linear import QuantLinear
from lowbit.modules.swap import linear_layers, set_module
from lowbit.numerics.formats import IntFormat
from lowbit.numerics.quantization import Quantized, as_rows, expand_groups, find_params, group_size_of
from lowbit.numerics.spec import QuantSpec
from lowbit.packed.qweight import QuantizedWeight


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity in the backward pass."""
    return x + (torch.round(x) - x).detach()


def scale_gradient(x: torch.Tensor, factor: float) -> torch.Tensor:
    """x in the forward pass; its gradient multiplied by ``factor`` in the backward pass."""
    return (x - x * factor).detach() + x * factor


def fake_quantize_ste(weight: torch.Tensor, step: torch.Tensor, fmt: IntFormat) -> torch.Tensor:
    """S · Clamp(Round_STE(W / S), q_min, q_max), differentiable in W and S."""
    return torch.clamp(round_ste(weight / step), fmt.qmin, fmt.qmax) * step


class FakeQuantLinear(nn.Module):
    """A float linear trained through its fake-quantised weight.

    weight: the float master weight (trainable). step: per-group step sizes, float32
    (out, n_groups) (or (1, 1) per tensor), a Parameter with ``lsq``, else recomputed from
    the current weight by min-max each forward (plain STE QAT).
    """

    def __init__(self, linear: nn.Linear, spec: QuantSpec, lsq: bool = False):
        super().__init__()
        if spec.format != "int" or not spec.symmetric:
            raise LowbitError("QAT supports symmetric integer formats (e.g. --bits 4, no --asym)")
        self.spec, self.lsq = spec, lsq
        self.fmt = spec.number_format
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        self.group_size = group_size_of((self.out_features, self.in_features), spec)
        step = self._minmax_step(self.weight.detach())
        self.step = nn.Parameter(step) if lsq else None
        self.grad_factor = 1.0 / math.sqrt(self.group_size * self.fmt.qmax) if spec.granularity != "tensor" else 1.0 / math.sqrt(self.weight.numel() * self.fmt.qmax)

    def _minmax_step(self, w: torch.Tensor) -> torch.Tensor:
        rows = as_rows(w.float(), self.spec)
        spec = self.spec.with_changes(scale_dtype="float32")
        step, _ = find_params(rows, spec, rows.shape[1] if self.spec.granularity == "tensor" else self.group_size)
        return step

    def current_step(self) -> torch.Tensor:
        if self.lsq:
            return scale_gradient(self.step, self.grad_factor).abs().clamp(min=1e-8)
        return self._minmax_step(self.weight.detach())

    def quantized_weight(self) -> torch.Tensor:
        rows = as_rows(self.weight, self.spec)
        step = expand_groups(self.current_step(), self.group_size, rows.shape[1])
        return fake_quantize_ste(rows, step, self.fmt).reshape(self.weight.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.quantized_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def to_quant_linear(self) -> QuantLinear:
        """The trained layer in packed form, computing what the fake-quantised one did."""
        rows = as_rows(self.weight.float(), self.spec)
        step = self.current_step().detach().float()
        q = torch.clamp(torch.round(rows / expand_groups(step, self.group_size, rows.shape[1])), self.fmt.qmin, self.fmt.qmax)
        spec = self.spec.with_changes(scale_dtype="float32")
        quantized = Quantized(codes=self.fmt.encode(q).reshape(self.weight.shape), scale=step, zero=None, group_size=self.group_size, spec=spec)
        return QuantLinear(QuantizedWeight.from_quantized(quantized), self.bias)


def prepare_qat(model: nn.Module, spec: QuantSpec, lsq: bool = False, skip: tuple[str, ...] = DEFAULT_SKIP) -> list[str]:
    """Swap every nn.Linear not matched by ``skip`` for a FakeQuantLinear; returns the names."""
    names = [name for name, _ in linear_layers(model, skip)]
    for name in names:
        set_module(model, name, FakeQuantLinear(model.get_submodule(name), spec, lsq))
    return names


def convert_qat(model: nn.Module) -> int:
    """Replace every FakeQuantLinear by its packed QuantLinear; returns the count."""
    names = [n for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)]
    for name in names:
        set_module(model, name, model.get_submodule(name).to_quant_linear())
    return len(names)
