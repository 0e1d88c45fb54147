"""llama.cpp's GGML block types as lowbit number formats: what each one stores.

A GGML type cuts every row of a weight (along ``in_features``, GGUF's ``ne0``) into blocks
of ``block`` weights and stores each block as ``type_size`` bytes. In lowbit's terms every
type is a `QuantSpec` of fixed shape (bits, symmetric or float offset, groups of ``group``
weights sharing one effective scale) plus a rule for how those scales are stored:

  legacy (block 32, one group per block):   scale (and offset) as float16
      q8_0, q4_0, q5_0, iq4_nl   x = d · q          (q8_0: q in -128..127, q4_0: c - 8, ...)
      q4_1, q5_1                 x = d · c + m
  K-quants (super-blocks of 256): the group scales are themselves integers under one
  float16 super-block scale (a two-level scale, like QLoRA's double quantisation):
      q4_k, q5_k   8 groups of 32, 6-bit scales and mins:  x = d·sc_j · c - dmin·m_j
      q2_k         16 groups of 16, 4-bit scales and mins: x = d·sc_j · c - dmin·m_j
      q3_k         16 groups of 16, 6-bit signed scales:   x = d·(sc_j - 32) · (c - 4)
      q6_k         16 groups of 16, int8 scales:           x = d·sc_j · (c - 32)

(c is lowbit's unsigned code, q the signed integer it stands for; iq4_nl's codes index a
16-value non-uniform table.) The byte layouts, encoder and decoder are in
`lowbit.numerics.ggml_blocks`; this module describes the types and imports no torch, so the
CLI can validate ``--format`` while it parses.
"""

from __future__ import annotations

from dataclasses import dataclass

from lowbit.numerics.formats import CodebookFormat, IntFormat

QK_K = 256  # weights per K-quant super-block
# iq4_nl's levels (llama.cpp's kvalues_iq4nl): a non-uniform 4-bit grid, denser near zero.
IQ4_NL_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
# As a codebook its levels stay integers (unit 127): ggml multiplies the float16 scale by them.
IQ4_NL = CodebookFormat("iq4_nl", tuple(float(v) for v in IQ4_NL_LEVELS), unit=127.0)


@dataclass(frozen=True)
class GGMLType:
    """One GGML block type.

    name: lowbit's ``--format`` name (llama.cpp's, lower case).
    type_id: the GGML type number a GGUF tensor header stores.
    bits: code width.
    kind: ``sym`` (x = scale · (c - 2**(bits-1))), ``asym`` (x = scale · c + offset, a float
        offset) or ``codebook`` (x = scale · levels[c]).
    block: weights per block (a row's length must be a multiple of it).
    group: weights sharing one effective scale (a K-quant's sub-block).
    type_size: bytes per block.
    scale_bits: K-quants: width of each group's stored scale (and min); 0: float16 scales.
    signed_scales: K-quants: whether the group scales are signed integers.
    fallback: the type llama.cpp's quantiser takes for rows that are not a multiple of
        ``block`` (llama-quant.cpp, ``tensor_type_fallback``); None for 32-blocks.
    """

    name: str
    type_id: int
    bits: int
    kind: str
    block: int
    group: int
    type_size: int
    scale_bits: int = 0
    signed_scales: bool = False
    fallback: str | None = None

    @property
    def k_quant(self) -> bool:
        return self.scale_bits > 0

    @property
    def symmetric(self) -> bool:
        return self.kind != "asym"

    @property
    def number_format(self) -> IntFormat | CodebookFormat:
        return IQ4_NL if self.kind == "codebook" else IntFormat(self.bits, self.symmetric)

    @property
    def groups_per_block(self) -> int:
        return self.block // self.group

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block

    @property
    def max_scale_level(self) -> int:
        """K-quants: the largest stored group-scale integer (the super-block scale d is the
        largest group scale divided by it)."""
        return 2 ** (self.scale_bits - 1) - 1 if self.signed_scales else 2**self.scale_bits - 1

    def describe(self) -> str:
        return f"{self.name} ({self.bits_per_weight:g} bits per weight, blocks of {self.block})"


GGML_TYPES: dict[str, GGMLType] = {t.name: t for t in (
    GGMLType("q8_0", 8, 8, "sym", 32, 32, 34),
    GGMLType("q4_0", 2, 4, "sym", 32, 32, 18),
    GGMLType("q4_1", 3, 4, "asym", 32, 32, 20),
    GGMLType("q5_0", 6, 5, "sym", 32, 32, 22),
    GGMLType("q5_1", 7, 5, "asym", 32, 32, 24),
    GGMLType("iq4_nl", 20, 4, "codebook", 32, 32, 18),
    GGMLType("q2_k", 10, 2, "asym", QK_K, 16, 84, scale_bits=4, fallback="q4_0"),
    GGMLType("q3_k", 11, 3, "sym", QK_K, 16, 110, scale_bits=6, signed_scales=True, fallback="q4_0"),
    GGMLType("q4_k", 12, 4, "asym", QK_K, 32, 144, scale_bits=6, fallback="q5_0"),
    GGMLType("q5_k", 13, 5, "asym", QK_K, 32, 176, scale_bits=6, fallback="q5_1"),
    GGMLType("q6_k", 14, 6, "sym", QK_K, 16, 210, scale_bits=8, signed_scales=True, fallback="q8_0"),
)}
GGML_BY_ID = {t.type_id: t for t in GGML_TYPES.values()}
# Float types a GGUF may hold beside the quantised ones (norms, embeddings kept in float).
FLOAT_TYPE_IDS = {"f32": 0, "f16": 1, "bf16": 30}


def ggml_type_for(ncols: int, name: str) -> GGMLType | None:
    """The type a row of ``ncols`` weights takes when ``name`` is asked for: ``name`` itself
    if ``ncols`` is a multiple of its block, else its fallback (as llama.cpp's quantiser
    picks it), else None (no block type fits; the tensor stays float)."""
    t = GGML_TYPES[name]
    while ncols % t.block:
        if t.fallback is None:
            return None
        t = GGML_TYPES[t.fallback]
    return t
