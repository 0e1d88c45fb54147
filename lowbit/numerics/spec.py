"""`QuantSpec`: how one tensor is quantised, validated once at construction."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property

from lowbit.errors import SpecError
from lowbit.numerics import codebooks  # noqa: F401  (registers NF4, FP4 and FP8)
from lowbit.numerics.formats import CODEBOOKS, CodebookFormat, IntFormat
from lowbit.numerics.ggml_types import GGML_TYPES, GGMLType
from lowbit.settings import from_dict, setting, to_dict

GRANULARITIES = ("tensor", "channel", "token", "group")
WEIGHT_GRANULARITIES = ("group", "channel", "tensor")  # token: activations only
ACT_GRANULARITIES = ("token", "tensor")  # int8 activations: per-token dynamic, per-tensor static
RANGE_METHODS = ("minmax", "percentile", "mse")
ZERO_POINTS = ("int", "float")
SCALE_DTYPES = ("float16", "float32")
GRIDS = ("balanced", "full")
DEFAULT_GROUP_SIZE = 128
DEFAULT_PERCENTILE = 99.9


@dataclass(frozen=True)
class QuantSpec:
    """One quantisation setting.

    bits: code width, 2-8.
    symmetric: ``Z = 0`` and a signed range (Eq. 3.3, symmetric) or a full ``[x_min, x_max]``
        range with a zero-point (Eq. 3.3, asymmetric).
    granularity: who shares one (S, Z) (report §4): ``tensor`` (one pair), ``channel`` (one
        per output row of a weight), ``token`` (one per row of an activation, computed on the
        fly), ``group`` (``group_size`` consecutive input columns of one row, §4.4; when the
        group size does not divide the row, the last group of each row is shorter).
    zero_point: asymmetric only. ``int``: an integer Z in the code range (Eq. 3.3), so real
        zero is exact. ``float``: a float offset m, ``x = S*q + m`` with ``m = x_min``
        (llama.cpp's Q4_1 and HQQ store this); zero is then not exactly representable.
    range: how [x_min, x_max] (or alpha) is chosen: ``minmax``, ``percentile`` (clip at the
        ``percentile``-th percentile of the group) or ``mse`` (grid search of a shrink factor
        that minimises the group's squared error, trading clipping for rounding error, §2.2).
    grid: symmetric integers only. ``balanced``: levels -(2**(n-1) - 1) .. 2**(n-1) - 1 are
        used, S = alpha / (2**(n-1) - 1) (Eq. 3.3); ``full``: all 2**n levels, the scale
        signed so that the weight of largest magnitude lands on -2**(n-1), S = -x_absmax /
        2**(n-1) with x_absmax that weight's signed value (llama.cpp's Q4_0/Q5_0 rule and
        the -8..7 grid of compressed-tensors' symmetric int4): a finer step for the same bits.
    format: ``int``, the name of a registered codebook (absmax scaled, symmetric), or a
        GGML block type of llama.cpp (``q4_0``, ``q4_k``, ... `lowbit.numerics.ggml_types`),
        which fixes bits, symmetry, offset kind, group size and float16 scales to the
        type's and stores the weight as the type's blocks, code for code (`with_changes`
        also sets the full grid for the symmetric integer types, llama.cpp's rule for them).
    scale_dtype: how scales (and float offsets) are stored; ``float16`` like every common
        checkpoint format. Codes are computed against the stored (rounded) scale.
    double_quant: store the scales themselves in 8 bits (QLoRA's double quantisation,
        `lowbit.numerics.double_quant`); absmax-scaled formats only (no zero-point).
    """

    bits: int = setting(4, "code width in bits", accepts="an integer from 2 to 8")
    symmetric: bool = setting(True, "asymmetric range with a zero-point (default: symmetric, Z = 0)", flag="--asym", switch=False)
    granularity: str = setting("group", "who shares one scale: group_size columns of a row, a whole row (channel) or the tensor",
                               choices=WEIGHT_GRANULARITIES)
    group_size: int | None = setting(DEFAULT_GROUP_SIZE, "columns per group (the last group of a row may be shorter)", accepts="a positive integer")
    zero_point: str = setting("int", "with --asym: an integer zero-point (Eq. 3.3) or a float offset (llama.cpp Q4_1, HQQ)", choices=ZERO_POINTS)
    range: str = setting("minmax", "how each group's range is chosen (percentile and mse clip)", choices=RANGE_METHODS)
    percentile: float = setting(DEFAULT_PERCENTILE, "with --range percentile: the percentile kept", accepts="a number in (50, 100]")
    grid: str = setting("balanced", "symmetric integers: balanced levels ±(2^(n-1)-1), or the full grid down to -2^(n-1) "
                        "(llama.cpp Q4_0)", choices=GRIDS)
    format: str = setting("int", "number format: integers, a codebook with absmax scales, or a llama.cpp GGML block type "
                          "(fixes bits, groups and scales to the type's)", choices=("int", *CODEBOOKS, *GGML_TYPES))
    scale_dtype: str = setting("float16", "how scales and offsets are stored", choices=SCALE_DTYPES)
    double_quant: bool = setting(False, "store the absmax scales in 8 bits (QLoRA double quantisation)", switch=True)

    def __post_init__(self):
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise SpecError(f"bits={self.bits} is outside 2-8; use an integer from 2 to 8")
        if self.granularity not in GRANULARITIES:
            raise SpecError(f"granularity {self.granularity!r} is unknown; use one of {', '.join(GRANULARITIES)}")
        if self.granularity == "group":
            if self.group_size is None or not isinstance(self.group_size, int) or self.group_size <= 0:
                raise SpecError(f"group_size={self.group_size} is not a positive integer; use e.g. 32, 64 or 128")
        elif self.group_size is not None:
            raise SpecError(f"group_size={self.group_size} only applies to granularity 'group', not {self.granularity!r}")
        if self.zero_point not in ZERO_POINTS:
            raise SpecError(f"zero_point {self.zero_point!r} is unknown; use 'int' or 'float'")
        if self.zero_point != "int" and self.symmetric:
            raise SpecError(f"zero_point={self.zero_point!r} applies to an asymmetric range; add --asym (symmetric=False) or drop it")
        if self.range not in RANGE_METHODS:
            raise SpecError(f"range {self.range!r} is unknown; use one of {', '.join(RANGE_METHODS)}")
        if not isinstance(self.percentile, (int, float)) or not 50.0 < self.percentile <= 100.0:
            raise SpecError(f"percentile={self.percentile} must lie in (50, 100]")
        if self.percentile != DEFAULT_PERCENTILE and self.range != "percentile":
            raise SpecError(f"percentile={self.percentile} applies to range 'percentile'; add --range percentile or drop it")
        if self.scale_dtype not in SCALE_DTYPES:
            raise SpecError(f"scale_dtype {self.scale_dtype!r} is unknown; use float16 or float32")
        if self.grid not in GRIDS:
            raise SpecError(f"grid {self.grid!r} is unknown; use balanced or full")
        if self.grid == "full" and (not self.symmetric or isinstance(self.number_format, CodebookFormat)):
            raise SpecError("grid 'full' applies to symmetric integer formats; drop --grid full or --asym")
        if self.format in GGML_TYPES:
            self._check_ggml(GGML_TYPES[self.format])
        elif self.format != "int":
            if self.format not in CODEBOOKS:
                known = ", ".join(["int", *CODEBOOKS, *GGML_TYPES])
                raise SpecError(f"format {self.format!r} is unknown; use one of {known}")
            if not self.symmetric:
                raise SpecError(f"codebook format {self.format!r} is absmax-scaled; it has no asymmetric form")
            if CODEBOOKS[self.format].bits != self.bits:
                raise SpecError(f"format {self.format!r} has {CODEBOOKS[self.format].bits}-bit codes, not bits={self.bits}")

        if self.double_quant and not self.symmetric:
            raise SpecError("double quantisation applies to absmax scales; it needs a symmetric or codebook format (no zero-point)")

    def _check_ggml(self, t: GGMLType) -> None:
        """Every field a GGML type fixes must hold the type's value."""
        for name, value in ggml_fields(t).items():
            if getattr(self, name) != value:
                raise SpecError(f"format {t.name} fixes {name} to {value!r} (got {getattr(self, name)!r}); drop the conflicting option")
        if self.double_quant:
            raise SpecError(f"format {t.name} stores its own scales; it cannot be double-quantised")

    @cached_property
    def number_format(self) -> IntFormat | CodebookFormat:
        if self.format in GGML_TYPES:
            return GGML_TYPES[self.format].number_format
        if self.format == "int":
            return IntFormat(self.bits, self.symmetric)
        return CODEBOOKS[self.format]

    @property
    def ggml(self) -> GGMLType | None:
        """The GGML block type this spec stores its weights as, or None."""
        return GGML_TYPES.get(self.format)

    @property
    def has_zero(self) -> bool:
        """Whether each group stores a zero-point / offset beside its scale."""
        return isinstance(self.number_format, IntFormat) and not self.symmetric

    def group_size_for(self, in_features: int, layer: str = "this layer") -> int:
        """Columns that share one (S, Z) in a row of ``in_features``; validates the fit.

        Per-tensor and per-channel return ``in_features`` (one group per row; per-tensor then
        also shares it across rows).
        """
        if self.granularity != "group":
            return in_features
        t = self.ggml
        if t is not None and in_features % t.block:
            hint = f"use --format {t.fallback} for it (llama.cpp's fallback)" if t.fallback else "leave it in float (--skip)"
            raise SpecError(f"{layer} has rows of {in_features} weights, not a multiple of {t.name}'s block of {t.block}; {hint}")
        if self.group_size > in_features:
            raise SpecError(
                f"group_size {self.group_size} is larger than in_features {in_features} of {layer}; "
                f"use a group size up to {in_features}, or --granularity channel"
            )
        return self.group_size

    def describe(self) -> str:
        """Short label, e.g. ``W4 g128 sym`` or ``W8 channel asym``."""
        where = f"g{self.group_size}" if self.granularity == "group" else self.granularity
        if self.ggml is not None:
            rng = "" if self.range == "minmax" else f" {self.range}"
            return f"{self.format}{' full' if self.grid == 'full' else ''}{rng}"
        kind = "sym" if self.symmetric else ("asym" if self.zero_point == "int" else "asym-float0")
        kind += "-full" if self.grid == "full" else ""
        fmt = "" if self.format == "int" else f" {self.format}"
        rng = "" if self.range == "minmax" else f" {self.range}"
        dq = " dq" if self.double_quant else ""
        return f"W{self.bits}{fmt} {where} {kind}{rng}{dq}"

    def with_changes(self, **changes) -> "QuantSpec":
        """`dataclasses.replace` that keeps related fields consistent: moving to a granularity
        other than ``group`` drops the group size (giving one as well then fails), moving to
        ``group`` from one without a group size takes the default, a codebook format brings
        its code width unless ``bits`` is given too, and a GGML type brings every field it
        fixes (those given too must agree)."""
        granularity = changes.get("granularity")
        if granularity is not None and "group_size" not in changes:
            if granularity != "group":
                changes["group_size"] = None
            elif self.group_size is None:
                changes["group_size"] = DEFAULT_GROUP_SIZE
        fmt = changes.get("format")
        if fmt in CODEBOOKS and "bits" not in changes:
            changes["bits"] = CODEBOOKS[fmt].bits
        if fmt in GGML_TYPES:
            t = GGML_TYPES[fmt]
            # the symmetric integer types use llama.cpp's full grid unless told otherwise: it is their own rule
            own = {**ggml_fields(t), **({"grid": "full"} if t.kind == "sym" else {"grid": "balanced"})}
            changes = {**own, **changes}
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "QuantSpec":
        return from_dict(cls, data, "quantisation spec")


def ggml_fields(t: GGMLType) -> dict:
    """The `QuantSpec` fields a GGML type fixes, with the type's values."""
    return {"bits": t.bits, "symmetric": t.symmetric, "zero_point": "int" if t.symmetric else "float",
            "granularity": "group", "group_size": t.group, "scale_dtype": "float16"}
