"""The Triton W4A16/W8A16 kernel against the reference path.

On a GPU the compiled kernel runs; without one, if Triton is installed, the same kernel runs
in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1 must be set before anything imports
Triton, so conftest.py sets it when no GPU is present). Without Triton the tests skip: lowbit
does not depend on it. Triton 3.6's interpreter calls int() on one-element arrays, which
NumPy 2.4 refuses; there the interpreted tests skip and say so.
"""

import importlib
import os

import numpy as np
import pytest
import torch
from torch import nn

from lowbit.algorithms import rtn_quantize
from lowbit.modules import QuantLinear
from lowbit.numerics import QuantSpec

CUDA = torch.cuda.is_available()
pytest.importorskip("triton")
if not CUDA:
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU, and TRITON_INTERPRET=1 was not set before Triton was imported", allow_module_level=True)
    if tuple(int(p) for p in np.__version__.split(".")[:2]) >= (2, 4):
        pytest.skip(f"Triton's interpreter fails with NumPy {np.__version__} (needs < 2.4); run on a GPU", allow_module_level=True)
tg = importlib.import_module("lowbit.kernels.triton_gemm")
DEVICE = "cuda" if CUDA else "cpu"
# one block configuration for the many small test shapes (bench/gpu_kernels.py checks the
# autotuned configurations against the reference on large shapes)
tg.FIXED_CONFIG = {"BLOCK_N": 32, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2}

SPECS = [
    QuantSpec(bits=4, group_size=32),
    QuantSpec(bits=4, group_size=64, symmetric=False),
    QuantSpec(bits=4, group_size=128),
    QuantSpec(bits=4, group_size=128, symmetric=False, zero_point="float"),
    QuantSpec(bits=4, group_size=48, symmetric=False),  # groups not aligned to the kernel's chunks
    QuantSpec(bits=4, granularity="channel", group_size=None),
    QuantSpec(bits=8, granularity="channel", group_size=None),
    QuantSpec(bits=8, group_size=128, symmetric=False),
    QuantSpec(bits=8, group_size=32),
]


def layer(spec, out_features, in_features, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=g) * 0.05)
        if bias:
            linear.bias.copy_(torch.randn(out_features, generator=g) * 0.1)
    return QuantLinear(rtn_quantize(linear.weight, spec), linear.bias).to(DEVICE), g


def check(kernel, module, x):
    expected = tg.reference_gemm(x, module)
    got = kernel(x)
    assert got.dtype == x.dtype and got.shape == expected.shape
    # fp16 activations and fp16 scales/offsets: the error is fp16 rounding of the inputs
    # to each product, about 1e-3 of the output's scale
    torch.testing.assert_close(got.float(), expected, rtol=1e-2, atol=2e-3 * expected.abs().max().item())


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe().replace(" ", "_"))
@pytest.mark.parametrize("shape", [(96, 256), (40, 160), (70, 200)])
@pytest.mark.parametrize("tokens", [1, 5, 16])
def test_triton_kernel_equals_reference(spec, shape, tokens):
    out_features, in_features = shape
    if spec.granularity == "group" and spec.group_size > in_features:
        pytest.skip("group larger than the row")
    module, g = layer(spec, out_features, in_features, seed=out_features + tokens)
    kernel = tg.TritonLinear(module, torch.float16)
    x = torch.randn(tokens, in_features, generator=g).to(DEVICE, torch.float16)
    check(kernel, module, x)


@pytest.mark.parametrize("spec", [QuantSpec(bits=4, group_size=32), QuantSpec(bits=8, granularity="channel", group_size=None)],
                         ids=["w4", "w8"])
def test_triton_kernel_odd_shapes(spec):
    """Odd in_features (a half-filled last byte at 4 bits, a short last group) and odd out_features."""
    module, g = layer(spec, 37, 101, seed=7, bias=False)
    kernel = tg.TritonLinear(module, torch.float16)
    x = torch.randn(3, 101, generator=g).to(DEVICE, torch.float16)
    check(kernel, module, x)


@pytest.mark.parametrize("layout", ["pairs", "words"])
@pytest.mark.parametrize("spec", [spec for spec in SPECS if spec.bits == 4], ids=lambda s: s.describe().replace(" ", "_"))
@pytest.mark.parametrize("shape", [(96, 256), (70, 200), (37, 104)])
def test_both_one_token_kernels_equal_reference(layout, spec, shape, monkeypatch):
    """The byte (even/odd columns) and word (int32, column order) GEMVs: a GPU picks one per
    shape by timing both, so both must be right."""
    out_features, in_features = shape
    if spec.granularity == "group" and spec.group_size > in_features:
        pytest.skip("group larger than the row")
    monkeypatch.setattr(tg, "GEMV_LAYOUT", layout)
    module, g = layer(spec, out_features, in_features, seed=out_features)
    kernel = tg.TritonLinear(module, torch.float16)
    x = torch.randn(1, in_features, generator=g).to(DEVICE, torch.float16)
    check(kernel, module, x)


def test_word_kernel_needs_whole_words(monkeypatch):
    """Rows whose length is not a multiple of 8 columns have no whole int32 words: the byte kernel."""
    monkeypatch.setattr(tg, "GEMV_LAYOUT", "words")
    module, _ = layer(QuantSpec(bits=4, group_size=32), 8, 100, seed=1)
    kernel = tg.TritonLinear(module, torch.float16)
    x = torch.zeros(1, 100, device=DEVICE, dtype=torch.float16)
    assert tg._gemv_layout(x, module.qdata, kernel.scales_t, kernel.offsets_t, 100, 32, 4) == "pairs"
    module, _ = layer(QuantSpec(bits=4, group_size=32), 8, 104, seed=1)
    assert tg._gemv_layout(x, module.qdata, kernel.scales_t, kernel.offsets_t, 104, 32, 4) == "words"


def test_triton_linear_batches_beyond_the_kernel_use_the_reference_path():
    module, g = layer(QuantSpec(bits=4, group_size=64), 48, 128, seed=3)
    kernel = tg.TritonLinear(module, torch.float16)
    x = torch.randn(2, 20, 128, generator=g).to(DEVICE, torch.float16)
    torch.testing.assert_close(kernel(x), module(x))


def test_triton_kernels_swap_and_decline():
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 16))
    model[0] = QuantLinear(rtn_quantize(model[0].weight.detach(), QuantSpec(bits=4, group_size=32)), model[0].bias.detach())
    model[1] = QuantLinear(rtn_quantize(model[1].weight.detach(), QuantSpec(bits=3, group_size=32)), model[1].bias.detach())
    skipped = tg.use_triton_kernels(model)
    assert isinstance(model[0], tg.TritonLinear)
    assert isinstance(model[1], QuantLinear) and "4- and 8-bit" in skipped["1"]
