"""Calibrated methods as the engine sees them: what to collect from a group's input and how
to turn the group's linears into quantised modules.

Each method has ``statistics(in_features)`` (a fresh accumulator for one group's input) and
``quantize_group(block, group, linears, selected, stats, arch) -> [(name, module, info)]``:
``linears`` are all of the group's float linears by name, ``selected`` the ones to quantise
(a method that rescales the group's input must rescale every linear that reads it). Each
``info`` carries ``weight_sqnr_db`` and, on the calibration inputs, ``output_error`` (mean
squared output error per token) beside ``baseline_output_error`` of the simplest method
of the same format (named by ``baseline``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from lowbit.algorithms.awq import awq_scales, clip_quantize
from lowbit.algorithms.gptq import gptq, output_error
from lowbit.algorithms.smoothquant import search_alpha, smoothing_scales, w8a8_output_error
from lowbit.calibration.statistics import HessianAccumulator, InputStatistics
from lowbit.models.architectures import Architecture, LinearGroup
from lowbit.modules.int8 import LLMInt8Linear, W8A8Linear
from lowbit.modules.quant_linear import QuantLinear
from lowbit.modules.scaling import fold_input_scale, source_can_fold
from lowbit.numerics.quantize import dequantize, fake_quantize, quantize, weight_sqnr_db
from lowbit.numerics.spec import QuantSpec
from lowbit.packed.qweight import QuantizedWeight

Result = list[tuple[str, nn.Module, dict]]


def _mean_sq_error(x: torch.Tensor, weight: torch.Tensor, approx: torch.Tensor) -> float:
    """Mean over rows of x of ||(W - W_hat) x||²."""
    return (x @ (weight.float() - approx.float()).T).square().sum(1).mean().item()


@dataclass(frozen=True)
class GPTQOptions:
    """block_size: columns per lazy-update block; damp: dampening as a fraction of mean
    diag(H); act_order: columns by descending diag(H); static_groups: group scales fixed
    from the unquantised weight in column order (only matters with act_order)."""

    block_size: int = 128
    damp: float = 0.01
    act_order: bool = False
    static_groups: bool = False


class GPTQMethod:
    name = "gptq"

    def __init__(self, spec: QuantSpec, options: GPTQOptions = GPTQOptions()):
        self.spec, self.options = spec, options

    def statistics(self, in_features: int) -> HessianAccumulator:
        return HessianAccumulator(in_features)

    def quantize_group(self, block, group, linears, selected, stats: HessianAccumulator, arch) -> Result:
        out = []
        for name in selected:
            weight = linears[name].weight
            result = gptq(weight, stats.hessian, self.spec, name=name, **asdict(self.options))
            rtn = dequantize(quantize(weight.detach(), self.spec, name))
            info = {
                "weight_sqnr_db": weight_sqnr_db(weight, result.dequantized),
                "output_error": output_error(weight, result.dequantized, stats.hessian),
                "baseline_output_error": output_error(weight, rtn, stats.hessian),
                "baseline": "rtn",
                "damp": result.damp,
            }
            out.append((name, QuantLinear(result.weight, linears[name].bias), info))
        return out


@dataclass(frozen=True)
class AWQOptions:
    """grid: α values tried (α = i / grid, i < grid); clip: run the weight-clipping search."""

    grid: int = 20
    clip: bool = True


class AWQMethod:
    name = "awq"

    def __init__(self, spec: QuantSpec, options: AWQOptions = AWQOptions()):
        self.spec, self.options = spec, options

    def statistics(self, in_features: int) -> InputStatistics:
        return InputStatistics(in_features)

    def quantize_group(self, block, group: LinearGroup, linears, selected, stats: InputStatistics, arch: Architecture) -> Result:
        x = stats.rows()
        originals = {n: linears[n].weight.detach().float().clone() for n in selected}
        in_features = next(iter(linears.values())).in_features
        alpha, s = None, torch.ones(in_features)
        if source_can_fold(block, group.source, group.source_kind, in_features):
            s, alpha, _ = awq_scales(x, stats.absmean, [originals[n] for n in selected], self.spec, self.options.grid)
            fold_input_scale(block, group.source, group.source_kind, list(linears.values()), s, arch.norm_offset)
        x_scaled = x / s
        out = []
        for name in selected:
            weight = linears[name].weight.detach().float()
            if self.options.clip:
                q = clip_quantize(weight, x_scaled, self.spec, name=name)
            else:
                q = quantize(weight, self.spec, name)
            packed = QuantizedWeight.from_quantized(q)
            effective = packed.dequantize() / s  # what the layer now computes on the unscaled input
            rtn = fake_quantize(originals[name], self.spec)
            info = {
                "weight_sqnr_db": weight_sqnr_db(originals[name], effective),
                "output_error": _mean_sq_error(x, originals[name], effective),
                "baseline_output_error": _mean_sq_error(x, originals[name], rtn),
                "baseline": "rtn",
                "alpha": alpha,
            }
            out.append((name, QuantLinear(packed, linears[name].bias), info))
        return out


@dataclass(frozen=True)
class W8A8Options:
    """act_granularity: "token" (dynamic) or "tensor" (static, calibrated max / 127).
    alpha: SmoothQuant migration strength, or None to search it per group on a grid of
    ``alpha_grid`` + 1 values in [0, 1]; smooth: False for plain W8A8."""

    act_granularity: str = "token"
    smooth: bool = False
    alpha: float | None = 0.5
    alpha_grid: int = 20


class W8A8Method:
    """Plain W8A8, or SmoothQuant + W8A8 with ``smooth``."""

    def __init__(self, options: W8A8Options = W8A8Options()):
        self.options = options
        self.name = "smoothquant" if options.smooth else "w8a8"

    def statistics(self, in_features: int) -> InputStatistics:
        return InputStatistics(in_features)

    def quantize_group(self, block, group: LinearGroup, linears, selected, stats: InputStatistics, arch: Architecture) -> Result:
        opts = self.options
        x = stats.rows()
        originals = {n: linears[n].weight.detach().float().clone() for n in selected}
        weights = [originals[n] for n in selected]
        in_features = next(iter(linears.values())).in_features
        ones = torch.ones(in_features)
        alpha, s = None, ones
        if opts.smooth and source_can_fold(block, group.source, group.source_kind, in_features):
            alpha = opts.alpha if opts.alpha is not None else search_alpha(x, stats.absmax, weights, opts.act_granularity, opts.alpha_grid)[0]
            s = smoothing_scales(stats.absmax, weights, alpha)
            fold_input_scale(block, group.source, group.source_kind, list(linears.values()), s, arch.norm_offset)
        input_scale = (stats.absmax / s).max() / 127 if opts.act_granularity == "tensor" else None
        error = w8a8_output_error(x, weights, s, opts.act_granularity, stats.absmax)
        plain = w8a8_output_error(x, weights, ones, opts.act_granularity, stats.absmax)
        out = []
        for name in selected:
            module = W8A8Linear.from_linear(linears[name], opts.act_granularity, input_scale)
            info = {
                "weight_sqnr_db": weight_sqnr_db(originals[name], module.dequantized_weight() / s),
                "output_error": error,  # the group's, shared by its linears
                "baseline_output_error": plain,
                "baseline": "w8a8",
                "alpha": alpha,
            }
            module.calls = module.outlier_columns = 0  # count only real use from here on
            out.append((name, module, info))
        return out


class LLMInt8Method:
    """LLM.int8(): calibration flags the input channels reaching ``threshold`` so their float
    weight columns are kept; the decomposition itself happens per forward pass."""

    name = "llm-int8"

    def __init__(self, threshold: float = 6.0):
        self.threshold = threshold

    def statistics(self, in_features: int) -> InputStatistics:
        return InputStatistics(in_features)

    def quantize_group(self, block, group, linears, selected, stats: InputStatistics, arch) -> Result:
        channels = torch.nonzero(stats.absmax >= self.threshold).flatten()
        x = stats.rows()
        out = []
        for name in selected:
            linear = linears[name]
            module = LLMInt8Linear.from_linear(linear, self.threshold, channels)
            with torch.no_grad():
                approx = module(x)
                exact = x @ linear.weight.detach().float().T + (0 if linear.bias is None else linear.bias.float())
                plain = W8A8Linear.from_linear(linear, "token")(x)
            info = {
                "weight_sqnr_db": weight_sqnr_db(linear.weight, module.weight_int8.float() * module.weight_scale[:, None]),
                "output_error": (approx - exact).square().sum(1).mean().item(),
                "baseline_output_error": (plain - exact).square().sum(1).mean().item(),
                "baseline": "w8a8",
                "outlier_channels": int(channels.numel()),
                "outlier_share": channels.numel() / linear.in_features,
            }
            out.append((name, module, info))
        return out
