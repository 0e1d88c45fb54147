"""Encoders and decoders of llama.cpp's GGML block types (`lowbit.numerics.ggml_types`).

Pure functions over tensors. A run of ``n`` blocks is held unpacked as `GGMLBlocks`: the
codes of every weight and the stored scale fields, exactly as the block bytes hold them.

    pack(blocks) -> uint8 (n, type_size)        the bytes llama.cpp reads
    unpack(t, raw) -> GGMLBlocks                 their inverse (pack(unpack(raw)) == raw)
    effective_params(blocks) -> scale, offset    float32 (n, groups): what each group's codes
                                                 are multiplied by and offset with
    dequantize_blocks(t, raw) -> float32 (n, block)

The decoder computes in float32 in the order ggml does (d · sc first, then · q, then the
offset), so it equals the `gguf` package's dequantisers bit for bit (tested on seeded random
blocks and on the packaged models' tensors).

`store_params` is the other direction's first step: it turns per-group scales and offsets
chosen by any method (float32 (n, groups)) into what the type can store: float16 for the
legacy types, integer group scales under a float16 super-block scale for the K-quants. Codes
are then chosen against ``effective_params`` of the result (`lowbit.numerics.quantization`).
It is idempotent: the effective scales of a stored result store to the same fields, which
lets a method keep only effective scales and pack them later (`QuantizedWeight`).

Byte layouts (per block; d, dmin, m float16; c the unsigned code of weight i):
  q8_0    d | 32 × int8 (c - 128)
  q4_0, iq4_nl   d | 16 bytes: c[j] | c[j+16] << 4
  q4_1    d | m | as q4_0
  q5_0    d | qh uint32 (bit j = c[j] >> 4) | 16 bytes of low nibbles as q4_0
  q5_1    d | m | as q5_0
  q2_k    16 × (sc | m << 4) | 64 bytes: weight 128h + 32s + l at bits 2s of byte 32h + l | d | dmin
  q3_k    32 bytes hmask (weight 32b + l: bit b of byte l = c >> 2) | 64 bytes low 2 bits as q2_k
          | 12 bytes of 6-bit scales + 32 (low nibbles: bytes 0-7, 4 and 4; high 2 bits: bytes
          8-11, 2 bits each) | d
  q4_k    d | dmin | 12 bytes of 6-bit scales and mins | 128 bytes: weight 64k + 32h + l is
          nibble h of byte 32k + l
  q5_k    d | dmin | scales as q4_k | 32 bytes qh (weight 32b + l: bit b of byte l = c >> 4)
          | low nibbles as q4_k
  q6_k    128 bytes ql (weight 128h + 64n + l: nibble n of byte 64h + l) | 64 bytes qh
          (weight 128h + 32s + l: bits 2s of byte 32h + l = c >> 4) | 16 × int8 sc | d
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from lowbit.errors import SpecError
from lowbit.numerics.ggml_types import GGMLType

MIN_F16 = 2.0**-24  # the smallest positive float16: no stored scale rounds to zero
U8 = torch.uint8


@dataclass(frozen=True)
class GGMLBlocks:
    """``n`` blocks of one type, unpacked.

    codes:  uint8 (n, block), unsigned codes in [0, 2**bits - 1] (None before coding).
    d:      float16 (n,): the block scale (legacy) or super-block scale (K-quants).
    m:      float16 (n,) or None: q4_1/q5_1's offset, the K-quants' super-block min scale
            dmin; None for the symmetric and codebook types.
    scales: K-quants: the integer group scales, int16 (n, groups) (q3_k: -32..31, q6_k:
            -128..127, others 0..2**scale_bits - 1); None for legacy types.
    mins:   q2_k/q4_k/q5_k: the integer group mins, int16 (n, groups); else None.
    """

    type: GGMLType
    codes: torch.Tensor | None
    d: torch.Tensor
    m: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    mins: torch.Tensor | None = None

    @property
    def n_blocks(self) -> int:
        return self.d.shape[0]


def effective_params(blocks: GGMLBlocks) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and offset of every group, float32 (n, groups): a weight with code c decodes to
    ``scale · q(c) + offset`` (offset None: no offset), q(c) the integer or level it stands
    for. Computed as ggml does: d · sc (and dmin · m) in float32."""
    t = blocks.type
    d = blocks.d.to(torch.float32)[:, None]
    if not t.k_quant:
        return d, None if blocks.m is None else blocks.m.to(torch.float32)[:, None]
    scale = d * blocks.scales.to(torch.float32)
    if blocks.mins is None:
        return scale, None
    return scale, -(blocks.m.to(torch.float32)[:, None] * blocks.mins.to(torch.float32))


def levels_of(t: GGMLType, codes: torch.Tensor) -> torch.Tensor:
    """The integer (or table level) each code stands for, float32."""
    return t.number_format.decode(codes)


def dequantize_blocks(t: GGMLType, raw: torch.Tensor) -> torch.Tensor:
    """The weights that ``raw`` uint8 (n, type_size) blocks stand for, float32 (n, block)."""
    blocks = unpack(t, raw)
    scale, offset = effective_params(blocks)
    n = blocks.n_blocks
    values = levels_of(t, blocks.codes).reshape(n, t.groups_per_block, t.group)
    out = scale[:, :, None] * values
    if offset is not None:
        out = out + offset[:, :, None]
    return out.reshape(n, t.block)


def store_params(t: GGMLType, scale: torch.Tensor, offset: torch.Tensor | None) -> GGMLBlocks:
    """What ``t`` stores for group scales (and offsets) float32 (n, groups) chosen by a
    method; codes left None. Legacy types round to float16. K-quants store integer group
    scales under one float16 super-block scale d = max |scale_j| / max_level (and mins
    likewise under dmin); a group scale never rounds to 0 (it would make its codes
    undefined), and the K-quants' offsets must be ≤ 0 (the range is widened to hold 0)."""
    if scale.shape[1] != t.groups_per_block or (offset is None) == (t.kind == "asym"):
        raise SpecError(f"{t.name} stores {t.groups_per_block} group scales per block"
                        f"{' and offsets' if t.kind == 'asym' else ''}; got {tuple(scale.shape)}")
    if not t.k_quant:
        d = _f16(scale[:, 0])
        return GGMLBlocks(t, None, d, None if offset is None else offset[:, 0].to(torch.float16))
    d, ints = _integer_scales(scale, t.max_scale_level, t.signed_scales)
    if offset is None:
        return GGMLBlocks(t, None, d, scales=ints)
    dmin, mins = _integer_mins(-torch.clamp(offset, max=0.0), t.max_scale_level)
    return GGMLBlocks(t, None, d, dmin, ints, mins)


def _f16(x: torch.Tensor) -> torch.Tensor:
    """Round to float16 keeping the sign and at least the smallest subnormal in magnitude."""
    sign = torch.where(x < 0, -1.0, 1.0)
    return (sign * x.abs().clamp(min=MIN_F16)).to(torch.float16)


def _integer_scales(scale: torch.Tensor, max_level: int, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    d = _f16(scale.abs().amax(1) / max_level).abs()
    ratio = torch.round(scale / d.to(torch.float32)[:, None])
    if signed:
        ints = ratio.clamp(-max_level - 1, max_level)
        ints = torch.where(ints == 0, torch.where(scale < 0, -1.0, 1.0), ints)
    else:
        ints = ratio.clamp(1, max_level)
    return d, ints.to(torch.int16)


def _integer_mins(mins: torch.Tensor, max_level: int) -> tuple[torch.Tensor, torch.Tensor]:
    dmin = (mins.amax(1) / max_level).to(torch.float16)
    safe = torch.where(dmin == 0, 1.0, dmin.to(torch.float32))
    return dmin, torch.round(mins / safe[:, None]).clamp(0, max_level).to(torch.int16)


def with_codes(blocks: GGMLBlocks, codes: torch.Tensor) -> GGMLBlocks:
    return replace(blocks, codes=codes.to(U8))


# ---- bytes ------------------------------------------------------------------------------

def _h(x: torch.Tensor) -> torch.Tensor:
    """float16 (n,) -> its 2 bytes, uint8 (n, 2)."""
    return x.to(torch.float16).contiguous().view(U8).reshape(-1, 2)


def _f16_of(raw: torch.Tensor) -> torch.Tensor:
    """uint8 (n, 2) -> float16 (n,)."""
    return raw.contiguous().view(torch.float16).reshape(-1)


def _nibbles(codes: torch.Tensor, span: int) -> torch.Tensor:
    """(n, 2·span·k) 4-bit values -> (n, span·k) bytes: in each run of 2·span values, value
    j goes to the low nibble and value j + span to the high nibble of byte j."""
    n = codes.shape[0]
    c = codes.reshape(n, -1, 2, span)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(n, -1)


def _from_nibbles(raw: torch.Tensor, span: int) -> torch.Tensor:
    n = raw.shape[0]
    b = raw.reshape(n, -1, 1, span)
    return torch.cat([b & 0x0F, b >> 4], dim=2).reshape(n, -1)


def _crumbs(values: torch.Tensor) -> torch.Tensor:
    """(n, 128·k) 2-bit values -> (n, 32·k) bytes: value 128h + 32s + l at bits 2s of
    byte 32h + l."""
    n = values.shape[0]
    v = values.reshape(n, -1, 4, 32)
    return (v[:, :, 0] | (v[:, :, 1] << 2) | (v[:, :, 2] << 4) | (v[:, :, 3] << 6)).reshape(n, -1)


def _from_crumbs(raw: torch.Tensor) -> torch.Tensor:
    n = raw.shape[0]
    b = raw.reshape(n, -1, 1, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=U8).reshape(1, 1, 4, 1)
    return ((b >> shifts) & 0x03).reshape(n, -1)


def _bit_planes(bits: torch.Tensor) -> torch.Tensor:
    """(n, 32·B) single bits -> (n, 32) bytes: value 32b + l is bit b of byte l."""
    n = bits.shape[0]
    v = bits.reshape(n, -1, 32).to(torch.int32)
    shifts = torch.arange(v.shape[1], dtype=torch.int32).reshape(1, -1, 1)
    return (v << shifts).sum(1).to(U8)


def _from_bit_planes(raw: torch.Tensor, planes: int) -> torch.Tensor:
    n = raw.shape[0]
    shifts = torch.arange(planes, dtype=U8).reshape(1, planes, 1)
    return ((raw.reshape(n, 1, 32) >> shifts) & 0x01).reshape(n, -1)


def _qh32(high: torch.Tensor) -> torch.Tensor:
    """q5_0/q5_1: (n, 32) high bits -> the uint32 qh as 4 little-endian bytes (n, 4)."""
    word = (high.to(torch.int64) << torch.arange(32, dtype=torch.int64)).sum(1)
    return torch.stack([(word >> (8 * k)) & 0xFF for k in range(4)], dim=1).to(U8)


def _from_qh32(raw: torch.Tensor) -> torch.Tensor:
    word = sum(raw[:, k].to(torch.int64) << (8 * k) for k in range(4))
    return ((word[:, None] >> torch.arange(32, dtype=torch.int64)) & 1).to(U8)


def _k_scales(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """q4_k/q5_k: 8 six-bit scales and 8 mins -> 12 bytes: bytes 0-3 sc[0..3] with the high
    2 bits of sc[4..7] on top, bytes 4-7 the same for the mins, bytes 8-11 the low nibbles
    of sc[4..7] | mn[4..7] << 4."""
    sc, mn = sc.to(U8), mn.to(U8)
    lo = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    mid = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    hi = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return torch.cat([lo, mid, hi], dim=1)


def _from_k_scales(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a, b, c = raw[:, :4], raw[:, 4:8], raw[:, 8:12]
    sc = torch.cat([a & 0x3F, (c & 0x0F) | ((a >> 6) << 4)], dim=1)
    mn = torch.cat([b & 0x3F, (c >> 4) | ((b >> 6) << 4)], dim=1)
    return sc.to(torch.int16), mn.to(torch.int16)


def _q3_scales(sc: torch.Tensor) -> torch.Tensor:
    """q3_k: 16 scales in -32..31 -> 12 bytes (see the module docstring)."""
    u = (sc + 32).to(U8)
    low = u & 0x0F
    lo = low[:, :8] | (low[:, 8:] << 4)
    high = (u >> 4).reshape(-1, 4, 4)  # [s, j] = scale 4s + j
    hi = high[:, 0] | (high[:, 1] << 2) | (high[:, 2] << 4) | (high[:, 3] << 6)
    return torch.cat([lo, hi], dim=1)


def _from_q3_scales(raw: torch.Tensor) -> torch.Tensor:
    lo, hi = raw[:, :8], raw[:, 8:12]
    low = torch.cat([lo & 0x0F, lo >> 4], dim=1)
    high = torch.cat([(hi >> (2 * s)) & 0x03 for s in range(4)], dim=1)
    return (low | (high << 4)).to(torch.int16) - 32


def pack(blocks: GGMLBlocks) -> torch.Tensor:
    """The bytes of ``blocks``, uint8 (n, type_size)."""
    t, c, n = blocks.type, blocks.codes.to(U8), blocks.n_blocks
    if c.shape != (n, t.block) or int(c.max()) >= 2**t.bits:
        raise SpecError(f"{t.name} codes must be uint8 ({n}, {t.block}) below {2**t.bits}")
    d = _h(blocks.d)
    name = t.name
    if name == "q8_0":
        out = [d, c ^ 0x80]  # int8 q = c - 128, as its two's-complement byte
    elif name in ("q4_0", "iq4_nl"):
        out = [d, _nibbles(c, 16)]
    elif name == "q4_1":
        out = [d, _h(blocks.m), _nibbles(c, 16)]
    elif name in ("q5_0", "q5_1"):
        head = [d] if name == "q5_0" else [d, _h(blocks.m)]
        out = [*head, _qh32(c >> 4), _nibbles(c & 0x0F, 16)]
    elif name == "q2_k":
        scales = blocks.scales.to(U8) | (blocks.mins.to(U8) << 4)
        out = [scales, _crumbs(c), d, _h(blocks.m)]
    elif name == "q3_k":
        out = [_bit_planes(c >> 2), _crumbs(c & 0x03), _q3_scales(blocks.scales), d]
    elif name == "q4_k":
        out = [d, _h(blocks.m), _k_scales(blocks.scales, blocks.mins), _nibbles(c, 32)]
    elif name == "q5_k":
        out = [d, _h(blocks.m), _k_scales(blocks.scales, blocks.mins), _bit_planes(c >> 4), _nibbles(c & 0x0F, 32)]
    elif name == "q6_k":
        out = [_nibbles(c & 0x0F, 64), _crumbs(c >> 4), blocks.scales.to(torch.int8).view(U8), d]
    else:
        raise SpecError(f"no encoder for GGML type {name!r}")
    raw = torch.cat(out, dim=1)
    assert raw.shape == (n, t.type_size), (name, raw.shape)
    return raw


def unpack(t: GGMLType, raw: torch.Tensor) -> GGMLBlocks:
    """The fields of ``raw`` uint8 (n, type_size) blocks of type ``t``."""
    if raw.dtype != U8 or raw.dim() != 2 or raw.shape[1] != t.type_size:
        raise SpecError(f"{t.name} blocks are uint8 (n, {t.type_size}); got {raw.dtype} {tuple(raw.shape)}")
    name = t.name

    def cut(*sizes):
        edges, at = [], 0
        for size in sizes:
            edges.append(raw[:, at: at + size])
            at += size
        return edges

    m = scales = mins = None
    if name == "q8_0":
        d, c = cut(2, 32)
    elif name in ("q4_0", "iq4_nl"):
        d, qs = cut(2, 16)
        c = _from_nibbles(qs, 16)
    elif name == "q4_1":
        d, m, qs = cut(2, 2, 16)
        c = _from_nibbles(qs, 16)
    elif name == "q5_0":
        d, qh, qs = cut(2, 4, 16)
        c = _from_nibbles(qs, 16) | (_from_qh32(qh) << 4)
    elif name == "q5_1":
        d, m, qh, qs = cut(2, 2, 4, 16)
        c = _from_nibbles(qs, 16) | (_from_qh32(qh) << 4)
    elif name == "q2_k":
        sm, qs, d, m = cut(16, 64, 2, 2)
        scales, mins = (sm & 0x0F).to(torch.int16), (sm >> 4).to(torch.int16)
        c = _from_crumbs(qs)
    elif name == "q3_k":
        hmask, qs, sc, d = cut(32, 64, 12, 2)
        c = _from_crumbs(qs) | (_from_bit_planes(hmask, 8) << 2)
        scales = _from_q3_scales(sc)
    elif name == "q4_k":
        d, m, sc, qs = cut(2, 2, 12, 128)
        scales, mins = _from_k_scales(sc)
        c = _from_nibbles(qs, 32)
    elif name == "q5_k":
        d, m, sc, qh, qs = cut(2, 2, 12, 32, 128)
        scales, mins = _from_k_scales(sc)
        c = _from_nibbles(qs, 32) | (_from_bit_planes(qh, 8) << 4)
    elif name == "q6_k":
        ql, qh, sc, d = cut(128, 64, 16, 2)
        c = _from_nibbles(ql, 64) | (_from_crumbs(qh) << 4)
        scales = sc.contiguous().view(torch.int8).to(torch.int16)
    else:
        raise SpecError(f"no decoder for GGML type {name!r}")
    if name == "q8_0":
        c = c ^ 0x80
    return GGMLBlocks(t, c.contiguous(), _f16_of(d), None if m is None else _f16_of(m), scales, mins)


# ---- whole weights ----------------------------------------------------------------------

def pack_rows(t: GGMLType, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
    """A weight's codes uint8 (rows, cols) and effective group parameters float32 (rows,
    cols / group) as GGUF stores it: uint8 (rows, cols / block · type_size), each row its
    blocks in order. The stored fields are derived from the effective scales (`store_params`
    is idempotent) and checked: the packed weight must decode to exactly those scales."""
    rows, cols = codes.shape
    if cols % t.block:
        raise SpecError(f"{t.name} needs rows of a multiple of {t.block} weights, got {cols}")
    n = rows * cols // t.block
    per_block = (n, t.groups_per_block)
    scale = scale.reshape(per_block).float()
    offset = None if offset is None else offset.reshape(per_block).float()
    stored = store_params(t, scale, offset)
    if t.k_quant and not _same(stored, scale, offset):
        # store_params maps its own output to itself except where a float16 subnormal d
        # rounds coarsely; there the integer factors are recovered from the scales exactly
        stored = _factorised(t, stored, scale, offset)
    if not _same(stored, scale, offset):
        raise SpecError(f"these scales are not {t.name}'s stored scales; quantise with format {t.name} to store them")
    return pack(with_codes(stored, codes.reshape(n, t.block))).reshape(rows, -1)


def _same(stored: GGMLBlocks, scale: torch.Tensor, offset: torch.Tensor | None) -> bool:
    got_scale, got_offset = effective_params(stored)
    return torch.equal(got_scale, scale) and (offset is None or torch.equal(got_offset, offset))


def _factorised(t: GGMLType, stored: GGMLBlocks, scale: torch.Tensor, offset: torch.Tensor | None) -> GGMLBlocks:
    """``stored`` with the blocks whose effective values differ from ``scale``/``offset``
    re-expressed as float16 d times integers, found exactly (see `factor_scales`)."""
    got_scale, got_offset = effective_params(stored)
    bad = (got_scale != scale).any(1)
    if offset is not None:
        bad |= (got_offset != offset).any(1)
    rows = bad.nonzero().squeeze(1)
    d, ints = stored.d.clone(), stored.scales.clone()
    new_d, new_ints, found = factor_scales(scale[rows], t.max_scale_level, t.signed_scales)
    d[rows[found]], ints[rows[found]] = new_d[found], new_ints[found]
    m, mins = stored.m, stored.mins
    if offset is not None:
        m, mins = m.clone(), mins.clone()
        new_m, new_mins, found = factor_scales(-offset[rows], t.max_scale_level, False, allow_zero=True)
        m[rows[found]], mins[rows[found]] = new_m[found], new_mins[found]
    return replace(stored, d=d, m=m, scales=ints, mins=mins)  # blocks left unfound fail the caller's check


def factor_scales(values: torch.Tensor, max_level: int, signed: bool, allow_zero: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float16 d (b,) and integers (b, G) with float32(d) · k == values exactly, for values
    float32 (b, G) that are such products (effective K-quant scales or mins): the largest
    magnitude is d times some integer up to max_level (+1 for signed, -2^(n-1) allowed), so
    each candidate integer is tried from the top until d is a float16 and every value an
    exact multiple. Returns d, the integers and which blocks have such a factorisation."""
    top = values.abs().amax(1)
    d = torch.zeros(values.shape[0], dtype=torch.float16)
    ints = torch.zeros(values.shape, dtype=torch.int16)
    found = top == 0 if allow_zero else torch.zeros_like(top, dtype=torch.bool)
    low, high = (-max_level - 1, max_level) if signed else ((0 if allow_zero else 1), max_level)
    for k in range(max_level + (1 if signed else 0), 0, -1):
        cand = (top / k).to(torch.float16)
        q = torch.round(values / cand.float()[:, None])
        ok = ~found & (cand.float() > 0) & (cand.float()[:, None] * q == values).all(1) & (q >= low).all(1) & (q <= high).all(1)
        d[ok], ints[ok] = cand[ok], q[ok].to(torch.int16)
        found |= ok
        if bool(found.all()):
            break
    return d, ints, found


def unpack_rows(t: GGMLType, raw: torch.Tensor, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The inverse of `pack_rows`: codes uint8 (rows, cols), scale and offset float32
    (rows, cols / group) (offset None for types without one)."""
    rows, cols = shape
    blocks = unpack(t, raw.reshape(-1, t.type_size))
    scale, offset = effective_params(blocks)
    n_groups = cols // t.group
    return (blocks.codes.reshape(rows, cols), scale.reshape(rows, n_groups),
            None if offset is None else offset.reshape(rows, n_groups))


def divide_rows(t: GGMLType, raw: torch.Tensor, divisor: torch.Tensor) -> torch.Tensor:
    """Blocks uint8 (rows, row bytes) whose row i decodes to the old row i divided by
    ``divisor[i]`` (float32 (rows,), positive): every block's float16 d (and m / dmin) is
    divided and rounded to float16 again; codes and integer group scales stay. (AWQ folds
    its scales into an already quantised linear this way; int formats do the same to their
    float16 scales.)"""
    rows = raw.shape[0]
    blocks = unpack(t, raw.reshape(-1, t.type_size))
    per_block = divisor.float().repeat_interleave(blocks.n_blocks // rows)
    d = (blocks.d.float() / per_block).to(torch.float16)
    m = None if blocks.m is None else (blocks.m.float() / per_block).to(torch.float16)
    return pack(replace(blocks, d=d, m=m)).reshape(rows, -1)
