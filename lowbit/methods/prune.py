"""Pruning methods (report §9): magnitude, Wanda and SparseGPT, registered like the
quantisers (the maths: `lowbit.algorithms.pruning`; the stored form: `lowbit.packed.sparse`).

Each prunes every selected linear to ``--sparsity`` (a fraction, unstructured, or N:M) and
stores it sparse (`SparseLinear`). With ``--quantize`` the kept weights are also quantised
to the spec flags' format: magnitude and Wanda prune, then round to nearest; SparseGPT
prunes and quantises in one sweep (the paper's joint mode).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from lowbit.errors import SpecError
from lowbit.methods.config import ALL_SPEC_FIELDS, WEIGHT_SPEC, QuantizeConfig
from lowbit.methods.registry import register
from lowbit.numerics.sparsity import VALUE_DTYPES, SparsityPattern
from lowbit.numerics.spec import QuantSpec
from lowbit.settings import label, setting

if TYPE_CHECKING:
    import torch

    from lowbit.calibration.statistics import HessianAccumulator
    from lowbit.packed.sparse import SparseWeight

@dataclass(frozen=True, kw_only=True)
class PruneConfig(QuantizeConfig):
    """What every pruning method shares: the pattern, how the kept weights are stored and,
    with ``quantize``, their quantised format (``spec``)."""

    kind = "pruning"
    spec_fields = ALL_SPEC_FIELDS - {"double_quant", "format"}
    refusals = {"double_quant": "a sparse weight stores its scales as they are", "format": "sparse weights keep integer or codebook "
                "codes with group scales; GGML formats store dense blocks"}

    sparsity: str = setting("0.5", "which weights to zero: a fraction of each row (0.5, or 50%), or N:M (2:4, 4:8: N kept of every M "
                                   "consecutive weights)", metavar="FRACTION|N:M")
    values: str = setting("float16", "the dtype the kept weights are stored in (without --quantize)", choices=VALUE_DTYPES)
    quantize: bool = setting(False, "also quantise the kept weights to the spec flags' format (--bits, --group-size, ...)", switch=True)
    spec: QuantSpec = setting(WEIGHT_SPEC, "the format of the kept weights with --quantize")

    def __post_init__(self):
        super().__post_init__()
        pattern = SparsityPattern.parse(self.sparsity)
        object.__setattr__(self, "sparsity", pattern.describe())
        if self.values not in VALUE_DTYPES:
            raise SpecError(f"{label(PruneConfig, 'values')} {self.values!r} is not one of {', '.join(VALUE_DTYPES)}")
        if not self.quantize and self.spec != WEIGHT_SPEC:
            raise SpecError(f"{self.name}: the spec flags set the format of the kept weights, which only --quantize quantises; "
                            "add --quantize or drop them")
        if self.quantize and self.values != "float16":
            raise SpecError(f"{self.name}: with --quantize the kept weights are stored as codes; drop {label(PruneConfig, 'values')}")
        if self.quantize and self.spec.granularity not in ("group", "channel"):
            raise SpecError(f"{self.name}: pruned weights are quantised with group or channel scales, not per {self.spec.granularity}")

    def describe(self) -> str:
        """One line for logs: the pattern, the kept weights' format and the options that differ from their defaults."""
        kept = self.spec.describe() if self.quantize else f"{self.values} values"
        changed = [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)
                   if f.name not in ("spec", "skip", "layer_bits", "sparsity", "values", "quantize") and getattr(self, f.name) != f.default]
        return f"{self.name} {self.sparsity} sparse, " + ", ".join([kept, *changed])

    @classmethod
    def default_format(cls) -> str:
        spec = cls.default_spec()
        return f"{SparsityPattern.parse(cls.__dataclass_fields__['sparsity'].default).describe()} sparse, float16 values (--quantize: {spec.describe()})"

    @property
    def pattern(self) -> SparsityPattern:
        return SparsityPattern.parse(self.sparsity)

    @property
    def weight_spec(self):
        """The spec of the kept weights, or None when they stay float."""
        return self.spec if self.quantize else None

    def module(self, weight: SparseWeight, bias):
        from lowbit.modules.sparse_linear import SparseLinear

        return SparseLinear(weight, bias)

    def check_layer(self, name: str, in_features: int) -> None:
        self.pattern.check(in_features, name)
        if self.quantize:
            self.spec.group_size_for(in_features, name)


@register
@dataclass(frozen=True, kw_only=True)
class MagnitudeConfig(PruneConfig):
    """Magnitude pruning: keep the weights of largest |W| in each row (or each run of M)."""

    name = "magnitude"
    summary = "zero the weights of smallest |W| (per row, or per run of M for N:M); no data needed"
    reference = "report §9; Han et al. 2015"

    def quantize_weight(self, weight: torch.Tensor, name: str) -> SparseWeight:
        from lowbit.algorithms.pruning import magnitude_prune

        return magnitude_prune(weight, self.pattern, self.weight_spec, name).stored(self.pattern, self.values)


@dataclass(frozen=True, kw_only=True)
class CalibratedPruneConfig(PruneConfig):
    """A pruning method that runs block by block on calibration samples (wanda, sparsegpt):
    each subclass's ``prune(weight, hessian, name) -> PruneResult`` does the work."""

    calibrated = True

    def statistics(self, in_features: int) -> HessianAccumulator:
        from lowbit.calibration.statistics import HessianAccumulator

        return HessianAccumulator(in_features)

    def quantize_group(self, block, group, linears, selected, stats: HessianAccumulator, arch, prefix: str = "") -> list:
        """The engine's step for one group of linears (`lowbit.calibration.engine`): the
        linears that read the same input are pruned as one stacked weight (rows are pruned
        independently), then cut back; each report holds the layer's output error on the
        calibration inputs beside magnitude pruning's to the same pattern and format."""
        import torch

        from lowbit.algorithms.gptq import output_error
        from lowbit.algorithms.pruning import magnitude_prune
        from lowbit.modules.sparse_linear import SparseLinear
        from lowbit.numerics.quantization import weight_sqnr_db

        pattern, spec = self.pattern, self.weight_spec
        stacked = torch.cat([linears[n].weight.detach().float() for n in selected])
        result = self.prune(stacked, stats.hessian, f"{prefix}{' + '.join(selected)}")
        out, start = [], 0
        for name in selected:
            linear = linears[name]
            rows = slice(start, start + linear.out_features)
            start += linear.out_features
            part = type(result)(result.weight[rows], result.mask[rows], None if result.quantized is None else _rows(result.quantized, rows))
            module = SparseLinear(part.stored(pattern, self.values), linear.bias)
            approx = module.qweight.dequantize()
            baseline = magnitude_prune(linear.weight, pattern, spec, name).stored(pattern, self.values).dequantize()
            info = {
                "weight_sqnr_db": weight_sqnr_db(linear.weight, approx),
                "output_error": output_error(linear.weight, approx, stats.hessian),
                "baseline_output_error": output_error(linear.weight, baseline, stats.hessian),
                "baseline": "magnitude",
            }
            out.append((name, module, info))
        return out


def _rows(q, rows):
    from dataclasses import replace

    return replace(q, codes=q.codes[rows], scale=q.scale[rows], zero=None if q.zero is None else q.zero[rows])


@register
@dataclass(frozen=True, kw_only=True)
class WandaConfig(CalibratedPruneConfig):
    """Wanda: keep the weights of largest |W_ij| · ‖X_j‖ in each row, from calibration inputs."""

    name = "wanda"
    summary = "zero the weights of smallest |W|·‖X‖ (weight times input norm, per row) on calibration inputs; no weight update"
    reference = "report §9; Sun et al. 2023"

    def prune(self, weight, hessian, name):
        import torch

        from lowbit.algorithms.pruning import wanda_prune

        return wanda_prune(weight, torch.diagonal(hessian), self.pattern, self.weight_spec, name)


@register
@dataclass(frozen=True, kw_only=True)
class SparseGPTConfig(CalibratedPruneConfig):
    """SparseGPT: GPTQ's sweep with a mask; the kept weights absorb the pruned ones' error."""

    name = "sparsegpt"
    inverts_hessian = True
    summary = "prune by OBS saliency in GPTQ's column sweep, the weights not yet reached absorbing the error (with --quantize: jointly)"
    reference = "report §9; Frantar & Alistarh 2023"

    block_size: int = setting(128, "columns per lazy-update block")
    damp: float = setting(0.01, "dampening λ = damp · mean(diag H), in [0, 1)")

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise SpecError(f"{label(SparseGPTConfig, 'block_size')} must be a positive integer (e.g. 128), got {self.block_size!r}")
        pattern = self.pattern
        if pattern.structured and self.block_size % pattern.m:
            raise SpecError(f"{label(SparseGPTConfig, 'block_size')} {self.block_size} must be a multiple of the run length {pattern.m}")
        if not isinstance(self.damp, (int, float)) or not 0.0 <= self.damp < 1.0:
            raise SpecError(f"{label(SparseGPTConfig, 'damp')} must lie in [0, 1) (e.g. 0.01), got {self.damp!r}")

    def prune(self, weight, hessian, name):
        from lowbit.algorithms.pruning import sparsegpt

        return sparsegpt(weight, hessian, self.pattern, self.weight_spec, block_size=self.block_size, damp=self.damp, name=name)
