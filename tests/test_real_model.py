"""Real-model checks on the packaged SmolLM2-135M (converted from its GGUF once, then cached)."""

import pytest
import torch

from conftest import require_smollm2
from lowbit import QuantSpec, RTNConfig, evaluate, load_model, load_quantized, quantize_model, save_quantized
from lowbit.data import eval_windows, tokenize_split
from lowbit.methods import DEFAULT_SKIP
from lowbit.modules import QuantLinear, linear_layers
from lowbit.numerics import dequantize, quantize

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smollm2():
    require_smollm2()
    return load_model("smollm2")


@pytest.fixture(scope="module")
def windows(smollm2):
    return eval_windows(tokenize_split(smollm2.tokenizer, "pydoc"), ctx=256, n_windows=4)


@pytest.fixture(scope="module")
def scores(smollm2, windows):
    models = {"float": smollm2.model}
    for label, spec in {
        "w8": QuantSpec(bits=8, granularity="channel", group_size=None),
        "w4g128": QuantSpec(bits=4, group_size=128),
    }.items():
        loaded = load_model("smollm2")
        quantize_model(loaded, RTNConfig(spec=spec), progress=False)
        models[label] = loaded
    results = evaluate({k: (v if k == "float" else v.model) for k, v in models.items()}, windows, reference=smollm2.model, progress=False)
    return {r.label: r for r in results}, models


def test_full_precision_perplexity_is_sane(scores):
    by, _ = scores
    assert 5.0 < by["float"].perplexity < 25.0
    assert by["float"].tokens == 4 * 255


def test_eight_bit_per_channel_is_within_one_percent(scores):
    by, _ = scores
    assert abs(by["w8"].perplexity / by["float"].perplexity - 1) < 0.01
    assert by["w8"].top1_percent > 95


def test_four_bit_g128_is_worse_than_eight_bit(scores):
    by, _ = scores
    assert by["w4g128"].perplexity > by["w8"].perplexity
    assert by["w4g128"].kld > 5 * by["w8"].kld
    assert by["w4g128"].bits_per_weight == pytest.approx(4 + 16 / 128, rel=0.01)
    assert by["w4g128"].model_bytes < 0.35 * by["float"].model_bytes


def test_short_last_group_on_576_wide_rows(scores):
    _, models = scores
    q_proj = models["w4g128"].model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, QuantLinear)
    assert q_proj.scales.shape == (576, 5)  # 576 = 4 * 128 + 64


def test_saved_then_loaded_logits_are_identical(scores, windows, tmp_path):
    _, models = scores
    loaded = models["w4g128"]
    again = load_quantized(save_quantized(loaded, tmp_path / "w4g128"))
    with torch.no_grad():
        assert torch.equal(loaded.model(windows[:1]).logits, again.model(windows[:1]).logits)


def test_q4_1_grid_requantises_losslessly_with_float_offsets(smollm2):
    """SmolLM2's linears come from a Q4_1 GGUF: groups of 32 with a float scale and minimum.
    Quantising them the same way returns every weight; an integer zero-point (Eq. 3.3) does not."""
    float_spec = QuantSpec(bits=4, symmetric=False, zero_point="float", group_size=32)
    int_spec = QuantSpec(bits=4, symmetric=False, zero_point="int", group_size=32)
    worst_float = worst_int = 0.0
    for _, linear in linear_layers(smollm2.model, DEFAULT_SKIP)[:21]:  # the first three blocks
        w = linear.weight.detach()
        scale = w.abs().max().item()
        worst_float = max(worst_float, (dequantize(quantize(w, float_spec)) - w).abs().max().item() / scale)
        worst_int = max(worst_int, (dequantize(quantize(w, int_spec)) - w).abs().max().item() / scale)
    assert worst_float < 1e-5
    assert worst_int > 1e-3


def test_a_gguf_that_dequantises_to_nan_is_refused_and_not_cached(tmp_path, monkeypatch):
    """A GGUF whose first block scale is NaN converts to NaN weights: the conversion is
    refused with the tensor's name and nothing is left in the cache."""
    import numpy as np
    from gguf import GGUFReader

    from lowbit.errors import LowbitError
    from lowbit.models.loading import convert_gguf
    from lowbit.models.registry import NAMED_MODELS

    require_smollm2()
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path / "cache"))
    copy = tmp_path / "broken.gguf"
    copy.write_bytes(NAMED_MODELS["smollm2"].locate().read_bytes())
    tensor = next(t for t in GGUFReader(str(copy)).tensors if t.name == "blk.0.attn_q.weight")
    with copy.open("r+b") as f:  # Q4_1 and Q8_0 blocks both start with an fp16 scale d
        f.seek(int(tensor.data_offset))
        f.write(np.array([np.nan], dtype=np.float16).tobytes())
    with pytest.raises(LowbitError, match=r"dequantises to NaN or Inf in model.layers.0.self_attn.q_proj.weight"):
        convert_gguf(copy)
    converted = tmp_path / "cache" / "converted"
    assert not converted.exists() or list(converted.iterdir()) == []


def test_a_conversion_another_process_finished_first_is_used(tmp_path, monkeypatch, caplog):
    """Two runs that start at once on a fresh cache both convert; the one that renames its
    copy second finds the target there (the rename fails) and uses the other's copy."""
    import logging
    import os

    from lowbit.models import loading
    from lowbit.models.registry import NAMED_MODELS

    require_smollm2()
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path / "cache"))
    path = NAMED_MODELS["smollm2"].locate()

    def other_process_first(source, target):
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")
        ours = tmp_path / "ours"
        (ours / "x").mkdir(parents=True)
        os.rename(ours, target)  # what publishing our copy meets: a directory that is not empty

    monkeypatch.setattr(loading, "_convert_gguf_into", other_process_first)
    with caplog.at_level(logging.WARNING):
        assert loading.convert_gguf(path) == loading.gguf_cache_path(path)
    assert "another process finished converting" in caplog.text
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path / "cache2"))  # a failure with no finished copy is not hidden
    monkeypatch.setattr(loading, "_convert_gguf_into", lambda source, target: os.rename(tmp_path / "missing", target))
    with pytest.raises(FileNotFoundError):
        loading.convert_gguf(path)
