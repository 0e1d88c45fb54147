"""`SparseWeight`: a pruned weight matrix stored sparse, so that pruning really shrinks it.

The one home of lowbit's sparse layouts; checkpoints store exactly these tensors. A weight
W (out_features, in_features) pruned to a `SparsityPattern` stores where its kept weights
are and what they are:

where (the mask):
    N:M          ``positions`` uint8 (out, packed_length(in · N/M, log2 M)): each kept
                 weight's position within its run of M, in column order, packed like codes
                 (`lowbit.numerics.packing`); 2 bits per kept weight for 2:4, the metadata
                 layout of NVIDIA's 2:4 sparse tensor cores (one bit per weight).
    unstructured ``bitmask`` uint8 (out, ceil(in / 8)): bit j of byte k of a row is column
                 8k + j (little-endian bit order), 1 = kept.
what (the values), either
    float        ``values`` in ``value_dtype``: (out, in · N/M) for N:M; (kept,) in row-major
                 order for unstructured (rows may keep different counts);
    quantised    ``qdata`` uint8, the codes of the kept weights packed at ``spec.bits``
                 ((out, packed_length(in · N/M, bits)) for N:M, (packed_length(kept, bits),)
                 for unstructured), with ``scales`` and ``zeros`` exactly as `QuantizedWeight`
                 stores them for the dense (out, in) weight: the groups are runs of the
                 original columns, so a group of 128 under 2:4 holds 64 kept weights.

A pruned weight decodes to exactly 0; a kept one to its value (float) or to its code's
level (Eq. 3.2). ``dequantize`` is the reference decoder: it rebuilds the dense matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError
from lowbit.numerics.packing import pack, packed_length, unpack
from lowbit.numerics.quantization import Quantized
from lowbit.numerics.sparsity import VALUE_DTYPES, SparsityPattern
from lowbit.numerics.spec import QuantSpec
from lowbit.packed.qweight import QuantizedWeight, bits_per_weight, stored_layout


def pack_bitmask(mask: torch.Tensor) -> torch.Tensor:
    """bool (out, in) -> uint8 (out, ceil(in / 8)), bit j of byte k = column 8k + j."""
    out_features, in_features = mask.shape
    padded = torch.nn.functional.pad(mask.to(torch.uint8), (0, -in_features % 8)).reshape(out_features, -1, 8)
    weights = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8)
    return (padded * weights).sum(dim=-1, dtype=torch.uint8)


def unpack_bitmask(bitmask: torch.Tensor, in_features: int) -> torch.Tensor:
    """uint8 (out, ceil(in / 8)) -> bool (out, in), the inverse of `pack_bitmask`."""
    bits = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8)
    return ((bitmask[..., None] & bits) != 0).reshape(bitmask.shape[0], -1)[:, :in_features]


def nm_positions(mask: torch.Tensor, pattern: SparsityPattern) -> torch.Tensor:
    """bool (out, in) with exactly N kept per run of M -> uint8 (out, in · N/M), the position
    of each kept weight in its run, in column order."""
    out_features, in_features = mask.shape
    runs = mask.reshape(out_features, in_features // pattern.m, pattern.m)
    if not bool((runs.sum(-1) == pattern.n).all()):
        raise LowbitError(f"the mask does not keep exactly {pattern.n} of every {pattern.m} weights; it is not {pattern.describe()}")
    where = torch.arange(pattern.m, dtype=torch.uint8).expand_as(runs)
    return where[runs].reshape(out_features, -1)


def nm_mask(positions: torch.Tensor, pattern: SparsityPattern, in_features: int) -> torch.Tensor:
    """uint8 (out, in · N/M) positions -> bool (out, in), the inverse of `nm_positions`."""
    out_features = positions.shape[0]
    runs = positions.reshape(out_features, in_features // pattern.m, pattern.n).long()
    mask = torch.zeros(out_features, in_features // pattern.m, pattern.m, dtype=torch.bool)
    return mask.scatter_(-1, runs, True).reshape(out_features, in_features)


@dataclass
class SparseWeight:
    """A pruned weight in its stored form (the layout in the module docstring).

    shape: (out_features, in_features). pattern: how it was pruned. mask_data: ``positions``
    (N:M) or ``bitmask`` (unstructured). values: the float kept values, or None when
    quantised. quantized: the kept codes ``qdata`` plus the dense weight's ``scales`` /
    ``zeros`` as a `QuantizedWeight` whose ``qdata`` holds only the kept codes, or None
    when the values are float. value_dtype: the float values' dtype name.
    """

    shape: tuple[int, int]
    pattern: SparsityPattern
    mask_data: torch.Tensor
    values: torch.Tensor | None = None
    quantized: QuantizedWeight | None = None

    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor, pattern: SparsityPattern, value_dtype: str = "float16") -> "SparseWeight":
        """Store the kept entries of ``weight`` (out, in) where ``mask`` (bool, same shape) is True."""
        if value_dtype not in VALUE_DTYPES:
            raise LowbitError(f"sparse values are stored as one of {', '.join(VALUE_DTYPES)}, not {value_dtype!r}")
        store = getattr(torch, value_dtype)
        kept = weight.detach()[mask].to(store)
        if pattern.structured:
            kept = kept.reshape(weight.shape[0], -1)
        return cls(tuple(weight.shape), pattern, _mask_data(mask, pattern), values=kept)

    @classmethod
    def from_quantized(cls, q: Quantized, mask: torch.Tensor, pattern: SparsityPattern) -> "SparseWeight":
        """Store the codes of ``q`` (dense (out, in) codes with their scales and zeros) where
        ``mask`` is True. Integer and codebook grids with group or channel scales."""
        spec = q.spec
        if spec.ggml is not None or spec.double_quant or q.g_idx is not None or spec.granularity not in ("group", "channel"):
            raise LowbitError(f"sparse weights store their kept codes with group or channel scales of an integer or codebook grid; "
                              f"{spec.describe()} is not one")
        dense = QuantizedWeight.from_quantized(q)
        kept = q.codes[mask]
        kept = kept.reshape(q.codes.shape[0], -1) if pattern.structured else kept
        dense.qdata = pack(kept.to(torch.uint8), spec.bits)
        return cls(tuple(q.codes.shape), pattern, _mask_data(mask, pattern), quantized=dense)

    @property
    def mask(self) -> torch.Tensor:
        """bool (out, in), True = kept."""
        if self.pattern.structured:
            kept_row = self.pattern.kept_per_row(self.shape[1])
            return nm_mask(unpack(self.mask_data, self.pattern.index_bits, kept_row), self.pattern, self.shape[1])
        return unpack_bitmask(self.mask_data, self.shape[1])

    @property
    def spec(self) -> QuantSpec | None:
        return None if self.quantized is None else self.quantized.spec

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight, (out, in) in ``dtype``: kept entries decoded, the rest exactly 0."""
        mask = self.mask
        if self.quantized is None:
            dense = torch.zeros(self.shape, dtype=dtype)
            dense[mask] = self.values.reshape(-1).to(dtype)
            return dense
        q = self.quantized
        codes = torch.zeros(self.shape, dtype=torch.uint8)
        codes[mask] = unpack(q.qdata, q.spec.bits, int(mask[0].sum()) if self.pattern.structured else int(mask.sum())).reshape(-1)
        full = QuantizedWeight(qdata=pack(codes, q.spec.bits), scales=q.scales, zeros=q.zeros, shape=self.shape,
                               group_size=q.group_size, spec=q.spec)
        return full.dequantize(dtype) * mask

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by name, as a checkpoint holds them."""
        out = {"positions" if self.pattern.structured else "bitmask": self.mask_data}
        if self.quantized is None:
            out["values"] = self.values
        else:
            out.update(self.quantized.tensors())
        return out

    def config(self) -> dict:
        """What a checkpoint header records to rebuild it (tensors aside)."""
        return {"shape": list(self.shape), "sparsity": self.pattern.describe(),
                "values": None if self.values is None else str(self.values.dtype).removeprefix("torch."),
                "group_size": None if self.quantized is None else self.quantized.group_size,
                "spec": None if self.quantized is None else self.quantized.spec.to_dict()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], config: dict, name: str = "layer") -> "SparseWeight":
        """Rebuild from stored tensors and `config`, checking every shape and dtype."""
        shape = tuple(config["shape"])
        out_features, in_features = shape
        pattern = SparsityPattern.parse(config["sparsity"])
        pattern.check(in_features, name)
        kept_row = pattern.kept_per_row(in_features)
        mask_key = "positions" if pattern.structured else "bitmask"
        want = {mask_key: ((out_features, packed_length(kept_row, pattern.index_bits) if pattern.structured else -(-in_features // 8)), "uint8")}
        spec = None if config["spec"] is None else QuantSpec.from_dict(config["spec"])
        mask_data = tensors.get(mask_key)
        if mask_data is not None and not pattern.structured and tuple(mask_data.shape) == want[mask_key][0]:
            kept = int(unpack_bitmask(mask_data, in_features).sum())
        else:
            kept = out_features * kept_row
        if spec is None:
            want["values"] = ((out_features, kept_row) if pattern.structured else (kept,), config["values"])
        else:
            want.update({k: v for k, v in stored_layout(shape, config["group_size"], spec).items() if k != "qdata"})
            want["qdata"] = ((out_features, packed_length(kept_row, spec.bits)) if pattern.structured else (packed_length(kept, spec.bits),), "uint8")
        for key, (dims, dtype) in want.items():
            got = tensors.get(key)
            if got is None:
                raise LowbitError(f"{name}: the checkpoint lacks tensor {key!r}; it is incomplete, prune its source again")
            if tuple(got.shape) != tuple(dims) or got.dtype != getattr(torch, dtype):
                raise LowbitError(f"{name}.{key} is {str(got.dtype).removeprefix('torch.')} {tuple(got.shape)}, its layout needs "
                                  f"{dtype} {tuple(dims)}; the checkpoint is corrupted")
        if pattern.structured:
            runs = cls(shape, pattern, mask_data).mask.reshape(out_features, -1, pattern.m).sum(-1)
            if not bool((runs == pattern.n).all()):
                raise LowbitError(f"{name}.positions name the same position twice in a run; the checkpoint is corrupted")
        if spec is None:
            return cls(shape, pattern, mask_data, values=tensors["values"])
        quantized = QuantizedWeight(qdata=tensors["qdata"], scales=tensors["scales"], zeros=tensors.get("zeros"), shape=shape,
                                    group_size=config["group_size"], spec=spec)
        return cls(shape, pattern, mask_data, quantized=quantized)

    @property
    def nbytes(self) -> int:
        """True storage in bytes: the mask, and the values or codes with their scales."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def bits_per_weight(self) -> float:
        return bits_per_weight(self.nbytes, self.shape[0] * self.shape[1])


def _mask_data(mask: torch.Tensor, pattern: SparsityPattern) -> torch.Tensor:
    if pattern.structured:
        return pack(nm_positions(mask, pattern), pattern.index_bits)
    return pack_bitmask(mask)
