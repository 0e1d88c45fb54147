"""Properties of the numeric core: Eq. 3.1-3.3, granularities, ranges, error breakdown."""

import math

import pytest
import torch

from lowbit.errors import SpecError
from lowbit.numerics import CodebookFormat, QuantSpec, dequantize, error_breakdown, quantize
from lowbit.numerics.formats import CODEBOOKS, IntFormat, register_codebook
from lowbit.numerics.quantization import expand_groups, representable_range


def randw(rows=48, cols=200, seed=0, heavy=False):
    g = torch.Generator().manual_seed(seed)
    if heavy:  # Student-t-like tails: a few large values per row
        return torch.randn(rows, cols, generator=g) / torch.rand(rows, cols, generator=g).clamp(min=0.05).sqrt()
    return torch.randn(rows, cols, generator=g)


SPECS = [
    QuantSpec(bits=b, symmetric=sym, granularity=gran, group_size=gs, zero_point=zp)
    for b in (2, 3, 4, 8)
    for sym in (True, False)
    for zp in (("int",) if sym else ("int", "float"))
    for gran, gs in (("tensor", None), ("channel", None), ("group", 64), ("group", 48))
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe().replace(" ", "_"))
def test_error_within_half_step_inside_range(spec):
    x = randw()
    q = quantize(x, spec)
    x_hat = dequantize(q)
    lo, hi = representable_range(q)
    gs = q.group_size
    rows = x.reshape(1, -1) if spec.granularity == "tensor" else x
    lo, hi = expand_groups(lo, gs, rows.shape[1]), expand_groups(hi, gs, rows.shape[1])
    scale = expand_groups(q.scale, gs, rows.shape[1])
    inside = (rows >= lo) & (rows <= hi)
    err = (rows - x_hat.reshape(rows.shape)).abs()
    step = scale.expand_as(rows)
    assert inside.float().mean() > 0.9
    # |x - x_hat| <= S/2 for every value inside the representable range (plus float slack)
    assert (err[inside] <= step[inside] / 2 * (1 + 1e-5) + 1e-7).all()
    # With min-max ranges nothing is off by more than one step: only the rounding of an
    # integer Z (Eq. 3.3) or of a float16 scale pushes an extreme value past the range.
    assert (err <= step * (1 + 1e-5) + 1e-7).all()
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) < 2**spec.bits


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_zero_is_exact(bits, symmetric):
    x = randw(8, 64)
    x[:, ::7] = 0.0
    x[3] = x[3].abs() + 0.5  # a row with no negative values: Z must still put 0 on a level
    q = quantize(x, QuantSpec(bits=bits, symmetric=symmetric, granularity="group", group_size=16))
    x_hat = dequantize(q)
    assert torch.equal(x_hat[x == 0], torch.zeros_like(x_hat[x == 0]))


def test_asymmetric_int_zero_point_follows_eq_3_3():
    x = torch.tensor([[-1.0, 0.0, 2.0, 3.0]])
    q = quantize(x, QuantSpec(bits=4, symmetric=False, granularity="channel", group_size=None, scale_dtype="float32"))
    scale = 4.0 / 15
    assert q.scale.item() == pytest.approx(scale)
    assert q.zero.item() == round(1.0 / scale)  # Z = Round(-x_min / S + q_min), q_min = 0
    assert torch.equal(q.codes[0], torch.round(x[0] / scale + q.zero.item()).to(torch.uint8))


def test_symmetric_scale_follows_eq_3_3():
    x = torch.tensor([[-0.7, 0.1, 0.35]])
    q = quantize(x, QuantSpec(bits=4, granularity="tensor", group_size=None, scale_dtype="float32"))
    assert q.scale.item() == pytest.approx(0.7 / 7)  # S = alpha / (2^(n-1) - 1)
    assert dequantize(q)[0, 0].item() == pytest.approx(-0.7)


def test_granularity_shapes():
    x = randw(48, 200)
    assert quantize(x, QuantSpec(granularity="tensor", group_size=None)).scale.shape == (1, 1)
    assert quantize(x, QuantSpec(granularity="channel", group_size=None)).scale.shape == (48, 1)
    assert quantize(x, QuantSpec(granularity="token", group_size=None)).scale.shape == (48, 1)
    assert quantize(x, QuantSpec(granularity="group", group_size=64)).scale.shape == (48, 4)  # 200 = 3*64 + 8
    assert quantize(x, QuantSpec(granularity="group", group_size=40)).scale.shape == (48, 5)
    q = quantize(x, QuantSpec(symmetric=False, granularity="group", group_size=64))
    assert q.zero.shape == (48, 4) and q.codes.shape == (48, 200)


def test_short_last_group_uses_only_its_own_columns():
    x = randw(16, 576, seed=3)
    spec = QuantSpec(bits=4, symmetric=False, group_size=128)  # 576 = 4 * 128 + 64
    q = quantize(x, spec)
    tail = quantize(x[:, 512:], QuantSpec(bits=4, symmetric=False, granularity="channel", group_size=None))
    assert torch.equal(q.scale[:, 4:], tail.scale)
    assert torch.equal(q.zero[:, 4:], tail.zero)
    assert torch.equal(q.codes[:, 512:], tail.codes)
    head = quantize(x[:, :128], QuantSpec(bits=4, symmetric=False, granularity="channel", group_size=None))
    assert torch.equal(q.scale[:, :1], head.scale)


def test_per_tensor_is_one_scale_for_all():
    x = randw(8, 32)
    q = quantize(x, QuantSpec(bits=8, granularity="tensor", group_size=None, scale_dtype="float32"))
    assert q.scale.item() == pytest.approx(x.abs().max().item() / 127)


def test_rounding_and_clipping_add_up_to_total_error():
    x = randw(32, 256, heavy=True)
    for spec in (QuantSpec(bits=4, group_size=64, range="mse"), QuantSpec(bits=3, symmetric=False, group_size=64, range="percentile", percentile=95.0)):
        q = quantize(x, spec)
        eb = error_breakdown(x, q)
        total = (x - dequantize(q)).square().sum().item()
        assert eb.rounding > 0 and eb.clipping > 0
        assert eb.total == pytest.approx(total, rel=1e-5)


@pytest.mark.parametrize("symmetric, zero_point", [(True, "int"), (False, "float")])
def test_minmax_does_not_clip(symmetric, zero_point):
    x = randw(32, 256, heavy=True)
    q = quantize(x, QuantSpec(bits=4, symmetric=symmetric, zero_point=zero_point, group_size=64, scale_dtype="float32"))
    eb = error_breakdown(x, q)
    assert eb.clipping <= 1e-9 * eb.signal  # only float rounding at a group's extremes
    assert eb.clipped_fraction <= 2 / 64


def test_integer_zero_point_clips_at_most_half_a_step():
    # Rounding Z to an integer (Eq. 3.3) shifts the grid by up to S/2, so one end of the
    # min-max range can fall just outside it.
    x = randw(32, 256, heavy=True)
    q = quantize(x, QuantSpec(bits=3, symmetric=False, group_size=64, scale_dtype="float32"))
    lo, hi = (expand_groups(t, 64, 256) for t in representable_range(q))
    step = expand_groups(q.scale, 64, 256)
    overshoot = torch.maximum(lo - x, x - hi).clamp(min=0)
    assert overshoot.max() > 0
    assert (overshoot <= step / 2 * (1 + 1e-5)).all()


def test_mse_range_beats_minmax_on_heavy_tails():
    x = randw(64, 512, heavy=True, seed=5)
    for bits in (2, 3, 4):
        minmax = error_breakdown(x, quantize(x, QuantSpec(bits=bits, group_size=128))).total
        mse = error_breakdown(x, quantize(x, QuantSpec(bits=bits, group_size=128, range="mse"))).total
        assert mse < 0.9 * minmax


@pytest.mark.parametrize("spec", [QuantSpec(bits=4, symmetric=False, group_size=128, range="mse"),
                                  QuantSpec(bits=3, group_size=64, range="mse"),
                                  QuantSpec(bits=2, symmetric=False, group_size=32, zero_point="float", range="mse"),
                                  QuantSpec(range="mse").with_changes(format="q4_k")])
def test_the_coarse_to_fine_range_search_matches_the_exhaustive_one(spec):
    """25 of the grid's 81 shrink factors, visited coarse to fine, find (nearly) the same
    ranges as trying all 81, with and without importance weights."""
    from lowbit.numerics.quantization import _group_sq_error, find_params

    x = randw(64, 512, heavy=True, seed=7)
    importance = torch.rand(512, generator=torch.Generator().manual_seed(8)) ** 4
    group = spec.group_size_for(512)
    for weights in (None, importance):
        errors = {}
        for exhaustive in (False, True):
            scale, zero = find_params(x, spec, group, weights, exhaustive=exhaustive)
            errors[exhaustive] = _group_sq_error(x, scale, zero, spec, group, weights).sum().item()
        minmax_spec = spec.with_changes(range="minmax")
        scale, zero = find_params(x, minmax_spec, group, weights)
        minmax = _group_sq_error(x, scale, zero, spec, group, weights).sum().item()
        # (a K-quant re-stores its group scales jointly at the end, so either may come out ahead)
        assert errors[False] <= 1.01 * errors[True] and max(errors.values()) < minmax, (errors, minmax)


def test_percentile_clips_the_tail():
    x = randw(16, 1000, heavy=True, seed=6)
    q = quantize(x, QuantSpec(bits=8, granularity="channel", group_size=None, range="percentile", percentile=99.0))
    assert 0.005 < error_breakdown(x, q).clipped_fraction < 0.02


def test_float_offset_requantises_a_q4_1_grid_losslessly():
    # Build weights exactly on a Q4_1 grid: per 32-group float16 scale d and minimum m, x = d*q + m.
    g = torch.Generator().manual_seed(0)
    d = (torch.rand(16, 8, generator=g) * 0.01 + 0.001).half().float()
    m = (-torch.rand(16, 8, generator=g) * 0.05).half().float()
    codes = torch.randint(0, 16, (16, 8, 32), generator=g).float()
    codes[..., 0], codes[..., 1] = 0, 15  # every group spans its full range, as llama.cpp writes it
    w = (codes * d[..., None] + m[..., None]).reshape(16, 256)
    float_zero = dequantize(quantize(w, QuantSpec(bits=4, symmetric=False, zero_point="float", group_size=32)))
    assert (float_zero - w).abs().max().item() <= 1e-6 * w.abs().max().item()
    int_zero = dequantize(quantize(w, QuantSpec(bits=4, symmetric=False, zero_point="int", group_size=32)))
    assert (int_zero - w).abs().max().item() > 1e-3 * w.abs().max().item()


def test_codebook_of_the_integer_grid_matches_int_format():
    levels = tuple(i / 7 for i in range(-7, 8))
    fmt = CODEBOOKS.get("test-int4-grid") or register_codebook(CodebookFormat("test-int4-grid", levels))
    assert fmt.bits == 4
    x = randw(16, 128)
    # float32 scales: S = alpha (codebook) and S = alpha / 7 (integers) then round alike
    via_codebook = dequantize(quantize(x, QuantSpec(bits=4, format=fmt.name, group_size=32, scale_dtype="float32")))
    via_int = dequantize(quantize(x, QuantSpec(bits=4, group_size=32, scale_dtype="float32")))
    torch.testing.assert_close(via_codebook, via_int, rtol=1e-5, atol=1e-6)


def test_codebook_picks_nearest_level():
    fmt = CodebookFormat("t", (-1.0, -0.25, 0.0, 0.5, 1.0))
    values = torch.tensor([-0.9, -0.6, -0.1, 0.2, 0.3, 0.76, 1.0])
    codes = fmt.encode(values)
    table = fmt.table()
    nearest = (values[:, None] - table[None]).abs().argmin(-1)
    assert torch.equal(codes.long(), nearest)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"bits": 1}, "outside 2-8"),
        ({"bits": 9}, "outside 2-8"),
        ({"group_size": 0}, "positive integer"),
        ({"granularity": "row"}, "unknown"),
        ({"granularity": "channel", "group_size": 64}, "only applies"),
        ({"range": "entropy"}, "unknown"),
        ({"format": "nf3"}, "unknown"),
    ],
)
def test_spec_rejects_impossible_settings(kwargs, message):
    with pytest.raises(SpecError, match=message):
        QuantSpec(**kwargs)


def test_group_larger_than_layer_is_rejected():
    with pytest.raises(SpecError, match="larger than in_features 200"):
        quantize(randw(), QuantSpec(group_size=256), name="layer")


def test_nan_weights_are_rejected():
    x = randw()
    x[3, 5] = float("nan")
    x[4, 1] = float("inf")
    with pytest.raises(SpecError, match="2 NaN/Inf"):
        quantize(x, QuantSpec(), name="blk.0")


def test_int_format_ranges():
    assert (IntFormat(4, True).qmin, IntFormat(4, True).qmax) == (-8, 7)
    assert (IntFormat(4, False).qmin, IntFormat(4, False).qmax) == (0, 15)
    assert (IntFormat(8, True).qmin, IntFormat(8, True).qmax) == (-128, 127)
    assert math.log2(IntFormat(3, False).code_count) == 3
