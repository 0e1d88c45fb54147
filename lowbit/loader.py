"""Open any model reference: a packaged model, a GGUF file, a Hugging Face directory or a
lowbit checkpoint (`load_model`), or just its structure, shapes and tokenizer, without the
weights (`open_skeleton`), for the checks that must run before any slow work."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lowbit.checkpoint import load_quantized, read_header
from lowbit.errors import LowbitError
from lowbit.models.architectures import Architecture, architecture_for
from lowbit.models.loading import (LoadedModel, convert_gguf, gguf_cache_path, gguf_config_and_tokenizer, gguf_float_bytes, load_gguf,
                                   load_hf_dir, read_config, read_tokenizer)
from lowbit.models.refs import ref_kind
from lowbit.models.registry import NAMED_MODELS
from lowbit.system import available_memory


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


def open_streamed(ref: str, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """``ref`` (packaged, GGUF, Hugging Face or lowbit directory) opened without its weights,
    for `lowbit.streaming.quantize_streamed` (float sources) and
    `lowbit.evaluation.streamed.evaluate_streamed`: the parameters stay on the meta device
    and each part is read from disk when it is needed (`lowbit.models.streamed.open_streamed`;
    a lowbit checkpoint's quantised linears come in packed). A GGUF file already in the
    conversion cache streams from its conversion; any other is dequantised tensor by tensor
    as it is read (no float copy of the whole model is ever made, on disk or in memory)."""
    from lowbit.models import streamed

    kind = ref_kind(ref)
    path = NAMED_MODELS[ref].locate() if kind == "named" else Path(ref)
    source = ref if kind == "named" else str(path.resolve())
    if kind in ("named", "gguf") and (gguf_cache_path(path) / "config.json").is_file():
        path = gguf_cache_path(path)
    return streamed.open_streamed(path, source=source, dtype=dtype)


@dataclass
class Skeleton:
    """A model reference opened without its weights.

    kind: `lowbit.models.refs.REF_KINDS`.
    model: the model built from its config on the meta device (names and shapes, no memory).
    header: a lowbit checkpoint's header, else None.
    stored: how `open_checkpoint` opens it ("lowbit", "gguf", "compressed-tensors": quantised;
        None: float), and recorded_source: the float model it was quantised from where its
        record names one (`stored_form`).
    """

    ref: str
    kind: str
    config: object
    tokenizer: object
    model: nn.Module
    arch: Architecture
    header: dict | None
    stored: str | None = None
    recorded_source: str | None = None

    @property
    def is_quantized(self) -> bool:
        return self.header is not None

    @property
    def max_positions(self) -> int | None:
        config = self.config.get_text_config(decoder=True)
        return getattr(config, "max_position_embeddings", None)


def open_skeleton(ref: str) -> Skeleton:
    """``ref``'s config, tokenizer and structure, in a second or two (a packaged or GGUF model
    is converted into the cache first, once, unless in float it would not fit in the memory
    free now: then config and tokenizer come from the GGUF file, and the model streams)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    kind = ref_kind(ref)
    directory = Path(ref)
    if kind in ("named", "gguf"):
        directory = NAMED_MODELS[ref].locate() if kind == "named" else Path(ref)
        if (gguf_cache_path(directory) / "config.json").is_file() or gguf_float_bytes(directory) * 5 // 4 < available_memory():
            directory = convert_gguf(directory)
    header = read_header(directory) if kind == "lowbit" else None
    if directory.is_file():  # a GGUF larger than memory in float: read as it is, never converted whole
        config, tokenizer = gguf_config_and_tokenizer(directory)
    else:
        config, tokenizer = read_config(directory), read_tokenizer(directory)
    stored, source = stored_form(ref, kind, header, config)
    arch = architecture_for(config.model_type)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    return Skeleton(ref=ref, kind=kind, config=config, tokenizer=tokenizer, model=model, arch=arch, header=header, stored=stored,
                    recorded_source=source)


def stored_form(ref: str, kind: str, header: dict | None, config) -> tuple[str | None, str | None]:
    """How ``ref`` holds its linears: "lowbit", "gguf" or "compressed-tensors" where it is
    quantised and `open_checkpoint` opens it so, else None (a packaged model is its float
    source); and the float model it was quantised from, where its record names one."""
    if kind == "lowbit":
        return "lowbit", header["source"]
    if kind == "gguf":
        from lowbit.interchange.gguf import stored_quantized

        quantized, source = stored_quantized(ref)
        return ("gguf" if quantized else None), source
    if kind != "hf":
        return None, None
    from lowbit.interchange.compressed_tensors import compressed_tensors_config

    qconfig = compressed_tensors_config(config)
    if qconfig is not None and qconfig.get("format") == "pack-quantized":
        return "compressed-tensors", qconfig.get("lowbit_source")
    return None, None


def open_checkpoint(ref: str) -> LoadedModel:
    """``ref`` as the model it holds, quantised where it is stored quantised (what `lowbit
    eval` and `generate` run): a lowbit directory; a GGUF file whose linears are in GGML
    types lowbit reads, code for code (`lowbit.interchange.gguf.open_quantized`, nothing
    dequantised); a pack-quantized compressed-tensors directory (`open_compressed_tensors`;
    its other formats, e.g. W8A8 int-quantized, load through transformers, which
    decompresses them to float). A packaged
    model, a float GGUF and a float Hugging Face directory load as float (`load_model`); as
    a quantisation source every model loads as float (`load_model`)."""
    kind = ref_kind(ref)
    config = read_config(Path(ref)) if kind == "hf" else None
    stored, _ = stored_form(ref, kind, read_header(Path(ref)) if kind == "lowbit" else None, config)
    if stored == "gguf":
        from lowbit.interchange.gguf import open_quantized

        return open_quantized(ref)
    if stored == "compressed-tensors":
        from lowbit.interchange.compressed_tensors import open_compressed_tensors

        return open_compressed_tensors(ref)
    return load_model(ref)
