"""What lowbit knows about each model family, in one table.

Algorithms never branch on the model class: they ask this table where the decoder blocks
are and which linears a block holds, in the order they run (linears in one tuple read the
same input). Adding a family is adding a row.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lowbit.errors import LowbitError


@dataclass(frozen=True)
class Architecture:
    """One model family.

    model_types: values of ``config.model_type`` this row covers.
    blocks: dotted path from the CausalLM module to the ModuleList of decoder blocks.
    linear_groups: names inside a block of its linears, grouped by shared input, in
        execution order (e.g. q/k/v read the same normed hidden state, then o reads the
        attention output).
    """

    name: str
    model_types: tuple[str, ...]
    blocks: str
    linear_groups: tuple[tuple[str, ...], ...]

    @property
    def block_linears(self) -> tuple[str, ...]:
        return tuple(name for group in self.linear_groups for name in group)


_LLAMA_LIKE = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)

ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("llama", ("llama",), "model.layers", _LLAMA_LIKE),
    Architecture("qwen2", ("qwen2",), "model.layers", _LLAMA_LIKE),
    Architecture("mistral", ("mistral",), "model.layers", _LLAMA_LIKE),
    Architecture("gemma3", ("gemma3_text",), "model.layers", _LLAMA_LIKE),
    Architecture(
        "opt",
        ("opt",),
        "model.decoder.layers",
        (
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            ("self_attn.out_proj",),
            ("fc1",),
            ("fc2",),
        ),
    ),
)


def supported_model_types() -> list[str]:
    return sorted(t for arch in ARCHITECTURES for t in arch.model_types)


def architecture_for(model_type: str) -> Architecture:
    """The table row for ``config.model_type``; a clear error for families lowbit lacks."""
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    raise LowbitError(
        f"architecture {model_type!r} is not supported; lowbit supports {', '.join(supported_model_types())}"
    )


def decoder_blocks(model: nn.Module, arch: Architecture) -> nn.ModuleList:
    return model.get_submodule(arch.blocks)
