"""`lowbit info`: what a checkpoint holds, without building the model."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from safetensors import SafetensorError, safe_open

from lowbit.checkpoint import checkpoint_files, read_header
from lowbit.errors import LowbitError, SpecError, one_line
from lowbit.methods.registry import config_from_dict
from lowbit.models.refs import ref_kind
from lowbit.models.registry import NAMED_MODELS
from lowbit.numerics.spec import QuantSpec
from lowbit.packed.qweight import bits_per_weight

ITEMSIZE = {"U8": 1, "I8": 1, "F16": 2, "BF16": 2, "F32": 4, "I32": 4, "I64": 8, "F64": 8}


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def layer_label(info: dict) -> str:
    """Short description of one layer entry of a checkpoint header."""
    module = info.get("module", "QuantLinear")
    if module == "QuantLinear":
        return QuantSpec.from_dict(info["spec"]).describe()
    if module == "W8A8Linear":
        return f"W8A8 act per-{info['act_granularity']}"
    if module == "SparseLinear":
        kept = QuantSpec.from_dict(info["spec"]).describe() if info.get("spec") else f"{info['values']} values"
        return f"{info['sparsity']} sparse, {kept}"
    if module == "LLMInt8Linear":
        return f"LLM.int8() t={info['threshold']:g} ({info['n_outlier_channels']} fp ch)"
    return module


def _settings(data: dict, indent: str = "  ") -> list[str]:
    """``key: value`` lines, nested settings (a spec, a training run) described inline."""
    lines = []
    for key, value in data.items():
        if key in ("name", "version"):
            continue
        if key == "layer_bits":  # the --budget plan: each layer's spec is in the table below
            value = f"{len(value)} linears planned by --budget (each one's spec: the table below)" if value else None
        elif isinstance(value, dict) and set(value) >= {"bits", "granularity"}:
            value = QuantSpec.from_dict(value).describe()
        elif isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        elif isinstance(value, list):
            value = " ".join(map(str, value)) or "none"
        lines.append(f"{indent}{key}: {'none' if value is None else value}")
    return lines


def describe_method(header: dict) -> list[str]:
    """The method lines of `lowbit info`: the registered config, or a version-1 header's
    free-form record as it was written."""
    method = header["method"]
    if header["format_version"] >= 2:
        try:
            config = config_from_dict(method)
        except (LowbitError, SpecError) as err:
            raise LowbitError(f"the checkpoint's method record does not parse: {one_line(err)}") from None
        lines = [f"method: {config.name} (config version {method.get('version', 1)}): {config.summary}", *_settings(method)]
    else:
        lines = [f"method: {method.get('name', '?')} (format version 1 record)", *_settings(method)]
    if header.get("calibration"):
        lines.append("calibration: " + ", ".join(f"{k}={v}" for k, v in header["calibration"].items()))
    return lines


def _tensor_bytes(file: Path) -> dict[str, int]:
    sizes: dict[str, int] = {}
    try:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                n = 1
                for d in sl.get_shape():
                    n *= d
                sizes[key] = n * ITEMSIZE.get(sl.get_dtype(), 4)
    except (SafetensorError, OSError) as err:
        raise LowbitError(f"could not read {file}: {one_line(err)}; the file is truncated or corrupted") from None
    return sizes


def describe_lowbit(path: Path) -> str:
    header = read_header(path)
    files = checkpoint_files(path)
    sizes = {key: size for file in files for key, size in _tensor_bytes(file).items()}
    on_disk = sum(file.stat().st_size for file in files)
    stored = _mb(on_disk) if len(files) == 1 else f"{_mb(on_disk)} in {len(files)} shards"
    lines = [
        f"{path}: lowbit checkpoint, format version {header['format_version']} (written by lowbit {header.get('lowbit_version', '?')})",
        f"source model: {header['source']}  ({header['model_type']})",
        *describe_method(header),
        f"file: {stored}; tied: {', '.join(f'{k} = {v}' for k, v in header['tied'].items()) or 'none'}",
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
        lines.append(f"{name:<44} {'x'.join(map(str, info['shape'])):>12} {label:<22} {bits_per_weight(nbytes, numel):>7.3f} {nbytes:>10}")
    float_bytes = sum(sizes.values()) - quant_bytes
    lines += [
        "",
        f"{len(header['layers'])} quantised linears ({', '.join(f'{n}x {s}' for s, n in specs.items())}): "
        f"{quant_weights} weights in {_mb(quant_bytes)}, {bits_per_weight(quant_bytes, max(quant_weights, 1)):.3f} bits/weight",
        f"float tensors (embeddings, norms, unquantised layers): {_mb(float_bytes)}",
    ]
    return "\n".join(lines)


def describe_gguf(path: Path) -> str:
    from lowbit.models.loading import gguf_reader

    try:
        reader = gguf_reader(path)
    except (ValueError, IndexError, KeyError, OSError) as err:
        raise LowbitError(f"could not read GGUF {path}: {one_line(err)}; the file is truncated or corrupted") from None
    arch = reader.fields["general.architecture"].contents() if "general.architecture" in reader.fields else "?"
    types = Counter(t.tensor_type.name for t in reader.tensors)
    from lowbit.numerics.ggml_types import GGML_TYPES

    lines = [f"{path}: GGUF, architecture {arch}, {len(reader.tensors)} tensors ({', '.join(f'{n} {t}' for t, n in types.most_common())})"]
    readable = sum(n for t, n in types.items() if t.lower() in GGML_TYPES)
    lines.append(f"tensors in GGML types lowbit reads code for code: {readable} (linears open as QuantLinear, embeddings as float)")
    if "general.quantized_by" in reader.fields:
        lines.append(f"quantised by: {reader.fields['general.quantized_by'].contents()}")
    if "lowbit.method" in reader.fields:
        lines.append(f"lowbit method: {reader.fields['lowbit.method'].contents()}")
    if "lowbit.source" in reader.fields:
        lines.append(f"quantised by lowbit from: {reader.fields['lowbit.source'].contents()}")
    lines.append("")
    for t in reader.tensors:
        lines.append(f"{t.name:<40} {t.tensor_type.name:>6} {'x'.join(str(int(d)) for d in t.shape):>14} {t.n_bytes:>10}")
    return "\n".join(lines)


def describe_hf(path: Path) -> str:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise LowbitError(f"could not read {path / 'config.json'}: {one_line(err)}") from None
    lines = [f"{path}: Hugging Face checkpoint, model_type {config.get('model_type')}"]
    qconfig = config.get("quantization_config") or {}
    if qconfig.get("quant_method") == "compressed-tensors":
        lines.append(f"compressed-tensors {qconfig.get('format')} (config version {qconfig.get('version')}); "
                     f"lowbit opens it as quantised (eval, generate, export)")
        for name, group in (qconfig.get("config_groups") or {}).items():
            w = group.get("weights") or {}
            act = group.get("input_activations")
            lines.append(f"  {name}: {w.get('type')} {w.get('num_bits')}-bit {w.get('strategy')}"
                         f"{' ' + str(w.get('group_size')) if w.get('strategy') == 'group' else ''}"
                         f" {'symmetric' if w.get('symmetric', True) else 'zero-point'}"
                         f"{'' if not act else ' + ' + str(act.get('num_bits')) + '-bit ' + str(act.get('strategy')) + ' activations'}"
                         f", targets {' '.join(group.get('targets') or [])}")
        if qconfig.get("ignore"):
            lines.append(f"  not quantised: {len(qconfig['ignore'])} modules ({', '.join(qconfig['ignore'][:3])}...)")
        if qconfig.get("lowbit_source"):
            lines.append(f"  quantised by lowbit from {qconfig['lowbit_source']} (export version {qconfig.get('lowbit_export_version')})")
    lines.append("")
    total = 0
    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    lines.append(f"{key:<56} {sl.get_dtype():>5} {'x'.join(map(str, sl.get_shape())):>14}")
        except (SafetensorError, OSError) as err:
            raise LowbitError(f"could not read {file}: {one_line(err)}; the file is truncated or corrupted") from None
        total += file.stat().st_size
    lines.append(f"\nsafetensors files: {_mb(total)}")
    return "\n".join(lines)


def describe_path(ref: str | Path) -> str:
    """What ``ref`` holds: a lowbit checkpoint, a Hugging Face directory, a GGUF file or a
    packaged model (its GGUF)."""
    kind = ref_kind(str(ref))
    if kind == "named":
        return describe_gguf(NAMED_MODELS[str(ref)].locate())
    path = Path(ref)
    return {"gguf": describe_gguf, "lowbit": describe_lowbit, "hf": describe_hf}[kind](path)
