"""What the CPU decode variants' numerics cost in quality: the same W4 g128 weights scored
with float activations (the W4 kernel's numerics), with activations quantised to int8 per
token in blocks of 32 (the W4A8 kernel itself, run on every position, 16 rows at a time),
and each of the two with the output head int8 per channel as well (bench-decode's "h8"
variants; the tied embedding keeps its float table); last, W4A8 with the int8 head on int8
activations too (the W8A8 kernel, `use_cpu_kernels(w8a8=True)`: what llama.cpp does with a
q8_0 output tensor).

    python bench/w4a8_quality.py [--model smollm2] [--corpus shakespeare] [--windows 8]

Writes bench/results/w4a8_<model>.json.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lowbit import QuantSpec, RTNConfig, evaluate, load_model, quantize_model  # noqa: E402
from lowbit.data import eval_windows, tokenize_split  # noqa: E402
from lowbit.evaluation import write_json  # noqa: E402
from lowbit.kernels.cpu import KernelLinear, use_cpu_kernels  # noqa: E402
from lowbit.methods import HEAD_SPECS  # noqa: E402
from lowbit.pipeline import quantize_head  # noqa: E402


def through_w4a8_kernel(model, ctx: int, w8a8: bool = False):
    """A copy of ``model`` on the CPU kernels with int8 activations (8-bit layers too with
    ``w8a8``), every position through them."""
    model = copy.deepcopy(model)
    skipped = use_cpu_kernels(model, int8_activations=True, w8a8=w8a8)
    for module in model.modules():
        if isinstance(module, KernelLinear):
            module.max_tokens = ctx  # every position through the kernel, not just decode steps
    return model, skipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--corpus", default="shakespeare")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    reference = load_model(args.model)
    w4 = load_model(args.model)
    quantize_model(w4, RTNConfig(spec=QuantSpec(bits=4, group_size=128)), progress=False)
    w4a8, skipped = through_w4a8_kernel(w4.model, args.ctx)
    w4_h8 = copy.deepcopy(w4.model)
    quantize_head(w4_h8, HEAD_SPECS[8])
    w4a8_h8, _ = through_w4a8_kernel(w4_h8, args.ctx)
    w4a8_h8a8, _ = through_w4a8_kernel(w4_h8, args.ctx, w8a8=True)
    windows = eval_windows(tokenize_split(reference.tokenizer, args.corpus), args.ctx, args.windows)
    models = {"float (GGUF dequantised)": reference.model, "W4 g128 sym, float activations": w4.model,
              "W4A8: same weights, int8 activations per 32-block": w4a8, "W4 + int8 head (h8)": w4_h8, "W4A8 + int8 head (h8)": w4a8_h8,
              "W4A8 + int8 head on int8 activations (W8A8)": w4a8_h8a8}
    results = [r.to_dict() for r in evaluate(models, windows, reference=reference.model)]
    write_json(Path(args.out) / f"w4a8_{args.model}.json", {"model": args.model, "corpus": args.corpus, "windows": len(windows),
                                                            "ctx": args.ctx, "layers_on_reference_path": skipped, "results": results})
    base = results[0]["perplexity"]
    print("| setting | ppl | Δppl | KLD | top-1 % |\n|---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['label']} | {r['perplexity']:.3f} | {100 * (r['perplexity'] / base - 1):+.1f}% | {r['kld']:.4f} | {r['top1_percent']:.1f} |")


if __name__ == "__main__":
    main()
