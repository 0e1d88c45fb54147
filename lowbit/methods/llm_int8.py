"""LLM.int8(): int8 matmuls with the outlier input channels kept in float (report §7.1)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lowbit.errors import SpecError
from lowbit.methods.config import QuantizeConfig
from lowbit.methods.registry import register
from lowbit.settings import label, setting

if TYPE_CHECKING:
    from lowbit.calibration.statistics import InputStatistics


@register
@dataclass(frozen=True, kw_only=True)
class LLMInt8Config(QuantizeConfig):
    """LLM.int8(): calibration flags the input channels whose magnitude reaches
    ``threshold`` so that their float weight columns are kept; each forward pass multiplies
    those channels in float and the rest in int8 (per-token activations, per-channel weights)."""

    name = "llm-int8"
    kind = "weight+activation"
    summary = "int8 matmul with outlier input channels (|x| >= threshold) multiplied in float"
    reference = "report §7.1; Dettmers et al. 2022"
    calibrated = True

    threshold: float = setting(6.0, "outlier magnitude: input channels reaching it are multiplied in float")

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.threshold, (int, float)) or not (self.threshold > 0 and math.isfinite(self.threshold)):
            raise SpecError(f"{label(LLMInt8Config, 'threshold')} must be a positive number (e.g. 6), got {self.threshold!r}")

    def statistics(self, in_features: int) -> InputStatistics:
        from lowbit.calibration.statistics import InputStatistics

        return InputStatistics(in_features)

    def quantize_group(self, block, group, linears, selected, stats: InputStatistics, arch, prefix: str = "") -> list:
        """The engine's step for one group of linears (`lowbit.calibration.engine`)."""
        import torch

        from lowbit.modules.int8 import LLMInt8Linear, W8A8Linear
        from lowbit.numerics.quantization import weight_sqnr_db

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
            module.calls = module.outlier_columns = 0  # count only the model's own calls from here on
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
