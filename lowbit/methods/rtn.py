"""Round to nearest (RTN), and the NF4 / FP4 codebooks it rounds into (report §3.1, §7.5)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from lowbit.methods.config import ALL_SPEC_FIELDS, WEIGHT_SPEC, QuantizeConfig
from lowbit.methods.registry import register
from lowbit.numerics.spec import QuantSpec
from lowbit.settings import setting

if TYPE_CHECKING:
    import torch

    from lowbit.packed.qweight import QuantizedWeight

@register
@dataclass(frozen=True, kw_only=True)
class RTNConfig(QuantizeConfig):
    """Round each weight to its nearest level by Eq. 3.1, with the range ``spec.range``
    picks; no data, no error feedback: the baseline every other method must beat."""

    name = "rtn"
    kind = "weight-only"
    summary = "round each weight to its nearest level (Eq. 3.1); no data needed"
    reference = "report §3.1-§3.3"
    spec_fields = ALL_SPEC_FIELDS
    per_layer_specs = True

    spec: QuantSpec = setting(WEIGHT_SPEC, "the weight format")

    def quantize_weight(self, weight: torch.Tensor, name: str) -> QuantizedWeight:
        """The packed weight of one float weight (out_features, in_features)."""
        from lowbit.algorithms.rtn import rtn_quantize

        return rtn_quantize(weight, self.spec_for(name, weight.shape[1]), name)


@dataclass(frozen=True, kw_only=True)
class CodebookConfig(RTNConfig):
    """Round to the nearest level of a codebook, each block of ``spec.group_size`` weights
    scaled by its absmax (float32, as bitsandbytes stores it, or 8-bit with double
    quantisation). Subclasses name the codebook in their default spec."""

    spec_fields = frozenset({"group_size", "double_quant", "scale_dtype"})
    per_layer_specs = False
    refusals = {
        "bits": "its codes are 4-bit",
        "symmetric": "a codebook is absmax-scaled and has no zero-point",
        "zero_point": "a codebook is absmax-scaled and has no zero-point",
        "granularity": "its scales are per block of group_size weights (--group-size)",
        "range": "each block is scaled by its absmax",
        "percentile": "each block is scaled by its absmax",
        "format": "for another codebook use --method rtn --format NAME",
    }


def codebook_spec(codebook: str):
    """The spec field of a codebook method: 4-bit ``codebook`` codes, blocks of 64, float32
    absmax scales (bitsandbytes' defaults)."""
    return setting(QuantSpec(bits=4, format=codebook, group_size=64, scale_dtype="float32"), "the weight format")


@register
@dataclass(frozen=True, kw_only=True)
class NF4Config(CodebookConfig):
    """NormalFloat-4 (QLoRA): the 16 levels are normal quantiles (bitsandbytes' table)."""

    name = "nf4"
    summary = "NormalFloat-4 codebook, absmax per block (QLoRA's format; bitsandbytes' table)"
    reference = "report §7.5"
    spec: QuantSpec = codebook_spec("nf4")


@register
@dataclass(frozen=True, kw_only=True)
class FP4Config(CodebookConfig):
    """FP4: the 16 values of bitsandbytes' E2M1 float."""

    name = "fp4"
    summary = "4-bit float codebook (bitsandbytes' E2M1), absmax per block"
    reference = "report §2.1, §7.5"
    spec: QuantSpec = codebook_spec("fp4")
