"""Sparsity patterns: which weights of a row pruning sets to zero (report §9).

Two kinds:

- unstructured, a fraction ``s``: every row keeps the same number of weights,
  ``in_features - round(s · in_features)``, wherever they are. Comparing weights within a
  row rather than across the whole layer is Wanda's choice (its per-output comparison
  group), which its paper found to matter for LLMs; lowbit uses it for every method, so
  the methods differ only in their scores.
- N:M (``2:4``, ``4:8``): in every run of M consecutive weights of a row, N are kept and
  M - N are zero. 2:4 is the pattern NVIDIA's sparse tensor cores run; its storage is the N
  kept values of each run plus each one's position in the run (`lowbit.packed.sparse`).

Importing this module stays cheap (no torch at import time): the CLI validates
``--sparsity`` with it before anything heavy loads.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lowbit.errors import SpecError

if TYPE_CHECKING:
    import torch

# run lengths of N:M patterns: a kept weight's position in its run takes log2(M) bits
NM_RUNS = (4, 8, 16)
# the dtypes a pruned weight's float values are stored in (`lowbit.packed.sparse`, ``--values``)
VALUE_DTYPES = ("float16", "bfloat16", "float32")


@dataclass(frozen=True)
class SparsityPattern:
    """fraction: the share of each row's weights set to zero (unstructured), in (0, 1); or
    n, m: n of every m consecutive weights kept (N:M). Exactly one of the two is set."""

    fraction: float | None = None
    n: int | None = None
    m: int | None = None

    def __post_init__(self):
        if self.structured:
            if self.fraction is not None:
                raise SpecError("a sparsity pattern is either a fraction or N:M, not both")
            if self.m not in NM_RUNS or not isinstance(self.n, int) or not 1 <= self.n < self.m:
                raise SpecError(f"N:M sparsity needs M in {', '.join(map(str, NM_RUNS))} and 1 <= N < M (e.g. 2:4), "
                                f"got {self.n}:{self.m}")
        elif not isinstance(self.fraction, (int, float)) or isinstance(self.fraction, bool) or not 0.0 < self.fraction < 1.0:
            raise SpecError(f"unstructured sparsity is the fraction of weights set to zero, above 0 and below 1 (e.g. 0.5), "
                            f"got {self.fraction!r}")

    @staticmethod
    def parse(text: str) -> "SparsityPattern":
        """``0.5`` (or ``50%``) for unstructured, ``2:4`` for N:M."""
        text = str(text).strip()
        nm = re.fullmatch(r"(\d+):(\d+)", text)
        if nm:
            return SparsityPattern(n=int(nm[1]), m=int(nm[2]))
        try:
            fraction = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            raise SpecError(f"--sparsity takes a fraction (0.5), a percentage (50%) or N:M (2:4), got {text!r}") from None
        return SparsityPattern(fraction=fraction)

    @property
    def structured(self) -> bool:
        return self.m is not None or self.n is not None

    @property
    def index_bits(self) -> int:
        """Bits of an N:M kept weight's position in its run (2 for 2:4)."""
        return int(math.log2(self.m))

    def describe(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else f"{self.fraction * 100:g}%"

    def kept_per_row(self, in_features: int) -> int:
        """Weights each row of ``in_features`` keeps."""
        if self.structured:
            return in_features // self.m * self.n
        return in_features - round(self.fraction * in_features)

    def check(self, in_features: int, name: str = "this layer") -> None:
        """Refuse a pattern a row of ``in_features`` weights cannot take."""
        if self.structured and in_features % self.m:
            raise SpecError(f"{name} has rows of {in_features} weights, not a multiple of {self.m}: {self.describe()} sparsity "
                            "cannot tile them; leave it dense with --skip")
        if not self.structured and self.kept_per_row(in_features) < 1:
            raise SpecError(f"{name}: {self.describe()} sparsity of rows of {in_features} weights keeps none of them; use a smaller fraction")


def keep_mask(scores: "torch.Tensor", pattern: SparsityPattern) -> "torch.Tensor":
    """The weights ``pattern`` keeps, by score: bool (out, in), True = kept.

    scores: float (out, in), higher = more worth keeping (|W| for magnitude pruning, |W|·‖X_j‖
    for Wanda, w²/[H⁻¹]_jj² for SparseGPT). Unstructured: each row keeps its
    ``kept_per_row`` highest scores; N:M: each run of M keeps its N highest. Ties go to the
    lower column (a stable sort), so the mask is deterministic.
    """
    import torch

    out_features, in_features = scores.shape
    pattern.check(in_features)
    if pattern.structured:
        runs = scores.reshape(out_features, in_features // pattern.m, pattern.m)
        order = torch.sort(runs, dim=-1, descending=True, stable=True).indices[..., : pattern.n]
        mask = torch.zeros_like(runs, dtype=torch.bool).scatter_(-1, order, True)
        return mask.reshape(out_features, in_features)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, : pattern.kept_per_row(in_features)]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order, True)
