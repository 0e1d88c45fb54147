"""Calibrated methods as the engine sees them: which statistics to collect, how to quantise."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from lowbit.algorithms.gptq import gptq, output_error
from lowbit.calibration.statistics import HessianAccumulator
from lowbit.numerics.quantize import dequantize, quantize, weight_sqnr_db
from lowbit.numerics.spec import QuantSpec
from lowbit.packed.qweight import QuantizedWeight


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

    def quantize(self, name: str, weight: torch.Tensor, stats: HessianAccumulator) -> tuple[QuantizedWeight, dict]:
        result = gptq(weight, stats.hessian, self.spec, name=name, **asdict(self.options))
        rtn = dequantize(quantize(weight.detach(), self.spec, name))
        info = {
            "weight_sqnr_db": weight_sqnr_db(weight, result.dequantized),
            "output_error": output_error(weight, result.dequantized, stats.hessian),
            "rtn_output_error": output_error(weight, rtn, stats.hessian),
            "damp": result.damp,
            "tokens": stats.tokens,
        }
        return result.weight, info

    def describe(self) -> dict:
        return {"options": asdict(self.options)}
