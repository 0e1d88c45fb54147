"""W8A8 variants on the packaged models: plain W8A8, SmoothQuant + W8A8 and LLM.int8(), with
static per-tensor and dynamic per-token activations, plus the outlier analysis behind them.

    python bench/int8_table.py [--models smollm2 gemma3-270m] [--corpus shakespeare] [--windows 40]
                               [--calib-samples 128] [--calib-ctx 512] [--plots docs/img] [--rows all|core]

Each row is quantised by `lowbit quantize` in its own process (wall time and peak RSS from
the child's rusage), calibrated on the first half of the corpus, then all rows are scored
in one process (their int8 layers run the integer path, torch._int_mm) on windows from the
second half against the float model. The outlier analysis uses the calibration samples.
Writes bench/results/int8_<model>.json, outliers_<model>.json and PNG plots.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from weight_only import share_float_tensors, timed_quantize  # noqa: E402

from lowbit import evaluate, load_model, load_quantized  # noqa: E402
from lowbit.analysis.outliers import analyse_outliers, summary_table, write_plots  # noqa: E402
from lowbit.data import eval_windows, tokenize_split  # noqa: E402
from lowbit.evaluation import write_json  # noqa: E402
from lowbit.modules import LLMInt8Linear  # noqa: E402
from lowbit.calibration import CalibrationConfig  # noqa: E402

ROWS = {
    "W8A8 per-tensor static": ["--method", "w8a8", "--act-granularity", "tensor"],
    "SmoothQuant α=0.5 per-tensor": ["--method", "smoothquant", "--act-granularity", "tensor", "--alpha", "0.5"],
    "SmoothQuant α=0.8 per-tensor": ["--method", "smoothquant", "--act-granularity", "tensor", "--alpha", "0.8"],
    "SmoothQuant α search per-tensor": ["--method", "smoothquant", "--act-granularity", "tensor", "--alpha", "search"],
    "W8A8 per-token dynamic": ["--method", "w8a8", "--act-granularity", "token"],
    "SmoothQuant α=0.5 per-token": ["--method", "smoothquant", "--act-granularity", "token", "--alpha", "0.5"],
    "SmoothQuant α=0.8 per-token": ["--method", "smoothquant", "--act-granularity", "token", "--alpha", "0.8"],
    "SmoothQuant α search per-token": ["--method", "smoothquant", "--act-granularity", "token", "--alpha", "search"],
    "LLM.int8() t=6": ["--method", "llm-int8", "--threshold", "6"],
}


CORE_ROWS = ["W8A8 per-tensor static", "SmoothQuant α=0.8 per-tensor", "SmoothQuant α search per-tensor",
             "W8A8 per-token dynamic", "SmoothQuant α=0.8 per-token", "LLM.int8() t=6"]


def run_model(name: str, args, workdir: Path) -> dict:
    calib = ["--calib-corpus", args.corpus, "--calib-samples", str(args.calib_samples), "--calib-ctx", str(args.calib_ctx)]
    quantized = []
    rows = {label: ROWS[label] for label in CORE_ROWS} if args.rows == "core" else ROWS
    for label, flags in rows.items():
        out = workdir / label.replace(" ", "_").replace("=", "").replace(".", "").replace("α", "a")
        seconds, rss = timed_quantize(["--model", name, *flags, *calib, "--out", str(out)])
        quantized.append((label, out, seconds, rss))
    reference = load_model(name)
    samples = CalibrationConfig(corpus=args.corpus, samples=min(args.calib_samples, 32), ctx=args.calib_ctx).tokens(reference.tokenizer)
    report = analyse_outliers(reference, samples)
    print(summary_table(report), file=sys.stderr)
    plots = write_plots(report, Path(args.plots) / f"outliers_{name}")
    write_json(Path(args.out) / f"outliers_{name}.json", report.to_dict())

    split = tokenize_split(reference.tokenizer, args.corpus)
    windows = eval_windows(split, args.ctx, args.windows)
    models = {"float (GGUF dequantised)": reference.model}
    for label, out, _, _ in quantized:
        models[label] = load_quantized(out).model
        share_float_tensors(models[label], reference.model)
    results = [r.to_dict() for r in evaluate(models, windows, reference=reference.model)]
    timing = {label: (seconds, rss) for label, _, seconds, rss in quantized}
    for r in results:
        r["quant_wall_seconds"], r["quant_peak_rss_mb"] = timing.get(r["label"], (0.0, 0.0))
        int8_layers = [m for m in models[r["label"]].modules() if isinstance(m, LLMInt8Linear)]
        if int8_layers:
            shares = [m.outlier_share for m in int8_layers]
            r["outlier_column_share_mean"] = sum(shares) / len(shares)
            r["outlier_column_share_max"] = max(shares)
            r["float_channels_stored"] = sum(int(m.outlier_channels.numel()) for m in int8_layers)
    return {"model": name, "corpus": args.corpus, "windows": len(windows), "ctx": args.ctx, "tokens": results[0]["tokens"],
            "calib_samples": args.calib_samples, "calib_ctx": args.calib_ctx, "torch": torch.__version__,
            "plots": [str(p) for p in plots], "emergent_features": report.emergent, "results": results}


def markdown(rows: list[dict]) -> str:
    base = rows[0]["perplexity"]
    lines = ["| setting | ppl | Δppl | KLD | top-1 % | eval s | quant wall s |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        note = ""
        if "outlier_column_share_mean" in r:
            note = f" (outlier columns: mean {100 * r['outlier_column_share_mean']:.2f}%, max {100 * r['outlier_column_share_max']:.2f}% per layer)"
        lines.append(f"| {r['label']}{note} | {r['perplexity']:.3f} | {100 * (r['perplexity'] / base - 1):+.1f}% | {r['kld']:.4f} | "
                     f"{r['top1_percent']:.1f} | {r['seconds']:.0f} | {r['quant_wall_seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2", "gemma3-270m"])
    parser.add_argument("--corpus", default="shakespeare")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--calib-ctx", type=int, default=512)
    parser.add_argument("--rows", choices=["all", "core"], default="all", help="core: without the α=0.5 and per-token search rows")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--plots", default=str(Path(__file__).parent.parent / "docs" / "img"))
    args = parser.parse_args()
    for name in args.models:
        workdir = Path(tempfile.mkdtemp(prefix=f"lowbit-int8-{name}-"))
        try:
            start = time.perf_counter()
            payload = run_model(name, args, workdir)
            payload["wall_seconds"] = time.perf_counter() - start
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        write_json(Path(args.out) / f"int8_{name}.json", payload)
        print(f"\n### {name}: {payload['tokens']} tokens of {args.corpus} ({payload['windows']} x {args.ctx})\n")
        print(markdown(payload["results"]))


if __name__ == "__main__":
    main()
