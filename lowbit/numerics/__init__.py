"""Numeric primitives: formats, specs, quantise/dequantise, packing, integer matmul."""

from lowbit._lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(["CODEBOOKS", "CodebookFormat", "IntFormat", "register_codebook"], "lowbit.numerics.formats"),
    **dict.fromkeys(["pack", "packed_length", "unpack"], "lowbit.numerics.packing"),
    **dict.fromkeys(["ErrorBreakdown", "Quantized", "dequantize", "error_breakdown", "fake_quantize", "quantize"], "lowbit.numerics.quantization"),
    "QuantSpec": "lowbit.numerics.spec",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
