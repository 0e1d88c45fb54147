"""The integer matmul of §3.4 equals dequantise-then-matmul."""

import pytest
import torch

from lowbit.numerics import QuantSpec, dequantize, quantize
from lowbit.numerics.qmatmul import quantized_matmul, symmetric_matmul


def data(tokens=24, k=200, n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=g) * torch.linspace(0.2, 3.0, tokens)[:, None] + 0.3
    w = torch.randn(n, k, generator=g) * 0.05
    return x, w


ACT = [
    QuantSpec(bits=8, symmetric=False, granularity="token", group_size=None, scale_dtype="float32"),
    QuantSpec(bits=8, symmetric=True, granularity="token", group_size=None, scale_dtype="float32"),
    QuantSpec(bits=8, symmetric=False, granularity="tensor", group_size=None, scale_dtype="float32"),
]
WEIGHT = [
    QuantSpec(bits=8, symmetric=False, granularity="channel", group_size=None),
    QuantSpec(bits=4, symmetric=True, granularity="channel", group_size=None),
    QuantSpec(bits=4, symmetric=False, granularity="group", group_size=64),  # 200 = 3*64 + 8: a short last group
    QuantSpec(bits=3, symmetric=False, granularity="tensor", group_size=None),
]


@pytest.mark.parametrize("act", ACT, ids=lambda s: s.describe())
@pytest.mark.parametrize("wspec", WEIGHT, ids=lambda s: s.describe())
def test_integer_matmul_equals_dequantised_matmul(act, wspec):
    x, w = data()
    xq, wq = quantize(x, act), quantize(w, wspec)
    expected = dequantize(xq, torch.float64) @ dequantize(wq, torch.float64).T
    got = quantized_matmul(xq, wq)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_symmetric_case_collapses_to_one_product():
    x, w = data(seed=1)
    xq = quantize(x, QuantSpec(bits=8, granularity="token", group_size=None, scale_dtype="float32"))
    wq = quantize(w, QuantSpec(bits=8, granularity="channel", group_size=None))
    torch.testing.assert_close(symmetric_matmul(xq, wq), quantized_matmul(xq, wq), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(symmetric_matmul(xq, wq), dequantize(xq, torch.float64) @ dequantize(wq, torch.float64).T, rtol=1e-9, atol=1e-9)


def test_w8a8_is_close_to_float():
    x, w = data(seed=2)
    xq = quantize(x, QuantSpec(bits=8, granularity="token", group_size=None))
    wq = quantize(w, QuantSpec(bits=8, granularity="channel", group_size=None))
    ref = x.double() @ w.double().T
    err = (quantized_matmul(xq, wq) - ref).norm() / ref.norm()
    assert err < 0.01
