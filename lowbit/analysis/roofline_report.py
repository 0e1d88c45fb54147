"""Tables and the chart of `lowbit roofline`."""

from __future__ import annotations

import math
from pathlib import Path

from torch import nn

from lowbit.analysis.roofline import Machine, SpeedRow, StepCost, decode_cost, prefill_cost, variant_bits
from lowbit.outputs import save_figure

PREDICTED_VARIANTS = ("float32", "bf16", "W8", "W4", "W4 h8")  # W4A8 costs what W4 does in bytes


def predicted_rows(model: nn.Module, machine: Machine, ctx: int, kv_bits: float = 32.0) -> list[SpeedRow]:
    """The roofline's prediction for each variant without building it: the float model's
    step with its block linears re-priced at the variant's bits (lm_head keeps the model's
    width, or an int8 head's: `variant_bits`)."""
    base = decode_cost(model, ctx, kv_bits)
    base_prefill = prefill_cost(model, ctx, kv_bits)
    head = model.get_output_embeddings()
    head_weights = head.in_features * head.out_features
    weights = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear)) - head_weights
    rows = []
    for variant in PREDICTED_VARIANTS:
        bits, head_bits = variant_bits(variant)
        weight_bytes = int(weights * bits / 8 + head_weights * head_bits / 8)
        step = StepCost(weight_bytes, base.kv_bytes, base.flops)
        prefill = StepCost(weight_bytes, base_prefill.kv_bytes, base_prefill.flops)
        rows.append(SpeedRow(variant, bits, weight_bytes, float("nan"), 1.0 / step.seconds(machine), float("nan"),
                             prefill.seconds(machine), step.intensity, step.bound(machine)))
    return rows


def roofline_table(rows: list[SpeedRow]) -> str:
    """The rows as text; "x llama.cpp" compares a row with "<its name> llama.cpp" (the same
    file in llama.cpp, bench-decode's GGUF rows) where there is one."""
    base = next((r for r in rows if r.variant == "float32"), rows[0])
    engine = {r.variant.removesuffix(" llama.cpp"): r.decode_tokens_per_second for r in rows if r.variant.endswith(" llama.cpp")}
    head = (f"{'format':<15} {'bits/w':>7} {'weights MB':>10} {'FLOP/B':>7} {'bound':>7} {'pred tok/s':>10} {'meas tok/s':>10} {'meas/pred':>9} "
            f"{'x fp32':>7} {'x llama.cpp':>11} {'prefill s':>9} {'pred prefill':>12}")
    lines = [head, "-" * len(head)]
    for r in rows:
        measured = r.decode_tokens_per_second
        has = not math.isnan(measured)
        versus = f"{measured / engine[r.variant]:.2f}" if has and r.variant in engine else "-"
        lines.append(
            f"{r.variant:<15} {r.bits_per_weight:>7.2f} {r.weight_bytes / 1e6:>10.1f} {r.intensity:>7.2f} {r.bound:>7} "
            f"{r.predicted_tokens_per_second:>10.1f} {(f'{measured:.1f}' if has else '-'):>10} "
            f"{(f'{measured / r.predicted_tokens_per_second:.2f}' if has else '-'):>9} "
            f"{(f'{measured / base.decode_tokens_per_second:.2f}' if has else '-'):>7} {versus:>11} "
            f"{(f'{r.prefill_seconds:.2f}' if has else '-'):>9} {r.predicted_prefill_seconds:>12.3f}"
        )
    return "\n".join(lines)


def write_chart(rows: list[SpeedRow], machine: Machine, model: nn.Module, ctx: int, out: str | Path) -> Path:
    """Tokens/s against bits per weight: the bandwidth roof for this model (linears at b bits,
    lm_head in float32, KV in float32; dashed, with an int8 head when a variant has one), its
    compute ceiling, and the variants' points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = decode_cost(model, ctx)
    head = model.get_output_embeddings()
    head_bytes = head.in_features * head.out_features * 4
    weights = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear)) - head.in_features * head.out_features
    bits = [b / 4 for b in range(6, 130)]

    def roof(head_bytes: float) -> list[float]:
        return [1.0 / max((weights * b / 8 + head_bytes + base.kv_bytes) / (machine.bandwidth_gbps * 1e9), base.flops / (machine.peak_gflops * 1e9)) for b in bits]

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(bits, roof(head_bytes), color="black", lw=1.5, label=f"roofline ({machine.bandwidth_gbps:.0f} GB/s, {machine.peak_gflops:.0f} GFLOP/s)")
    if any(r.variant.endswith("h8") for r in rows):
        ax.plot(bits, roof(head_bytes * variant_bits("W4 h8")[1] / 32), color="black", lw=1, ls="--", label="roofline, int8 head")
    for r in rows:
        ax.scatter([r.bits_per_weight], [r.predicted_tokens_per_second], marker="x", color="grey")
        if not math.isnan(r.decode_tokens_per_second):
            ax.scatter([r.bits_per_weight], [r.decode_tokens_per_second], s=40, label=f"{r.variant} measured")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("bits per weight (block linears)")
    ax.set_ylabel("decode tokens/s (batch 1)")
    ax.set_title(f"Decode roofline at context {ctx}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = save_figure(fig, out)
    plt.close(fig)
    return out
