"""GPU kernels (Triton) for decode-sized batches: W4A16 and W8A16, group-wise or per channel,
symmetric or asymmetric, reading `QuantLinear`'s packed codes as they are stored.

The weight of a `QuantLinear` is W[n, k] = S[n, g(k)] (q[n, k] - Z[n, g(k)]) (report Eq. 3.2,
g(k) = k // group_size). The kernel folds the zero into an offset, W = q S + B with
B = -Z S, both kept in the activation dtype, and computes Y = X Wᵀ tile by tile: a program
owns BLOCK_N output features and BLOCK_M tokens, walks K in chunks of BLOCK_K, unpacks the
chunk's codes in registers, scales them, and feeds the tensor cores (fp32 accumulation);
one token (GEMV) takes a second kernel on the CUDA cores instead, which needs no padding of
the token dimension to the tensor cores' 16 rows. Code tiles are loaded row-major (each
output feature's bytes contiguous) so that the loads coalesce.
At 4 bits a byte holds codes k = 2i (low nibble) and 2i + 1 (high nibble), so instead of
interleaving the nibbles the kernel splits X into its even and odd columns and does two
products per chunk: X_even·Wloᵀ + X_odd·Whiᵀ.

At batch 1–16 the product is bound by reading the weight (§10: arithmetic intensity ≈ M
FLOPs per weight byte at W8, 2M at W4), so the kernel's whole job is to read 4 (or 8) bits
per weight instead of 16, with enough programs in flight to keep HBM busy; block sizes are
autotuned per shape. Larger batches (prefill) are compute-bound and go to the reference
dequantise + cuBLAS path, like the CPU kernel's.

Triton is imported lazily: lowbit builds, imports and passes its tests without it. With
TRITON_INTERPRET=1 set before this module is imported, the kernels run in Triton's
interpreter on CPU tensors; the tests use that to check the kernel logic on machines with
no GPU, and the compiled kernel on a GPU.
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.kernels.common import KernelLinearBase, format_support, reference_gemm, scales_and_zeros, swap_kernels
from lowbit.modules.quant_linear import QuantLinear

log = logging.getLogger(__name__)

MAX_KERNEL_TOKENS = 16
# Block sizes used instead of autotuning when set (tests set it: autotuning every test shape
# would compile every configuration for each); the interpreter always uses it.
FIXED_CONFIG: dict | None = None
_INTERPRETER_CONFIG = {"BLOCK_N": 32, "BLOCK_K": 64}
# The one-token 4-bit kernel: "auto" (time both on a GPU, keep the faster per shape), "pairs"
# or "words" (see `_gemv_layout`); the choices made are in _GEMV_PICKS.
GEMV_LAYOUT = "auto"
_GEMV_PICKS: dict[tuple, str] = {}


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@lru_cache(maxsize=1)
def _kernels():
    """Define (once) and return the Triton kernel and its autotuned wrapper."""
    try:
        import triton

        from lowbit.kernels import triton_src
    except ImportError as err:
        raise LowbitError("the GPU kernels need Triton (pip install triton; it comes with CUDA builds of torch)") from err
    return triton, triton_src


def _gemv_layout(x: torch.Tensor, q: torch.Tensor, scales_t: torch.Tensor, offsets_t: torch.Tensor, K: int, group_size: int,
                 bits: int) -> str:
    """Which one-token kernel reads 4-bit codes: "pairs" (bytes, x split into even and odd
    columns) or "words" (int32 words, 8 codes each, x in column order; needs K % 8 == 0).
    ``GEMV_LAYOUT`` forces one; "auto" times both (each autotuned) the first time a shape is
    seen on a GPU and keeps the faster, as autotuning does with block sizes. The interpreter
    and fixed block sizes (tests) take "pairs" unless told otherwise."""
    if bits != 4 or K % 8 or q.stride(0) % 4 or q.data_ptr() % 4:
        return "pairs"
    if GEMV_LAYOUT != "auto":
        return GEMV_LAYOUT
    if interpreting() or FIXED_CONFIG is not None or not x.is_cuda:
        return "pairs"
    key = (q.shape[0], K, group_size, x.dtype)
    if key not in _GEMV_PICKS:
        from triton.testing import do_bench

        times = {}
        for layout in ("pairs", "words"):
            _GEMV_PICKS[key] = layout
            times[layout] = do_bench(lambda: wq_gemm(x, q, scales_t, offsets_t, K, group_size, bits), return_mode="median")
        _GEMV_PICKS[key] = min(times, key=times.get)
        log.info("one-token W4 kernel for %s: %s (%s)", key, _GEMV_PICKS[key], ", ".join(f"{k} {1000 * v:.1f} us" for k, v in times.items()))
    return _GEMV_PICKS[key]


def wq_gemm(x: torch.Tensor, q: torch.Tensor, scales_t: torch.Tensor, offsets_t: torch.Tensor, in_features: int,
            group_size: int, bits: int) -> torch.Tensor:
    """Y = X Wᵀ for X (M, K) fp16/bf16 and W given by codes ``q`` (N, KB) uint8 (lowbit's
    packing) with ``scales_t``/``offsets_t`` (n_groups, N) in X's dtype. Returns (M, N)."""
    triton, src = _kernels()
    M, K = x.shape
    N = q.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    fixed = FIXED_CONFIG or (_INTERPRETER_CONFIG if interpreting() else None)
    if M == 1 and _gemv_layout(x, q, scales_t, offsets_t, K, group_size, bits) == "words":
        qw = q.view(torch.int32)  # (N, K/8): 8 codes per word
        args = (x, qw, scales_t, offsets_t, y, N, K, qw.shape[1], qw.stride(0))
        if fixed is not None:
            src.wq_gemv_words[(triton.cdiv(N, fixed["BLOCK_N"]),)](*args, GROUP=group_size, **fixed)
        else:
            src.tuned_gemv_words[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)](*args, GROUP=group_size)
        return y
    if M == 1:  # GEMV on the CUDA cores
        args = (x, q, scales_t, offsets_t, y, N, K, q.shape[1], q.stride(0))
        if fixed is not None:
            src.wq_gemv[(triton.cdiv(N, fixed["BLOCK_N"]),)](*args, GROUP=group_size, BITS=bits, **fixed)
        else:
            src.tuned_gemv[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)](*args, GROUP=group_size, BITS=bits)
        return y
    block_m = 16
    # M_BUCKET is only an autotuning key (small batches tune apart from GEMV-like shapes)
    args = (x, q, scales_t, offsets_t, y, M, N, K, q.shape[1], x.stride(0), q.stride(0), y.stride(0), 16)
    if fixed is not None:  # one configuration (the interpreter would run every config it is given)
        grid = (triton.cdiv(N, fixed["BLOCK_N"]), triton.cdiv(M, block_m))
        src.wq_gemm[grid](*args, GROUP=group_size, BITS=bits, BLOCK_M=block_m, **fixed)
    else:
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(M, block_m))  # noqa: E731
        src.tuned[grid](*args, GROUP=group_size, BITS=bits, BLOCK_M=block_m)
    return y


def kernel_support(module: QuantLinear) -> str | None:
    """None if the Triton kernel computes ``module``, else why not."""
    return format_support(module)


class TritonLinear(KernelLinearBase):
    """A `QuantLinear` prepared for the Triton kernel (see module docstring).

    Keeps the packed codes as they are (no copy) and adds scales and offsets B = -Z S,
    transposed to (n_groups, out_features), in ``dtype``. Batches above MAX_KERNEL_TOKENS
    tokens go through the reference path (dequantise + matmul).
    """

    def __init__(self, module: QuantLinear, dtype: torch.dtype = torch.float16):
        reason = kernel_support(module)
        if reason is not None:
            raise LowbitError(f"the Triton kernel cannot run this layer: {reason}")
        super().__init__(module)
        self.max_tokens = MAX_KERNEL_TOKENS
        self.bits = module.spec.bits
        scale, zero = scales_and_zeros(module)
        offset = -zero * scale
        self.register_buffer("scales_t", scale.t().contiguous().to(dtype))
        self.register_buffer("offsets_t", offset.t().contiguous().to(dtype))

    def kernel_tensors(self) -> list[torch.Tensor]:
        return [self.reference.qdata, self.scales_t, self.offsets_t]

    def compute(self, x2d: torch.Tensor) -> torch.Tensor:
        dtype = self.scales_t.dtype
        return wq_gemm(x2d.to(dtype).contiguous(), self.reference.qdata, self.scales_t, self.offsets_t, self.in_features, self.group_size, self.bits)


def use_triton_kernels(model: nn.Module, dtype: torch.dtype = torch.float16) -> dict[str, str]:
    """Swap every supported QuantLinear for a TritonLinear, in place. Returns, for each layer
    left on the reference path, why (nothing falls back silently)."""
    return swap_kernels(model, kernel_support, lambda module: TritonLinear(module, dtype))


__all__ = ["MAX_KERNEL_TOKENS", "TritonLinear", "kernel_support", "reference_gemm", "triton_available", "use_triton_kernels", "wq_gemm"]
