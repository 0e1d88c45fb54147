"""Peak memory and time of `lowbit quantize`, `eval` and `generate` in memory against
streamed (--low-memory), by model size: issue 18's table.

    python bench/streaming.py [--rows NAME ...] [--list] [--redo] [--markdown]

Each row is one lowbit process; its peak RSS is the kernel's count for the process (wait4),
its wall time the process's, and a streamed row also records the estimate it printed
before any work. Two random models are written once into runs/bench-streaming/ by
`lowbit.models.synthetic.write_random_model`, block by block:

- llama-1.1b: TinyLlama's shape, float32 shards, 4.4 GB;
- qwen2-7b: DeepSeek-R1-Distill-Qwen-7B's shape (Qwen2, 28 blocks, hidden 3584, MLP 18944,
  vocabulary 152,064; 7.6 B parameters), bfloat16 shards (15.2 GB on disk, as Hugging
  Face ships such models; 30.5 GB in float32, which lowbit computes in and this 24 GB
  machine cannot hold), with SmolLM2's tokenizer. The real model's GGUF parts are not all
  on the package index (issue 18), so this stands in for it: its memory and time are a
  7B model's, its perplexity is a random model's.

A quantize row's output stays in runs/bench-streaming/out/ for the eval and generate rows
after it. Rows are kept in bench/results/streaming.json as they finish; a stopped run
continues where it stopped. Run it on an otherwise idle machine: the times change with
anything sharing the two cores (the memory does not).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "streaming.json"
WORK = ROOT / "runs" / "bench-streaming"
OUTPUTS = WORK / "out"
RANDOM_1B = WORK / "llama-1.1b"
RANDOM_7B = WORK / "qwen2-7b"
SLICE_7B = WORK / "qwen2-7b-2-blocks"  # the 7B's first two blocks with its embeddings and head: GPTQ's time per block
GPTQ = ["--method", "gptq", "--bits", "4", "--group-size", "128", "--asym", "--calib-samples", "32", "--calib-corpus", "pydoc"]
RTN = ["--method", "rtn", "--bits", "4", "--group-size", "128"]
SCORE = ["--corpus", "pydoc", "--windows", "4"]
PROMPT = ["--prompt", "The quick brown fox", "--max-new-tokens", "16"]


def output(row: str) -> str:
    """Where quantize row ``row`` writes its checkpoint."""
    return str(OUTPUTS / re.sub(r"[^a-z0-9.]+", "-", row.lower()).strip("-"))


# row name -> the lowbit command line (a quantize row gets --out output(name))
ROWS = {
    "llama-1.1b rtn | in memory": ["quantize", "--model", str(RANDOM_1B), *RTN],
    "llama-1.1b rtn | streamed": ["quantize", "--model", str(RANDOM_1B), *RTN, "--low-memory"],
    "smollm2 rtn | in memory": ["quantize", "--model", "smollm2", *RTN],
    "smollm2 rtn | streamed": ["quantize", "--model", "smollm2", *RTN, "--low-memory"],
    "smollm2 gptq | in memory": ["quantize", "--model", "smollm2", *GPTQ],
    "smollm2 gptq | streamed": ["quantize", "--model", "smollm2", *GPTQ, "--low-memory"],
    "llama-1.1b gptq | in memory": ["quantize", "--model", str(RANDOM_1B), *GPTQ],
    "llama-1.1b gptq | streamed": ["quantize", "--model", str(RANDOM_1B), *GPTQ, "--low-memory"],
    "llama-1.1b eval | in memory": ["eval", output("llama-1.1b rtn | streamed"), *SCORE],
    "llama-1.1b eval | streamed": ["eval", output("llama-1.1b rtn | streamed"), *SCORE, "--low-memory"],
    "llama-1.1b generate | packed": ["generate", output("llama-1.1b rtn | streamed"), *PROMPT],
    # no --low-memory: the plain command finds that 30 GB of float32 does not fit and streams by itself
    "qwen2-7b rtn | streamed": ["quantize", "--model", str(RANDOM_7B), *RTN],
    "qwen2-7b eval | streamed": ["eval", output("qwen2-7b rtn | streamed"), *SCORE],
    "qwen2-7b generate | packed": ["generate", output("qwen2-7b rtn | streamed"), *PROMPT],
    # hours on two cores: a session that ends mid-run leaves the journal, and the same row run
    # again continues it (its log gains one section per process)
    "qwen2-7b gptq | streamed": ["quantize", "--model", str(RANDOM_7B), *GPTQ],
    # the same work per block and the same peak (one block, the 32 x 512 hidden states, the
    # embeddings), in the minutes a session has: the whole model's time follows per block
    "qwen2-7b 2 blocks gptq | streamed": ["quantize", "--model", str(SLICE_7B), *GPTQ, "--low-memory"],
}
ESTIMATE = re.compile(r"estimated peak memory (\d+) MB")
CONTINUED = re.compile(r"(\d+) of \d+ units are done")
# what each command reports as its speed, kept with the row
SPEED = re.compile(r"decode [\d.]+ tokens/s[^;\n]*|\d+ prompt tokens in [\d.]+ s")


def random_models(names: list[str]) -> None:
    """The random models the chosen rows need, each written in a process of its own: this
    process must stay small, since the kernel counts the memory a process had when it
    started a child into the child's peak RSS."""
    if any("1.1b" in n for n in names) and not (RANDOM_1B / "config.json").is_file():
        code = ("from pathlib import Path; from transformers import LlamaConfig; from lowbit.loader import open_skeleton; "
                "from lowbit.models.synthetic import write_random_model; "
                "config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, "
                "num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=2048, tie_word_embeddings=False); "
                f"write_random_model(Path({str(RANDOM_1B)!r}), config, open_skeleton('smollm2').tokenizer)")
        subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    for directory, blocks in ((RANDOM_7B, 28), (SLICE_7B, 2)):
        needed = any(n.startswith("qwen2-7b ") and (("2 blocks" in n) == (blocks == 2)) for n in names)
        if not needed or (directory / "config.json").is_file():
            continue
        code = ("import torch; from pathlib import Path; from transformers import Qwen2Config; from lowbit.loader import open_skeleton; "
                "from lowbit.models.synthetic import write_random_model; "
                f"config = Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers={blocks}, "
                "num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=131072, rope_theta=10000.0, "
                "rms_norm_eps=1e-6, tie_word_embeddings=False); "
                f"write_random_model(Path({str(directory)!r}), config, open_skeleton('smollm2').tokenizer, dtype=torch.bfloat16)")
        subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def run(name: str, argv: list[str]) -> dict:
    if argv[0] == "quantize":
        out = Path(output(name))
        shutil.rmtree(out, ignore_errors=True)
        argv = [*argv, "--out", str(out)]
    full = [sys.executable, "-m", "lowbit.cli", *argv]
    log = OUTPUTS / f"{Path(output(name)).name}.log"
    partial = Path(output(name)).with_name(f".{Path(output(name)).name}.lowbit-partial")
    resuming = argv[0] == "quantize" and partial.is_dir()  # a killed run's journal: the log keeps the earlier processes' sections
    with log.open("a" if resuming else "w") as sink:
        sink.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {'continuing' if resuming else 'starting'}: lowbit {' '.join(argv)}\n")
        sink.flush()
        start = time.perf_counter()
        proc = subprocess.Popen(full, stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
    text = log.read_text().rsplit("\n=== ", 1)[-1]  # this process's section
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"lowbit {' '.join(argv)}: {(text.strip().splitlines() or ['no output'])[-1]}")
    estimate = ESTIMATE.search(text)
    return {"command": " ".join(a for a in argv if not a.startswith(str(OUTPUTS))), "wall_seconds": round(seconds, 1),
            "peak_rss_mb": round(usage.ru_maxrss / 1024), "estimate_mb": int(estimate[1]) if estimate else None,
            "speed": "; ".join(SPEED.findall(text)) or None,
            "continued_from_unit": int(done[1]) if (done := CONTINUED.search(text)) else None}


def markdown(rows: dict) -> str:
    lines = ["| row | peak RSS MB | estimate MB | wall s | speed |", "|---|---:|---:|---:|---|"]
    for name in ROWS:
        if name in rows:
            r = rows[name]
            lines.append(f"| {name} | {r['peak_rss_mb']} | {r['estimate_mb'] or '–'} | {r['wall_seconds']:.0f} | {r.get('speed') or ''} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", metavar="NAME")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--redo", action="store_true")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    if args.list:
        print("\n".join(ROWS))
        return
    stored = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"rows": {}}
    if args.markdown:
        print(markdown(stored["rows"]))
        return
    unknown = sorted(set(args.rows or ()) - set(ROWS))
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; --list prints the names")
    todo = [n for n in (args.rows or ROWS) if args.redo or n not in stored["rows"]]
    producers = {output(n): n for n, argv in ROWS.items() if argv[0] == "quantize"}
    ordered: list[str] = []
    for name in todo:  # an eval or generate row whose checkpoint is gone: its quantize row runs again first
        ordered += [producers[a] for a in ROWS[name][1:] if a in producers and not Path(a).is_dir() and producers[a] not in ordered]
        if name not in ordered:
            ordered.append(name)
    todo = ordered
    OUTPUTS.mkdir(parents=True, exist_ok=True)
    random_models(todo)
    for name in todo:
        row = run(name, ROWS[name])
        stored = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"rows": {}}  # rows another run stored meanwhile
        stored["rows"][name] = row
        RESULTS.write_text(json.dumps(stored, indent=1) + "\n")
        print(f"{name}: peak {row['peak_rss_mb']} MB (estimate {row['estimate_mb']}), {row['wall_seconds']} s"
              + (f", {row['speed']}" if row["speed"] else ""), flush=True)


if __name__ == "__main__":
    main()
