"""Export a lowbit checkpoint as a GGUF file that llama.cpp runs as it is.

The file is the source GGUF with lowbit's weights in it. Everything llama.cpp needs besides
the weights (architecture hyper-parameters, RoPE settings, the tokenizer and its chat
template, tied or untied head) is copied from the source GGUF's metadata, so a checkpoint
quantised from a GGUF (the packaged models, or any ``.gguf``) exports; one quantised from a
Hugging Face directory is refused (converting a tokenizer to GGUF is llama.cpp's
``convert_hf_to_gguf.py``'s job: convert the source first, then quantise the GGUF).

Each tensor of the source is written from the lowbit model (`plan_gguf`):
  codes        a quantised linear whose format is a GGML type (``--format q4_k`` ...), or a
               plain integer format that is one code for code (symmetric 4/5/8-bit or
               float-offset 4/5-bit groups of 32, float16 scales: q4_0, q5_0, q8_0, q4_1,
               q5_1): its codes and scales as they are, no rounding.
  source       a float tensor lowbit did not change (embeddings, norms, a float head): the
               source file's bytes, so nothing is rounded twice.
  float        a float tensor lowbit changed (AWQ folds its scales into the norms): float32.
  requantized  only with ``requantize``: a quantised linear no GGML type holds exactly,
               rounded again to the nearest type; the added weight error is reported.
The rows of q_proj and k_proj are permuted back to llama.cpp's RoPE layout where the family
needs it (`Architecture.gguf_permuted_qk`), and Gemma's norms get their +1 back
(`Architecture.norm_offset`): the inverse of what transformers' GGUF loader does.

Everything is checked before the file is opened, and the file is written under a temporary
name and renamed, so a refusal or a failure leaves nothing behind.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn

from lowbit import __version__
from lowbit.errors import LowbitError
from lowbit.interchange import recorded_source
from lowbit.models.loading import LoadedModel, gguf_reader
from lowbit.models.refs import ref_kind
from lowbit.models.registry import NAMED_MODELS
from lowbit.modules import QUANTIZED_MODULES
from lowbit.modules.quant_linear import QuantLinear
from lowbit.numerics.ggml_blocks import dequantize_blocks, pack_rows
from lowbit.numerics.ggml_types import GGML_BY_ID, GGML_TYPES, GGMLType, ggml_type_for
from lowbit.numerics.quantization import weight_sqnr_db
from lowbit.numerics.spec import QuantSpec
from lowbit.outputs import check_output_file, new_file

EXPORT_VERSION = 1  # of the lowbit.* metadata keys an exported file carries
GGUF_VERSIONS = (3,)  # the GGUF container versions lowbit opens (llama.cpp writes 3)
# Plain integer formats that are a GGML type code for code: (bits, symmetric, zero_point) at
# groups of 32 with float16 scales.
EXACT_INT_TYPES = {(4, True, "int"): "q4_0", (5, True, "int"): "q5_0", (8, True, "int"): "q8_0",
                   (4, False, "float"): "q4_1", (5, False, "float"): "q5_1"}
# --requantize: the type a weight of each code width is rounded to (before the row fallback).
REQUANTIZE_TYPES = {2: ("q2_k", "q2_k"), 3: ("q3_k", "q3_k"), 4: ("q4_0", "q4_1"), 5: ("q5_0", "q5_1"),
                    6: ("q6_k", "q6_k"), 7: ("q8_0", "q8_0"), 8: ("q8_0", "q8_0")}
# llama.cpp's file-type label for a checkpoint whose main format is each type.
FILE_TYPES = {"q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0", "q4_1": "MOSTLY_Q4_1", "q5_0": "MOSTLY_Q5_0", "q5_1": "MOSTLY_Q5_1",
              "iq4_nl": "MOSTLY_IQ4_NL", "q2_k": "MOSTLY_Q2_K", "q3_k": "MOSTLY_Q3_K_M", "q4_k": "MOSTLY_Q4_K_M",
              "q5_k": "MOSTLY_Q5_K_M", "q6_k": "MOSTLY_Q6_K"}


@dataclass
class ExportTensor:
    """One tensor of the file: its GGUF name, data (uint8 (rows, row bytes) for block
    types; float32 or float16 values otherwise), GGML type and where it came from
    (``codes``, ``source``, ``float`` or ``requantized``, see the module docstring)."""

    name: str
    data: np.ndarray
    type: gguf.GGMLQuantizationType
    origin: str
    note: str = ""


@dataclass
class GGUFPlan:
    source: Path
    arch_name: str
    fields: list  # (key, value, value type, sub type) copied from the source
    tensors: list[ExportTensor] = field(default_factory=list)
    file_type: str | None = None

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors:
            out[t.origin] = out.get(t.origin, 0) + 1
        return out


def source_gguf(header: dict, metadata_from: str | Path | None = None) -> Path:
    """The GGUF file whose metadata and tokenizer the export copies: ``metadata_from`` if
    given (a GGUF of the same model, e.g. for another tool's checkpoint), else the file the
    checkpoint was quantised from; or a one-line error saying why an export needs one."""
    if metadata_from is not None:
        path = Path(metadata_from)
        if str(metadata_from) in NAMED_MODELS:
            return NAMED_MODELS[str(metadata_from)].locate()
        if not path.is_file() or ref_kind(str(path)) != "gguf":
            raise LowbitError(f"--gguf-metadata {metadata_from} is not a GGUF file; give the GGUF of the same model")
        return path
    source = header.get("source", "")
    if source in NAMED_MODELS:
        return NAMED_MODELS[source].locate()
    path = Path(source)
    if not path.exists():
        raise LowbitError(f"the checkpoint's source {source!r} is gone; the GGUF export copies its metadata and tokenizer, "
                          "restore the file or quantise again from where it now is")
    if ref_kind(source) != "gguf":
        raise LowbitError(f"the checkpoint comes from {source}, not a GGUF file: the export copies the tokenizer and metadata "
                          "from a GGUF of the same model; pass one with --gguf-metadata FILE (llama.cpp's convert_hf_to_gguf.py makes it)")
    return path


def exact_type(spec: QuantSpec) -> GGMLType | None:
    """The GGML type that stores weights of ``spec`` code for code, or None."""
    if spec.ggml is not None:
        return spec.ggml
    if spec.format != "int" or spec.granularity != "group" or spec.group_size != 32 or spec.scale_dtype != "float16" or spec.double_quant:
        return None
    name = EXACT_INT_TYPES.get((spec.bits, spec.symmetric, spec.zero_point))
    return None if name is None else GGML_TYPES[name]


def requantize_type(spec: QuantSpec, ncols: int) -> GGMLType | None:
    if spec.format in ("nf4", "fp4", "fp4-e2m1"):
        name = "iq4_nl"
    else:
        sym, asym = REQUANTIZE_TYPES[spec.bits]
        name = sym if spec.symmetric else asym
    return ggml_type_for(ncols, name)


def qk_permutation(rows: int, n_head: int) -> torch.Tensor:
    """Row order of llama.cpp's q/k layout: GGUF row r is Hugging Face row index[r] (each
    head's rows split in two halves and interleaved, as llama.cpp's converter does)."""
    return torch.arange(rows).reshape(n_head, 2, rows // n_head // 2).transpose(1, 2).reshape(-1)


def _field_values(reader: gguf.GGUFReader) -> list:
    out = []
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.alignment", "general.file_type"):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        out.append((key, f.contents(), vtype, sub))
    return out


def _source_values(tensor) -> torch.Tensor:
    """A source tensor's values as transformers' loader computes them, float32 (rows, cols)."""
    data = np.asarray(tensor.data)
    t = GGML_BY_ID.get(int(tensor.tensor_type))
    if t is not None:
        values = dequantize_blocks(t, torch.from_numpy(data.copy()).reshape(-1, t.type_size))
        return values.reshape(data.shape[0], -1)
    return torch.from_numpy(data.astype(np.float32))


def _modules_by_gguf_name(model: nn.Module, arch_name: str, n_blocks: int) -> dict[str, tuple[str, nn.Module]]:
    arch_id = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}.get(arch_name)
    if arch_id is None:
        raise LowbitError(f"the gguf package does not know architecture {arch_name!r}; upgrade it (pip install -U gguf)")
    names = gguf.get_tensor_name_map(arch_id, n_blocks)
    out = {}
    for module_name, module in model.named_modules():
        # every lowbit module, whatever its buffers are called (a SparseLinear has no weight), and every float one
        if isinstance(module, tuple(QUANTIZED_MODULES.values())) or isinstance(getattr(module, "weight", None), torch.Tensor):
            base = names.get_name(module_name)
            if base is not None:
                out[base] = (module_name, module)
    return out


def plan_gguf(loaded: LoadedModel, requantize: bool = False, metadata_from: str | Path | None = None) -> GGUFPlan:
    """Everything the file will hold, checked; nothing is written. Refuses (one line) a
    quantised layer no GGML type stores exactly unless ``requantize``, naming the format
    to quantise with instead."""
    header = loaded.header or {}
    if not header:
        raise LowbitError("the GGUF export takes a lowbit checkpoint (a directory lowbit quantize wrote)")
    path = source_gguf(header, metadata_from)
    reader = gguf_reader(path)
    arch_name = reader.fields["general.architecture"].contents()
    config = loaded.model.config.get_text_config(decoder=True)
    arch = loaded.arch
    modules = _modules_by_gguf_name(loaded.model, arch_name, config.num_hidden_layers)
    plan = GGUFPlan(source=path, arch_name=arch_name, fields=_field_values(reader))
    inexact = []
    formats: dict[str, int] = {}
    written = set()
    for tensor in reader.tensors:
        base, _, suffix = tensor.name.rpartition(".")
        found = modules.get(base)
        if found is None:  # a tensor no module holds (e.g. rope_freqs): lowbit never changes it
            plan.tensors.append(ExportTensor(tensor.name, np.asarray(tensor.data), tensor.tensor_type, "source"))
            continue
        module_name, module = found
        written.add(base)
        rows = _row_order(base, arch, config)
        kind = type(module).__name__
        if kind == "SparseLinear":
            raise LowbitError(f"{module_name} is pruned and stored sparse, which GGUF cannot hold (its tensors are dense blocks); "
                              "nothing was written")
        if kind in QUANTIZED_MODULES and kind != "QuantLinear":
            raise LowbitError(f"{module_name} is a {kind} (int8 activations), which GGUF cannot hold; "
                              "export W8A8 checkpoints with --to compressed-tensors")
        if isinstance(module, QuantLinear) and suffix == "weight":
            item = _quantized_tensor(tensor.name, module_name, module, rows, requantize)
            if item is None:
                inexact.append((module_name, module.spec))
                continue
            plan.tensors.append(item)
            formats[item.type.name.lower()] = formats.get(item.type.name.lower(), 0) + module.out_features * module.in_features
            continue
        plan.tensors.append(_float_tensor(tensor, getattr(module, suffix), rows, arch.norm_offset if "norm" in base else 0.0))
    head = getattr(loaded.model, "lm_head", None)
    if isinstance(head, QuantLinear) and "output" not in written:  # a quantised head of a tied model: its own tensor
        item = _quantized_tensor("output.weight", "lm_head", head, None, requantize)
        if item is None:
            inexact.append(("lm_head", head.spec))
        else:
            plan.tensors.append(item)
    if inexact:
        name, spec = inexact[0]
        raise LowbitError(
            f"{len(inexact)} quantised layers (e.g. {name}, {spec.describe()}) are in a format no GGUF type stores code for code; "
            f"quantise with {_nearest_exact(spec)} for an exact export, or pass --requantize to round them again (the added error is printed)")
    asked = ((header.get("method") or {}).get("spec") or {}).get("format")
    if asked in FILE_TYPES:  # the label llama.cpp's quantiser gives a file made for this type
        plan.file_type = FILE_TYPES[asked]
    elif formats:
        plan.file_type = FILE_TYPES.get(max(formats, key=formats.get))
    return plan


def _nearest_exact(spec: QuantSpec) -> str:
    options = [name for name, t in GGML_TYPES.items() if t.bits == spec.bits]
    if not options:
        return "--format q8_0 (or another GGML type)"
    return "--format " + " or ".join(options)


def _row_order(base: str, arch, config) -> torch.Tensor | None:
    """For q_proj/k_proj of a family stored permuted: the GGUF row order, else None."""
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}.get(base.rpartition(".")[2])
    if not arch.gguf_permuted_qk or heads is None:
        return None
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return qk_permutation(heads * head_dim, heads)


def _quantized_tensor(name: str, module_name: str, module: QuantLinear, rows: torch.Tensor | None, requantize: bool) -> ExportTensor | None:
    qweight = module.qweight
    t = exact_type(module.spec)
    if t is not None and qweight.g_idx is None:
        if module.spec.ggml is not None:
            raw = qweight.qdata
        else:
            q = qweight.to_quantized()
            raw = pack_rows(t, q.codes, q.scale, q.zero)
        origin, note = "codes", ""
    elif requantize:
        from lowbit.algorithms.rtn import rtn_quantize

        t = requantize_type(module.spec, module.in_features)
        if t is None:
            raise LowbitError(f"{module_name}: rows of {module.in_features} weights fit no GGML block type; leave it in float (--skip)")
        current = qweight.dequantize()
        again = rtn_quantize(current, QuantSpec().with_changes(format=t.name), module_name)
        raw = again.qdata
        origin = "requantized"
        note = f"{weight_sqnr_db(current, again.dequantize()):.1f} dB SQNR against lowbit's weights"
    else:
        return None
    if rows is not None:
        raw = raw[rows]
    return ExportTensor(name, raw.contiguous().numpy(), gguf.GGMLQuantizationType(t.type_id), origin, note)


def _float_tensor(tensor, value: torch.Tensor, rows: torch.Tensor | None, offset: float) -> ExportTensor:
    """A float tensor: the source's bytes when lowbit's value is what loading them gave
    (unchanged), else lowbit's value in float32 in the file's layout."""
    current = value.detach().float()
    expected = _source_values(tensor)
    if expected.numel() == current.numel():
        expected = expected.reshape(current.shape)
        if rows is not None:
            expected = expected[torch.argsort(rows)]
        if offset:
            expected = expected - offset
        if torch.equal(expected, current):
            return ExportTensor(tensor.name, np.asarray(tensor.data), tensor.tensor_type, "source")
    out = current + offset
    if rows is not None:
        out = out[rows]
    return ExportTensor(tensor.name, out.contiguous().numpy(), gguf.GGMLQuantizationType.F32, "float")


def write_gguf(plan: GGUFPlan, out: str | Path, method: dict | None = None, source: str | None = None) -> Path:
    """Write ``plan`` to ``out`` (temporary name, then renamed); ``method`` and ``source`` (the
    float model the checkpoint was quantised from, `lowbit eval`'s default reference) are
    recorded as ``lowbit.method`` and ``lowbit.source``."""
    out = check_output_file(out, "GGUF file")
    with new_file(out, "GGUF file") as tmp:
        writer = gguf.GGUFWriter(tmp, plan.arch_name)
        for key, value, vtype, sub in plan.fields:
            writer.add_key_value(key, value, vtype, sub_type=sub)
        if plan.file_type is not None:
            writer.add_file_type(int(gguf.LlamaFileType[plan.file_type]))
        writer.add_string("general.quantized_by", f"lowbit {__version__}")
        writer.add_uint32("lowbit.export_version", EXPORT_VERSION)
        if method is not None:
            writer.add_string("lowbit.method", json.dumps(method, sort_keys=True))
        if source is not None:
            writer.add_string("lowbit.source", source)
        for t in plan.tensors:
            writer.add_tensor(t.name, t.data, raw_dtype=t.type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out


def export(loaded: LoadedModel, out: str | Path, requantize: bool = False, metadata_from: str | Path | None = None) -> tuple[Path, GGUFPlan]:
    """`plan_gguf` then `write_gguf`: the checkpoint ``loaded`` as the GGUF file ``out``."""
    plan = plan_gguf(loaded, requantize=requantize, metadata_from=metadata_from)
    header = loaded.header or {}
    return write_gguf(plan, out, header.get("method"), recorded_source(header)), plan


def stored_quantized(path: str | Path) -> tuple[bool, str | None]:
    """Whether the GGUF file ``path`` has a block tensor (``blk.*``) in a GGML type lowbit
    opens code for code (`open_quantized`; a float F16/F32 file has none), and the float
    source its ``lowbit.source`` record names (None in another tool's file)."""
    reader = gguf_reader(path)  # shared with open_quantized, which reads the same file next
    quantized = any(t.name.startswith("blk.") and int(t.tensor_type) in GGML_BY_ID for t in reader.tensors)
    return quantized, _lowbit_source(reader)


def _lowbit_source(reader: gguf.GGUFReader) -> str | None:
    recorded = reader.fields.get("lowbit.source")
    return None if recorded is None else recorded.contents()


# ---- import -----------------------------------------------------------------------------

def open_quantized(path: str | Path, source: str | None = None) -> LoadedModel:
    """A GGUF file as a quantised model: every linear whose tensor is one of lowbit's GGML
    types (`lowbit.numerics.ggml_types`) becomes a `QuantLinear` over the file's blocks,
    code for code (rows of q/k put in Hugging Face order); float tensors and the embeddings
    load as they do for quantisation. The header records the file as the model's own source
    (``method`` {"name": "gguf", ...}); exporting it again writes the same codes.

    The float skeleton comes from the cached conversion (`lowbit.models.loading.load_gguf`),
    so the linears' float weights are built once, then replaced; each replacement is checked
    to decode to exactly the float weight transformers' loader made from the same bytes."""
    from lowbit.models.loading import load_gguf
    from lowbit.modules.swap import set_module
    from lowbit.packed.qweight import QuantizedWeight

    path = Path(path)
    reader = gguf_reader(path)
    version = int(reader.fields["GGUF.version"].contents())
    if version not in GGUF_VERSIONS:
        raise LowbitError(f"{path} is GGUF version {version}; lowbit reads version {', '.join(map(str, GGUF_VERSIONS))} (re-save it with llama.cpp)")
    written = reader.fields.get("lowbit.export_version")
    if written is not None and int(written.contents()) > EXPORT_VERSION:
        raise LowbitError(f"{path} was exported by a newer lowbit (export version {int(written.contents())} > {EXPORT_VERSION}); upgrade lowbit")
    loaded = load_gguf(path, source=source or str(path.resolve()))
    arch_name = reader.fields["general.architecture"].contents()
    config = loaded.model.config.get_text_config(decoder=True)
    tensors = {t.name: t for t in reader.tensors}
    head = loaded.model.get_output_embeddings()
    tied = head is not None and head.weight is loaded.model.get_input_embeddings().weight
    layers, types = {}, {}
    for base, (module_name, module) in _modules_by_gguf_name(loaded.model, arch_name, config.num_hidden_layers).items():
        tensor = tensors.get(f"{base}.weight")
        t = None if tensor is None else GGML_BY_ID.get(int(tensor.tensor_type))
        if not isinstance(module, nn.Linear) or t is None or (module is head and tied):
            continue
        raw = torch.from_numpy(np.array(tensor.data))
        rows = _row_order(base, loaded.arch, config)
        if rows is not None:
            raw = raw[torch.argsort(rows)]
        qweight = QuantizedWeight.from_ggml(raw, (module.out_features, module.in_features), QuantSpec().with_changes(format=t.name))
        if not torch.equal(qweight.dequantize(), module.weight.detach().float()):
            raise LowbitError(f"{path}: {tensor.name} decodes differently from transformers' reading of it; the file is not "
                              "one lowbit can open as quantised (open it as a float model)")
        quantized = QuantLinear(qweight, module.bias)
        set_module(loaded.model, module_name, quantized)
        layers[module_name] = {"module": "QuantLinear", **quantized.config()}
        types[t.name] = types.get(t.name, 0) + 1
    if not layers:
        raise LowbitError(f"{path} holds no linear in a GGML type lowbit reads ({', '.join(GGML_TYPES)}); open it as a float model")
    file_type = reader.fields.get("general.file_type")
    loaded.header = {"format": "gguf", "format_version": int(reader.fields["GGUF.version"].contents()), "source": loaded.source,
                     "recorded_source": _lowbit_source(reader),
                     "model_type": loaded.model.config.model_type,
                     "method": {"name": "gguf", "file_type": None if file_type is None else int(file_type.contents()), "types": types},
                     "calibration": None, "layers": layers, "tied": {}}
    return loaded


def head_from_file(model: nn.Module, path: str | Path) -> None:
    """Put the GGUF file's own codes of the output matmul into ``model``'s head, in place:
    ``output.weight``, or for a tied model ``token_embd.weight`` (the embedding lookup keeps
    its float copy). What llama.cpp reads for the logits; `open_quantized` keeps a tied head
    as the float embedding. Checked to decode to the head it replaces. A float head in the
    file (F32, F16: the random 1.1B model's) has no codes: the model's head stays, once
    checked to hold the file's numbers."""
    from lowbit.packed.qweight import QuantizedWeight

    tensors = {t.name: t for t in gguf_reader(path).tensors}
    tensor = tensors.get("output.weight", tensors["token_embd.weight"])
    head = model.get_output_embeddings()
    if tensor.tensor_type.name in ("F32", "F16"):
        stored = torch.from_numpy(np.array(tensor.data)).float().reshape(head.weight.shape)
        if not torch.equal(stored, head.weight.detach().float()):
            raise LowbitError(f"{path}: {tensor.name} holds other numbers than the model's head")
        return
    qweight = QuantizedWeight.from_ggml(torch.from_numpy(np.array(tensor.data)), (head.out_features, head.in_features),
                                        QuantSpec().with_changes(format=tensor.tensor_type.name.lower()))
    if not torch.equal(qweight.dequantize(), head.weight.detach().float()):
        raise LowbitError(f"{path}: {tensor.name} does not decode to the model's head")
    model.set_output_embeddings(QuantLinear(qweight, head.bias))
