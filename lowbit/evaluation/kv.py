"""Quality of a quantised KV cache at long context, against the float cache.

Each window is fed in chunks of ``chunk`` tokens, as a chunked prefill or a decode would,
so later tokens attend to the cache the earlier chunks left behind: once with a float
cache and once with the quantised one. The float run is the reference for KLD and top-1.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import DynamicCache

from lowbit.inference.kv_cache import KVSpec, QuantizedKVCache, cache_bytes


@dataclass
class KVQuality:
    perplexity_float: float
    perplexity: float
    kld: float
    top1_percent: float  # 0-100, as EvalResult
    tokens: int
    float_cache_bytes: int
    cache_bytes: int

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def _chunked_logprobs(model: nn.Module, window: torch.Tensor, cache, chunk: int) -> torch.Tensor:
    """log-probs (len - 1, vocab) of every next token, the window fed ``chunk`` tokens at a time."""
    outs = []
    inputs = window[None, :-1]
    for lo in range(0, inputs.shape[1], chunk):
        piece = inputs[:, lo : lo + chunk]
        logits = model(piece, cache=cache, cache_position=torch.arange(lo, lo + piece.shape[1]), use_cache=True).logits
        outs.append(F.log_softmax(logits[0].float(), -1))
    return torch.cat(outs)


@torch.no_grad()
def kv_cache_quality(model: nn.Module, windows: torch.Tensor, spec: KVSpec, chunk: int = 64) -> KVQuality:
    """Perplexity with the float and the quantised cache, KLD and top-1 of the latter."""
    nll_f = nll_q = kld = 0.0
    agree = tokens = 0
    bytes_f = bytes_q = 0
    for window in windows:
        float_cache, quant_cache = DynamicCache(config=model.config), QuantizedKVCache(spec, model.config)
        ref = _chunked_logprobs(model, window, float_cache, chunk)
        got = _chunked_logprobs(model, window, quant_cache, chunk)
        targets = window[1:, None]
        nll_f -= ref.gather(-1, targets).sum().item()
        nll_q -= got.gather(-1, targets).sum().item()
        kld += F.kl_div(got, ref, reduction="sum", log_target=True).item()
        agree += (got.argmax(-1) == ref.argmax(-1)).sum().item()
        tokens += len(targets)
        bytes_f, bytes_q = cache_bytes(float_cache), cache_bytes(quant_cache)
    return KVQuality(math.exp(nll_f / tokens), math.exp(nll_q / tokens), kld / tokens, 100.0 * agree / tokens, tokens, bytes_f, bytes_q)
