"""What lowbit knows about each model family, in one table.

Algorithms never branch on the model class: they ask this table where the decoder blocks
are, which linears a block holds and in what order they run (linears in one group read the
same input), and which operation produces each group's input. The last fact is what
SmoothQuant and AWQ need to fold a per-channel scale out of a group's input and into the
operation before it: a norm (its weight, and bias for LayerNorm) or a linear (its output
rows: v_proj before o_proj, up_proj before down_proj, fc1 before fc2, all of which reach
the next linear through an operation that commutes with a positive per-channel scale).
Adding a family is adding a row.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lowbit.errors import LowbitError


@dataclass(frozen=True)
class LinearGroup:
    """Linears of a block that read the same input, and where that input comes from.

    role: a short name for reports ("attn_in", "attn_out", "mlp_in", "mlp_out").
    linears: names inside the block, in the order the model calls them.
    source: name inside the block of the module whose output is the group's input.
    source_kind: "norm" (RMSNorm / LayerNorm: scale its weight, and bias) or "linear"
        (scale its output rows and bias).
    """

    role: str
    linears: tuple[str, ...]
    source: str
    source_kind: str


@dataclass(frozen=True)
class Architecture:
    """One model family.

    model_types: values of ``config.model_type`` this row covers.
    blocks: dotted path from the CausalLM module to the ModuleList of decoder blocks.
    groups: the block's linear groups in execution order.
    norm_offset: the norm multiplies by (offset + weight): 0 for Llama-style RMSNorm and
        LayerNorm, 1 for Gemma's RMSNorm.
    gguf_names: values of a GGUF file's ``general.architecture`` that load as this family.
    gguf_permuted_qk: GGUF files of this family store q_proj and k_proj with the rows of
        each head interleaved for llama.cpp's RoPE (llama.cpp's converter permutes them,
        transformers' GGUF loader undoes it); an export permutes them back.
    compiled_step: the compiled decode step (`lowbit.inference.compiled_step`) computes
        this family: a decoder of pre-norm blocks, RoPE attention and a gated MLP.
    attn_out_norm, mlp_out_norm: norms applied to the attention's and the MLP's outputs
        before the residual add (Gemma's sandwich norms), names inside the block.
    qk_norms: per-head norms of the queries and keys before RoPE (Gemma 3), or ().
    """

    name: str
    model_types: tuple[str, ...]
    blocks: str
    groups: tuple[LinearGroup, ...]
    norm_offset: float = 0.0
    gguf_names: tuple[str, ...] = ()
    gguf_permuted_qk: bool = False
    compiled_step: bool = False
    attn_out_norm: str | None = None
    mlp_out_norm: str | None = None
    qk_norms: tuple[str, ...] = ()

    @property
    def block_linears(self) -> tuple[str, ...]:
        return tuple(name for group in self.groups for name in group.linears)


def _llama_like(mlp_norm: str) -> tuple[LinearGroup, ...]:
    return (
        LinearGroup("attn_in", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm", "norm"),
        LinearGroup("attn_out", ("self_attn.o_proj",), "self_attn.v_proj", "linear"),
        LinearGroup("mlp_in", ("mlp.gate_proj", "mlp.up_proj"), mlp_norm, "norm"),
        LinearGroup("mlp_out", ("mlp.down_proj",), "mlp.up_proj", "linear"),
    )


ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("llama", ("llama",), "model.layers", _llama_like("post_attention_layernorm"), gguf_names=("llama",), gguf_permuted_qk=True,
                 compiled_step=True),
    Architecture("qwen2", ("qwen2",), "model.layers", _llama_like("post_attention_layernorm"), gguf_names=("qwen2",), compiled_step=True),
    Architecture("mistral", ("mistral",), "model.layers", _llama_like("post_attention_layernorm"), gguf_names=("mistral",), compiled_step=True),
    # Gemma 3 normalises attention and MLP outputs too; the MLP's input norm is pre_feedforward_layernorm.
    Architecture("gemma3", ("gemma3_text",), "model.layers", _llama_like("pre_feedforward_layernorm"), norm_offset=1.0, gguf_names=("gemma3",),
                 compiled_step=True, attn_out_norm="post_attention_layernorm", mlp_out_norm="post_feedforward_layernorm",
                 qk_norms=("self_attn.q_norm", "self_attn.k_norm")),
    Architecture(
        "opt",
        ("opt",),
        "model.decoder.layers",
        (
            LinearGroup("attn_in", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn_layer_norm", "norm"),
            LinearGroup("attn_out", ("self_attn.out_proj",), "self_attn.v_proj", "linear"),
            LinearGroup("mlp_in", ("fc1",), "final_layer_norm", "norm"),
            LinearGroup("mlp_out", ("fc2",), "fc1", "linear"),  # ReLU(x / s) = ReLU(x) / s for s > 0
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


def architecture_for_gguf(gguf_name: str, path) -> Architecture:
    """The table row for a GGUF file whose ``general.architecture`` is ``gguf_name``."""
    for arch in ARCHITECTURES:
        if gguf_name in arch.gguf_names:
            return arch
    names = sorted(n for arch in ARCHITECTURES for n in arch.gguf_names)
    raise LowbitError(f"{path}: GGUF architecture {gguf_name!r} is not supported; lowbit reads GGUF files of {', '.join(names)}")


def decoder_blocks(model: nn.Module, arch: Architecture) -> nn.ModuleList:
    return model.get_submodule(arch.blocks)
