"""Quantise and dequantise a 2-D tensor at any granularity: the numeric core.

Everything here is a pure function over tensors. A 2-D tensor ``x`` of shape (rows, cols) is
cut into groups along its columns (report §4.4: [C_out, C_in] -> [C_out, C_in/G, G]); per
channel and per token are groups of a whole row; per tensor is one group over everything.
When ``G`` does not divide ``cols`` the last group of each row is shorter (``cols % G``
columns), as GPTQModel and AutoRound allow; its scale is computed from its own columns only.

Shapes used throughout:
    x, codes:   (rows, cols)
    scale, zero: (rows, n_groups) with n_groups = ceil(cols / G); (1, 1) for per tensor
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowbit.errors import SpecError
from lowbit.numerics.double_quant import DoubleQuant, double_quantize
from lowbit.numerics.formats import CodebookFormat
from lowbit.numerics.spec import QuantSpec

# MSE clipping search: shrink factors 1, 1 - 1/GRID, ... down to 1 - MAX_SHRINK (as the
# GPTQ reference code's `find_params(mse=True)` does, 80 candidates). The default search
# visits that grid coarse to fine: every MSE_COARSE-th factor first (16), then the 8 grid
# factors within MSE_COARSE - 1 steps either side of each group's best (25 in all).
MSE_GRID = 100
MSE_MAX_SHRINK = 0.8
MSE_COARSE = 5
# The smallest positive float16 (a subnormal): keeps a stored scale from rounding to zero.
MIN_SCALE = 2.0**-24


@dataclass(frozen=True)
class Quantized:
    """Unpacked result of `quantize`.

    codes: uint8 (rows, cols), unsigned codes in [0, 2**bits - 1].
    scale: float32 (rows, n_groups) or (1, 1); already rounded to ``spec.scale_dtype``.
    zero: float32 like ``scale``: the integer zero-point Z (asymmetric ``int``), the float
        offset m (asymmetric ``float``), or None (symmetric and codebook formats).
    group_size: columns per group (the last group of a row may be shorter).
    spec: the setting that produced it.
    g_idx: int64 (cols,) group of each column when groups are not runs of consecutive
        columns (GPTQ with act-order and no static groups); None when column j is in group
        j // group_size.
    scale_dq: with ``spec.double_quant``, the 8-bit stored form of ``scale`` (which then
        holds its dequantised values, the ones the codes were computed against).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    group_size: int
    spec: QuantSpec
    g_idx: torch.Tensor | None = None
    scale_dq: DoubleQuant | None = None


def group_size_of(shape: tuple[int, int], spec: QuantSpec, name: str = "this tensor") -> int:
    rows, cols = shape
    if spec.granularity == "tensor":
        return rows * cols
    return spec.group_size_for(cols, name)


def grouped(x: torch.Tensor, group_size: int, fill: float = float("nan")) -> torch.Tensor:
    """(rows, cols) -> (rows, n_groups, group_size), a short last group padded with ``fill``."""
    rows, cols = x.shape
    n_groups = math.ceil(cols / group_size)
    pad = n_groups * group_size - cols
    if pad:
        x = torch.nn.functional.pad(x, (0, pad), value=fill)
    return x.reshape(rows, n_groups, group_size)


def expand_groups(t: torch.Tensor, group_size: int, cols: int, g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Per-group values (rows, n_groups) -> one per element (rows, cols); (1, 1) stays.

    Column j takes group j // group_size, or g_idx[j] when a group index is given."""
    if t.shape[-1] == 1:
        return t
    if g_idx is not None:
        return t[:, g_idx]
    return t.repeat_interleave(group_size, dim=1)[:, :cols]


def as_rows(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The rows that groups are cut from: per tensor, one row holding every element of
    ``x`` (rows, cols); every other granularity keeps ``x``'s rows."""
    return x.reshape(1, -1) if spec.granularity == "tensor" else x


def _nan_amax(g: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isnan(g), -torch.inf, g).amax(-1)


def _nan_amin(g: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isnan(g), torch.inf, g).amin(-1)


def _nan_quantile(g: torch.Tensor, q: float) -> torch.Tensor:
    """Per-group quantile over the last dim ignoring NaN padding (nearest-rank, upper)."""
    counts = (~torch.isnan(g)).sum(-1, keepdim=True)
    ordered = torch.where(torch.isnan(g), torch.inf, g).sort(-1).values
    rank = torch.clamp(torch.ceil(q * counts).long() - 1, min=0)
    return ordered.gather(-1, rank).squeeze(-1)


def choose_range(groups: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipping range [lo, hi] of each group before any MSE shrinking (report §3.3).

    groups: float32 (rows, n_groups, G), NaN-padded. Returns lo, hi of shape (rows, n_groups).
    Symmetric formats return (-alpha, alpha) with alpha = max|x| (or its percentile).
    """
    if spec.range == "percentile":
        p = spec.percentile / 100.0
        if spec.symmetric:
            alpha = _nan_quantile(groups.abs(), p)
            if spec.grid == "full":
                lo, hi = _nan_amin(groups), _nan_amax(groups)
                alpha = torch.where(hi >= -lo, alpha, -alpha)
            return -alpha, alpha
        return _nan_quantile(groups, 1.0 - p), _nan_quantile(groups, p)
    if spec.symmetric:
        alpha = _nan_amax(groups.abs())
        if spec.grid == "full":  # keep the sign of the largest-magnitude value (see QuantSpec.grid)
            lo, hi = _nan_amin(groups), _nan_amax(groups)
            alpha = torch.where(hi >= -lo, hi, lo)
        return -alpha, alpha
    return _nan_amin(groups), _nan_amax(groups)


def _stored(t: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Round a scale or offset to the dtype it is stored in, back as float32."""
    return t.to(getattr(torch, spec.scale_dtype)).to(torch.float32)


def params_from_range(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale S and zero Z (or offset m) per group from its range (Eq. 3.3).

    Symmetric int:  S = alpha / (2**(n-1) - 1), no Z; on the full grid S = -alpha / 2**(n-1)
                    with alpha signed (so S may be negative).
    Asymmetric int: the range is first widened to contain 0 so that Z is an integer inside
                    [q_min, q_max] and real zero is exact; S = (hi - lo) / (q_max - q_min),
                    Z = Round(-lo / S + q_min).
    Asymmetric float: S = (hi - lo) / (q_max - q_min), offset m = lo.
    Codebook:       S = alpha / unit (levels are normalised to max |level| = unit).
    GGML K-quants:  as above (offsets m ≤ 0: the range is widened to hold 0), then the group
                    scales are stored as the type stores them (`ggml_stored`).
    """
    fmt = spec.number_format
    if isinstance(fmt, CodebookFormat):
        return ggml_stored(_stored(torch.clamp(hi / fmt.unit, min=MIN_SCALE), spec), None, spec)
    if spec.symmetric:
        if spec.grid == "full":
            step = -hi / 2 ** (fmt.bits - 1)
            scale = torch.where(step < 0, -1.0, 1.0) * torch.clamp(step.abs(), min=MIN_SCALE)
        else:
            scale = torch.clamp(hi / fmt.max_level, min=MIN_SCALE)
        return ggml_stored(_stored(scale, spec), None, spec)
    if spec.zero_point == "float":
        if spec.ggml is not None and spec.ggml.k_quant:
            lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
        scale = _stored(torch.clamp((hi - lo) / (fmt.qmax - fmt.qmin), min=MIN_SCALE), spec)
        return ggml_stored(scale, _stored(lo, spec), spec)
    lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
    scale = _stored(torch.clamp((hi - lo) / (fmt.qmax - fmt.qmin), min=MIN_SCALE), spec)
    zero = torch.clamp(torch.round(-lo / scale + fmt.qmin), fmt.qmin, fmt.qmax)
    return scale, zero


def ggml_stored(scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """For a GGML K-quant spec: the group scales (and offsets) (rows, n_groups) as the type
    stores them, integers under one float16 scale per super-block (`ggml_blocks.store_params`),
    back as float32 effective values; n_groups must cover whole super-blocks. Other specs:
    unchanged (their float16 rounding is ``scale_dtype``'s)."""
    t = spec.ggml
    if t is None or not t.k_quant:
        return scale, zero
    from lowbit.numerics.ggml_blocks import effective_params, store_params

    rows, n_groups = scale.shape
    if n_groups % t.groups_per_block:
        raise SpecError(f"{t.name} stores scales per super-block of {t.block} weights; got {n_groups} groups of {t.group}")
    per_block = (-1, t.groups_per_block)
    stored = store_params(t, scale.reshape(per_block), None if zero is None else zero.reshape(per_block))
    new_scale, new_zero = effective_params(stored)
    return new_scale.reshape(rows, n_groups), None if new_zero is None else new_zero.reshape(rows, n_groups)


def quantize_affine(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | float, qmin: int, qmax: int) -> torch.Tensor:
    """Eq. 3.1: X_q = Clamp(Round(X_f / S + Z), q_min, q_max). Returns float integers."""
    return torch.clamp(torch.round(x / scale + zero), qmin, qmax)


def dequantize_affine(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | float) -> torch.Tensor:
    """Eq. 3.2: X_hat = S * (X_q - Z)."""
    return scale * (q - zero)


def encode(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    """Codes (uint8) of ``x`` by Eq. 3.1 (or nearest codebook level), given ``scale`` and
    ``zero`` that broadcast against ``x`` (e.g. (rows, 1) for one column of a weight)."""
    fmt = spec.number_format
    if isinstance(fmt, CodebookFormat):
        return fmt.encode(x / scale)
    if spec.symmetric:
        return fmt.encode(quantize_affine(x, scale, 0.0, fmt.qmin, fmt.qmax))
    if spec.zero_point == "float":
        return fmt.encode(quantize_affine(x - zero, scale, 0.0, fmt.qmin, fmt.qmax))
    return fmt.encode(quantize_affine(x, scale, zero, fmt.qmin, fmt.qmax))


def decode(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    """Values of ``codes`` by Eq. 3.2 (or the codebook), computed in the dtype of ``scale``;
    ``scale`` and ``zero`` broadcast against ``codes``."""
    fmt = spec.number_format
    levels = fmt.decode(codes).to(scale.dtype)
    if isinstance(fmt, CodebookFormat):
        return scale * levels
    if spec.symmetric:
        return dequantize_affine(levels, scale, 0.0)
    if spec.zero_point == "float":
        return scale * levels + zero
    return dequantize_affine(levels, scale, zero)


def _group_sq_error(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec, group_size: int,
                    importance: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of squared quantisation error per group, (rows, n_groups), each column's error
    weighted by ``importance`` (cols,) when given."""
    cols = x.shape[1]
    s, z = expand_groups(scale, group_size, cols), None if zero is None else expand_groups(zero, group_size, cols)
    err = (x - decode(encode(x, s, z, spec), s, z, spec)).square()
    if importance is not None:
        err = err * importance
    return grouped(err, group_size, fill=0.0).sum(-1)


def find_params(x: torch.Tensor, spec: QuantSpec, group_size: int, importance: torch.Tensor | None = None,
                exhaustive: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero per group of a (rows, cols) float32 tensor, by ``spec.range``.

    ``mse`` shrinks the min-max range by factors on the grid 1, 1 - 1/MSE_GRID, ... 1 -
    MSE_MAX_SHRINK and keeps, for each group, the factor with the least squared error: the
    trade between clipping error (values beyond the range) and rounding error (step size)
    of report §2.2. ``importance`` (cols,), float32 ≥ 0, weights each column's squared
    error: a calibrated method passes its inputs' mean square per channel (GPTQ: diag H), so
    the search minimises the layer's output error with cross terms dropped, Σ_j H_jj (w_j -
    ŵ_j)², as llama.cpp's importance matrix does, rather than the weight's own error.
    The search visits the grid coarse to fine (25 of its 81 factors, `MSE_COARSE`); with
    ``exhaustive`` it tries every factor (the reference the default is tested against).
    """
    lo, hi = choose_range(grouped(x, group_size), spec)
    scale, zero = params_from_range(lo, hi, spec)
    if spec.range != "mse":
        return scale, zero
    best_err = _group_sq_error(x, scale, zero, spec, group_size, importance)
    best_shrink = torch.ones_like(lo)
    smallest = 1.0 - MSE_MAX_SHRINK

    def consider(shrink: float | torch.Tensor) -> None:
        nonlocal best_err, best_shrink, scale, zero
        cand_scale, cand_zero = params_from_range(lo * shrink, hi * shrink, spec)
        err = _group_sq_error(x, cand_scale, cand_zero, spec, group_size, importance)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_shrink = torch.where(better, shrink, best_shrink)
        scale = torch.where(better, cand_scale, scale)
        if zero is not None:
            zero = torch.where(better, cand_zero, zero)

    steps = int(round(MSE_MAX_SHRINK * MSE_GRID))
    if exhaustive:
        for i in range(1, steps + 1):
            consider(1.0 - i / MSE_GRID)
    else:
        for i in range(MSE_COARSE, steps + 1, MSE_COARSE):
            consider(1.0 - i / MSE_GRID)
        centre = best_shrink
        for d in range(1 - MSE_COARSE, MSE_COARSE):
            if d:
                consider(torch.clamp(centre + d / MSE_GRID, smallest, 1.0))
    return ggml_stored(scale, zero, spec)  # groups mixed from several candidates: store again


def quantize(x: torch.Tensor, spec: QuantSpec, name: str = "this tensor") -> Quantized:
    """Quantise a 2-D tensor (weight (out, in) or activation (tokens, features)) by ``spec``.

    x: float tensor (rows, cols), any float dtype; computed in float32. NaN or Inf raise.
    Returns unpacked codes and per-group parameters (see `Quantized`).
    """
    if x.dim() != 2:
        raise SpecError(f"{name} has shape {tuple(x.shape)}; quantize takes a 2-D (rows, cols) tensor")
    bad = (~torch.isfinite(x)).sum().item()
    if bad:
        raise SpecError(f"{name} holds {bad} NaN/Inf values; the checkpoint is corrupted or was saved mid-overflow, re-export it")
    group_size = group_size_of(tuple(x.shape), spec, name)
    rows = as_rows(x.to(torch.float32), spec)
    scale, zero = find_params(rows, spec, group_size)
    return quantize_with_params(x, scale, zero, group_size, spec)


def quantize_with_params(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_size: int, spec: QuantSpec) -> Quantized:
    """Codes of ``x`` (rows, cols) against per-group ``scale`` and ``zero`` (rows, n_groups)
    chosen beforehand (by `find_params`, or by a method's own search such as AWQ's clipping).

    This is the one finishing step of every method that fixes its scales before its codes:
    with ``spec.double_quant`` the scales are double-quantised first and the codes are
    computed against the 8-bit scales that will be stored, not the float ones."""
    scale_dq = None
    if spec.double_quant:
        scale_dq = double_quantize(scale)
        scale = scale_dq.dequantize()
    scale, zero = ggml_stored(scale, zero, spec)
    rows = as_rows(x.to(torch.float32), spec)
    cols = rows.shape[1]
    s = expand_groups(scale, group_size, cols)
    z = None if zero is None else expand_groups(zero, group_size, cols)
    codes = encode(rows, s, z, spec).reshape(x.shape)
    return Quantized(codes=codes, scale=scale, zero=zero, group_size=group_size, spec=spec, scale_dq=scale_dq)


def dequantize(q: Quantized, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The tensor ``q`` stands for (Eq. 3.2 per element), computed in ``dtype``, shape of ``q.codes``."""
    rows_view = as_rows(q.codes, q.spec)
    cols = rows_view.shape[1]
    s = expand_groups(q.scale.to(dtype), q.group_size, cols, q.g_idx)
    z = None if q.zero is None else expand_groups(q.zero.to(dtype), q.group_size, cols, q.g_idx)
    return decode(rows_view, s, z, q.spec).reshape(q.codes.shape)


def fake_quantize(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantise then dequantise; same shape and dtype as ``x``."""
    return dequantize(quantize(x, spec)).to(x.dtype)


def weight_sqnr_db(x: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantisation-noise ratio 10 log10(||x||² / ||x - x̂||²), dB (inf if exact)."""
    noise = (x.float() - approx.float()).square().sum().item()
    return float("inf") if noise == 0 else 10.0 * math.log10(x.float().square().sum().item() / noise)


@dataclass(frozen=True)
class ErrorBreakdown:
    """Squared quantisation error split into its two sources (report §2.2), summed over elements.

    rounding: sum of (clip(x) - x_hat)^2 over all elements (values inside the range).
    clipping: sum of (x - clip(x))^2 (values beyond the representable range).
    The two never overlap, so ``total = rounding + clipping`` exactly.
    clipped_fraction: share of elements outside the representable range.
    signal: sum of x^2, for SQNR = 10 log10(signal / total).
    """

    rounding: float
    clipping: float
    clipped_fraction: float
    signal: float

    @property
    def total(self) -> float:
        return self.rounding + self.clipping

    @property
    def sqnr_db(self) -> float:
        return float("inf") if self.total == 0 else 10.0 * math.log10(self.signal / self.total)


def representable_range(q: Quantized) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group [lowest, highest] value a code can stand for, (rows, n_groups) each."""
    fmt = q.spec.number_format
    if isinstance(fmt, CodebookFormat):
        return q.scale * fmt.levels[0], q.scale * fmt.levels[-1]
    if q.spec.symmetric:
        return q.scale * fmt.qmin, q.scale * fmt.qmax
    if q.spec.zero_point == "float":
        return q.zero, q.zero + q.scale * (fmt.qmax - fmt.qmin)
    return q.scale * (fmt.qmin - q.zero), q.scale * (fmt.qmax - q.zero)


def error_breakdown(x: torch.Tensor, q: Quantized) -> ErrorBreakdown:
    """Split the error of ``q`` (the quantised ``x``) into rounding and clipping (§2.2)."""
    x = x.to(torch.float32)
    rows = as_rows(x, q.spec)
    lo, hi = representable_range(q)
    cols = rows.shape[1]
    lo, hi = expand_groups(lo, q.group_size, cols, q.g_idx), expand_groups(hi, q.group_size, cols, q.g_idx)
    clipped = torch.minimum(torch.maximum(rows, lo), hi)
    x_hat = as_rows(dequantize(q), q.spec)
    outside = (rows < lo) | (rows > hi)
    return ErrorBreakdown(
        rounding=(clipped - x_hat).square().sum().item(),
        clipping=(rows - clipped).square().sum().item(),
        clipped_fraction=outside.float().mean().item(),
        signal=rows.square().sum().item(),
    )


