"""Decode speed of the same GGUF files in llama.cpp and in lowbit, in interleaved rounds.

    python bench/gguf_decode.py [--model smollm2] [--types q4_0 q4_1 q8_0 q4_k] [--tokens 64] [--rounds 5]

For each type, lowbit quantises the packaged model into it (RTN; speed does not depend on
how the codes were chosen) and exports the GGUF file. Each round then times, one after the
other, for every file:

- llama.cpp: ``llama-bench -m FILE -p 0 -n TOKENS -r 1 -t THREADS`` (text generation from an
  empty context, its own tokens/s);
- lowbit, the file opened as a quantised model (`open_quantized`: the file's codes) with
  lowbit's CPU kernels (`use_cpu_kernels`), greedy decode of TOKENS tokens after a 1-token
  prompt (`lowbit.inference.generate`, decode steps only), in three forms: as opened (a tied
  head stays the float32 embedding, as lowbit's loader keeps it) and with the head on the
  file's own q8_0 codes of that embedding (what llama.cpp reads for the output matmul), both
  through the compiled decode step (`lowbit.inference.compiled_step`, generate's default);
  the latter again through transformers' forward per token (``compiled=False``, the eager
  loop the compiled step replaced); and the latter with int8 activations (rounded to int8
  blocks of 32, integer dot products: the W4A8 and W8A8 kernels, the head included, what
  llama.cpp's CPU path does with these files) in the compiled step.

Rows are medians over rounds; ratios are lowbit / llama.cpp within each round's medians.
Bytes per token are the linears' and head's stored bytes (lowbit's roofline `decode_cost`),
so "GB/s" is the weight traffic each engine sustains; "roofline" is the tokens/s those bytes
allow at this machine's measured read bandwidth (`measure_machine`). Run on a quiet machine: llama.cpp's
spin-waiting threads collapse when the two cores are shared (the script sleeps a second
between the engines so torch's threads are idle when llama.cpp starts).
Writes bench/results/gguf_decode_<model>.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from lowbit import QuantSpec, RTNConfig, load_model, quantize_model  # noqa: E402
from lowbit.analysis.roofline import decode_cost, measure_machine  # noqa: E402
from lowbit.engines.llama_cpp import tool  # noqa: E402
from lowbit.inference.generate import generate  # noqa: E402
from lowbit.interchange.gguf import export, head_from_file, open_quantized  # noqa: E402
from lowbit.kernels.cpu import use_cpu_kernels  # noqa: E402
from lowbit.models.registry import NAMED_MODELS  # noqa: E402


def llama_bench(path: Path, tokens: int, threads: int) -> float:
    out = subprocess.run([str(tool("llama-bench")), "-m", str(path), "-p", "0", "-n", str(tokens), "-r", "1", "-t", str(threads), "-o", "json"],
                         capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout)[0]["avg_ts"])


LABELS = {"as opened": True, "file's head codes": True, "file's head codes, eager": False, "file's head codes, int8 activations": True}  # label: compiled step


def lowbit_decode(model: torch.nn.Module, tokens: int, compiled: bool) -> float:
    result = generate(model, torch.tensor([[1]]), tokens + 1, compiled=compiled)
    if (result.mode == "compiled") != compiled:
        raise RuntimeError(f"asked for compiled={compiled}, ran {result.mode}")
    return result.decode_tokens_per_second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", choices=tuple(NAMED_MODELS))
    parser.add_argument("--types", nargs="+", default=["q4_0", "q4_1", "q8_0", "q4_k"])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    base = load_model(args.model)
    work = Path(tempfile.mkdtemp(prefix="lowbit-gguf-decode-"))
    files, models = {}, {}
    for fmt in args.types:
        loaded = copy.deepcopy(base)
        quantize_model(loaded, RTNConfig(spec=QuantSpec().with_changes(format=fmt)), progress=False)
        files[fmt], _ = export(loaded, work / f"{fmt}.gguf")
        del loaded
        opened = open_quantized(files[fmt]).model
        with_head = copy.deepcopy(opened)
        head_from_file(with_head, files[fmt])
        integer = copy.deepcopy(with_head)
        for label, model in (("as opened", opened), ("file's head codes", with_head)):
            skipped = use_cpu_kernels(model)
            models[(fmt, label)] = (model, len(skipped))
        models[(fmt, "file's head codes, eager")] = models[(fmt, "file's head codes")]
        models[(fmt, "file's head codes, int8 activations")] = (integer, len(use_cpu_kernels(integer, int8_activations=True, w8a8=True)))
        for label, compiled in LABELS.items():
            lowbit_decode(models[(fmt, label)][0], 8, compiled)  # warm up: kernel build, allocator, caches
    machine = measure_machine()
    runs: dict[tuple[str, str], list[float]] = {key: [] for fmt in args.types for key in ((fmt, "llama.cpp"), *((fmt, lab) for lab in LABELS))}
    for round_ in range(args.rounds):
        for fmt in args.types:
            time.sleep(1.0)
            runs[(fmt, "llama.cpp")].append(llama_bench(files[fmt], args.tokens, args.threads))
            for label, compiled in LABELS.items():
                runs[(fmt, label)].append(lowbit_decode(models[(fmt, label)][0], args.tokens, compiled))
        print(f"round {round_ + 1}: " + ", ".join(f"{f} {lab} {v[-1]:.1f}" for (f, lab), v in runs.items()), flush=True)
    rows = []
    for fmt in args.types:
        llama = statistics.median(runs[(fmt, "llama.cpp")])
        costs = {label: decode_cost(models[(fmt, label)][0], args.tokens // 2) for label in LABELS}
        for label in ("llama.cpp", *LABELS):
            speed = statistics.median(runs[(fmt, label)])
            cost = costs["file's head codes" if label == "llama.cpp" else label]
            nbytes = cost.weight_bytes
            rows.append({"type": fmt, "engine": "llama.cpp" if label == "llama.cpp" else f"lowbit ({label})", "file_bytes": files[fmt].stat().st_size,
                         "tokens_per_s": speed, "vs_llama_cpp": speed / llama, "weight_bytes_per_token": nbytes,
                         "weight_gb_per_s": nbytes * speed / 1e9, "roofline_tokens_per_s": 1.0 / cost.seconds(machine), "rounds": runs[(fmt, label)],
                         "reference_path_layers": 0 if label == "llama.cpp" else models[(fmt, label)][1]})
    out = Path(__file__).parent / "results" / f"gguf_decode_{args.model}.json"
    out.write_text(json.dumps({"model": args.model, "tokens": args.tokens, "rounds": args.rounds, "threads": args.threads,
                               "torch": torch.__version__, "machine": vars(machine), "rows": rows}, indent=2))
    print(f"machine: {machine.bandwidth_gbps:.1f} GB/s read, {machine.peak_gflops:.0f} GFLOP/s")
    print("\n| type | engine | tokens/s | vs llama.cpp | weight MB/token | GB/s | roofline tokens/s |\n|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['type']} | {r['engine']} | {r['tokens_per_s']:.1f} | {r['vs_llama_cpp']:.2f} | {r['weight_bytes_per_token'] / 1e6:.1f} | "
              f"{r['weight_gb_per_s']:.2f} | {r['roofline_tokens_per_s']:.0f} |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
