"""Pruning: the patterns are exact, the sparse storage round-trips and really shrinks,
SparseGPT equals its column-by-column reference and beats magnitude pruning, and the
methods run end to end through the engine, the checkpoint and the CLI."""

import pytest
import torch
import torch.nn.functional as F

from conftest import TEXT, byte_tokenizer, require_smollm2, tiny_model
from lowbit.algorithms.gptq import output_error
from lowbit.algorithms.pruning import magnitude_prune, sparsegpt, sparsegpt_reference, wanda_prune
from lowbit.calibration.config import CalibrationConfig
from lowbit.checkpoint import load_quantized, save_quantized
from lowbit.cli import main
from lowbit.errors import LowbitError, SpecError
from lowbit.loader import load_model
from lowbit.methods import MagnitudeConfig, SparseGPTConfig, WandaConfig
from lowbit.models.architectures import architecture_for
from lowbit.models.loading import LoadedModel
from lowbit.modules import SparseLinear
from lowbit.numerics.sparsity import SparsityPattern, keep_mask
from lowbit.numerics.spec import QuantSpec
from lowbit.packed.sparse import SparseWeight, nm_mask, nm_positions, pack_bitmask, unpack_bitmask
from lowbit.pipeline import quantize_model

PATTERNS = ["0.5", "0.7", "2:4", "4:8"]
SPECS = [None, QuantSpec(bits=4, group_size=32), QuantSpec(bits=3, group_size=64, symmetric=False), QuantSpec(bits=4, granularity="channel", group_size=None)]


def correlated_inputs(n=2048, dim=128, seed=0):
    """Inputs whose channels are correlated and unequally scaled, a few of them outliers:
    the case where the input statistics (Wanda) and the Hessian's off-diagonal (SparseGPT)
    carry information magnitude pruning lacks."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=g) / dim**0.5 + torch.eye(dim)
    x = torch.randn(n, dim, generator=g) @ mixing * torch.linspace(0.2, 2.0, dim)
    x[:, [3, 40, 77]] *= 15
    return x


def hessian_of(x):
    return 2 * x.T @ x / x.shape[0]


@pytest.mark.parametrize("text", PATTERNS)
def test_masks_keep_exactly_what_the_pattern_says(text):
    pattern = SparsityPattern.parse(text)
    scores = torch.randn(37, 128, generator=torch.Generator().manual_seed(1))
    mask = keep_mask(scores, pattern)
    if pattern.structured:
        assert torch.equal(mask.reshape(37, -1, pattern.m).sum(-1), torch.full((37, 128 // pattern.m), pattern.n))
    else:
        assert torch.equal(mask.sum(1), torch.full((37,), pattern.kept_per_row(128)))
        # the kept are the highest of each row
        assert bool((scores.masked_fill(~mask, float("inf")).min(1).values >= scores.masked_fill(mask, -float("inf")).max(1).values).all())


@pytest.mark.parametrize("text,message", [("1.5", "above 0 and below 1"), ("0", "above 0"), ("3:5", "N:M sparsity needs M in"),
                                          ("4:4", "1 <= N < M"), ("half", "takes a fraction")])
def test_bad_patterns_are_refused(text, message):
    with pytest.raises(SpecError, match=message):
        SparsityPattern.parse(text)


def test_a_pattern_that_cannot_tile_a_row_is_refused():
    with pytest.raises(SpecError, match="not a multiple of 8: 4:8 sparsity cannot tile them"):
        SparsityPattern.parse("4:8").check(60, "model.layers.0.mlp.down_proj")


def test_bitmask_and_positions_round_trip_exactly():
    g = torch.Generator().manual_seed(2)
    mask = torch.rand(9, 45, generator=g) > 0.4
    packed = pack_bitmask(mask)
    assert packed.shape == (9, 6) and packed.dtype == torch.uint8
    assert torch.equal(unpack_bitmask(packed, 45), mask)
    assert int(pack_bitmask(torch.tensor([[True, False, False, True, False, False, False, False, True]]))[0, 0]) == 0b1001
    pattern = SparsityPattern.parse("2:4")
    nm = keep_mask(torch.randn(9, 64, generator=g), pattern)
    positions = nm_positions(nm, pattern)
    assert positions.shape == (9, 32) and int(positions.max()) < 4
    assert torch.equal(nm_mask(positions, pattern, 64), nm)


@pytest.mark.parametrize("text", PATTERNS)
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: "float" if s is None else s.describe())
def test_sparse_weights_decode_to_the_pruned_matrix_and_reload_exactly(text, spec):
    pattern = SparsityPattern.parse(text)
    weight = torch.randn(48, 128, generator=torch.Generator().manual_seed(3))
    result = magnitude_prune(weight, pattern, spec)
    stored = result.stored(pattern, "float32")
    dense = stored.dequantize()
    assert torch.equal(dense, result.weight)  # float32 values, or codes: the algorithm's matrix bit for bit
    assert torch.equal(dense != 0, result.mask & (result.weight != 0))
    again = SparseWeight.from_tensors({k: v.clone() for k, v in stored.tensors().items()}, stored.config())
    assert torch.equal(again.dequantize(), dense)
    if spec is None:
        half = result.stored(pattern, "float16").dequantize()
        assert torch.equal(half, result.weight.half().float())


def test_sparse_storage_really_shrinks():
    weight = torch.randn(256, 512)
    for text, spec, bits in [("2:4", None, 9.0), ("0.5", None, 9.0), ("2:4", QuantSpec(bits=4, group_size=128), 2 + 1 + 16 / 128)]:
        pattern = SparsityPattern.parse(text)
        stored = magnitude_prune(weight, pattern, spec).stored(pattern, "float16")
        assert stored.bits_per_weight == pytest.approx(bits)
        module = SparseLinear(stored)
        assert sum(b.numel() * b.element_size() for b in module.state_dict().values()) == stored.nbytes < weight.numel() * 2


def test_sparse_linear_computes_with_the_dense_masked_weight():
    pattern = SparsityPattern.parse("2:4")
    weight, bias = torch.randn(24, 64), torch.randn(24)
    result = magnitude_prune(weight, pattern)
    module = SparseLinear(result.stored(pattern, "float32"), bias)
    x = torch.randn(5, 7, 64)
    torch.testing.assert_close(module(x), F.linear(x, weight * result.mask, bias), rtol=0, atol=1e-5)
    assert torch.equal(module(x.double()), F.linear(x.double(), (weight * result.mask).double(), bias.double()))


@pytest.mark.parametrize("text", ["0.5", "2:4", "4:8"])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: "float" if s is None else s.describe())
def test_lazy_block_sparsegpt_equals_the_column_by_column_rule(text, spec):
    pattern = SparsityPattern.parse(text)
    x = correlated_inputs(dim=192)
    weight = torch.randn(40, 192, generator=torch.Generator().manual_seed(4))
    fast = sparsegpt(weight, hessian_of(x), pattern, spec, block_size=64)
    slow = sparsegpt_reference(weight, hessian_of(x), pattern, spec, block_size=64)
    assert torch.equal(fast.mask, slow.mask)
    torch.testing.assert_close(fast.weight, slow.weight, rtol=1e-4, atol=1e-4)
    if spec is not None:
        assert torch.equal(fast.quantized.codes[fast.mask], slow.quantized.codes[slow.mask])
    assert torch.equal(fast.mask.sum(1), torch.full((40,), pattern.kept_per_row(192)))
    assert bool((fast.weight[~fast.mask] == 0).all())


@pytest.mark.parametrize("text", ["0.5", "2:4"])
@pytest.mark.parametrize("spec", [None, QuantSpec(bits=4, group_size=32)], ids=["float", "W4"])
def test_sparsegpt_beats_wanda_beats_magnitude_on_correlated_inputs(text, spec):
    pattern = SparsityPattern.parse(text)
    x = correlated_inputs()
    H = hessian_of(x)
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(5))
    errors = {name: output_error(weight, result.weight, H) for name, result in [
        ("magnitude", magnitude_prune(weight, pattern, spec)),
        ("wanda", wanda_prune(weight, torch.diagonal(H), pattern, spec)),
        ("sparsegpt", sparsegpt(weight, H, pattern, spec)),
    ]}
    assert errors["sparsegpt"] < 0.9 * errors["wanda"] and errors["wanda"] < 0.8 * errors["magnitude"], errors


def loaded_tiny(family="llama"):
    model = tiny_model(family)
    return LoadedModel(model=model, tokenizer=byte_tokenizer(), source="tiny", arch=architecture_for(model.config.model_type))


@pytest.mark.parametrize("config", [MagnitudeConfig(sparsity="2:4"), WandaConfig(sparsity="0.5"),
                                    SparseGPTConfig(sparsity="2:4", quantize=True, spec=QuantSpec(bits=4, group_size=32))],
                         ids=lambda c: c.describe())
def test_pruning_runs_end_to_end_and_the_checkpoint_reloads(config, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    calibration = CalibrationConfig(text_file=str(text), samples=8, ctx=64, batch_size=4) if config.calibrated else None
    loaded = loaded_tiny()
    result = quantize_model(loaded, config, calibration=calibration, progress=False)
    assert len(result.layers) == 3 * 7
    for layer in result.layers:
        module = loaded.model.get_submodule(layer.name)
        assert isinstance(module, SparseLinear)
        dense = module.qweight.dequantize()
        kept = (dense != 0).float().mean().item()
        assert kept <= 0.5
    if config.calibrated:
        assert sum(r.info["output_error"] for r in result.layers) < sum(r.info["baseline_output_error"] for r in result.layers)
    again = load_quantized(save_quantized(loaded, tmp_path / "pruned"))
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, again.model(ids).logits)
    assert again.header["method"]["sparsity"] == config.sparsity


def test_sparsegpt_prunes_a_tiny_model_with_less_logit_error_than_magnitude(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    reference = tiny_model("llama")
    held_out = torch.tensor([byte_tokenizer()(TEXT[-400:]).input_ids[:96]])
    errors = {}
    for config in (MagnitudeConfig(sparsity="0.5"), SparseGPTConfig(sparsity="0.5")):
        loaded = loaded_tiny()
        quantize_model(loaded, config, calibration=CalibrationConfig(text_file=str(text), samples=16, ctx=64) if config.calibrated else None,
                       progress=False)
        with torch.no_grad():
            errors[config.name] = (loaded.model(held_out).logits - reference(held_out).logits).square().mean().item()
    assert errors["sparsegpt"] < errors["magnitude"], errors


def test_a_corrupted_positions_tensor_is_refused(tmp_path):
    pattern = SparsityPattern.parse("2:4")
    stored = magnitude_prune(torch.randn(8, 32), pattern).stored(pattern)
    tensors = {k: v.clone() for k, v in stored.tensors().items()}
    tensors["positions"][0, 0] = 0  # two kept weights at the same place
    with pytest.raises(LowbitError, match="same position twice"):
        SparseWeight.from_tensors(tensors, stored.config(), "layer")
    tensors = {k: v.clone() for k, v in stored.tensors().items()}
    tensors["values"] = tensors["values"][:, :-1]
    with pytest.raises(LowbitError, match="corrupted"):
        SparseWeight.from_tensors(tensors, stored.config(), "layer")


def test_configs_refuse_what_they_cannot_honour():
    with pytest.raises(SpecError, match="add --quantize"):
        MagnitudeConfig(spec=QuantSpec(bits=3))
    with pytest.raises(SpecError, match="stored as codes"):
        WandaConfig(quantize=True, values="float32")
    with pytest.raises(SpecError, match="multiple of the run length"):
        SparseGPTConfig(sparsity="4:8", block_size=12)
    with pytest.raises(SpecError, match="GGML formats"):
        SparseGPTConfig(quantize=True, spec=QuantSpec(format="q4_0", group_size=32))


def test_prune_cli_writes_a_sparse_checkpoint_that_info_describes(capsys, tiny_llama_dir, tmp_path, text_file):
    out = tmp_path / "p"
    assert main(["prune", "--model", str(tiny_llama_dir), "--method", "sparsegpt", "--sparsity", "2:4", "--quantize", "--group-size", "32",
                 "--calib-text", str(text_file), "--calib-samples", "4", "--calib-ctx", "64", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "pruned 14 linears" in printed and "vs magnitude" in printed
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "2:4 sparse, W4 g32 sym" in info


@pytest.mark.parametrize("argv,message", [
    (["--sparsity", "1.5"], "above 0 and below 1"),
    (["--sparsity", "2:4", "--bits", "3"], "add --quantize"),
    (["--method", "magnitude", "--sparsity", "16:32"], "N:M sparsity needs M in"),
    (["--method", "magnitude", "--quantize", "--group-size", "1024"], "group_size 1024 is larger than in_features 64"),
])
def test_prune_refuses_bad_settings_in_one_line(capsys, tiny_llama_dir, tmp_path, argv, message):
    code = main(["prune", "--model", str(tiny_llama_dir), "--out", str(tmp_path / "p"), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("to", ["gguf", "compressed-tensors"])
def test_exporting_a_pruned_checkpoint_is_refused_in_one_line(capsys, tmp_path, tiny_llama_dir, to):
    if to == "gguf":  # the GGUF export starts from the source GGUF's metadata: prune one layer of the packaged model
        require_smollm2()
        loaded = load_model("smollm2")
        quantize_model(loaded, MagnitudeConfig(skip=(r"^(?!model\.layers\.0\.mlp\.up_proj$)",)), progress=False)
    else:
        loaded = load_model(str(tiny_llama_dir))
        quantize_model(loaded, MagnitudeConfig(sparsity="2:4"), progress=False)
    checkpoint = save_quantized(loaded, tmp_path / "pruned")
    capsys.readouterr()
    code = main(["export", str(checkpoint), "--to", to, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "pruned and stored sparse" in err[0], err
    assert not (tmp_path / "out").exists()
