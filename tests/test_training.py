"""Codebooks, double quantisation, the STE, LoRA on a quantised base, QAT and BitNet layers."""

import math

import pytest
import torch
from torch import nn

from conftest import TEXT, byte_tokenizer, tiny_llama
from lowbit import NF4Config, QuantSpec, load_model, load_quantized, quantize_model, save_quantized
from lowbit.modules import QuantLinear, storage_bytes
from lowbit.numerics import CODEBOOKS, dequantize, quantize
from lowbit.numerics.codebooks import minifloat_levels, normal_float_levels
from lowbit.numerics.double_quant import double_quantize
from lowbit.packed import QuantizedWeight
from lowbit.training.bitnet import BitLinear, quantize_activations_8bit, ternarize, to_bitlinear
from lowbit.training.lora import LoRAConfig, LoRALinear, add_lora, load_adapters, merge_lora, save_adapters
from lowbit.training.qat import FakeQuantLinear, convert_qat, fake_quantize_ste, prepare_qat
from lowbit.training.trainer import TrainConfig, perplexity, train

# bitsandbytes' NF4 table (QLoRA), as published in its kernels
BNB_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
           -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
           0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
           0.7229568362236023, 1.0]


def test_nf4_follows_the_quantile_construction():
    levels = CODEBOOKS["nf4"].levels
    assert len(levels) == 16 and 0.0 in levels
    assert list(levels) == sorted(levels) and levels[0] == -1.0 and levels[-1] == 1.0
    assert max(abs(a - b) for a, b in zip(levels, BNB_NF4)) < 1e-6
    # each side is the normal quantile function at evenly spaced probabilities (mirror construction)
    p_max = 1 - 0.5 * (1 / 32 + 1 / 30)
    positive = torch.special.ndtri(torch.linspace(p_max, 0.5, 9, dtype=torch.float64)[:-1])
    negative = torch.special.ndtri(torch.linspace(p_max, 0.5, 8, dtype=torch.float64)[:-1])
    torch.testing.assert_close(torch.tensor(levels[8:][::-1], dtype=torch.float64), positive / positive.max())
    torch.testing.assert_close(torch.tensor([-v for v in levels[:7]], dtype=torch.float64), negative / positive.max())
    assert normal_float_levels(3)[3] == 0.0 and len(normal_float_levels(3)) == 8


def test_nf4_codes_carry_more_information_on_gaussian_data():
    """Quantile levels spread Gaussian values over the codes almost evenly (entropy near 4
    bits at the usual block of 64), where uniform integer levels waste codes on the tails."""
    x = torch.randn(512, 4096, generator=torch.Generator().manual_seed(0))
    entropy = {}
    for name in ("nf4", "int"):
        q = quantize(x, QuantSpec(bits=4, format=name, group_size=64, scale_dtype="float32"))
        p = torch.bincount(q.codes.flatten().long(), minlength=16).float() / q.codes.numel()
        entropy[name] = -(p[p > 0] * p[p > 0].log2()).sum().item()
    assert entropy["nf4"] > 3.85 and entropy["int"] < 3.6


def test_float_codebooks():
    assert [round(v * 12, 6) for v in CODEBOOKS["fp4"].levels if v >= 0] == [0, 0.0625, 2, 3, 4, 6, 8, 12]
    assert [round(v * 6, 6) for v in CODEBOOKS["fp4-e2m1"].levels if v >= 0] == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    e4m3 = CODEBOOKS["fp8-e4m3"].levels
    assert len(e4m3) == 253 and min(v for v in e4m3 if v > 0) * 448 == pytest.approx(2**-9)
    e5m2 = CODEBOOKS["fp8-e5m2"].levels
    assert len(e5m2) == 247 and min(v for v in e5m2 if v > 0) * 57344 == pytest.approx(2**-16)
    assert minifloat_levels(2, 1, bias=1) == list(CODEBOOKS["fp4-e2m1"].levels)


def test_nf4_beats_fp4_and_int4_on_gaussian_weights():
    w = torch.randn(256, 1024, generator=torch.Generator().manual_seed(1)) * 0.02
    err = {name: (w - dequantize(quantize(w, QuantSpec(bits=4, format=name, group_size=64, scale_dtype="float32")))).square().mean().item()
           for name in ("nf4", "fp4", "int")}
    assert err["nf4"] < err["int"] < err["fp4"]


def test_double_quantisation_round_trip_and_bits():
    w = torch.randn(512, 4096, generator=torch.Generator().manual_seed(2)) * 0.02
    plain = QuantizedWeight.from_quantized(quantize(w, QuantSpec(bits=4, format="nf4", group_size=64, scale_dtype="float32")))
    dq_q = quantize(w, QuantSpec(bits=4, format="nf4", group_size=64, double_quant=True))
    dq = QuantizedWeight.from_quantized(dq_q)
    assert plain.bits_per_weight == pytest.approx(4.5)
    expected = 4 + (8 + 32 / 256) / 64 + 32 / w.numel()
    assert dq.bits_per_weight == pytest.approx(expected)
    assert plain.bits_per_weight - dq.bits_per_weight == pytest.approx(0.373, abs=0.001)  # report §7.5: ~0.37
    # the stored form reproduces exactly the scales the codes were computed with
    assert torch.equal(dq.dequantize(), dequantize(dq_q))
    rebuilt = QuantizedWeight.from_tensors(dq.tensors(), dq.shape, dq.group_size, dq.spec)
    assert torch.equal(rebuilt.dequantize(), dq.dequantize())
    module = QuantLinear(dq)
    assert 8 * storage_bytes(module) / w.numel() == pytest.approx(expected)
    # and costs almost nothing in accuracy
    err_plain = (w - plain.dequantize()).square().mean()
    err_dq = (w - dq.dequantize()).square().mean()
    assert err_dq < 1.01 * err_plain
    scales = plain.scales.float()
    assert ((double_quantize(scales).dequantize() - scales).abs() / scales).max() < 0.02


def test_ste_gradient_is_identity_inside_and_zero_outside():
    w = torch.tensor([-3.0, -0.74, -0.2, 0.0, 0.33, 0.9, 2.5], requires_grad=True)
    step = torch.tensor(0.25)
    fmt = QuantSpec(bits=3, granularity="tensor", group_size=None).number_format  # q in [-4, 3]
    y = fake_quantize_ste(w, step, fmt)
    assert torch.allclose(y, torch.tensor([-1.0, -0.75, -0.25, 0.0, 0.25, 0.75, 0.75]))
    y.backward(torch.ones_like(y))
    # inside [-4 S, 3 S] = [-1, 0.75] the gradient passes unchanged; beyond it, none
    assert w.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]


def test_lsq_step_gets_the_lsq_gradient():
    linear = nn.Linear(8, 2, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[0.1, -0.2, 0.3, -0.4, 0.05, 0.6, -0.7, 0.8]] * 2))
    layer = FakeQuantLinear(linear, QuantSpec(bits=4, granularity="channel", group_size=None), lsq=True)
    layer.quantized_weight().sum().backward()
    s = layer.step.detach()
    v = linear.weight[0] / s[0, 0]
    expected = (torch.clamp(torch.round(v), -8, 7) - torch.where((v >= -8) & (v <= 7), v, torch.zeros_like(v))).sum() * layer.grad_factor
    assert layer.step.grad[0, 0].item() == pytest.approx(expected.item(), rel=1e-5)


def test_qat_converts_to_the_packed_model_it_trained():
    model = tiny_llama(seed=3)
    prepare_qat(model, QuantSpec(bits=4, group_size=32), lsq=True)
    x = torch.randint(0, 256, (1, 40))
    with torch.no_grad():
        before = model(x).logits
    convert_qat(model)
    assert not any(isinstance(m, FakeQuantLinear) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, before, rtol=1e-4, atol=1e-4)


def test_lora_starts_as_identity_and_a_training_step_lowers_the_loss():
    torch.manual_seed(0)
    model = tiny_llama(seed=4)
    tokens = torch.tensor(byte_tokenizer()(TEXT, add_special_tokens=False).input_ids)
    x = tokens[None, :64]
    with torch.no_grad():
        before = model(x).logits
    names = add_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.0))
    assert len(names) == 14 and all(isinstance(model.get_submodule(n), LoRALinear) for n in names)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, before)
    frozen = [p for n, p in model.named_parameters() if "lora_" not in n]
    assert not any(p.requires_grad for p in frozen)
    window = tokens[None, :65]
    loss0 = torch.nn.functional.cross_entropy(model(window[:, :-1]).logits[0], window[0, 1:]).item()
    result = train(model, tokens, TrainConfig(steps=30, lr=3e-3, batch_size=4, ctx=64), progress=False)
    loss1 = torch.nn.functional.cross_entropy(model(window[:, :-1]).logits[0], window[0, 1:]).item()
    assert loss1 < loss0 and result.losses[-1] < result.losses[0]
    assert result.trainable_parameters == sum(m.lora_A.numel() + m.lora_B.numel() for m in model.modules() if isinstance(m, LoRALinear))


def test_qlora_adapters_save_load_and_merge(tiny_llama_dir, tmp_path):
    loaded = load_model(str(tiny_llama_dir))
    quantize_model(loaded, NF4Config(spec=QuantSpec(bits=4, format="nf4", group_size=32, double_quant=True, scale_dtype="float32")), progress=False)
    config = LoRAConfig(rank=4, alpha=8, dropout=0.0)
    add_lora(loaded.model, config)
    tokens = torch.tensor(byte_tokenizer()(TEXT, add_special_tokens=False).input_ids)
    train(loaded.model, tokens, TrainConfig(steps=5, lr=1e-2, batch_size=2, ctx=32), progress=False)
    x = tokens[None, :50]
    with torch.no_grad():
        tuned = loaded.model(x).logits
    save_adapters(loaded.model, tmp_path / "adapters", config)
    assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == ["adapter_config.json", "adapters.safetensors"]
    # a fresh NF4 base plus the saved adapters computes the same
    fresh = load_model(str(tiny_llama_dir))
    quantize_model(fresh, NF4Config(spec=QuantSpec(bits=4, format="nf4", group_size=32, double_quant=True, scale_dtype="float32")), progress=False)
    load_adapters(fresh.model, tmp_path / "adapters")
    with torch.no_grad():
        torch.testing.assert_close(fresh.model(x).logits, tuned)
    assert merge_lora(fresh.model) == 14
    with torch.no_grad():
        torch.testing.assert_close(fresh.model(x).logits, tuned, rtol=1e-4, atol=1e-4)


def test_nf4_checkpoint_round_trips(tiny_llama_dir, tmp_path):
    loaded = load_model(str(tiny_llama_dir))
    quantize_model(loaded, NF4Config(spec=QuantSpec(bits=4, format="nf4", group_size=32, double_quant=True, scale_dtype="float32")), progress=False)
    again = load_quantized(save_quantized(loaded, tmp_path / "q"))
    x = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        assert torch.equal(loaded.model(x).logits, again.model(x).logits)


def test_ternary_quantisation_and_bitlinear():
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(5))
    q, gamma = ternarize(w)
    assert set(q.unique().tolist()) <= {-1.0, 0.0, 1.0} and gamma == pytest.approx(w.abs().mean().item())
    x = torch.randn(3, 64)
    xq = quantize_activations_8bit(x)
    assert ((x - xq).abs() <= x.abs().amax(-1, keepdim=True) / 127 / 2 + 1e-6).all()
    layer = BitLinear(64, 16, bias=False)
    out = layer(x.requires_grad_())
    out.sum().backward()
    assert layer.weight.grad is not None and x.grad is not None  # STE passes gradients through both roundings
    model = tiny_llama(seed=6)
    names = to_bitlinear(model)
    assert len(names) == 14 and isinstance(model.model.layers[0].mlp.up_proj, BitLinear)


def test_perplexity_helper_matches_definition():
    model = tiny_llama(seed=7)
    windows = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        nll = sum(torch.nn.functional.cross_entropy(model(w[None, :-1]).logits[0], w[1:], reduction="sum").item() for w in windows)
    assert perplexity(model, windows) == pytest.approx(math.exp(nll / 30), rel=1e-5)
