"""lowbit: quantise large language models, store them in real low-bit form, measure the cost.

Python API (the CLI is a thin layer over these):

    from lowbit import QuantSpec, load_model, quantize_model, save_quantized, evaluate
    loaded = load_model("smollm2")
    quantize_model(loaded, QuantSpec(bits=4, group_size=128))
    save_quantized(loaded, "out/smollm2-w4g128")
"""

__version__ = "0.1.0"

from lowbit.checkpoint import load_quantized, read_header, save_quantized  # noqa: E402
from lowbit.evaluation import evaluate  # noqa: E402
from lowbit.models import load_model  # noqa: E402
from lowbit.numerics import QuantSpec  # noqa: E402
from lowbit.pipeline import quantize_model  # noqa: E402

__all__ = ["QuantSpec", "__version__", "evaluate", "load_model", "load_quantized", "quantize_model", "read_header", "save_quantized"]
