"""`--budget BITS_PER_WEIGHT`: measure each linear's sensitivity on calibration samples and
choose its bits and group size so that the quantised linears together store exactly the
budget's bits per weight or just under it (`lowbit.algorithms.bit_allocation`).

Each candidate spec's error is its round-to-nearest error ΔW weighed by the linear's
sensitivity: by default the diagonal empirical Fisher, ½ Σ F ⊙ ΔW², the second-order cost of
ΔW to the model's loss (`fisher_diagonals`); or the linear's own output error ½ tr(ΔW H ΔWᵀ)
of report §7.2 with H from its float inputs (`input_hessians`; the whole-H form of
llama.cpp's imatrix weighting), which measured worse than no plan at all (docs/results.md).
The method then quantises each linear with its chosen spec. Bytes are counted as the
checkpoint stores them (`stored_bytes`: codes, scales, zero-points), so the plan's bits per
weight is the checkpoint's, to the byte.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.algorithms.bit_allocation import allocate
from lowbit.calibration.statistics import HessianAccumulator
from lowbit.errors import LowbitError
from lowbit.methods.config import BUDGET_SENSITIVITIES
from lowbit.models.architectures import Architecture, decoder_blocks
from lowbit.numerics.quantization import fake_quantize
from lowbit.numerics.spec import QuantSpec
from lowbit.packed.qweight import bits_per_weight, stored_bytes

# The candidates every linear chooses from: these code widths, in these group sizes (each
# with the rest of the method's spec: symmetry, zero-point, range, grid).
BUDGET_BITS = (2, 3, 4, 5, 6, 8)
BUDGET_GROUPS = (32, 64, 128)


@dataclass(frozen=True)
class BudgetPlan:
    """The chosen spec of each linear and what the plan costs.

    layers: (name, bits, group_size) per linear, in model order (group_size None for a
        per-channel spec).
    bits_per_weight: the plan's storage over the planned linears (8 · bytes / weights).
    sensitivity: "fisher" or "hessian" (what ``error`` sums, `plan_budget`).
    error: the plan's summed error under round to nearest; uniform: the best single spec
        within the budget, as (label, bits per weight, summed error), or None if none fits.
    seconds: the time the measurement and the choice took.
    """

    budget: float
    sensitivity: str
    layers: tuple[tuple[str, int, int | None], ...]
    bits_per_weight: float
    error: float
    uniform: tuple[str, float, float] | None
    seconds: float

    def describe(self) -> str:
        """One line per kind of linear (q_proj, down_proj, ...): how many took each spec."""
        kinds: dict[str, Counter] = {}
        for name, bits, group in self.layers:
            kinds.setdefault(name.rsplit(".", 1)[-1], Counter())[_label(bits, group)] += 1
        what = "estimated loss increase (Fisher)" if self.sensitivity == "fisher" else "layer output error"
        lines = [f"budget {self.budget:g} bits/weight: plan {self.bits_per_weight:.4f} bits/weight over {len(self.layers)} linears, "
                 f"summed {what} {self.error:.4g}"
                 + (f" (best uniform spec within the budget, {self.uniform[0]} at {self.uniform[1]:.4f} bits/weight: "
                    f"{self.uniform[2]:.4g}, {self.uniform[2] / max(self.error, 1e-30):.2f}x)" if self.uniform else "")]
        for kind, counts in kinds.items():
            lines.append(f"  {kind}: " + ", ".join(f"{n}x {label}" for label, n in sorted(counts.items())))
        return "\n".join(lines)


def _label(bits: int, group: int | None) -> str:
    return f"W{bits} g{group}" if group else f"W{bits} per channel"


def candidate_specs(spec: QuantSpec, in_features: int) -> list[QuantSpec]:
    """The specs a linear of rows of ``in_features`` weights may take under a budget: each
    of `BUDGET_BITS` in each of `BUDGET_GROUPS` up to its row length (a group that does not
    divide the row leaves a shorter last group, as everywhere; per channel: bits only), the
    rest of ``spec`` kept."""
    if spec.granularity != "group":
        return [spec.with_changes(bits=b) for b in BUDGET_BITS]
    groups = [g for g in BUDGET_GROUPS if g <= in_features] or [in_features]
    return [spec.with_changes(bits=b, group_size=g) for b in BUDGET_BITS for g in groups]


def _uniform_pick(layer_specs: Sequence[QuantSpec], bits: int, group: int | None) -> int:
    """Index of the candidate with ``bits`` in the largest group up to ``group`` (or the
    smallest group the linear has, when none is that small)."""
    same = [(s.group_size or 0, k) for k, s in enumerate(layer_specs) if s.bits == bits]
    fitting = [pair for pair in same if group is None or pair[0] <= group]
    return max(fitting)[1] if fitting else min(same)[1]


class _StopForward(Exception):
    pass


def input_hessians(model: nn.Module, arch: Architecture, names: Sequence[str], samples: torch.Tensor, batch_size: int,
                   progress: bool = True) -> dict[str, torch.Tensor]:
    """H = 2/n Σ x xᵀ of each linear in ``names`` over its float inputs on ``samples``
    (int64 (n, ctx)), float32 (in, in) by name. Linears of one architecture group read the
    same input and share one H; the forward stops after the last block (no head)."""
    wanted = set(names)
    blocks = decoder_blocks(model, arch)
    owners: dict[str, list[str]] = {}  # the first linear of each group in ``names`` -> all of them
    for i in range(len(blocks)):
        for group in arch.groups:
            members = [f"{arch.blocks}.{i}.{n}" for n in group.linears if f"{arch.blocks}.{i}.{n}" in wanted]
            if members:
                owners[members[0]] = members
    stats = {owner: HessianAccumulator(model.get_submodule(owner).in_features) for owner in owners}
    hooks = [model.get_submodule(owner).register_forward_pre_hook(lambda _m, args, acc=acc: acc.add(args[0]))
             for owner, acc in stats.items()]

    def stop(*_):
        raise _StopForward

    hooks.append(blocks[len(blocks) - 1].register_forward_hook(stop))
    try:
        with torch.no_grad():
            for batch in tqdm(samples.split(batch_size), desc="budget: layer inputs", disable=not progress, unit="batch"):
                try:
                    model(input_ids=batch, use_cache=False)
                except _StopForward:
                    pass
    finally:
        for hook in hooks:
            hook.remove()
    return {name: stats[owner].hessian for owner, members in owners.items() for name in members}


def fisher_diagonals(model: nn.Module, names: Sequence[str], samples: torch.Tensor, progress: bool = True) -> dict[str, torch.Tensor]:
    """F = mean over samples of (∂L/∂W)² for the weight W of each linear in ``names``,
    float32 (out, in) by name: the diagonal of the empirical Fisher information, with L a
    sample's mean next-token loss (``samples``: int64 (n, ctx), one backward pass each, so
    the square is of each sample's own gradient). ½ Σ F ⊙ ΔW² is then the second-order
    estimate of the loss a weight error ΔW costs, the sensitivity SqueezeLLM and HAWQ use:
    unlike a layer's own output error it carries the effect of the layers after it."""
    weights = [model.get_submodule(name).weight for name in names]
    sums = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    flags = [w.requires_grad for w in weights]
    for w in weights:
        w.requires_grad_(True)
    try:
        for sample in tqdm(samples.split(1), desc="budget: gradients", disable=not progress, unit="sample"):
            loss = model(input_ids=sample, labels=sample, use_cache=False).loss
            for total, grad in zip(sums, torch.autograd.grad(loss, weights)):
                total.addcmul_(grad.float(), grad.float())
    finally:
        for w, flag in zip(weights, flags):
            w.requires_grad_(flag)
    return {name: total / len(samples) for name, total in zip(names, sums)}


def plan_budget(model: nn.Module, arch: Architecture, linears: Sequence[tuple[str, nn.Linear]], spec: QuantSpec, budget: float,
                samples: torch.Tensor, batch_size: int = 8, progress: bool = True, extra_bytes=lambda in_features: 0,
                sensitivity: str = "fisher") -> BudgetPlan:
    """Choose each linear's bits and group size for ``budget`` bits per weight.

    linears: (name, module) of every linear the method quantises; spec: the method's spec,
    whose other fields every candidate keeps; extra_bytes: bytes a linear stores beyond
    its codes and scales, by its in_features (GPTQ's g_idx); sensitivity: how a candidate's
    error is weighed, ``fisher`` (½ Σ F ⊙ ΔW², `fisher_diagonals`) or ``hessian`` (the
    layer's own output error ½ tr(ΔW H ΔWᵀ), `input_hessians`). Raises LowbitError when no
    plan fits the budget.
    """
    start = time.perf_counter()
    names = [n for n, _ in linears]
    if sensitivity == "fisher":
        fisher = fisher_diagonals(model, names, samples, progress)
    elif sensitivity == "hessian":
        hessians = input_hessians(model, arch, names, samples, batch_size, progress)
    else:
        raise LowbitError(f"sensitivity {sensitivity!r} is unknown; use one of {', '.join(BUDGET_SENSITIVITIES)}")
    options, specs = [], []
    weights = sum(linear.weight.numel() for _, linear in linears)
    with torch.no_grad():
        for name, linear in tqdm(linears, desc="budget: sensitivity", disable=not progress, unit="layer"):
            weight = linear.weight.detach().float()
            layer_specs = candidate_specs(spec, linear.in_features)
            layer_options = []
            for candidate in layer_specs:
                delta = weight - fake_quantize(weight, candidate)
                if sensitivity == "fisher":
                    error = 0.5 * float((fisher[name] * delta.square()).sum())
                else:
                    error = 0.5 * float(((delta @ hessians[name]) * delta).sum())
                layer_options.append((stored_bytes(tuple(weight.shape), candidate) + extra_bytes(linear.in_features), error))
            options.append(layer_options)
            specs.append(layer_specs)
    budget_bytes = int(budget * weights // 8)
    try:
        chosen = allocate(options, budget_bytes)
    except ValueError:
        cheapest = bits_per_weight(sum(min(b for b, _ in layer) for layer in options), weights)
        raise LowbitError(f"--budget {budget:g} is below the cheapest plan, {cheapest:.4f} bits/weight (every linear at "
                          f"{min(BUDGET_BITS)} bits in its largest groups); give at least {cheapest:.3f}") from None
    spent = sum(options[l][i][0] for l, i in enumerate(chosen))
    error = sum(options[l][i][1] for l, i in enumerate(chosen))
    uniform = None
    for bits in BUDGET_BITS:  # one spec for every linear: these bits, each linear in the largest of its groups up to g
        for group in (BUDGET_GROUPS if spec.granularity == "group" else (None,)):
            picks = [_uniform_pick(layer_specs, bits, group) for layer_specs in specs]
            nbytes = sum(options[l][k][0] for l, k in enumerate(picks))
            total = sum(options[l][k][1] for l, k in enumerate(picks))
            if nbytes <= budget_bytes and (uniform is None or total < uniform[2]):
                uniform = (_label(bits, group), bits_per_weight(nbytes, weights), total)
    layers = tuple((name, specs[l][i].bits, specs[l][i].group_size if specs[l][i].granularity == "group" else None)
                   for l, ((name, _), i) in enumerate(zip(linears, chosen)))
    return BudgetPlan(budget=budget, sensitivity=sensitivity, layers=layers, bits_per_weight=bits_per_weight(spent, weights), error=error,
                      uniform=uniform, seconds=time.perf_counter() - start)
