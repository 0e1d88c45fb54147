"""Pruning (report §9): magnitude, Wanda and SparseGPT, each a pure function of a weight
and, for the calibrated two, statistics of its inputs.

All three choose a mask in a `SparsityPattern` (unstructured per row, or N:M) by a score,
higher = kept (`lowbit.numerics.sparsity.keep_mask`):

    magnitude   |W_ij|                                     (Han et al. 2015)
    Wanda       |W_ij| · ‖X_j‖₂                            (Sun et al. 2023, Eq. 1)
    SparseGPT   W_ij² / [U]_jj², U the upper Cholesky factor of H⁻¹ = (2 X Xᵀ)⁻¹
                (the OBS saliency w² / [H⁻¹]_jj at the step GPTQ's sweep reaches j)

Magnitude and Wanda only zero the weights they drop. SparseGPT (Frantar & Alistarh 2023)
runs GPTQ's column sweep (§7.2) with the mask: each column's weights become q_j (0 where
pruned, the weight itself or its quantised level where kept), and the columns not yet
reached absorb the error by GPTQ's update

    δ_F = -(w_j - q_j) / U_jj · U_{j,F}

so pruning and quantising are one pass ("joint" in the paper). Its masks are chosen as the
sweep goes (the paper's adaptive mask selection), on the weights as the updates have left
them. N:M: at the start of every run of M columns, from that run. Unstructured: at the start
of every block of ``block_size`` columns, each row ranks all the columns it has not reached
by saliency and prunes those of its lowest that fall in this block, as many as it still has
to prune; so every row ends with the same count, but a block is not forced to the same
sparsity as the others (the paper prunes each block to the target fraction, which costs
dearly when the important input channels gather in some blocks).

Given a spec, magnitude and Wanda round the kept weights to nearest afterwards (prune,
then quantise); SparseGPT quantises inside its sweep.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.algorithms.gptq import column_rounder, inverse_hessian_factor, working_copies
from lowbit.errors import LowbitError
from lowbit.numerics.formats import CodebookFormat
from lowbit.numerics.quantization import Quantized, decode, dequantize, encode, find_params, group_size_of, quantize
from lowbit.numerics.sparsity import SparsityPattern, keep_mask
from lowbit.numerics.spec import QuantSpec
from lowbit.packed.sparse import SparseWeight


@dataclass(frozen=True)
class PruneResult:
    """weight: float32 (out, in), the pruned weight (quantised where a spec was given),
        exactly 0 where pruned.
    mask: bool (out, in), True = kept.
    quantized: with a spec, the dense codes and their scales (`Quantized`; codes where
        pruned carry no meaning); else None.
    damp: the dampening SparseGPT used (None for the others).
    """

    weight: torch.Tensor
    mask: torch.Tensor
    quantized: Quantized | None = None
    damp: float | None = None

    def stored(self, pattern: SparsityPattern, value_dtype: str = "float16") -> SparseWeight:
        """The result in its sparse storage form (`lowbit.packed.sparse`)."""
        if self.quantized is not None:
            return SparseWeight.from_quantized(self.quantized, self.mask, pattern)
        return SparseWeight.from_dense(self.weight, self.mask, pattern, value_dtype)


def _check_spec(spec: QuantSpec | None, name: str) -> None:
    if spec is not None and (spec.ggml is not None or spec.double_quant or spec.granularity not in ("group", "channel")):
        raise LowbitError(f"{name}: pruned weights are quantised with group or channel scales of an integer or codebook grid, "
                          f"not {spec.describe()}")


def _then_round(weight: torch.Tensor, mask: torch.Tensor, spec: QuantSpec | None, name: str) -> PruneResult:
    """Zero the pruned weights; with ``spec``, round the kept ones to nearest (Eq. 3.1) with
    ranges from the pruned weight."""
    _check_spec(spec, name)
    pruned = weight * mask
    if spec is None:
        return PruneResult(pruned, mask)
    q = quantize(pruned, spec, name)
    return PruneResult(dequantize(q) * mask, mask, q)


def magnitude_prune(weight: torch.Tensor, pattern: SparsityPattern, spec: QuantSpec | None = None, name: str = "layer") -> PruneResult:
    """Keep the weights of largest |W_ij| in ``pattern``. weight: (out, in), any float dtype."""
    W = weight.detach().float()
    return _then_round(W, keep_mask(W.abs(), pattern), spec, name)


def wanda_prune(weight: torch.Tensor, input_sq: torch.Tensor, pattern: SparsityPattern, spec: QuantSpec | None = None,
                name: str = "layer") -> PruneResult:
    """Keep the weights of largest |W_ij| · ‖X_j‖₂ in ``pattern`` (Wanda, Eq. 1).

    input_sq: float32 (in,), each input channel's mean square over the calibration tokens
    (the diagonal of GPTQ's H = 2/n X Xᵀ serves: a constant factor changes no row's order).
    """
    W = weight.detach().float()
    if input_sq.shape != (W.shape[1],):
        raise LowbitError(f"{name}: input statistics are {tuple(input_sq.shape)}, expected ({W.shape[1]},)")
    return _then_round(W, keep_mask(W.abs() * input_sq.float().clamp(min=0).sqrt()[None, :], pattern), spec, name)


def _setup(weight, hessian, pattern, spec, block_size, name):
    out_features, in_features = weight.shape
    if hessian.shape != (in_features, in_features):
        raise LowbitError(f"{name}: Hessian is {tuple(hessian.shape)}, expected ({in_features}, {in_features})")
    pattern.check(in_features, name)
    _check_spec(spec, name)
    if pattern.structured and block_size % pattern.m:
        raise LowbitError(f"{name}: block_size {block_size} must be a multiple of the run length {pattern.m} of {pattern.describe()}")
    W, H = working_copies(weight, hessian)
    params = None
    if spec is not None:
        group_size = group_size_of((out_features, in_features), spec, name)
        importance = torch.diagonal(H).clone() if spec.range == "mse" else None
        scales, zeros = find_params(W, spec, group_size, importance)  # channel: final; group: every group's shape, refilled in the sweep
        params = (group_size, importance, scales, zeros)
    return W, H, params


def _block_mask(saliency: torch.Tensor, left: torch.Tensor, width: int) -> torch.Tensor:
    """Keep mask of the first ``width`` columns of ``saliency`` (out, remaining columns):
    each row r prunes those of its ``left[r]`` lowest saliencies that fall among them."""
    ranks = torch.sort(saliency, dim=1, stable=True).indices.argsort(dim=1)[:, :width]  # each column's rank in its row
    return ranks >= left[:, None]


def sparsegpt(weight: torch.Tensor, hessian: torch.Tensor, pattern: SparsityPattern, spec: QuantSpec | None = None,
              block_size: int = 128, damp: float = 0.01, name: str = "layer") -> PruneResult:
    """SparseGPT of one weight, pruned to ``pattern`` and, with ``spec``, quantised in the
    same sweep (the module docstring gives the rule).

    weight: (out, in), any float dtype (not modified). hessian: float32 (in, in), H = 2/n Σ
    x xᵀ. Group scales are chosen when a group's first column is reached, from the columns'
    values at that moment, as GPTQ's are. Dead inputs (diag H = 0) get weight 0.
    """
    out_features, in_features = weight.shape
    W, H, params = _setup(weight, hessian, pattern, spec, block_size, name)
    U, damp_used = inverse_hessian_factor(H, damp, name)
    d = torch.diagonal(U)
    mask = torch.ones(out_features, in_features, dtype=torch.bool)
    to_prune = in_features - pattern.kept_per_row(in_features)
    Q = torch.zeros_like(W)
    codes = torch.zeros(out_features, in_features, dtype=torch.uint8) if spec is not None else None
    if spec is not None:
        group_size, importance, scales, zeros = params
        round_column = column_rounder(spec)
        offset = 0 if isinstance(spec.number_format, CodebookFormat) else spec.number_format.qmin
    for i1 in range(0, in_features, block_size):
        i2 = min(i1 + block_size, in_features)
        W1 = W[:, i1:i2].T.contiguous()  # the block's columns as rows (columns, out): each step reads contiguous memory
        Q1, Err1 = torch.empty_like(W1), torch.empty_like(W1)
        levels1 = torch.empty_like(W1)
        U1 = U[i1:i2, i1:i2]
        if not pattern.structured:
            mask[:, i1:i2] = _block_mask((W[:, i1:] / d[i1:]) ** 2, to_prune - (~mask[:, :i1]).sum(1), i2 - i1)
        for i in range(i2 - i1):
            col = i1 + i
            if pattern.structured and col % pattern.m == 0:
                mask[:, col : col + pattern.m] = keep_mask((W1[i : i + pattern.m].T / d[col : col + pattern.m]) ** 2, pattern)
            w = W1[i]
            if spec is None:
                q = w.clone()
            else:
                g = col // group_size if spec.granularity == "group" else 0
                if spec.granularity == "group" and col % group_size == 0:
                    current = torch.cat([W1[i:].T, W[:, i2:]], dim=1)[:, :group_size]
                    s, z = find_params(current, spec, group_size, None if importance is None else importance[col : col + group_size])
                    scales[:, g : g + 1] = s[:, :1]
                    if zeros is not None:
                        zeros[:, g : g + 1] = z[:, :1]
                q = round_column(w, scales[:, g], None if zeros is None else zeros[:, g], levels1[i])
            Q1[i] = q.mul_(mask[:, col])
            err = torch.sub(w, Q1[i], out=Err1[i]).div_(U1[i, i])
            W1[i + 1 :].addr_(U1[i, i + 1 :], err, alpha=-1.0)
        Q[:, i1:i2] = Q1.T
        if codes is not None:
            codes[:, i1:i2] = (levels1.T - offset).to(torch.uint8)
        W[:, i2:].addmm_(Err1.T, U[i1:i2, i2:], alpha=-1.0)
    quantized = None
    if spec is not None:
        quantized = Quantized(codes=codes, scale=scales, zero=zeros, group_size=group_size, spec=spec)
    return PruneResult(Q, mask, quantized, damp_used)


def sparsegpt_reference(weight: torch.Tensor, hessian: torch.Tensor, pattern: SparsityPattern, spec: QuantSpec | None = None,
                        block_size: int = 128, damp: float = 0.01) -> PruneResult:
    """`sparsegpt` by the rule, one column at a time: every column's error updates all the
    columns after it at once (no lazy blocks), masks and group scales chosen at the same
    columns from the same weights, through the generic `encode` / `decode`. The slow,
    plain form `sparsegpt` is tested against."""
    out_features, in_features = weight.shape
    W, H, params = _setup(weight, hessian, pattern, spec, block_size, "reference")
    U, damp_used = inverse_hessian_factor(H, damp)
    d = torch.diagonal(U)
    mask = torch.ones(out_features, in_features, dtype=torch.bool)
    Q = torch.zeros_like(W)
    codes = torch.zeros(out_features, in_features, dtype=torch.uint8)
    if spec is not None:
        group_size, importance, scales, zeros = params
    for col in range(in_features):
        if not pattern.structured and col % block_size == 0:
            end = min(col + block_size, in_features)
            for row in range(out_features):  # its lowest saliencies among the columns left, as many as it has left to prune
                left = in_features - pattern.kept_per_row(in_features) - int((~mask[row, :col]).sum())
                lowest = torch.sort((W[row, col:] / d[col:]) ** 2, stable=True).indices[:left] + col
                mask[row, lowest[lowest < end]] = False
        if pattern.structured and col % pattern.m == 0:
            mask[:, col : col + pattern.m] = keep_mask((W[:, col : col + pattern.m] / d[col : col + pattern.m]) ** 2, pattern)
        w = W[:, col].clone()
        q = w.clone()
        if spec is not None:
            g = col // group_size if spec.granularity == "group" else 0
            if spec.granularity == "group" and col % group_size == 0:
                part = W[:, col : col + group_size]
                s, z = find_params(part, spec, group_size, None if importance is None else importance[col : col + group_size])
                scales[:, g] = s[:, 0]
                if zeros is not None:
                    zeros[:, g] = z[:, 0]
            s, z = scales[:, g], None if zeros is None else zeros[:, g]
            codes[:, col] = encode(w, s, z, spec)
            q = decode(codes[:, col], s, z, spec)
        Q[:, col] = q * mask[:, col]
        W[:, col:] -= torch.outer((w - Q[:, col]) / U[col, col], U[col, col:])
    quantized = Quantized(codes=codes, scale=scales, zero=zeros, group_size=group_size, spec=spec) if spec is not None else None
    return PruneResult(Q, mask, quantized, damp_used)

