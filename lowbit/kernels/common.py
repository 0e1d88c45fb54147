"""What the CPU and GPU kernels share: which packed formats they compute, and swapping them
into a model with every layer left behind accounted for."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.modules.quant_linear import QuantLinear
from lowbit.modules.swap import set_module
from lowbit.numerics.formats import IntFormat
from lowbit.numerics.packing import pack

log = logging.getLogger(__name__)


class KernelLinearBase(nn.Module):
    """A kernel-backed linear made from a `QuantLinear`, which it keeps as ``reference``: the
    path for batches above ``max_tokens`` tokens (prefill, compute-bound, where dequantise +
    BLAS wins; a subclass may give a faster ``large_batch``) and what is saved. Subclasses
    give ``compute(x2d)`` and ``kernel_tensors()``."""

    max_tokens = 16

    def __init__(self, module: QuantLinear):
        super().__init__()
        self.reference = module
        self.in_features, self.out_features = module.in_features, module.out_features
        self.group_size = module.group_size

    def kernel_tensors(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def compute(self, x2d: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def large_batch(self, x: torch.Tensor) -> torch.Tensor:
        """Batches above ``max_tokens``: the reference QuantLinear (dequantise + matmul)."""
        return self.reference(x)

    def read_bytes(self) -> int:
        """Bytes one forward reads from memory: the kernel's tensors (and the bias)."""
        tensors = self.kernel_tensors() + ([] if self.reference.bias is None else [self.reference.bias])
        return sum(t.numel() * t.element_size() for t in tensors)

    def output(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The layer's output from y = x Wᵀ (tokens, out_features): the bias added, in x's
        leading shape and dtype."""
        if self.reference.bias is not None:
            y = y + self.reference.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, x.shape[-1])
        if x2d.shape[0] > self.max_tokens:
            return self.large_batch(x)
        return self.output(self.compute(x2d), x)


def kernel_codes(module: QuantLinear) -> torch.Tensor:
    """The module's codes in lowbit's packing (`lowbit.numerics.packing`), uint8 (out_features,
    packed in_features): its own ``qdata``, or for GGUF blocks (codes interleaved with their
    block scales) the codes unpacked once and repacked, a second copy of them beside the
    blocks the module keeps for saving."""
    if module.spec.ggml is None:
        return module.qdata.contiguous()
    return pack(module.qweight.to_quantized().codes, module.spec.bits)


def scales_and_zeros(module: QuantLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """The module's scales S and zero-points Z in code units, float32 (out_features, n_groups),
    so that W = S (q - Z) for every integer format (Eq. 3.2): symmetric codes c stand for
    c + q_min (Z = -q_min); a float offset m (x = S q + m) is Z = -m / S."""
    stored_scale, stored_zero = module.qweight.scale_and_zero()  # float32 for lowbit packing; GGUF blocks: as unpacked
    stored_scale = stored_scale.float()
    stored_zero = None if stored_zero is None else stored_zero.float()
    scale = stored_scale.expand(module.out_features, -1).contiguous()
    if stored_zero is None:
        zero = torch.full_like(scale, float(-module.spec.number_format.qmin))
    elif module.spec.zero_point == "float":
        zero = (-stored_zero / stored_scale).expand_as(scale).contiguous()
    else:
        zero = stored_zero.expand_as(scale).contiguous()
    return scale, zero


def reference_gemm(x: torch.Tensor, module: QuantLinear) -> torch.Tensor:
    """What every kernel must equal: dequantise in float32, then matmul in float32
    (QuantLinear's forward). For the W4A8 kernel the input is first
    ``lowbit.kernels.cpu.quantize_activations_q8(x)``."""
    return F.linear(x.float(), module.qweight.dequantize(torch.float32), None if module.bias is None else module.bias.float())


def format_support(module: QuantLinear, reads_ggml: bool = False) -> str | None:
    """None if ``module``'s format is one the kernels compute (4- or 8-bit integers, groups
    of consecutive columns or one per channel, plain scales), else why not. ``reads_ggml``:
    the kernel also takes the GGML types on such a grid (q4_0, q4_1, q8_0, q4_k), from their
    codes and effective scales repacked in lowbit's layout (`kernel_codes`)."""
    spec = module.spec
    if spec.ggml is not None and not reads_ggml:
        return f"{spec.ggml.name}: GGUF blocks (this kernel reads lowbit's own packing)"
    if not isinstance(spec.number_format, IntFormat) or spec.bits not in (4, 8):
        return f"{spec.describe()}: the kernels cover 4- and 8-bit integer formats"
    if spec.granularity not in ("group", "channel"):
        return "per-tensor scales"
    if module.g_idx is not None:
        return "act-order groups (g_idx)"
    if spec.double_quant:
        return "double-quantised scales"
    return None


def swap_kernels(model: nn.Module, support: Callable[[QuantLinear], str | None], make: Callable[[QuantLinear], nn.Module]) -> dict[str, str]:
    """Replace every QuantLinear that ``support`` accepts by ``make(module)``, in place.
    Returns, for each layer left on the reference path, why (nothing falls back silently)."""
    skipped = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            reason = support(module)
            if reason is None:
                set_module(model, name, make(module))
            else:
                skipped[name] = reason
    if skipped:
        log.warning("%d quantised layers stay on the reference path (e.g. %s: %s)", len(skipped), *next(iter(skipped.items())))
    return skipped
