"""AWQ on the block-by-block calibration engine (report §7.3; the maths: `lowbit.algorithms.awq`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from lowbit.errors import SpecError
from lowbit.methods.config import CalibratedWeightConfig
from lowbit.methods.registry import register
from lowbit.settings import label, setting

if TYPE_CHECKING:
    from lowbit.calibration.statistics import InputStatistics


@register
@dataclass(frozen=True, kw_only=True)
class AWQConfig(CalibratedWeightConfig):
    """AWQ: scale each input channel by s = s_X^α (α searched per group of linears), fold
    1/s into the operation that feeds the group, then round, each group's range clipped by
    the factor that minimises its output error."""

    name = "awq"
    summary = "activation-aware per-channel scales (searched α) folded into the previous op, then clipped rounding"
    reference = "report §7.3; Lin et al. 2023"
    refusals = {"double_quant": "AWQ folds each group's scales into the layer before it, which is often quantised already, and "
                                "double-quantised scales cannot be rescaled exactly (use rtn or nf4 for double quantisation)"}

    grid: int = setting(20, "α values tried for the scales (α = i / grid)", flag="--awq-grid")
    clip: bool = setting(True, "search each group's clipping range (--no-clip: plain min-max)", switch=True)

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.grid, int) or self.grid < 1:
            raise SpecError(f"{label(AWQConfig, 'grid')} must be a positive integer (e.g. 20), got {self.grid!r}")

    def statistics(self, in_features: int) -> InputStatistics:
        from lowbit.calibration.statistics import InputStatistics

        return InputStatistics(in_features)

    def quantize_group(self, block, group, linears, selected, stats: InputStatistics, arch, prefix: str = "") -> list:
        """The engine's step for one group of linears (`lowbit.calibration.engine`)."""
        import torch

        from lowbit.algorithms.awq import awq_scales, clip_quantize, gram_sq_error
        from lowbit.modules.quant_linear import QuantLinear
        from lowbit.modules.scaling import fold_input_scale, source_can_fold
        from lowbit.numerics.quantization import fake_quantize, quantize, weight_sqnr_db
        from lowbit.packed.qweight import QuantizedWeight

        x = stats.rows()
        gram = x.T @ x
        originals = {n: linears[n].weight.detach().float().clone() for n in selected}
        in_features = next(iter(linears.values())).in_features
        alpha, s = None, torch.ones(in_features)
        if source_can_fold(block, group.source, group.source_kind, in_features):
            s, alpha, _ = awq_scales(x, stats.absmean, [originals[n] for n in selected], self.spec_for(f"{prefix}{selected[0]}", in_features), self.grid)
            fold_input_scale(block, group.source, group.source_kind, list(linears.values()), s, arch.norm_offset)
        x_scaled = x / s
        out = []
        for name in selected:
            weight = linears[name].weight.detach().float()
            spec = self.spec_for(f"{prefix}{name}", in_features)
            q = clip_quantize(weight, x_scaled, spec, name=name) if self.clip else quantize(weight, spec, name)
            packed = QuantizedWeight.from_quantized(q)
            effective = packed.dequantize() / s  # what the layer now computes on the unscaled input
            rtn = fake_quantize(originals[name], spec)
            info = {
                "weight_sqnr_db": weight_sqnr_db(originals[name], effective),
                "output_error": gram_sq_error(gram, x.shape[0], originals[name] - effective),
                "baseline_output_error": gram_sq_error(gram, x.shape[0], originals[name] - rtn),
                "baseline": "rtn",
                "alpha": alpha,
            }
            out.append((name, QuantLinear(packed, linears[name].bias), info))
        return out
