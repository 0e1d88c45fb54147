"""Learned rounding (SignRound: Cheng et al. 2023, "Optimize Weight Rounding via Signed
Gradient Descent", Intel's AutoRound): instead of rounding each weight to its nearest level
(Eq. 3.1), learn, for every weight, an offset V in [-0.5, 0.5] added before rounding, and for
every group, factors α, β in [CLIP_MIN, 1] that shrink its range, by minimising a decoder
block's output error against the float block's on calibration inputs:

    Ŵ = S' · (Clamp(Round(W_B / S' + Z' + V), q_min, q_max) - Z')                (Eq. 3.1-3.2)
    S' = (α·x_max - β·x_min) / (q_max - q_min),   Z' = Round(q_min - β·x_min / S')   (Eq. 3.3)
    min over V, α, β of  || block_Ŵ(X_q) - block_W(X) ||²

with X_q the block's inputs from the already-quantised blocks before it and X the float
model's own inputs to the block (AutoRound's objective; the engine carries that stream), or
X = X_q (the float block on the same inputs). Here the targets arrive computed. Round passes its
gradient straight through (the STE of report §5.2). SignRound's own step moves every
parameter by the sign of its gradient times a learning rate that decays linearly to 0 (the
total movement stays within the offsets' range, and the sign ignores the gradients' scale,
which differs by orders of magnitude between layers); Adam with the same decaying rate is
the other choice, and the better one from GPTQ's codes on SmolLM2 (docs/results.md).

Starting point: the codes, scales and zero-points of another method (RTN, GPTQ, AWQ) and the
weight it rounded: the float weight for RTN and AWQ (AWQ's with its input scales folded in),
and for GPTQ each weight as it stood when its column was rounded, the float weight plus the
error feedback of the columns before it. W_B, the "base weight", is that weight held to
within half a step of the start's level, so that V = 0, α = β = 1 reproduce the start
exactly; the offsets then decide which weights that sat near a rounding boundary go the
other way. Learning can only improve on the start: a block keeps it when the learned
rounding does not lower its output error on all calibration samples.

Symmetric grids learn one factor (α scales S); a float offset (llama.cpp's Q4_1) shrinks its
range like an integer zero-point's; GGML K-quants keep the start's scales (they are stored as
integers under a super-block scale) and learn the offsets only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import LowbitError
from lowbit.numerics.formats import IntFormat
from lowbit.numerics.quantization import Quantized, expand_groups, ggml_stored
from lowbit.packed.qweight import QuantizedWeight

# The base weight sits at most this far from its start level, in steps: strictly inside
# half a step, so that rounding it gives the start's level back.
BASE_MARGIN = 0.499
# Range factors stay in [CLIP_MIN, 1] (AutoRound clamps its min/max scales the same way).
CLIP_MIN = 0.5


def ste_round(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity in the backward pass (the STE, report §5.2)."""
    return x + (torch.round(x) - x).detach()


class LearnedRounding(nn.Module):
    """A linear layer whose weight is Ŵ(V, α, β) of the module docstring, from a start.

    start: the start's codes, scales and zero-points (`Quantized`, (out, in) codes).
    weight: float32 (out, in), the weight the start rounded, in the start's coordinates
        (see the module docstring); held to within BASE_MARGIN steps of the start's levels.
    learn_clip: learn the range factors α (and β with a zero-point); GGML K-quants never do.

    Parameters: ``offset`` (out, in) in [-0.5, 0.5]; ``clip_hi``, ``clip_lo`` (rows, n_groups)
    in [CLIP_MIN, 1] (``clip_lo`` only with a zero-point or offset).
    """

    def __init__(self, start: Quantized, weight: torch.Tensor, bias: torch.Tensor | None, learn_clip: bool = True):
        super().__init__()
        spec = start.spec
        if not isinstance(spec.number_format, IntFormat):
            raise LowbitError(f"learned rounding needs an integer grid; {spec.describe()} is a codebook")
        if spec.double_quant:
            raise LowbitError("learned rounding cannot keep double-quantised scales; drop --double-quant")
        self.spec, self.group_size, self.g_idx = spec, start.group_size, start.g_idx
        self.shape = tuple(start.codes.shape)
        fmt = spec.number_format
        self.qmin, self.qmax = fmt.qmin, fmt.qmax
        self.register_buffer("scale", start.scale.float().clone())
        self.register_buffer("zero", None if start.zero is None else start.zero.float().clone())
        self.register_buffer("base", self._base_weight(start, weight.detach().float()))
        self.bias = None if bias is None else bias.detach().clone()
        self.offset = nn.Parameter(torch.zeros(self.shape))
        self.learn_clip = learn_clip and not (spec.ggml is not None and spec.ggml.k_quant)
        if self.learn_clip:
            self.clip_hi = nn.Parameter(torch.ones_like(self.scale))
            self.clip_lo = nn.Parameter(torch.ones_like(self.scale)) if spec.has_zero else None
        else:
            self.clip_hi = self.clip_lo = None

    def _expand(self, t: torch.Tensor) -> torch.Tensor:
        return expand_groups(t, self.group_size, self.shape[1], self.g_idx)

    def _base_weight(self, start: Quantized, weight: torch.Tensor) -> torch.Tensor:
        """W_B: ``weight`` clamped to within BASE_MARGIN steps of the start's level."""
        s, z = self._expand(start.scale.float()), None if start.zero is None else self._expand(start.zero.float())
        level = self.spec.number_format.decode(start.codes)
        position = self._position(weight, s, z)
        moved = level + torch.clamp(position - level, -BASE_MARGIN, BASE_MARGIN)
        return self._value(moved, s, z)

    def _position(self, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        """Where ``w`` falls on the grid of (s, z), in levels (Eq. 3.1 before rounding)."""
        if z is None:
            return w / s
        if self.spec.zero_point == "float":
            return (w - z) / s
        return w / s + z

    def _value(self, level: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        """Eq. 3.2 for levels (q, not unsigned codes)."""
        if z is None:
            return s * level
        if self.spec.zero_point == "float":
            return s * level + z
        return s * (level - z)

    def params(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The group scales S' and zero-points Z' (or offsets) under the current α, β,
        (rows, n_groups); the start's at α = β = 1."""
        if not self.learn_clip:
            return self.scale, self.zero
        if self.zero is None:
            return self.scale * self.clip_hi, None
        span = self.qmax - self.qmin
        if self.spec.zero_point == "float":
            lo, hi = self.zero, self.zero + self.scale * span
            lo, hi = self.clip_lo * lo, self.clip_hi * hi
            return (hi - lo) / span, lo
        lo, hi = self.scale * (self.qmin - self.zero), self.scale * (self.qmax - self.zero)
        lo, hi = self.clip_lo * lo, self.clip_hi * hi
        scale = torch.clamp((hi - lo) / span, min=torch.finfo(torch.float16).tiny)
        return scale, torch.clamp(ste_round(self.qmin - lo / scale), self.qmin, self.qmax)

    def levels(self, s: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        """Clamp(Round(position of W_B + V)), float (out, in), with the STE."""
        position = self._position(self.base, self._expand(s), None if z is None else self._expand(z))
        return torch.clamp(ste_round(position + self.offset), self.qmin, self.qmax)

    def weight(self) -> torch.Tensor:
        """Ŵ, float32 (out, in), differentiable in V, α, β."""
        s, z = self.params()
        return self._value(self.levels(s, z), self._expand(s), None if z is None else self._expand(z))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight().to(x.dtype), bias)

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep every parameter in its range after a step."""
        self.offset.clamp_(-0.5, 0.5)
        for factor in (self.clip_hi, self.clip_lo):
            if factor is not None:
                factor.clamp_(CLIP_MIN, 1.0)

    @torch.no_grad()
    def reset_(self) -> None:
        """Back to the start (V = 0, α = β = 1)."""
        self.offset.zero_()
        for factor in (self.clip_hi, self.clip_lo):
            if factor is not None:
                factor.fill_(1.0)

    @torch.no_grad()
    def quantized(self) -> QuantizedWeight:
        """The learned codes, packed: scales rounded to how they are stored first, and the
        codes computed against those stored scales (as every lowbit method does)."""
        s, z = self.params()
        store = getattr(torch, self.spec.scale_dtype)
        s = s.to(store).float()
        s = torch.where(s == 0, torch.full_like(s, torch.finfo(torch.float16).tiny), s)
        if z is not None and self.spec.zero_point == "float":
            z = z.to(store).float()
        s, z = ggml_stored(s, z, self.spec)
        codes = self.spec.number_format.encode(self.levels(s, z))
        return QuantizedWeight.from_quantized(Quantized(codes=codes, scale=s, zero=z, group_size=self.group_size, spec=self.spec,
                                                        g_idx=self.g_idx))


@dataclass(frozen=True)
class SignRoundResult:
    """What learning did to one block: its output error (mean squared error per element
    against the float block, over all calibration samples) at the start and after learning,
    and whether the learned rounding was kept (it is when it is lower)."""

    start_error: float
    learned_error: float
    kept: bool

    @property
    def error(self) -> float:
        return self.learned_error if self.kept else self.start_error


def block_error(run: Callable[[int], torch.Tensor], targets: Sequence[torch.Tensor]) -> float:
    """Mean squared error of ``run(i)`` against ``targets[i]`` over every batch and element."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i, target in enumerate(targets):
            total += (run(i).float() - target.float()).square().sum().item()
            count += target.numel()
    return total / count


def signround(run: Callable[[int], torch.Tensor], targets: Sequence[torch.Tensor], layers: Sequence[LearnedRounding],
              iters: int, lr: float | None = None, seed: int = 0, optimizer: str = "sign") -> SignRoundResult:
    """Learn the offsets and range factors of ``layers`` (the learned linears of one block)
    on the block's output error, by signed gradient descent or Adam.

    run: i -> the block's output on calibration batch i (float (batch, seq, hidden)),
        computed through ``layers``; targets: the float block's outputs on the same inputs.
    iters: steps, each on one batch drawn at random (seeded); lr: the first step's size
        (default 1 / iters), decaying linearly to 0, so that no offset can move by more than
        about lr · iters / 2 in all.
    optimizer: ``sign`` (SignRound's step, size · sign(gradient)) or ``adam`` (the same
        decaying size as Adam's learning rate).
    The layers end at the learned values if they lower the output error on all batches,
    else back at the start.
    """
    if iters < 0:
        raise LowbitError(f"iters must be 0 or more, got {iters}")
    if optimizer not in ("sign", "adam"):
        raise LowbitError(f"optimizer {optimizer!r} is unknown; use sign or adam")
    lr = 1.0 / max(iters, 1) if lr is None else lr
    start_error = block_error(run, targets)
    if iters == 0:
        return SignRoundResult(start_error, start_error, kept=False)
    params = [p for layer in layers for p in layer.parameters()]
    generator = torch.Generator().manual_seed(seed)
    order = torch.randint(0, len(targets), (iters,), generator=generator).tolist()
    adam = torch.optim.Adam(params, lr=lr) if optimizer == "adam" else None
    for step, i in enumerate(order):
        with torch.enable_grad():  # the engine runs under no_grad
            loss = F.mse_loss(run(i).float(), targets[i].float())
            grads = torch.autograd.grad(loss, params)
        size = lr * (1.0 - step / iters)
        with torch.no_grad():
            if adam is None:
                for p, g in zip(params, grads):
                    p.sub_(size * torch.sign(g))
            else:
                for p, g in zip(params, grads):
                    p.grad = g
                for group in adam.param_groups:
                    group["lr"] = size
                adam.step()
        for layer in layers:
            layer.clamp_()
    learned_error = block_error(run, targets)
    kept = learned_error < start_error and math.isfinite(learned_error)
    if not kept:
        for layer in layers:
            layer.reset_()
    return SignRoundResult(start_error, learned_error, kept)
