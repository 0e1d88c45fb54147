"""Round-to-nearest (RTN): quantise each weight on its own, the baseline every method must beat."""

from __future__ import annotations

import torch

from lowbit.numerics.quantization import quantize
from lowbit.numerics.spec import QuantSpec
from lowbit.packed.qweight import QuantizedWeight


def rtn_quantize(weight: torch.Tensor, spec: QuantSpec, name: str = "weight") -> QuantizedWeight:
    """Quantise a weight (out_features, in_features) by Eq. 3.1 with the range ``spec`` picks.

    No data, no error feedback: each element goes to its nearest level independently.
    """
    return QuantizedWeight.from_quantized(quantize(weight.detach(), spec, name))
