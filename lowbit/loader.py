"""Open any model reference: a packaged model, a GGUF file, a Hugging Face directory or a
lowbit checkpoint (`load_model`), or just its structure, shapes and tokenizer, without the
weights (`open_skeleton`), for the checks that must run before any slow work."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lowbit.checkpoint import load_quantized, read_header
from lowbit.models.architectures import Architecture, architecture_for
from lowbit.models.loading import LoadedModel, convert_gguf, load_gguf, load_hf_dir, read_config, read_tokenizer
from lowbit.models.refs import ref_kind
from lowbit.models.registry import NAMED_MODELS


def load_model(ref: str, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load ``ref``: a name from `NAMED_MODELS`, a ``.gguf`` file, a Hugging Face directory
    (config.json + safetensors) or a lowbit directory. Float weights come in ``dtype``."""
    kind = ref_kind(ref)
    if kind == "named":
        return load_gguf(NAMED_MODELS[ref].locate(), source=ref, dtype=dtype)
    path = Path(ref)
    if kind == "gguf":
        return load_gguf(path, source=str(path.resolve()), dtype=dtype)
    if kind == "lowbit":
        return load_quantized(path, dtype=dtype)
    return load_hf_dir(path, source=str(path.resolve()), dtype=dtype)


@dataclass
class Skeleton:
    """A model reference opened without its weights.

    kind: `lowbit.models.refs.REF_KINDS`.
    model: the model built from its config on the meta device (names and shapes, no memory).
    header: a lowbit checkpoint's header, else None.
    """

    ref: str
    kind: str
    config: object
    tokenizer: object
    model: nn.Module
    arch: Architecture
    header: dict | None

    @property
    def is_quantized(self) -> bool:
        return self.header is not None

    @property
    def max_positions(self) -> int | None:
        config = self.config.get_text_config(decoder=True)
        return getattr(config, "max_position_embeddings", None)


def open_skeleton(ref: str) -> Skeleton:
    """``ref``'s config, tokenizer and structure, in a second or two (a packaged or GGUF model
    is converted into the cache first, once)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    kind = ref_kind(ref)
    if kind == "named":
        directory = convert_gguf(NAMED_MODELS[ref].locate())
    elif kind == "gguf":
        directory = convert_gguf(Path(ref))
    else:
        directory = Path(ref)
    header = read_header(directory) if kind == "lowbit" else None
    config = read_config(directory)
    arch = architecture_for(config.model_type)
    tokenizer = read_tokenizer(directory)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    return Skeleton(ref=ref, kind=kind, config=config, tokenizer=tokenizer, model=model, arch=arch, header=header)
