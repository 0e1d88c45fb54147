"""A lean greedy decode loop: one prefill pass, then one forward per token against a
preallocated cache, with nothing else in Python per token than picking the argmax.

transformers' ``generate`` runs logits processors, stopping criteria and cache bookkeeping
on every step; on a 135M model on two cores that is a sizeable share of a decode step. Here
the float cache is transformers' ``StaticCache`` allocated for the whole generation up
front (no per-token growth), or lowbit's quantised KV cache. Logits are computed only for
the last position (``logits_to_keep=1``).

On a GPU the per-token cost that remains is Python launching a few hundred small kernels per
step, which at batch 1 takes longer than the GPU needs to run them. With ``cuda_graph=True``
(the default on CUDA with the static cache) the one-token step — forward, argmax, writing the
token and advancing the position — is captured once into a CUDA graph and each later token is
one graph replay. Tokens stay on the device until the end (no host sync per token unless an
EOS token must be checked). If capture fails (a model whose forward syncs with the host), or
the cache has sliding-window layers (Gemma 3), the loop says so in the log and runs eagerly;
``Generation.mode`` records which ran.

On the CPU with the float cache the decode steps run as one C++ call each
(`lowbit.inference.compiled_step`: the whole forward, no Python between layers) wherever the
model allows it (``compiled=None``, the default); where it does not (another family, a
module the step does not compute, a quantised cache) the loop logs why and runs eagerly.
``compiled=False`` is the reference: transformers' forward per token.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.cache_utils import StaticCache

from lowbit.errors import LowbitError
from lowbit.inference.kv_attention import packed_kv_attention
from lowbit.inference.kv_cache import KVSpec, QuantizedKVCache, cache_bytes

log = logging.getLogger(__name__)


@dataclass
class Generation:
    """tokens: the generated ids (prompt excluded); seconds split into prefill and decode;
    decode_tokens_per_second counts tokens after the first (which prefill produces)."""

    tokens: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    cache_bytes: int = 0
    mode: str = "eager"
    capture_seconds: float = 0.0  # preparing the fast path (graph capture, compiled step), outside the decode time

    @property
    def decode_tokens_per_second(self) -> float:
        steps = len(self.tokens) - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else float("nan")


def make_cache(model: nn.Module, max_len: int, kv: KVSpec | None, fused: bool = False):
    """transformers' StaticCache for the float cache, else lowbit's quantised one (``fused``:
    its layers hand attention the packed view, `lowbit.inference.kv_attention`)."""
    if kv is None:
        return StaticCache(config=model.config, max_cache_len=max_len)
    return QuantizedKVCache(kv, model.config, fused=fused)


def model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, kv: KVSpec | None = None,
             eos_token_id: int | None = None, cuda_graph: bool | None = None, kv_kernel: bool = True,
             compiled: bool | None = None) -> Generation:
    """Greedy decoding of one sequence. input_ids: int64 (1, prompt_len), on any device (moved
    to the model's). ``cuda_graph``: None = on for CUDA with the float static cache.
    ``kv_kernel``: with a quantised cache on the CPU, decode steps attend over the packed
    cache with lowbit's kernel (`lowbit.inference.kv_attention`); False dequantises the
    cache at every step (the reference). ``compiled``: None = the compiled decode step where
    it applies (CPU, float cache, a model `step_support` accepts), else eager with a warning
    saying why; True = the compiled step or an error; False = transformers' forward."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise LowbitError("generate takes one prompt: input_ids of shape (1, length)")
    if max_new_tokens < 1:
        raise LowbitError("max_new_tokens must be at least 1")
    device = model_device(model)
    if cuda_graph is None:
        cuda_graph = device.type == "cuda" and kv is None
    if cuda_graph and (device.type != "cuda" or kv is not None):
        raise LowbitError("cuda_graph needs the model on a CUDA device and the float static cache (kv=None)")
    model.eval()
    input_ids = input_ids.to(device)
    prompt = input_ids.shape[1]
    step = _compiled_step(model, prompt + max_new_tokens, kv, device, compiled) if max_new_tokens > 1 else None
    fused = kv is not None and kv_kernel and device.type == "cpu"
    cache = make_cache(model, prompt + max_new_tokens, kv, fused)
    with packed_kv_attention(model) if fused else nullcontext():
        return _generate(model, input_ids, cache, max_new_tokens, eos_token_id, cuda_graph, device, step)


def _compiled_step(model, max_len: int, kv: KVSpec | None, device: torch.device, compiled: bool | None):
    """The compiled decode step (and the seconds its set-up took) if it is to run, else None
    (having logged why, when it was not ruled out by the caller)."""
    if compiled is False:
        return None
    from lowbit.inference.compiled_step import CompiledStep, step_support

    reason = "it runs on the CPU" if device.type != "cpu" else ("it takes the float cache" if kv is not None else step_support(model))
    if reason is None:
        start = time.perf_counter()
        try:
            return CompiledStep(model, max_len), time.perf_counter() - start
        except LowbitError as err:  # the extension could not be built
            if compiled:
                raise
            reason = str(err)
    if compiled:
        raise LowbitError(f"the compiled decode step cannot run: {reason}")
    if device.type == "cpu":
        log.warning("decoding eagerly (transformers' forward per token), not with the compiled step: %s", reason)
    return None


def _generate(model, input_ids, cache, max_new_tokens, eos_token_id, cuda_graph, device, step=None) -> Generation:
    prompt = input_ids.shape[1]
    result = Generation(prompt_tokens=prompt)
    out_tokens = torch.zeros(max_new_tokens, dtype=torch.long, device=device)
    _sync(device)
    start = time.perf_counter()
    out = model(input_ids, cache=cache, cache_position=torch.arange(prompt, device=device), use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    out_tokens[0] = token[0, 0]
    _sync(device)
    result.prefill_seconds = time.perf_counter() - start
    if cuda_graph and not _graph_safe(cache):
        log.warning("the cache has sliding-window layers, whose bookkeeping is Python state a CUDA graph would freeze; decoding eagerly")
        cuda_graph = False
    steps = max_new_tokens
    if eos_token_id is not None and int(token) == eos_token_id:
        steps = 1
    elif max_new_tokens > 1 and step is not None:
        steps = _decode_compiled(*step, cache, int(token), prompt, out_tokens, eos_token_id, result)
    elif max_new_tokens > 1 and cuda_graph:
        steps = _decode_with_graph(model, cache, token, prompt, out_tokens, eos_token_id, result)
    elif max_new_tokens > 1:
        steps = _decode_eager(model, cache, token, prompt, out_tokens, eos_token_id, result, device)
    result.tokens = out_tokens[:steps].tolist()
    result.cache_bytes = cache_bytes(cache)
    return result


def _graph_safe(cache) -> bool:
    """A graph replays fixed kernels: every cache layer must keep its state in device tensors
    (transformers' plain StaticLayer does; its sliding-window layer also counts in a Python int
    and switches code paths once the window is full)."""
    from transformers.cache_utils import StaticLayer

    return all(type(layer) is StaticLayer for layer in getattr(cache, "layers", []))


def _decode_eager(model, cache, token, prompt, out_tokens, eos_token_id, result, device) -> int:
    """Steps 1.. of the generation, one forward each; returns the number of tokens produced."""
    max_new_tokens = out_tokens.shape[0]
    position = torch.tensor([prompt], device=device)
    start = time.perf_counter()
    steps = max_new_tokens
    for step in range(1, max_new_tokens):
        out = model(token, cache=cache, cache_position=position, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        out_tokens[step] = token[0, 0]
        position = position + 1
        if eos_token_id is not None and int(token) == eos_token_id:
            steps = step + 1
            break
    _sync(device)
    result.decode_seconds = time.perf_counter() - start
    return steps


def _decode_compiled(step, setup_seconds, cache, token, prompt, out_tokens, eos_token_id, result) -> int:
    """Steps 1.. through the compiled step, after copying the prefill's cache into it."""
    start = time.perf_counter()
    step.load_cache(cache, prompt)
    result.capture_seconds = setup_seconds + time.perf_counter() - start
    result.mode = "compiled"
    max_new_tokens = out_tokens.shape[0]
    tokens = [token]
    start = time.perf_counter()
    for position in range(prompt, prompt + max_new_tokens - 1):
        token = step(token, position)
        tokens.append(token)
        if token == eos_token_id:
            break
    result.decode_seconds = time.perf_counter() - start
    out_tokens[: len(tokens)] = torch.tensor(tokens)
    return len(tokens)


def _decode_with_graph(model, cache, token, prompt, out_tokens, eos_token_id, result) -> int:
    """Capture the one-token step into a CUDA graph, then replay it per token. The warm-up
    steps compute position ``prompt`` (the first decode step); the cache slots they write are
    written again by the replays before any step attends to them, and the cache's token
    counters are restored after them. Warm-up and capture time is reported as
    ``capture_seconds``, outside the decode time."""
    device = token.device
    static_token = token.clone()
    static_position = torch.tensor([prompt], device=device)

    def step():
        out = model(static_token, cache=cache, cache_position=static_position, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].argmax(-1, keepdim=True)

    start = time.perf_counter()
    graph = torch.cuda.CUDAGraph()
    # transformers' StaticCache layers count the tokens they hold in a device tensor and write
    # at that count: the warm-up steps advance it, so it is put back before the first replay
    counters = [layer.cumulative_length for layer in getattr(cache, "layers", [])
                if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor)]
    saved = [counter.clone() for counter in counters]
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: allocator pools, kernel autotuning
                step()
        torch.cuda.current_stream(device).wait_stream(side)
        for counter, value in zip(counters, saved):
            counter.copy_(value)
        with torch.cuda.graph(graph):
            static_token.copy_(step())
            static_position.add_(1)
    except RuntimeError as err:
        torch.cuda.synchronize(device)
        for counter, value in zip(counters, saved):
            counter.copy_(value)
        log.warning("CUDA graph capture failed (%s); decoding eagerly", str(err).splitlines()[0])
        result.capture_seconds = time.perf_counter() - start
        return _decode_eager(model, cache, token, prompt, out_tokens, eos_token_id, result, device)
    torch.cuda.synchronize(device)
    result.mode = "cuda graph"
    result.capture_seconds = time.perf_counter() - start
    max_new_tokens = out_tokens.shape[0]
    steps = max_new_tokens
    start = time.perf_counter()
    for step_index in range(1, max_new_tokens):
        graph.replay()
        out_tokens[step_index] = static_token[0, 0]
        if eos_token_id is not None and int(static_token) == eos_token_id:
            steps = step_index + 1
            break
    torch.cuda.synchronize(device)
    result.decode_seconds = time.perf_counter() - start
    return steps
