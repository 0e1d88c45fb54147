"""Load a model fully offline: a named packaged model, a GGUF file, a Hugging Face
checkpoint directory, or a lowbit quantised directory.

GGUF files are dequantised by transformers' GGUF reader, which takes 40-100 s for the
packaged models on two cores (most of it parsing the tokenizer vocabulary), so the result is
converted once into a Hugging Face directory under the cache (`registry.cache_dir()`),
keyed by the file's path, size and modification time, and loaded from there afterwards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from lowbit.errors import LowbitError
from lowbit.models.architectures import Architecture, architecture_for
from lowbit.models.registry import NAMED_MODELS, cache_dir

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
CHECKPOINT_FILE = "lowbit.safetensors"


@dataclass
class LoadedModel:
    """A model ready to run.

    source: how to load the same model again (a registry name or an absolute path).
    header: for a lowbit checkpoint, its JSON header (see `lowbit.checkpoint`); else None.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: str
    arch: Architecture
    header: dict | None = field(default=None)

    @property
    def is_quantized(self) -> bool:
        return self.header is not None


def describe_model_ref() -> str:
    return f"a named model ({', '.join(NAMED_MODELS)}), a .gguf file or a checkpoint directory"


def load_model(ref: str, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load ``ref``: a name from `NAMED_MODELS`, a ``.gguf`` file, a Hugging Face directory
    (config.json + safetensors) or a lowbit directory. Float weights come in ``dtype``."""
    if ref in NAMED_MODELS:
        return _load_gguf(NAMED_MODELS[ref].locate(), source=ref, dtype=dtype)
    path = Path(ref)
    if not path.exists():
        raise LowbitError(f"model {ref!r} not found; give {describe_model_ref()}")
    if path.is_file():
        return _load_gguf(path, source=str(path.resolve()), dtype=dtype)
    if (path / CHECKPOINT_FILE).is_file():
        from lowbit.checkpoint import load_quantized

        return load_quantized(path, dtype=dtype)
    if (path / "config.json").is_file():
        return load_hf_dir(path, source=str(path.resolve()), dtype=dtype)
    raise LowbitError(f"{path} holds neither {CHECKPOINT_FILE} nor config.json; give {describe_model_ref()}")


def check_gguf_magic(path: Path) -> None:
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise LowbitError(f"{path} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r}); give a .gguf file or a checkpoint directory")


def _gguf_cache_path(path: Path) -> Path:
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "converted" / f"{path.stem}-{key}"


def convert_gguf(path: Path) -> Path:
    """Dequantise a GGUF file into a Hugging Face float32 directory in the cache, once.

    Written to a temporary directory and renamed, so an interrupted conversion leaves nothing
    that a later run would mistake for a finished one.
    """
    check_gguf_magic(path)
    target = _gguf_cache_path(path)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.warning("converting %s once into %s (dequantising GGUF takes a minute or two)", path.name, target)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32, local_files_only=True)
        except (ValueError, KeyError, IndexError, OSError) as err:
            raise LowbitError(f"could not read GGUF {path}: {err}; the file is truncated, corrupted or of an architecture transformers cannot read") from err
        architecture_for(model.config.model_type)
        # The weights are plain float32 now; drop the GGUF marker so they save as such.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "lowbit-source.json").write_text(json.dumps({"gguf": str(path.resolve()), "size": path.stat().st_size}))
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _load_gguf(path: Path, source: str, dtype: torch.dtype) -> LoadedModel:
    return load_hf_dir(convert_gguf(path), source=source, dtype=dtype)


def load_hf_dir(path: Path, source: str, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """A Hugging Face causal-LM directory (config.json, safetensors, tokenizer files)."""
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (ValueError, OSError) as err:
        raise LowbitError(f"could not read {path / 'config.json'}: {err}") from err
    arch = architecture_for(config.model_type)
    try:
        # disable_mmap: weights in owned memory, so dropping a float weight really frees it
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True, disable_mmap=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (SafetensorError, OSError, ValueError) as err:
        raise LowbitError(f"could not load the checkpoint in {path}: {err}; a file is missing, truncated or corrupted") from err
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, arch=arch)
