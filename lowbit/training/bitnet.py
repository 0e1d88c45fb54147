"""Ternary weights with 8-bit activations: BitNet b1.58 (Ma et al. 2024; report §2.3, §5.2).

    W̃ = RoundClip(W / (γ + ε), -1, 1),  γ = mean |W|      (absmean, one scale per matrix)
    x̃ = Clip(Round(x · 127 / max|x|), -128, 127)           (absmax, per token)
    y  = (x̃ W̃ᵀ) · γ · max|x| / 127

Trained from scratch with the straight-through estimator for both roundings (the forward
uses the quantised values, the backward the identity), the network learns weights that
survive ternarisation; applying the same quantisation to a model trained in float (PTQ) is
the comparison the report says fails.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.methods.config import DEFAULT_SKIP
from lowbit.modules.swap import linear_layers, set_module

EPS = 1e-5


def ternarize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(W̃ in {-1, 0, 1} as float, γ) by absmean scaling."""
    gamma = weight.abs().mean()
    return torch.clamp(torch.round(weight / (gamma + EPS)), -1, 1), gamma


def quantize_activations_8bit(x: torch.Tensor) -> torch.Tensor:
    """Per-token absmax 8-bit fake quantisation (dequantised values)."""
    scale = 127.0 / x.abs().amax(-1, keepdim=True).clamp(min=EPS)
    return torch.clamp(torch.round(x * scale), -128, 127) / scale


class BitLinear(nn.Linear):
    """nn.Linear computing with ternary weights and 8-bit activations, trainable by STE."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w_q, gamma = ternarize(self.weight)
        w = self.weight + (w_q * gamma - self.weight).detach()
        x = x + (quantize_activations_8bit(x) - x).detach()
        return F.linear(x, w, self.bias)


def to_bitlinear(model: nn.Module, skip: tuple[str, ...] = DEFAULT_SKIP) -> list[str]:
    """Replace every nn.Linear (not matched by a ``skip`` regex) by a BitLinear sharing its weights."""
    names = [name for name, _ in linear_layers(model, skip)]
    for name in names:
        old = model.get_submodule(name)
        new = BitLinear(old.in_features, old.out_features, bias=old.bias is not None)
        new.weight = old.weight
        if old.bias is not None:
            new.bias = old.bias
        set_module(model, name, new)
    return names


def ternary_share(model: nn.Module) -> dict[str, float]:
    """Share of weights quantised to -1, 0 and +1 over all BitLinear layers."""
    counts = torch.zeros(3)
    for m in model.modules():
        if isinstance(m, BitLinear):
            w, _ = ternarize(m.weight.detach())
            counts += torch.stack([(w == v).sum() for v in (-1, 0, 1)]).float()
    total = counts.sum().clamp(min=1)
    return {"-1": (counts[0] / total).item(), "0": (counts[1] / total).item(), "+1": (counts[2] / total).item()}
