"""The CPU kernels' prefill path on one linear layer: float32 BLAS against the W4 and W8
weights dequantised whole (then one BLAS product) and dequantised a block of rows at a time
by each thread into its own buffer, which stays in cache (one single-threaded BLAS product
per block: `gemm_dequant_blocks`), at several block sizes; medians of interleaved rounds in
one process, as ratios to float32.

    python bench/prefill_blocks.py [--shapes 2048x2048 5632x2048 2048x5632] [--tokens 64 512] [--repeats 15]

The defaults are the 1.1B Llama-shaped model's attention and MLP projections (`lowbit
bench-decode --models llama-1b`). Each blocked product is checked against the whole-weight
one. Writes bench/results/prefill_blocks.json; the block size it supports is
`lowbit.kernels.cpu.PREFILL_BLOCK_BYTES`.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from matmul_kernels import interleaved_medians  # noqa: E402

from lowbit import QuantSpec  # noqa: E402
from lowbit.algorithms.rtn import rtn_quantize  # noqa: E402
from lowbit.evaluation import write_json  # noqa: E402
from lowbit.kernels.cpu import PREFILL_BLOCK_BYTES, KernelLinear, prefill_block_rows  # noqa: E402
from lowbit.modules import QuantLinear  # noqa: E402

BLOCK_BYTES = [512 << 10, 1 << 20, 2 << 20, 4 << 20]


def run_shape(n: int, k: int, tokens: int, repeats: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(n, k, generator=gen) * 0.02
    x = torch.randn(tokens, k, generator=gen)
    specs = {"W4 g128": QuantSpec(bits=4, group_size=128), "W8 per-channel": QuantSpec(bits=8, granularity="channel", group_size=None)}
    cases = {"float32 F.linear": lambda: F.linear(x, weight)}
    checks = []
    for label, spec in specs.items():
        kernel = KernelLinear(QuantLinear(rtn_quantize(weight, spec)))
        whole = lambda kernel=kernel: F.linear(x, kernel.dequantized_weight())  # noqa: E731
        cases[f"{label} whole weight dequantised, one product"] = whole
        expected = whole()
        for block_bytes in BLOCK_BYTES:
            rows = prefill_block_rows(n, k, block_bytes)
            blocked = lambda kernel=kernel, rows=rows: kernel.kernels.gemm_dequant_blocks(  # noqa: E731
                x, kernel.q, kernel.scales, kernel.zeros, kernel.group_size, kernel.int4, rows)
            chosen = " (the default)" if block_bytes == PREFILL_BLOCK_BYTES else ""
            cases[f"{label} blocks of {block_bytes >> 10} KiB per thread ({rows} rows){chosen}"] = blocked
            checks.append((blocked() - expected).abs().max().item())
    with torch.no_grad():
        medians = interleaved_medians(cases, repeats)
    base = medians["float32 F.linear"]
    out = [{"shape": f"{n}x{k}", "tokens": tokens, "case": label, "us": us, "speedup_vs_fp32": base / us} for label, us in medians.items()]
    out.append({"shape": f"{n}x{k}", "tokens": tokens, "case": "check blocks vs whole weight", "max_abs_diff": max(checks)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["2048x2048", "5632x2048", "2048x5632"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[64, 512])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    rows = []
    for shape in args.shapes:
        n, k = (int(v) for v in shape.split("x"))
        for tokens in args.tokens:
            rows += run_shape(n, k, tokens, args.repeats)
    write_json(Path(args.out) / "prefill_blocks.json", {"torch": torch.__version__, "threads": torch.get_num_threads(),
                                                        "machine": platform.machine(), "results": rows})
    print("| shape | tokens | case | µs | × fp32 speed |\n|---|---:|---|---:|---:|")
    for r in rows:
        if "us" in r:
            print(f"| {r['shape']} | {r['tokens']} | {r['case']} | {r['us']:.0f} | {r['speedup_vs_fp32']:.2f} |")
    print("\nblocks vs whole weight, max |diff|:", max(r["max_abs_diff"] for r in rows if "max_abs_diff" in r))


if __name__ == "__main__":
    main()
