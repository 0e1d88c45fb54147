"""A small training loop for fine-tuning (QLoRA, QAT) and the ternary experiment.

Next-token cross-entropy on windows drawn at seeded random offsets from a token stream,
AdamW with linear warm-up and cosine decay, gradient clipping, a progress bar showing the
loss. Optimizer states can be kept on another device than the parameters
(``state_device``): QLoRA's paged optimizers move them to CPU memory when the GPU runs
short; on a CPU-only machine parameters and states share one memory, so this is a no-op
there and `optimizer_state_bytes` reports what the states would free.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.training.config import TrainConfig


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0
    trainable_parameters: int = 0
    optimizer_state_bytes: int = 0


def random_windows(tokens: torch.Tensor, batch_size: int, ctx: int, generator: torch.Generator, bos_id: int | None = None) -> torch.Tensor:
    """(batch, ctx) windows at random offsets, BOS-prefixed when the tokenizer uses one."""
    body = ctx - 1 if bos_id is not None else ctx
    if len(tokens) <= body:
        raise LowbitError(f"the training text has {len(tokens)} tokens, fewer than one window of {ctx}; use more text or a smaller --ctx")
    starts = torch.randint(0, len(tokens) - body, (batch_size,), generator=generator)
    batch = torch.stack([tokens[s : s + body] for s in starts.tolist()])
    if bos_id is not None:
        batch = torch.cat([torch.full((batch_size, 1), bos_id, dtype=torch.long), batch], 1)
    return batch


def lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    logits = model(batch[:, :-1]).logits if hasattr(model, "config") else model(batch[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))


def schedule(step: int, config: TrainConfig) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine decay to 10%."""
    warm = max(1, int(config.warmup * config.steps))
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, config.steps - warm)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train(
    model: nn.Module,
    tokens: torch.Tensor,
    config: TrainConfig,
    parameters: Sequence[nn.Parameter] | None = None,
    bos_id: int | None = None,
    state_device: str | torch.device | None = None,
    loss_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] = lm_loss,
    progress: bool = True,
    desc: str = "training",
) -> TrainResult:
    """Train ``parameters`` (default: those requiring grad) of ``model`` on ``tokens``."""
    params = list(parameters if parameters is not None else (p for p in model.parameters() if p.requires_grad))
    if not params:
        raise LowbitError("nothing to train: no parameter requires a gradient")
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    result = TrainResult(trainable_parameters=sum(p.numel() for p in params))
    model.train()
    start = time.perf_counter()
    bar = tqdm(range(config.steps), desc=desc, disable=not progress)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = config.lr * schedule(step, config)
        batch = random_windows(tokens, config.batch_size, config.ctx, generator, bos_id)
        loss = loss_fn(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        if state_device is not None:
            _states_to(optimizer, params[0].device)
        optimizer.step()
        if state_device is not None:
            _states_to(optimizer, state_device)
        result.losses.append(loss.item())
        result.tokens += batch[:, 1:].numel()
        bar.set_postfix(loss=f"{sum(result.losses[-20:]) / len(result.losses[-20:]):.3f}")
    model.eval()
    result.seconds = time.perf_counter() - start
    result.optimizer_state_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    return result


def _states_to(optimizer: torch.optim.Optimizer, device) -> None:
    for state in optimizer.state.values():
        for key, value in state.items():
            if torch.is_tensor(value) and value.dim() > 0:
                state[key] = value.to(device)


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor) -> float:
    """exp(mean next-token cross-entropy) over int64 windows (n, ctx)."""
    model.eval()
    total, count = 0.0, 0
    for w in windows:
        total += lm_loss(model, w[None]).item() * (len(w) - 1)
        count += len(w) - 1
    return math.exp(total / count)
