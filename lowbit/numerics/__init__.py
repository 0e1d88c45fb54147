"""Numeric primitives: formats, specs, quantise/dequantise, packing, integer matmul."""

from lowbit.numerics import codebooks  # noqa: F401  (registers NF4, FP4 and FP8 codebooks)
from lowbit.numerics.formats import CODEBOOKS, CodebookFormat, IntFormat, register_codebook
from lowbit.numerics.packing import pack, packed_length, unpack
from lowbit.numerics.quantize import (
    ErrorBreakdown,
    Quantized,
    dequantize,
    error_breakdown,
    fake_quantize,
    quantize,
)
from lowbit.numerics.spec import QuantSpec

__all__ = [
    "CODEBOOKS",
    "CodebookFormat",
    "ErrorBreakdown",
    "IntFormat",
    "QuantSpec",
    "Quantized",
    "dequantize",
    "error_breakdown",
    "fake_quantize",
    "pack",
    "packed_length",
    "quantize",
    "register_codebook",
    "unpack",
]
