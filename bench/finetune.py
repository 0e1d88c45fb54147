"""QLoRA before/after and QAT vs PTQ on SmolLM2, on the CPU.

    python bench/finetune.py [--model smollm2] [--corpus shakespeare] [--steps 150] [--qat-steps 100]

QLoRA: NF4 base (block 64, double-quantised) + rank-8 adapters on every projection,
trained on the first half of the corpus; held-out perplexity on the second half before
and after. QAT: every block linear fine-tuned through its fake-quantised weight with LSQ
step sizes, then packed; compared with RTN post-training quantisation at the same spec.
Writes bench/results/finetune.json.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from lowbit.evaluation import write_json
from lowbit.numerics import QuantSpec
from lowbit.training.finetune import qat_finetune, qlora_finetune
from lowbit.training.lora import LoRAConfig
from lowbit.training.trainer import TrainConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--corpus", default="shakespeare")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--qat-steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        qlora = qlora_finetune(args.model, Path(tmp) / "adapters", LoRAConfig(rank=8, alpha=16, dropout=0.05),
                               TrainConfig(steps=args.steps, lr=2e-4, batch_size=args.batch, ctx=args.ctx),
                               corpus=args.corpus, eval_n=args.eval_windows)
        rows["qlora"] = qlora.to_dict()
        for bits in (4, 3):
            report = qat_finetune(args.model, Path(tmp) / f"qat{bits}", QuantSpec(bits=bits, group_size=128),
                                  TrainConfig(steps=args.qat_steps, lr=2e-5, batch_size=args.batch, ctx=args.ctx),
                                  lsq=True, corpus=args.corpus, eval_n=args.eval_windows)
            rows[f"qat_w{bits}g128"] = report.to_dict()
    write_json(Path(args.out) / "finetune.json", rows)
    print("| run | float ppl | before | after | steps | train s | loss first -> last 10 |\n|---|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        losses = r["losses"]
        print(f"| {name} ({r['extra']['spec']}) | {r['float_perplexity']:.3f} | {r['before_perplexity']:.3f} | {r['after_perplexity']:.3f} | "
              f"{len(losses)} | {r['seconds']:.0f} | {losses[0]:.3f} -> {sum(losses[-10:]) / 10:.3f} |")


if __name__ == "__main__":
    main()
