"""Exact pack/unpack round trips and the QuantizedWeight storage type."""

import pytest
import torch

from lowbit.algorithms import rtn_quantize
from lowbit.errors import LowbitError, SpecError
from lowbit.numerics import QuantSpec, dequantize, pack, packed_length, quantize, unpack
from lowbit.packed import QuantizedWeight


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("n", [1, 7, 8, 9, 576, 1001])
def test_pack_round_trip_is_exact(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 2**bits, (3, 5, n), generator=g, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (3, 5, packed_length(n, bits))
    assert torch.equal(unpack(packed, bits, n), codes)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("n", [1, 5, 8, 13, 576])
def test_fast_paths_equal_the_reference(bits, n):
    from lowbit.numerics.packing import pack_reference, unpack_reference

    codes = torch.randint(0, 2**bits, (4, n), generator=torch.Generator().manual_seed(n), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert torch.equal(packed, pack_reference(codes, bits))
    assert torch.equal(unpack(packed, bits, n), unpack_reference(packed, bits, n))


def test_packed_sizes():
    assert packed_length(576, 4) == 288  # two codes a byte
    assert packed_length(576, 3) == 216  # eight codes in three bytes
    assert packed_length(576, 2) == 144
    assert packed_length(576, 8) == 576
    assert packed_length(9, 4) == 8  # a short run pads to a whole run


def test_four_bit_layout_is_low_nibble_first():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=torch.uint8)
    assert pack(codes, 4).tolist() == [[0x21, 0x43, 0x65, 0x87]]


def test_pack_rejects_codes_that_do_not_fit():
    with pytest.raises(SpecError, match="does not fit in 3 bits"):
        pack(torch.tensor([[8]], dtype=torch.uint8), 3)
    with pytest.raises(SpecError, match="need"):
        unpack(torch.zeros(1, 5, dtype=torch.uint8), 4, 16)


SPECS = [
    QuantSpec(bits=4, group_size=128),
    QuantSpec(bits=3, symmetric=False, group_size=64),
    QuantSpec(bits=2, symmetric=False, group_size=100),
    QuantSpec(bits=5, symmetric=False, zero_point="float", group_size=32),
    QuantSpec(bits=8, granularity="channel", group_size=None),
    QuantSpec(bits=8, symmetric=False, granularity="tensor", group_size=None),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe().replace(" ", "_"))
def test_quantized_weight_round_trip_and_storage(spec):
    w = torch.randn(96, 576, generator=torch.Generator().manual_seed(1))
    q = quantize(w, spec)
    qw = QuantizedWeight.from_quantized(q)
    back = qw.to_quantized()
    assert torch.equal(back.codes, q.codes)
    assert torch.equal(back.scale, q.scale)
    assert (back.zero is None) == (q.zero is None)
    if q.zero is not None:
        assert torch.equal(back.zero, q.zero)
    assert torch.equal(qw.dequantize(), dequantize(q))
    # storage counts everything: codes, scales, zero-points
    n_groups = q.scale.numel()
    expected = 96 * packed_length(576, spec.bits) + n_groups * 2
    if spec.has_zero:
        expected += 2 * n_groups if spec.zero_point == "float" else packed_length(n_groups, spec.bits)
    assert qw.nbytes == expected
    assert qw.bits_per_weight == pytest.approx(8 * expected / w.numel())
    rebuilt = QuantizedWeight.from_tensors(qw.tensors(), qw.shape, qw.group_size, spec)
    assert torch.equal(rebuilt.dequantize(), qw.dequantize())
    # what the kernels read without unpacking the codes: to_quantized's scale and zero exactly
    scale, zero = qw.scale_and_zero()
    assert torch.equal(scale, back.scale)
    assert (zero is None) == (back.zero is None)
    if zero is not None:
        assert torch.equal(zero, back.zero)


def test_bits_per_weight_of_common_settings():
    w = torch.randn(512, 4096)
    assert rtn_quantize(w, QuantSpec(bits=4, group_size=128)).bits_per_weight == pytest.approx(4 + 16 / 128)
    assert rtn_quantize(w, QuantSpec(bits=4, symmetric=False, group_size=128)).bits_per_weight == pytest.approx(4 + 16 / 128 + 4 / 128)
    assert rtn_quantize(w, QuantSpec(bits=8, granularity="channel", group_size=None)).bits_per_weight == pytest.approx(8 + 16 / 4096)


def test_from_tensors_rejects_wrong_shapes():
    qw = rtn_quantize(torch.randn(8, 64), QuantSpec(bits=4, group_size=32))
    bad = dict(qw.tensors(), scales=torch.zeros(8, 3, dtype=torch.float16))
    with pytest.raises(LowbitError, match="corrupted"):
        QuantizedWeight.from_tensors(bad, qw.shape, qw.group_size, qw.spec, "l")
    with pytest.raises(LowbitError, match="lacks tensor 'qdata'"):
        QuantizedWeight.from_tensors({"scales": qw.scales}, qw.shape, qw.group_size, qw.spec, "l")
