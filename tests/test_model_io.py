"""QuantLinear, swapping into a model, saving and loading, on a tiny random Llama."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from conftest import tiny_llama
from lowbit import QuantSpec, RTNConfig, load_model, load_quantized, quantize_model, read_header, save_quantized
from lowbit.algorithms import rtn_quantize
from lowbit.errors import LowbitError
from lowbit.evaluation import linear_bits_per_weight, model_bytes
from lowbit.models.refs import CHECKPOINT_FILE
from lowbit.modules import QuantLinear


def test_quant_linear_computes_with_the_dequantised_weight():
    torch.manual_seed(0)
    linear = nn.Linear(200, 48, bias=True)
    qw = rtn_quantize(linear.weight, QuantSpec(bits=4, symmetric=False, group_size=64))
    module = QuantLinear(qw, linear.bias)
    x = torch.randn(3, 7, 200)
    torch.testing.assert_close(module(x), F.linear(x, qw.dequantize(), linear.bias))
    assert module(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_quant_linear_holds_only_packed_state():
    linear = nn.Linear(1024, 1024, bias=False)
    module = QuantLinear(rtn_quantize(linear.weight, QuantSpec(bits=4, group_size=128)))
    state = module.state_dict()
    assert set(state) == {"qdata", "scales"}
    stored = sum(t.numel() * t.element_size() for t in state.values())
    assert stored == 1024 * 512 + 1024 * 8 * 2  # 4-bit codes + float16 scales
    assert stored < linear.weight.numel() * 4 / 7


def test_swap_replaces_linears_but_not_embeddings_or_lm_head(tiny_llama_dir):
    loaded = load_model(str(tiny_llama_dir))
    before = model_bytes(loaded.model)
    result = quantize_model(loaded, RTNConfig(spec=QuantSpec(bits=4, group_size=32)), progress=False)
    model = loaded.model
    assert len(result.layers) == 2 * 7
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, QuantLinear)
    assert isinstance(model.model.embed_tokens, nn.Embedding)
    assert all(isinstance(m, QuantLinear) for n, m in model.named_modules() if n.endswith(("q_proj", "down_proj")))
    assert not any(type(m) is nn.Linear for n, m in model.named_modules() if n.startswith("model.layers"))
    assert model_bytes(model) < before
    assert linear_bits_per_weight(model) == pytest.approx(4 + 16 / 32)


def test_skip_patterns_choose_layers(tiny_llama_dir):
    loaded = load_model(str(tiny_llama_dir))
    quantize_model(loaded, RTNConfig(spec=QuantSpec(bits=8, granularity="channel", group_size=None), skip=("lm_head", r"mlp\.")), progress=False)
    names = [n for n, m in loaded.model.named_modules() if isinstance(m, QuantLinear)]
    assert names and all("self_attn" in n for n in names)
    with pytest.raises(LowbitError, match="match them all"):
        quantize_model(load_model(str(tiny_llama_dir)), RTNConfig(skip=(".",)), progress=False)


def test_save_then_load_gives_identical_logits(tiny_llama_dir, tmp_path):
    loaded = load_model(str(tiny_llama_dir))
    quantize_model(loaded, RTNConfig(spec=QuantSpec(bits=3, symmetric=False, group_size=48)), progress=False)
    out = save_quantized(loaded, tmp_path / "q")
    again = load_quantized(out)
    x = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        assert torch.equal(loaded.model(x).logits, again.model(x).logits)
    assert again.model.lm_head.weight is again.model.model.embed_tokens.weight
    header = read_header(out)
    assert header["format_version"] == 2 and header["model_type"] == "llama"
    assert header["source"] == str(tiny_llama_dir.resolve())
    assert header["layers"]["model.layers.0.mlp.down_proj"]["spec"]["bits"] == 3
    assert header["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    with safe_open(out / CHECKPOINT_FILE, framework="pt") as f:
        assert f.get_tensor("model.layers.1.self_attn.q_proj.qdata").dtype == torch.uint8
        assert "lm_head.weight" not in f.keys()
    # the directory alone rebuilds it: config, tokenizer and tensors
    assert {p.name for p in out.iterdir()} >= {CHECKPOINT_FILE, "config.json", "tokenizer.json"}


def test_untied_lm_head_can_be_quantised_and_saved(tmp_path):
    path = tmp_path / "untied"
    tiny_llama(tie=False).save_pretrained(path)
    from conftest import byte_tokenizer

    byte_tokenizer().save_pretrained(path)
    loaded = load_model(str(path))
    quantize_model(loaded, RTNConfig(spec=QuantSpec(bits=8, granularity="channel", group_size=None), skip=()), progress=False)
    assert isinstance(loaded.model.lm_head, QuantLinear)
    again = load_quantized(save_quantized(loaded, tmp_path / "q"))
    x = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        assert torch.equal(loaded.model(x).logits, again.model(x).logits)


def test_head_spec_unties_a_tied_head_and_the_checkpoint_reloads_untied(tiny_llama_dir, tmp_path):
    """W4 blocks with an int8 head: the tied embedding keeps its float table, the head gets
    codes, the result saves and reloads to the same logits, and the head's error is small."""
    float_model = load_model(str(tiny_llama_dir)).model
    loaded = load_model(str(tiny_llama_dir))
    embedding = loaded.model.model.embed_tokens.weight.detach().clone()
    result = quantize_model(loaded, RTNConfig(spec=QuantSpec(bits=4, group_size=32), head=QuantSpec(bits=8, granularity="channel", group_size=None)), progress=False)
    assert isinstance(loaded.model.lm_head, QuantLinear) and loaded.model.lm_head.spec.bits == 8
    assert result.layers[-1].name == "lm_head" and result.layers[-1].info["weight_sqnr_db"] > 35
    assert torch.equal(loaded.model.model.embed_tokens.weight, embedding) and not loaded.model.config.tie_word_embeddings
    assert result.config.to_dict()["head"]["bits"] == 8
    out = save_quantized(loaded, tmp_path / "q")
    again = load_quantized(out)
    x = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        logits = loaded.model(x).logits
        assert torch.equal(logits, again.model(x).logits)
        hidden = loaded.model.model(x).last_hidden_state
        head_error = (loaded.model.lm_head(hidden) - F.linear(hidden, embedding)).norm() / F.linear(hidden, embedding).norm()
    assert head_error < 0.01
    assert isinstance(again.model.lm_head, QuantLinear) and torch.equal(again.model.model.embed_tokens.weight, embedding)
    assert read_header(out)["tied"] == {}
    assert not torch.equal(float_model(x).logits, logits)  # the blocks really are quantised


def test_head_spec_refuses_a_head_the_main_spec_already_takes(tiny_llama_dir):
    with pytest.raises(LowbitError, match="keep it in --skip"):
        quantize_model(load_model(str(tiny_llama_dir)), RTNConfig(skip=(), head=QuantSpec(bits=8)), progress=False)


def test_existing_output_directory_is_refused_and_left_alone(tiny_llama_dir, tmp_path):
    loaded = load_model(str(tiny_llama_dir))
    quantize_model(loaded, RTNConfig(spec=QuantSpec(bits=4, group_size=32)), progress=False)
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(LowbitError, match="already exists"):
        save_quantized(loaded, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_failed_save_leaves_nothing_behind(tiny_llama_dir, tmp_path, monkeypatch):
    loaded = load_model(str(tiny_llama_dir))
    quantize_model(loaded, RTNConfig(spec=QuantSpec(bits=4, group_size=32)), progress=False)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(loaded.tokenizer, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(loaded, tmp_path / "q")
    assert list(tmp_path.iterdir()) == []


def test_truncated_checkpoint_gives_a_clear_error(tiny_llama_dir, tmp_path):
    loaded = load_model(str(tiny_llama_dir))
    quantize_model(loaded, RTNConfig(spec=QuantSpec(bits=4, group_size=32)), progress=False)
    out = save_quantized(loaded, tmp_path / "q")
    file = out / CHECKPOINT_FILE
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(LowbitError, match="truncated or corrupted"):
        load_model(str(out))


def test_truncated_hf_checkpoint_gives_a_clear_error(tiny_llama_dir, tmp_path):
    import shutil

    copy = tmp_path / "hf"
    shutil.copytree(tiny_llama_dir, copy)
    file = copy / "model.safetensors"
    file.write_bytes(file.read_bytes()[:1000])
    with pytest.raises(LowbitError, match="truncated or corrupted"):
        load_model(str(copy))


def test_not_a_gguf_file(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not gguf at all")
    with pytest.raises(LowbitError, match="not a GGUF file"):
        load_model(str(fake))


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(path)
    with pytest.raises(LowbitError, match="architecture 'gpt2' is not supported; lowbit supports"):
        load_model(str(path))


def test_missing_model():
    with pytest.raises(LowbitError, match="not found; give a named model"):
        load_model("no-such-model")


def test_nan_weights_stop_quantisation(tiny_llama_dir):
    loaded = load_model(str(tiny_llama_dir))
    with torch.no_grad():
        loaded.model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(LowbitError, match=r"model.layers.1.mlp.up_proj holds 1 NaN/Inf"):
        quantize_model(loaded, RTNConfig(spec=QuantSpec(bits=4, group_size=32)), progress=False)


def test_header_is_plain_json(tiny_llama_dir, tmp_path):
    loaded = load_model(str(tiny_llama_dir))
    quantize_model(loaded, RTNConfig(spec=QuantSpec(bits=4, group_size=32)), progress=False)
    out = save_quantized(loaded, tmp_path / "q")
    with safe_open(out / CHECKPOINT_FILE, framework="pt") as f:
        header = json.loads(f.metadata()["lowbit"])
    assert header["method"]["name"] == "rtn" and header["method"]["skip"] == ["lm_head"]


def test_saved_checkpoint_has_the_usual_permissions(tiny_llama_dir, tmp_path):
    """Written through a private temporary directory, the result still gets the mode the
    umask gives new files (safetensors' writer makes its file private on its own)."""
    import os

    loaded = load_model(str(tiny_llama_dir))
    quantize_model(loaded, RTNConfig(spec=QuantSpec(bits=4, group_size=32)), progress=False)
    out = save_quantized(loaded, tmp_path / "q")
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == {p.name: 0o666 & ~mask for p in out.iterdir()}


def test_a_version_1_checkpoint_still_loads_and_describes_itself(tiny_llama_dir, tmp_path):
    """Checkpoints written before the method registry (format version 1: a free-form method
    record with its wall time, no calibration field) load to the same logits."""
    from safetensors.torch import load_file, save_file

    from lowbit.info import describe_path

    loaded = load_model(str(tiny_llama_dir))
    quantize_model(loaded, RTNConfig(spec=QuantSpec(bits=4, group_size=32)), progress=False)
    out = save_quantized(loaded, tmp_path / "q")
    file = out / CHECKPOINT_FILE
    with safe_open(file, framework="pt") as f:
        header = json.loads(f.metadata()["lowbit"])
    header["format_version"] = 1
    header["method"] = {"name": "rtn", "spec": header["method"]["spec"], "skip": ["lm_head"], "seconds": 0.42}
    del header["calibration"]
    save_file(load_file(file), file, metadata={"lowbit": json.dumps(header)})
    again = load_quantized(out)
    x = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        assert torch.equal(loaded.model(x).logits, again.model(x).logits)
    text = describe_path(out)
    assert "format version 1" in text and "method: rtn (format version 1 record)" in text and "seconds: 0.42" in text


def test_a_gguf_reader_is_shared_until_its_file_changes(tmp_path):
    """`gguf_reader` parses a file's metadata once per process, and again once the file is
    replaced, so an export never plans from a stale copy of its source's fields."""
    import os

    import numpy as np
    from gguf import GGUFWriter

    from lowbit.models.loading import gguf_reader

    def write(path, arch):
        writer = GGUFWriter(str(path), arch)
        writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    path = tmp_path / "m.gguf"
    write(path, "llama")
    first = gguf_reader(path)
    assert gguf_reader(path) is first and first.fields["general.architecture"].contents() == "llama"
    replacement = tmp_path / "new.gguf"
    write(replacement, "gemma3")
    os.replace(replacement, path)
    again = gguf_reader(path)
    assert again is not first and again.fields["general.architecture"].contents() == "gemma3"


def test_a_tokenizer_is_read_once_until_its_files_change(tmp_path):
    """`read_tokenizer` shares one object per directory (Gemma 3's takes seconds to parse) and
    reads the directory again once a tokenizer file is replaced."""
    from conftest import byte_tokenizer
    from lowbit.models.loading import read_tokenizer

    byte_tokenizer().save_pretrained(tmp_path / "a")
    first = read_tokenizer(tmp_path / "a")
    assert read_tokenizer(tmp_path / "a") is first and first("x").input_ids[0] != first.bos_token_id
    byte_tokenizer(bos=True).save_pretrained(tmp_path / "b")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "b" / name).replace(tmp_path / "a" / name)
    again = read_tokenizer(tmp_path / "a")
    assert again is not first and again("x").input_ids[0] == again.bos_token_id
