"""QLoRA on two processes with every gradient all-reduce: held-out perplexity along the run,
bytes each rank sends per step, and seconds per step (issue 16's table and plot).

    python bench/grad_hooks.py [--steps 50] [--eval-every 10] [--runs NAME ...] [--project]

Each run is one `lowbit finetune --method qlora --corpus shakespeare --nproc 2` process on SmolLM2
with the same global batch, steps and seed; only the gradient option changes. Runs are kept in
bench/results/grad_hooks.json as they finish (a stopped benchmark continues). ``--project`` (no
training) prints the step time the measured bytes per parameter imply for larger models on
faster interconnects, and writes the plot.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
RUNS = {
    "fp32 all-reduce": ["--grad-bits", "32"],
    "bf16": ["--grad-bits", "16"],
    "PowerSGD rank 1": ["--grad-hook", "powersgd", "--powersgd-rank", "1"],
    "PowerSGD rank 4": ["--grad-hook", "powersgd", "--powersgd-rank", "4"],
    "int8 + error feedback": ["--grad-bits", "8"],
    "int8, no feedback": ["--grad-bits", "8", "--no-grad-error-feedback"],
    "int4 + error feedback": ["--grad-bits", "4"],
    "int4, no feedback": ["--grad-bits", "4", "--no-grad-error-feedback"],
    "int4 g64 + error feedback": ["--grad-bits", "4", "--grad-group", "64"],
    "int4 g32 bf16 scales + error feedback": ["--grad-bits", "4", "--grad-group", "32", "--grad-scale-dtype", "bfloat16"],
}
# (LoRA r=8 on all seven projections, full) trainable parameters, from the models' shapes:
# Llama-2-7B (hidden 4096, MLP 11008, 32 blocks), Llama-2-70B (hidden 8192, MLP 28672, 80 blocks, 8 KV heads of 128)
MODELS = {"7B": (19_988_480, 6_738_415_616), "70B": (103_546_880, 68_976_648_192)}
LINKS_GB_S = (25, 400)
RANKS = (8, 64)


def lora_parameters(hidden: int, mlp: int, kv: int, blocks: int, rank: int = 8) -> int:
    """LoRA A (r, in) and B (out, r) on q, k, v, o, gate, up, down of every block."""
    shapes = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden), (hidden, mlp), (hidden, mlp), (mlp, hidden)]
    return blocks * sum(rank * (i + o) for i, o in shapes)


assert MODELS["7B"][0] == lora_parameters(4096, 11008, 4096, 32) and MODELS["70B"][0] == lora_parameters(8192, 28672, 1024, 80)


def run(name: str, flags: list[str], steps: int, eval_every: int, work: Path) -> dict:
    out, report = work / "adapters", work / "report.json"
    subprocess.run(["rm", "-rf", str(out), str(report)])
    argv = [sys.executable, "-m", "lowbit.cli", "finetune", "--method", "qlora", "--corpus", "shakespeare", "--steps", str(steps),
            "--batch", "2", "--ctx", "256", "--eval-windows", "8", "--eval-every", str(eval_every), "--lora-dropout", "0",
            "--nproc", "2", *flags, "--out", str(out), "--json", str(report)]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{name}: {(done.stderr.strip().splitlines() or ['no output'])[-1]}")
    data = json.loads(report.read_text())
    keep = ("float_perplexity", "before_perplexity", "after_perplexity", "curve", "losses", "step_seconds", "seconds",
            "grad_bytes_per_step", "counted_grad_bytes_per_step", "trainable_parameters", "gradients")
    return {"command": "lowbit " + " ".join(argv[3:]).replace(str(work) + "/", ""), **{k: data[k] for k in keep}}


def duration(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds >= 1 else f"{seconds * 1e3:.3g} ms"


def projection(rows: dict) -> list[str]:
    """Seconds per step of the gradient exchange alone: a ring all-reduce moves 2 (N-1)/N of
    the bucket per rank, so bytes per parameter measured on 2 ranks (where 2 (N-1)/N = 1)
    scale by 2 (N-1)/N; divided by the link's bandwidth. PowerSGD is left out: its bytes per
    parameter depend on each matrix's shape (rank r of an n x m matrix sends (n + m) r), so
    LoRA's thin matrices say nothing about a full model's; error feedback changes no byte."""
    lines = ["| gradients | bytes/param (measured, 2 ranks) | model | gradients of | " +
             " | ".join(f"{n} ranks, {b} GB/s" for n in RANKS for b in LINKS_GB_S) + " |",
             "|---|---:|---|---|" + "---:|" * (len(RANKS) * len(LINKS_GB_S))]
    for name, row in rows.items():
        if "PowerSGD" in name or "no feedback" in name:
            continue
        per_param = row["grad_bytes_per_step"] / row["trainable_parameters"]
        for model, (lora, full) in MODELS.items():
            for what, count in (("LoRA r=8", lora), ("all weights", full)):
                cells = [duration(2 * (n - 1) / n * per_param * count / (b * 1e9)) for n in RANKS for b in LINKS_GB_S]
                lines.append(f"| {name} | {per_param:.3f} | {model} | {what} | " + " | ".join(cells) + " |")
    return lines


def plot(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, gap) = plt.subplots(1, 2, figsize=(12, 4.8))
    base = dict(rows["fp32 all-reduce"]["curve"]) if "fp32 all-reduce" in rows else None
    for name, row in rows.items():
        steps, ppl = zip(*row["curve"])
        label = f"{name} ({row['grad_bytes_per_step'] / 1e6:.2f} MB/step)"
        ax.plot(steps, ppl, marker="o", markersize=3, label=label)
        if base is not None:
            gap.plot(steps, [100 * (p / base[s] - 1) for s, p in zip(steps, ppl)], marker="o", markersize=3, label=label)
    ax.set_xlabel("optimizer step (global batch 2 x 256 tokens, 2 processes)")
    ax.set_ylabel("held-out perplexity (Shakespeare, 8 x 256 tokens)")
    ax.set_title("QLoRA on SmolLM2-135M: gradient all-reduce options")
    gap.set_xlabel("optimizer step")
    gap.set_ylabel("perplexity vs fp32 all-reduce at the same step (%)")
    gap.set_title("the same, against fp32")
    for axis in (ax, gap):
        axis.grid(alpha=0.3)
    gap.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), metavar="NAME")
    parser.add_argument("--redo", action="store_true")
    parser.add_argument("--project", action="store_true", help="only print the projection table and write the plot")
    args = parser.parse_args()
    path = RESULTS / "grad_hooks.json"
    stored = json.loads(path.read_text()) if path.exists() else {"steps": args.steps, "runs": {}}
    if stored["steps"] != args.steps:
        raise SystemExit(f"{path} holds runs of {stored['steps']} steps; give --steps {stored['steps']} or move it away")
    if not args.project:
        with tempfile.TemporaryDirectory() as work:
            for name in args.runs or RUNS:
                if name in stored["runs"] and not args.redo:
                    continue
                row = stored["runs"][name] = run(name, RUNS[name], args.steps, args.eval_every, Path(work))
                path.write_text(json.dumps(stored, indent=1) + "\n")
                print(f"{name:<24} after {row['after_perplexity']:.3f}, {row['grad_bytes_per_step'] / 1e6:.3f} MB/step, "
                      f"{row['step_seconds']:.2f} s/step", flush=True)
    rows = {name: stored["runs"][name] for name in RUNS if name in stored["runs"]}
    print("| gradients | after ppl | vs fp32 | MB sent per step | vs fp32 | s per step |\n|---|---:|---:|---:|---:|---:|")
    base = rows.get("fp32 all-reduce")
    for name, row in rows.items():
        ratio = "" if base is None else f"{row['after_perplexity'] / base['after_perplexity'] - 1:+.2%}"
        less = "" if base is None else f"{base['grad_bytes_per_step'] / row['grad_bytes_per_step']:.2f}x less"
        print(f"| {name} | {row['after_perplexity']:.3f} | {ratio} | {row['grad_bytes_per_step'] / 1e6:.3f} | {less} | {row['step_seconds']:.2f} |")
    print()
    print("\n".join(projection(rows)))
    if rows:
        plot(rows, RESULTS / "grad_hooks.png")


if __name__ == "__main__":
    main()
