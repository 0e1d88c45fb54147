"""Outlier analysis, SmoothQuant, AWQ, W8A8 and LLM.int8() on synthetic layers and tiny models."""

import pytest
import torch
from torch import nn

from conftest import TEXT, byte_tokenizer, tiny_model
from lowbit import AWQConfig, LLMInt8Config, QuantSpec, RTNConfig, SmoothQuantConfig, W8A8Config, load_quantized, quantize_model, save_quantized
from lowbit.algorithms.awq import awq_scales, clip_quantize, gram_sq_error
from lowbit.algorithms.smoothquant import search_alpha, smoothing_scales, w8a8_output_error
from lowbit.analysis.outliers import analyse_outliers, summary_table, write_plots
from lowbit.models import ARCHITECTURES, architecture_for
from lowbit.models.loading import LoadedModel
from lowbit.modules import LLMInt8Linear, QuantLinear, W8A8Linear
from lowbit.modules.scaling import fold_input_scale, source_can_fold
from lowbit.numerics import dequantize, fake_quantize, quantize
from lowbit.calibration import CalibrationConfig

FAMILIES = ["llama", "qwen2", "mistral", "gemma3", "opt"]


def loaded(family, seed=0):
    model = tiny_model(family, seed=seed)
    return LoadedModel(model=model, tokenizer=byte_tokenizer(), source="tiny", arch=architecture_for(model.config.model_type))


def tokens(n=96):
    return torch.tensor([byte_tokenizer()(TEXT[-400:]).input_ids[:n]])


def test_every_table_row_names_real_modules():
    by_type = {"llama": "llama", "qwen2": "qwen2", "mistral": "mistral", "gemma3_text": "gemma3", "opt": "opt"}
    for arch in ARCHITECTURES:
        for model_type in arch.model_types:
            model = tiny_model(by_type[model_type])
            block = model.get_submodule(arch.blocks)[0]
            for group in arch.groups:
                linears = [block.get_submodule(n) for n in group.linears]
                assert all(isinstance(m, nn.Linear) for m in linears)
                assert len({m.in_features for m in linears}) == 1
                source = block.get_submodule(group.source)
                assert group.source_kind in ("norm", "linear")
                if group.source_kind == "linear":
                    assert isinstance(source, nn.Linear)
                else:
                    assert source.weight.shape == (linears[0].in_features,)


@pytest.mark.parametrize("family", FAMILIES)
def test_folding_a_scale_leaves_the_float_model_unchanged(family):
    lm = loaded(family)
    x = tokens()
    with torch.no_grad():
        before = lm.model(x).logits
        g = torch.Generator().manual_seed(0)
        folded = 0
        for block in lm.model.get_submodule(lm.arch.blocks):
            for group in lm.arch.groups:
                linears = [block.get_submodule(n) for n in group.linears]
                if not source_can_fold(block, group.source, group.source_kind, linears[0].in_features):
                    continue
                s = torch.rand(linears[0].in_features, generator=g) * 4 + 0.25
                fold_input_scale(block, group.source, group.source_kind, linears, s, lm.arch.norm_offset)
                folded += 1
        after = lm.model(x).logits
    assert folded >= 3 * 3  # norms before attention and MLP and up -> down in every block
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_grouped_query_attention_skips_v_to_o():
    lm = loaded("llama")  # 4 heads, 2 kv heads: v_proj has half o_proj's inputs
    block = lm.model.model.layers[0]
    assert not source_can_fold(block, "self_attn.v_proj", "linear", block.self_attn.o_proj.in_features)


def outlier_group(seed=0, tokens=512, inp=128):
    """A group's inputs with a few channels 30x larger than the rest, as in report §6."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, inp, generator=g)
    x[:, [3, 40, 99]] *= 30
    weights = [torch.randn(64, inp, generator=g) * 0.05, torch.randn(96, inp, generator=g) * 0.05]
    return x, weights


def test_smoothing_scales_follow_the_formula():
    x, weights = outlier_group()
    act = x.abs().amax(0)
    s = smoothing_scales(act, weights, 0.5)
    w_max = torch.cat(weights).abs().amax(0)
    torch.testing.assert_close(s, act.sqrt() / w_max.sqrt())


def test_smoothquant_beats_plain_w8a8_with_static_activations():
    x, weights = outlier_group()
    act = x.abs().amax(0)
    ones = torch.ones(x.shape[1])
    plain = w8a8_output_error(x, weights, ones, "tensor", act)
    alpha, errors = search_alpha(x, act, weights, "tensor")
    assert errors[alpha] < 0.5 * plain
    assert errors[0.5] < plain
    assert errors[0.0] < plain * 1.5  # alpha = 0 only moves weight magnitudes


def test_awq_beats_rtn_on_salient_channels():
    x, weights = outlier_group(seed=1)
    spec = QuantSpec(bits=3, group_size=32)
    w = torch.cat(weights)
    reference = x @ w.T
    rtn = ((x @ fake_quantize(w, spec).T) - reference).square().sum(1).mean().item()
    s, alpha, errors = awq_scales(x, x.abs().mean(0), weights, spec)
    assert errors[0.0] == pytest.approx(rtn, rel=1e-4)  # alpha 0 is RTN
    assert alpha > 0 and errors[alpha] < 0.8 * rtn


def test_gram_error_equals_the_direct_output_error():
    x, weights = outlier_group(seed=3)
    w = weights[0]
    approx = fake_quantize(w, QuantSpec(bits=3, group_size=32))
    direct = ((x @ (w - approx).T)).square().sum(1).mean().item()
    assert gram_sq_error(x.T @ x, x.shape[0], w - approx) == pytest.approx(direct, rel=1e-4)


def test_awq_clip_search_lowers_output_error():
    x, weights = outlier_group(seed=2)
    w = weights[1]
    spec = QuantSpec(bits=3, symmetric=False, group_size=32)
    plain = ((x @ (w - dequantize(quantize(w, spec))).T)).square().sum(1).mean()
    clipped = ((x @ (w - dequantize(clip_quantize(w, x, spec))).T)).square().sum(1).mean()
    assert clipped < plain


@pytest.mark.parametrize("family", FAMILIES)
def test_awq_beats_rtn_on_tiny_models(family, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    calibration = CalibrationConfig(text_file=str(text), samples=8, ctx=64)
    spec = QuantSpec(bits=3, group_size=32)
    ours, rtn, reference = loaded(family), loaded(family), tiny_model(family)
    result = quantize_model(ours, AWQConfig(spec=spec), calibration=calibration, progress=False)
    quantize_model(rtn, RTNConfig(spec=spec), progress=False)
    assert sum(r.info["output_error"] for r in result.layers) < sum(r.info["baseline_output_error"] for r in result.layers)
    x = tokens()
    with torch.no_grad():
        ref = reference(x).logits
        assert (ours.model(x).logits - ref).square().mean() < (rtn.model(x).logits - ref).square().mean()


def test_w8a8_methods_swap_in_integer_modules_and_round_trip(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    calibration = CalibrationConfig(text_file=str(text), samples=8, ctx=64)
    x = tokens()
    for config, kind in [
        (W8A8Config(act_granularity="tensor"), W8A8Linear),
        (SmoothQuantConfig(act_granularity="token", alpha=0.8), W8A8Linear),
        (LLMInt8Config(threshold=1.0), LLMInt8Linear),
    ]:
        method = config.name
        lm = loaded("llama")
        quantize_model(lm, config, calibration=calibration, progress=False)
        assert all(isinstance(m, kind) for n, m in lm.model.named_modules() if n.endswith(("q_proj", "down_proj")))
        again = load_quantized(save_quantized(lm, tmp_path / method))
        with torch.no_grad():
            assert torch.equal(lm.model(x).logits, again.model(x).logits)
        assert again.header["method"]["name"] == method


def test_smoothquant_leaves_w8a8_inputs_flatter(tmp_path):
    """After smoothing, the activations the int8 layers see have a smaller max/mean ratio."""
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    calibration = CalibrationConfig(text_file=str(text), samples=8, ctx=64)
    lm = loaded("llama")
    with torch.no_grad():  # plant an outlier channel in the residual stream's norm
        for block in lm.model.model.layers:
            block.input_layernorm.weight[7] = 40.0
    samples = calibration.tokens(lm.tokenizer)
    before = analyse_outliers(lm, samples)
    quantize_model(lm, SmoothQuantConfig(act_granularity="tensor", alpha=0.5), calibration=calibration, progress=False)
    captured = []
    hook = lm.model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    with torch.no_grad():
        lm.model(samples[:2])
    hook.remove()
    first = next(r for r in before.inputs if r.block == 0 and r.role == "attn_in")
    assert first.top_channels[0] == 7
    before_channels = before.hidden_absmax[0]  # block 0's attention input, per channel
    after_channels = captured[0].abs().reshape(-1, 64).amax(0)
    ratio = lambda c: (c.max() / c.median()).item()  # noqa: E731
    assert ratio(after_channels) < 0.5 * ratio(before_channels)


def test_outlier_analysis_finds_planted_channels(tmp_path):
    lm = loaded("llama")
    with torch.no_grad():
        for block in lm.model.model.layers:
            block.input_layernorm.weight[11] = 60.0
            block.post_attention_layernorm.weight[11] = 60.0
    samples = CalibrationConfig(text_file=None, corpus="pydoc", samples=4, ctx=64).tokens(lm.tokenizer)
    report = analyse_outliers(lm, samples, threshold=6.0)
    assert [e["channel"] for e in report.emergent] == [11]
    assert report.emergent[0]["layer_share"] == 1.0
    attn = [r for r in report.inputs if r.role == "attn_in"]
    assert all(r.top_channels[0] == 11 and r.channels_over >= 1 for r in attn)
    assert all(r.kurtosis_max > 3 for r in report.inputs)
    text = summary_table(report)
    assert "emergent features" in text and "channel 11" in text
    paths = write_plots(report, tmp_path / "plots")
    assert [p.name for p in paths] == ["max_magnitude_per_layer.png", "channel_layer_heatmap.png"]
    assert all(p.stat().st_size > 5000 and p.read_bytes()[:4] == b"\x89PNG" for p in paths)


def test_llm_int8_reports_outlier_share(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    lm = loaded("llama")
    with torch.no_grad():
        for block in lm.model.model.layers:
            block.input_layernorm.weight[5] = 50.0
    result = quantize_model(lm, LLMInt8Config(threshold=6.0), calibration=CalibrationConfig(text_file=str(text), samples=4, ctx=64), progress=False)
    q = next(r for r in result.layers if r.name.endswith("0.self_attn.q_proj"))
    assert q.info["outlier_channels"] >= 1 and q.info["output_error"] < q.info["baseline_output_error"]
    module = lm.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        lm.model(tokens())
    assert 0 < module.outlier_share < 0.2
    assert isinstance(lm.model.model.layers[0].mlp.down_proj, LLMInt8Linear)
    assert not isinstance(lm.model.lm_head, (QuantLinear, W8A8Linear, LLMInt8Linear))
