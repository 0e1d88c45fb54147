"""One decode step of attention over the quantised KV cache: the packed-cache kernel against
dequantising the cache and running SDPA (the reference), and SDPA over a float32 cache.

    python bench/kv_attention.py [--contexts 512 2048 8192] [--bits 4 8 2] [--rounds 7] [--threads 2]

Per model shape (query heads, key/value heads, head dim of SmolLM2, Gemma 3 270M and the
1.1B Llama), one layer's cache is filled with random keys and values to each context
(KIVI layout, groups of 32, a 128-token float tail), then one query token attends to it.
The three ways run in interleaved rounds in this process; the table gives the median time
per step and the ratios. Writes bench/results/kv_attention.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from lowbit.inference.kv_attention import attend, attend_reference  # noqa: E402
from lowbit.inference.kv_cache import KVSpec, QuantizedKVLayer  # noqa: E402

SHAPES = {"smollm2": (9, 3, 64), "gemma3-270m": (4, 1, 256), "llama-1.1b": (32, 4, 64)}  # query heads, kv heads, head dim


def timed(fn, repeat: int) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 8, 2])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    print("| shape | bits | context | packed kernel µs | dequantise + SDPA µs | float32 SDPA µs | kernel / reference | kernel / float |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for shape, (hq, h, d) in SHAPES.items():
        for bits in args.bits:
            for context in args.contexts:
                g = torch.Generator().manual_seed(context)
                layer = QuantizedKVLayer(KVSpec(bits=bits, group_size=32, residual=128))
                keys, values = torch.randn(1, h, context, d, generator=g), torch.randn(1, h, context, d, generator=g)
                layer.update(keys, values)
                view = layer.view()
                query = torch.randn(1, hq, 1, d, generator=g)
                scale = d**-0.5
                ways = {
                    "kernel": lambda: attend(query, view, scale),
                    "reference": lambda: attend_reference(query, view, scale),
                    "float": lambda: torch.nn.functional.scaled_dot_product_attention(query, keys, values, scale=scale, enable_gqa=hq != h),
                }
                torch.testing.assert_close(ways["kernel"](), ways["reference"](), rtol=1e-4, atol=1e-5)
                repeat = max(3, int(2e5 // context))
                times = {name: [] for name in ways}
                for _ in range(args.rounds):
                    for name, fn in ways.items():
                        times[name].append(timed(fn, repeat))
                med = {name: statistics.median(t) * 1e6 for name, t in times.items()}
                row = {"shape": shape, "bits": bits, "context": context, "microseconds": med,
                       "kernel_over_reference": med["kernel"] / med["reference"], "kernel_over_float": med["kernel"] / med["float"]}
                rows.append(row)
                print(f"| {shape} | {bits} | {context} | {med['kernel']:.0f} | {med['reference']:.0f} | {med['float']:.0f} | "
                      f"{row['kernel_over_reference']:.2f} | {row['kernel_over_float']:.2f} |", flush=True)
    out = Path(__file__).resolve().parent / "results" / "kv_attention.json"
    out.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "threads": args.threads,
                               "rounds": args.rounds, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
