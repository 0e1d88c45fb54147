"""KV-cache quantisation (report §2.4), following KIVI (Liu et al. 2024, "KIVI: A Tuning-Free
Asymmetric 2bit Quantization for KV Cache"): keys per channel, values per token.

Keys have outlier *channels* (a few dimensions are large for every token, as with the
activation outliers of §6), so each key channel gets its own scale and zero-point over a
group of ``group_size`` consecutive tokens. Values have no such channels and feed a
weighted sum over tokens, so each value token is quantised on its own, in groups of
``group_size`` channels. Both are asymmetric integers (Eq. 3.1-3.3).

Because a key group needs ``group_size`` tokens before it can be quantised, the newest
tokens stay in full precision: at least ``residual`` of them (the "window of recent tokens
kept in full precision"), plus the tokens of the group still filling. Whenever the
full-precision part reaches ``residual + group_size`` tokens, its oldest ``group_size``
tokens are quantised into a new chunk. Attention reads the dequantised chunks followed by
the full-precision tokens; only the packed chunks (codes, scales, zero-points) and the
full-precision tail are stored, so the cache's memory shrinks by about 32 / (bits + 16·2 /
group_size) for float32 states.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer, get_layer_types_and_kwargs

from lowbit.errors import LowbitError
from lowbit.inference.kv_attention import PackedKV, pack_planar, planar_length
from lowbit.numerics.packing import pack, packed_length
from lowbit.numerics.quantization import Quantized, quantize
from lowbit.numerics.spec import QuantSpec


@dataclass(frozen=True)
class KVSpec:
    """bits: 2, 4 or 8; group_size: tokens per key group and channels per value group;
    residual: newest tokens always kept in full precision (0 allowed)."""

    bits: int = 4
    group_size: int = 32
    residual: int = 128

    def __post_init__(self):
        if self.bits not in (2, 4, 8):  # whole codes per byte: the kernel's planar packing (kv_attention.pack_planar)
            raise LowbitError(f"KV-cache bits {self.bits} unsupported; use 2, 4 or 8")
        if self.group_size < 1 or self.residual < 0:
            raise LowbitError("KV-cache group_size must be >= 1 and residual >= 0")

    @property
    def key_spec(self) -> QuantSpec:
        return QuantSpec(bits=self.bits, symmetric=False, granularity="channel", group_size=None)

    def value_spec(self, head_dim: int) -> QuantSpec:
        return QuantSpec(bits=self.bits, symmetric=False, group_size=min(self.group_size, head_dim))


def quantize_keys(chunk: torch.Tensor, spec: KVSpec) -> Quantized:
    """Keys (batch, heads, tokens, head_dim) -> codes (batch * heads * head_dim, tokens): one
    (scale, zero) per channel over the chunk's tokens."""
    b, h, t, d = chunk.shape
    return quantize(chunk.permute(0, 1, 3, 2).reshape(b * h * d, t), spec.key_spec, "keys")


def quantize_values(chunk: torch.Tensor, spec: KVSpec) -> Quantized:
    """Values (batch, heads, tokens, head_dim) -> codes (batch * heads * tokens, head_dim): per
    token, in groups of channels."""
    b, h, t, d = chunk.shape
    return quantize(chunk.reshape(b * h * t, d), spec.value_spec(d), "values")


class QuantizedKVLayer(DynamicLayer):
    """One layer's cache: packed key/value chunks of ``group_size`` tokens in buffers that
    double when full (`PackedKV` documents their layout), then a full-precision tail
    (``self.keys`` / ``self.values``). ``fused``: `update` returns the packed view for
    `lowbit.inference.kv_attention.lowbit_kv_attention` instead of dequantised tensors."""

    def __init__(self, spec: KVSpec, fused: bool = False):
        super().__init__()
        self.spec = spec
        self.fused = fused
        self.buffers: dict[str, torch.Tensor] = {}
        self.n_chunks = 0

    @property
    def quantized_tokens(self) -> int:
        return self.n_chunks * self.spec.group_size

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.keys, self.values = key_states, value_states
        else:
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
        g = self.spec.group_size
        while self.keys.shape[-2] >= self.spec.residual + g:
            self._append_chunk(self.keys[:, :, :g], self.values[:, :, :g])
            self.keys, self.values = self.keys[:, :, g:].contiguous(), self.values[:, :, g:].contiguous()
        if self.fused:
            view = self.view()
            return view, view
        if not self.n_chunks:
            return self.keys, self.values
        return self.view().dequantize(self.keys.dtype)

    def _append_chunk(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Quantise ``group_size`` tokens (B, H, G, D) and pack them into the buffers."""
        b, h, g, d = keys.shape
        bits = self.spec.bits
        kq, vq = quantize_keys(keys, self.spec), quantize_values(values, self.spec)
        chunk = {
            "k_codes": pack_planar(kq.codes, bits).reshape(b, h, 1, d, -1),
            "k_scale": kq.scale.reshape(b, h, 1, d).half(),
            "k_zero": pack(kq.zero.to(torch.uint8).reshape(b, h, 1, d), bits),
            "v_codes": pack_planar(vq.codes, bits).reshape(b, h, g, -1),
            "v_scale": vq.scale.reshape(b, h, g, -1).half(),
            "v_zero": pack(vq.zero.to(torch.uint8).reshape(b, h, 1, -1), bits),  # the chunk's G x NG zero-points in one row
        }
        if not self.buffers or self.buffers["k_codes"].shape[2] == self.n_chunks:
            capacity = max(4, 2 * self.n_chunks)
            grown = {}
            for name, part in chunk.items():
                per_chunk = _rows_per_chunk(name, g)
                buffer = part.new_empty((b, h, capacity * per_chunk, *part.shape[3:]))
                if self.buffers:
                    buffer[:, :, : self.n_chunks * per_chunk] = self.buffers[name][:, :, : self.n_chunks * per_chunk]
                grown[name] = buffer
            self.buffers = grown
        for name, part in chunk.items():
            per_chunk = _rows_per_chunk(name, g)
            self.buffers[name][:, :, self.n_chunks * per_chunk : (self.n_chunks + 1) * per_chunk] = part
        self.n_chunks += 1

    def view(self) -> PackedKV:
        """The cache as stored (buffers and tail), for attention or dequantisation."""
        d = self.keys.shape[-1]
        value_group = self.spec.value_spec(d).group_size
        return PackedKV(**(self.buffers or self._empty_buffers(d, value_group)), n_chunks=self.n_chunks, group=self.spec.group_size,
                        value_group=value_group, bits=self.spec.bits, tail_k=self.keys, tail_v=self.values)

    def _empty_buffers(self, d: int, value_group: int) -> dict[str, torch.Tensor]:
        """Buffers of no chunks in `PackedKV`'s shapes, before the first chunk is quantised."""
        bits, g = self.spec.bits, self.spec.group_size
        groups = -(-d // value_group)
        shapes = {"k_codes": (0, d, planar_length(g, bits)), "k_scale": (0, d), "k_zero": (0, packed_length(d, bits)),
                  "v_codes": (0, planar_length(d, bits)), "v_scale": (0, groups), "v_zero": (0, packed_length(g * groups, bits))}
        b, h = self.keys.shape[:2]
        return {n: torch.empty((b, h, *shape), dtype=torch.float16 if n.endswith("scale") else torch.uint8) for n, shape in shapes.items()}

    def get_seq_length(self) -> int:
        return self.quantized_tokens + (self.keys.shape[-2] if self.is_initialized else 0)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def stored_bytes(self) -> int:
        """Bytes of the chunks in use (codes, float16 scales, packed zero-points) and the tail."""
        packed = 0
        for name, buffer in self.buffers.items():
            used = self.n_chunks * _rows_per_chunk(name, self.spec.group_size)
            packed += buffer[:, :, :used].numel() * buffer.element_size()
        tail = 0 if not self.is_initialized else (self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size())
        return packed + tail


def _rows_per_chunk(name: str, group_size: int) -> int:
    """Rows one chunk adds to buffer ``name`` (dimension 2): a token's row in the value codes
    and scales, one row for the rest."""
    return group_size if name in ("v_codes", "v_scale") else 1


class QuantizedKVCache(Cache):
    """A transformers Cache whose full-attention layers are `QuantizedKVLayer`s.

    Sliding-window layers (five of every six in Gemma 3) keep transformers' float sliding
    cache, which never holds more than the window (512 tokens in Gemma 3 270M); quantising
    them would save little at long context and complicate their masks.
    """

    def __init__(self, spec: KVSpec, config, fused: bool = False):
        layer_types, kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
        layers = [
            DynamicSlidingWindowLayer(**kw) if kind == "sliding_attention" else QuantizedKVLayer(spec, fused)
            for kind, kw in zip(layer_types, kwargs)
        ]
        super().__init__(layers=layers)
        self.spec = spec

    def stored_bytes(self) -> int:
        return sum(layer.stored_bytes() if isinstance(layer, QuantizedKVLayer) else _float_bytes(layer) for layer in self.layers)


def _float_bytes(layer) -> int:
    return sum(t.numel() * t.element_size() for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if torch.is_tensor(t))


def cache_bytes(cache: Cache) -> int:
    """Bytes a cache holds: packed chunks and tails for lowbit's, keys/values otherwise."""
    if isinstance(cache, QuantizedKVCache):
        return cache.stored_bytes()
    return sum(_float_bytes(layer) for layer in cache.layers)
