"""Double quantisation (QLoRA, report §7.5): quantise the quantisation constants themselves.

Block-wise absmax formats store one scale per block of weights; at block 64 a float32 scale
costs 32/64 = 0.5 bits per weight. Double quantisation subtracts the scales' mean (one
float32 offset) and stores the centred scales as 8-bit symmetric integers in second-level
blocks of 256, each with one float32 scale:

    bits per weight for the constants = 8/64 + 32/(64·256) ≈ 0.127    (vs 0.5: saves 0.373)

The report quotes "roughly 0.37 bits per parameter". (QLoRA stores the second level as FP8
via bitsandbytes' dynamic 8-bit map; lowbit uses plain int8, whose absolute error is
uniform over the centred range, which suits scales that cluster around their mean.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DQ_BLOCK = 256
INT8_MAX = 127
MIN_SCALE = 2.0**-24  # as lowbit.numerics.quantization: no stored scale may be zero


@dataclass(frozen=True)
class DoubleQuant:
    """Scales (rows, n_groups) stored as:

    codes:  uint8 (rows * n_groups,): int8 level + 128 of each centred scale, row-major.
    block_scale: float32 (ceil(rows * n_groups / 256),): second-level absmax / 127.
    offset: float32 (1,): the mean that was subtracted.
    shape:  (rows, n_groups).
    """

    codes: torch.Tensor
    block_scale: torch.Tensor
    offset: torch.Tensor
    shape: tuple[int, int]

    def dequantize(self) -> torch.Tensor:
        """The scales, float32 (rows, n_groups); floored at 2^-24 so none reaches zero."""
        n = self.codes.numel()
        levels = self.codes.to(torch.float32) - 128
        per_value = self.block_scale.repeat_interleave(DQ_BLOCK)[:n]
        return (levels * per_value + self.offset).clamp(min=MIN_SCALE).reshape(self.shape)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"scales_q": self.codes, "scales_block": self.block_scale, "scales_offset": self.offset}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], shape: tuple[int, int]) -> "DoubleQuant":
        return cls(tensors["scales_q"], tensors["scales_block"], tensors["scales_offset"], shape)

    @staticmethod
    def layout(shape: tuple[int, int]) -> dict[str, tuple[tuple[int, ...], str]]:
        """Name -> (shape, dtype) of the stored tensors for scales of ``shape``."""
        n = shape[0] * shape[1]
        return {"scales_q": ((n,), "uint8"), "scales_block": ((-(-n // DQ_BLOCK),), "float32"), "scales_offset": ((1,), "float32")}


def double_quantize(scale: torch.Tensor) -> DoubleQuant:
    """Second-level quantisation of a (rows, n_groups) float scale tensor."""
    flat = scale.reshape(-1).to(torch.float32)
    offset = flat.mean().reshape(1)
    centred = flat - offset
    n = flat.numel()
    pad = (-n) % DQ_BLOCK
    blocks = torch.nn.functional.pad(centred, (0, pad)).reshape(-1, DQ_BLOCK)
    block_scale = (blocks.abs().amax(1) / INT8_MAX).clamp(min=1e-12)
    levels = torch.clamp(torch.round(blocks / block_scale[:, None]), -INT8_MAX, INT8_MAX).reshape(-1)[:n]
    return DoubleQuant((levels + 128).to(torch.uint8), block_scale, offset, tuple(scale.shape))
