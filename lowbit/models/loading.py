"""Load a float model fully offline: a named packaged model, a GGUF file or a Hugging Face
checkpoint directory (`lowbit.loader.load_model` adds lowbit's quantised directories).

GGUF files are dequantised by transformers' GGUF reader, which takes 15-60 s for the
packaged models on two cores (much of it parsing the tokenizer vocabulary), so the result
is converted once into a Hugging Face directory under the cache (`registry.cache_dir()`),
keyed by the file's path, size and modification time (a changed file converts again and
its stale conversion is removed), and loaded from there afterwards. A conversion that
fails, or whose weights hold NaN or Inf, is not cached.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from lowbit.errors import LowbitError, one_line
from lowbit.models.architectures import Architecture, architecture_for, architecture_for_gguf
from lowbit.models.refs import check_gguf_magic
from lowbit.models.registry import cache_dir
from lowbit.outputs import new_directory

log = logging.getLogger(__name__)

SOURCE_RECORD = "lowbit-source.json"


@dataclass
class LoadedModel:
    """A model ready to run.

    source: how to load the same model again (a registry name or an absolute path).
    header: for a lowbit checkpoint, its JSON header (see `lowbit.checkpoint`); else None.
    weights: for a model opened streamed (`lowbit.models.streamed.open_streamed`), where its
        tensors live on disk: its parameters stay on the meta device until a part is loaded.
    dtype: the float dtype its weights come in.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: str
    arch: Architecture
    header: dict | None = field(default=None)
    weights: object | None = field(default=None)
    dtype: torch.dtype = torch.float32

    @property
    def is_quantized(self) -> bool:
        return self.header is not None

    @property
    def is_streamed(self) -> bool:
        return self.weights is not None


def gguf_cache_path(path: Path) -> Path:
    """Where the float conversion of the GGUF file ``path`` is cached (it may not exist yet)."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "converted" / f"{path.stem}-{key}"


def remove_gguf_directory(directory: Path) -> None:
    """Delete a temporary directory of GGUF files (exports, written models) together with the
    float conversions of them cached by `convert_gguf` (0.5-5 GB each)."""
    for path in directory.glob("*.gguf"):
        shutil.rmtree(gguf_cache_path(path), ignore_errors=True)
    shutil.rmtree(directory, ignore_errors=True)


@functools.lru_cache(maxsize=4)
def _reader(resolved: str, size: int, mtime_ns: int, inode: int):
    from gguf import GGUFReader

    return GGUFReader(resolved)


def gguf_reader(path: str | Path):
    """A `gguf.GGUFReader` over ``path``, shared within the process while the file is
    unchanged (same size, modification time and inode). Parsing the metadata is the slow
    part of opening a GGUF file, string by string through a memory map: 5.5 s for SmolLM2's
    49k-token vocabulary, 24 s for Gemma 3's 262k, measured on these cores. A file replaced
    (as lowbit's writers replace theirs) is parsed again; the reader is read-only."""
    stat = Path(path).stat()
    return _reader(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)


def gguf_architecture(path: Path) -> Architecture:
    """The architecture row of a GGUF file, from its metadata alone (no weights read)."""
    check_gguf_magic(path)
    try:
        reader = gguf_reader(path)
        name = reader.fields["general.architecture"].contents()
    except (ValueError, KeyError, IndexError, OSError) as err:
        raise LowbitError(f"could not read GGUF {path}: {one_line(err)}; the file is truncated or corrupted") from None
    return architecture_for_gguf(name, path)


def gguf_float_bytes(path: Path) -> int:
    """Bytes of the GGUF file's tensors once dequantised to float32 (from its metadata)."""
    check_gguf_magic(path)
    try:
        return sum(int(t.n_elements) for t in gguf_reader(path).tensors) * 4
    except (ValueError, KeyError, IndexError, OSError) as err:
        raise LowbitError(f"could not read GGUF {path}: {one_line(err)}; the file is truncated or corrupted") from None


def gguf_config_and_tokenizer(path: Path):
    """The Hugging Face config and tokenizer transformers builds from a GGUF file's
    metadata (no tensor is read)."""
    gguf_architecture(path)  # a clear error for a family lowbit lacks, before transformers parses it
    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    except (ValueError, KeyError, IndexError, OSError) as err:
        raise LowbitError(f"could not read GGUF {path}: {one_line(err)}; the file is truncated or corrupted") from None
    if hasattr(config, "quantization_config"):  # the GGUF marker: lowbit's float view of it is float
        del config.quantization_config
    return config, tokenizer


def non_finite(tensors: dict[str, torch.Tensor]) -> tuple[str, int] | None:
    """The first float tensor holding NaN or Inf, and how many such values it holds; None
    if every one is finite."""
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            continue
        chunks = tensor.reshape(-1).split(1 << 24)  # a mask of a 7B model's whole head at once would be 545 MB
        if not all(torch.isfinite(chunk).all() for chunk in chunks):
            return name, sum(int((~torch.isfinite(chunk)).sum()) for chunk in chunks)
    return None


def _remove_stale_conversions(path: Path, keep: Path) -> None:
    """Drop earlier conversions of the same file (made before it changed) and conversions
    of files that no longer exist (the exports benchmarks and tests write to temporary
    directories: 0.5-1 GB each, which would otherwise pile up in the cache)."""
    for other in keep.parent.glob("*-*"):
        record = other / SOURCE_RECORD
        if other != keep and record.is_file():
            try:
                source = json.loads(record.read_text()).get("gguf")
            except (OSError, ValueError):
                continue
            if source == str(path.resolve()) or (source and not Path(source).exists()):
                shutil.rmtree(other, ignore_errors=True)


def convert_gguf(path: Path) -> Path:
    """Dequantise a GGUF file into a Hugging Face float32 directory in the cache, once.

    Written to a temporary directory and renamed (`lowbit.outputs.new_directory`), so an
    interrupted or failed conversion leaves nothing that a later run would mistake for a
    finished one; a conversion with NaN or Inf weights is refused, not cached.
    """
    target = gguf_cache_path(path)
    if (target / "config.json").is_file():
        return target
    gguf_architecture(path)
    start = time.perf_counter()
    log.warning("converting %s once into the cache %s (15-20 s for SmolLM2-135M, about a minute for Gemma 3 270M, on two cores)", path.name, target.parent)
    try:
        _convert_gguf_into(path, target)
    except (OSError, LowbitError):
        if not (target / "config.json").is_file():
            raise
        log.warning("another process finished converting %s first; using its copy", path.name)  # two runs started at once
        return target
    _remove_stale_conversions(path, target)
    log.warning("converted %s in %.0f s", path.name, time.perf_counter() - start)
    return target


def _convert_gguf_into(path: Path, target: Path) -> None:
    with new_directory(target, "GGUF conversion") as tmp:
        try:
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32, local_files_only=True)
        except (ValueError, KeyError, IndexError, OSError, RuntimeError) as err:
            raise LowbitError(f"could not read GGUF {path}: {one_line(err)}; the file is truncated or corrupted") from None
        architecture_for(model.config.model_type)
        bad = non_finite(model.state_dict())
        if bad is not None:
            raise LowbitError(f"GGUF {path} dequantises to NaN or Inf in {bad[0]}; the file is corrupted (nothing was cached)")
        # The weights are plain float32 now; drop the GGUF marker so they save as such.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        stat = path.stat()
        (tmp / SOURCE_RECORD).write_text(json.dumps({"gguf": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}))


def load_gguf(path: Path, source: str, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """A GGUF file, dequantised to float (through the conversion cache)."""
    return load_hf_dir(convert_gguf(path), source=source, dtype=dtype)


def read_config(path: Path):
    """The Hugging Face config of a directory (config.json only: fast, no weights)."""
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (ValueError, OSError, KeyError) as err:
        raise LowbitError(f"could not read {path / 'config.json'}: {one_line(err)}") from None


def read_tokenizer(path: Path):
    """The tokenizer saved in a directory, read once per process for each version of its files
    (Gemma 3's 262k-entry tokenizer takes ~3 s to parse, and `lowbit eval` opens a checkpoint
    and its float source twice each). Callers share the object and must not change it."""
    path = Path(path).resolve()
    stamps = tuple((child.name, stat.st_size, stat.st_mtime_ns, stat.st_ino) for child in sorted(path.glob("*token*")) for stat in [child.stat()])
    return _read_tokenizer(path, stamps)


@functools.lru_cache(maxsize=8)
def _read_tokenizer(path: Path, stamps: tuple):
    """``stamps`` (name, size, modification time and inode of each tokenizer file) only key
    the cache, as `gguf_reader`'s do: a rewritten or replaced file is read again."""
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (ValueError, OSError, KeyError) as err:
        raise LowbitError(f"could not read the tokenizer in {path}: {one_line(err)}") from None


def load_hf_dir(path: Path, source: str, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """A Hugging Face causal-LM directory (config.json, safetensors, tokenizer files)."""
    arch = architecture_for(read_config(path).model_type)
    try:
        # disable_mmap: weights in owned memory, so dropping a float weight really frees it
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True, disable_mmap=True)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise LowbitError(f"could not load the checkpoint in {path}: {one_line(err)}; a file is missing, truncated or corrupted") from None
    tokenizer = read_tokenizer(path)
    bad = non_finite(model.state_dict())
    if bad is not None:
        raise LowbitError(f"{path}: tensor {bad[0]} holds {bad[1]} NaN/Inf values; the checkpoint is corrupted")
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, arch=arch)
