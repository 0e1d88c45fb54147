"""lowbit's checkpoint format: one directory that rebuilds a working model on its own.

    DIR/
      lowbit.safetensors   every tensor of the model: packed QuantLinear buffers
                           (``<layer>.qdata``, ``<layer>.scales``, ``<layer>.zeros``) and the
                           float ones (embeddings, norms, lm_head); a tensor shared by tied
                           weights is stored once. Its safetensors metadata holds the JSON
                           header under the key "lowbit".
      config.json          the Hugging Face config of the source model
      tokenizer files      as the tokenizer saves them

A checkpoint written block by block (`lowbit.calibration.streamed`, for models larger than
memory) holds the same tensors in shards instead, one per decoder block and one per other
tensor, as Hugging Face's sharded checkpoints do:

      lowbit-00001-of-000NN.safetensors ...   the tensors, block 0 first
      lowbit.safetensors.index.json           {"metadata": {"lowbit": <header>, "total_size": bytes},
                                               "weight_map": {tensor name: shard file}}

The header (format_version 2):
    {"format": "lowbit", "format_version": 2, "lowbit_version": ...,
     "source": "smollm2" | "/abs/path/model.gguf" | "/abs/path/hf-dir",
     "model_type": "llama",
     "method": {"name": "gptq", "version": 1, "spec": {...}, "skip": [...], "head": null, "damp": 0.01, ...},
     "calibration": {"corpus": "mix", "samples": 128, ...} | null,
     "layers": {"model.layers.0.self_attn.q_proj":
                   {"module": "QuantLinear", "shape": [576, 576], "group_size": 128, "bias": false, "spec": {...}}},
     "tied": {"lm_head.weight": "model.embed_tokens.weight"}}

"method" is the method's registered config (`MethodConfig.to_dict`, read back by
`lowbit.methods.config_from_dict`). Nothing in the header depends on the clock, so the same
command on the same input writes the same bytes. Version 1 headers (the method recorded as
a free-form dict with its wall time) still load; their "method" is kept as it was.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from lowbit import __version__
from lowbit.errors import LowbitError, one_line
from lowbit.models.architectures import architecture_for
from lowbit.models.loading import LoadedModel, non_finite, read_config, read_tokenizer
from lowbit.models.refs import CHECKPOINT_FILE, SHARD_INDEX
from lowbit.modules import QUANTIZED_MODULES
from lowbit.modules.swap import set_module
from lowbit.outputs import new_directory

FORMAT_VERSION = 2


def quantized_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    kinds = tuple(QUANTIZED_MODULES.values())
    return {name: m for name, m in model.named_modules() if isinstance(m, kinds)}


def _dedupe_tied(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Keep one copy of tensors that share storage; map each dropped name to the kept one."""
    kept: dict[tuple, str] = {}
    out, tied = {}, {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if tensor.numel() and key in kept:  # empty tensors share no data, whatever their pointer
            tied[name] = kept[key]
            continue
        kept[key] = name
        out[name] = tensor.contiguous()
    return out, tied


def checkpoint_header(source: str, model_type: str, method: dict, calibration: dict | None, layers: dict, tied: dict) -> dict:
    """The JSON header of a checkpoint (module docstring); ``layers``: name -> the quantised
    module's type and `config()`; ``tied``: dropped tensor name -> the name stored."""
    return {
        "format": "lowbit",
        "format_version": FORMAT_VERSION,
        "lowbit_version": __version__,
        "source": source,
        "model_type": model_type,
        "method": method,
        "calibration": calibration,
        "layers": layers,
        "tied": tied,
    }


def layer_record(module: torch.nn.Module) -> dict:
    """A quantised module's entry in the header's "layers"."""
    return {"module": type(module).__name__, **module.config()}


def shard_name(index: int, count: int) -> str:
    """The file of shard ``index`` (0-based) of ``count``."""
    return f"lowbit-{index + 1:05d}-of-{count:05d}.safetensors"


def write_index(directory: Path, header: dict, weight_map: dict[str, str]) -> None:
    """The index of a sharded checkpoint in ``directory``, whose shards are written."""
    total = sum((directory / file).stat().st_size for file in set(weight_map.values()))
    index = {"metadata": {"lowbit": header, "total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / SHARD_INDEX).write_text(json.dumps(index, indent=1) + "\n")


def checkpoint_files(path: str | Path) -> list[Path]:
    """The safetensors files of a lowbit directory: its one file, or its shards in order."""
    path = Path(path)
    index = path / SHARD_INDEX
    if not index.is_file():
        return [path / CHECKPOINT_FILE]
    return [path / name for name in sorted(set(_read_index(index)["weight_map"].values()))]


def _read_index(index: Path) -> dict:
    try:
        data = json.loads(index.read_text())
    except (OSError, ValueError) as err:
        raise LowbitError(f"could not read {index}: {one_line(err)}; the checkpoint is corrupted") from None
    if not isinstance(data, dict) or not isinstance(data.get("weight_map"), dict) or not isinstance(data.get("metadata"), dict):
        raise LowbitError(f"{index} lacks its weight_map or metadata; the checkpoint is corrupted")
    return data


def save_quantized(loaded: LoadedModel, out: str | Path) -> Path:
    """Write ``loaded``, quantised by `lowbit.quantize_model`, to directory ``out``, which must
    not exist. Written into a temporary sibling and renamed at the end: an error or an
    interruption leaves no half-written ``out``."""
    if not isinstance(loaded, LoadedModel):
        raise LowbitError(f"save_quantized takes the LoadedModel that lowbit.load_model returns, not a {type(loaded).__name__}")
    if not loaded.is_quantized:
        raise LowbitError("this model is not quantised; run quantize_model on it before saving")
    out = Path(out)
    with new_directory(out) as tmp:
        model = loaded.model
        layers = {name: layer_record(m) for name, m in quantized_layers(model).items()}
        tensors, tied = _dedupe_tied(model.state_dict())
        header = checkpoint_header(loaded.source, model.config.model_type, loaded.header["method"], loaded.header.get("calibration"),
                                   layers, tied)
        save_file(tensors, tmp / CHECKPOINT_FILE, metadata={"lowbit": json.dumps(header)})
        model.config.to_json_file(tmp / "config.json")
        loaded.tokenizer.save_pretrained(tmp)
    return out


def read_header(path: str | Path) -> dict:
    """The JSON header of a lowbit directory (of its lowbit.safetensors file, or of the index
    of its shards)."""
    path = Path(path)
    if path.is_dir() and (path / SHARD_INDEX).is_file():
        file = path / SHARD_INDEX
        header = _read_index(file)["metadata"].get("lowbit")
        if header is None:
            raise LowbitError(f"{file} has no lowbit header; it was not written by lowbit")
    else:
        file = path / CHECKPOINT_FILE if path.is_dir() else path
        header = _file_header(file)
    version = header.get("format_version") if isinstance(header, dict) else None
    if not isinstance(version, int) or version < 1:
        raise LowbitError(f"{file}: its lowbit header has no valid format_version; the file is corrupted")
    if version > FORMAT_VERSION:
        raise LowbitError(f"{file} has format version {version}; this lowbit reads up to {FORMAT_VERSION}, upgrade lowbit")
    missing = [key for key in ("source", "model_type", "method", "layers", "tied") if key not in header]
    if missing:
        raise LowbitError(f"{file}: its lowbit header lacks {', '.join(missing)}; the file is corrupted")
    return header


def _file_header(file: Path) -> dict:
    try:
        with safe_open(file, framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise LowbitError(f"could not read {file}: {one_line(err)}; the file is missing, truncated or corrupted") from None
    if "lowbit" not in meta:
        raise LowbitError(f"{file} has no lowbit header; it was not written by lowbit")
    try:
        return json.loads(meta["lowbit"])
    except ValueError as err:
        raise LowbitError(f"{file}: its lowbit header is not valid JSON ({err}); the file is corrupted") from None


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of the lowbit directory ``path`` (every shard) in memory they own (not
    views of a memory map that would stay resident as long as any tensor lives), each
    read once into its place (`read_safetensors`: no second copy of a file in memory)."""
    from lowbit.models.streamed import read_safetensors

    tensors = {}
    for file in checkpoint_files(path):
        tensors.update(read_safetensors(file))
    return tensors



def quantized_module(name: str, info: dict, own: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.nn.Module:
    """The quantised module ``name`` rebuilt from its header entry ``info`` and its stored
    tensors ``own`` (keys without the ``name.`` prefix; a bias is cast to ``dtype``)."""
    if info["bias"] and "bias" not in own:
        raise LowbitError(f"{name}: the checkpoint lacks its bias; it is incomplete, re-quantise it")
    if "bias" in own:
        own["bias"] = own["bias"].to(dtype)
    kind = QUANTIZED_MODULES.get(info.get("module", "QuantLinear"))
    if kind is None:
        raise LowbitError(f"{name}: module type {info['module']!r} is unknown to this lowbit; upgrade lowbit")
    return kind.from_state(info, own, name)


def load_quantized(path: str | Path, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Rebuild a working model from a lowbit directory alone.

    The float model is built with its parameters on the meta device (no memory, no random
    init), the quantised layers are put in from the stored packed tensors, then the remaining
    float tensors are assigned.
    """
    path = Path(path)
    header = read_header(path)
    tensors = _load_tensors(path)
    bad = non_finite(tensors)  # scales, float offsets, norms, embeddings: NaN there runs to garbage without an error
    if bad is not None:
        raise LowbitError(f"{path}: tensor {bad[0]} holds {bad[1]} NaN/Inf values; the checkpoint is corrupted, "
                          "quantise its source again")
    config = read_config(path)
    tokenizer = read_tokenizer(path)
    arch = architecture_for(config.model_type)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, info in header["layers"].items():
        prefix = name + "."
        own = {key[len(prefix):]: tensors.pop(key) for key in list(tensors) if key.startswith(prefix)}
        set_module(model, name, quantized_module(name, info, own, dtype))
    floats = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()}
    result = model.load_state_dict(floats, strict=False, assign=True)
    quantized_prefixes = tuple(name + "." for name in header["layers"])
    missing = [k for k in result.missing_keys if k not in header["tied"] and not k.startswith(quantized_prefixes)]
    if missing or result.unexpected_keys:
        raise LowbitError(f"{path}: tensors missing {missing[:5]} / unexpected {result.unexpected_keys[:5]}; the checkpoint does not match its config")
    for name, target in header["tied"].items():
        module_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(module_name), attr, model.get_parameter(target))
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        raise LowbitError(f"{path}: no stored values for {meta[:5]}; the checkpoint is incomplete")
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, source=str(path.resolve()), arch=arch, header=header)
