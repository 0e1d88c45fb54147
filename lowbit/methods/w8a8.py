"""W8A8 (int8 weights and activations, integer matmuls, report §3.4) and SmoothQuant on top
of it (report §7.4; the maths: `lowbit.algorithms.smoothquant`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from lowbit.errors import SpecError
from lowbit.methods.config import QuantizeConfig
from lowbit.methods.registry import register
from lowbit.numerics.spec import ACT_GRANULARITIES
from lowbit.settings import label, setting

if TYPE_CHECKING:
    from lowbit.calibration.statistics import InputStatistics


def _alpha(text: str) -> float | None:
    return None if text == "search" else float(text)


@register
@dataclass(frozen=True, kw_only=True)
class W8A8Config(QuantizeConfig):
    """Weights int8 per output channel, activations int8 per token (dynamic) or per tensor
    (static, the calibrated maximum / 127); the product in integers (Eq. 3.4)."""

    name = "w8a8"
    kind = "weight+activation"
    summary = "int8 weights per channel and int8 activations, integer matmul (Eq. 3.4)"
    reference = "report §3.4"
    calibrated = True

    act_granularity: str = setting("token", "int8 activations: per-token dynamic, or per-tensor static (calibrated)", choices=ACT_GRANULARITIES)

    smooth = False  # SmoothQuantConfig turns the smoothing on

    def __post_init__(self):
        super().__post_init__()
        if self.act_granularity not in ACT_GRANULARITIES:
            raise SpecError(f"{label(W8A8Config, 'act_granularity')} {self.act_granularity!r} is unknown; use one of {', '.join(ACT_GRANULARITIES)}")

    def smoothing_alpha(self, x, stats: InputStatistics, weights) -> float | None:
        """The migration strength for one group; None: no smoothing."""
        return None

    def statistics(self, in_features: int) -> InputStatistics:
        from lowbit.calibration.statistics import InputStatistics

        return InputStatistics(in_features)

    def quantize_group(self, block, group, linears, selected, stats: InputStatistics, arch, prefix: str = "") -> list:
        """The engine's step for one group of linears (`lowbit.calibration.engine`)."""
        import torch

        from lowbit.algorithms.smoothquant import smoothing_scales, w8a8_output_error
        from lowbit.modules.int8 import W8A8Linear
        from lowbit.modules.scaling import fold_input_scale, source_can_fold
        from lowbit.numerics.quantization import weight_sqnr_db

        x = stats.rows()
        originals = {n: linears[n].weight.detach().float().clone() for n in selected}
        weights = [originals[n] for n in selected]
        in_features = next(iter(linears.values())).in_features
        ones = torch.ones(in_features)
        alpha, s = None, ones
        if self.smooth and source_can_fold(block, group.source, group.source_kind, in_features):
            alpha = self.smoothing_alpha(x, stats, weights)
            s = smoothing_scales(stats.absmax, weights, alpha)
            fold_input_scale(block, group.source, group.source_kind, list(linears.values()), s, arch.norm_offset)
        input_scale = (stats.absmax / s).max() / 127 if self.act_granularity == "tensor" else None
        error = w8a8_output_error(x, weights, s, self.act_granularity, stats.absmax)
        plain = w8a8_output_error(x, weights, ones, self.act_granularity, stats.absmax)
        out = []
        for name in selected:
            module = W8A8Linear.from_linear(linears[name], self.act_granularity, input_scale)
            info = {
                "weight_sqnr_db": weight_sqnr_db(originals[name], module.dequantized_weight() / s),
                "output_error": error,  # the group's, shared by its linears
                "baseline_output_error": plain,
                "baseline": "w8a8",
                "alpha": alpha,
            }
            out.append((name, module, info))
        return out


@register
@dataclass(frozen=True, kw_only=True)
class SmoothQuantConfig(W8A8Config):
    """SmoothQuant + W8A8: per input channel s_j = max|X_j|^α / max|W_j|^(1-α) (§7.4) moves
    the activations' outliers into the weights before both are rounded to int8."""

    name = "smoothquant"
    summary = "W8A8 after migrating activation outliers into the weights (s = max|X|^α / max|W|^(1-α))"
    reference = "report §7.4; Xiao et al. 2023"

    alpha: float | None = setting(0.5, "migration strength α in [0, 1], or 'search' (per group, by W8A8 output error)",
                                  parse=_alpha, accepts="a number in [0, 1] or 'search'")
    alpha_grid: int = setting(20, "with --alpha search: grid steps over [0, 1]")

    smooth = True

    def __post_init__(self):
        super().__post_init__()
        if self.alpha is not None and (not isinstance(self.alpha, (int, float)) or not 0.0 <= self.alpha <= 1.0):
            raise SpecError(f"{label(SmoothQuantConfig, 'alpha')} must lie in [0, 1] or be 'search' (None), got {self.alpha!r}")
        if not isinstance(self.alpha_grid, int) or self.alpha_grid < 1:
            raise SpecError(f"{label(SmoothQuantConfig, 'alpha_grid')} must be a positive integer, got {self.alpha_grid!r}")

    def smoothing_alpha(self, x, stats: InputStatistics, weights) -> float:
        from lowbit.algorithms.smoothquant import search_alpha

        if self.alpha is not None:
            return self.alpha
        return search_alpha(x, stats.absmax, weights, self.act_granularity, self.alpha_grid)[0]
