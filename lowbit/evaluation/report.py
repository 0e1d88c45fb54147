"""Human-readable tables and JSON for evaluation results."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from lowbit.evaluation.metrics import EvalResult
from lowbit.outputs import new_file


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def results_table(results: Sequence[EvalResult], baseline: str | None = None) -> str:
    """A fixed-width table; ``baseline`` names the row the perplexity change is measured from."""
    base = next((r for r in results if r.label == baseline), None)
    header = f"{'model':<28} {'bits/w':>7} {'size MB':>8} {'ppl':>9} {'Δppl':>8} {'KLD':>8} {'top-1':>7} {'tokens':>7} {'time s':>7}"
    lines = [header, "-" * len(header)]
    for r in results:
        delta = None if base is None else 100.0 * (r.perplexity / base.perplexity - 1.0)
        lines.append(
            f"{r.label:<28} {r.bits_per_weight:>7.2f} {r.model_bytes / 1e6:>8.1f} {r.perplexity:>9.3f} "
            f"{_fmt(delta, '+.1f') + ('%' if delta is not None else ''):>8} {_fmt(r.kld, '.4f'):>8} "
            f"{_fmt(r.top1_percent, '.1f'):>7} {r.tokens:>7} {r.seconds:>7.1f}"
        )
    return "\n".join(lines)


def write_json(path: str | Path, payload: dict) -> None:
    """Write ``payload`` as JSON via a temporary name, so a reader never sees half a file."""
    with new_file(path, "JSON output") as tmp:
        tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
