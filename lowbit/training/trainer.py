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
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.training.config import TrainConfig
from lowbit.training.distributed import Parallel, WireBytes


@dataclass
class TrainResult:
    """losses: the global batch's loss per step; curve: (step, held-out perplexity) every
    ``eval_every`` steps; in a multi-process run, grad_bytes_per_step is the median over steps
    of the bytes this rank wrote to its sockets during the backward pass (`WireBytes`: the
    gradient all-reduce, headers included) and counted_grad_bytes_per_step what lowbit's hook
    counted it sent (None for torch's hooks); step_seconds: the median step."""

    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0
    trainable_parameters: int = 0
    optimizer_state_bytes: int = 0
    curve: list[tuple[int, float]] = field(default_factory=list)
    step_seconds: float = 0.0
    grad_bytes_per_step: float | None = None
    counted_grad_bytes_per_step: float | None = None


@dataclass
class TrainState:
    """Where a run stands after ``step`` optimizer steps: with the trained parameters, all a
    stopped run needs to go on exactly as if it had not stopped (`train`'s ``resume``).

    optimizer: the optimizer's ``state_dict``; generator: the window sampler's RNG state
    (uint8 tensor); losses: the loss of every step so far; tokens: tokens trained on so far.
    """

    step: int
    optimizer: dict
    generator: torch.Tensor
    losses: list[float]
    tokens: int


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
    out = model(batch[:, :-1])
    logits = out.logits if hasattr(out, "logits") else out  # a transformers model (maybe inside DDP), or a bare module
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
    parallel: Parallel | None = None,
    evaluate: Callable[[nn.Module], float] | None = None,
    resume: TrainState | None = None,
    save_state: Callable[[TrainState], None] | None = None,
    save_every: int = 0,
) -> TrainResult:
    """Train ``parameters`` (default: those requiring grad) of ``model`` on ``tokens``.

    parallel: this process's rank in a multi-process run: the model is wrapped in
    DistributedDataParallel with the gradient hook of ``parallel.grad``, each rank takes its
    slice of every global batch (the same batches one process would draw). evaluate: held-out
    perplexity of the model, called every ``config.eval_every`` steps (on rank 0 only) for
    ``result.curve``. save_state: called with the run's `TrainState` every ``save_every``
    steps (not after the last); resume: a state it saved, with ``model``'s parameters as they
    were then: the run continues from that step and ends with the parameters, losses and
    window draws of a run that never stopped."""
    params = list(parameters if parameters is not None else (p for p in model.parameters() if p.requires_grad))
    if not params:
        raise LowbitError("nothing to train: no parameter requires a gradient")
    runner = model if parallel is None else parallel.wrap(model, config.seed)
    main = parallel is None or parallel.is_main
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    result = TrainResult(trainable_parameters=sum(p.numel() for p in params))
    first = 0
    if resume is not None:
        optimizer.load_state_dict(resume.optimizer)
        generator.set_state(resume.generator)
        result.losses, result.tokens, first = list(resume.losses), resume.tokens, resume.step
    wire, counted, step_times = [], [], []
    model.train()
    start = time.perf_counter()
    bar = tqdm(range(first, config.steps), desc=desc, disable=not (progress and main), initial=first, total=config.steps)
    for step in bar:
        step_start = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = config.lr * schedule(step, config)
        batch = random_windows(tokens, config.batch_size, config.ctx, generator, bos_id)
        loss = loss_fn(runner, batch if parallel is None else parallel.shard(batch))
        optimizer.zero_grad(set_to_none=True)
        if parallel is not None:
            written, sent = WireBytes.now(), parallel.counted_bytes()
        loss.backward()  # DDP's all-reduce (and its hook) runs inside
        if parallel is not None:
            if written is not None:
                wire.append(WireBytes.now() - written)
            if sent is not None:
                counted.append(parallel.counted_bytes() - sent)
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        if state_device is not None:
            _states_to(optimizer, params[0].device)
        optimizer.step()
        if state_device is not None:
            _states_to(optimizer, state_device)
        result.losses.append(loss.item() if parallel is None else parallel.mean(loss.item()))
        result.tokens += batch[:, 1:].numel()
        step_times.append(time.perf_counter() - step_start)
        bar.set_postfix(loss=f"{sum(result.losses[-20:]) / len(result.losses[-20:]):.3f}")
        if evaluate is not None and main and config.eval_every and (step + 1) % config.eval_every == 0 and step + 1 < config.steps:
            result.curve.append((step + 1, evaluate(model)))
            model.train()
        if save_state is not None and save_every and (step + 1) % save_every == 0 and step + 1 < config.steps:
            save_state(TrainState(step + 1, optimizer.state_dict(), generator.get_state(), list(result.losses), result.tokens))
    model.eval()
    result.seconds = time.perf_counter() - start
    result.step_seconds = statistics.median(step_times) if step_times else 0.0
    if wire:
        result.grad_bytes_per_step = statistics.median(wire)
    if counted:
        result.counted_grad_bytes_per_step = statistics.median(counted)
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
