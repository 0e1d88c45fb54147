"""RTN table: round-to-nearest at the usual settings on the packaged models.

    python bench/rtn_table.py [--models smollm2 gemma3-270m] [--corpus shakespeare] [--windows 40] [--ctx 512]

Each model's float reference runs once per window and every quantised variant is scored
against it in the same process (perplexity, KLD, top-1 agreement), with storage and
quantisation time. Prints a Markdown table per model and writes bench/results/rtn_<model>.json.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from lowbit import QuantSpec, RTNConfig, evaluate, load_model, quantize_model
from lowbit.data import eval_windows, tokenize_split
from lowbit.evaluation import write_json

SETTINGS = {
    "W8 per-channel": QuantSpec(bits=8, granularity="channel", group_size=None),
    "W4 g128 sym": QuantSpec(bits=4, group_size=128),
    "W4 g128 asym": QuantSpec(bits=4, symmetric=False, group_size=128),
    "W4 g128 sym mse-clip": QuantSpec(bits=4, group_size=128, range="mse"),
    "W4 g64 sym": QuantSpec(bits=4, group_size=64),
    "W4 g32 asym float-offset": QuantSpec(bits=4, symmetric=False, zero_point="float", group_size=32),
    "W3 g128 sym": QuantSpec(bits=3, group_size=128),
    "W3 g128 asym": QuantSpec(bits=3, symmetric=False, group_size=128),
    "W2 g64 asym": QuantSpec(bits=2, symmetric=False, group_size=64),
}


def markdown(rows: list[dict]) -> str:
    head = "| setting | bits/w | size MB | ppl | Δppl | KLD | top-1 % | quant s |\n|---|---:|---:|---:|---:|---:|---:|---:|"
    base = rows[0]["perplexity"]
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['bits_per_weight']:.2f} | {r['model_bytes'] / 1e6:.1f} | {r['perplexity']:.3f} | "
            f"{100 * (r['perplexity'] / base - 1):+.1f}% | {r['kld']:.4f} | {r['top1_percent']:.1f} | {r.get('quant_seconds', 0):.1f} |"
        )
    return "\n".join(lines)


def run_model(name: str, corpus: str, n_windows: int, ctx: int) -> dict:
    reference = load_model(name)
    split = tokenize_split(reference.tokenizer, corpus)
    windows = eval_windows(split, ctx, n_windows)
    models = {"float (GGUF dequantised)": reference.model}
    quant_seconds = {}
    for label, spec in SETTINGS.items():
        loaded = load_model(name)
        result = quantize_model(loaded, RTNConfig(spec=spec), progress=False)
        quant_seconds[label] = result.seconds
        models[label] = loaded.model
    results = [r.to_dict() for r in evaluate(models, windows, reference=reference.model)]
    for r in results:
        r["quant_seconds"] = quant_seconds.get(r["label"], 0.0)
    return {
        "model": name,
        "corpus": corpus,
        "windows": len(windows),
        "ctx": ctx,
        "tokens": results[0]["tokens"],
        "bos": split.bos_id is not None,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "results": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2", "gemma3-270m"])
    parser.add_argument("--corpus", default="shakespeare")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    for name in args.models:
        start = time.perf_counter()
        payload = run_model(name, args.corpus, args.windows, args.ctx)
        payload["wall_seconds"] = time.perf_counter() - start
        write_json(Path(args.out) / f"rtn_{name}.json", payload)
        print(f"\n### {name}: {payload['tokens']} tokens of {args.corpus} ({payload['windows']} x {args.ctx}), {payload['wall_seconds']:.0f} s\n")
        print(markdown(payload["results"]))


if __name__ == "__main__":
    main()
