"""Attention over the quantised KV cache as stored: the decode step reads the packed codes.

`lowbit.inference.kv_cache.QuantizedKVLayer` keeps its chunks in packed buffers (`PackedKV`
below). The transformers attention modules call the cache, then an attention function by
the name in ``config._attn_implementation``; under `packed_kv_attention(model)` that name is
``lowbit_kv`` (`lowbit_kv_attention`) and the cache hands the function the packed view
instead of a dequantised copy. For one query token (a decode step) the C++ kernel
(`lowbit/kernels/kv_kernels.cpp`) computes the scores from the key codes with each
channel's scale folded into the query and sums the value codes with each token's scale
folded into its probability, reading each stored byte once. Everything else (a prompt of
several tokens, 3-bit codes, a padding mask, a soft-capped model) dequantises the view and
runs torch's scaled dot-product attention, `attend_reference`, which is also what the
kernel is tested against; a prompt's dequantisation is shared by all its tokens.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from lowbit.numerics.packing import unpack

log = logging.getLogger(__name__)

ATTENTION = "lowbit_kv"
KERNEL_BITS = (2, 4, 8)


def pack_planar(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (..., n) uint8 < 2**bits -> (..., m) bytes, m = ceil(n / k) with k = 8 // bits
    codes per byte, in planes: byte j holds codes j, j + m, j + 2m, ... at bit offsets 0,
    bits, 2 bits, ... (the row padded with zeros to k m codes; 8 bits: the codes as they
    are). Unpacking a plane is one shift and mask over consecutive bytes, which the
    kernel's loops vectorise; lowbit's own packing (`lowbit.numerics.packing`) interleaves
    neighbouring codes in a byte instead."""
    if bits == 8:
        return codes.contiguous()
    per_byte = 8 // bits
    n = codes.shape[-1]
    m = planar_length(n, bits)
    planes = torch.nn.functional.pad(codes, (0, per_byte * m - n)).reshape(*codes.shape[:-1], per_byte, m)
    out = planes[..., 0, :].clone()
    for plane in range(1, per_byte):
        out |= planes[..., plane, :] << (bits * plane)
    return out


def planar_length(n: int, bits: int) -> int:
    """Bytes `pack_planar` makes of ``n`` codes."""
    return n if bits == 8 else -(-n // (8 // bits))


def unpack_planar(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_planar`: (..., m) bytes -> (..., n) uint8 codes."""
    if bits == 8:
        return packed
    mask = 2**bits - 1
    planes = [(packed >> (bits * plane)) & mask for plane in range(8 // bits)]
    return torch.cat(planes, dim=-1)[..., :n]


@dataclass
class PackedKV:
    """One layer's cache as stored, for B sequences, H key/value heads of D channels.

    k_codes: uint8 (B, H, capacity, D, planar(G)): chunk c's codes of channel d along its G
        tokens (`pack_planar`); k_scale: float16 (B, H, capacity, D); k_zero: uint8 (B, H,
        capacity, packed(D)), the integer zero-points in lowbit's packing along the channels.
    v_codes: uint8 (B, H, capacity * G, planar(D)); v_scale: float16 (B, H, capacity * G, NG),
        one per group of ``value_group`` channels; v_zero: uint8 (B, H, capacity, packed(G NG)),
        a chunk's zero-points token by token in one packed row.
    n_chunks: chunks in use (the buffers may be larger); tail_k, tail_v: (B, H, Tt, D), the
        newest tokens in full precision. Values are S (code - Z) (Eq. 3.2).
    """

    k_codes: torch.Tensor
    k_scale: torch.Tensor
    k_zero: torch.Tensor
    v_codes: torch.Tensor
    v_scale: torch.Tensor
    v_zero: torch.Tensor
    n_chunks: int
    group: int
    value_group: int
    bits: int
    tail_k: torch.Tensor
    tail_v: torch.Tensor

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(B, H, T, D) of the keys (and values) this view stands for."""
        b, h, _, d = self.tail_k.shape
        return b, h, self.n_chunks * self.group + self.tail_k.shape[2], d

    def dequantize(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values), each (B, H, T, D) in ``dtype``: the chunks dequantised, then the tail."""
        n, g, bits = self.n_chunks, self.group, self.bits
        b, h, _, d = self.shape
        if n == 0:
            return self.tail_k.to(dtype), self.tail_v.to(dtype)
        key_codes = unpack_planar(self.k_codes[:, :, :n], bits, g).to(dtype)  # (B, H, n, D, G)
        key_zero = unpack(self.k_zero[:, :, :n], bits, d).to(dtype)  # (B, H, n, D)
        keys = (key_codes - key_zero[..., None]) * self.k_scale[:, :, :n].to(dtype)[..., None]
        keys = keys.transpose(-1, -2).reshape(b, h, n * g, d)
        groups = self.v_scale.shape[-1]
        value_codes = unpack_planar(self.v_codes[:, :, : n * g], bits, d).to(dtype)  # (B, H, n G, D)
        value_zero = unpack(self.v_zero[:, :, :n], bits, g * groups).reshape(b, h, n * g, groups).to(dtype)
        per_channel = lambda t: t.repeat_interleave(self.value_group, -1)[..., :d]  # noqa: E731 (group -> channel)
        values = (value_codes - per_channel(value_zero)) * per_channel(self.v_scale[:, :, : n * g].to(dtype))
        return (torch.cat([keys, self.tail_k.to(dtype)], dim=2), torch.cat([values, self.tail_v.to(dtype)], dim=2))


@lru_cache(maxsize=1)
def load_kv_kernels():
    from lowbit.kernels.cpu import build_extension

    return build_extension(Path(__file__).resolve().parent.parent / "kernels" / "kv_kernels.cpp", "lowbit_kv")


def attend_reference(query: torch.Tensor, view: PackedKV, scaling: float) -> torch.Tensor:
    """softmax(q kᵀ · scaling) v over the dequantised cache, no mask: query (B, Hq, L, D) ->
    (B, Hq, L, D). The ground truth the kernel must equal."""
    keys, values = view.dequantize(torch.float32)
    return torch.nn.functional.scaled_dot_product_attention(query.float(), keys, values, scale=scaling,
                                                            enable_gqa=query.shape[1] != keys.shape[1])


def attend(query: torch.Tensor, view: PackedKV, scaling: float) -> torch.Tensor:
    """The kernel: one query token per head, query (B, Hq, 1, D) float32 on the CPU ->
    (B, Hq, 1, D), reading the packed buffers as they are."""
    out = load_kv_kernels().kv_attend(query[:, :, 0].float().contiguous(), view.k_codes, view.k_scale, view.k_zero,
                                      view.v_codes, view.v_scale, view.v_zero, view.n_chunks, view.group, view.value_group,
                                      view.bits, view.tail_k.float().contiguous(), view.tail_v.float().contiguous(), float(scaling))
    return out[:, :, None]


def kernel_support(module: nn.Module, query: torch.Tensor, view: PackedKV, attention_mask, kwargs: dict) -> str | None:
    """None if the kernel computes this call, else why it does not."""
    if query.shape[2] != 1:
        return "more than one query token"
    if query.device.type != "cpu":
        return "not on the CPU"
    if view.bits not in KERNEL_BITS:
        return f"{view.bits}-bit codes"
    if kwargs.get("softcap") is not None or getattr(module.config, "attn_logit_softcapping", None):
        return "soft-capped attention logits"
    if kwargs.get("sliding_window"):
        return "a sliding window"
    if attention_mask is not None:
        blocked = ~attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0
        if bool(blocked.any()):
            return "a mask that hides some cached tokens"
    return None


_said: set[str] = set()


def lowbit_kv_attention(module: nn.Module, query: torch.Tensor, key, value, attention_mask, dropout: float = 0.0,
                        scaling: float | None = None, **kwargs):
    """A transformers attention function: `attend` for a decode step over a `PackedKV`,
    otherwise torch's SDPA (on the dequantised view, or on plain tensors from a float cache
    layer such as Gemma 3's sliding ones). Returns (output (B, L, Hq, D), None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not isinstance(key, PackedKV):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    scaling = module.scaling if scaling is None else scaling
    reason = kernel_support(module, query, key, attention_mask, kwargs)
    if reason is None:
        return attend(query, key, scaling).transpose(1, 2).to(query.dtype), None
    if query.shape[2] == 1 and reason not in _said:
        _said.add(reason)
        log.warning("the packed KV-cache kernel does not take %s; this layer's cache is dequantised for each step", reason)
    keys, values = key.dequantize(query.dtype)
    return sdpa_attention_forward(module, query, keys, values, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTENTION, lowbit_kv_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)


@contextmanager
def packed_kv_attention(model: nn.Module):
    """Run ``model``'s attention through `lowbit_kv_attention` inside the block (a cache made
    with ``fused=True`` hands it the packed view), restoring its implementation after."""
    _register()
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = ATTENTION
    try:
        yield model
    finally:
        config._attn_implementation = before
