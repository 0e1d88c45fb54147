"""One linear layer at decode batch sizes: float32 BLAS against torch's built-in low-bit
kernels and lowbit's CPU kernels, as ratios measured in one process.

    python bench/matmul_kernels.py [--shapes 5632x2048 2048x5632] [--batches 1 4 16] [--repeats 50]

For each weight shape (out × in; the defaults are the MLP projections of the 1.1B
Llama-shaped model of `lowbit bench-decode`) and batch of tokens, the median time of
`y = x Wᵀ` (all cases timed round-robin, one call each per round) for:

- float32 and bfloat16 `F.linear` (the baselines),
- torch's built-ins: `_weight_int8pack_mm` (int8 per-channel weights), `_weight_int4pack_mm_for_cpu`
  (4-bit groups of 128, bf16 activations) and `_int_mm` (int8 × int8 → int32),
- lowbit: the reference path (dequantise, then BLAS), the CPU kernel for W8 per-channel and
  W4 g128 (symmetric and asymmetric), the W8A8 layer (per-token dynamic activations), and at
  one token the float32 matrix-vector kernel of the compiled decode step (`gemv`).

A built-in this torch cannot run is reported with its error instead of a time. Each
lowbit kernel's output is also checked against its reference path. Writes
bench/results/matmul_kernels.json.

Each case also reports the bytes a call must read (its weight in the form it is stored:
codes, scales and zeros, or the float matrix; plus the activations) and the rate it read
them at, as a share of this machine's streaming read bandwidth, measured in the same process
before and after the sweep (`measure_machine`, the higher of the two): at one token a layer
is memory-bound, so that share says how close to the hardware each kernel runs. The default
shapes add the 1.1B model's output head (32000 × 2048), which `--head-bits 8` stores as W8
per channel.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lowbit import QuantSpec
from lowbit.algorithms.rtn import rtn_quantize
from lowbit.analysis.roofline import measure_machine
from lowbit.evaluation import write_json
from lowbit.kernels.cpu import KernelLinear, load_kernels, quantize_activations_q8, reference_gemm
from lowbit.modules import QuantLinear
from lowbit.modules.int8 import W8A8Linear


def interleaved_medians(cases: dict, repeats: int) -> dict[str, float | str]:
    """Median µs of each callable in ``cases``, timed round-robin (one call of every case per
    round) so that the machine's drift over the sweep hits every case alike; a case that
    raises (or is an exception already) maps to its error text instead."""
    def error(exc: Exception) -> str:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"

    out, live = {}, {}
    for label, fn in cases.items():
        if isinstance(fn, Exception):
            out[label] = error(fn)
            continue
        try:
            for _ in range(3):
                fn()
            live[label] = fn
        except Exception as exc:  # noqa: BLE001  (a built-in this torch cannot run is a result)
            out[label] = error(exc)
    times = {label: [] for label in live}
    for _ in range(repeats):
        for label, fn in live.items():
            start = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - start)
    out.update({label: 1e6 * statistics.median(t) for label, t in times.items()})
    return {label: out[label] for label in cases}


def tensor_bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def builtin_int4(weight: torch.Tensor, group: int = 128):
    """torch's CPU int4 path: unsigned codes 0..15 with bf16 scale and zero per group."""
    n, k = weight.shape
    g = weight.reshape(n, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-8)
    codes = ((g - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).reshape(n, k)
    # torch's convention: w = (q - 8) * scale + zero, so zero = lo + 8 * scale
    scale_zeros = torch.stack([scale, lo + 8 * scale], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
    return (lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, scale_zeros)), tensor_bytes(packed, scale_zeros)


def run_shape(n: int, k: int, batches: list[int], repeats: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(n, k, generator=gen) * 0.02
    weight_bf16 = weight.to(torch.bfloat16)
    layers = {
        "W8 per-channel": QuantLinear(rtn_quantize(weight, QuantSpec(bits=8, granularity="channel", group_size=None))),
        "W4 g128 sym": QuantLinear(rtn_quantize(weight, QuantSpec(bits=4, group_size=128))),
        "W4 g128 asym": QuantLinear(rtn_quantize(weight, QuantSpec(bits=4, group_size=128, symmetric=False))),
    }
    kernels = {label: KernelLinear(layer) for label, layer in layers.items()}
    w4a8 = KernelLinear(layers["W4 g128 sym"], int8_activations=True)
    w8a8_weight = torch.nn.Linear(k, n, bias=False)
    with torch.no_grad():
        w8a8_weight.weight.copy_(weight)
    w8a8 = W8A8Linear.from_linear(w8a8_weight, act_granularity="token")
    int8_w = (weight / (weight.abs().amax(1, keepdim=True) / 127)).round().to(torch.int8)
    int8_s = (weight.abs().amax(1) / 127).float()
    # bytes of the weight each case reads per call, in the form it is stored
    weight_bytes = {"float32 F.linear": tensor_bytes(weight), "bf16 F.linear": tensor_bytes(weight_bf16),
                    "torch _weight_int8pack_mm (fp32 x)": tensor_bytes(int8_w, int8_s), "torch _int_mm (int8 x int8)": tensor_bytes(int8_w),
                    "lowbit W4A8 g128 sym CPU kernel (int8 activations, blocks of 32)": tensor_bytes(*w4a8.kernel_tensors())}
    gemv = load_kernels().gemv
    weight_bytes["lowbit float32 gemv kernel"] = tensor_bytes(weight)
    for label in layers:
        weight_bytes[f"lowbit {label} CPU kernel"] = tensor_bytes(*kernels[label].kernel_tensors())
    rows = []
    for m in batches:
        x = torch.randn(m, k, generator=gen)
        x_bf16 = x.to(torch.bfloat16)
        x_int8 = (x / (x.abs().amax() / 127)).round().to(torch.int8)
        cases = {
            "float32 F.linear": lambda: F.linear(x, weight),
            "bf16 F.linear": lambda: F.linear(x_bf16, weight_bf16),
            "torch _weight_int8pack_mm (fp32 x)": lambda: torch._weight_int8pack_mm(x, int8_w, int8_s),
            "torch _weight_int4pack_mm_for_cpu g128 (bf16 x)": None,
            "torch _int_mm (int8 x int8)": lambda: torch._int_mm(x_int8, int8_w.t()),
            "lowbit W8A8 per-token (quantise x, exact int8 product, scales)": lambda: w8a8(x),
        }
        try:
            int4, weight_bytes["torch _weight_int4pack_mm_for_cpu g128 (bf16 x)"] = builtin_int4(weight)
            cases["torch _weight_int4pack_mm_for_cpu g128 (bf16 x)"] = lambda: int4(x_bf16)
        except Exception as exc:  # noqa: BLE001 - report what this torch cannot do
            cases["torch _weight_int4pack_mm_for_cpu g128 (bf16 x)"] = exc
        for label, layer in layers.items():
            cases[f"lowbit {label} reference (dequantise + BLAS)"] = lambda layer=layer: layer(x)
            cases[f"lowbit {label} CPU kernel"] = lambda kernel=kernels[label]: kernel(x)
        cases["lowbit W4A8 g128 sym CPU kernel (int8 activations, blocks of 32)"] = lambda: w4a8(x)
        if m == 1:  # the compiled decode step's float linears (a float head): one token
            cases["lowbit float32 gemv kernel"] = lambda: gemv(weight, x[0])
        with torch.no_grad():
            shape_rows = []
            for label, result in interleaved_medians(cases, repeats).items():
                row = {"shape": f"{n}x{k}", "batch": m, "case": label}
                row["us" if isinstance(result, float) else "error"] = result
                if label in weight_bytes:
                    row["bytes"] = weight_bytes[label] + tensor_bytes(x)
                    if "us" in row:
                        row["read_gbps"] = row["bytes"] / row["us"] / 1e3
                shape_rows.append(row)
            base = shape_rows[0]["us"]  # float32, measured in the same sweep as the others
            for row in shape_rows:
                if "us" in row:
                    row["speedup_vs_fp32"] = base / row["us"]
            rows += shape_rows
            for label, layer in layers.items():
                err = (kernels[label](x) - reference_gemm(x, layer)).abs().max().item()
                rows.append({"shape": f"{n}x{k}", "batch": m, "case": f"check {label} kernel vs reference", "max_abs_diff": err})
            err = (w4a8(x) - reference_gemm(quantize_activations_q8(x), layers["W4 g128 sym"])).abs().max().item()
            rows.append({"shape": f"{n}x{k}", "batch": m, "case": "check W4A8 kernel vs reference", "max_abs_diff": err})
            if m == 1:
                rows.append({"shape": f"{n}x{k}", "batch": m, "case": "check float32 gemv vs torch.mv",
                             "max_abs_diff": (gemv(weight, x[0]) - torch.mv(weight, x[0])).abs().max().item()})
    return rows


def markdown(rows: list[dict], bandwidth: float) -> str:
    lines = ["| shape | batch | case | µs | × fp32 speed | MB read | GB/s | of bandwidth |", "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "us" in r:
            rate = f"{r['bytes'] / 1e6:.2f} | {r['read_gbps']:.1f} | {r['read_gbps'] / bandwidth:.0%}" if "read_gbps" in r else " | | "
            lines.append(f"| {r['shape']} | {r['batch']} | {r['case']} | {r['us']:.0f} | {r['speedup_vs_fp32']:.2f} | {rate} |")
        elif "error" in r:
            lines.append(f"| {r['shape']} | {r['batch']} | {r['case']} | fails: {r['error']} | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["5632x2048", "2048x5632", "32000x2048"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    before = measure_machine()
    rows = []
    for shape in args.shapes:
        n, k = (int(v) for v in shape.split("x"))
        rows += run_shape(n, k, args.batches, args.repeats)
    after = measure_machine()
    bandwidth = max(before.bandwidth_gbps, after.bandwidth_gbps)
    checks = [r for r in rows if "max_abs_diff" in r]
    write_json(Path(args.out) / "matmul_kernels.json", {"torch": torch.__version__, "threads": torch.get_num_threads(),
                                                         "machine": platform.machine(), "processor": platform.processor(),
                                                         "read_gbps": [before.bandwidth_gbps, after.bandwidth_gbps],
                                                         "matmul_gflops": [before.peak_gflops, after.peak_gflops], "results": rows})
    print(f"streaming read bandwidth {before.bandwidth_gbps:.1f} GB/s before the sweep, {after.bandwidth_gbps:.1f} after "
          f"(shares below are of {bandwidth:.1f})")
    print(markdown(rows, bandwidth))
    print("\nkernel vs reference, max |diff|:", max(r["max_abs_diff"] for r in checks))


if __name__ == "__main__":
    main()
