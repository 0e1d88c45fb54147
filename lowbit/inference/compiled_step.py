"""The compiled decode step: one C++ call per token instead of a Python forward.

At batch 1 on a CPU a decode step of a small model is mostly fixed cost: transformers' forward
runs some twenty Python-dispatched operations per layer (norms, RoPE, cache update, masks,
attention, residuals) around seven matrix-vector products. `CompiledStep` hands the whole
step to `lowbit/kernels/decode_step.cpp`: embedding row, every block (the equations are at the
top of that file), final norm, head and argmax, reading the packed codes of lowbit's
`KernelLinear` layers (and float32 ``nn.Linear`` weights) in place, attending over float32
caches of transformers' StaticCache shape. The prompt is still prefilled by the model's own
forward (compute-bound, batched); its keys and values are then copied into the step's caches.

transformers' forward is the reference: tests compare the logits of every step and the
greedy tokens (`lowbit.inference.generate` with ``compiled=False`` is that path).
`step_support` says why a model cannot take the step (another family, a module the step does
not compute, bfloat16, a quantised cache); `generate` then decodes eagerly and says so.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.models.architectures import Architecture, architecture_for, decoder_blocks

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent.parent / "kernels" / "decode_step.cpp"
ACTIVATIONS = {"silu": 0, "gelu_pytorch_tanh": 1}  # the C++ step's codes (enum Activation)
STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # RoPE types whose frequencies do not depend on the length
LINEAR_KINDS = {"float": 0, "int4": 1, "int8": 2, "w4a8": 3, "w8a8": 4}  # enum Kind in decode_step.cpp


@lru_cache(maxsize=1)
def load_step_extension():
    from lowbit.kernels.cpu import build_extension

    return build_extension(SOURCE, "lowbit_step")


def _arch(model: nn.Module) -> Architecture | None:
    try:
        return architecture_for(model.config.model_type)
    except LowbitError:
        return None


def _linear_spec(module: nn.Module) -> tuple | str:
    """A linear as the C++ step takes it: (kind, weight or codes, scales, zeros, bias, group,
    in_features), all float32 but the codes; or, as a string, why the step cannot compute it."""
    from lowbit.kernels.cpu import KernelLinear

    if isinstance(module, KernelLinear):
        kind = ("w4a8" if module.int4 else "w8a8") if module.int8_activations else ("int4" if module.int4 else "int8")
        bias = module.reference.bias
        return (LINEAR_KINDS[kind], module.q, module.scales, module.zeros, None if bias is None else bias.detach().float().contiguous(),
                module.group_size, module.in_features)
    if type(module) is nn.Linear:
        if module.weight.dtype != torch.float32:
            return f"a {module.weight.dtype} nn.Linear (the step computes float32)"
        bias = None if module.bias is None else module.bias.detach().contiguous()
        return (LINEAR_KINDS["float"], module.weight.detach().contiguous(), None, None, bias, 0, module.in_features)
    return f"a {type(module).__name__} (the step computes float32 nn.Linear and lowbit's CPU KernelLinear; `use_cpu_kernels` swaps packed layers in)"


def _rope(model: nn.Module, layer_type: str | None) -> tuple[torch.Tensor, float] | str:
    rotary = model.get_submodule("model.rotary_emb")
    rope_type = rotary.rope_type.get(layer_type) if isinstance(rotary.rope_type, dict) else rotary.rope_type
    if rope_type not in STATIC_ROPE:
        return f"RoPE type {rope_type!r} (its frequencies change with the length; the step takes {', '.join(STATIC_ROPE)})"
    inv_freq = getattr(rotary, f"{layer_type}_inv_freq", None) if layer_type else None
    scaling = getattr(rotary, f"{layer_type}_attention_scaling", None) if layer_type else None
    inv_freq = rotary.inv_freq if inv_freq is None else inv_freq
    scaling = rotary.attention_scaling if scaling is None else scaling
    return inv_freq.detach().float().contiguous(), float(scaling)


def step_support(model: nn.Module) -> str | None:
    """None if `CompiledStep` computes ``model``'s decode step, else why not (one line)."""
    arch = _arch(model)
    if arch is None or not arch.compiled_step:
        return f"no compiled step for model type {model.config.model_type!r}"
    for tensor in model.parameters():
        if tensor.device.type != "cpu":
            return "the model is not on the CPU"
    config = model.config
    activation = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    if activation not in ACTIVATIONS:
        return f"activation {activation!r} (the step computes {', '.join(ACTIVATIONS)})"
    if getattr(config, "attn_logit_softcapping", None):
        return "soft-capped attention logits"
    embed = model.get_input_embeddings()
    if type(embed).__name__ not in ("Embedding", "Gemma3TextScaledWordEmbedding") or embed.weight.dtype != torch.float32:
        return f"a {type(embed).__name__} embedding of {embed.weight.dtype} (the step reads a float32 table)"
    head = _linear_spec(model.get_output_embeddings())
    if isinstance(head, str):
        return f"the head is {head}"
    for index, block in enumerate(decoder_blocks(model, arch)):
        for name in arch.block_linears:
            spec = _linear_spec(block.get_submodule(name))
            if isinstance(spec, str):
                return f"block {index} {name} is {spec}"
        for name in _norm_names(arch):
            if name is not None and block.get_submodule(name).weight.dtype != torch.float32:
                return f"block {index} {name} is not float32"
        rope = _rope(model, _layer_type(config, index))
        if isinstance(rope, str):
            return rope
        if rope[0].numel() * 2 != block.self_attn.head_dim:
            return "partial rotary embeddings"
    return None


def _norm_names(arch: Architecture) -> tuple[str | None, ...]:
    attn_in = next(g.source for g in arch.groups if g.role == "attn_in")
    mlp_in = next(g.source for g in arch.groups if g.role == "mlp_in")
    return (attn_in, mlp_in, arch.attn_out_norm, arch.mlp_out_norm, *(arch.qk_norms or (None, None)))


def _layer_type(config, index: int) -> str | None:
    types = getattr(config, "layer_types", None)
    return types[index] if types else None


class CompiledStep:
    """The decode step of ``model`` (see module docstring) for sequences up to ``max_len``
    tokens. Holds its caches: ``keys[i]``, ``values[i]`` float32 (1, kv_heads, max_len,
    head_dim) for block i. ``__call__(token, position)`` runs one step and returns the next
    token (the argmax); `logits` the step's float32 (vocab,) logits. Refuses a model that
    `step_support` rejects."""

    def __init__(self, model: nn.Module, max_len: int):
        reason = step_support(model)
        if reason is not None:
            raise LowbitError(f"the compiled decode step cannot run this model: {reason}")
        arch = architecture_for(model.config.model_type)
        config = model.config
        blocks = decoder_blocks(model, arch)
        attn0 = blocks[0].self_attn
        heads, head_dim = config.num_attention_heads, attn0.head_dim
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        self.max_len = max_len
        self.keys = [torch.zeros(1, kv_heads, max_len, head_dim) for _ in blocks]
        self.values = [torch.zeros(1, kv_heads, max_len, head_dim) for _ in blocks]
        attn_norm, mlp_norm, attn_out_norm, mlp_out_norm, q_norm, k_norm = _norm_names(arch)
        layers = []
        for index, block in enumerate(blocks):
            attn = block.self_attn

            def linear(name: str) -> tuple:
                return _linear_spec(block.get_submodule(name))

            def weight(name: str | None) -> torch.Tensor | None:
                return None if name is None else block.get_submodule(name).weight.detach().contiguous()

            inv_freq, rope_scale = _rope(model, _layer_type(config, index))
            window = getattr(attn, "sliding_window", getattr(config, "sliding_window", None))
            q, k, v = arch.groups[0].linears
            (o,) = arch.groups[1].linears
            gate, up = arch.groups[2].linears
            (down,) = arch.groups[3].linears
            layers.append({
                "q": linear(q), "k": linear(k), "v": linear(v), "o": linear(o), "gate": linear(gate), "up": linear(up), "down": linear(down),
                "attn_norm": weight(attn_norm), "mlp_norm": weight(mlp_norm), "attn_out_norm": weight(attn_out_norm),
                "mlp_out_norm": weight(mlp_out_norm), "q_norm": weight(q_norm), "k_norm": weight(k_norm),
                "inv_freq": inv_freq, "rope_scale": rope_scale, "scaling": float(attn.scaling), "window": int(window or 0),
                "keys": self.keys[index], "values": self.values[index],
            })
        embed = model.get_input_embeddings()
        self._step = load_step_extension().DecodeStep({
            "hidden": config.hidden_size, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
            "intermediate": config.intermediate_size, "eps": float(getattr(config, "rms_norm_eps", 1e-6)),
            "norm_offset": float(arch.norm_offset), "embed_scale": float(getattr(embed, "embed_scale", 1.0)),
            "activation": ACTIVATIONS[getattr(config, "hidden_activation", None) or config.hidden_act],
            "final_softcap": float(getattr(config, "final_logit_softcapping", None) or 0.0), "max_len": max_len,
            "embed": embed.weight.detach().contiguous(), "final_norm": model.get_submodule("model.norm").weight.detach().contiguous(),
            "head": _linear_spec(model.get_output_embeddings()),
        }, layers)

    def load_cache(self, cache, length: int) -> None:
        """Copy the first ``length`` positions from a transformers StaticCache the model's
        forward filled (the prompt's prefill). A sliding-window layer holding fewer slots
        than ``length`` holds the last positions, in order."""
        for index, layer in enumerate(cache.layers):
            slots = min(length, layer.keys.shape[2])
            self.keys[index][:, :, length - slots : length] = layer.keys[:, :, :slots]
            self.values[index][:, :, length - slots : length] = layer.values[:, :, :slots]

    def __call__(self, token: int, position: int) -> int:
        return self._step.step(int(token), int(position))

    @property
    def logits(self) -> torch.Tensor:
        return self._step.logits()
