"""KV-cache quantisation at long context: memory and quality against the float cache.

    python bench/kv_cache.py [--models smollm2] [--corpus shakespeare] [--windows 4] [--ctx 2048] [--chunk 64]

Each window of ``ctx`` tokens from the second half of the corpus is fed in chunks of
``chunk`` tokens (a chunked prefill: later tokens attend to what earlier chunks left in
the cache), once with transformers' float cache and once with lowbit's KIVI-style cache
(keys per channel over groups of tokens, values per token in groups of channels, the
newest ``residual`` tokens in full precision). The model's weights stay float so only the
cache differs. Prints a Markdown table per model and writes bench/results/kv_<model>.json.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from lowbit import load_model
from lowbit.data import eval_windows, tokenize_split
from lowbit.evaluation import write_json
from lowbit.evaluation.kv import kv_cache_quality
from lowbit.inference.kv_cache import KVSpec

SPECS = {
    "INT8 g32 r128": KVSpec(bits=8, group_size=32, residual=128),
    "INT4 g32 r128": KVSpec(bits=4, group_size=32, residual=128),
    "INT4 g32 r0": KVSpec(bits=4, group_size=32, residual=0),
    "INT2 g32 r128": KVSpec(bits=2, group_size=32, residual=128),
    "INT2 g32 r0": KVSpec(bits=2, group_size=32, residual=0),
}


def run_model(name: str, args) -> dict:
    loaded = load_model(name)
    split = tokenize_split(loaded.tokenizer, args.corpus)
    windows = eval_windows(split, args.ctx, args.windows)
    rows = []
    for label, spec in SPECS.items():
        start = time.perf_counter()
        q = kv_cache_quality(loaded.model, windows, spec, chunk=args.chunk)
        row = {"label": label, "bits": spec.bits, "group_size": spec.group_size, "residual": spec.residual, **q.to_dict(),
               "seconds": time.perf_counter() - start}
        rows.append(row)
        print(f"{name} {label}: ppl {q.perplexity:.3f} (float cache {q.perplexity_float:.3f}) KLD {q.kld:.4f} "
              f"cache {q.cache_bytes / 2**20:.1f} MiB of {q.float_cache_bytes / 2**20:.1f}", flush=True)
    return {"model": name, "corpus": args.corpus, "windows": len(windows), "ctx": args.ctx, "chunk": args.chunk,
            "torch": torch.__version__, "machine": platform.machine(), "results": rows}


def markdown(payload: dict) -> str:
    lines = ["| cache | MiB at ctx | × smaller | ppl | Δppl | KLD | top-1 % |", "|---|---:|---:|---:|---:|---:|---:|"]
    first = payload["results"][0]
    lines.append(f"| float32 | {first['float_cache_bytes'] / 2**20:.1f} | 1.0 | {first['perplexity_float']:.3f} | +0.0% | 0.0000 | 100.0 |")
    for r in payload["results"]:
        lines.append(f"| {r['label']} | {r['cache_bytes'] / 2**20:.1f} | {r['float_cache_bytes'] / r['cache_bytes']:.1f} | {r['perplexity']:.3f} | "
                     f"{100 * (r['perplexity'] / r['perplexity_float'] - 1):+.1f}% | {r['kld']:.4f} | {r['top1_percent']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2"])
    parser.add_argument("--corpus", default="shakespeare")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--ctx", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    for name in args.models:
        payload = run_model(name, args)
        write_json(Path(args.out) / f"kv_{name}.json", payload)
        print(f"\n### {name} (ctx {args.ctx}, {payload['windows']} windows)\n\n{markdown(payload)}\n", flush=True)


if __name__ == "__main__":
    main()
