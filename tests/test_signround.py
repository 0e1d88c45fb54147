"""Learned rounding (SignRound): its parameterisation starts exactly at the start method's
codes, it lowers the block output error of GPTQ and RTN on seeded tiny models, and its result
is ordinary packed codes that save, load and export."""

import pytest
import torch

from conftest import TEXT, byte_tokenizer, require_smollm2, tiny_model
from lowbit import CalibrationConfig, GPTQConfig, QuantSpec, SignRoundConfig, load_quantized, quantize_model, save_quantized
from lowbit.algorithms.signround import LearnedRounding, block_error, signround
from lowbit.calibration.engine import _block_output, capture_block_inputs, quantize_block, start_float_stream
from lowbit.errors import LowbitError, SpecError
from lowbit.models import architecture_for
from lowbit.models.architectures import decoder_blocks
from lowbit.models.loading import LoadedModel
from lowbit.modules import QuantLinear
from lowbit.numerics import quantize

SPECS = [
    QuantSpec(bits=3, symmetric=False, group_size=32),
    QuantSpec(bits=4, group_size=32),
    QuantSpec(bits=4, group_size=32, grid="full"),
    QuantSpec(bits=4, symmetric=False, zero_point="float", group_size=32),
    QuantSpec(bits=2, symmetric=False, granularity="channel", group_size=None),
    QuantSpec().with_changes(format="q4_k"),
    QuantSpec().with_changes(format="q4_0"),
]


def loaded_tiny(family, seed=0):
    model = tiny_model(family, seed=seed)
    return LoadedModel(model=model, tokenizer=byte_tokenizer(), source="tiny", arch=architecture_for(model.config.model_type))


def calibration(tmp_path, samples=16):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    return CalibrationConfig(text_file=str(text), samples=samples, ctx=64, batch_size=4)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_learned_rounding_at_zero_offsets_is_the_start_exactly(spec):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 256, generator=g) * 0.05
    start = quantize(weight, spec)
    # a start whose codes are not the nearest ones (as GPTQ's): the weight it rounded is another
    rounded = weight + torch.randn(16, 256, generator=g) * 0.02
    start = quantize(rounded, spec) if spec.ggml is None else start
    layer = LearnedRounding(start, rounded if spec.ggml is None else weight, None)
    from lowbit.numerics import dequantize

    with torch.no_grad():
        assert torch.equal(layer.weight(), dequantize(start))
    packed = layer.quantized().to_quantized()
    assert torch.equal(packed.codes, start.codes) and torch.equal(packed.scale, start.scale)
    assert (packed.zero is None) == (start.zero is None) and (packed.zero is None or torch.equal(packed.zero, start.zero))


def test_offsets_move_codes_by_one_level_at_most_and_get_gradients():
    spec = QuantSpec(bits=4, symmetric=False, group_size=32)
    weight = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    start = quantize(weight, spec)
    layer = LearnedRounding(start, weight, None)
    x = torch.randn(5, 64)
    layer(x).square().sum().backward()
    assert layer.offset.grad.abs().sum() > 0 and layer.clip_hi.grad.abs().sum() > 0 and layer.clip_lo.grad.abs().sum() > 0
    with torch.no_grad():
        layer.offset.fill_(0.5)
        layer.clamp_()
        moved = layer.quantized().to_quantized().codes.int() - start.codes.int()
    assert moved.min() >= 0 and moved.max() == 1


def test_signround_lowers_the_output_error_of_one_block_below_its_start():
    """On the first block of a tiny Gemma 3, learning from RTN's codes lowers the block's output
    error, and a failed learning run (no steps) leaves the start as it was."""
    loaded = loaded_tiny("gemma3")
    samples = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(2))
    batches = capture_block_inputs(loaded.model, loaded.arch, samples, batch_size=4)
    block = loaded.model.model.layers[0]
    with torch.no_grad():
        targets = [_block_output(block(b.hidden, **b.block_kwargs[0])) for b in batches]
    spec = QuantSpec(bits=3, symmetric=False, group_size=32)
    for p in block.parameters():
        p.requires_grad_(False)
    layers = {}
    for name in loaded.arch.block_linears:
        linear = block.get_submodule(name)
        layers[name] = LearnedRounding(quantize(linear.weight.detach(), spec), linear.weight.detach(), linear.bias)
        parent, _, leaf = name.rpartition(".")
        setattr(block.get_submodule(parent), leaf, layers[name])

    def run(i):
        return _block_output(block(batches[i].hidden, **batches[i].block_kwargs[0]))

    with torch.no_grad():
        start = block_error(run, targets)
    assert signround(run, targets, list(layers.values()), iters=0).kept is False
    result = signround(run, targets, list(layers.values()), iters=40, seed=0)
    assert result.start_error == pytest.approx(start) and result.kept
    assert result.learned_error < 0.7 * result.start_error
    with torch.no_grad():
        assert block_error(run, targets) == pytest.approx(result.learned_error)


def test_signround_beats_gptqs_block_output_error_on_smollm2():
    """On SmolLM2's first two blocks (W4 g128 asym, seeded calibration samples), learning from
    GPTQ's codes lowers each block's output error well below GPTQ's, and the model's
    predictions on held-out text move less from the float model's than with GPTQ alone."""
    require_smollm2()
    from lowbit import load_model
    from lowbit.data.corpora import eval_windows, tokenize_split
    from lowbit.evaluation.metrics import evaluate

    spec = QuantSpec(bits=4, symmetric=False, group_size=128)
    skip = ("lm_head", r"layers\.([2-9]|[12][0-9])\.")
    calib = CalibrationConfig(samples=8, ctx=256, batch_size=2)
    ours, gptq_only, reference = load_model("smollm2"), load_model("smollm2"), load_model("smollm2")
    result = quantize_model(ours, SignRoundConfig(spec=spec, skip=skip, iters=40), calibration=calib, progress=False)
    quantize_model(gptq_only, GPTQConfig(spec=spec, skip=skip), calibration=calib, progress=False)
    blocks = {r.name.rsplit(".", 2)[0]: r.info for r in result.layers}
    assert len(blocks) == 2
    assert all(info["learned_kept"] and info["block_error"] < 0.85 * info["block_error_start"] for info in blocks.values())
    windows = eval_windows(tokenize_split(ours.tokenizer), 256, 4)
    scores = evaluate({"signround": ours.model, "gptq": gptq_only.model}, windows, reference=reference.model, progress=False)
    kld = {r.label: r.kld for r in scores}
    assert kld["signround"] < kld["gptq"]


@pytest.mark.parametrize("offload", [False, True])
def test_float_targets_follow_the_float_model_through_every_block(offload, tmp_path):
    """With ``target="float"`` each block learns against the float model's own activations:
    the stream the engine carries equals the float model's output of every block (here, of the
    last), in memory and offloaded to files, and learning still lowers each block's error
    against those targets."""
    import copy

    loaded = loaded_tiny("llama")
    reference = copy.deepcopy(loaded.model)
    samples = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
    outputs = []
    hook = decoder_blocks(reference, loaded.arch)[-1].register_forward_hook(lambda m, a, out: outputs.append(_block_output(out)))
    with torch.no_grad():
        reference(samples, use_cache=False)
    hook.remove()
    config = SignRoundConfig(spec=QuantSpec(bits=3, symmetric=False, group_size=32), init="rtn", iters=20, target="float")
    batches = capture_block_inputs(loaded.model, loaded.arch, samples, batch_size=4, offload=tmp_path / "act" if offload else None)
    start_float_stream(config, batches)
    phases = dict.fromkeys(("statistics", "accumulate", "quantize", "refine", "outputs"), 0.0)
    infos = []
    for index, block in enumerate(decoder_blocks(loaded.model, loaded.arch)):
        infos.append(quantize_block(block, index, batches, config, loaded.arch, [], phases, progress=False)[0].info)
    assert torch.allclose(torch.cat([b.reference for b in batches]), outputs[0], atol=1e-5)
    assert not torch.allclose(torch.cat([b.hidden for b in batches]), outputs[0], atol=1e-2)  # the quantised stream moved away
    assert all(info["learned_kept"] and info["block_error"] < info["block_error_start"] for info in infos)


def test_float_targets_need_the_float_stream():
    loaded = loaded_tiny("llama")
    config = SignRoundConfig(spec=QuantSpec(bits=4, group_size=32), init="rtn", iters=2, target="float")
    batches = capture_block_inputs(loaded.model, loaded.arch, torch.randint(0, 256, (2, 16)), batch_size=2)
    with pytest.raises(LowbitError, match="start_float_stream"):
        quantize_block(decoder_blocks(loaded.model, loaded.arch)[0], 0, batches, config, loaded.arch, [], dict.fromkeys(("refine",), 0.0))


@pytest.mark.parametrize("init", ["rtn", "awq"])
def test_signround_from_rtn_and_awq_lowers_every_blocks_error(init, tmp_path):
    spec = QuantSpec(bits=3, symmetric=False, group_size=32)
    loaded = loaded_tiny("gemma3")
    # against the quantised block's own inputs: the float targets' share of earlier blocks' error no rounding here can remove
    config = SignRoundConfig(spec=spec, init=init, iters=30, target="quantised")
    result = quantize_model(loaded, config, calibration=calibration(tmp_path), progress=False)
    blocks = {r.name.rsplit(".", 2)[0]: r.info for r in result.layers}
    assert len(blocks) == 3 and all(info["learned_kept"] and info["block_error"] < 0.8 * info["block_error_start"] for info in blocks.values())
    assert all(isinstance(loaded.model.get_submodule(r.name), QuantLinear) for r in result.layers)


def test_signround_checkpoint_round_trips_and_ggml_codes_pack(tmp_path):
    loaded = loaded_tiny("llama")
    config = SignRoundConfig(spec=QuantSpec().with_changes(format="q4_0"), init="rtn", iters=10)
    quantize_model(loaded, config, calibration=calibration(tmp_path, samples=8), progress=False)
    assert loaded.model.model.layers[0].mlp.down_proj.spec.format == "q4_0"
    again = load_quantized(save_quantized(loaded, tmp_path / "q"))
    x = torch.randint(0, 256, (1, 30))
    with torch.no_grad():
        assert torch.equal(loaded.model(x).logits, again.model(x).logits)
    method = again.header["method"]
    assert method["name"] == "signround" and method["init"] == "rtn" and method["iters"] == 10


@pytest.mark.parametrize("bad, message", [
    (dict(spec=QuantSpec(bits=4, format="nf4", group_size=64)), "codebook has none"),
    (dict(spec=QuantSpec(bits=4, group_size=64, double_quant=True)), "double-quantised"),
    (dict(init="hqq"), "rtn, gptq, awq"),
    (dict(iters=-1), "0 or more"),
    (dict(lr=0.0), "positive number"),
    (dict(learn_clip="yes"), "auto, on, off"),
    (dict(optimizer="sgd"), "adam, sign"),
    (dict(target="teacher"), "float, quantised"),
])
def test_signround_refuses_what_it_cannot_do(bad, message):
    with pytest.raises(SpecError, match=message):
        SignRoundConfig(**bad)
