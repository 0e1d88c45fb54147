"""GPTQ (Frantar et al. 2022; report §7.2): quantise a weight column by column and let the
not-yet-quantised columns absorb each column's error through the inverse Hessian.

For a linear layer with inputs X (in_features, tokens), the layer-wise objective is
E = ||W X - Ŵ X||² (§7.2), whose Hessian with respect to each row of W is H = 2 X Xᵀ.
Quantising column i of W to q(w_i) and updating the remaining columns F by

    δ_F = -(w_i - q(w_i)) / [H⁻¹]_ii · (H⁻¹)_{:, i}                                 (§7.2)

keeps E minimal. As in the paper, H⁻¹ is taken through its Cholesky factor U (upper,
H⁻¹ = Uᵀ U), whose row i holds exactly the update coefficients for column i once columns
< i are done; updates are applied lazily per block of columns (default 128).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError
from lowbit.numerics.quantization import Quantized, as_rows, decode, encode, find_params, group_size_of
from lowbit.numerics.spec import QuantSpec
from lowbit.packed.qweight import QuantizedWeight

log = logging.getLogger(__name__)

DAMP_RETRIES = 6


@dataclass(frozen=True)
class GPTQResult:
    """quantized: codes and parameters in the layer's column order (`Quantized`).
    dequantized: the matrix the algorithm produced, float32 (out, in).
    damp: the dampening fraction that made H positive definite (may exceed the one asked).
    rounded: float32 (out, in), each weight as it stood when its column was rounded (the
        float weight plus the error feedback it had received): rounding it to nearest with
        the result's scales gives the result's codes. Learned rounding starts from it.
    """

    quantized: Quantized
    dequantized: torch.Tensor
    damp: float
    rounded: torch.Tensor

    @property
    def weight(self) -> QuantizedWeight:
        return QuantizedWeight.from_quantized(self.quantized)


def inverse_hessian_factor(hessian: torch.Tensor, damp: float, name: str = "layer") -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + λI)⁻¹ with λ = damp · mean(diag H), float32 (n, n).

    If H + λI is not positive definite, damp grows tenfold (from 1e-4 if it was 0), up to
    DAMP_RETRIES times, and the log says so. Returns (U, damp used).
    """
    mean_diag = torch.diagonal(hessian).mean().item()
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype)
    for attempt in range(DAMP_RETRIES):
        factor, info = torch.linalg.cholesky_ex(hessian + damp * mean_diag * eye)
        if info == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(factor), upper=True)
            if info == 0:
                return upper, damp
        raised = damp * 10 if damp > 0 else 1e-4
        log.warning("%s: H + %.3g·mean(diag H)·I is not positive definite; retrying with damp %.3g", name, damp, raised)
        damp = raised
    raise LowbitError(f"{name}: the Hessian stays singular even with damp {damp:.3g}; the calibration inputs are degenerate, use more or other calibration text")


def gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: QuantSpec,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    name: str = "layer",
) -> GPTQResult:
    """GPTQ of one weight.

    weight: (out_features, in_features), any float dtype (not modified).
    hessian: float32 (in_features, in_features), H = 2/n Σ x xᵀ over the layer's inputs.
    spec: target format and granularity; group-wise scales are chosen when their first
        column is reached, from the columns' values at that moment (already updated); a
        GGML K-quant's scales when the first column of their super-block is reached.
    act_order: process columns by descending diag(H) (most-activated first).
    static_groups: with act_order, fix every group's scale from the unquantised weight
        in column order first, so groups stay runs of consecutive columns (no g_idx).
    Dead inputs (diag H = 0) get weight 0, as in the paper's reference code.
    """
    out_features, in_features = weight.shape
    if hessian.shape != (in_features, in_features):
        raise LowbitError(f"{name}: Hessian is {tuple(hessian.shape)}, expected ({in_features}, {in_features})")
    if block_size < 1:
        raise LowbitError(f"block_size={block_size} must be at least 1 (e.g. 128)")
    W = weight.detach().to(torch.float32).clone()
    H = hessian.detach().to(torch.float32).clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    group_size = group_size_of((out_features, in_features), spec, name)
    grouped = spec.granularity == "group"
    n_groups = math.ceil(in_features / group_size) if grouped else 1
    scales = torch.zeros(1 if spec.granularity == "tensor" else out_features, n_groups)
    zeros = torch.zeros_like(scales) if spec.has_zero else None
    if not grouped:  # one (S, Z) per row or per tensor, fixed before any update (as the paper)
        rows = as_rows(W, spec)
        scales, zeros = find_params(rows, spec, rows.shape[1])
    elif static_groups:
        scales, zeros = find_params(W, spec, group_size)

    # columns whose scales are fixed together: a group, or a K-quant's super-block of 256,
    # whose group scales are stored as integers under one shared scale (`ggml_stored`)
    window = spec.ggml.block if spec.ggml is not None and spec.ggml.k_quant else group_size
    if act_order and not static_groups and window != group_size:
        raise LowbitError(f"{name}: {spec.format} fixes its scales per super-block of {window} columns; use static act-order")
    perm = torch.argsort(torch.diagonal(H), descending=True) if act_order else torch.arange(in_features)
    W, H = W[:, perm], H[perm][:, perm]
    U, damp_used = inverse_hessian_factor(H, damp, name)

    codes = torch.zeros(out_features, in_features, dtype=torch.uint8)
    Q = torch.zeros_like(W)
    rounded = torch.zeros_like(W)
    # group of each processed position: its original column's group if static, else its own run
    if grouped and static_groups:
        group_of = perm // group_size
    elif grouped:
        group_of = torch.arange(in_features) // group_size
    else:
        group_of = torch.zeros(in_features, dtype=torch.long)

    for i1 in range(0, in_features, block_size):
        i2 = min(i1 + block_size, in_features)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = int(group_of[col])
            if grouped and not static_groups and col % window == 0:
                # the window's columns as they stand now: in-block ones carry this block's updates
                current = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :window]
                s, z = find_params(current, spec, group_size)
                scales[:, g : g + s.shape[1]] = s
                if zeros is not None:
                    zeros[:, g : g + s.shape[1]] = z
            s = scales[:, g : g + 1]
            z = None if zeros is None else zeros[:, g : g + 1]
            w = W1[:, i : i + 1]
            c = encode(w, s, z, spec)
            q = decode(c, s, z, spec)
            codes[:, col : col + 1] = c
            Q[:, col : col + 1] = q
            rounded[:, col : col + 1] = w
            err = (w - q) / U1[i, i]
            W1[:, i:] -= err @ U1[i : i + 1, i:]
            Err1[:, i : i + 1] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    inverse = torch.argsort(perm)
    g_idx = None
    if grouped and act_order and not static_groups:
        g_idx = group_of[inverse]
    quantized = Quantized(codes=codes[:, inverse], scale=scales, zero=zeros, group_size=group_size, spec=spec, g_idx=g_idx)
    return GPTQResult(quantized=quantized, dequantized=Q[:, inverse], damp=damp_used, rounded=rounded[:, inverse])


def output_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """Mean squared output error per token, tr(ΔW H ΔWᵀ) / 2 = mean_t ||ΔW x_t||² for
    H = 2/n Σ x xᵀ (the objective E of §7.2, normalised by the number of tokens)."""
    delta = weight.detach().float() - approx.float()
    return 0.5 * torch.einsum("oi,ij,oj->", delta, hessian.float(), delta).item()
