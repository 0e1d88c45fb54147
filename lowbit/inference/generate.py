"""A lean greedy decode loop: one prefill pass, then one forward per token against a
preallocated cache, with nothing else in Python per token than picking the argmax.

transformers' ``generate`` runs logits processors, stopping criteria and cache bookkeeping
on every step; on a 135M model on two cores that is a sizeable share of a decode step. Here
the float cache is transformers' ``StaticCache`` allocated for the whole generation up
front (no per-token growth), or lowbit's quantised KV cache. Logits are computed only for
the last position (``logits_to_keep=1``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.cache_utils import StaticCache

from lowbit.errors import LowbitError
from lowbit.inference.kv_cache import KVSpec, QuantizedKVCache, cache_bytes


@dataclass
class Generation:
    """tokens: the generated ids (prompt excluded); seconds split into prefill and decode;
    decode_tokens_per_second counts tokens after the first (which prefill produces)."""

    tokens: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    cache_bytes: int = 0

    @property
    def decode_tokens_per_second(self) -> float:
        steps = len(self.tokens) - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else float("nan")


def make_cache(model: nn.Module, max_len: int, kv: KVSpec | None):
    if kv is None:
        return StaticCache(config=model.config, max_cache_len=max_len)
    return QuantizedKVCache(kv, model.config)


@torch.no_grad()
def generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, kv: KVSpec | None = None,
             eos_token_id: int | None = None) -> Generation:
    """Greedy decoding of one sequence. input_ids: int64 (1, prompt_len)."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise LowbitError("generate takes one prompt: input_ids of shape (1, length)")
    if max_new_tokens < 1:
        raise LowbitError("max_new_tokens must be at least 1")
    model.eval()
    prompt = input_ids.shape[1]
    cache = make_cache(model, prompt + max_new_tokens, kv)
    result = Generation(prompt_tokens=prompt)
    start = time.perf_counter()
    out = model(input_ids, cache=cache, cache_position=torch.arange(prompt), use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    result.prefill_seconds = time.perf_counter() - start
    result.tokens.append(int(token))
    start = time.perf_counter()
    for step in range(1, max_new_tokens):
        if eos_token_id is not None and result.tokens[-1] == eos_token_id:
            break
        position = torch.tensor([prompt + step - 1])
        out = model(token, cache=cache, cache_position=position, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        result.tokens.append(int(token))
    result.decode_seconds = time.perf_counter() - start
    result.cache_bytes = cache_bytes(cache)
    return result
