"""Export a lowbit checkpoint as a compressed-tensors directory (what llm-compressor writes),
which transformers loads with the ``compressed-tensors`` package and vLLM serves.

    DIR/config.json          the model's config with ``quantization_config`` (built with
                             compressed-tensors' own QuantizationConfig, format
                             pack-quantized or int-quantized)
    DIR/model.safetensors    per quantised linear ``<name>.weight_packed`` int32 (out,
                             ceil(in·bits/32)), ``weight_scale`` (out, n_groups) in the
                             checkpoint's scale dtype, ``weight_shape`` int64 (2,), for an
                             asymmetric one ``weight_zero_point`` int32 (ceil(out·bits/32),
                             n_groups);
                             W8A8 linears ``weight`` int8 (out, in) and ``weight_scale``
                             (out, 1); every other tensor in float as the model holds it
    DIR/tokenizer files

The packing (`pack_int32`): every code as the signed integer q in [-2^(b-1), 2^(b-1)) that
compressed-tensors quantises to, offset by +2^(b-1), then bit b·i of a row's bit stream
holds element i (dense, no padding inside a row; rows padded to a whole int32). lowbit's
codes are exactly those unsigned values: symmetric codes c stand for q = c - 2^(b-1), and an
asymmetric code c with integer zero-point Z decodes to S(c - Z) = S(q - z) with
z = Z - 2^(b-1), the zero-point compressed-tensors stores (signed, packed along the rows).
A float offset (``--zero-point float``), codebooks, double-quantised scales and GGML block
types have no compressed-tensors form and are refused; so is a last group shorter than the
others (compressed-tensors needs the group size to divide the row).

Tested code for code against the compressed-tensors package's own pack/unpack and loaded by
transformers (tests/test_export_compressed_tensors.py).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from lowbit import __version__
from lowbit.errors import LowbitError
from lowbit.interchange import recorded_source
from lowbit.models.loading import LoadedModel
from lowbit.modules import QUANTIZED_MODULES
from lowbit.modules.quant_linear import QuantLinear
from lowbit.numerics.spec import QuantSpec
from lowbit.outputs import check_new_directory, new_directory

EXPORT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes uint8 (rows, cols) in [0, 2**bits) -> int32 (rows, ceil(cols·bits/32)):
    element i of a row occupies bits [b·i, b·i + b) of the row's little-endian bit stream."""
    rows, cols = codes.shape
    words = math.ceil(cols * bits / 32)
    value = codes.to(torch.int64)
    start = torch.arange(cols, dtype=torch.int64) * bits
    out = torch.zeros(rows, words + 1, dtype=torch.int64)
    word, offset = start // 32, start % 32
    out.scatter_add_(1, word.expand(rows, -1), (value << offset) & 0xFFFFFFFF)
    spill = offset + bits > 32  # the high bits of an element that crosses into the next word
    if spill.any():
        out.scatter_add_(1, (word[spill] + 1).expand(rows, -1), value[:, spill] >> (32 - offset[spill]))
    out = out[:, :words]
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def unpack_int32(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """The inverse of `pack_int32`: uint8 (rows, cols)."""
    rows = packed.shape[0]
    words = packed.to(torch.int64) & 0xFFFFFFFF
    words = torch.cat([words, torch.zeros(rows, 1, dtype=torch.int64)], dim=1)
    start = torch.arange(cols, dtype=torch.int64) * bits
    word, offset = start // 32, start % 32
    both = words[:, word] | (words[:, word + 1] << 32)
    return ((both >> offset) & ((1 << bits) - 1)).to(torch.uint8)


def weight_args(spec: QuantSpec) -> dict:
    """compressed-tensors' QuantizationArgs fields for a lowbit weight spec."""
    strategy = {"group": "group", "channel": "channel", "tensor": "tensor"}[spec.granularity]
    return {"num_bits": spec.bits, "type": "int", "symmetric": spec.symmetric, "strategy": strategy,
            "group_size": spec.group_size if spec.granularity == "group" else None, "dynamic": False,
            "actorder": None, "observer": "minmax"}


def refusal(spec: QuantSpec, in_features: int) -> str | None:
    """Why ``spec`` has no compressed-tensors form, or None."""
    if spec.ggml is not None:
        return f"{spec.format} is a GGML block type; export it with --to gguf"
    if spec.format != "int":
        return f"the {spec.format} codebook has no compressed-tensors integer form"
    if spec.double_quant:
        return "double-quantised scales have no compressed-tensors form"
    if not spec.symmetric and spec.zero_point == "float":
        return "a float offset (--zero-point float) is not an integer zero-point; quantise with --zero-point int"
    if spec.granularity == "group" and in_features % spec.group_size:
        return f"group size {spec.group_size} does not divide the rows of {in_features}; compressed-tensors needs it to"
    return None


@dataclass
class CTPlan:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    groups: dict[str, dict] = field(default_factory=dict)  # scheme key -> {"weights": args, "input_activations": args|None, "targets": [...]}
    formats: set[str] = field(default_factory=set)
    ignore: list[str] = field(default_factory=list)

    quantized: set[str] = field(default_factory=set)  # names of the linears written quantised

    def counts(self) -> dict[str, int]:
        floats = sum(1 for k in self.tensors if k.rpartition(".")[0] not in self.quantized)
        return {"quantised linears": len(self.quantized), "float": floats}


def plan_compressed_tensors(loaded: LoadedModel) -> CTPlan:
    """Every tensor and the quantisation config, checked; nothing written."""
    if not loaded.is_quantized:
        raise LowbitError("the compressed-tensors export takes a lowbit checkpoint (a directory lowbit quantize wrote)")
    plan = CTPlan()
    model = loaded.model
    done = plan.quantized
    for name, module in model.named_modules():
        kind = type(module).__name__
        if isinstance(module, QuantLinear):
            why = refusal(module.spec, module.in_features)
            if why is not None:
                raise LowbitError(f"{name} ({module.spec.describe()}): {why}; nothing was written")
            q = module.qweight.to_quantized()
            prefix = f"{name}."
            plan.tensors[prefix + "weight_packed"] = pack_int32(q.codes, module.spec.bits)
            scale = q.scale.to(getattr(torch, module.spec.scale_dtype))
            rows = module.out_features if module.spec.granularity != "tensor" else 1
            plan.tensors[prefix + "weight_scale"] = scale.expand(rows, -1).contiguous()
            plan.tensors[prefix + "weight_shape"] = torch.tensor([module.out_features, module.in_features], dtype=torch.int64)
            if q.zero is not None:  # Z as its packed (offset) value, packed along the rows
                zero = q.zero.to(torch.uint8).expand(rows, -1)
                plan.tensors[prefix + "weight_zero_point"] = pack_int32(zero.T.contiguous(), module.spec.bits).T.contiguous()
            if q.g_idx is not None:
                raise LowbitError(f"{name}: act-order groups (g_idx) are not exported: compressed-tensors' own decompressor ignores "
                                  "weight_g_idx, so no consumer here could check them; quantise with --act-order static; nothing was written")
            if module.bias is not None:
                plan.tensors[prefix + "bias"] = module.bias.detach()
            key = json.dumps({"w": weight_args(module.spec)}, sort_keys=True)
            plan.groups.setdefault(key, {"weights": weight_args(module.spec), "input_activations": None,
                                         "targets": []})["targets"].append(name)
            plan.formats.add("pack-quantized")
            done.add(name)
        elif kind == "W8A8Linear":
            if module.act_granularity != "token":
                raise LowbitError(f"{name}: static per-tensor activation scales are not exported yet; quantise with per-token activations")
            prefix = f"{name}."
            plan.tensors[prefix + "weight"] = module.weight_int8.to(torch.int8)
            plan.tensors[prefix + "weight_scale"] = module.weight_scale.reshape(-1, 1).float()
            if module.bias is not None:
                plan.tensors[prefix + "bias"] = module.bias.detach()
            weights = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "group_size": None, "dynamic": False,
                       "actorder": None, "observer": "minmax"}
            acts = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "group_size": None, "dynamic": True,
                    "actorder": None, "observer": None}
            key = json.dumps({"w": weights, "a": acts}, sort_keys=True)
            plan.groups.setdefault(key, {"weights": weights, "input_activations": acts, "targets": []})["targets"].append(name)
            plan.formats.add("int-quantized")
            done.add(name)
        elif kind == "SparseLinear":
            raise LowbitError(f"{name} is pruned and stored sparse; lowbit does not write compressed-tensors' sparse layouts yet, "
                              "nothing was written")
        elif kind in QUANTIZED_MODULES:
            raise LowbitError(f"{name} is a {kind}, which compressed-tensors has no layout for; nothing was written")
    for name, tensor in model.state_dict().items():
        module_name = name.rpartition(".")[0]
        if module_name in done:
            continue
        plan.tensors.setdefault(name, tensor.detach())
    plan.ignore = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if len(plan.formats) > 1:
        raise LowbitError("this checkpoint mixes weight-only and W8A8 layers; compressed-tensors takes one format per file")
    return plan


def _quantization_config(plan: CTPlan) -> dict:
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    fmt = next(iter(plan.formats))
    groups = {}
    single = len(plan.groups) == 1  # one scheme for every quantised linear: target "Linear", the float ones ignored
    for i, group in enumerate(plan.groups.values()):
        targets = ["Linear"] if single else [f"re:^{name.replace('.', '[.]')}$" for name in group["targets"]]
        groups[f"group_{i}"] = QuantizationScheme(targets=targets, weights=group["weights"], input_activations=group["input_activations"],
                                                  format=fmt)
    config = QuantizationConfig(config_groups=groups, format=fmt, quantization_status="compressed", ignore=plan.ignore)
    data = config.model_dump(mode="json", exclude_none=False)
    data["lowbit_export_version"] = EXPORT_VERSION
    return data


def export(loaded: LoadedModel, out: str | Path, requantize: bool = False, metadata_from=None) -> tuple[Path, CTPlan]:
    """The checkpoint ``loaded`` as a compressed-tensors directory ``out`` (whole or
    nothing). ``requantize`` is refused: every exportable format is exact here."""
    if requantize:
        raise LowbitError("--requantize does not apply to compressed-tensors: a format it cannot hold is refused; re-quantise instead")
    if metadata_from is not None:
        raise LowbitError("--gguf-metadata applies to --to gguf; drop it")
    out = check_new_directory(out, "--out")
    plan = plan_compressed_tensors(loaded)
    qconfig = _quantization_config(plan)
    source = recorded_source(loaded.header or {})
    if source is not None:
        qconfig["lowbit_source"] = source  # the float model it was quantised from: `lowbit eval`'s default reference
    with new_directory(out, "--out") as tmp:
        shared = {}
        tensors = {}
        for name, tensor in plan.tensors.items():  # tied weights once (safetensors refuses shared storage)
            key = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)
            if key in shared:
                continue
            shared[key] = name
            tensors[name] = tensor.contiguous()
        save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt", "quantized_by": f"lowbit {__version__}"})
        config = loaded.model.config.to_dict()
        config["quantization_config"] = qconfig
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        loaded.tokenizer.save_pretrained(tmp)
    return out, plan


# ---- import -----------------------------------------------------------------------------

def _module_scheme(name: str, groups: dict, ignore: list[str]) -> dict | None:
    """The config group whose targets cover linear ``name`` (targets "Linear" or
    "re:<regex>"), None when ``ignore`` names it or nothing targets it."""
    import re

    def matches(pattern: str) -> bool:
        return bool(re.match(pattern[3:], name)) if pattern.startswith("re:") else pattern in ("Linear", name)

    if any(matches(p) for p in ignore):
        return None
    for group in groups.values():
        if any(matches(t) for t in group.get("targets", [])):
            return group
    return None


def compressed_tensors_config(config) -> dict | None:
    """A Hugging Face config's compressed-tensors ``quantization_config`` (a dict), else None."""
    qconfig = getattr(config, "quantization_config", None)
    qconfig = qconfig if isinstance(qconfig, dict) else getattr(qconfig, "to_dict", lambda: None)()
    return qconfig if qconfig and qconfig.get("quant_method") == "compressed-tensors" else None


def open_compressed_tensors(path: str | Path) -> LoadedModel:
    """A compressed-tensors pack-quantized directory (llm-compressor's, or lowbit's export)
    as a quantised model: every targeted linear becomes a `QuantLinear` over its codes,
    scales and zero-points as stored (integer weights, group or channel, symmetric or with
    an integer zero-point; act-order ``weight_g_idx`` kept); nothing is dequantised. The
    header records the directory as its own source. Anything else is refused, one line."""
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from lowbit.models.architectures import architecture_for
    from lowbit.models.loading import read_config, read_tokenizer
    from lowbit.modules.swap import set_module
    from lowbit.numerics.quantization import Quantized
    from lowbit.packed.qweight import QuantizedWeight

    path = Path(path)
    config = read_config(path)
    qconfig = compressed_tensors_config(config)
    if qconfig is None:
        raise LowbitError(f"{path}/config.json has no compressed-tensors quantization_config; open it as a float model")
    fmt = qconfig.get("format")
    if fmt != "pack-quantized":
        raise LowbitError(f"{path} is compressed-tensors format {fmt!r}; lowbit opens pack-quantized (integer weights) as quantised")
    written = qconfig.get("lowbit_export_version")
    if written is not None and int(written) > EXPORT_VERSION:
        raise LowbitError(f"{path} was exported by a newer lowbit (export version {written} > {EXPORT_VERSION}); upgrade lowbit")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise LowbitError(f"{path} holds no *.safetensors weights; the checkpoint is incomplete")
    tensors = {}
    for file in files:
        tensors.update(load_file(file))
    del config.quantization_config
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    groups, ignore = qconfig.get("config_groups", {}), qconfig.get("ignore") or []
    layers = {}
    for name, module in list(model.named_modules()):
        group = _module_scheme(name, groups, ignore) if isinstance(module, nn.Linear) else None
        if group is None or f"{name}.weight_packed" not in tensors:
            continue
        args = group["weights"]
        if args.get("type", "int") != "int" or group.get("input_activations"):
            raise LowbitError(f"{name}: only integer weight-only schemes open as quantised; this one is {args}")
        spec = _spec_of(args, tensors[f"{name}.weight_scale"].dtype, name)
        prefix = f"{name}."
        out_features, in_features = (int(v) for v in tensors.pop(prefix + "weight_shape"))
        codes = unpack_int32(tensors.pop(prefix + "weight_packed"), spec.bits, in_features)
        scale = tensors.pop(prefix + "weight_scale").float()
        zero = None
        if not spec.symmetric:
            packed_zero = tensors.pop(prefix + "weight_zero_point")
            zero = unpack_int32(packed_zero.T.contiguous(), spec.bits, out_features).T.float()
        g_idx = tensors.pop(prefix + "weight_g_idx", None)
        group_size = in_features if spec.granularity != "group" else spec.group_size
        if g_idx is not None and torch.equal(g_idx.long(), torch.arange(in_features) // group_size):
            g_idx = None  # groups in column order: no index needed
        q = Quantized(codes=codes, scale=scale, zero=zero, group_size=group_size, spec=spec,
                      g_idx=None if g_idx is None else g_idx.long())
        bias = tensors.pop(prefix + "bias", None)
        quantized = QuantLinear(QuantizedWeight.from_quantized(q), bias)
        set_module(model, name, quantized)
        layers[name] = {"module": "QuantLinear", **quantized.config()}
    if not layers:
        raise LowbitError(f"{path}: no linear has pack-quantized weights; nothing to open as quantised")
    result = model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}, strict=False, assign=True)
    if result.unexpected_keys:
        raise LowbitError(f"{path}: tensors {result.unexpected_keys[:4]} match no module; the checkpoint does not match its config")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        raise LowbitError(f"{path}: no stored values for {meta[:4]}; the checkpoint is incomplete")
    model.eval()
    header = {"format": "compressed-tensors", "format_version": qconfig.get("version"), "source": str(path.resolve()),
              "recorded_source": qconfig.get("lowbit_source"),
              "model_type": config.model_type, "method": {"name": "compressed-tensors", "format": fmt}, "calibration": None,
              "layers": layers, "tied": {}}
    return LoadedModel(model=model, tokenizer=read_tokenizer(path), source=str(path.resolve()), arch=architecture_for(config.model_type),
                       header=header)


def _spec_of(args: dict, scale_dtype: torch.dtype, name: str) -> QuantSpec:
    strategy = args.get("strategy")
    if strategy not in ("group", "channel", "tensor"):
        raise LowbitError(f"{name}: weight strategy {strategy!r} has no lowbit form (group, channel or tensor)")
    # bfloat16 scales widen to float32 exactly; float16 stay float16
    stored = "float16" if scale_dtype == torch.float16 else "float32"
    return QuantSpec(bits=int(args["num_bits"]), symmetric=bool(args.get("symmetric", True)), granularity=strategy,
                     group_size=int(args["group_size"]) if strategy == "group" else None, scale_dtype=stored)
