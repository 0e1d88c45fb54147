"""The integer-activation GEMMs (W4A8, W8A8) with and without the CPU's VNNI dot-product
instruction, in one process: the same kernel source built twice, once as lowbit builds it
(-march=native: vpdpbusd where the CPU has AVX-VNNI or AVX-512 VNNI) and once with VNNI
switched off (-mno-avxvnni -mno-avx512vnni: vpmaddubsw + vpmaddwd), timed round-robin.

    python bench/int8_dot_ab.py [--repeats 200]

On the 1.1B model's shapes at one and four tokens; checks that both builds give the same
bits, and prints each layer's read bandwidth (codes and scales) at the VNNI build's speed.
On a CPU without VNNI both builds are the AVX2 path and the ratio is 1.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils import cpp_extension

from lowbit import QuantSpec
from lowbit.algorithms.rtn import rtn_quantize
from lowbit.kernels.cpu import SOURCE, KernelLinear
from lowbit.modules import QuantLinear

BUILDS = {"vnni": [], "avx2": ["-mno-avxvnni", "-mno-avx512vnni"]}
SPECS = {4: QuantSpec(bits=4, group_size=128), 8: QuantSpec(bits=8, granularity="channel", group_size=None)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lowbit-int8-dot-"))
    extensions = {}
    for label, extra in BUILDS.items():
        (work / label).mkdir()
        extensions[label] = cpp_extension.load(name=f"lowbit_int8_dot_{label}", sources=[str(SOURCE)], build_directory=str(work / label),
                                               extra_cflags=["-O3", "-march=native", "-fopenmp", *extra], extra_ldflags=["-fopenmp"])
    print("| shape | weights | tokens | AVX2 µs | VNNI µs | speed-up | GB/s (VNNI) |\n|---|---|---:|---:|---:|---:|---:|")
    for n, k in [(5632, 2048), (2048, 5632), (2048, 2048)]:
        weight = torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 0.02
        for bits, spec in SPECS.items():
            kernel = KernelLinear(QuantLinear(rtn_quantize(weight, spec)))
            for tokens in (1, 4):
                x = torch.randn(tokens, k)
                calls = {label: (lambda ext=ext: (ext.gemm_w4a8 if bits == 4 else ext.gemm_w8a8)(x, kernel.q, kernel.scales, kernel.zeros,
                                                                                                 kernel.group_size, False))
                         for label, ext in extensions.items()}
                if not torch.equal(calls["vnni"](), calls["avx2"]()):
                    raise RuntimeError("the two builds differ")
                times = {label: [] for label in calls}
                for _ in range(args.repeats):
                    for label, call in calls.items():
                        start = time.perf_counter()
                        call()
                        times[label].append(time.perf_counter() - start)
                us = {label: 1e6 * statistics.median(t) for label, t in times.items()}
                nbytes = kernel.q.numel() + kernel.scales.numel() * 8
                print(f"| {n}x{k} | W{bits}A8 | {tokens} | {us['avx2']:.0f} | {us['vnni']:.0f} | {us['avx2'] / us['vnni']:.2f} | "
                      f"{nbytes / us['vnni'] / 1e3:.1f} |")


if __name__ == "__main__":
    main()
