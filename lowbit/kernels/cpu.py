"""CPU kernels for decode-sized batches: W4 and W8 weight-only GEMM (fp32 activations).

The C++ source (`cpu_kernels.cpp`) is compiled once per machine with -O3 -march=native
-fopenmp by torch's extension builder (needs a C++ compiler and ninja) into the lowbit cache
(`~/.cache/lowbit/kernels/<key>`), then loaded from there. `KernelLinear` wraps a
`QuantLinear` whose format the kernel supports and computes batches of up to 16 tokens with
it; larger batches (prefill) are compute-bound: the extension dequantises W to float32 a block
of rows at a time into a buffer that stays in cache and runs one BLAS matmul per block (the
same arithmetic as the reference path, without its elementwise temporaries, and without
writing the float weight to memory and reading it back). `QuantLinear`'s reference path stays
the ground truth the tests compare against.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.kernels.common import KernelLinearBase, format_support, kernel_codes, reference_gemm, scales_and_zeros, swap_kernels
from lowbit.models.registry import cache_dir
from lowbit.modules.quant_linear import QuantLinear

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
MAX_KERNEL_TOKENS = 16
PREFILL_BLOCK_BYTES = 2 << 20  # one thread's dequantised block of W on the prefill path; chosen by bench/prefill_blocks.py


def build_extension(source: Path, prefix: str):
    """Compile ``source`` (first time on a machine, into the lowbit cache under a key of its
    text, the headers beside it, torch's version and the flags) and load it; a clear error if
    impossible."""
    from torch.utils import cpp_extension

    flags = ["-O3", "-march=native", "-fopenmp"]
    texts = [source.read_bytes(), *(header.read_bytes() for header in sorted(source.parent.glob("*.h")))]
    key = hashlib.sha256(b"".join(texts) + torch.__version__.encode() + " ".join(flags).encode()).hexdigest()[:12]
    build = cache_dir() / "kernels" / key
    build.mkdir(parents=True, exist_ok=True)
    try:
        return cpp_extension.load(name=f"{prefix}_{key}", sources=[str(source)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                                  build_directory=str(build), verbose=bool(os.environ.get("LOWBIT_VERBOSE_BUILD")))
    except (RuntimeError, OSError, ImportError) as err:
        raise LowbitError(f"could not build lowbit's CPU kernels ({err}); they need a C++ compiler (g++) and ninja (pip install ninja)") from err


@lru_cache(maxsize=1)
def load_kernels():
    """The W4/W8 GEMM extension (`cpu_kernels.cpp`)."""
    return build_extension(SOURCE, "lowbit_cpu")


def prefill_block_rows(out_features: int, in_features: int, block_bytes: int = PREFILL_BLOCK_BYTES) -> int:
    """Rows of W one thread of the prefill path (`gemm_dequant_blocks`) dequantises at a time:
    about ``block_bytes`` of float32, a multiple of 32 rows (BLAS is slow on odd widths), and
    at most half of W's rows per thread, so that every thread has work."""
    rows = max(32, 32 * round(block_bytes / (4 * in_features) / 32))
    per_thread = -(-out_features // (2 * torch.get_num_threads()))
    return max(16, min(rows, 16 * -(-per_thread // 16)))


def kernel_support(module: QuantLinear, int8_activations: bool = False) -> str | None:
    """None if the kernel (the W4A8 or W8A8 one with ``int8_activations``) computes
    ``module``, else why not."""
    reason = format_support(module, reads_ggml=True)
    if reason is not None:
        return reason
    if module.in_features % 32 or module.group_size % 32:
        return f"in_features {module.in_features} / group {module.group_size} not multiples of 32"
    return None


class KernelLinear(KernelLinearBase):
    """A `QuantLinear` prepared for the CPU kernel (see module docstring).

    q: uint8, the kernel's layout; scales, zeros: float32 (N, n_groups), zeros in code units.
    The original QuantLinear is kept for batches above MAX_KERNEL_TOKENS and for saving.
    ``int8_activations``: decode-sized batches round the input to int8 blocks of 32
    (`quantize_activations_q8`) and multiply in integers: W4A8 for 4-bit codes, W8A8 for
    8-bit ones; larger batches keep float activations.
    """

    def __init__(self, module: QuantLinear, int8_activations: bool = False):
        reason = kernel_support(module, int8_activations)
        if reason is not None:
            raise LowbitError(f"the CPU kernel cannot run this layer: {reason}")
        super().__init__(module)
        self.max_tokens = MAX_KERNEL_TOKENS
        self.kernels = load_kernels()
        self.int8_activations = int8_activations
        self.int4 = module.spec.bits == 4
        self.q = kernel_codes(module)  # lowbit's own packing in place; GGUF blocks' codes repacked once
        scale, zero = scales_and_zeros(module)
        self.register_buffer("scales", scale)
        self.register_buffer("zeros", zero)

    def kernel_tensors(self) -> list[torch.Tensor]:
        return [self.q, self.scales, self.zeros]

    def dequantized_weight(self) -> torch.Tensor:
        """The layer's weight in float32 (out_features, in_features), computed by the extension."""
        return self.kernels.dequantize(self.q, self.scales, self.zeros, self.group_size, self.int4, self.in_features)

    def large_batch(self, x: torch.Tensor) -> torch.Tensor:
        """Prefill-sized batches, float activations (also for W4A8): W dequantised a block of
        rows at a time in cache, one BLAS product per block (`gemm_dequant_blocks`)."""
        x2d = x.reshape(-1, x.shape[-1]).to(torch.float32).contiguous()
        y = self.kernels.gemm_dequant_blocks(x2d, self.q, self.scales, self.zeros, self.group_size, self.int4,
                                               prefill_block_rows(self.out_features, self.in_features))
        return self.output(y, x)

    def compute(self, x2d: torch.Tensor) -> torch.Tensor:
        x2d = x2d.to(torch.float32).contiguous()
        if x2d.shape[0] > MAX_KERNEL_TOKENS:  # max_tokens raised (e.g. to score the W4A8 numerics): 16 rows at a time
            return torch.cat([self.compute(x2d[i : i + MAX_KERNEL_TOKENS]) for i in range(0, x2d.shape[0], MAX_KERNEL_TOKENS)])
        if self.int8_activations:
            gemm = self.kernels.gemm_w4a8 if self.int4 else self.kernels.gemm_w8a8
            return gemm(x2d, self.q, self.scales, self.zeros, self.group_size, False)
        return self.kernels.gemm(x2d, self.q, self.scales, self.zeros, self.group_size, self.int4)


def use_cpu_kernels(model: nn.Module, int8_activations: bool = False, w8a8: bool = False) -> dict[str, str]:
    """Swap every supported QuantLinear for a KernelLinear, in place. Returns, for each
    QuantLinear left on the reference path, why (so nothing falls back silently).
    ``int8_activations``: the W4A8 kernel for 4-bit layers (see `quantize_activations_q8`);
    8-bit layers (an int8 head, say) keep float activations unless ``w8a8`` (the W8A8
    kernel: the same int8 activation blocks, integer products, as llama.cpp multiplies q8_0
    weights)."""

    def int8_acts(module: QuantLinear) -> bool:
        return int8_activations if module.spec.bits == 4 else w8a8

    return swap_kernels(model, lambda module: kernel_support(module, int8_acts(module)), lambda module: KernelLinear(module, int8_acts(module)))


def quantize_activations_q8(x: torch.Tensor) -> torch.Tensor:
    """What the W4A8 kernel does to its input, as floats: each token's activations in blocks
    of 32 columns, d = max|x| / 127 per block, x' = d · round(x / d) (llama.cpp's Q8_0
    form; symmetric per-block int8, Eq. 3.1 with Z = 0). x: (M, K), K a multiple of 32."""
    blocks = x.float().reshape(x.shape[0], -1, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127.0
    codes = torch.where(d > 0, torch.round(blocks / torch.where(d > 0, d, 1.0)), 0.0)
    return (codes * d).reshape(x.shape)


__all__ = ["KernelLinear", "kernel_support", "load_kernels", "prefill_block_rows", "quantize_activations_q8", "reference_gemm", "use_cpu_kernels"]
