"""Perplexity, KL divergence and top-1 agreement against a reference model, and storage.

KLD and top-1 follow llama.cpp's perplexity tool: at every scored position, the KL
divergence of the candidate's next-token distribution Q from the reference's P,
``sum_v P(v) (log P(v) - log Q(v))``, averaged over positions (nats), and the share of
positions where both put their highest probability on the same token.
"""

from __future__ import annotations

import math
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.evaluation.reference_cache import cache_path, load_hidden, store_hidden
from lowbit.modules import QUANTIZED_MODULES, storage_bytes
from lowbit.modules.quant_linear import dequantized_once
from lowbit.packed.qweight import bits_per_weight


@dataclass
class EvalResult:
    """One model's scores over the same windows.

    perplexity: exp(mean negative log-likelihood per predicted token).
    kld: mean KL(P_ref || P_model) per position, nats; None without a reference.
    top1_percent: percentage of positions whose argmax equals the reference's (0-100, as the
        CLI's table prints it); None without a reference.
    tokens: predicted tokens scored.
    bits_per_weight: storage bits per weight of the linear layers (the output head excluded).
    model_bytes: bytes of all the model's tensors (tied tensors once).
    seconds: wall time of this model's forward passes.
    """

    label: str
    perplexity: float
    kld: float | None
    top1_percent: float | None
    tokens: int
    bits_per_weight: float
    model_bytes: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and persistent buffer, each storage counted once."""
    seen, total = set(), 0
    for tensor in list(model.state_dict().values()):
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def linear_storage(model: nn.Module) -> tuple[int, int]:
    """(storage bytes, weights) of the model's linear layers, float or quantised, leaving
    out the output head (`get_output_embeddings`, where ``model`` has one) and everything
    inside it (the QuantLinear a kernel wraps, ``lm_head.reference``, goes with its ``lm_head``)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inside_head = set() if head is None else {id(m) for m in head.modules()}
    nbytes = count = 0
    for module in model.modules():
        if id(module) in inside_head:
            continue
        if isinstance(module, tuple(QUANTIZED_MODULES.values())):
            nbytes += storage_bytes(module)
            count += module.out_features * module.in_features
        elif isinstance(module, nn.Linear):
            nbytes += module.weight.numel() * module.weight.element_size()
            count += module.weight.numel()
    return nbytes, count


def linear_bits_per_weight(model: nn.Module) -> float:
    """Storage bits per weight over the model's linear layers (`linear_storage`)."""
    nbytes, count = linear_storage(model)
    return bits_per_weight(nbytes, count) if count else float("nan")


# Positions x vocabulary elements of one float32 chunk of logits: 32 M floats = 128 MB, so
# a 262k-vocabulary model (Gemma) projects 128 positions at a time. The chunk buffers are
# allocated once per `evaluate` call and reused for every window and model: freshly mapped
# memory costs ~1 s per GB to touch on our machines, and a window's logits, log-probs and
# KL terms for each model scored used to be fresh allocations every time.
CHUNK_ELEMENTS = 32 * 1024 * 1024


def final_hidden_states(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The hidden states the output projection reads, (positions, hidden), without
    materialising the full logits (``logits_to_keep=1``)."""
    out = model(inputs, logits_to_keep=1, output_hidden_states=True, use_cache=False)
    return out.hidden_states[-1][0]


def last_hidden_state(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The same hidden states from the base model's own output (after its final norm), for
    a model whose blocks are stand-ins that transformers' hidden-state recording does not
    see (`lowbit.evaluation.streamed`)."""
    return model.base_model(inputs, use_cache=False).last_hidden_state[0]


def log_probs_into(model: nn.Module, hidden: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """log softmax of the model's logits for ``hidden`` (n, hidden), written into ``out``
    (>= n rows, float32) and returned as its first n rows."""
    head = model.get_output_embeddings()
    view = out[: hidden.shape[0]]
    if type(head) is nn.Linear and head.bias is None and head.weight.dtype == torch.float32:
        torch.mm(hidden.float(), head.weight.t(), out=view)
    else:
        view.copy_(head(hidden))
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        view.div_(cap).tanh_().mul_(cap)
    return view.sub_(torch.logsumexp(view, -1, keepdim=True))


def _check_chunked_head(model: nn.Module, inputs: torch.Tensor, hidden: torch.Tensor) -> None:
    """The chunked projection must reproduce the model's own logits (checked on one window).

    The two paths add in different orders (one product over the window vs chunks), so they
    differ by float32 rounding, which grows with the logits' magnitude: a collapsed 2-bit
    model's logits reach hundreds. The tolerance is therefore 1e-4 plus 2e-5 of the largest
    logit; a head that is not the model's (a missing soft-cap, a scale) is off by far more.
    """
    logits = model(inputs, use_cache=False).logits[0].float()
    full = F.log_softmax(logits, dim=-1)
    mine = log_probs_into(model, hidden, torch.empty_like(full))
    tolerance = 1e-4 + 2e-5 * logits.abs().max().item()
    worst = (mine - full).abs().max().item()
    if not worst <= tolerance:
        raise LowbitError(f"{type(model).__name__}: the last hidden state through the output embeddings does not give the model's "
                          f"logits (log-probabilities differ by up to {worst:.3g}, tolerance {tolerance:.3g}); lowbit's evaluation "
                          "does not support this model")


@torch.no_grad()
def evaluate(
    models: dict[str, nn.Module],
    windows: torch.Tensor,
    reference: nn.Module | None = None,
    progress: bool = True,
    reference_cache: str | Path | None = None,
) -> list[EvalResult]:
    """Score each model on ``windows`` (int64 (n, ctx)), each against ``reference``.

    Each model runs once per window up to its final hidden states; the output projection,
    log-softmax, KLD and top-1 are then computed in chunks of positions, the reference's
    chunk once and shared. A model that is the reference object itself is not run twice.
    KL is summed as Σ P_ref (log P_ref - log P) with the difference taken first, so small
    divergences do not cancel away in float32. Quantised layers compute with their weights
    dequantised once for the whole evaluation (`dequantized_once`): the same numbers as
    dequantising on every call, at the float model's speed.

    ``reference_cache``: a directory where the reference's final hidden states on these
    windows are kept (`lowbit.evaluation.reference_cache`); when they are there the
    reference runs only its output projection, for the same scores bit for bit, and its
    ``seconds`` count only that.
    """
    _check_inputs(models, windows, reference)
    cached = path = None
    if reference_cache is not None and reference is not None:
        path = cache_path(Path(reference_cache), reference, windows)
        cached = load_hidden(path, windows)
    with ExitStack() as stack:
        for model in {id(m): m for m in [*models.values(), *([reference] if reference is not None else [])]}.values():
            stack.enter_context(dequantized_once(model))
        computed = [] if path is not None and cached is None else None
        results = _evaluate(models, windows, reference, progress, final_hidden_states, cached, computed)
    if computed:
        store_hidden(path, torch.stack(computed))
    return results


def _check_inputs(models, windows, reference) -> None:
    if not isinstance(models, dict) or not models:
        raise LowbitError("evaluate needs at least one model: pass {label: model}, e.g. {'w4': loaded.model}")
    for label, model in [*models.items(), *([("reference", reference)] if reference is not None else [])]:
        if not isinstance(model, nn.Module) or not hasattr(model, "get_output_embeddings"):
            raise LowbitError(f"evaluate: {label!r} is a {type(model).__name__}, not a causal LM; pass loaded.model")
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.dtype != torch.long:
        raise LowbitError("evaluate takes windows as an int64 (n, ctx) tensor; build them with lowbit.data.eval_windows")
    if windows.shape[0] == 0 or windows.shape[1] < 2:
        raise LowbitError(f"evaluate got windows of shape {tuple(windows.shape)}; give at least one window of at least 2 tokens")
    vocab = min(m.get_output_embeddings().out_features for m in [*models.values(), *([reference] if reference is not None else [])])
    if int(windows.min()) < 0 or int(windows.max()) >= vocab:
        raise LowbitError(f"evaluate: the windows hold token ids outside [0, {vocab}) (the model's vocabulary); tokenise with the model's own tokenizer")


def _evaluate(models: dict[str, nn.Module], windows: torch.Tensor, reference: nn.Module | None, progress: bool,
              hidden_of=final_hidden_states, reference_hidden: torch.Tensor | None = None,
              keep_reference: list | None = None) -> list[EvalResult]:
    """`evaluate`'s loop. ``reference_hidden``: the reference's final hidden states on the
    windows, (n, ctx - 1, hidden), used instead of running it; ``keep_reference``: a list
    that gets the reference's hidden states of each window as they are computed."""
    ref_label = next((label for label, m in models.items() if m is reference), "__reference__")
    runs = {label: m for label, m in models.items() if m is not reference}  # each model run once
    if reference is not None:
        runs[ref_label] = reference
    nll = {label: 0.0 for label in models}
    kld = {label: 0.0 for label in models}
    agree = {label: 0 for label in models}
    seconds = {label: 0.0 for label in runs}
    vocab = next(iter(runs.values())).get_output_embeddings().out_features
    step = max(1, min(windows.shape[1], CHUNK_ELEMENTS // vocab))
    work, ref_work, ref_prob = (torch.empty(step, vocab) for _ in range(3))
    positions = 0
    for index, window in enumerate(tqdm(windows, desc="evaluating", disable=not progress, unit="window")):
        inputs, targets = window[None, :-1], window[1:]
        hidden = {}
        for label, model in runs.items():
            if label == ref_label and reference_hidden is not None:  # checked against the model when it was stored
                hidden[label] = reference_hidden[index]
                continue
            start = time.perf_counter()
            hidden[label] = hidden_of(model, inputs)
            seconds[label] += time.perf_counter() - start
            if label == ref_label and keep_reference is not None:
                keep_reference.append(hidden[label].clone())
            if index == 0:
                _check_chunked_head(model, inputs, hidden[label])
        for lo in range(0, len(targets), step):
            chunk_targets = targets[lo : lo + step]
            n = len(chunk_targets)
            ref_logp = ref_top = None
            if reference is not None:
                start = time.perf_counter()
                ref_logp = log_probs_into(reference, hidden[ref_label][lo : lo + step], ref_work)
                seconds[ref_label] += time.perf_counter() - start
                ref_top = ref_logp.argmax(-1)
                ref_p = torch.exp(ref_logp, out=ref_prob[:n])
            for label, model in models.items():
                if model is reference:
                    nll[label] -= ref_logp.gather(-1, chunk_targets[:, None]).sum().item()
                    agree[label] += n
                    continue
                start = time.perf_counter()
                logp = log_probs_into(model, hidden[label][lo : lo + step], work)
                seconds[label] += time.perf_counter() - start
                nll[label] -= logp.gather(-1, chunk_targets[:, None]).sum().item()
                if ref_logp is not None:
                    agree[label] += (logp.argmax(-1) == ref_top).sum().item()
                    diff = logp.neg_().add_(ref_logp)  # log P_ref - log P, in place
                    kld[label] += torch.dot(ref_p.reshape(-1), diff.reshape(-1)).item()
        positions += len(targets)
    return [
        EvalResult(
            label=label,
            perplexity=math.exp(nll[label] / positions),
            kld=kld[label] / positions if reference is not None else None,
            top1_percent=100.0 * agree[label] / positions if reference is not None else None,
            tokens=positions,
            bits_per_weight=linear_bits_per_weight(model),
            model_bytes=model_bytes(model),
            seconds=seconds[ref_label if model is reference else label],
        )
        for label, model in models.items()
    ]
