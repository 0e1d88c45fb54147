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
from lowbit.numerics.formats import CodebookFormat
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

    def split_rows(self, sizes: list[int]) -> list["GPTQResult"]:
        """The result of a stacked weight (several linears' rows, one Hessian) cut back into
        one result per linear, ``sizes`` rows each, in order (per-row or per-group scales only)."""
        q = self.quantized
        if q.scale.shape[0] != q.codes.shape[0]:
            raise LowbitError("a per-tensor scale covers every row; quantise per-tensor linears one at a time")
        parts, start = [], 0
        for n in sizes:
            rows = slice(start, start + n)
            part = Quantized(codes=q.codes[rows], scale=q.scale[rows], zero=None if q.zero is None else q.zero[rows],
                             group_size=q.group_size, spec=q.spec, g_idx=q.g_idx)
            parts.append(GPTQResult(part, self.dequantized[rows], self.damp, self.rounded[rows]))
            start += n
        return parts


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


def working_copies(weight: torch.Tensor, hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 copies (W, H) a sweep may update in place, with dead inputs (diag H = 0)
    given weight 0 and a unit diagonal, so H stays invertible, as in the paper's code."""
    W = weight.detach().to(torch.float32).clone()
    H = hessian.detach().to(torch.float32).clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    return W, H


def column_rounder(spec: QuantSpec):
    """The rounding step of GPTQ's column loop for ``spec``: a function
    (w, scale, zero, levels_out) -> q over one column, all float32 (rows,), that writes each
    weight's integer level (its code plus the format's qmin; a codebook's index) into
    ``levels_out`` and returns the dequantised column. Integer grids compute Eq. 3.1 and 3.2
    in place, a handful of tensor operations per column, the same arithmetic as
    `encode` / `decode` (tested equal bit for bit); codebooks go through `encode` / `decode`.
    """
    fmt = spec.number_format
    if isinstance(fmt, CodebookFormat):
        def round_codebook(w, scale, zero, levels_out):
            codes = encode(w, scale, zero, spec)
            levels_out.copy_(codes)
            return decode(codes, scale, zero, spec)
        return round_codebook
    qmin, qmax = fmt.qmin, fmt.qmax
    if spec.symmetric:
        def round_symmetric(w, scale, zero, levels_out):
            torch.div(w, scale, out=levels_out).round_().clamp_(qmin, qmax)
            return levels_out * scale
        return round_symmetric
    if spec.zero_point == "float":
        def round_offset(w, scale, offset, levels_out):
            torch.sub(w, offset, out=levels_out).div_(scale).round_().clamp_(qmin, qmax)
            return (levels_out * scale).add_(offset)
        return round_offset

    def round_zero_point(w, scale, zero, levels_out):
        torch.div(w, scale, out=levels_out).add_(zero).round_().clamp_(qmin, qmax)
        return (levels_out - zero).mul_(scale)
    return round_zero_point


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
    W, H = working_copies(weight, hessian)

    group_size = group_size_of((out_features, in_features), spec, name)
    grouped = spec.granularity == "group"
    n_groups = math.ceil(in_features / group_size) if grouped else 1
    scales = torch.zeros(1 if spec.granularity == "tensor" else out_features, n_groups)
    zeros = torch.zeros_like(scales) if spec.has_zero else None
    # with --range mse, each group's range search weighs a column's error by its input's
    # mean square, diag H (the output error without cross terms)
    importance = torch.diagonal(H).clone() if spec.range == "mse" else None
    if not grouped:  # one (S, Z) per row or per tensor, fixed before any update (as the paper)
        rows = as_rows(W, spec)
        scales, zeros = find_params(rows, spec, rows.shape[1], importance if spec.granularity == "channel" else None)
    elif static_groups:
        scales, zeros = find_params(W, spec, group_size, importance)

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
    group_list = group_of.tolist()
    round_column = column_rounder(spec)
    offset = spec.number_format.qmin if not isinstance(spec.number_format, CodebookFormat) else 0

    for i1 in range(0, in_features, block_size):
        i2 = min(i1 + block_size, in_features)
        # the block's columns as rows (columns, out_features): each column step reads and
        # updates contiguous memory
        W1 = W[:, i1:i2].T.contiguous()
        levels1 = torch.empty_like(W1)  # the integer level of each weight (code + qmin)
        Q1 = torch.empty_like(W1)
        Err1 = torch.empty_like(W1)
        U1 = U[i1:i2, i1:i2]
        diag = torch.diagonal(U1).tolist()
        for i in range(i2 - i1):
            col = i1 + i
            g = group_list[col]
            if grouped and not static_groups and col % window == 0:
                # the window's columns as they stand now: in-block ones carry this block's updates
                current = torch.cat([W1[i:].T, W[:, i2:]], dim=1)[:, :window]
                s, z = find_params(current, spec, group_size, None if importance is None else importance[perm[col : col + window]])
                scales[:, g : g + s.shape[1]] = s
                if zeros is not None:
                    zeros[:, g : g + s.shape[1]] = z
            w = W1[i]
            Q1[i] = round_column(w, scales[:, g], None if zeros is None else zeros[:, g], levels1[i])
            err = torch.sub(w, Q1[i], out=Err1[i]).div_(diag[i])
            # columns after i absorb its error; column i keeps the weight it was rounded from
            W1[i + 1 :].addr_(U1[i, i + 1 :], err, alpha=-1.0)
        rounded[:, i1:i2] = W1.T
        Q[:, i1:i2] = Q1.T
        codes[:, i1:i2] = (levels1.T - offset).to(torch.uint8)
        W[:, i2:].addmm_(Err1.T, U[i1:i2, i2:], alpha=-1.0)

    inverse = torch.argsort(perm)
    g_idx = None
    if grouped and act_order and not static_groups:
        g_idx = group_of[inverse]
    quantized = Quantized(codes=codes[:, inverse], scale=scales, zero=zeros, group_size=group_size, spec=spec, g_idx=g_idx)
    return GPTQResult(quantized=quantized, dequantized=Q[:, inverse], damp=damp_used, rounded=rounded[:, inverse])


def gptq_reference(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, damp: float = 0.01,
                   act_order: bool = False, static_groups: bool = False) -> GPTQResult:
    """The update rule of §7.2 applied one column at a time, with no lazy blocks and the
    generic `encode` / `decode`: the slow, plain form `gptq` is tested against. Same
    arguments and result as `gptq` (integer and codebook grids with min-max or percentile
    ranges; not GGML K-quants)."""
    out_features, in_features = weight.shape
    W, H = working_copies(weight, hessian)
    group_size = group_size_of((out_features, in_features), spec)
    grouped = spec.granularity == "group"
    if not grouped:
        rows = as_rows(W, spec)
        scales, zeros = find_params(rows, spec, rows.shape[1])
    else:
        scales, zeros = find_params(W, spec, group_size)  # every group's shape; refilled below unless static
    perm = torch.argsort(torch.diagonal(H), descending=True) if act_order else torch.arange(in_features)
    W, H = W[:, perm], H[perm][:, perm]
    U, damp_used = inverse_hessian_factor(H, damp)
    codes = torch.zeros(out_features, in_features, dtype=torch.uint8)
    Q, rounded = torch.zeros_like(W), torch.zeros_like(W)
    for col in range(in_features):
        g = int(perm[col]) // group_size if grouped and static_groups else (col // group_size if grouped else 0)
        if grouped and not static_groups and col % group_size == 0:
            s, z = find_params(W[:, col : col + group_size], spec, group_size)
            scales[:, g : g + 1] = s
            if zeros is not None:
                zeros[:, g : g + 1] = z
        s, z = scales[:, g : g + 1], None if zeros is None else zeros[:, g : g + 1]
        w = W[:, col : col + 1]
        c = encode(w, s, z, spec)
        codes[:, col : col + 1], Q[:, col : col + 1], rounded[:, col : col + 1] = c, decode(c, s, z, spec), w
        W[:, col:] -= (w - Q[:, col : col + 1]) / U[col, col] @ U[col : col + 1, col:]
    inverse = torch.argsort(perm)
    g_idx = (torch.arange(in_features) // group_size)[inverse] if grouped and act_order and not static_groups else None
    quantized = Quantized(codes=codes[:, inverse], scale=scales, zero=zeros, group_size=group_size, spec=spec, g_idx=g_idx)
    return GPTQResult(quantized=quantized, dequantized=Q[:, inverse], damp=damp_used, rounded=rounded[:, inverse])


def output_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """Mean squared output error per token, tr(ΔW H ΔWᵀ) / 2 = mean_t ||ΔW x_t||² for
    H = 2/n Σ x xᵀ (the objective E of §7.2, normalised by the number of tokens)."""
    delta = weight.detach().float() - approx.float()
    return 0.5 * torch.einsum("oi,ij,oj->", delta, hessian.float(), delta).item()
