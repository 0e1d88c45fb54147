"""Models opened without their weights, for models larger than memory.

`open_streamed` builds the model from its config on the meta device (names and shapes, no
memory) and indexes its safetensors files (one file or Hugging Face shards), its GGUF file,
or a lowbit checkpoint (one file or shards). A part of the model (the embeddings, one
decoder block) is brought in when work reaches it (`load_part`: each tensor read from its
file, or dequantised from the GGUF; a lowbit checkpoint's quantised linears rebuilt as
their packed modules) and sent back to the meta device after (`release_part`), so peak
memory is that part, not the model.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from lowbit.errors import LowbitError, one_line
from lowbit.models.loading import LoadedModel, non_finite, read_config, read_tokenizer
from lowbit.system import trim_heap

HF_INDEX = "model.safetensors.index.json"


@dataclass
class WeightFiles:
    """Where each tensor of a Hugging Face directory lives: name -> safetensors file."""

    directory: Path
    files: dict[str, Path]
    ties: dict[str, str]

    @staticmethod
    def of(directory: Path, ties: dict[str, str]) -> "WeightFiles":
        """``ties``: the model's `tied_names`, taken before any part is loaded (loading
        puts new tensors in, which no longer share an identity to find ties by)."""
        from lowbit.models.refs import SHARD_INDEX

        index = next((directory / name for name in (HF_INDEX, SHARD_INDEX) if (directory / name).is_file()), None)
        files: dict[str, Path] = {}
        try:
            if index is not None:
                files = {name: directory / file for name, file in json.loads(index.read_text())["weight_map"].items()}
            else:
                for file in sorted(directory.glob("*.safetensors")):
                    with safe_open(file, framework="pt") as f:
                        files.update(dict.fromkeys(f.keys(), file))
        except (SafetensorError, OSError, ValueError, KeyError) as err:
            raise LowbitError(f"could not index the weights of {directory}: {one_line(err)}; a file is missing, truncated or corrupted") from None
        if not files:
            raise LowbitError(f"{directory} holds no safetensors weights")
        return WeightFiles(directory, files, dict(ties))

    def read(self, names: list[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The named tensors, each in memory of its own (float ones cast to ``dtype``), read
        with `read_safetensors`."""
        missing = [n for n in names if n not in self.files]
        if missing:
            raise LowbitError(f"{self.directory}: no stored tensor {missing[0]} (of {len(missing)} missing); the checkpoint does not match its config")
        out = {}
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        for file, wanted in by_file.items():
            out.update(read_safetensors(file, wanted, dtype))
        return out


# safetensors' dtype names (its format's header) -> torch dtypes
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
                      "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
                      "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
# bytes read at a time when a tensor is cast on the way in
CAST_CHUNK_BYTES = 64 << 20


def read_safetensors(file: Path, names: list[str] | None = None, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The named tensors of a safetensors file (None: all), read with plain file reads straight into
    their own memory, float ones cast to ``dtype`` in chunks of `CAST_CHUNK_BYTES`.

    `safetensors.safe_open` memory-maps the file: every page a read touches counts in the
    process's resident size while the file is open, so a tensor costs its size twice at
    the moment it is read, and a cast a third time (a 7B model's 2.2 GB float32 head: 4.4
    GB to read, 5.4 GB read from bfloat16). Here a tensor costs its size once. The format
    (an 8-byte little-endian header length, a JSON header of dtype, shape and byte offsets,
    then the data) is checked against the file's size."""
    try:
        with open(file, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            length = int.from_bytes(handle.read(8), "little")
            if not 2 <= length <= size - 8:
                raise ValueError(f"header length {length} does not fit the file's {size} bytes")
            header = json.loads(handle.read(length))
            base = 8 + length
            out = {}
            for name in [n for n in header if n != "__metadata__"] if names is None else names:
                entry = header.get(name)
                if not isinstance(entry, dict) or entry.get("dtype") not in SAFETENSORS_DTYPES:
                    raise ValueError(f"no readable tensor {name!r}")
                stored = SAFETENSORS_DTYPES[entry["dtype"]]
                start, end = entry["data_offsets"]
                shape = tuple(entry["shape"])
                itemsize = torch.empty(0, dtype=stored).element_size()
                if end - start != math.prod(shape) * itemsize or base + end > size:
                    raise ValueError(f"tensor {name!r} ({entry['dtype']} {list(shape)}) does not match its byte range")
                target = dtype if dtype is not None and stored.is_floating_point and stored != dtype else stored
                tensor = torch.empty(shape, dtype=target)
                handle.seek(base + start)
                if target == stored:
                    _read_into(handle, tensor.view(-1).view(torch.uint8), end - start)
                else:
                    flat, step = tensor.view(-1), CAST_CHUNK_BYTES // itemsize
                    buffer = torch.empty(min(step, flat.numel()), dtype=stored)
                    for lo in range(0, flat.numel(), step):
                        part = buffer[: min(step, flat.numel() - lo)]
                        _read_into(handle, part.view(torch.uint8), part.numel() * itemsize)
                        flat[lo : lo + part.numel()].copy_(part)
                out[name] = tensor
            return out
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise LowbitError(f"could not read {file}: {one_line(err)}; the file is truncated or corrupted") from None


def _read_into(handle, target: torch.Tensor, nbytes: int) -> None:
    """Fill the uint8 tensor ``target`` (``nbytes`` long) from ``handle``."""
    view = memoryview(target.numpy()) if nbytes else memoryview(b"")
    done = 0
    while done < nbytes:
        got = handle.readinto(view[done:])
        if not got:
            raise ValueError("the file ends inside a tensor")
        done += got


@dataclass
class GGUFWeights:
    """The tensors of a GGUF file by their Hugging Face names, each dequantised to float when
    read (`gguf.dequantize`, then the architecture's fix-ups: the Llama q/k row order, Gemma's
    norm offset, as transformers' GGUF loader applies them), so a model in a GGUF file larger
    than memory in float streams straight from it.

    files: Hugging Face name -> the GGUF file (every name), for `WeightFiles`' interface.
    tensors: Hugging Face name -> the reader's tensor.
    """

    directory: Path
    files: dict[str, Path]
    ties: dict[str, str]
    tensors: dict[str, object]
    processor: object

    @staticmethod
    def of(path: Path, model: nn.Module, ties: dict[str, str]) -> "GGUFWeights":
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

        from lowbit.models.loading import gguf_reader

        reader = gguf_reader(path)
        arch = reader.fields["general.architecture"].contents()
        processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=model.config.to_dict())
        names = get_gguf_hf_weights_map(model, processor)
        tensors = {names[t.name]: t for t in reader.tensors if t.name in names}
        return GGUFWeights(path, dict.fromkeys(tensors, path), dict(ties), tensors, processor)

    def read(self, names: list[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The named tensors dequantised, in memory of their own (cast to ``dtype``)."""
        from gguf import dequantize

        missing = [n for n in names if n not in self.tensors]
        if missing:
            raise LowbitError(f"{self.directory}: no tensor for {missing[0]} (of {len(missing)} missing); the file does not match its architecture")
        out = {}
        for name in names:
            tensor = self.tensors[name]
            try:
                values = self.processor.process(weights=dequantize(tensor.data, tensor.tensor_type), name=tensor.name).weights
            except (ValueError, IndexError, NotImplementedError) as err:
                raise LowbitError(f"could not dequantise {tensor.name} of {self.directory}: {one_line(err)}; the file is truncated or corrupted") from None
            value = torch.from_numpy(values.copy())
            out[name] = value if dtype is None or value.dtype == dtype else value.to(dtype)
        return out


def stored_names(model: nn.Module, prefix: str) -> list[str]:
    """The state-dict names under ``prefix`` (a dotted module path, "" for all) that a
    checkpoint stores, tied duplicates once (the first name of each tensor)."""
    seen, names = set(), []
    for name, tensor in model.state_dict(keep_vars=True).items():
        if prefix and not name.startswith(prefix + "."):
            continue
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        names.append(name)
    return names


def outside_modules(model: nn.Module, blocks: str) -> list[str]:
    """The modules outside the decoder blocks (``blocks``: their list's path, e.g.
    ``model.layers``) that hold stored tensors, in state-dict order: the embeddings, the
    final norm and an untied output head."""
    modules: list[str] = []
    for name in stored_names(model, ""):
        if name.startswith(blocks + "."):
            continue
        module = name.rpartition(".")[0]
        if module not in modules:
            modules.append(module)
    return modules


@contextmanager
def embeddings_loaded(loaded: LoadedModel) -> Iterator[None]:
    """Inside, the tensors outside the decoder blocks are in memory except the output
    head's: what the forward up to block 0 reads (`capture_block_inputs`)."""
    model = loaded.model
    head = model.get_output_embeddings()
    needed = [m for m in outside_modules(model, loaded.arch.blocks) if model.get_submodule(m) is not head]
    try:
        for module in needed:
            load_part(loaded, module)
        yield
    finally:
        for module in needed:
            release_part(model, module)


def tied_names(model: nn.Module) -> dict[str, str]:
    """Each parameter name that shares its tensor with an earlier one -> that earlier name."""
    first: dict[int, str] = {}
    tied = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            tied[name] = first[id(param)]
        else:
            first[id(param)] = name
    return tied


def load_part(loaded: LoadedModel, prefix: str) -> None:
    """Bring the tensors under ``prefix`` (e.g. ``model.layers.3``, ``model.embed_tokens``;
    "" for all) into memory from the files, in place of their meta placeholders. A name tied
    to another (an output head tied to the embeddings) reads the tensor stored for that one;
    names outside ``prefix`` stay as they are. In a lowbit checkpoint, each quantised linear
    under ``prefix`` is rebuilt from its stored codes as the module its header names."""
    model, weights = loaded.model, loaded.weights
    if loaded.is_quantized:
        _load_quantized_layers(loaded, prefix)
    present = model.state_dict(keep_vars=True)
    wanted = [n for n, t in present.items() if (not prefix or n.startswith(prefix + ".")) and t.is_meta]
    canonical = {n: weights.ties.get(n, n) for n in wanted}
    keys = {n: c if c in weights.files else n for n, c in canonical.items()}
    # a tied name whose tensor is already in memory (the embeddings, loaded earlier) shares it
    tensors = {key: present[key] for key in set(keys.values()) if key in present and not present[key].is_meta}
    tensors.update(weights.read(sorted(set(keys.values()) - set(tensors)), dtype=loaded.dtype))
    bad = non_finite(tensors)
    if bad is not None:
        raise LowbitError(f"{weights.directory}: tensor {bad[0]} holds {bad[1]} NaN/Inf values; the model is corrupted")
    for name in wanted:
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        value = tensors[keys[name]]
        if attr not in module._parameters:
            module._buffers[attr] = value
            continue
        setattr(module, attr, value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=False))


def _load_quantized_layers(loaded: LoadedModel, prefix: str) -> None:
    from lowbit.checkpoint import quantized_module
    from lowbit.modules.swap import set_module

    model, weights = loaded.model, loaded.weights
    layers = {}
    for name, info in loaded.header["layers"].items():
        if prefix and not (name == prefix or name.startswith(prefix + ".")):
            continue
        try:
            model.get_submodule(name)
        except AttributeError:  # under a module taken out of the tree (a block stood in for)
            continue
        layers[name] = info
    if not layers:
        return
    owner = {n: layer for n in weights.files for layer in layers if n.startswith(layer + ".")}
    stored = weights.read(sorted(owner))  # codes and scales as stored, in one read
    bad = non_finite(stored)
    if bad is not None:
        raise LowbitError(f"{weights.directory}: tensor {bad[0]} holds {bad[1]} NaN/Inf values; the checkpoint is corrupted, quantise its source again")
    for name, info in layers.items():
        own = {key[len(name) + 1:]: value for key, value in stored.items() if owner[key] == name}
        set_module(model, name, quantized_module(name, info, own, loaded.dtype))


def release_part(model: nn.Module, prefix: str) -> None:
    """Send the stored tensors under ``prefix`` ("" for all) back to the meta device,
    freeing their memory. Buffers a checkpoint does not store (rotary frequencies, Gemma's
    embedding scale: computed from the config when the model was built) stay, as load_part
    could not bring them back."""
    for module in model.get_submodule(prefix).modules():
        for name, param in module._parameters.items():
            if param is not None and not param.is_meta:
                module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=False)
        for name, buffer in module._buffers.items():
            if buffer is not None and not buffer.is_meta and name not in module._non_persistent_buffers_set:
                module._buffers[name] = buffer.to("meta")
    trim_heap()  # the freed block's pages back to the system (lowbit.system.trim_heap says why)


def open_streamed(path: Path, source: str, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """A Hugging Face directory, a GGUF file or a lowbit checkpoint as a `LoadedModel` whose
    parameters stay on the meta device until `load_part` brings a part in (persistent
    buffers too; non-persistent ones, such as rotary frequencies, are computed from the
    config as usual). A GGUF file's tensors are dequantised as they are read
    (`GGUFWeights`); a lowbit checkpoint keeps its header, and its quantised linears come in
    packed."""
    from lowbit.checkpoint import read_header
    from lowbit.models.refs import CHECKPOINT_FILE, SHARD_INDEX

    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from lowbit.models.architectures import architecture_for
    from lowbit.models.loading import gguf_config_and_tokenizer

    gguf = path.is_file()
    config, tokenizer = gguf_config_and_tokenizer(path) if gguf else (read_config(path), read_tokenizer(path))
    arch = architecture_for(config.model_type)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # from_config leaves a tied head untied on the meta device
    header = None
    if not gguf and ((path / CHECKPOINT_FILE).is_file() or (path / SHARD_INDEX).is_file()):
        header = read_header(path)
        ties = dict(header["tied"])
    else:
        ties = tied_names(model)
    weights = GGUFWeights.of(path, model, ties) if gguf else WeightFiles.of(path, ties)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, arch=arch, header=header, weights=weights, dtype=dtype)
