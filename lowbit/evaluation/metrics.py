"""Perplexity, KL divergence and top-1 agreement against a reference model, and storage.

KLD and top-1 follow llama.cpp's perplexity tool: at every scored position, the KL
divergence of the candidate's next-token distribution Q from the reference's P,
``sum_v P(v) (log P(v) - log Q(v))``, averaged over positions (nats), and the share of
positions where both put their highest probability on the same token.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lowbit.modules import QUANTIZED_MODULES, storage_bytes


@dataclass
class EvalResult:
    """One model's scores over the same windows.

    perplexity: exp(mean negative log-likelihood per predicted token).
    kld: mean KL(P_ref || P_model) per position, nats; None without a reference.
    top1_agreement: share of positions whose argmax equals the reference's; None without one.
    tokens: predicted tokens scored.
    bits_per_weight: storage bits per weight of the linear layers (lm_head excluded).
    model_bytes: bytes of all the model's tensors (tied tensors once).
    seconds: wall time of this model's forward passes.
    """

    label: str
    perplexity: float
    kld: float | None
    top1_agreement: float | None
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


def linear_bits_per_weight(model: nn.Module, exclude: tuple[str, ...] = ("lm_head",)) -> float:
    """Storage bits per weight over the model's linear layers, float or quantised."""
    bits = count = 0
    for name, module in model.named_modules():
        if any(name.endswith(e) for e in exclude):
            continue
        if isinstance(module, tuple(QUANTIZED_MODULES.values())):
            bits += 8 * storage_bytes(module)
            count += module.out_features * module.in_features
        elif isinstance(module, nn.Linear):
            bits += 8 * module.weight.numel() * module.weight.element_size()
            count += module.weight.numel()
    return bits / count if count else float("nan")


@torch.no_grad()
def evaluate(
    models: dict[str, nn.Module],
    windows: torch.Tensor,
    reference: nn.Module | None = None,
    progress: bool = True,
) -> list[EvalResult]:
    """Score each model on ``windows`` (int64 (n, ctx)), each against ``reference``.

    The reference's log-probabilities are computed once per window and shared; a model that
    is the reference object itself is not run twice. Models run in their own dtype; logits
    are compared in float32.
    """
    nll = {label: 0.0 for label in models}
    kld = {label: 0.0 for label in models}
    agree = {label: 0 for label in models}
    seconds = {label: 0.0 for label in models}
    ref_seconds = 0.0
    positions = 0
    for window in tqdm(windows, desc="evaluating", disable=not progress, unit="window"):
        inputs, targets = window[None, :-1], window[1:]
        ref_logp = None
        if reference is not None:
            start = time.perf_counter()
            ref_logp = F.log_softmax(reference(inputs).logits[0].float(), dim=-1)
            ref_seconds = time.perf_counter() - start
            ref_top = ref_logp.argmax(-1)
        for label, model in models.items():
            if model is reference:
                logp = ref_logp
                seconds[label] += ref_seconds
            else:
                start = time.perf_counter()
                logp = F.log_softmax(model(inputs).logits[0].float(), dim=-1)
                seconds[label] += time.perf_counter() - start
            nll[label] -= logp.gather(-1, targets[:, None]).sum().item()
            if ref_logp is not None:
                kld[label] += F.kl_div(logp, ref_logp, reduction="sum", log_target=True).item()
                agree[label] += (logp.argmax(-1) == ref_top).sum().item()
        positions += len(targets)
    return [
        EvalResult(
            label=label,
            perplexity=math.exp(nll[label] / positions),
            kld=kld[label] / positions if reference is not None else None,
            top1_agreement=agree[label] / positions if reference is not None else None,
            tokens=positions,
            bits_per_weight=linear_bits_per_weight(model),
            model_bytes=model_bytes(model),
            seconds=seconds[label],
        )
        for label, model in models.items()
    ]
