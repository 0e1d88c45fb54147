"""Activation outliers (report §6): per-channel statistics of every linear's input.

For each group of linears that read the same input (the architecture table's groups: the
attention input, the attention output before o_proj, the MLP input, the MLP hidden state
before down_proj) of every block, over all calibration tokens:

- per-channel absolute maximum, mean and kurtosis (E[(x - μ)⁴] / σ⁴; 3 for a Gaussian),
- percentiles of |x| over a seeded sample of token rows,
- for each channel, the number of tokens with |x| >= threshold (LLM.int8()'s emergent
  features use magnitude 6.0).

Emergent features follow LLM.int8() (Dettmers et al. 2022): a hidden-state dimension
counts as one when its magnitude reaches the threshold in at least 25% of the layers and in
at least 6% of the sequence positions, here measured over the inputs that carry the hidden
size (attention and MLP inputs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lowbit.models.architectures import decoder_blocks
from lowbit.models.loading import LoadedModel
from lowbit.outputs import save_figure

DEFAULT_THRESHOLD = 6.0
SAMPLED_ROWS = 4096  # token rows kept per input for percentiles: whole samples, so every position is represented
EMERGENT_LAYER_SHARE = 0.25
EMERGENT_TOKEN_SHARE = 0.06


class ChannelStatistics:
    """Running per-channel moments, maxima and threshold counts of one input, float64."""

    def __init__(self, channels: int, threshold: float):
        self.threshold = threshold
        self.tokens = 0
        self.absmax = torch.zeros(channels, dtype=torch.float64)
        self.moments = torch.zeros(4, channels, dtype=torch.float64)  # Σx, Σx², Σx³, Σx⁴
        self.over = torch.zeros(channels, dtype=torch.long)  # tokens with |x| >= threshold
        self.rows_over = 0  # tokens with any channel >= threshold
        self.sample: list[torch.Tensor] = []
        self.sampled = 0

    def add(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
        mags = rows.abs()
        self.absmax = torch.maximum(self.absmax, mags.amax(0).double())
        power = rows
        for k in range(4):  # per-batch sums in float32, accumulated in float64
            self.moments[k] += power.sum(0).double()
            power = power * rows
        hits = mags >= self.threshold
        self.over += hits.sum(0)
        self.rows_over += int(hits.any(1).sum())
        self.tokens += rows.shape[0]
        if self.sampled < SAMPLED_ROWS:
            self.sample.append(rows[: SAMPLED_ROWS - self.sampled].to(torch.float32))
            self.sampled += len(self.sample[-1])

    @property
    def mean(self) -> torch.Tensor:
        return self.moments[0] / self.tokens

    @property
    def kurtosis(self) -> torch.Tensor:
        """Per-channel E[(x - μ)⁴] / σ⁴ from the raw moments."""
        n = self.tokens
        m1, m2, m3, m4 = (self.moments[k] / n for k in range(4))
        var = (m2 - m1**2).clamp(min=1e-30)
        central4 = m4 - 4 * m1 * m3 + 6 * m1**2 * m2 - 3 * m1**4
        return central4 / var**2

    def percentiles(self, qs=(50.0, 99.0, 99.9)) -> dict[str, float]:
        values = torch.cat(self.sample).abs().reshape(-1).sort().values
        return {f"p{q:g}": values[min(len(values) - 1, int(math.ceil(q / 100 * len(values))) - 1)].item() for q in qs}


@dataclass
class InputReport:
    """Summary of one group's input in one block."""

    block: int
    role: str
    layer: str  # the group's first linear, e.g. model.layers.3.self_attn.q_proj
    channels: int
    absmax: float
    percentiles: dict
    max_over_median: float  # absmax / median |x|
    kurtosis_mean: float
    kurtosis_max: float
    channels_over: int  # channels reaching the threshold at least once
    token_share_over: float  # share of tokens with any channel at or above the threshold
    top_channels: list[int] = field(default_factory=list)  # largest absmax first


@dataclass
class OutlierReport:
    model: str
    threshold: float
    tokens: int
    inputs: list[InputReport]
    hidden_absmax: torch.Tensor  # (hidden-size inputs in block order, hidden): per-channel absmax
    hidden_labels: list[str]
    emergent: list[dict]  # {"channel", "layer_share", "token_share", "max"}

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "threshold": self.threshold,
            "tokens": self.tokens,
            "inputs": [vars(r) for r in self.inputs],
            "emergent_features": self.emergent,
        }


@torch.no_grad()
def analyse_outliers(loaded: LoadedModel, samples: torch.Tensor, threshold: float = DEFAULT_THRESHOLD, batch_size: int = 8) -> OutlierReport:
    """Run the float model over ``samples`` (int64 (n, ctx)) and collect input statistics of
    every linear group of every block (one pre-hook per group)."""
    arch = loaded.arch
    blocks = decoder_blocks(loaded.model, arch)
    stats: dict[tuple[int, str], ChannelStatistics] = {}
    hooks = []
    for index, block in enumerate(blocks):
        for group in arch.groups:
            linear = block.get_submodule(group.linears[0])
            acc = ChannelStatistics(linear.in_features, threshold)
            stats[(index, group.role)] = acc
            hooks.append(linear.register_forward_pre_hook(lambda m, args, acc=acc: acc.add(args[0])))
    try:
        for batch in samples.split(batch_size):
            loaded.model(input_ids=batch, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()

    hidden = loaded.model.config.hidden_size
    inputs = []
    hidden_rows, hidden_labels, hidden_over, hidden_tokens = [], [], [], []
    for (index, role), acc in stats.items():
        group = next(g for g in arch.groups if g.role == role)
        pct = acc.percentiles()
        kurt = acc.kurtosis
        inputs.append(
            InputReport(
                block=index,
                role=role,
                layer=f"{arch.blocks}.{index}.{group.linears[0]}",
                channels=len(acc.absmax),
                absmax=acc.absmax.max().item(),
                percentiles=pct,
                max_over_median=acc.absmax.max().item() / max(pct["p50"], 1e-12),
                kurtosis_mean=kurt.mean().item(),
                kurtosis_max=kurt.max().item(),
                channels_over=int((acc.over > 0).sum()),
                token_share_over=acc.rows_over / acc.tokens,
                top_channels=acc.absmax.argsort(descending=True)[:8].tolist(),
            )
        )
        if len(acc.absmax) == hidden and role in ("attn_in", "mlp_in"):
            hidden_rows.append(acc.absmax.float())
            hidden_labels.append(f"{index}.{role}")
            hidden_over.append(acc.over)
            hidden_tokens.append(acc.tokens)
    emergent = []
    if hidden_rows:
        over = torch.stack(hidden_over)  # (inputs, hidden)
        layer_share = (over > 0).float().mean(0)
        token_share = over.float().sum(0) / sum(hidden_tokens)
        for channel in torch.nonzero((layer_share >= EMERGENT_LAYER_SHARE) & (token_share >= EMERGENT_TOKEN_SHARE)).flatten().tolist():
            emergent.append(
                {
                    "channel": channel,
                    "layer_share": round(layer_share[channel].item(), 4),
                    "token_share": round(token_share[channel].item(), 4),
                    "max": round(max(r[channel].item() for r in hidden_rows), 3),
                }
            )
        emergent.sort(key=lambda e: -e["token_share"])
    return OutlierReport(
        model=loaded.source,
        threshold=threshold,
        tokens=samples.numel(),
        inputs=inputs,
        hidden_absmax=torch.stack(hidden_rows) if hidden_rows else torch.zeros(0, hidden),
        hidden_labels=hidden_labels,
        emergent=emergent,
    )


def summary_table(report: OutlierReport) -> str:
    """Per block and input: max |x|, percentiles, max/median, kurtosis, channels over threshold."""
    head = f"{'block':>5} {'input':<9} {'max|x|':>9} {'p99.9':>8} {'p50':>8} {'max/p50':>8} {'kurt mean':>9} {'kurt max':>9} {'ch>=t':>6} {'tok>=t %':>8}  top channels"
    lines = [head, "-" * len(head)]
    for r in report.inputs:
        lines.append(
            f"{r.block:>5} {r.role:<9} {r.absmax:>9.2f} {r.percentiles['p99.9']:>8.2f} {r.percentiles['p50']:>8.3f} "
            f"{r.max_over_median:>8.0f} {r.kurtosis_mean:>9.1f} {r.kurtosis_max:>9.0f} {r.channels_over:>6} "
            f"{100 * r.token_share_over:>8.2f}  {r.top_channels[:4]}"
        )
    lines.append("")
    if report.emergent:
        lines.append(
            f"emergent features (|x| >= {report.threshold:g} in >= {EMERGENT_LAYER_SHARE:.0%} of hidden-size inputs and >= "
            f"{EMERGENT_TOKEN_SHARE:.0%} of tokens): "
            + ", ".join(f"channel {e['channel']} ({e['layer_share']:.0%} of layers, {e['token_share']:.1%} of tokens, max {e['max']:.1f})" for e in report.emergent)
        )
    else:
        lines.append(f"no emergent features at threshold {report.threshold:g} (>= {EMERGENT_LAYER_SHARE:.0%} of layers and >= {EMERGENT_TOKEN_SHARE:.0%} of tokens)")
    return "\n".join(lines)


def write_plots(report: OutlierReport, out_dir) -> list:
    """PNG plots: per-layer max |x| for each input role; channel × layer heat map of the
    hidden-size inputs' per-channel absmax (log colour scale). Returns the written paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    out_dir = Path(out_dir)
    paths = []
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for role in dict.fromkeys(r.role for r in report.inputs):
        rows = [r for r in report.inputs if r.role == role]
        ax.plot([r.block for r in rows], [r.absmax for r in rows], marker="o", ms=3, label=f"{role} max |x|")
    ax.axhline(report.threshold, color="grey", ls="--", lw=1, label=f"threshold {report.threshold:g}")
    ax.set_yscale("log")
    ax.set_xlabel("block")
    ax.set_ylabel("max |x| over calibration tokens")
    ax.set_title(f"Linear-input magnitudes: {Path(str(report.model)).name}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(save_figure(fig, out_dir / "max_magnitude_per_layer.png"))
    plt.close(fig)

    if len(report.hidden_labels):
        data = report.hidden_absmax.T.numpy()  # (hidden, inputs)
        fig, ax = plt.subplots(figsize=(10, 6))
        image = ax.imshow(data, aspect="auto", interpolation="nearest", norm=LogNorm(vmin=max(data.min(), 1e-3), vmax=data.max()), cmap="magma")
        ax.set_xlabel("block.input (hidden-size inputs)")
        ax.set_ylabel("channel")
        step = max(1, math.ceil(len(report.hidden_labels) / 20))
        ax.set_xticks(range(0, len(report.hidden_labels), step), report.hidden_labels[::step], rotation=90, fontsize=6)
        fig.colorbar(image, ax=ax, label="per-channel max |x|")
        ax.set_title("Channel x layer heat map of input magnitudes")
        fig.tight_layout()
        paths.append(save_figure(fig, out_dir / "channel_layer_heatmap.png"))
        plt.close(fig)
    return paths
