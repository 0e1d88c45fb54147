"""`QuantizedWeight`: a weight matrix in its real low-bit storage form.

This module is the one home of lowbit's packed weight layout; checkpoints store exactly
these tensors and kernels read them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError
from lowbit.numerics.double_quant import DoubleQuant
from lowbit.numerics.ggml_blocks import pack_rows, unpack_rows
from lowbit.numerics.packing import pack, packed_length, unpack
from lowbit.numerics.quantization import Quantized, dequantize
from lowbit.numerics.spec import QuantSpec


ITEMSIZE = {"uint8": 1, "int32": 4, "float16": 2, "float32": 4}


def bits_per_weight(nbytes: int, weights: int) -> float:
    """Storage bits per weight: 8 · stored bytes (codes, scales, zero-points) / weights. The
    one definition every table, header and report uses."""
    return 8.0 * nbytes / weights


def scale_grid(shape: tuple[int, int], group_size: int, spec: QuantSpec) -> tuple[int, int]:
    """(rows, n_groups) of the scales of a weight of ``shape``: one per group of each row,
    one per row (per channel) or a single one (per tensor)."""
    out_features, in_features = shape
    n_groups = 1 if spec.granularity in ("tensor", "channel", "token") else -(-in_features // group_size)
    return (1 if spec.granularity == "tensor" else out_features), n_groups


def stored_layout(shape: tuple[int, int], group_size: int, spec: QuantSpec) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name -> (shape, dtype) of every tensor a weight of ``shape`` (out, in) stores under
    ``spec`` with ``group_size`` columns per group (the layout of `QuantizedWeight`; an
    act-order ``g_idx``, int32 (in,), comes on top)."""
    out_features, in_features = shape
    if spec.ggml is not None:  # the GGUF blocks of each row; scales live inside them
        return {"qdata": ((out_features, in_features // spec.ggml.block * spec.ggml.type_size), "uint8")}
    rows, n_groups = scale_grid(shape, group_size, spec)
    layout = {"qdata": ((out_features, packed_length(in_features, spec.bits)), "uint8")}
    if spec.double_quant:
        layout.update(DoubleQuant.layout((rows, n_groups)))
    else:
        layout["scales"] = ((rows, n_groups), spec.scale_dtype)
    if spec.has_zero:
        if spec.zero_point == "float":
            layout["zeros"] = ((rows, n_groups), spec.scale_dtype)
        else:
            layout["zeros"] = ((packed_length(rows * n_groups, spec.bits),), "uint8")
    return layout


def stored_bytes(shape: tuple[int, int], spec: QuantSpec) -> int:
    """Bytes a weight of ``shape`` stores under ``spec`` (no g_idx), without building it."""
    group_size = shape[0] * shape[1] if spec.granularity == "tensor" else spec.group_size_for(shape[1])
    return sum(math.prod(dims) * ITEMSIZE[dtype] for dims, dtype in stored_layout(shape, group_size, spec).values())


@dataclass
class QuantizedWeight:
    """A linear layer's weight W (out_features, in_features), stored packed.

    qdata:  uint8 (out_features, packed_length(in_features, bits)): the codes of each row
            packed along in_features (`lowbit.numerics.packing`).
    scales: ``spec.scale_dtype`` (out_features, n_groups) with n_groups = ceil(in_features /
            group_size); (1, 1) per tensor; (out_features, 1) per channel. With
            ``spec.double_quant`` the scales are stored 8-bit instead (`DoubleQuant`:
            scales_q uint8 (rows * n_groups,), scales_block float32, scales_offset float32)
            and ``scales`` holds their dequantised values in memory only.
    zeros:  asymmetric ``int``: uint8 (packed_length(rows * n_groups, bits),), the integer
            zero-points (rows, n_groups) flattened row-major and packed like the codes (they
            fit in ``bits`` bits; one flat run wastes no padding per row);
            asymmetric ``float``: offsets m, ``spec.scale_dtype`` like ``scales``;
            symmetric and codebook formats: None.
    shape:  (out_features, in_features).
    group_size: input columns per group; the last group of a row holds in_features % group_size
            columns when that is not zero. Per channel: in_features; per tensor: out * in.
    spec:   the quantisation setting.
    g_idx:  int32 (in_features,): the group of each input column, only when groups are not
            runs of consecutive columns (GPTQ act-order without static groups); else None.

    With a GGML format (``spec.ggml``), qdata holds each row's GGUF blocks, uint8
    (out_features, in_features / block · type_size), exactly the bytes a GGUF file stores
    (`lowbit.numerics.ggml_blocks`); ``scales`` and ``zeros`` then hold the effective group
    scales and offsets, float32 (out_features, in_features / group), in memory only.
    """

    qdata: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    shape: tuple[int, int]
    group_size: int
    spec: QuantSpec
    g_idx: torch.Tensor | None = None
    scale_dq: DoubleQuant | None = None

    @classmethod
    def from_quantized(cls, q: Quantized) -> "QuantizedWeight":
        """Pack an unpacked `Quantized` weight; lossless (see `to_quantized`)."""
        out_features, in_features = q.codes.shape
        if q.spec.ggml is not None:
            if q.g_idx is not None:
                raise LowbitError(f"{q.spec.ggml.name} stores groups as runs of consecutive columns; act-order groups (g_idx) cannot be stored")
            qdata = pack_rows(q.spec.ggml, q.codes, q.scale, q.zero)
            return cls(qdata=qdata, scales=q.scale.float(), zeros=None if q.zero is None else q.zero.float(),
                       shape=(out_features, in_features), group_size=q.group_size, spec=q.spec)
        store = getattr(torch, q.spec.scale_dtype)
        zeros = None
        if q.zero is not None:
            if q.spec.zero_point == "int":
                zeros = pack(q.zero.to(torch.uint8).reshape(-1), q.spec.bits)
            else:
                zeros = q.zero.to(store)
        return cls(
            qdata=pack(q.codes, q.spec.bits),
            scales=q.scale if q.scale_dq is not None else q.scale.to(store),
            zeros=zeros,
            shape=(out_features, in_features),
            group_size=q.group_size,
            spec=q.spec,
            g_idx=None if q.g_idx is None else q.g_idx.to(torch.int32),
            scale_dq=q.scale_dq,
        )

    @property
    def n_groups(self) -> int:
        return self.scales.shape[-1]

    def to_quantized(self) -> Quantized:
        """Unpack codes and zero-points back to a `Quantized` (exactly what was packed)."""
        out_features, in_features = self.shape
        if self.spec.ggml is not None:
            codes, scale, zero = unpack_rows(self.spec.ggml, self.qdata, self.shape)
            return Quantized(codes=codes, scale=scale, zero=zero, group_size=self.group_size, spec=self.spec)
        scale, zero = self.scale_and_zero()
        return Quantized(
            codes=unpack(self.qdata, self.spec.bits, in_features),
            scale=scale,
            zero=zero,
            group_size=self.group_size,
            spec=self.spec,
            g_idx=None if self.g_idx is None else self.g_idx.long(),
            scale_dq=self.scale_dq,
        )

    def scale_and_zero(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`to_quantized`'s scale and zero-point, float32 (rows, n_groups), without unpacking
        the codes (a kernel reads those packed; unpacking a model's worth of them only to
        drop them left a 1.1B model's heap 600 MB larger). GGUF blocks hold scales inside
        the blocks, so those are unpacked whole."""
        if self.spec.ggml is not None:
            _, scale, zero = unpack_rows(self.spec.ggml, self.qdata, self.shape)
            return scale, zero
        zero = None
        if self.zeros is not None:
            if self.spec.zero_point == "int":
                rows = self.scales.shape[0]
                zero = unpack(self.zeros, self.spec.bits, rows * self.n_groups).reshape(rows, self.n_groups).to(torch.float32)
            else:
                zero = self.zeros.to(torch.float32)
        return self.scales.to(torch.float32), zero

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight it stands for, (out_features, in_features) in ``dtype`` (Eq. 3.2)."""
        return dequantize(self.to_quantized()).to(dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by name, as a checkpoint holds them."""
        out = {"qdata": self.qdata}
        if self.spec.ggml is not None:
            return out
        if self.scale_dq is not None:
            out.update(self.scale_dq.tensors())
        else:
            out["scales"] = self.scales
        if self.zeros is not None:
            out["zeros"] = self.zeros
        if self.g_idx is not None:
            out["g_idx"] = self.g_idx
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], shape: tuple[int, int], group_size: int, spec: QuantSpec, name: str = "layer") -> "QuantizedWeight":
        """Rebuild from stored tensors, checking every shape and dtype against the spec."""
        out_features, in_features = shape
        rows, n_groups = scale_grid(shape, group_size, spec)
        for key, (want, dtype) in stored_layout(shape, group_size, spec).items():
            got = tensors.get(key)
            if got is None:
                raise LowbitError(f"{name}: the checkpoint lacks tensor {key!r}; it is incomplete or from another tool, re-quantise it")
            if tuple(got.shape) != want or got.dtype != getattr(torch, dtype):
                raise LowbitError(f"{name}.{key} is {str(got.dtype).removeprefix('torch.')} {tuple(got.shape)}, the spec needs "
                                  f"{dtype} {want}; the checkpoint is corrupted")
        if spec.ggml is not None:
            return cls.from_ggml(tensors["qdata"], shape, spec)
        g_idx = tensors.get("g_idx")
        if g_idx is not None and (tuple(g_idx.shape) != (in_features,) or int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups):
            raise LowbitError(f"{name}.g_idx must hold {in_features} group indices below {n_groups}; the checkpoint is corrupted")
        scale_dq = DoubleQuant.from_tensors(tensors, (rows, n_groups)) if spec.double_quant else None
        return cls(
            qdata=tensors["qdata"],
            scales=scale_dq.dequantize() if scale_dq is not None else tensors["scales"],
            zeros=tensors.get("zeros"),
            shape=(out_features, in_features),
            group_size=group_size,
            spec=spec,
            g_idx=g_idx,
            scale_dq=scale_dq,
        )

    @classmethod
    def from_ggml(cls, qdata: torch.Tensor, shape: tuple[int, int], spec: QuantSpec) -> "QuantizedWeight":
        """A weight over GGUF blocks uint8 (out, in / block · type_size) of ``spec.ggml``
        (a tensor of a GGUF file, or a checkpoint's), its scales decoded from the blocks."""
        _, scale, zero = unpack_rows(spec.ggml, qdata, shape)
        return cls(qdata=qdata, scales=scale, zeros=zero, shape=tuple(shape), group_size=spec.ggml.group, spec=spec)

    @property
    def nbytes(self) -> int:
        """True storage in bytes: packed codes, scales and zero-points."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def bits_per_weight(self) -> float:
        """Storage bits per weight, scales and zero-points included."""
        return bits_per_weight(self.nbytes, self.numel)
