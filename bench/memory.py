"""Does quantisation really shrink process memory and disk? Measured in fresh processes.

    python bench/memory.py [--model smollm2] [--bits 4] [--group-size 128]

Each measurement runs in its own Python process (so allocator history cannot hide or
inflate anything) and reports resident memory after loading and a forward pass:
  1. the float model as lowbit loads it,
  2. the same process after quantising it in place (the float weights are dropped),
  3. the saved quantised directory loaded on its own,
plus the on-disk size of the float cache directory and of the quantised checkpoint.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import gc, json, sys, torch
from lowbit import QuantSpec, RTNConfig, load_model, quantize_model, save_quantized

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

def forward(model):
    with torch.no_grad():
        model(torch.randint(0, 1000, (1, 128)))

mode, model_ref, bits, group, out = sys.argv[1:6]
gc.collect()
result = {"baseline_mb": rss_mb()}  # interpreter + torch + transformers, before any model
loaded = load_model(model_ref)
forward(loaded.model)
gc.collect()
result["rss_mb"] = rss_mb()
if mode == "quantize":
    quantize_model(loaded, RTNConfig(spec=QuantSpec(bits=int(bits), group_size=int(group))), progress=False)
    gc.collect()
    forward(loaded.model)
    gc.collect()
    result["rss_after_quantize_mb"] = rss_mb()
    save_quantized(loaded, out)
print(json.dumps(result))
"""


def child(*args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    args = parser.parse_args()
    from lowbit.models.loading import convert_gguf
    from lowbit.models.registry import NAMED_MODELS

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "q"
        floats = child("float", args.model, str(args.bits), str(args.group_size), str(out))
        quant = child("quantize", args.model, str(args.bits), str(args.group_size), str(out))
        reloaded = child("float", str(out), "0", "0", str(out))
        float_dir = convert_gguf(NAMED_MODELS[args.model].locate()) if args.model in NAMED_MODELS else Path(args.model)
        rows = [
            ("float model loaded", floats["rss_mb"], floats["baseline_mb"], dir_mb(float_dir)),
            (f"same process after W{args.bits} g{args.group_size} in place", quant["rss_after_quantize_mb"], quant["baseline_mb"], None),
            ("quantised checkpoint loaded fresh", reloaded["rss_mb"], reloaded["baseline_mb"], dir_mb(out)),
        ]
    print(f"| {args.model} | RSS MB | RSS above imports MB | disk MB |\n|---|---:|---:|---:|")
    for label, rss, base, disk in rows:
        print(f"| {label} | {rss:.0f} | {rss - base:.0f} | {'-' if disk is None else f'{disk:.0f}'} |")
    model_float = floats["rss_mb"] - floats["baseline_mb"]
    model_quant = reloaded["rss_mb"] - reloaded["baseline_mb"]
    print(f"\nmodel memory (RSS above imports), quantised / float: {model_quant / model_float:.2f}")


if __name__ == "__main__":
    main()
