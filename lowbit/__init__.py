"""lowbit: quantise large language models, store them in real low-bit form, measure the cost.

Python API (the CLI is a thin layer over these):

    from lowbit import GPTQConfig, load_model, quantize_model, save_quantized
    loaded = load_model("smollm2")
    quantize_model(loaded, GPTQConfig(spec=QuantSpec(bits=4, group_size=128, symmetric=False)))
    save_quantized(loaded, "out/smollm2-gptq-w4g128")

Every method is a frozen config registered by name (`lowbit.methods`); names here are
imported on first use, so that ``import lowbit`` and the CLI's argument parsing stay fast.
"""

from lowbit._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    **dict.fromkeys(["load_quantized", "read_header", "save_quantized"], "lowbit.checkpoint"),
    "evaluate": "lowbit.evaluation.metrics",
    "evaluate_streamed": "lowbit.evaluation.streamed",
    **dict.fromkeys(["load_model", "open_streamed"], "lowbit.loader"),
    "quantize_streamed": "lowbit.streaming",
    "QuantSpec": "lowbit.numerics.spec",
    "CalibrationConfig": "lowbit.calibration.config",
    "quantize_model": "lowbit.pipeline",
    "DistillConfig": "lowbit.training.config",
    "distill": "lowbit.training.distill",
    **dict.fromkeys(
        ["METHODS", "AWQConfig", "FP4Config", "GPTQConfig", "LLMInt8Config", "MagnitudeConfig", "NF4Config", "QATConfig", "QLoRAConfig", "RTNConfig",
         "SignRoundConfig", "SmoothQuantConfig", "SparseGPTConfig", "W8A8Config", "WandaConfig", "method_config"],
        "lowbit.methods",
    ),
}
__all__ = ["__version__", *sorted(_EXPORTS)]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
