"""CPU kernels against the reference path, the quantised KV cache, and the lean decode loop."""

import pytest
import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from conftest import tiny_llama, tiny_model
from lowbit.algorithms import rtn_quantize
from lowbit.errors import LowbitError
from lowbit.evaluation.kv import kv_cache_quality
from lowbit.inference.generate import generate
from lowbit.inference.kv_cache import KVSpec, QuantizedKVCache, QuantizedKVLayer, quantize_keys, quantize_values
from lowbit.kernels.common import format_support
from lowbit.kernels.cpu import KernelLinear, kernel_support, prefill_block_rows, quantize_activations_q8, reference_gemm, use_cpu_kernels
from lowbit.modules import QuantLinear
from lowbit.numerics import QuantSpec
from lowbit.numerics.packing import unpack
from lowbit.methods import RTNConfig
from lowbit.pipeline import quantize_model

KERNEL_SPECS = [
    QuantSpec(bits=4, group_size=32),
    QuantSpec(bits=4, group_size=32, symmetric=False),  # with K % 64 == 0, W4A8 takes the 512-bit tile's groups-of-32 form
    QuantSpec(bits=4, group_size=64, symmetric=False),
    QuantSpec(bits=4, group_size=128, symmetric=False, zero_point="float"),
    QuantSpec(bits=4, granularity="channel", group_size=None),
    QuantSpec(bits=8, granularity="channel", group_size=None),
    QuantSpec(bits=8, group_size=128, symmetric=False),
]


@pytest.mark.parametrize("spec", KERNEL_SPECS, ids=lambda s: s.describe().replace(" ", "_"))
@pytest.mark.parametrize("shape", [(96, 576), (40, 160), (256, 1536), (41, 192)])  # K % 64 == 0 takes the block path; odd N
@pytest.mark.parametrize("tokens", [1, 2, 5, 16, 40])
def test_cpu_kernel_equals_reference(spec, shape, tokens):
    out_features, in_features = shape
    if spec.granularity == "group" and spec.group_size > in_features:
        pytest.skip("group larger than the row")
    g = torch.Generator().manual_seed(out_features + tokens)
    linear = nn.Linear(in_features, out_features, bias=True)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=g) * 0.05)
    module = QuantLinear(rtn_quantize(linear.weight, spec), linear.bias)
    kernel = KernelLinear(module)
    x = torch.randn(2, tokens, in_features, generator=g) if tokens > 16 else torch.randn(tokens, in_features, generator=g)
    expected = reference_gemm(x, module)
    torch.testing.assert_close(kernel(x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spec", KERNEL_SPECS, ids=lambda s: s.describe().replace(" ", "_"))
@pytest.mark.parametrize("tokens", [1, 3, 16])
def test_portable_kernel_path_equals_reference(spec, tokens):
    """The SIMD path runs on this machine; the portable one (CPUs without AVX2) is checked too."""
    g = torch.Generator().manual_seed(tokens)
    module = QuantLinear(rtn_quantize(torch.randn(72, 576, generator=g) * 0.05, spec))
    kernel = KernelLinear(module)
    x = torch.randn(tokens, 576, generator=g)
    expected = reference_gemm(x, module)
    got = kernel.kernels.gemm_portable(x, kernel.q, kernel.scales, kernel.zeros, kernel.group_size, kernel.int4)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(kernel(x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(96, 576), (41, 160), (3, 40), (1000, 2048)])  # whole runs of 4 rows and a remainder; K % 16 tails
def test_float_gemv_kernel_equals_torch_mv(shape):
    """The compiled step's float linears (`gemv_f32`) against torch.mv: the same products,
    summed in another order."""
    from lowbit.kernels.cpu import load_kernels

    g = torch.Generator().manual_seed(shape[0])
    w, x = torch.randn(*shape, generator=g), torch.randn(shape[1], generator=g)
    torch.testing.assert_close(load_kernels().gemv(w, x), torch.mv(w, x), rtol=1e-5, atol=1e-4)
    with pytest.raises(RuntimeError, match="x must be contiguous float32"):
        load_kernels().gemv(w, x[:-1])


@pytest.mark.parametrize("spec", KERNEL_SPECS, ids=lambda s: s.describe().replace(" ", "_"))
@pytest.mark.parametrize("shape", [(96, 576), (40, 160)])
def test_dequantize_kernel_equals_reference(spec, shape):
    """The prefill path's dequantisation (vector and scalar tail) equals QuantizedWeight's."""
    g = torch.Generator().manual_seed(shape[0])
    module = QuantLinear(rtn_quantize(torch.randn(*shape, generator=g) * 0.05, spec))
    kernel = KernelLinear(module)
    torch.testing.assert_close(kernel.dequantized_weight(), module.qweight.dequantize(torch.float32), rtol=1e-6, atol=1e-7)
    x = torch.randn(3, 20, shape[1], generator=g, dtype=torch.bfloat16)  # 60 tokens: the large-batch path, dtype kept
    out = kernel(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference_gemm(x, module), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("spec", KERNEL_SPECS, ids=lambda s: s.describe().replace(" ", "_"))
@pytest.mark.parametrize("block_rows", [1, 40, 96, 500])
def test_prefill_blocks_equal_reference(spec, block_rows):
    """The prefill path dequantises W a block of rows at a time (the last block short, or one
    block larger than W) and writes each block's columns of y in place: equal to dequantise +
    matmul, bias included."""
    g = torch.Generator().manual_seed(block_rows)
    module = QuantLinear(rtn_quantize(torch.randn(96, 576, generator=g) * 0.05, spec), torch.randn(96, generator=g))
    kernel = KernelLinear(module)
    x = torch.randn(37, 576, generator=g)
    got = kernel.kernels.gemm_dequant_blocks(x, kernel.q, kernel.scales, kernel.zeros, kernel.group_size, kernel.int4, block_rows)
    torch.testing.assert_close(got + module.bias, reference_gemm(x, module), rtol=1e-4, atol=1e-4)
    assert prefill_block_rows(96, 576) % 16 == 0 and prefill_block_rows(5632, 2048) == 256 and prefill_block_rows(2048, 5632) == 96
    torch.testing.assert_close(kernel(x), reference_gemm(x, module), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spec", KERNEL_SPECS, ids=lambda s: s.describe().replace(" ", "_"))
@pytest.mark.parametrize("shape", [(96, 576), (40, 160), (256, 1536)])
@pytest.mark.parametrize("tokens", [1, 5, 16, 40])
def test_int8_activation_kernels_equal_their_reference(spec, shape, tokens):
    """W4A8 and W8A8: the integer kernels (AVX2 and portable) equal dequantise + matmul on the
    input quantised per 32-column block, and stay close to the float-activation result (for
    W8A8 the codes are made signed, c - 128, before the byte products: extreme codes 0 and
    255 occur in every row here, asymmetric ranges included)."""
    out_features, in_features = shape
    if spec.granularity == "group" and spec.group_size > in_features:
        pytest.skip("group larger than the row")
    g = torch.Generator().manual_seed(out_features + tokens + 1)
    module = QuantLinear(rtn_quantize(torch.randn(out_features, in_features, generator=g) * 0.05, spec), torch.randn(out_features, generator=g))
    kernel = KernelLinear(module, int8_activations=True)
    kernel.max_tokens = 64  # 40 tokens: the kernel, 16 rows at a time
    x = torch.randn(tokens, in_features, generator=g)
    expected = reference_gemm(quantize_activations_q8(x), module)
    torch.testing.assert_close(kernel(x), expected, rtol=1e-4, atol=1e-4)
    if tokens <= 16:
        gemm = kernel.kernels.gemm_w4a8 if spec.bits == 4 else kernel.kernels.gemm_w8a8
        portable = gemm(x, kernel.q, kernel.scales, kernel.zeros, kernel.group_size, True) + module.bias
        torch.testing.assert_close(portable, expected, rtol=1e-4, atol=1e-4)
    exact = reference_gemm(x, module)
    assert (kernel(x) - exact).norm() < 0.02 * exact.norm()


@pytest.mark.parametrize("fmt", ["q4_0", "q4_1", "q8_0", "q4_k"])
@pytest.mark.parametrize("tokens", [1, 5, 40])
def test_cpu_kernel_runs_ggml_blocks(fmt, tokens):
    """GGUF blocks on a 4- or 8-bit integer grid run on the kernel from their codes and
    effective scales (the blocks stay in the module for saving): W4 and W4A8 equal their
    references, and the kernel's codes are the blocks' codes."""
    g = torch.Generator().manual_seed(tokens)
    spec = QuantSpec().with_changes(format=fmt)
    module = QuantLinear(rtn_quantize(torch.randn(48, 512, generator=g) * 0.05, spec), torch.randn(48, generator=g))
    assert kernel_support(module) is None
    kernel = KernelLinear(module)
    assert torch.equal(unpack(kernel.q, spec.bits, 512), module.qweight.to_quantized().codes)
    x = torch.randn(tokens, 512, generator=g)
    torch.testing.assert_close(kernel(x), reference_gemm(x, module), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(kernel.dequantized_weight(), module.qweight.dequantize(), rtol=1e-6, atol=1e-7)
    if tokens <= 16:  # W4A8 or W8A8 (q8_0: llama.cpp's own pairing of q8_0 weights and activations)
        integer = KernelLinear(module, int8_activations=True)
        torch.testing.assert_close(integer(x), reference_gemm(quantize_activations_q8(x), module), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", ["q5_0", "q6_k", "q3_k", "iq4_nl"])
def test_cpu_kernel_declines_other_ggml_grids(fmt):
    module = QuantLinear(rtn_quantize(torch.randn(8, 256) * 0.05, QuantSpec().with_changes(format=fmt)))
    assert kernel_support(module) is not None
    assert "GGUF blocks" in format_support(module)  # the GPU kernels read lowbit's own packing only


def test_kernel_declines_what_it_cannot_run():
    linear = nn.Linear(100, 8)
    assert "multiples of 32" in kernel_support(QuantLinear(rtn_quantize(linear.weight, QuantSpec(bits=4, group_size=50))))
    assert "4- and 8-bit" in kernel_support(QuantLinear(rtn_quantize(nn.Linear(64, 8).weight, QuantSpec(bits=3, group_size=32))))
    with pytest.raises(LowbitError, match="cannot run this layer"):
        KernelLinear(QuantLinear(rtn_quantize(nn.Linear(64, 8).weight, QuantSpec(bits=3, group_size=32))))


def test_model_with_kernels_matches_reference(tiny_llama_dir):
    from lowbit import load_model

    loaded = load_model(str(tiny_llama_dir))
    quantize_model(loaded, RTNConfig(spec=QuantSpec(bits=4, group_size=32)), progress=False)
    x = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        expected = loaded.model(x).logits
        skipped = use_cpu_kernels(loaded.model)
        assert skipped == {} and isinstance(loaded.model.model.layers[0].mlp.down_proj, KernelLinear)
        # decode-sized steps go through the kernel
        torch.testing.assert_close(loaded.model(x).logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_kv_chunks_round_trip_within_their_error_bound(bits):
    from lowbit.numerics.quantization import dequantize

    g = torch.Generator().manual_seed(bits)
    keys = torch.randn(1, 2, 32, 16, generator=g)
    keys[..., 3] += 8  # an outlier key channel, as KIVI observed
    values = torch.randn(1, 2, 32, 16, generator=g)
    spec = KVSpec(bits=bits, group_size=32, residual=0)
    layer = QuantizedKVLayer(spec)
    k_hat, v_hat = layer.update(keys, values)
    assert layer.n_chunks == 1 and layer.keys.shape[2] == 0
    # the packed buffers hold exactly what the quantiser's own dequantisation gives
    assert torch.equal(k_hat, dequantize(quantize_keys(keys, spec)).reshape(1, 2, 16, 32).transpose(-1, -2))
    assert torch.equal(v_hat, dequantize(quantize_values(values, spec)).reshape(values.shape))
    # per key channel over the tokens: |error| <= one step of that channel's range
    k_step = (torch.maximum(keys.amax(2, keepdim=True), torch.zeros(1)) - torch.minimum(keys.amin(2, keepdim=True), torch.zeros(1))) / (2**bits - 1)
    assert ((keys - k_hat).abs() <= k_step * 1.01 + 1e-3).all()
    v_step = (torch.maximum(values.amax(-1, keepdim=True), torch.zeros(1)) - torch.minimum(values.amin(-1, keepdim=True), torch.zeros(1))) / (2**bits - 1)
    assert ((values - v_hat).abs() <= v_step * 1.01 + 1e-3).all()


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_planar_packing_round_trips_and_takes_whole_bytes(bits):
    from lowbit.inference.kv_attention import pack_planar, unpack_planar

    for n in (5, 16, 24, 33):
        codes = torch.randint(0, 2**bits, (3, 2, n), generator=torch.Generator().manual_seed(n), dtype=torch.uint8)
        packed = pack_planar(codes, bits)
        assert packed.shape[-1] == -(-n * bits // 8) and torch.equal(unpack_planar(packed, bits, n), codes)
    # byte j holds codes j and j + m (4 bits): planes of consecutive codes
    if bits == 4:
        assert pack_planar(torch.tensor([1, 2, 3, 4], dtype=torch.uint8), 4).tolist() == [1 | 3 << 4, 2 | 4 << 4]


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("head_dim", [16, 24])
def test_packed_kv_kernel_equals_attention_over_the_dequantised_cache(bits, head_dim):
    """The decode-step kernel reads the packed buffers; the reference dequantises them and
    runs torch's SDPA. Grouped-query heads (4 query heads on 2), a value group that does not
    divide the head (24 channels in groups of 16), buffers grown twice (9 chunks), a tail."""
    from lowbit.inference.kv_attention import attend, attend_reference

    g = torch.Generator().manual_seed(bits + head_dim)
    layer = QuantizedKVLayer(KVSpec(bits=bits, group_size=16, residual=4))
    for length in (40, 1, 1, 70, 1, 37):
        layer.update(torch.randn(2, 2, length, head_dim, generator=g) * 2, torch.randn(2, 2, length, head_dim, generator=g))
    view = layer.view()
    assert view.n_chunks == 9 and view.k_codes.shape[2] == 16 and 4 <= view.tail_k.shape[2] < 20
    for _ in range(3):
        query = torch.randn(2, 4, 1, head_dim, generator=g)
        torch.testing.assert_close(attend(query, view, head_dim**-0.5), attend_reference(query, view, head_dim**-0.5), rtol=1e-4, atol=1e-5)
    # one sequence, one key/value head (Gemma 3's shape): the kernel splits the chunks into parts and merges them
    single = QuantizedKVLayer(KVSpec(bits=bits, group_size=16, residual=4))
    single.update(torch.randn(1, 1, 200, head_dim, generator=g) * 3, torch.randn(1, 1, 200, head_dim, generator=g))
    assert single.view().n_chunks == 12
    query = torch.randn(1, 4, 1, head_dim, generator=g)
    torch.testing.assert_close(attend(query, single.view(), 0.4), attend_reference(query, single.view(), 0.4), rtol=1e-4, atol=1e-5)
    empty = QuantizedKVLayer(KVSpec(bits=bits, group_size=16, residual=4))
    empty.update(torch.randn(2, 2, 5, head_dim, generator=g), torch.randn(2, 2, 5, head_dim, generator=g))
    query = torch.randn(2, 4, 1, head_dim, generator=g)
    torch.testing.assert_close(attend(query, empty.view(), 0.3), attend_reference(query, empty.view(), 0.3), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen2"])
def test_decoding_through_the_packed_kv_kernel_gives_the_reference_tokens(family):
    """`generate` with a quantised cache reads it through the kernel on the CPU; with the
    kernel off every step dequantises the cache. Same greedy tokens, and the kernel ran."""
    from lowbit.inference import kv_attention

    model = tiny_model(family, seed=4)
    prompt = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(4))
    spec = KVSpec(bits=4, group_size=16, residual=8)
    calls = []
    real = kv_attention.attend
    kv_attention.attend = lambda *args: calls.append(1) or real(*args)
    try:
        fused = generate(model, prompt, max_new_tokens=32, kv=spec)
    finally:
        kv_attention.attend = real
    reference = generate(model, prompt, max_new_tokens=32, kv=spec, kv_kernel=False)
    assert fused.tokens == reference.tokens and fused.cache_bytes == reference.cache_bytes
    assert len(calls) >= 31
    assert model.config._attn_implementation != "lowbit_kv"  # restored after


def test_quantized_cache_keeps_a_full_precision_window_and_shrinks():
    spec = KVSpec(bits=4, group_size=16, residual=8)
    from transformers import LlamaConfig

    cache = QuantizedKVCache(spec, LlamaConfig(num_hidden_layers=1))
    keys, values = torch.randn(1, 2, 50, 64), torch.randn(1, 2, 50, 64)
    k_out, v_out = cache.layers[0].update(keys[:, :, :30], values[:, :, :30])
    k_out, v_out = cache.layers[0].update(keys[:, :, 30:], values[:, :, 30:])
    layer = cache.layers[0]
    assert layer.get_seq_length() == 50 and k_out.shape[2] == 50
    assert layer.quantized_tokens == 32 and layer.keys.shape[2] == 18  # 18 >= residual 8, < 8 + 16
    torch.testing.assert_close(k_out[:, :, 32:], keys[:, :, 32:])  # the newest tokens are exact
    assert not torch.equal(k_out[:, :, :32], keys[:, :, :32])
    float_bytes = 2 * keys.numel() * 4
    assert cache.stored_bytes() < 0.5 * float_bytes
    # per chunk and head: keys 64 channels x 8 bytes of codes, 64 float16 scales, 64 zero-points in 32 bytes;
    # values 16 tokens x 32 bytes, 16 x 4 groups of float16 scales, 64 zero-points in 32 bytes; then the float tail
    per_chunk = 2 * (64 * 8 + 64 * 2 + 32 + 16 * 32 + 16 * 4 * 2 + 32)
    assert cache.stored_bytes() == 2 * per_chunk + 2 * 18 * 2 * 64 * 4


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_eight_bit_kv_cache_barely_moves_the_model(family):
    model = tiny_model(family)
    windows = torch.randint(0, 256, (2, 96), generator=torch.Generator().manual_seed(0))
    q8 = kv_cache_quality(model, windows, KVSpec(bits=8, group_size=16, residual=16), chunk=16)
    q2 = kv_cache_quality(model, windows, KVSpec(bits=2, group_size=16, residual=16), chunk=16)
    assert q8.kld < q2.kld and q8.kld < 1e-3
    assert q2.cache_bytes < q8.cache_bytes < q8.float_cache_bytes


def test_chunked_float_cache_equals_one_pass():
    model = tiny_llama(seed=1)
    window = torch.randint(0, 256, (70,), generator=torch.Generator().manual_seed(1))
    from lowbit.evaluation.kv import _chunked_logprobs

    chunked = _chunked_logprobs(model, window, DynamicCache(config=model.config), chunk=16)
    with torch.no_grad():
        whole = torch.log_softmax(model(window[None, :-1]).logits[0], -1)
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen2"])
def test_lean_loop_matches_transformers_greedy(family):
    model = tiny_model(family, seed=2)
    prompt = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(2))
    ours = generate(model, prompt, max_new_tokens=20)
    with torch.no_grad():
        theirs = model.generate(prompt, max_new_tokens=20, do_sample=False, min_new_tokens=20)
    assert ours.tokens == theirs[0, 10:].tolist()
    assert ours.decode_tokens_per_second > 0


def test_lean_loop_stops_at_eos_and_refuses_a_graph_without_cuda():
    model = tiny_model("llama", seed=2)
    prompt = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(2))
    full = generate(model, prompt, max_new_tokens=12)
    eos = full.tokens[4]
    stopped = generate(model, prompt, max_new_tokens=12, eos_token_id=eos)
    assert stopped.tokens == full.tokens[: full.tokens.index(eos) + 1] and stopped.mode == "eager"
    if not torch.cuda.is_available():
        with pytest.raises(LowbitError, match="CUDA"):
            generate(model, prompt, max_new_tokens=4, cuda_graph=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_cuda_graph_decode_equals_eager_and_transformers(family):
    model = tiny_model(family, seed=2).to("cuda")
    prompt = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(2))
    eager = generate(model, prompt, max_new_tokens=20, cuda_graph=False)
    graph = generate(model, prompt, max_new_tokens=20, cuda_graph=True)
    # Gemma 3's sliding-window cache layers keep Python state: the loop declines the graph
    assert eager.mode == "eager" and graph.mode == ("eager" if family == "gemma3" else "cuda graph")
    assert graph.tokens == eager.tokens
    with torch.no_grad():
        theirs = model.generate(prompt.cuda(), max_new_tokens=20, do_sample=False, min_new_tokens=20)
    assert eager.tokens == theirs[0, 10:].tolist()


def test_lean_loop_with_a_quantised_cache_runs_and_mostly_agrees():
    model = tiny_llama(seed=3)
    prompt = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(3))
    exact = generate(model, prompt, max_new_tokens=16)
    q8 = generate(model, prompt, max_new_tokens=16, kv=KVSpec(bits=8, group_size=16, residual=8))
    assert sum(a == b for a, b in zip(exact.tokens, q8.tokens)) >= 12


def test_roofline_prices_bytes_and_flops():
    from lowbit.analysis.roofline import Machine, decode_cost, prefill_cost

    model = tiny_llama(seed=5)
    step = decode_cost(model, context=100)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert step.weight_bytes == sum(m.weight.numel() * 4 for m in linears)
    assert step.kv_bytes == 2 * 2 * 16 * 100 * 4 * 2  # 2 layers x (K, V) x 2 kv heads x head_dim 16 x 100 tokens x 4 bytes
    assert step.flops == pytest.approx(2 * sum(m.weight.numel() for m in linears) + 2 * 4 * 4 * 16 * 100)
    slow_memory = Machine(bandwidth_gbps=1.0, peak_gflops=1e6)
    assert step.bound(slow_memory) == "memory" and step.seconds(slow_memory) == pytest.approx(step.bytes / 1e9)
    assert prefill_cost(model, 512).intensity > 50 * step.intensity  # prefill reuses each weight 512 times
    quantize_model(_loaded(model), RTNConfig(spec=QuantSpec(bits=4, group_size=32)), progress=False)
    packed = decode_cost(model, context=100).weight_bytes
    assert packed < 0.3 * step.weight_bytes
    quantized = [m for m in model.modules() if isinstance(m, QuantLinear)]
    use_cpu_kernels(model)  # the kernels read the same codes, with float32 scales and zeros
    scales = sum(m.scales.numel() for m in quantized)
    assert decode_cost(model, context=100).weight_bytes - packed == scales * (4 + 4 - 2)  # fp16 scales -> fp32 scales + fp32 zeros


def _loaded(model):
    from conftest import byte_tokenizer
    from lowbit.models import architecture_for
    from lowbit.models.loading import LoadedModel

    return LoadedModel(model=model, tokenizer=byte_tokenizer(), source="tiny", arch=architecture_for(model.config.model_type))


def test_measure_variants_leaves_no_export_behind_when_it_fails(tmp_path, monkeypatch):
    """The GGUF rows' work directory (exports and their cached float conversions) goes even
    when a measurement stops on an error: two stopped 1.1B runs had left 2 GB behind."""
    import tempfile

    from lowbit.analysis.roofline import Machine
    from lowbit.inference.speed import measure_variants, random_llama

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model = random_llama(hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2, vocab=512)
    with pytest.raises(ValueError, match="needs the model as loaded from its GGUF file"):
        measure_variants(model, Machine(bandwidth_gbps=10, peak_gflops=100), variants=("float32", "Q4_0"))
    assert not list(tmp_path.glob("lowbit-speed-*"))


def test_speed_variants_build_what_they_say():
    """bench-decode's variants: the right modules (kernels, int8 head, W4A8), logits near the
    float model's, and the roofline pricing the int8 head below the float one."""
    from lowbit.analysis.roofline import Machine
    from lowbit.analysis.roofline_report import predicted_rows
    from lowbit.evaluation.metrics import linear_bits_per_weight
    from lowbit.inference.speed import VARIANTS, build_variant, random_llama

    model = random_llama(hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2, vocab=512)
    x = torch.randint(0, 512, (1, 9))
    bits = {}
    with torch.no_grad():
        reference = model(x).logits
        for variant in {v.removesuffix(" eager") for v in VARIANTS}:  # an eager variant builds its base
            built = build_variant(model, variant)
            bits[variant] = linear_bits_per_weight(built)
            kernels = [m for m in built.modules() if isinstance(m, KernelLinear)]
            if variant in ("float32", "bf16", "W4 ref"):
                assert not kernels
            else:
                assert all(k.int8_activations == (variant.startswith("W4A8") and k.int4) for k in kernels)
                assert isinstance(built.lm_head, KernelLinear) == variant.endswith("h8")
            error = (built(x).logits.float() - reference).norm() / reference.norm()
            assert error < (0.02 if variant in ("bf16", "W8") else 0.2), (variant, error)
    assert bits["W4 h8"] == bits["W4A8 h8"] == bits["W4"] == bits["W4 ref"] == pytest.approx(4 + 16 / 128)  # block linears only
    rows = {r.variant: r for r in predicted_rows(model, Machine(bandwidth_gbps=10, peak_gflops=100), ctx=16)}
    assert rows["W4 h8"].weight_bytes < rows["W4"].weight_bytes < rows["W8"].weight_bytes
    assert rows["W4 h8"].predicted_tokens_per_second > rows["W4"].predicted_tokens_per_second
