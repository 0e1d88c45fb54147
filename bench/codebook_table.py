"""NF4 vs FP4 vs INT4 at 4 bits with block-wise absmax scales, with and without double
quantisation: error on Gaussian data, on the models' own weights, and perplexity.

    python bench/codebook_table.py [--models smollm2 gemma3-270m] [--corpus shakespeare] [--windows 40] [--block 64]

Part 1 (Gaussian data and real weights) measures relative weight error ||W - Ŵ||² / ||W||²
and bits per weight (all constants included). Part 2 quantises each model with every
format and scores all of them in one process against the float model. Writes
bench/results/codebooks_<model>.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from weight_only import materialize, share_float_tensors  # noqa: E402

from lowbit import QuantSpec, evaluate, load_model, method_config, quantize_model  # noqa: E402
from lowbit.data import eval_windows, tokenize_split  # noqa: E402
from lowbit.evaluation import linear_bits_per_weight, model_bytes, write_json  # noqa: E402
from lowbit.methods import DEFAULT_SKIP  # noqa: E402
from lowbit.modules import linear_layers  # noqa: E402
from lowbit.numerics import dequantize, quantize  # noqa: E402
from lowbit.packed import QuantizedWeight  # noqa: E402


def formats(block: int) -> dict[str, tuple[str, QuantSpec]]:
    """label -> (method, spec); absmax scales in float32 as bitsandbytes stores them."""
    out = {}
    for name, method, fmt in (("NF4", "nf4", "nf4"), ("FP4", "fp4", "fp4"), ("INT4 sym", "rtn", "int")):
        out[f"{name} b{block}"] = (method, QuantSpec(bits=4, format=fmt, group_size=block, scale_dtype="float32"))
        out[f"{name} b{block} + DQ"] = (method, QuantSpec(bits=4, format=fmt, group_size=block, double_quant=True))
    return out


def weight_errors(tensors: list[torch.Tensor], block: int) -> dict[str, dict]:
    rows = {}
    for label, (_, spec) in formats(block).items():
        err = signal = bits = count = 0.0
        for w in tensors:
            q = quantize(w, spec)
            err += (w - dequantize(q)).square().sum().item()
            signal += w.square().sum().item()
            bits += 8 * QuantizedWeight.from_quantized(q).nbytes
            count += w.numel()
        rows[label] = {"relative_error": err / signal, "bits_per_weight": bits / count}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2", "gemma3-270m"])
    parser.add_argument("--corpus", default="shakespeare")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()

    gaussian = [torch.randn(1024, 4096, generator=torch.Generator().manual_seed(0))]
    payload = {"block": args.block, "gaussian": weight_errors(gaussian, args.block)}
    print(f"\n### Gaussian N(0, 1), 1024 x 4096, block {args.block}\n\n| format | bits/w | relative error |\n|---|---:|---:|")
    for label, row in payload["gaussian"].items():
        print(f"| {label} | {row['bits_per_weight']:.3f} | {row['relative_error']:.5f} |")

    for name in args.models:
        start = time.perf_counter()
        reference = load_model(name)
        weights = [m.weight.detach().float() for _, m in linear_layers(reference.model, DEFAULT_SKIP)]
        errors = weight_errors(weights, args.block)
        split = tokenize_split(reference.tokenizer, args.corpus)
        windows = eval_windows(split, args.ctx, args.windows)
        models, storage = {"float (GGUF dequantised)": reference.model}, {}
        for label, (method, spec) in formats(args.block).items():
            loaded = load_model(name)
            quantize_model(loaded, method_config(method)(spec=spec), progress=False)
            storage[label] = (linear_bits_per_weight(loaded.model), model_bytes(loaded.model))
            models[label] = materialize(loaded.model)
            share_float_tensors(models[label], reference.model)
        results = [r.to_dict() for r in evaluate(models, windows, reference=reference.model)]
        for r in results:
            if r["label"] in storage:
                r["bits_per_weight"], r["model_bytes"] = storage[r["label"]]
                r["weight_relative_error"] = errors[r["label"]]["relative_error"]
        payload[name] = {"corpus": args.corpus, "windows": len(windows), "tokens": results[0]["tokens"], "results": results,
                         "wall_seconds": time.perf_counter() - start}
        write_json(Path(args.out) / f"codebooks_{name}.json", {"block": args.block, "gaussian": payload["gaussian"], **payload[name]})
        base = results[0]["perplexity"]
        print(f"\n### {name}: {results[0]['tokens']} tokens of {args.corpus}\n")
        print("| format | bits/w | weight rel. error | ppl | Δppl | KLD | top-1 % |\n|---|---:|---:|---:|---:|---:|---:|")
        for r in results:
            rel = r.get("weight_relative_error")
            print(f"| {r['label']} | {r['bits_per_weight']:.3f} | {'-' if rel is None else f'{rel:.5f}'} | {r['perplexity']:.3f} | "
                  f"{100 * (r['perplexity'] / base - 1):+.1f}% | {r['kld']:.4f} | {r['top1_percent']:.1f} |")


if __name__ == "__main__":
    main()
