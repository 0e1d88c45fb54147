"""Bits where they matter: choose one storage option per layer so that the whole model
fits a byte budget with the least summed error.

Each layer ``l`` has options ``(bytes_lo, error_lo)``; the plan picks one per layer to
minimise Σ_l error_l subject to Σ_l bytes_l ≤ budget (a multiple-choice knapsack). The
errors are whatever the caller measures per option and assumes to add up across layers, as
llama.cpp's ``--target-bpw`` and HAWQ's sensitivity sums do (`lowbit.calibration.budget`:
the Fisher estimate of the loss increase, or the layer output error of report §7.2).

The solver is the Lagrangian greedy of the knapsack literature, then a fill: each layer's
options on their lower convex hull (bytes up, error down, at falling error per byte) give
upgrade steps; steps are taken from the best error saved per byte down while they fit; then
any single change of one layer's option that lowers the error and still fits is taken, the
best per byte first, until none is left. The result never exceeds the budget, and no one
further upgrade of any layer fits in what is left (`unused_upgrade`).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

Option = tuple[int, float]  # (bytes, error) of one way to store one layer


def _hull(options: Sequence[Option]) -> list[int]:
    """Indices of ``options`` on the lower convex hull of error against bytes, by bytes:
    each step to the next one saves less error per byte than the step before it."""
    order = sorted(range(len(options)), key=lambda i: (options[i][0], options[i][1]))
    frontier: list[int] = []
    for i in order:  # drop options that cost more and are no better than a cheaper one
        if not frontier or options[i][1] < options[frontier[-1]][1]:
            frontier.append(i)
    hull: list[int] = []
    for i in frontier:
        while len(hull) >= 2:
            (b0, e0), (b1, e1), (b2, e2) = options[hull[-2]], options[hull[-1]], options[i]
            # the middle point lies on or above the chord from hull[-2] to i: not convex
            if (e0 - e1) * (b2 - b0) <= (e0 - e2) * (b1 - b0):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def allocate(options: Sequence[Sequence[Option]], budget_bytes: int) -> list[int]:
    """One option index per layer: the least summed error within ``budget_bytes``.

    options: per layer, its (bytes, error) choices, bytes an int, error a float ≥ 0.
    Returns the chosen index of each layer. Raises ValueError if even the cheapest option
    of every layer exceeds the budget (the caller says which budget would fit).
    """
    if any(not layer for layer in options):
        raise ValueError("every layer needs at least one option")
    hulls = [_hull(layer) for layer in options]
    chosen = [hull[0] for hull in hulls]
    spent = sum(options[l][i][0] for l, i in enumerate(chosen))
    if spent > budget_bytes:
        raise ValueError(f"the cheapest plan takes {spent} bytes, more than the budget of {budget_bytes}")

    def step(layer: int, position: int):
        """The heap entry for moving ``layer`` from hull point ``position`` to the next."""
        hull = hulls[layer]
        (b0, e0), (b1, e1) = options[layer][hull[position]], options[layer][hull[position + 1]]
        return (-(e0 - e1) / (b1 - b0), layer, position)

    heap = [step(l, 0) for l, hull in enumerate(hulls) if len(hull) > 1]
    heapq.heapify(heap)
    while heap:
        _, layer, position = heapq.heappop(heap)
        nxt = hulls[layer][position + 1]
        extra = options[layer][nxt][0] - options[layer][chosen[layer]][0]
        if spent + extra > budget_bytes:
            continue  # this layer's later steps cost more still; it stays where it is
        chosen[layer] = nxt
        spent += extra
        if position + 2 < len(hulls[layer]):
            heapq.heappush(heap, step(layer, position + 1))
    while (move := _best_fill(options, chosen, budget_bytes - spent)) is not None:
        layer, index = move
        spent += options[layer][index][0] - options[layer][chosen[layer]][0]
        chosen[layer] = index
    return chosen


def _best_fill(options: Sequence[Sequence[Option]], chosen: list[int], left: int) -> tuple[int, int] | None:
    """The single change of one layer's option that lowers the summed error and fits in
    ``left`` bytes, saving the most error per byte (a change that frees bytes counts as
    infinitely good); None when there is none."""
    best, best_gain = None, 0.0
    for layer, layer_options in enumerate(options):
        b0, e0 = layer_options[chosen[layer]]
        for index, (b1, e1) in enumerate(layer_options):
            if e1 >= e0 or b1 - b0 > left:
                continue
            gain = float("inf") if b1 <= b0 else (e0 - e1) / (b1 - b0)
            if best is None or gain > best_gain:
                best, best_gain = (layer, index), gain
    return best


def unused_upgrade(options: Sequence[Sequence[Option]], chosen: Sequence[int], budget_bytes: int) -> tuple[int, int] | None:
    """A change of one layer to an option with less error that would still fit the budget,
    or None: the check that a plan leaves nothing on the table."""
    left = budget_bytes - sum(options[l][i][0] for l, i in enumerate(chosen))
    return _best_fill(options, list(chosen), left)
