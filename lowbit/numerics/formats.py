"""Number formats: what values one stored code can stand for.

Two families share one interface (`bits`, `code_count`, `encode`, `decode`):

- `IntFormat`: uniform affine integers (report §2.2, §3.1-§3.3). A code ``c`` in
  ``[0, 2**bits - 1]`` stands for the integer ``q = c + qmin``; the real value is
  ``S * (q - Z)`` (Eq. 3.2).
- `CodebookFormat`: a finite, sorted table of levels in ``[-1, 1]`` (NF4, FP4 and FP8 are
  codebooks, report §7.5); a code is an index into the table and the real value is
  ``S * levels[c]`` with ``S`` the absmax of the block.

Codes are always unsigned integers ``0 .. 2**bits - 1`` so one packing routine serves all
formats (see `lowbit.numerics.packing`).

The formats are plain descriptions and this module does not import torch when it loads:
`QuantSpec` validates against them while the CLI parses its arguments, which must take well
under a second. Only `encode`, `decode` and `table` need tensors, and import torch there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lowbit.errors import SpecError

if TYPE_CHECKING:
    import torch

MIN_BITS, MAX_BITS = 2, 8


@dataclass(frozen=True)
class IntFormat:
    """Uniform integers of ``bits`` bits.

    Symmetric: signed range ``[-2**(n-1), 2**(n-1) - 1]`` with ``Z = 0`` and
    ``S = alpha / (2**(n-1) - 1)`` (Eq. 3.3, symmetric case), so ``-alpha`` and ``+alpha``
    both land on a level and the extra negative level is only reached by clipped values.
    Asymmetric: unsigned range ``[0, 2**n - 1]`` with ``S = (x_max - x_min) / (q_max - q_min)``
    and an integer zero-point (Eq. 3.3, asymmetric case).
    """

    bits: int
    symmetric: bool = True

    def __post_init__(self):
        if not (MIN_BITS <= self.bits <= MAX_BITS):
            raise SpecError(f"bits={self.bits} is outside {MIN_BITS}-{MAX_BITS}; use an integer from {MIN_BITS} to {MAX_BITS}")

    @property
    def name(self) -> str:
        return f"int{self.bits}{'' if self.symmetric else '-asym'}"

    @property
    def code_count(self) -> int:
        return 2**self.bits

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def max_level(self) -> int:
        """The largest |q| a symmetric range of absmax alpha maps to: 2**(n-1) - 1 (Eq. 3.3)."""
        return 2 ** (self.bits - 1) - 1

    def encode(self, q: torch.Tensor) -> torch.Tensor:
        """Integers ``q`` (already clamped to [qmin, qmax]) to unsigned codes, uint8."""
        import torch

        return (q - self.qmin).to(torch.uint8)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Unsigned codes to the integers ``q`` they stand for, float32."""
        import torch

        return codes.to(torch.float32) + self.qmin


@dataclass(frozen=True)
class CodebookFormat:
    """A table of at most 256 levels, sorted ascending, with max |level| = ``unit``.

    Quantising a value ``x`` of a block with absmax ``a``: ``S = a / unit``, the code is the
    index of the level nearest to ``x / S``; dequantising: ``S * levels[code]``. Tables are
    normalised (unit 1) except where a format stores integer levels: llama.cpp's iq4_nl
    multiplies its float16 scale by integers -127..113 (unit 127), and lowbit must compute
    the same products to decode its files bit for bit.
    """

    name: str
    levels: tuple[float, ...]
    unit: float = 1.0

    def __post_init__(self):
        n = len(self.levels)
        if not 2 <= n <= 256:
            raise SpecError(f"codebook {self.name!r} has {n} levels; a codebook needs 2 to 256")
        if list(self.levels) != sorted(self.levels) or len(set(self.levels)) != n:
            raise SpecError(f"codebook {self.name!r} levels must be distinct and sorted ascending")
        if not math.isclose(max(abs(v) for v in self.levels), self.unit, rel_tol=1e-6):
            raise SpecError(f"codebook {self.name!r} levels must be normalised to max |level| = {self.unit:g}")

    @property
    def bits(self) -> int:
        return max(MIN_BITS, math.ceil(math.log2(len(self.levels))))

    @property
    def code_count(self) -> int:
        return len(self.levels)

    def table(self) -> torch.Tensor:
        import torch

        return torch.tensor(self.levels, dtype=torch.float32)

    def encode(self, normalised: torch.Tensor) -> torch.Tensor:
        """Values already divided by their block scale to the index of the nearest level, uint8.

        Ties go to the lower level; midpoints between neighbours decide (a bucketize, not an
        argmin over the table, so memory stays O(values)).
        """
        import torch

        table = self.table().to(normalised.device)
        midpoints = (table[1:] + table[:-1]) / 2
        return torch.bucketize(normalised.to(torch.float32), midpoints, right=False).to(torch.uint8)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.table().to(codes.device)[codes.long()]


# Codebooks by name. Later modules (NF4, FP4, FP8) register theirs here.
CODEBOOKS: dict[str, CodebookFormat] = {}


def register_codebook(fmt: CodebookFormat) -> CodebookFormat:
    CODEBOOKS[fmt.name] = fmt
    return fmt
