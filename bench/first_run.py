"""What a new user waits for: the CLI's start-up, the first GGUF conversion, and the cost of
scoring a quantised model against scoring its float source.

    python bench/first_run.py [--windows 20] [--rounds 5] [--conversion] [--candidates]

1. ``lowbit --help`` and ``lowbit quantize --help`` wall time (median of 7 runs), beside a
   bare ``python -c pass`` and ``python -c "import torch"`` of the same interpreter.
2. `lowbit.evaluate` on the same windows, in interleaved rounds: the float model; the W4
   g128 model as evaluate runs it (weights dequantised once for the whole evaluation); and
   the same model dequantising on every call (the path before). Medians and minima over
   rounds (this machine's speed moves by 10-20% within a minute, so the minimum, the run
   least disturbed, is the steadier comparison).
3. With ``--conversion``: the first conversion of each packaged GGUF, into an empty cache.
4. With ``--candidates``: README's main command for each candidate method and setting, as a
   new user runs it (``lowbit quantize ... --eval`` on SmolLM2, one process each): its wall
   time from start to the printed table, and the scores it prints, to pick the setting that
   keeps the model best per minute of the user's time.

Writes bench/results/first_run.json, keeping the sections of an earlier run that this one
did not repeat.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from lowbit import QuantSpec, RTNConfig, load_model, quantize_model  # noqa: E402
from lowbit.data import eval_windows, tokenize_split  # noqa: E402
from lowbit.evaluation import metrics, write_json  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def wall(argv: list[str], repeats: int = 7) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(argv, capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def startup() -> dict:
    lowbit = str(Path(sys.executable).with_name("lowbit"))
    return {
        "python -c pass": wall([sys.executable, "-c", "pass"]),
        "python -c 'import torch'": wall([sys.executable, "-c", "import torch"]),
        "lowbit --help": wall([lowbit, "--help"]),
        "lowbit quantize --help": wall([lowbit, "quantize", "--help"]),
    }


def scoring(model: str, n_windows: int, rounds: int) -> dict:
    """Seconds of `evaluate` per model, median over interleaved rounds (each model alone, no
    reference, so every row times one model's forward passes only)."""
    reference = load_model(model)
    w4 = load_model(model)
    quantize_model(w4, RTNConfig(spec=QuantSpec(bits=4, group_size=128)), progress=False)
    windows = eval_windows(tokenize_split(reference.tokenizer, "pydoc"), 512, n_windows)
    every_call = DequantiseEveryCall  # the path before: no once-per-evaluation cache
    cases = {"float32": (reference.model, nullcontext), "W4 g128, dequantised once": (w4.model, nullcontext),
             "W4 g128, dequantised every call": (w4.model, every_call)}
    seconds = {label: [] for label in cases}
    perplexity = {}
    for _ in range(rounds):
        for label, (m, context) in cases.items():
            with context():
                start = time.perf_counter()
                result = metrics.evaluate({label: m}, windows, progress=False)[0]
                seconds[label].append(time.perf_counter() - start)
            perplexity[label] = result.perplexity
    base, base_min = statistics.median(seconds["float32"]), min(seconds["float32"])
    return {label: {"seconds": statistics.median(t), "x_float": statistics.median(t) / base, "min_seconds": min(t),
                    "x_float_min": min(t) / base_min, "perplexity": perplexity[label], "rounds": t} for label, t in seconds.items()}


class DequantiseEveryCall:
    """Within the block, `evaluate` does not cache dequantised weights."""

    def __enter__(self):
        self.saved = metrics.dequantized_once
        metrics.dequantized_once = lambda model: nullcontext()

    def __exit__(self, *exc):
        metrics.dequantized_once = self.saved


def conversion() -> dict:
    from lowbit.models.loading import convert_gguf
    from lowbit.models.registry import NAMED_MODELS

    out = {}
    for name, named in NAMED_MODELS.items():
        path = named.locate()
        with tempfile.TemporaryDirectory() as cache:
            os.environ["LOWBIT_CACHE_DIR"] = cache
            start = time.perf_counter()
            convert_gguf(path)
            out[name] = time.perf_counter() - start
            os.environ.pop("LOWBIT_CACHE_DIR")
    return out


CANDIDATES = {
    "rtn W4 g128 sym (the old README command)": ["--method", "rtn", "--bits", "4", "--group-size", "128"],
    "rtn W4 g128 asym": ["--method", "rtn", "--bits", "4", "--group-size", "128", "--asym"],
    "rtn W4 g64 asym": ["--method", "rtn", "--bits", "4", "--group-size", "64", "--asym"],
    "gptq W4 g128 asym, 32 samples": ["--method", "gptq", "--bits", "4", "--group-size", "128", "--asym", "--calib-samples", "32"],
    "gptq W4 g128 asym, 128 samples": ["--method", "gptq", "--bits", "4", "--group-size", "128", "--asym"],
    "gptq W4 g64 asym, 32 samples": ["--method", "gptq", "--bits", "4", "--group-size", "64", "--asym", "--calib-samples", "32"],
    "awq W4 g128 asym, 32 samples": ["--method", "awq", "--bits", "4", "--group-size", "128", "--asym", "--calib-samples", "32"],
}


def candidates() -> dict:
    lowbit = str(Path(sys.executable).with_name("lowbit"))
    rows = {}
    with tempfile.TemporaryDirectory() as work:
        for label, flags in CANDIDATES.items():
            out, report = Path(work) / str(len(rows)), Path(work) / f"{len(rows)}.json"
            start = time.perf_counter()
            proc = subprocess.run([lowbit, "quantize", *flags, "--out", str(out), "--eval", "--json", str(report)], capture_output=True, text=True)
            seconds = time.perf_counter() - start
            if proc.returncode != 0:
                raise SystemExit(f"{label}: {proc.stderr.strip().splitlines()[-1]}")
            data = json.loads(report.read_text())
            quantised = next(line for line in proc.stdout.splitlines() if line.startswith("quantised "))
            rows[label] = {"flags": flags, "wall_seconds": seconds, "quantise_seconds": float(quantised.split(" in ")[1].split(" s ")[0]),
                           **{k: data[k] for k in ("perplexity", "kld", "top1_percent", "bits_per_weight")},
                           "reference_perplexity": data["results"][0]["perplexity"]}
            print(f"{label:<42} {seconds:6.0f} s  ppl {data['perplexity']:.3f}  KLD {data['kld']:.4f}  top-1 {data['top1_percent']:.1f}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--windows", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--conversion", action="store_true", help="also time each packaged GGUF's first conversion")
    parser.add_argument("--candidates", action="store_true", help="also run the main command for each candidate setting")
    args = parser.parse_args()
    out = RESULTS / "first_run.json"
    payload = json.loads(out.read_text()) if out.is_file() else {}
    payload.update({"startup_seconds": startup(), "torch": torch.__version__, "threads": torch.get_num_threads()})
    for label, value in payload["startup_seconds"].items():
        print(f"{label:<28} {value:6.3f} s")
    payload["scoring"] = {"model": args.model, "windows": args.windows, "ctx": 512, "rows": scoring(args.model, args.windows, args.rounds)}
    for label, row in payload["scoring"]["rows"].items():
        print(f"{label:<34} median {row['seconds']:6.2f} s ({row['x_float']:.2f}x float), min {row['min_seconds']:6.2f} s "
              f"({row['x_float_min']:.2f}x)  ppl {row['perplexity']:.3f}")
    if args.conversion:
        payload["first_conversion_seconds"] = conversion()
        for name, value in payload["first_conversion_seconds"].items():
            print(f"first conversion of {name:<14} {value:6.1f} s")
    if args.candidates:
        payload["candidates"] = candidates()
    RESULTS.mkdir(exist_ok=True)
    write_json(out, payload)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
