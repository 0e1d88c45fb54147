"""`lowbit info`: what a checkpoint holds, without building the model."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from safetensors import safe_open

from lowbit.checkpoint import read_header
from lowbit.errors import LowbitError
from lowbit.models.loading import CHECKPOINT_FILE, check_gguf_magic
from lowbit.numerics.spec import QuantSpec


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def layer_label(info: dict) -> str:
    """Short description of one layer entry of a checkpoint header."""
    module = info.get("module", "QuantLinear")
    if module == "QuantLinear":
        return QuantSpec.from_dict(info["spec"]).describe()
    if module == "W8A8Linear":
        return f"W8A8 act per-{info['act_granularity']}"
    if module == "LLMInt8Linear":
        return f"LLM.int8() t={info['threshold']:g} ({info['n_outlier_channels']} fp ch)"
    return module


def describe_lowbit(path: Path) -> str:
    header = read_header(path)
    file = path / CHECKPOINT_FILE
    sizes: dict[str, int] = {}
    with safe_open(file, framework="pt") as f:
        for key in f.keys():
            sl = f.get_slice(key)
            shape, dtype = sl.get_shape(), sl.get_dtype()
            itemsize = {"U8": 1, "I8": 1, "F16": 2, "BF16": 2, "F32": 4, "I32": 4, "I64": 8, "F64": 8}.get(dtype, 4)
            n = 1
            for d in shape:
                n *= d
            sizes[key] = n * itemsize
    lines = [
        f"{path}: lowbit checkpoint, format version {header['format_version']} (written by lowbit {header.get('lowbit_version', '?')})",
        f"source model: {header['source']}  ({header['model_type']})",
        f"method: {json.dumps(header['method'])}",
        f"file: {_mb(file.stat().st_size)}; tied: {header['tied'] or 'none'}",
        "",
        f"{'layer':<44} {'shape':>12} {'spec':<22} {'bits/w':>7} {'bytes':>10}",
    ]
    quant_bytes = quant_weights = 0
    specs = Counter()
    for name, info in header["layers"].items():
        label = layer_label(info)
        nbytes = sum(v for k, v in sizes.items() if k.startswith(name + ".") and not k.endswith(".bias"))
        numel = info["shape"][0] * info["shape"][1]
        quant_bytes += nbytes
        quant_weights += numel
        specs[label] += 1
        lines.append(f"{name:<44} {'x'.join(map(str, info['shape'])):>12} {label:<22} {8 * nbytes / numel:>7.3f} {nbytes:>10}")
    float_bytes = sum(sizes.values()) - quant_bytes
    lines += [
        "",
        f"{len(header['layers'])} quantised linears ({', '.join(f'{n}x {s}' for s, n in specs.items())}): "
        f"{quant_weights} weights in {_mb(quant_bytes)}, {8 * quant_bytes / max(quant_weights, 1):.3f} bits/weight",
        f"float tensors (embeddings, norms, unquantised layers): {_mb(float_bytes)}",
    ]
    return "\n".join(lines)


def describe_gguf(path: Path) -> str:
    from gguf import GGUFReader

    check_gguf_magic(path)
    try:
        reader = GGUFReader(str(path))
    except (ValueError, IndexError) as err:
        raise LowbitError(f"could not read GGUF {path}: {err}; the file is truncated or corrupted") from err
    arch = reader.fields["general.architecture"].contents() if "general.architecture" in reader.fields else "?"
    types = Counter(t.tensor_type.name for t in reader.tensors)
    lines = [f"{path}: GGUF, architecture {arch}, {len(reader.tensors)} tensors ({', '.join(f'{n} {t}' for t, n in types.most_common())})", ""]
    for t in reader.tensors:
        lines.append(f"{t.name:<40} {t.tensor_type.name:>6} {'x'.join(str(int(d)) for d in t.shape):>14} {t.n_bytes:>10}")
    return "\n".join(lines)


def describe_hf(path: Path) -> str:
    config = json.loads((path / "config.json").read_text())
    lines = [f"{path}: Hugging Face checkpoint, model_type {config.get('model_type')}", ""]
    total = 0
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                lines.append(f"{key:<56} {sl.get_dtype():>5} {'x'.join(map(str, sl.get_shape())):>14}")
        total += file.stat().st_size
    lines.append(f"\nsafetensors files: {_mb(total)}")
    return "\n".join(lines)


def describe_path(path: str | Path) -> str:
    path = Path(path)
    if not path.exists():
        raise LowbitError(f"{path} not found; give a lowbit directory, a Hugging Face directory or a .gguf file")
    if path.is_file():
        return describe_gguf(path)
    if (path / CHECKPOINT_FILE).is_file():
        return describe_lowbit(path)
    if (path / "config.json").is_file():
        return describe_hf(path)
    raise LowbitError(f"{path} holds neither {CHECKPOINT_FILE} nor config.json")
