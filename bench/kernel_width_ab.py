"""lowbit's decode kernels at one and two tokens with 512-bit and with 256-bit vectors, in one
process, weights read from memory as in a model: how close each layer comes to the machine's
read bandwidth (issue 19: >= 70% per layer at one token).

    python bench/kernel_width_ab.py [--repeats 30] [--tokens 1 2]

The kernel source is built twice: as lowbit builds it (-march=native: the AVX-512 paths where
the CPU has AVX-512) and with AVX-512 switched off (-mno-avx512f: the AVX2 paths, as on a CPU
without it). Both builds run every case round-robin (one call each per round). Each case
cycles through enough copies of its weight (at least 128 MB in all, four times this
machine's 32 MB L3) that every call reads its codes from memory, not from a cache a
previous call warmed: a decoding model reads each layer once per token.

For each case: the bytes a call reads (codes, scales, zeros and the activations), the
median time of each build, and the rate of the better build as a share of the streaming read
bandwidth measured in the same process before and after the sweep (`measure_machine`, the
higher of the two; torch's reductions measured 44-80 GB/s on one machine within minutes), and
as a share of the best rate any case reached (a lower bound on what the memory can deliver). Each build's output is checked against `reference_gemm` (the reference
path: dequantise, then matmul). Writes bench/results/kernel_width_ab.json.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils import cpp_extension

from lowbit import QuantSpec
from lowbit.algorithms.rtn import rtn_quantize
from lowbit.analysis.roofline import measure_machine
from lowbit.evaluation import write_json
from lowbit.kernels.cpu import SOURCE, KernelLinear, quantize_activations_q8, reference_gemm
from lowbit.modules import QuantLinear

BUILDS = {"256-bit": ["-mno-avx512f"], "512-bit": []}
FORMATS = {  # name: (spec, int8 activations)
    "W4 g128": (QuantSpec(bits=4, group_size=128), False),
    "W8 per-channel": (QuantSpec(bits=8, granularity="channel", group_size=None), False),
    "W4A8 g128": (QuantSpec(bits=4, group_size=128), True),
    "W4A8 g32": (QuantSpec(bits=4, group_size=32), True),  # the Q4_0 files' blocks
    "W8A8 per-channel": (QuantSpec(bits=8, granularity="channel", group_size=None), True),
}
# the 1.1B Llama-shaped model's MLP projections (out x in) and its output head, which
# `--head-bits 8` stores as W8 per channel
SHAPES = {"5632x2048": list(FORMATS), "2048x5632": list(FORMATS), "32000x2048": ["W8 per-channel", "W8A8 per-channel"]}
COLD_BYTES = 128 << 20


def build(work: Path, label: str, extra: list[str]):
    (work / label).mkdir()
    return cpp_extension.load(name=f"lowbit_width_{label.replace('-', '_')}", sources=[str(SOURCE)], build_directory=str(work / label),
                              extra_cflags=["-O3", "-march=native", "-fopenmp", *extra], extra_ldflags=["-fopenmp"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS), metavar="FORMAT",
                        help=f"only these ({', '.join(FORMATS)})")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    if "avx512f" not in Path("/proc/cpuinfo").read_text():
        raise SystemExit("this CPU has no AVX-512: both builds would be the AVX2 path; nothing to compare")
    work = Path(tempfile.mkdtemp(prefix="lowbit-width-"))
    extensions = {label: build(work, label, extra) for label, extra in BUILDS.items()}
    cases = []
    for shape, formats in SHAPES.items():
        n, k = (int(v) for v in shape.split("x"))
        weight = torch.randn(n, k, generator=torch.Generator().manual_seed(n)) * 0.02
        for name in [f for f in formats if f in args.formats]:
            spec, int8_acts = FORMATS[name]
            first = KernelLinear(QuantLinear(rtn_quantize(weight, spec)), int8_activations=int8_acts)
            weight_bytes = sum(t.numel() * t.element_size() for t in first.kernel_tensors())
            copies = [first] + [KernelLinear(QuantLinear(rtn_quantize(weight + 1e-4 * i, spec)), int8_activations=int8_acts)
                                for i in range(1, max(2, math.ceil(COLD_BYTES / weight_bytes)))]
            for tokens in args.tokens:
                x = torch.randn(tokens, k, generator=torch.Generator().manual_seed(tokens))
                cases.append({"shape": shape, "format": name, "tokens": tokens, "x": x, "copies": copies, "int8_acts": int8_acts,
                              "bytes": weight_bytes + x.numel() * 4})
    for case in cases:
        layer, x = case["copies"][0], case["x"]
        expected = reference_gemm(quantize_activations_q8(x) if case["int8_acts"] else x, layer.reference)
        case["max_abs_diff"] = {}
        for label, ext in extensions.items():
            got = call(ext, layer, x, case["int8_acts"])
            case["max_abs_diff"][label] = (got - expected).abs().max().item()
            if not torch.allclose(got, expected, rtol=1e-4, atol=1e-4):
                raise SystemExit(f"{label} build, {case['format']} {case['shape']} x{case['tokens']}: differs from the reference "
                                 f"by {case['max_abs_diff'][label]:.3g}")
    before = measure_machine()
    times = {(i, label): [] for i in range(len(cases)) for label in extensions}
    labels = list(extensions)
    for r in range(args.repeats + 2):  # two warm-up rounds
        order = labels[r % len(labels):] + labels[: r % len(labels)]  # each build goes first in turn
        for i, case in enumerate(cases):
            for j, label in enumerate(order):
                # a fresh copy for every call: the previous call's weight is still in L3
                layer = case["copies"][(r * len(labels) + j) % len(case["copies"])]
                ext = extensions[label]
                start = time.perf_counter()
                call(ext, layer, case["x"], case["int8_acts"])
                if r >= 2:
                    times[i, label].append(time.perf_counter() - start)
    after = measure_machine()
    bandwidth = max(before.bandwidth_gbps, after.bandwidth_gbps)
    print(f"streaming read bandwidth {before.bandwidth_gbps:.1f} GB/s before the sweep, {after.bandwidth_gbps:.1f} after; "
          f"shares below are of {bandwidth:.1f} GB/s")
    print("| shape | format | tokens | MB read | " + " | ".join(f"{label} µs" for label in labels) + " | 512 / 256 speed | GB/s (best) | "
          "of bandwidth | of the best rate |")
    print("|---|---|---:|---:|" + "---:|" * len(labels) + "---:|---:|---:|---:|")
    medians = [{label: 1e6 * statistics.median(times[i, label]) for label in labels} for i in range(len(cases))]
    best_rate = max(case["bytes"] / min(us.values()) / 1e3 for case, us in zip(cases, medians))  # GB/s, a lower bound on the real roof
    rows = []
    for case, us in zip(cases, medians):
        gbps = case["bytes"] / min(us.values()) / 1e3
        rows.append({key: case[key] for key in ("shape", "format", "tokens", "bytes", "max_abs_diff")}
                    | {"us": us, "read_gbps": gbps, "share": gbps / bandwidth, "share_of_best": gbps / best_rate})
        print(f"| {case['shape']} | {case['format']} | {case['tokens']} | {case['bytes'] / 1e6:.2f} | "
              + " | ".join(f"{us[label]:.0f}" for label in labels)
              + f" | {us['256-bit'] / us['512-bit']:.2f} | {gbps:.1f} | {gbps / bandwidth:.0%} | {gbps / best_rate:.0%} |")
    write_json(Path(args.out) / "kernel_width_ab.json", {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
                                                         "read_gbps": [before.bandwidth_gbps, after.bandwidth_gbps],
                                                         "matmul_gflops": [before.peak_gflops, after.peak_gflops], "repeats": args.repeats,
                                                         "best_read_gbps": best_rate,
                                                         "rows": rows})


def call(ext, layer: KernelLinear, x: torch.Tensor, int8_acts: bool) -> torch.Tensor:
    if int8_acts:
        gemm = ext.gemm_w4a8 if layer.int4 else ext.gemm_w8a8
        return gemm(x, layer.q, layer.scales, layer.zeros, layer.group_size, False)
    return ext.gemm(x, layer.q, layer.scales, layer.zeros, layer.group_size, layer.int4)


if __name__ == "__main__":
    main()
