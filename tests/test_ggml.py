"""llama.cpp's GGML block types: lowbit's encoders and decoders against the `gguf` package's
dequantisers (the reference implementation of whoever defined them), bit for bit."""

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize as gguf_dequantize

from lowbit.algorithms.gptq import gptq, output_error
from lowbit.errors import SpecError
from lowbit.methods import GPTQConfig, RTNConfig
from lowbit.models.loading import gguf_reader
from lowbit.numerics import ggml_blocks as gb
from lowbit.numerics.ggml_types import GGML_TYPES, ggml_type_for
from lowbit.numerics.quantization import dequantize, fake_quantize, quantize, weight_sqnr_db
from lowbit.numerics.spec import QuantSpec
from lowbit.packed.qweight import QuantizedWeight

TYPES = list(GGML_TYPES)
SYMMETRIC_INT = [name for name, t in GGML_TYPES.items() if t.kind == "sym"]


def reference(raw: torch.Tensor, name: str) -> np.ndarray:
    """The gguf package's dequantisation of blocks uint8 (n, type_size), float32 (n, block)."""
    t = GGML_TYPES[name]
    out = gguf_dequantize(raw.numpy().reshape(1, -1), gguf.GGMLQuantizationType[name.upper()])
    return np.asarray(out, dtype=np.float32).reshape(-1, t.block)


def random_blocks(name: str, n: int, seed: int) -> torch.Tensor:
    """Blocks with every code and scale field random (float16 scales kept finite)."""
    t = GGML_TYPES[name]
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (n, t.type_size), dtype=torch.uint8, generator=g)
    b = gb.unpack(t, raw)
    d = (torch.rand(n, generator=g) * 0.02 + 1e-4).half() * torch.where(torch.rand(n, generator=g) < 0.2, -1.0, 1.0).half()
    m = None if b.m is None else (torch.rand(n, generator=g) * 0.02 - 0.01).half()
    return gb.pack(gb.GGMLBlocks(t, b.codes, d, m, b.scales, b.mins))


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.astype(np.float32).view(np.uint32), b.astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("name", TYPES)
def test_decoder_equals_gguf_bit_for_bit_on_random_blocks(name):
    raw = random_blocks(name, 200, seed=1)
    assert same_bits(gb.dequantize_blocks(GGML_TYPES[name], raw).numpy(), reference(raw, name))


@pytest.mark.parametrize("name", TYPES)
def test_pack_inverts_unpack_byte_for_byte(name):
    t = GGML_TYPES[name]
    raw = torch.randint(0, 256, (300, t.type_size), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    assert torch.equal(gb.pack(gb.unpack(t, raw)), raw)


def test_a_wrong_bit_in_a_scale_field_changes_the_decoded_weights():
    """The comparison can fail: flip one bit of q4_k's packed 6-bit scales and the decode differs."""
    raw = random_blocks("q4_k", 8, seed=3)
    broken = raw.clone()
    broken[0, 4] ^= 0x01  # byte 4: the first group's min
    assert not same_bits(gb.dequantize_blocks(GGML_TYPES["q4_k"], broken).numpy(), reference(raw, "q4_k"))


@pytest.mark.parametrize("model", ["smollm2", "gemma3-270m"])
def test_decoder_equals_gguf_on_the_packaged_models_tensors(model, packaged_gguf):
    """Every block type in the packaged files (Q4_1, Q8_0; Q5_0, Q4_K, Q6_K), 64 rows of
    each tensor: lowbit decodes what the gguf package decodes and re-encodes the same bytes."""
    reader = gguf_reader(packaged_gguf(model))
    seen = set()
    for tensor in reader.tensors:
        name = tensor.tensor_type.name.lower()
        if name not in GGML_TYPES:
            continue
        t = GGML_TYPES[name]
        raw = torch.from_numpy(np.array(tensor.data[:64])).reshape(-1, t.type_size)
        assert torch.equal(gb.pack(gb.unpack(t, raw)), raw), tensor.name
        assert same_bits(gb.dequantize_blocks(t, raw).numpy(), reference(raw, name)), tensor.name
        seen.add(name)
    assert seen == ({"q4_1", "q8_0"} if model == "smollm2" else {"q5_0", "q8_0", "q4_k", "q6_k"})


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("range_", ["minmax", "mse"])
def test_quantised_weight_is_stored_as_the_types_blocks(name, range_):
    """quantize -> QuantizedWeight: its qdata are GGUF blocks that the gguf package decodes
    to exactly lowbit's dequantised weight, and unpacking gives back the codes and scales."""
    w = torch.randn(48, 512, generator=torch.Generator().manual_seed(4)) * 0.02
    spec = QuantSpec().with_changes(format=name, range=range_)
    q = quantize(w, spec)
    qw = QuantizedWeight.from_quantized(q)
    t = GGML_TYPES[name]
    assert qw.qdata.shape == (48, 512 // t.block * t.type_size)
    assert qw.bits_per_weight == pytest.approx(t.bits_per_weight)
    assert same_bits(qw.dequantize().numpy(), reference(qw.qdata.reshape(-1, t.type_size), name).reshape(48, 512))
    back = qw.to_quantized()
    assert torch.equal(back.codes, q.codes) and torch.equal(back.scale, q.scale)
    scale, zero = qw.scale_and_zero()  # the kernels' way in: the same scale and zero
    assert torch.equal(scale, back.scale) and ((zero is None and back.zero is None) or torch.equal(zero, back.zero))
    floor = {2: 8.0, 3: 13.0, 4: 19.0, 5: 25.0, 6: 31.0, 8: 42.0}[t.bits]
    assert weight_sqnr_db(w, qw.dequantize()) > floor


@pytest.mark.parametrize("name", SYMMETRIC_INT)
def test_full_grid_beats_the_balanced_grid(name):
    """The full grid (-2^(n-1) .. 2^(n-1)-1, llama.cpp's Q4_0 rule) uses one level more:
    lower error on Gaussian weights at equal storage."""
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(5))
    full = QuantSpec().with_changes(format=name)
    assert full.grid == "full"  # the types' own default
    balanced = full.with_changes(grid="balanced")
    assert weight_sqnr_db(w, fake_quantize(w, full)) > weight_sqnr_db(w, fake_quantize(w, balanced)) + 0.1


def test_full_grid_on_plain_integers_puts_the_largest_weight_on_the_lowest_level():
    w = torch.tensor([[0.5, -1.0, 0.25, 0.9]])
    q = quantize(w, QuantSpec(bits=4, group_size=4, grid="full"))
    assert q.scale.item() == pytest.approx(1.0 / 8)
    assert q.codes[0, 1].item() == 0  # -1.0 -> q = -8 (code 0)


@pytest.mark.parametrize("name", ["q4_0", "q4_k", "q3_k", "q6_k", "iq4_nl"])
def test_gptq_on_ggml_grids_beats_rtn_and_stores_its_codes_exactly(name):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2048, 512, generator=g) @ (torch.randn(512, 512, generator=g) * 0.1)
    hessian = 2 * x.T @ x / x.shape[0]
    w = torch.randn(96, 512, generator=g) * 0.02
    spec = QuantSpec().with_changes(format=name)
    result = gptq(w, hessian, spec, act_order=True, static_groups=True)
    assert torch.equal(result.weight.dequantize(), result.dequantized)
    assert output_error(w, result.dequantized, hessian) < 0.7 * output_error(w, fake_quantize(w, spec), hessian)


def test_fallback_types_follow_llama_cpp():
    assert ggml_type_for(576, "q4_k").name == "q5_0"
    assert ggml_type_for(1536, "q4_k").name == "q4_k"
    assert ggml_type_for(640, "q3_k").name == "q4_0"
    assert ggml_type_for(640, "q6_k").name == "q8_0"
    assert ggml_type_for(48, "q4_0") is None


def test_config_gives_each_layer_its_format():
    config = RTNConfig(spec=QuantSpec().with_changes(format="q4_k"), layer_formats=(("down_proj", "q6_k"),))
    assert config.spec_for("model.layers.0.mlp.down_proj", 1536).format == "q6_k"
    assert config.spec_for("model.layers.0.mlp.down_proj", 640).format == "q8_0"
    assert config.spec_for("model.layers.0.self_attn.q_proj", 576).format == "q5_0"
    assert config.spec_for("model.layers.0.self_attn.o_proj", 1024).format == "q4_k"


@pytest.mark.parametrize("make, message", [
    (lambda: QuantSpec().with_changes(format="q4_k", group_size=64), "fixes group_size"),
    (lambda: QuantSpec().with_changes(format="q4_1", grid="full"), "symmetric integer"),
    (lambda: QuantSpec(bits=4, symmetric=False, grid="full"), "symmetric integer"),
    (lambda: QuantSpec().with_changes(format="q4_k").group_size_for(576, "q_proj"), "use --format q5_0"),
    (lambda: GPTQConfig(spec=QuantSpec().with_changes(format="q4_k"), act_order="dynamic"), "use static"),
    (lambda: RTNConfig(layer_formats=(("down", "q9_k"),)), "unknown"),
])
def test_impossible_ggml_settings_are_refused(make, message):
    with pytest.raises(SpecError, match=message):
        make()


def test_scales_from_another_format_are_not_packed_as_k_quant():
    """A K-quant stores integer group scales; scales it cannot hold are refused, not rounded."""
    spec = QuantSpec().with_changes(format="q4_k")
    q = quantize(torch.randn(4, 256), spec)
    bad = type(q)(codes=q.codes, scale=q.scale * 1.001, zero=q.zero, group_size=q.group_size, spec=spec)
    with pytest.raises(SpecError, match="not q4_k's stored scales"):
        QuantizedWeight.from_quantized(bad)


@pytest.mark.parametrize("name", ["q4_0", "q4_1", "q4_k", "q6_k", "q2_k"])
def test_dividing_rows_of_ggml_blocks_divides_the_decoded_rows(name):
    """AWQ's fold into an already quantised linear: each row decodes divided by its divisor,
    up to the float16 rounding of the block scales (as for lowbit's own float16 scales)."""
    # unit-scale weights: q6_k's d of weights ~0.02 is a float16 subnormal, whose rounding is
    # coarser (a limit of the format, in llama.cpp too)
    w = torch.randn(8, 512, generator=torch.Generator().manual_seed(7))
    qw = QuantizedWeight.from_quantized(quantize(w, QuantSpec().with_changes(format=name)))
    divisor = torch.linspace(0.5, 2.0, 8)
    raw = gb.divide_rows(GGML_TYPES[name], qw.qdata, divisor)
    after = QuantizedWeight.from_ggml(raw, qw.shape, qw.spec).dequantize()
    assert torch.equal(QuantizedWeight.from_ggml(raw, qw.shape, qw.spec).to_quantized().codes, qw.to_quantized().codes)
    expected = qw.dequantize() / divisor[:, None]  # float16 rounding of d and m: relative to the row's range
    assert ((after - expected).abs() <= 2e-3 * expected.abs().amax(1, keepdim=True)).all()


def test_k_quant_scales_in_float16_subnormals_pack_exactly(packaged_gguf):
    """Gemma 3's layer-4 o_proj under q6_k puts super-block scales d among float16
    subnormals (~5e-6), where rounding is coarse and store_params does not map its output to
    itself; the packed blocks must still decode to exactly the scales the codes were chosen
    against (the integer factors are recovered exactly, `factor_scales`)."""
    reader = gguf_reader(packaged_gguf("gemma3-270m"))
    tensor = next(t for t in reader.tensors if t.name == "blk.4.attn_output.weight")
    t = GGML_TYPES[tensor.tensor_type.name.lower()]
    w = gb.dequantize_blocks(t, torch.from_numpy(np.array(tensor.data)).reshape(-1, t.type_size)).reshape(tensor.data.shape[0], -1)
    for name in ("q6_k", "q3_k"):
        q = quantize(w, QuantSpec().with_changes(format=name))
        qw = QuantizedWeight.from_quantized(q)
        assert torch.equal(qw.to_quantized().scale, q.scale) and torch.equal(qw.dequantize(), dequantize(q))
