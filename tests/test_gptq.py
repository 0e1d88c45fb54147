"""GPTQ on synthetic layers, and the layer-sequential calibration engine on tiny models."""

import logging

import pytest
import torch
from torch import nn

from conftest import TEXT, byte_tokenizer, tiny_model
from lowbit import GPTQConfig, QuantSpec, RTNConfig, load_model, load_quantized, quantize_model, save_quantized
from lowbit.algorithms.gptq import column_rounder, gptq, gptq_reference, output_error
from lowbit.calibration import CalibrationConfig, HessianAccumulator, calibrate_and_quantize, capture_block_inputs
from lowbit.calibration.engine import _block_output
from lowbit.errors import LowbitError
from lowbit.models import architecture_for
from lowbit.models.loading import LoadedModel
from lowbit.modules import QuantLinear
from lowbit.numerics import dequantize, quantize
from lowbit.numerics.quantization import _group_sq_error, decode, encode, find_params


def layer_problem(out=96, inp=256, tokens=2048, seed=0):
    """A weight and inputs with correlated channels and a few large ones, like an LLM's."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(inp) + torch.randn(inp, inp, generator=g) / inp**0.5 + 0.5 * torch.randn(inp, 8, generator=g) @ torch.randn(8, inp, generator=g) / 8**0.5
    x = torch.randn(tokens, inp, generator=g) @ mix
    x[:, :4] *= 8
    w = torch.randn(out, inp, generator=g) * 0.02
    acc = HessianAccumulator(inp)
    for chunk in x.split(300):
        acc.add(chunk)
    return w, x, acc.hessian


def test_hessian_accumulator_streams_2xxt_over_n():
    _, x, h = layer_problem(inp=32, tokens=1000)
    torch.testing.assert_close(h, 2 * x.T @ x / 1000, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("width", [600, 1100])  # two and three column blocks, mirrored
def test_wide_hessians_multiply_only_their_upper_blocks_and_stay_exact(width):
    x = torch.randn(700, width, generator=torch.Generator().manual_seed(width))
    acc = HessianAccumulator(width)
    for chunk in x.split(300):
        acc.add(chunk)
    torch.testing.assert_close(acc.hessian, acc.hessian.T, rtol=0, atol=1e-6)
    torch.testing.assert_close(acc.hessian, 2 * x.T @ x / 700, rtol=1e-4, atol=1e-4)


def test_output_error_is_the_mean_squared_output_difference():
    w, x, h = layer_problem(inp=64, tokens=500)
    w2 = w + 0.01 * torch.randn_like(w)
    direct = ((x @ (w - w2).T) ** 2).sum(1).mean().item()
    assert output_error(w, w2, h) == pytest.approx(direct, rel=1e-3)


SPECS = [QuantSpec(bits=b, symmetric=sym, group_size=g) for b in range(2, 9) for sym in (True, False) for g in (64, 100)]
SPECS += [QuantSpec(bits=4, granularity="channel", group_size=None), QuantSpec(bits=3, symmetric=False, granularity="tensor", group_size=None)]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe().replace(" ", "_"))
def test_gptq_output_error_is_below_rtn(spec):
    w, x, h = layer_problem(seed=spec.bits)
    rtn = output_error(w, dequantize(quantize(w, spec)), h)
    ours = output_error(w, gptq(w, h, spec).dequantized, h)
    assert ours < 0.8 * rtn


GRIDS = [QuantSpec(bits=4, symmetric=False, group_size=64), QuantSpec(bits=3, group_size=64), QuantSpec(bits=4, grid="full", group_size=64),
         QuantSpec(bits=4, symmetric=False, zero_point="float", group_size=32), QuantSpec(bits=8, granularity="channel", group_size=None),
         QuantSpec(bits=4, format="nf4", group_size=64)]


@pytest.mark.parametrize("spec", GRIDS, ids=lambda s: s.describe().replace(" ", "_"))
def test_column_rounder_is_encode_then_decode_bit_for_bit(spec):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 1, generator=g)
    scale = torch.rand(64, 1, generator=g) * 0.3 + 0.05
    scale = -scale if spec.grid == "full" else scale  # the full grid's scale carries the sign of the group's extreme
    zero = None if spec.symmetric else (torch.randint(0, 16, (64, 1), generator=g).float() if spec.zero_point == "int" else -torch.rand(64, 1, generator=g))
    codes = encode(w, scale, zero, spec)
    levels = torch.empty(64)
    q = column_rounder(spec)(w[:, 0], scale[:, 0], None if zero is None else zero[:, 0], levels)
    assert torch.equal(q, decode(codes, scale, zero, spec)[:, 0])
    offset = 0 if spec.format == "nf4" else spec.number_format.qmin
    assert torch.equal((levels - offset).to(torch.uint8), codes[:, 0])


@pytest.mark.parametrize("spec", GRIDS, ids=lambda s: s.describe().replace(" ", "_"))
@pytest.mark.parametrize("order", [(False, False), (True, True), (True, False)], ids=["plain", "static", "dynamic"])
def test_lazy_block_gptq_equals_the_column_by_column_update_rule(spec, order):
    w, _, h = layer_problem(out=48, inp=192)
    fast = gptq(w, h, spec, block_size=32, act_order=order[0], static_groups=order[1])
    plain = gptq_reference(w, h, spec, act_order=order[0], static_groups=order[1])
    # the same arithmetic in another order: float rounding may flip a weight lying on a
    # rounding boundary, nothing more
    assert (fast.quantized.codes != plain.quantized.codes).float().mean() < 2e-3
    assert ((fast.quantized.scale - plain.quantized.scale).abs() > 1e-3 * plain.quantized.scale.abs()).float().mean() < 0.02
    assert output_error(w, fast.dequantized, h) == pytest.approx(output_error(w, plain.dequantized, h), rel=1e-3)
    assert torch.equal(fast.weight.dequantize(), fast.dequantized)


def test_importance_weighted_range_search_minimises_the_weighted_error():
    w, _, h = layer_problem(out=64, inp=256)
    spec = QuantSpec(bits=3, symmetric=False, group_size=64, range="mse")
    importance = torch.diagonal(h)
    # over the same 81 candidates (exhaustive), the weighted search is the best of each group
    weighted = find_params(w, spec, 64, importance, exhaustive=True)
    plain = find_params(w, spec, 64, exhaustive=True)
    err_weighted = _group_sq_error(w, *weighted, spec, 64, importance)
    err_plain = _group_sq_error(w, *plain, spec, 64, importance)
    assert (err_weighted <= err_plain + 1e-12).all() and err_weighted.sum() < 0.97 * err_plain.sum()
    coarse_to_fine = _group_sq_error(w, *find_params(w, spec, 64, importance), spec, 64, importance)
    assert coarse_to_fine.sum() < 0.97 * err_plain.sum()


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_with_the_hessian_weighted_range_search_beats_min_max(bits):
    w, _, h = layer_problem(seed=bits)
    spec = QuantSpec(bits=bits, symmetric=False, group_size=64)
    minmax = output_error(w, gptq(w, h, spec, act_order=True, static_groups=True).dequantized, h)
    searched = output_error(w, gptq(w, h, spec.with_changes(range="mse"), act_order=True, static_groups=True).dequantized, h)
    assert searched < 0.95 * minmax


def test_stacked_linears_sharing_a_hessian_get_each_ones_own_codes():
    w, _, h = layer_problem(out=96, inp=256)
    spec = QuantSpec(bits=4, symmetric=False, group_size=64)
    parts = gptq(w, h, spec, act_order=True, static_groups=True).split_rows([32, 64])
    for part, rows in zip(parts, (w[:32], w[32:])):
        alone = gptq(rows, h, spec, act_order=True, static_groups=True)
        assert torch.equal(part.quantized.codes, alone.quantized.codes)
        assert torch.equal(part.quantized.zero, alone.quantized.zero)
        assert torch.equal(part.weight.dequantize(), alone.weight.dequantize())


@pytest.mark.parametrize("static_groups", [True, False])
def test_act_order_packs_to_what_the_algorithm_produced(static_groups):
    w, _, h = layer_problem()
    spec = QuantSpec(bits=3, symmetric=False, group_size=64)
    result = gptq(w, h, spec, act_order=True, static_groups=static_groups)
    packed = result.weight
    assert torch.equal(packed.dequantize(), result.dequantized)
    assert (packed.g_idx is None) == static_groups  # static groups keep metadata in column order
    if not static_groups:
        assert sorted(torch.bincount(packed.g_idx.long()).tolist()) == [64] * 4
    rtn = output_error(w, dequantize(quantize(w, spec)), h)
    assert output_error(w, result.dequantized, h) < rtn


def test_dead_inputs_get_zero_weight():
    w, x, _ = layer_problem(inp=64, tokens=500)
    x[:, 7] = 0
    h = 2 * x.T @ x / 500
    result = gptq(w, h, QuantSpec(bits=4, group_size=32))
    assert torch.isfinite(result.dequantized).all()
    assert (result.dequantized[:, 7] == 0).all()


def test_singular_hessian_raises_damping_and_says_so(caplog):
    w, x, _ = layer_problem(inp=32, tokens=200)
    x[:, 1] = x[:, 0]  # two identical inputs: H is singular
    h = 2 * x.T @ x / 200
    with caplog.at_level(logging.WARNING):
        result = gptq(w, h, QuantSpec(bits=4, group_size=16), damp=0.0)
    assert result.damp > 0
    assert "not positive definite" in caplog.text


FAMILIES = ["llama", "qwen2", "mistral", "gemma3", "opt"]


@pytest.mark.parametrize("family", FAMILIES)
def test_captured_block_inputs_equal_what_the_full_model_feeds(family):
    model = tiny_model(family)
    arch = architecture_for(model.config.model_type)
    blocks = model.get_submodule(arch.blocks)
    seen = {}
    hooks = [b.register_forward_pre_hook(lambda m, args, kw, i=i: seen.__setitem__(i, (args[0] if args else kw["hidden_states"]).clone()), with_kwargs=True) for i, b in enumerate(blocks)]
    samples = torch.randint(0, 256, (4, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = {}
        for j, sample in enumerate(samples.split(2)):
            model(input_ids=sample, use_cache=False)
            full[j] = dict(seen)
    for h in hooks:
        h.remove()
    batches = capture_block_inputs(model, arch, samples, batch_size=2)
    assert len(batches) == 2
    with torch.no_grad():
        for j, batch in enumerate(batches):
            hidden = batch.hidden
            for i, block in enumerate(blocks):
                torch.testing.assert_close(hidden, full[j][i], rtol=1e-5, atol=1e-6)
                hidden = _block_output(block(hidden, **batch.block_kwargs[i]))
    # the model is left as it was
    assert all(type(b).__name__.endswith("Layer") for b in blocks)


class RecordingGPTQ:
    """GPTQ that also keeps each layer's Hessian, to compare with the full model's inputs."""

    name = "recording"

    def __init__(self, spec):
        self.inner, self.hessians, self.block = GPTQConfig(spec=spec), {}, 0

    def statistics(self, in_features):
        return self.inner.statistics(in_features)

    def quantize_group(self, block, group, linears, selected, stats, arch, prefix=""):
        for name in selected:
            self.hessians[f"model.layers.{self.block}.{name}"] = stats.hessian.clone()
        if group.role == "mlp_out":
            self.block += 1
        return self.inner.quantize_group(block, group, linears, selected, stats, arch, prefix)


def loaded_tiny(family, tokenizer=None):
    model = tiny_model(family)
    return LoadedModel(model=model, tokenizer=tokenizer or byte_tokenizer(), source="tiny", arch=architecture_for(model.config.model_type))


def test_first_block_statistics_match_the_float_models_inputs():
    loaded = loaded_tiny("llama")
    samples = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(1))
    inputs = []
    hook = loaded.model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda m, a: inputs.append(a[0].reshape(-1, 64)))
    with torch.no_grad():
        loaded.model(input_ids=samples, use_cache=False)
    hook.remove()
    x = torch.cat(inputs)
    method = RecordingGPTQ(QuantSpec(bits=4, group_size=32))
    calibrate_and_quantize(loaded, method, samples, batch_size=4, progress=False)
    torch.testing.assert_close(method.hessians["model.layers.0.self_attn.q_proj"], 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(method.hessians["model.layers.0.self_attn.v_proj"], method.hessians["model.layers.0.self_attn.q_proj"])


@pytest.mark.parametrize("family", FAMILIES)
def test_gptq_beats_rtn_on_tiny_models(family, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    calibration = CalibrationConfig(text_file=str(text), samples=16, ctx=64, batch_size=4)
    spec = QuantSpec(bits=3, symmetric=False, group_size=32)
    ours, rtn = loaded_tiny(family), loaded_tiny(family)
    reference = tiny_model(family)
    result = quantize_model(ours, GPTQConfig(spec=spec), calibration=calibration, progress=False)
    quantize_model(rtn, RTNConfig(spec=spec), progress=False)
    assert all(isinstance(ours.model.get_submodule(r.name), QuantLinear) for r in result.layers)
    assert len(result.layers) == 3 * 7 if family != "opt" else 3 * 6
    assert sum(r.info["output_error"] for r in result.layers) < 0.8 * sum(r.info["baseline_output_error"] for r in result.layers)
    # on held-out tokens the whole model's logits move less than RTN's
    held_out = torch.tensor([byte_tokenizer()(TEXT[-400:]).input_ids[:96]])
    with torch.no_grad():
        ref = reference(held_out).logits
        err_ours = (ours.model(held_out).logits - ref).square().mean()
        err_rtn = (rtn.model(held_out).logits - ref).square().mean()
    assert err_ours < err_rtn


def test_gptq_checkpoint_with_g_idx_round_trips(tiny_llama_dir, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    loaded = load_model(str(tiny_llama_dir))
    quantize_model(loaded, GPTQConfig(spec=QuantSpec(bits=4, group_size=32), act_order="dynamic"),
                   calibration=CalibrationConfig(text_file=str(text), samples=8, ctx=64), progress=False)
    assert loaded.model.model.layers[0].mlp.down_proj.g_idx is not None
    again = load_quantized(save_quantized(loaded, tmp_path / "q"))
    x = torch.randint(0, 256, (1, 30))
    with torch.no_grad():
        assert torch.equal(loaded.model(x).logits, again.model(x).logits)
    header = again.header
    assert header["method"]["name"] == "gptq" and header["method"]["act_order"] == "dynamic"
    assert header["calibration"]["samples"] == 8


def test_gptq_refuses_layers_outside_the_blocks(tiny_llama_dir):
    loaded = load_model(str(tiny_llama_dir))
    with pytest.raises(LowbitError, match="lm_head are not among them"):
        quantize_model(loaded, GPTQConfig(skip=()), progress=False)


def test_skipped_block_linears_stay_float(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    loaded = loaded_tiny("llama")
    quantize_model(loaded, GPTQConfig(spec=QuantSpec(bits=4, group_size=32), skip=("lm_head", "down_proj")),
                   calibration=CalibrationConfig(text_file=str(text), samples=4, ctx=32), progress=False)
    assert type(loaded.model.model.layers[0].mlp.down_proj) is nn.Linear
    assert isinstance(loaded.model.model.layers[0].mlp.up_proj, QuantLinear)


@pytest.mark.parametrize("samples, skip, warned", [(4, (), True), (8, (), False), (4, ("down_proj",), False)])
def test_fewer_calibration_tokens_than_a_linears_inputs_are_named(tmp_path, caplog, samples, skip, warned):
    """4 x 32 tokens against down_proj's 160 inputs: H = 2XXᵀ is rank-deficient, said before
    any work; 8 x 32 (or down_proj skipped) is not."""
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    with caplog.at_level(logging.WARNING):
        quantize_model(loaded_tiny("llama"), GPTQConfig(spec=QuantSpec(bits=4, group_size=32), skip=("lm_head", *skip)),
                       calibration=CalibrationConfig(text_file=str(text), samples=samples, ctx=32), progress=False)
    message = "128 calibration tokens are fewer than mlp.down_proj's 160 inputs"
    assert (message in caplog.text) == warned, caplog.text
    if warned:
        assert "--calib-samples 5 at --calib-ctx 32" in caplog.text


def test_true_sequential_sees_the_quantised_earlier_groups(tmp_path):
    samples = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(3))
    hessians = {}
    for true_sequential in (False, True):
        lm = loaded_tiny("llama")
        method = RecordingGPTQ(QuantSpec(bits=3, group_size=32))
        calibrate_and_quantize(lm, method, samples, batch_size=2, true_sequential=true_sequential, progress=False)
        hessians[true_sequential] = method.hessians
    q, o = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj"
    torch.testing.assert_close(hessians[True][q], hessians[False][q])  # the first group's input is the same
    assert not torch.allclose(hessians[True][o], hessians[False][o])  # o_proj's input now carries q/k/v's error


def test_the_engine_accounts_for_its_time_by_phase():
    samples = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(4))
    result = calibrate_and_quantize(loaded_tiny("llama"), GPTQConfig(spec=QuantSpec(bits=4, group_size=32)), samples, batch_size=2, progress=False)
    phases = result.phases
    assert set(phases) == {"capture", "statistics", "accumulate", "quantize", "refine", "outputs"}
    assert phases["statistics"] > 0 and phases["quantize"] > 0 and phases["outputs"] > 0 and phases["refine"] == 0
    assert phases["accumulate"] <= phases["statistics"]  # accumulation happens inside the statistics passes
    assert sum(v for k, v in phases.items() if k != "accumulate") <= result.seconds
