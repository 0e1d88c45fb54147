"""--budget BITS_PER_WEIGHT: the allocation against brute force and uniform specs, and the
plan met to the byte in a real checkpoint."""

import itertools
import json

import pytest
import torch
from conftest import TEXT, byte_tokenizer, tiny_llama

from lowbit.algorithms.bit_allocation import allocate, unused_upgrade
from lowbit.calibration.config import CalibrationConfig
from lowbit.checkpoint import read_header, save_quantized
from lowbit.cli import main
from lowbit.errors import LowbitError, SpecError
from lowbit.methods import GPTQConfig
from lowbit.methods.registry import config_from_dict
from lowbit.models.architectures import architecture_for
from lowbit.models.loading import LoadedModel
from lowbit.modules.quant_linear import QuantLinear
from lowbit.numerics.spec import QuantSpec
from lowbit.pipeline import quantize_model


def layer_options(generator, weights: int) -> list[tuple[int, float]]:
    """A layer of ``weights`` weights at 2, 3, 4, 6 and 8 bits, groups of 32 and 128 with a
    16-bit scale: error ~ sensitivity · 4^-bits, sensitivities spread over 3 decades."""
    sensitivity = 10 ** (3 * torch.rand((), generator=generator).item())
    out = []
    for bits, group in itertools.product((2, 3, 4, 6, 8), (32, 128)):
        nbytes = weights * bits // 8 + 2 * weights // group
        error = sensitivity * 4.0**-bits * (0.8 if group == 32 else 1.0) * (1 + 0.1 * torch.rand((), generator=generator).item())
        out.append((nbytes, error))
    return out


def test_allocation_is_within_the_budget_leaves_no_upgrade_and_is_near_the_optimum():
    generator = torch.Generator().manual_seed(0)
    options = [layer_options(generator, 4096 * (1 + i % 3)) for i in range(6)]
    weights = sum(4096 * (1 + i % 3) for i in range(6))
    for bits in (2.6, 3.5, 4.25, 5.0):
        budget = int(bits * weights / 8)
        chosen = allocate(options, budget)
        spent = sum(options[l][i][0] for l, i in enumerate(chosen))
        error = sum(options[l][i][1] for l, i in enumerate(chosen))
        assert spent <= budget and unused_upgrade(options, chosen, budget) is None
        best = min(sum(options[l][i][1] for l, i in enumerate(c)) for c in itertools.product(range(10), repeat=6)
                   if sum(options[l][i][0] for l, i in enumerate(c)) <= budget)
        assert error <= 1.05 * best, (bits, error, best)  # brute force over all 10^6 plans
        uniform = min(sum(layer[k][1] for layer in options) for k in range(10) if sum(layer[k][0] for layer in options) <= budget)
        assert error < 0.7 * uniform, (bits, error, uniform)


def test_allocation_refuses_a_budget_below_the_cheapest_plan():
    with pytest.raises(ValueError, match="cheapest plan takes 30 bytes"):
        allocate([[(10, 1.0), (20, 0.5)]] * 3, 29)


def tiny_loaded(seed=0):
    return LoadedModel(model=tiny_llama(seed=seed, layers=3), tokenizer=byte_tokenizer(), source="tiny", arch=architecture_for("llama"))


def quantised_linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


@pytest.mark.parametrize("act_order", ["static", "dynamic"])
def test_a_budget_is_met_to_the_byte_and_the_plan_is_stored(act_order, tmp_path):
    """The checkpoint's linears store the plan's bits per weight exactly (g_idx counted
    under dynamic act-order), at most the budget and within one 2-bit step of a 64-wide
    row of it; each layer has the spec the plan chose, and the header keeps the plan."""
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    calibration = CalibrationConfig(text_file=str(text), samples=8, ctx=64, batch_size=4)
    loaded = tiny_loaded()
    config = GPTQConfig(spec=QuantSpec(bits=4, group_size=32, symmetric=False), budget=3.5, act_order=act_order)
    result = quantize_model(loaded, config, calibration, progress=False)
    plan = result.budget
    layers = quantised_linears(loaded.model)
    stored = sum(m.qweight.nbytes for m in layers.values())
    weights = sum(m.qweight.numel for m in layers.values())
    assert 8 * stored / weights == plan.bits_per_weight <= 3.5
    assert plan.bits_per_weight > 3.5 - 2 * 64 * 8 / weights
    assert len({(bits, group) for _, bits, group in plan.layers}) > 1  # a real mix, not one spec
    for name, bits, group in plan.layers:
        spec = layers[name].qweight.spec
        assert (spec.bits, spec.group_size) == (bits, group), name
    assert plan.uniform is not None and plan.error < plan.uniform[2]
    directory = save_quantized(loaded, tmp_path / "q")
    header = read_header(directory)
    again = config_from_dict(header["method"])
    assert again.budget == 3.5 and again.layer_bits == plan.layers


def kl_to_float(model, reference, windows) -> float:
    with torch.no_grad():
        ours = torch.log_softmax(model(windows).logits.float(), -1)
        theirs = torch.log_softmax(reference(windows).logits.float(), -1)
    return float((theirs.exp() * (theirs - ours)).sum(-1).mean())


@pytest.mark.parametrize("budget_by", ["fisher", "hessian"])
def test_the_budget_beats_the_uniform_spec_of_the_same_size(budget_by, tmp_path):
    """GPTQ under a 3.5-bit budget against GPTQ at W3 g32 symmetric (exactly 3.5 bits):
    no more bytes, and less of what each sensitivity measures: the KL divergence to the
    float model on held-out text (fisher), the summed layer output error on the
    calibration inputs (hessian)."""
    from lowbit.data import eval_windows, tokenize_split

    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    calibration = CalibrationConfig(text_file=str(text), samples=8, ctx=64, batch_size=4)
    windows = eval_windows(tokenize_split(byte_tokenizer(), text_file=text), ctx=64, n_windows=4)
    reference = tiny_loaded().model
    scores, bpw = {}, {}
    for label, config in (("budget", GPTQConfig(spec=QuantSpec(bits=3, group_size=32), budget=3.5, budget_by=budget_by)),
                          ("uniform", GPTQConfig(spec=QuantSpec(bits=3, group_size=32)))):
        loaded = tiny_loaded()
        result = quantize_model(loaded, config, calibration, progress=False)
        scores[label] = (kl_to_float(loaded.model, reference, windows) if budget_by == "fisher"
                         else sum(r.info["output_error"] for r in result.layers))
        bpw[label] = 8 * sum(r.nbytes for r in result.layers) / sum(r.shape[0] * r.shape[1] for r in result.layers)
    assert bpw["budget"] <= bpw["uniform"] == 3.5
    print(budget_by, scores, bpw)
    assert scores["budget"] < 0.8 * scores["uniform"], scores


def test_budget_settings_are_checked_up_front():
    with pytest.raises(SpecError, match="format 'q4_0' fixes them"):
        GPTQConfig(spec=QuantSpec().with_changes(format="q4_0"), budget=4.0)
    with pytest.raises(SpecError, match="drop --layer-format or --budget"):
        GPTQConfig(budget=4.0, layer_formats=(("down_proj", "int"),))
    with pytest.raises(SpecError, match="above 1 and at most 16"):
        GPTQConfig(budget=0.5)


def test_a_budget_below_every_plan_is_one_line(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    with pytest.raises(LowbitError, match=r"--budget 1.5 is below the cheapest plan, 2\.\d+ bits/weight"):
        quantize_model(tiny_loaded(), GPTQConfig(spec=QuantSpec(group_size=32), budget=1.5), CalibrationConfig(text_file=str(text), samples=4, ctx=64), progress=False)


def test_cli_budget_prints_the_plan_and_info_shows_it(tiny_llama_dir, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(tiny_llama_dir), "--method", "gptq", "--budget", "4.25", "--asym", "--group-size", "32", "--calib-text", str(text),
                 "--calib-samples", "4", "--calib-ctx", "64", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "budget 4.25 bits/weight: plan 4.2" in printed and "down_proj:" in printed
    assert main(["info", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "budget: 4.25" in shown and "14 linears planned by --budget" in shown
    bpw = float(shown.split(" bits/weight")[-2].rsplit(" ", 1)[-1])
    header = read_header(out)
    assert bpw <= 4.25 and json.dumps(header["method"]["layer_bits"])
