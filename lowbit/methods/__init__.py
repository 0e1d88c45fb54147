"""Every method lowbit has, one frozen config each, registered by name.

Adding a method: write its config in a new module here (a `QuantizeConfig` or
`MethodConfig` subclass with ``name``, ``kind``, ``summary``, its spec and options declared
with `lowbit.settings.setting`, and its work: ``quantize_weight`` for a method that rounds
each weight on its own, ``statistics`` + ``quantize_group`` for a calibrated one), decorate
it with `register`, and import the module below. The CLI flags, --help, validation, the
checkpoint header and the methods table in docs/methods.md follow from it (see
docs/methods.md, "Adding a method").
"""

# registration, in the order --help and the methods table list them
from lowbit.methods import rtn, gptq, awq, signround, w8a8, llm_int8, qat, qlora, prune  # noqa: F401, I001
from lowbit.methods.awq import AWQConfig
from lowbit.methods.config import DEFAULT_SKIP, HEAD_SPECS, MethodConfig, QuantizeConfig
from lowbit.methods.gptq import GPTQConfig
from lowbit.methods.llm_int8 import LLMInt8Config
from lowbit.methods.prune import MagnitudeConfig, PruneConfig, SparseGPTConfig, WandaConfig
from lowbit.methods.qat import QATConfig
from lowbit.methods.qlora import QLoRAConfig
from lowbit.methods.registry import (METHODS, config_from_dict, method_config, methods_table, pruning_methods, quantize_methods,
                                    register, training_methods)
from lowbit.methods.rtn import FP4Config, NF4Config, RTNConfig
from lowbit.methods.signround import SignRoundConfig
from lowbit.methods.w8a8 import SmoothQuantConfig, W8A8Config

__all__ = [
    "AWQConfig", "DEFAULT_SKIP", "FP4Config", "GPTQConfig", "HEAD_SPECS", "LLMInt8Config", "METHODS", "MagnitudeConfig", "MethodConfig",
    "NF4Config", "PruneConfig", "QATConfig", "QLoRAConfig", "QuantizeConfig", "RTNConfig", "SignRoundConfig", "SmoothQuantConfig",
    "SparseGPTConfig", "W8A8Config", "WandaConfig", "config_from_dict",
    "method_config", "methods_table", "pruning_methods", "quantize_methods", "register", "training_methods",
]
