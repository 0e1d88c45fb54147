"""AWQ (Lin et al. 2023; report §7.3): protect the weights that meet large activations.

A weight's importance is set by the magnitude of the activation it multiplies. AWQ scales
input channel j of the weights up by s_j and the activation down by s_j, which leaves the
float product unchanged, and searches

    s = s_X^α,  α* = argmin_α || Q(W diag(s)) (diag(s)⁻¹ X) - W X ||²              (§7.3)

on a grid of α in [0, 1), with s_X the mean |x| per channel over calibration tokens,
normalised so that max(s)·min(s) = 1. Scaling a salient weight up lets it use more of its
group's grid (the group's absmax, set by other weights, rarely grows with it), so its
*relative* rounding error falls while X / s keeps the product intact.

The report states the search as argmin_s ||Q(W·s⁻¹)(X·s) - WX||, the mirror form; with
s = s_X^α that would shrink the salient weights, so we follow the paper's direction
(weights multiplied by s, activations divided), which is also the AWQ reference code's.
α = 0 gives s = 1, plain round-to-nearest, so on its own objective AWQ never loses to RTN.

The weight clipping search of the paper (`clip_quantize`) then shrinks each group's range
by the factor that minimises that group's share of the output error on sample inputs.
"""

from __future__ import annotations

import torch

from lowbit.numerics.quantization import (
    Quantized,
    as_rows,
    choose_range,
    decode,
    encode,
    expand_groups,
    fake_quantize,
    group_size_of,
    grouped,
    params_from_range,
    quantize_with_params,
)
from lowbit.numerics.spec import QuantSpec

DEFAULT_GRID = 20
CLIP_MAX_SHRINK = 0.5
CLIP_GRID = 20
CLIP_TOKENS = 512


def awq_scales(x: torch.Tensor, act_absmean: torch.Tensor, weights: list[torch.Tensor], spec: QuantSpec, grid: int = DEFAULT_GRID) -> tuple[torch.Tensor, float, dict[float, float]]:
    """The per-input-channel scale s (in,), the α that gave it, and the error for every α.

    x: float32 (tokens, in) sample inputs of the group; act_absmean: mean |x| per channel
    over all calibration tokens; weights: the group's float weights [(out_i, in)].
    Errors are mean squared output errors per token.
    """
    w = torch.cat([w.detach().float() for w in weights])
    gram = x.T @ x
    errors, best = {}, None
    base = act_absmean.float().clamp(min=1e-4)
    for i in range(grid):
        alpha = i / grid
        s = base**alpha
        s = s / (s.max() * s.min()).sqrt()
        errors[alpha] = gram_sq_error(gram, x.shape[0], fake_quantize(w * s, spec) / s - w)
        if best is None or errors[alpha] < errors[best[0]]:
            best = (alpha, s)
    return best[1], best[0], errors


def gram_sq_error(gram: torch.Tensor, tokens: int, delta: torch.Tensor) -> float:
    """Mean over tokens of ||Δ x_t||² = tr(Δ G Δᵀ) / n, from the inputs' Gram matrix
    G = Σ_t x_t x_tᵀ (in, in) over n = ``tokens`` rows and a weight difference Δ (out, in):
    out·in² multiply-adds instead of n·in·out, and no (n, out) output is formed."""
    return ((delta @ gram) * delta).sum().item() / tokens


def clip_quantize(weight: torch.Tensor, x: torch.Tensor, spec: QuantSpec, grid: int = CLIP_GRID, max_shrink: float = CLIP_MAX_SHRINK, name: str = "weight") -> Quantized:
    """Quantise ``weight`` (out, in) with each group's range shrunk by the factor in
    {1, 1 - max_shrink/grid, ..., 1 - max_shrink} that minimises Σ_t (x_t,g · (w_g - ŵ_g))²,
    the group's contribution to the output error on sample inputs ``x`` (tokens, in)."""
    w = weight.detach().float()
    if spec.granularity == "tensor":  # one range for everything: nothing per group to choose
        rows = as_rows(w, spec)
        return _quantize_with_ranges(w, spec, *choose_range(grouped(rows, rows.shape[1]), spec), rows.shape[1])
    group_size = group_size_of(tuple(w.shape), spec, name)
    cols = w.shape[1]
    x = x[:CLIP_TOKENS].float()
    xg = grouped(x, group_size, fill=0.0)  # (tokens, n_groups, G)
    gram = torch.einsum("tgk,tgl->gkl", xg, xg)  # each group's Σ_t x_t,g x_t,gᵀ, (n_groups, G, G)
    lo, hi = choose_range(grouped(w, group_size), spec)  # (out, n_groups)
    best_err = torch.full_like(lo, float("inf"))
    best_lo, best_hi = lo.clone(), hi.clone()
    for i in range(grid + 1):
        ratio = 1.0 - max_shrink * i / grid
        scale, zero = params_from_range(lo * ratio, hi * ratio, spec)
        s, z = expand_groups(scale, group_size, cols), None if zero is None else expand_groups(zero, group_size, cols)
        diff = grouped(w - decode(encode(w, s, z, spec), s, z, spec), group_size, fill=0.0)  # (out, n_groups, G)
        err = torch.einsum("ogk,gkl,ogl->og", diff, gram, diff)  # Σ_t (x_t,g · (w_g - ŵ_g))², (out, n_groups)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, lo * ratio, best_lo)
        best_hi = torch.where(better, hi * ratio, best_hi)
    return _quantize_with_ranges(w, spec, best_lo, best_hi, group_size)


def _quantize_with_ranges(w: torch.Tensor, spec: QuantSpec, lo: torch.Tensor, hi: torch.Tensor, group_size: int) -> Quantized:
    return quantize_with_params(w, *params_from_range(lo, hi, spec), group_size, spec)
