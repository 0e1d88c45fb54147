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
from lowbit.numerics.quantization import quantize
from lowbit.numerics.spec import QuantSpec
from lowbit.packed.qweight import QuantizedWeight


@dataclass(frozen=True)
class KVSpec:
    """bits: 2, 4 or 8; group_size: tokens per key group and channels per value group;
    residual: newest tokens always kept in full precision (0 allowed)."""

    bits: int = 4
    group_size: int = 32
    residual: int = 128

    def __post_init__(self):
        if self.bits not in (2, 3, 4, 8):
            raise LowbitError(f"KV-cache bits {self.bits} unsupported; use 2, 4 or 8")
        if self.group_size < 1 or self.residual < 0:
            raise LowbitError("KV-cache group_size must be >= 1 and residual >= 0")

    @property
    def key_spec(self) -> QuantSpec:
        return QuantSpec(bits=self.bits, symmetric=False, granularity="channel", group_size=None)

    def value_spec(self, head_dim: int) -> QuantSpec:
        return QuantSpec(bits=self.bits, symmetric=False, group_size=min(self.group_size, head_dim))


def quantize_keys(chunk: torch.Tensor, spec: KVSpec) -> QuantizedWeight:
    """Keys (batch, heads, tokens, head_dim) -> one (scale, zero) per channel over the tokens."""
    b, h, t, d = chunk.shape
    rows = chunk.permute(0, 1, 3, 2).reshape(b * h * d, t)  # a row per channel
    return QuantizedWeight.from_quantized(quantize(rows, spec.key_spec, "keys"))


def dequantize_keys(q: QuantizedWeight, shape: tuple[int, int, int, int], dtype: torch.dtype) -> torch.Tensor:
    b, h, t, d = shape
    return q.dequantize(dtype).reshape(b, h, d, t).permute(0, 1, 3, 2)


def quantize_values(chunk: torch.Tensor, spec: KVSpec) -> QuantizedWeight:
    """Values (batch, heads, tokens, head_dim) -> per token, in groups of channels."""
    b, h, t, d = chunk.shape
    return QuantizedWeight.from_quantized(quantize(chunk.reshape(b * h * t, d), spec.value_spec(d), "values"))


def dequantize_values(q: QuantizedWeight, shape: tuple[int, int, int, int], dtype: torch.dtype) -> torch.Tensor:
    return q.dequantize(dtype).reshape(shape)


class QuantizedKVLayer(DynamicLayer):
    """One layer's cache: packed key/value chunks of ``group_size`` tokens, then a
    full-precision tail (``self.keys`` / ``self.values``)."""

    def __init__(self, spec: KVSpec):
        super().__init__()
        self.spec = spec
        self.key_chunks: list[QuantizedWeight] = []
        self.value_chunks: list[QuantizedWeight] = []
        self.chunk_shape: tuple[int, int, int, int] | None = None
        self.quantized_tokens = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.keys, self.values = key_states, value_states
        else:
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
        g = self.spec.group_size
        while self.keys.shape[-2] >= self.spec.residual + g:
            old_k, old_v = self.keys[:, :, :g], self.values[:, :, :g]
            self.chunk_shape = tuple(old_k.shape)
            self.key_chunks.append(quantize_keys(old_k, self.spec))
            self.value_chunks.append(quantize_values(old_v, self.spec))
            self.keys, self.values = self.keys[:, :, g:].contiguous(), self.values[:, :, g:].contiguous()
            self.quantized_tokens += g
        if not self.key_chunks:
            return self.keys, self.values
        dtype = self.keys.dtype
        keys = torch.cat([dequantize_keys(q, self.chunk_shape, dtype) for q in self.key_chunks] + [self.keys], dim=-2)
        values = torch.cat([dequantize_values(q, self.chunk_shape, dtype) for q in self.value_chunks] + [self.values], dim=-2)
        return keys, values

    def get_seq_length(self) -> int:
        return self.quantized_tokens + (self.keys.shape[-2] if self.is_initialized else 0)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def stored_bytes(self) -> int:
        packed = sum(q.nbytes for q in self.key_chunks + self.value_chunks)
        tail = 0 if not self.is_initialized else (self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size())
        return packed + tail


class QuantizedKVCache(Cache):
    """A transformers Cache whose full-attention layers are `QuantizedKVLayer`s.

    Sliding-window layers (five of every six in Gemma 3) keep transformers' float sliding
    cache, which never holds more than the window (512 tokens in Gemma 3 270M); quantising
    them would save little at long context and complicate their masks.
    """

    def __init__(self, spec: KVSpec, config):
        layer_types, kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
        layers = [
            DynamicSlidingWindowLayer(**kw) if kind == "sliding_attention" else QuantizedKVLayer(spec)
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
