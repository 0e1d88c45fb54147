"""Weight-only methods side by side: RTN, GPTQ and AWQ on the packaged models, each
quantisation a real `lowbit quantize` run.

    python bench/weight_only.py [--models smollm2 gemma3-270m] [--corpus shakespeare] [--windows 40]
                                [--calib-samples 128] [--calib-ctx 512] [--rows all|core|gptq|awq]

Every row is quantised by the CLI in its own process (so its wall time and peak RSS are its
own, read from the child's rusage), calibrated on the first half of the corpus, then all
rows are scored in one process on windows from the second half against the float model
(one reference pass per window). For scoring, each quantised layer is replaced by a float
linear holding its dequantised weight: the same arithmetic as QuantLinear's reference
forward (dequantise, then F.linear), without paying the dequantisation on every window.
Prints a Markdown table per model and writes bench/results/weight_only_<model>.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lowbit import evaluate, load_model, load_quantized
from lowbit.data import eval_windows, tokenize_split
from lowbit.evaluation import linear_bits_per_weight, model_bytes, write_json
from lowbit.modules import QuantLinear, set_module

SETTINGS = {"W4 g128": ["--bits", "4", "--group-size", "128"], "W4 g64": ["--bits", "4", "--group-size", "64"],
            "W3 g128": ["--bits", "3", "--group-size", "128"], "W2 g64": ["--bits", "2", "--group-size", "64"]}
METHODS = {"rtn sym": ["--method", "rtn"], "rtn asym": ["--method", "rtn", "--asym"], "gptq sym": ["--method", "gptq", "--act-order", "off"],
           "gptq asym": ["--method", "gptq", "--asym", "--act-order", "off"], "awq asym": ["--method", "awq", "--asym"],
           "gptq asym act-order+static": ["--method", "gptq", "--asym", "--act-order", "static"]}
ROWS = [("W4 g128", method) for method in ("rtn sym", "rtn asym", "gptq sym", "gptq asym", "awq asym", "gptq asym act-order+static")]
ROWS += [("W4 g64", method) for method in ("rtn sym", "gptq sym", "gptq asym", "awq asym")]
ROWS += [(setting, method) for setting in ("W3 g128", "W2 g64") for method in ("rtn asym", "gptq asym", "awq asym")]
# the comparison only (RTN vs GPTQ vs AWQ, asymmetric, at W4 g128, W3 g128, W2 g64), for slower models
CORE_ROWS = [(setting, method) for setting in ("W4 g128", "W3 g128", "W2 g64") for method in ("rtn asym", "gptq asym", "awq asym")]
GPTQ_ROWS = [(setting, method) for setting in ("W4 g128", "W3 g128", "W2 g64") for method in ("rtn asym", "gptq asym")]
AWQ_ROWS = [(setting, method) for setting in ("W4 g128", "W3 g128", "W2 g64") for method in ("rtn asym", "awq asym")]


def timed_quantize(args: list[str]) -> tuple[float, float]:
    """Run `lowbit quantize` in a child process; (wall seconds, peak RSS MB) of that child."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "lowbit.cli", "quantize", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(f"lowbit quantize {' '.join(args)} failed:\n{output}")
    print(output.strip().splitlines()[-1], file=sys.stderr)
    return seconds, usage.ru_maxrss / 1024


def share_float_tensors(model: torch.nn.Module, reference: torch.nn.Module) -> None:
    """Point ``model``'s float parameters that equal the reference's (embeddings, norms) at
    the reference's tensors, so a table of many Gemma variants does not hold many copies of
    its 671 MB embedding. Scores are unaffected: the values are identical."""
    ref = dict(reference.named_parameters(remove_duplicate=False))
    for name, param in list(model.named_parameters(remove_duplicate=False)):
        other = ref.get(name)
        if other is not None and other.shape == param.shape and torch.equal(other, param):
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, other)


def materialize(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every QuantLinear by an nn.Linear holding its dequantised weight (same forward)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linear.weight = torch.nn.Parameter(module.qweight.dequantize(torch.float32), requires_grad=False)
            if module.bias is not None:
                linear.bias = module.bias
            set_module(model, name, linear)
    return model


def run_model(name: str, args, workdir: Path) -> dict:
    rows = [(setting, method, [*SETTINGS[setting], *METHODS[method]]) for setting, method in {"core": CORE_ROWS, "gptq": GPTQ_ROWS, "awq": AWQ_ROWS}.get(args.rows, ROWS)]
    calib = ["--calib-corpus", args.corpus, "--calib-samples", str(args.calib_samples), "--calib-ctx", str(args.calib_ctx)]
    quantized = []
    for setting, variant, flags in rows:
        out = workdir / f"{name}-{setting}-{variant}".replace(" ", "_")
        needs_calibration = not variant.startswith("rtn")  # rtn refuses calibration flags
        seconds, rss = timed_quantize(["--model", name, *flags, *(calib if needs_calibration else []), "--out", str(out)])
        quantized.append((f"{setting} {variant}", out, seconds, rss))
    reference = load_model(name)
    split = tokenize_split(reference.tokenizer, args.corpus)
    windows = eval_windows(split, args.ctx, args.windows)
    models = {"float (GGUF dequantised)": reference.model}
    storage = {}
    for label, out, _, _ in quantized:
        model = load_quantized(out).model
        storage[label] = (linear_bits_per_weight(model), model_bytes(model))  # of the packed model
        models[label] = materialize(model)
        share_float_tensors(models[label], reference.model)
    results = [r.to_dict() for r in evaluate(models, windows, reference=reference.model)]
    timing = {label: (seconds, rss) for label, _, seconds, rss in quantized}
    for r in results:
        r["quant_wall_seconds"], r["quant_peak_rss_mb"] = timing.get(r["label"], (0.0, 0.0))
        if r["label"] in storage:
            r["bits_per_weight"], r["model_bytes"] = storage[r["label"]]
    return {"model": name, "corpus": args.corpus, "windows": len(windows), "ctx": args.ctx, "tokens": results[0]["tokens"],
            "calib_samples": args.calib_samples, "calib_ctx": args.calib_ctx, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "results": results}


def markdown(rows: list[dict]) -> str:
    base = rows[0]["perplexity"]
    lines = ["| setting | bits/w | ppl | Δppl | KLD | top-1 % | quant wall s | peak RSS MB |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['bits_per_weight']:.2f} | {r['perplexity']:.3f} | {100 * (r['perplexity'] / base - 1):+.1f}% | "
                     f"{r['kld']:.4f} | {r['top1_percent']:.1f} | {r['quant_wall_seconds']:.0f} | {r['quant_peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2", "gemma3-270m"])
    parser.add_argument("--corpus", default="shakespeare")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--calib-ctx", type=int, default=512)
    parser.add_argument("--rows", choices=["all", "core", "gptq", "awq"], default="all",
                        help="core: RTN/GPTQ/AWQ asym at W4 g128, W3 g128, W2 g64; gptq: the same without AWQ; awq: without GPTQ "
                             "(written to weight_only_<model>_awq.json, beside a gptq table)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    for name in args.models:
        workdir = Path(tempfile.mkdtemp(prefix=f"lowbit-gptq-{name}-"))
        try:
            start = time.perf_counter()
            payload = run_model(name, args, workdir)
            payload["wall_seconds"] = time.perf_counter() - start
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        suffix = "_awq" if args.rows == "awq" else ""
        write_json(Path(args.out) / f"weight_only_{name}{suffix}.json", payload)
        print(f"\n### {name}: {payload['tokens']} tokens of {args.corpus} ({payload['windows']} x {args.ctx}); "
              f"calibration {args.calib_samples} x {args.calib_ctx} tokens from the first half\n")
        print(markdown(payload["results"]))


if __name__ == "__main__":
    main()
