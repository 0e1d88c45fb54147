"""W8A8 and LLM.int8(): the integer paths against the §3.4 reference and their limits."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.modules.int8 import LLMInt8Linear, W8A8Linear, int8_matmul
from lowbit.numerics import QuantSpec, Quantized, quantize
from lowbit.numerics.qmatmul import quantized_matmul


def layer_and_input(seed=0, outliers=True):
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(192, 80, bias=True)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(80, 192, generator=g) * 0.05)
        linear.bias.copy_(torch.randn(80, generator=g) * 0.1)
    x = torch.randn(3, 11, 192, generator=g)
    if outliers:
        x[..., [5, 77]] *= 40  # two systematic outlier channels, as in report §6.1
    return linear, x


def reference_w8a8(x, weight, x_quantized: Quantized | None = None):
    """The integer product of lowbit.numerics (§3.4, int64 accumulation), float64."""
    x2d = x.reshape(-1, x.shape[-1])
    xq = x_quantized or quantize(x2d, QuantSpec(bits=8, granularity="token", group_size=None, scale_dtype="float32"))
    wq = quantize(weight.detach(), QuantSpec(bits=8, granularity="channel", group_size=None, scale_dtype="float32"))
    return quantized_matmul(xq, wq)


@pytest.mark.parametrize("m,k,n", [(1, 64, 8), (17, 2500, 24), (5, 1024, 3)])
def test_cpu_int8_matmul_equals_torch_int_mm_exactly(m, k, n):
    g = torch.Generator().manual_seed(k)
    x = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    x[0], w[0] = 127, -127  # the extreme products, summed over whole rows
    expected = x.long() @ w.long().t()
    assert torch.equal(int8_matmul(x, w).long(), expected)
    if m > 16:  # torch's CPU _int_mm wants more than 16 rows
        assert torch.equal(torch._int_mm(x, w.t()).long(), expected)
    if torch.cuda.is_available():  # cuBLAS's int8 path (rows padded below 17), or the float one
        assert torch.equal(int8_matmul(x.cuda(), w.cuda()).long().cpu(), expected)


def test_w8a8_per_token_equals_the_integer_reference():
    linear, x = layer_and_input()
    module = W8A8Linear.from_linear(linear, "token")
    expected = reference_w8a8(x, linear.weight) + linear.bias.double()
    got = module(x).reshape(-1, 80).double()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert module.weight_int8.dtype == torch.int8


def test_w8a8_static_per_tensor_equals_the_integer_reference():
    linear, x = layer_and_input(seed=1)
    scale = torch.tensor(x.abs().max().item() / 127 * 0.5)  # a calibrated scale that clips the largest values
    module = W8A8Linear.from_linear(linear, "tensor", input_scale=scale)
    x2d = x.reshape(-1, 192)
    spec = QuantSpec(bits=8, granularity="tensor", group_size=None, scale_dtype="float32")
    codes = (torch.clamp(torch.round(x2d / scale), -127, 127) + 128).to(torch.uint8)
    xq = Quantized(codes=codes, scale=scale.reshape(1, 1), zero=None, group_size=x2d.numel(), spec=spec)
    expected = reference_w8a8(x, linear.weight, xq) + linear.bias.double()
    torch.testing.assert_close(module(x).reshape(-1, 80).double(), expected, rtol=1e-5, atol=1e-5)


def test_llm_int8_at_infinite_threshold_is_plain_w8a8():
    linear, x = layer_and_input()
    plain = W8A8Linear.from_linear(linear, "token")
    mixed = LLMInt8Linear.from_linear(linear, threshold=float("inf"), outlier_channels=torch.tensor([5, 77]))
    assert torch.equal(mixed(x), plain(x))
    assert mixed.outlier_share == 0.0


def test_llm_int8_at_zero_threshold_is_float():
    linear, x = layer_and_input()
    mixed = LLMInt8Linear.from_linear(linear, threshold=0.0, outlier_channels=torch.arange(192))
    torch.testing.assert_close(mixed(x), F.linear(x, linear.weight, linear.bias), rtol=1e-5, atol=1e-5)
    assert mixed.outlier_share == 1.0


def test_llm_int8_handles_outliers_that_plain_w8a8_does_not():
    linear, x = layer_and_input()
    exact = F.linear(x, linear.weight, linear.bias)
    plain = W8A8Linear.from_linear(linear, "token")(x)
    mixed_module = LLMInt8Linear.from_linear(linear, threshold=6.0, outlier_channels=torch.tensor([5, 77]))
    mixed = mixed_module(x)
    err = lambda y: ((y - exact).norm() / exact.norm()).item()  # noqa: E731
    assert err(mixed) < 0.25 * err(plain)
    assert mixed_module.outlier_share == pytest.approx(2 / 192)


def test_run_time_outliers_without_stored_columns_use_dequantised_weights():
    linear, x = layer_and_input()
    module = LLMInt8Linear.from_linear(linear, threshold=6.0, outlier_channels=torch.tensor([], dtype=torch.long))
    x2d = x.reshape(-1, 192)
    w_deq = module.weight_int8.float() * module.weight_scale[:, None]
    regular = x2d.masked_fill(x2d.abs().amax(0) >= 6.0, 0.0)
    spec = QuantSpec(bits=8, granularity="token", group_size=None, scale_dtype="float32")
    int_part = reference_w8a8(regular, linear.weight, quantize(regular, spec))
    cols = torch.tensor([5, 77])
    expected = int_part + (x2d[:, cols].double() @ w_deq[:, cols].double().T) + linear.bias.double()
    torch.testing.assert_close(module(x).reshape(-1, 80).double(), expected, rtol=1e-5, atol=1e-5)
