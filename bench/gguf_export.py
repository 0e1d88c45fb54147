"""lowbit's GGUF files against llama.cpp's own quantiser, measured by llama.cpp itself.

    python bench/gguf_export.py [--model smollm2] [--types q4_0 q4_1 q4_k q3_k]
                                [--methods rtn gptq awq] [--windows 20] [--calib-samples 128]

For each GGML type: lowbit quantises the packaged model's weights (rtn, gptq, awq; GPTQ and
AWQ on lowbit's default calibration samples) straight into that type and exports a GGUF;
llama.cpp's ``llama-quantize --pure`` makes the same type from the same weights (every
linear in that type or its row fallback, as lowbit's ``--format``; from the packaged file,
``--allow-requantize``: it dequantises, as lowbit's loader does) without and with an
importance matrix that ``llama-imatrix`` computes from the same calibration text. Every file
is then scored by llama.cpp's ``llama-perplexity`` on the same evaluation text (the
evaluation half of the corpus, 20 windows of 512 tokens, as lowbit's eval; llama-perplexity
scores the second half of each window), and by lowbit (perplexity and KLD against the float
model, all positions of the same windows; a llama.cpp file is read through lowbit's GGUF
loader). File sizes are the files' bytes. The output head and embeddings are kept as the
source file holds them in lowbit's exports; llama-quantize is given --token-embedding-type
and --output-tensor-type of the source's (q8_0) so both sides spend the same bytes there.

Needs llama.cpp's tools (scripts/install-llama-cpp.sh). Run it on a quiet machine: llama.cpp's
spin-waiting threads slow down badly when the two cores are shared.
Writes bench/results/gguf_export_<model>.json (rows of earlier runs with other types kept).
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from lowbit import AWQConfig, CalibrationConfig, GPTQConfig, QuantSpec, RTNConfig, load_model, quantize_model  # noqa: E402
from lowbit.data.corpora import calibration_samples, eval_windows, tokenize_split  # noqa: E402
from lowbit.engines.llama_cpp import tool  # noqa: E402
from lowbit.evaluation.metrics import evaluate  # noqa: E402
from lowbit.interchange.gguf import export  # noqa: E402
from lowbit.models.registry import NAMED_MODELS  # noqa: E402

METHODS = {"rtn": RTNConfig, "gptq": GPTQConfig, "awq": AWQConfig}
# llama-quantize's type names; with --pure every linear takes the type (or its row fallback),
# as lowbit's --format does, so the files spend the same bytes
LLAMA_TYPES = {"q4_0": "Q4_0", "q4_1": "Q4_1", "q4_k": "Q4_K_S", "q3_k": "Q3_K_S", "q5_k": "Q5_K_S", "q6_k": "Q6_K", "q8_0": "Q8_0",
               "q2_k": "Q2_K", "q5_0": "Q5_0", "iq4_nl": "IQ4_NL"}


def llama_perplexity(path: Path, text: Path, ctx: int, chunks: int, threads: int) -> float:
    out = subprocess.run([str(tool("llama-perplexity")), "-m", str(path), "-f", str(text), "-c", str(ctx), "--chunks", str(chunks),
                          "-t", str(threads), "-b", str(ctx)], capture_output=True, text=True, check=True)
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", out.stdout + out.stderr)
    if not found:
        raise RuntimeError(f"llama-perplexity printed no estimate:\n{out.stderr[-2000:]}")
    return float(found.group(1))


def run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{cmd[0]} failed:\n{done.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", choices=tuple(NAMED_MODELS))
    parser.add_argument("--types", nargs="+", default=["q4_0", "q4_1", "q4_k", "q3_k"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=tuple(METHODS))
    parser.add_argument("--windows", type=int, default=20)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-llama-quantize", action="store_true", help="only lowbit's files")
    args = parser.parse_args()

    source = NAMED_MODELS[args.model].locate()
    base = load_model(args.model)
    tok = base.tokenizer
    split = tokenize_split(tok)
    windows = eval_windows(split, args.ctx, args.windows)
    calibration = CalibrationConfig(samples=args.calib_samples)
    work = Path(tempfile.mkdtemp(prefix="lowbit-gguf-bench-"))
    eval_text = work / "eval.txt"
    body = args.ctx - 1 if split.bos_id is not None else args.ctx
    eval_text.write_text(tok.decode(split.evaluation[: args.windows * body]))
    calib_text = work / "calib.txt"
    samples = calibration_samples(split, calibration.samples, calibration.ctx, calibration.seed)
    calib_text.write_text("".join(tok.decode(s[1:] if split.bos_id is not None else s) for s in samples))

    def lowbit_scores(model) -> dict:
        result = evaluate({"m": model}, windows, reference=base.model, progress=False)[0]
        return {"lowbit_ppl": result.perplexity, "lowbit_kld": result.kld}

    out = Path(__file__).parent / "results" / f"gguf_export_{args.model}.json"
    earlier = []
    if out.exists():  # keep the rows of earlier runs (other types) that this run does not repeat
        kept = json.loads(out.read_text())
        if (kept["windows"], kept["ctx"], kept["calib_samples"]) == (args.windows, args.ctx, args.calib_samples):
            earlier = kept["rows"]
    rows: list[dict] = []

    def record(row: dict) -> None:
        """Add a row and rewrite the results file at once, so a run stopped midway keeps what it measured."""
        rows.append(row)
        print(row, flush=True)
        done = {(r["file"], r["type"]) for r in rows}
        merged = [r for r in earlier if (r["file"], r["type"]) not in done] + rows
        out.write_text(json.dumps({"model": args.model, "windows": args.windows, "ctx": args.ctx, "calib_samples": args.calib_samples,
                                   "torch": torch.__version__, "rows": merged}, indent=2))

    float_llama = llama_perplexity(source, eval_text, args.ctx, args.windows, args.threads)
    record({"file": "source (float reference)", "type": "source", "bytes": source.stat().st_size, "llama_ppl": float_llama,
            "lowbit_ppl": evaluate({"m": base.model}, windows, progress=False)[0].perplexity, "lowbit_kld": 0.0})
    imatrix = None
    if not args.no_llama_quantize:
        imatrix = work / "imatrix.gguf"
        start = time.perf_counter()
        run([str(tool("llama-imatrix")), "-m", str(source), "-f", str(calib_text), "-c", str(calibration.ctx), "-t", str(args.threads),
             "-o", str(imatrix)])
        print(f"imatrix in {time.perf_counter() - start:.0f} s", flush=True)
    for fmt in args.types:
        for method in args.methods:
            loaded = copy.deepcopy(base)
            config = METHODS[method](spec=QuantSpec().with_changes(format=fmt))
            start = time.perf_counter()
            quantize_model(loaded, config, calibration=calibration if config.calibrated else None, progress=False)
            seconds = time.perf_counter() - start
            path, plan = export(loaded, work / f"lowbit-{method}-{fmt}.gguf")
            row = {"file": f"lowbit {method}", "type": fmt, "bytes": path.stat().st_size, "seconds": seconds,
                   "llama_ppl": llama_perplexity(path, eval_text, args.ctx, args.windows, args.threads), **lowbit_scores(loaded.model)}
            record(row)
            del loaded
        if args.no_llama_quantize:
            continue
        for use_imatrix in (False, True):
            path = work / f"llama-{fmt}{'-imatrix' if use_imatrix else ''}.gguf"
            cmd = [str(tool("llama-quantize")), "--allow-requantize", "--pure", "--token-embedding-type", "q8_0", "--output-tensor-type", "q8_0"]
            if use_imatrix:
                cmd += ["--imatrix", str(imatrix)]
            run(cmd + [str(source), str(path), LLAMA_TYPES[fmt], str(args.threads)])
            theirs = load_model(str(path))
            row = {"file": f"llama-quantize{' + imatrix' if use_imatrix else ''}", "type": fmt, "bytes": path.stat().st_size,
                   "llama_ppl": llama_perplexity(path, eval_text, args.ctx, args.windows, args.threads), **lowbit_scores(theirs.model)}
            record(row)
            del theirs
    print("\n| file | type | MiB | llama.cpp ppl | lowbit ppl | lowbit KLD |\n|---|---|---:|---:|---:|---:|")
    for r in json.loads(out.read_text())["rows"]:
        print(f"| {r['file']} | {r['type']} | {r['bytes'] / 2**20:.1f} | {r['llama_ppl']:.3f} | {r['lowbit_ppl']:.3f} | {r['lowbit_kld']:.4f} |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
