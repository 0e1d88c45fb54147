"""GPTQ on the block-by-block calibration engine (report §7.2; the maths: `lowbit.algorithms.gptq`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from lowbit.errors import SpecError
from lowbit.methods.config import CalibratedWeightConfig
from lowbit.methods.registry import register
from lowbit.settings import label, setting

if TYPE_CHECKING:
    from lowbit.calibration.statistics import HessianAccumulator

# --act-order: which order GPTQ visits the columns in, and how groups follow it
# (llm-compressor's "static" / "group" activation orderings):
#   static   by descending diag(H), group scales fixed from the unquantised weight in
#            column order first, so groups stay runs of columns (no g_idx; kernels run it)
#   dynamic  by descending diag(H), each group formed by the columns as visited (g_idx)
#   off      in column order (the paper's plain GPTQ)
ACT_ORDERS = {"static": (True, True), "dynamic": (True, False), "off": (False, False)}


@register
@dataclass(frozen=True, kw_only=True)
class GPTQConfig(CalibratedWeightConfig):
    """GPTQ: quantise column by column, the columns not yet quantised absorbing each one's
    error through the inverse Hessian of the layer's calibration inputs."""

    name = "gptq"
    inverts_hessian = True
    summary = "column-by-column rounding with inverse-Hessian error feedback on calibration inputs"
    reference = "report §7.2; Frantar et al. 2022"
    refusals = {"double_quant": "GPTQ fixes each group's scale during its column sweep, after the codes before it, so the scales "
                                "cannot be double-quantised before the codes are chosen (use rtn or nf4 for that)"}

    act_order: str = setting("static", "column order: static (by diag(H), groups fixed first, no g_idx), dynamic (g_idx) or off",
                             choices=tuple(ACT_ORDERS))
    block_size: int = setting(128, "columns per lazy-update block")
    damp: float = setting(0.01, "dampening λ = damp · mean(diag H), in [0, 1)")

    def __post_init__(self):
        super().__post_init__()
        if self.act_order not in ACT_ORDERS:
            raise SpecError(f"{label(GPTQConfig, 'act_order')} {self.act_order!r} is unknown; use one of {', '.join(ACT_ORDERS)}")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise SpecError(f"{label(GPTQConfig, 'block_size')} must be a positive integer (e.g. 128), got {self.block_size!r}")
        if self.act_order == "dynamic" and any(self.spec.with_changes(format=f).ggml for f in [self.spec.format, *dict(self.layer_formats).values()]):
            raise SpecError(f"GGML formats store groups as runs of consecutive columns; {label(GPTQConfig, 'act_order')} dynamic "
                            "needs a group index (g_idx) they cannot hold: use static")
        if not isinstance(self.damp, (int, float)) or not 0.0 <= self.damp < 1.0:
            raise SpecError(f"{label(GPTQConfig, 'damp')} must lie in [0, 1) (e.g. 0.01), got {self.damp!r}")

    def extra_bytes(self, in_features: int) -> int:
        """Dynamic act-order stores each column's group index: int32 (in_features,)."""
        return 4 * in_features if self.act_order == "dynamic" else 0

    def statistics(self, in_features: int) -> HessianAccumulator:
        from lowbit.calibration.statistics import HessianAccumulator

        return HessianAccumulator(in_features)

    def quantize_group(self, block, group, linears, selected, stats: HessianAccumulator, arch, prefix: str = "") -> list:
        """The engine's step for one group of linears (`lowbit.calibration.engine`)."""
        import torch

        from lowbit.algorithms.gptq import gptq, output_error
        from lowbit.modules.quant_linear import QuantLinear
        from lowbit.numerics.quantization import fake_quantize, weight_sqnr_db

        act_order, static_groups = ACT_ORDERS[self.act_order]
        # linears that read the same input share its Hessian; GPTQ treats each row on its own,
        # so those with the same spec (not per tensor) run as one stacked weight: one inverse
        # Hessian and one column sweep instead of one per linear, with the same codes
        batches: dict = {}
        for name in selected:
            spec = self.spec_for(f"{prefix}{name}", linears[name].weight.shape[1])
            key = spec if spec.granularity != "tensor" else (spec, name)
            batches.setdefault(key, []).append(name)
        results = {}
        for names in batches.values():
            spec = self.spec_for(f"{prefix}{names[0]}", linears[names[0]].weight.shape[1])
            stacked = torch.cat([linears[n].weight.detach().float() for n in names])
            result = gptq(stacked, stats.hessian, spec, block_size=self.block_size, damp=self.damp, act_order=act_order,
                          static_groups=static_groups, name=" + ".join(names))
            results.update(zip(names, result.split_rows([linears[n].out_features for n in names])))
        out = []
        for name in selected:
            weight = linears[name].weight
            spec = self.spec_for(f"{prefix}{name}", weight.shape[1])
            result = results[name]
            rtn = fake_quantize(weight.detach().float(), spec)
            info = {
                "weight_sqnr_db": weight_sqnr_db(weight, result.dequantized),
                "output_error": output_error(weight, result.dequantized, stats.hessian),
                "baseline_output_error": output_error(weight, rtn, stats.hessian),
                "baseline": "rtn",
                "damp": result.damp,
                "start_weight": result.rounded,
            }
            out.append((name, QuantLinear(result.weight, linears[name].bias), info))
        return out
