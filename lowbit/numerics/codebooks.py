"""Codebook formats: NormalFloat (NF4), 4-bit and 8-bit floats (report §2.1, §7.5).

Every table is normalised to max |level| = 1 and used with block-wise absmax scaling
(`CodebookFormat`): a block's scale is its absmax, a value is coded as the nearest level.

NF4 (QLoRA). The report's quantile formula, q_i = ½(Q_X(i/(2^k+1)) + Q_X((i+1)/(2^k+1))),
puts equal probability mass of N(0, 1) in every bin, but its end levels are the quantiles of
probability 0 and 1, which are infinite, and it has no exact zero. QLoRA therefore builds
each sign separately from the normal quantile function Q_X = Φ⁻¹ at evenly spaced
probabilities from p_max down to ½: 2^(k-1) positive levels and 2^(k-1) - 1 negative ones,
plus an exact 0, where p_max = 1 - ½(1/(2·2^k) + 1/(2·(2^k - 1))) is the average of the
outermost bin centres of a 2^k-bin and a (2^k - 1)-bin quantile grid, so the extreme level
is finite. For k = 4 this gives bitsandbytes' NF4 table (tested to 1e-7).

Minifloats. A value with sign s, exponent e (E bits, bias B) and mantissa m (M bits) is
(-1)^s · (1 + m/2^M) · 2^(e-B), or (m/2^M) · 2^(1-B) when e = 0 (report §2.1).
  fp4      E2M1 as bitsandbytes stores it (bias 0; its one subnormal is 0.0625 rather than
           1): ±{0, 0.0625, 2, 3, 4, 6, 8, 12} / 12. The FP4 of bitsandbytes and QLoRA.
  fp4-e2m1 OCP MX E2M1 (bias 1): ±{0, 0.5, 1, 1.5, 2, 3, 4, 6} / 6.
  fp8-e4m3 OCP E4M3 (bias 7, no infinities, S.1111.111 is NaN): max 448.
  fp8-e5m2 OCP E5M2 (bias 15, exponent 31 reserved for Inf/NaN): max 57344.
"""

from __future__ import annotations

from statistics import NormalDist

from lowbit.numerics.formats import CodebookFormat, register_codebook


def normal_float_levels(bits: int) -> list[float]:
    """NormalFloat levels for ``bits`` bits (sorted, normalised, with an exact 0)."""
    n = 2**bits
    p_max = 1 - 0.5 * (1 / (2 * n) + 1 / (2 * (n - 1)))
    quantile = NormalDist().inv_cdf  # Φ⁻¹ in float64

    def evenly(count: int) -> list[float]:  # `count` probabilities from p_max down to ½, ½ left out
        return [p_max + (0.5 - p_max) * i / count for i in range(count)]

    positive = [quantile(p) for p in evenly(n // 2)]
    negative = [-quantile(p) for p in evenly(n // 2 - 1)]
    levels = sorted([*negative, 0.0, *positive])
    largest = max(abs(v) for v in levels)
    return [v / largest for v in levels]


def minifloat_levels(exponent_bits: int, mantissa_bits: int, bias: int, reserved_top_exponent: bool = False, nan_top_code: bool = False) -> list[float]:
    """All finite values of a sign-exponent-mantissa float, normalised to max |level| = 1.

    reserved_top_exponent: the all-ones exponent is Inf/NaN (IEEE-like, E5M2).
    nan_top_code: only the all-ones exponent with all-ones mantissa is NaN (E4M3).
    """
    magnitudes = set()
    top = 2**exponent_bits - 1
    for e in range(2**exponent_bits):
        if reserved_top_exponent and e == top:
            continue
        for m in range(2**mantissa_bits):
            if nan_top_code and e == top and m == 2**mantissa_bits - 1:
                continue
            frac = m / 2**mantissa_bits
            magnitudes.add(frac * 2.0 ** (1 - bias) if e == 0 else (1 + frac) * 2.0 ** (e - bias))
    levels = sorted({v for mag in magnitudes for v in (mag, -mag)})
    largest = max(abs(v) for v in levels)
    return [v / largest for v in levels]


def _bnb_fp4_levels() -> list[float]:
    magnitudes = [0.0, 0.0625, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0]
    return sorted({v / 12.0 for mag in magnitudes for v in (mag, -mag)})


NF4 = register_codebook(CodebookFormat("nf4", tuple(normal_float_levels(4))))
FP4 = register_codebook(CodebookFormat("fp4", tuple(_bnb_fp4_levels())))
FP4_E2M1 = register_codebook(CodebookFormat("fp4-e2m1", tuple(minifloat_levels(2, 1, bias=1))))
FP8_E4M3 = register_codebook(CodebookFormat("fp8-e4m3", tuple(minifloat_levels(4, 3, bias=7, nan_top_code=True))))
FP8_E5M2 = register_codebook(CodebookFormat("fp8-e5m2", tuple(minifloat_levels(5, 2, bias=15, reserved_top_exponent=True))))
