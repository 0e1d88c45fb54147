"""compressed-tensors export, checked by the compressed-tensors package and by transformers.

transformers (with compressed-tensors installed) loads a pack-quantized or int-quantized
directory on the CPU by decompressing it to float weights; for symmetric formats its logits
must equal lowbit's exactly. Asymmetric pack-quantized checkpoints do not load in
transformers 5.24 + compressed-tensors 0.20 whoever wrote them (the packed zero-point's
shape is refused: llm-compressor issue #1618); for those the package's own compressor is the
check: given lowbit's weights, scales and zero-points it writes the same bytes, and its
decompressor gives back lowbit's weights bit for bit.
"""

import copy
import json

import pytest
import torch

from conftest import byte_tokenizer, tiny_llama
from lowbit.calibration.config import CalibrationConfig
from lowbit.errors import LowbitError
from lowbit.interchange import compressed_tensors as ct_export
from lowbit.methods import GPTQConfig, NF4Config, RTNConfig, SmoothQuantConfig
from lowbit.models.loading import LoadedModel
from lowbit.models.architectures import architecture_for
from lowbit.modules.quant_linear import QuantLinear
from lowbit.numerics.spec import QuantSpec
from lowbit.pipeline import quantize_model

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32  # noqa: E402
from compressed_tensors.quantization import QuantizationScheme  # noqa: E402


def tiny(config, calibration=None, tie=True) -> LoadedModel:
    model = tiny_llama(seed=3, tie=tie)
    loaded = LoadedModel(model=model, tokenizer=byte_tokenizer(), source="tiny", arch=architecture_for("llama"))
    quantize_model(loaded, config, calibration=calibration, progress=False)
    return loaded


def transformers_logits(path, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        return model(ids).logits


def lowbit_logits(loaded, ids):
    with torch.no_grad():
        return loaded.model(ids).logits


IDS = torch.tensor([list(b"Quantised weights keep their codes.")])


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("cols", [64, 97])
def test_packing_equals_compressed_tensors(bits, cols):
    g = torch.Generator().manual_seed(bits * cols)
    codes = torch.randint(0, 2**bits, (5, cols), generator=g, dtype=torch.uint8)
    theirs = pack_to_int32((codes.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8), bits)
    ours = ct_export.pack_int32(codes, bits)
    assert ours.dtype == torch.int32 and torch.equal(ours, theirs)
    assert torch.equal(ct_export.unpack_int32(ours, bits, cols), codes)
    back = unpack_from_int32(ours, bits, torch.Size((5, cols)))
    assert torch.equal(back.to(torch.int16) + 2 ** (bits - 1), codes.to(torch.int16))


@pytest.mark.parametrize("spec", [QuantSpec(bits=4, group_size=32), QuantSpec(bits=4, group_size=32, grid="full"),
                                  QuantSpec(bits=8, granularity="channel", group_size=None), QuantSpec(bits=3, group_size=32)],
                         ids=lambda s: s.describe())
def test_transformers_loads_the_export_with_lowbits_logits(spec, tmp_path):
    loaded = tiny(RTNConfig(spec=spec))
    out, _ = ct_export.export(loaded, tmp_path / "ct")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert config["config_groups"]["group_0"]["weights"]["num_bits"] == spec.bits
    assert torch.equal(transformers_logits(out, IDS), lowbit_logits(loaded, IDS))


def test_a_changed_code_changes_transformers_logits(tmp_path):
    from safetensors.torch import load_file, save_file

    loaded = tiny(RTNConfig(spec=QuantSpec(bits=4, group_size=32)))
    out, _ = ct_export.export(loaded, tmp_path / "ct")
    tensors = load_file(out / ct_export.WEIGHTS_FILE)
    tensors["model.layers.0.self_attn.q_proj.weight_packed"][0, 0] ^= 0x7
    save_file(tensors, out / ct_export.WEIGHTS_FILE, metadata={"format": "pt"})
    assert not torch.equal(transformers_logits(out, IDS), lowbit_logits(loaded, IDS))


def test_gptq_export_on_the_real_model_loads_in_transformers(packaged_gguf, tmp_path):
    from lowbit.loader import load_model

    packaged_gguf("smollm2")
    loaded = load_model("smollm2")
    quantize_model(loaded, GPTQConfig(spec=QuantSpec(bits=4, group_size=64)), calibration=CalibrationConfig(samples=4, ctx=128),
                   progress=False)
    out, _ = ct_export.export(loaded, tmp_path / "ct")
    ids = loaded.tokenizer("The capital of France is", return_tensors="pt").input_ids
    assert torch.equal(transformers_logits(out, ids), lowbit_logits(loaded, ids))


def test_asymmetric_export_is_what_compressed_tensors_itself_writes(tmp_path):
    """Asymmetric W4 g32: compressed-tensors' compressor, given lowbit's weights, scales and
    zero-points, writes the same packed codes and zero-points; its decompressor gives back
    lowbit's weights exactly."""
    from safetensors.torch import load_file

    loaded = tiny(RTNConfig(spec=QuantSpec(bits=4, group_size=32, symmetric=False)))
    out, _ = ct_export.export(loaded, tmp_path / "ct")
    tensors = load_file(out / ct_export.WEIGHTS_FILE)
    group = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    scheme = QuantizationScheme(targets=["Linear"], weights=group["weights"])
    checked = 0
    for name, module in loaded.model.named_modules():
        if not isinstance(module, QuantLinear):
            continue
        q = module.qweight.to_quantized()
        theirs = PackedQuantizationCompressor.compress(
            {"weight": module.qweight.dequantize(), "weight_scale": q.scale.half().float(),
             "weight_zero_point": (q.zero - 8).to(torch.int8)}, scheme)
        assert torch.equal(theirs["weight_packed"], tensors[f"{name}.weight_packed"]), name
        assert torch.equal(theirs["weight_zero_point"], tensors[f"{name}.weight_zero_point"]), name
        stored = {k.removeprefix(f"{name}."): v for k, v in tensors.items() if k.startswith(f"{name}.")}
        weight = PackedQuantizationCompressor.decompress(stored, scheme)["weight"]
        # it computes in the scales' float16: S·(q - z) is exact in lowbit's float32, so its
        # float16 rounding is what the package must give
        assert weight.dtype == torch.float16 and torch.equal(weight, module.qweight.dequantize().half()), name
        checked += 1
    assert checked == 14


def test_w8a8_export_loads_in_transformers_with_lowbits_int8_weights(tmp_path):
    from transformers import AutoModelForCausalLM

    calibration = CalibrationConfig(samples=2, ctx=32, corpus="pydoc")
    model = tiny_llama(seed=3)
    loaded = LoadedModel(model=model, tokenizer=byte_tokenizer(), source="tiny", arch=architecture_for("llama"))
    quantize_model(loaded, SmoothQuantConfig(), calibration=calibration, progress=False)
    out, _ = ct_export.export(loaded, tmp_path / "ct")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["format"] == "int-quantized"
    assert config["config_groups"]["group_0"]["input_activations"]["strategy"] == "token"
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ours = loaded.model.model.layers[1].mlp.down_proj
    theirs = hf.model.layers[1].mlp.down_proj  # kept compressed: int8 weight and its scales
    assert theirs.weight.dtype == torch.int8 and torch.equal(theirs.weight, ours.weight_int8)
    assert torch.equal(theirs.weight_scale.reshape(-1), ours.weight_scale)


@pytest.mark.parametrize("config, message", [
    (RTNConfig(spec=QuantSpec(bits=4, group_size=32, symmetric=False, zero_point="float")), "zero-point int"),
    (NF4Config(), "codebook"),
    (RTNConfig(spec=QuantSpec().with_changes(format="q4_0")), "--to gguf"),
    (RTNConfig(spec=QuantSpec(bits=4, group_size=48)), "does not divide"),
], ids=["float-offset", "nf4", "ggml", "short-group"])
def test_formats_compressed_tensors_cannot_hold_are_refused_before_writing(config, message, tmp_path):
    loaded = tiny(config)
    with pytest.raises(LowbitError, match=message):
        ct_export.export(loaded, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_dynamic_act_order_is_refused(tmp_path):
    calibration = CalibrationConfig(samples=2, ctx=32, corpus="pydoc")
    loaded = tiny(GPTQConfig(spec=QuantSpec(bits=4, group_size=32), act_order="dynamic"), calibration)
    with pytest.raises(LowbitError, match="static"):
        ct_export.export(copy.deepcopy(loaded), tmp_path / "ct")


def test_a_compressed_tensors_checkpoint_converts_to_gguf_code_for_code(packaged_gguf, tmp_path):
    """Another tool's W4 g32 symmetric checkpoint (compressed-tensors layout) opens as a
    quantised model with the same codes and becomes a q4_0 GGUF whose tensors are byte for
    byte those of lowbit's own export of the same weights."""
    import gguf
    import numpy as np

    from lowbit.interchange import gguf as gguf_export
    from lowbit.loader import load_model

    packaged_gguf("smollm2")
    loaded = load_model("smollm2")
    quantize_model(loaded, RTNConfig(spec=QuantSpec(bits=4, group_size=32, grid="full")), progress=False)
    ct_dir, _ = ct_export.export(loaded, tmp_path / "ct")
    opened = ct_export.open_compressed_tensors(ct_dir)
    ids = loaded.tokenizer("The capital of France is", return_tensors="pt").input_ids
    assert torch.equal(lowbit_logits(opened, ids), lowbit_logits(loaded, ids))
    with pytest.raises(LowbitError, match="--gguf-metadata"):
        gguf_export.export(opened, tmp_path / "no.gguf")
    converted, _ = gguf_export.export(opened, tmp_path / "from-ct.gguf", metadata_from="smollm2")
    direct, _ = gguf_export.export(loaded, tmp_path / "direct.gguf")
    a = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(converted).tensors}
    b = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(direct).tensors}
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_round_trip_lowbit_compressed_tensors_lowbit_keeps_every_code(tmp_path):
    loaded = tiny(RTNConfig(spec=QuantSpec(bits=4, group_size=32, symmetric=False)))
    out, _ = ct_export.export(loaded, tmp_path / "ct")
    opened = ct_export.open_compressed_tensors(out)
    for name, module in loaded.model.named_modules():
        if isinstance(module, QuantLinear):
            a, b = module.qweight.to_quantized(), opened.model.get_submodule(name).qweight.to_quantized()
            assert a.spec == b.spec and torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale) and torch.equal(a.zero, b.zero)
    assert torch.equal(lowbit_logits(opened, IDS), lowbit_logits(loaded, IDS))


def test_cli_eval_and_generate_run_a_compressed_tensors_directory_as_quantised(tiny_llama_dir, text_file, tmp_path, capsys):
    """`lowbit eval DIR` on a compressed-tensors export scores its codes as QuantLinear: the
    numbers of the lowbit checkpoint it came from, against the recorded float source; another
    tool's directory (no lowbit_source) is scored without a reference, and says so."""
    from lowbit.cli import main

    args = ["--text", str(text_file), "--windows", "2", "--ctx", "32"]
    assert main(["quantize", "--model", str(tiny_llama_dir), "--bits", "4", "--group-size", "32", "--asym", "--out", str(tmp_path / "q")]) == 0
    assert main(["export", str(tmp_path / "q"), "--to", "compressed-tensors", "--out", str(tmp_path / "ct")]) == 0
    scores = {}
    for name in ("q", "ct"):
        assert main(["eval", str(tmp_path / name), *args, "--json", str(tmp_path / f"{name}.json")]) == 0
        scores[name] = json.loads((tmp_path / f"{name}.json").read_text())
    err = capsys.readouterr().err
    assert "opened" in err and "as quantised (compressed-tensors)" in err
    assert scores["ct"]["reference"] == scores["q"]["reference"] == str(tiny_llama_dir.resolve())
    assert all(scores["ct"][k] == scores["q"][k] for k in ("perplexity", "kld", "top1_percent"))
    texts = []
    for name in ("q", "ct"):
        assert main(["generate", str(tmp_path / name), "--prompt", "Quantised", "--max-new-tokens", "6"]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1]
    assert main(["info", str(tmp_path / "ct")]) == 0
    info = capsys.readouterr().out
    assert "compressed-tensors pack-quantized" in info and "int 4-bit group 32 zero-point" in info and str(tiny_llama_dir.resolve()) in info
    config_file = tmp_path / "ct" / "config.json"
    config = json.loads(config_file.read_text())
    del config["quantization_config"]["lowbit_source"]
    config_file.write_text(json.dumps(config))
    assert main(["eval", str(tmp_path / "ct"), *args, "--json", str(tmp_path / "foreign.json")]) == 0
    assert "names no float source" in capsys.readouterr().err
    foreign = json.loads((tmp_path / "foreign.json").read_text())
    assert foreign["reference"] is None and foreign["perplexity"] == scores["q"]["perplexity"]
    # W8A8 (int-quantized) is not opened as quantised: transformers decompresses it, and eval says so
    assert main(["quantize", "--model", str(tiny_llama_dir), "--method", "w8a8", "--calib-samples", "2", "--calib-ctx", "32",
                 "--calib-text", str(text_file), "--out", str(tmp_path / "w8")]) == 0
    assert main(["export", str(tmp_path / "w8"), "--to", "compressed-tensors", "--out", str(tmp_path / "w8-ct")]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "w8-ct"), *args]) == 0
    assert "int-quantized: transformers decompressed it to float" in capsys.readouterr().err
