"""SmoothQuant (Xiao et al. 2023; report §7.4): move the activation outliers into the weights.

With per-input-channel maxima max|X_j| (over calibration tokens) and max|W_j| (over the
group's weight rows), the smoothing scale is

    s_j = max|X_j|^α / max|W_j|^(1-α)                                            (§7.4)

and Y = (X diag(s)⁻¹)(diag(s) W) is unchanged in float; X / s has flatter channels, so its
int8 quantisation loses less. α = 0.5 shares the difficulty equally; larger α moves more
of it into the weights. `search_alpha` picks α on a grid by the group's W8A8 output error.
"""

from __future__ import annotations

import torch

from lowbit.modules.int8 import quantize_rows_int8, quantize_tensor_int8, quantize_weight_int8

MIN_MAGNITUDE = 1e-5


def smoothing_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s (in_features,) float32 from activation maxima (in_features,) and the group's weights
    [(out_i, in_features)] by §7.4."""
    w_absmax = torch.cat([w.detach().float() for w in weights]).abs().amax(0)
    s = act_absmax.float().clamp(min=MIN_MAGNITUDE) ** alpha / w_absmax.clamp(min=MIN_MAGNITUDE) ** (1 - alpha)
    return s.clamp(min=MIN_MAGNITUDE)


def w8a8_output_error(x: torch.Tensor, weights: list[torch.Tensor], s: torch.Tensor, act_granularity: str, act_absmax: torch.Tensor) -> float:
    """Mean squared output error per token of the group in W8A8 after smoothing by s.

    x: float32 (tokens, in) sample inputs; act_absmax: per-channel maxima over all
    calibration tokens (a static per-tensor scale is max(act_absmax / s) / 127).
    """
    w = torch.cat([w.detach().float() for w in weights])
    reference = x @ w.T
    xs, ws = x / s, w * s
    w_q, w_scale = quantize_weight_int8(ws)
    if act_granularity == "token":
        x_q, x_scale = quantize_rows_int8(xs)
    else:
        x_scale = (act_absmax / s).max() / 127
        x_q = quantize_tensor_int8(xs, x_scale)
    approx = (x_q.float() * x_scale) @ (w_q.float() * w_scale[:, None]).T
    return (approx - reference).square().sum(1).mean().item()


def search_alpha(x: torch.Tensor, act_absmax: torch.Tensor, weights: list[torch.Tensor], act_granularity: str, grid: int = 20) -> tuple[float, dict[float, float]]:
    """α in {0, 1/grid, ..., 1} with the least W8A8 output error on ``x``; (best α, errors by α)."""
    errors = {}
    for i in range(grid + 1):
        alpha = i / grid
        errors[alpha] = w8a8_output_error(x, weights, smoothing_scales(act_absmax, weights, alpha), act_granularity, act_absmax)
    return min(errors, key=errors.get), errors
