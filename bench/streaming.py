"""Peak memory and time of `lowbit quantize` in memory against streamed (--low-memory), by
model size: issue 18's table.

    python bench/streaming.py [--rows NAME ...] [--list] [--redo] [--markdown]

Each row is one `lowbit quantize` process; its peak RSS is the kernel's count for the
process (wait4), its wall time the process's, and a streamed row also records the estimate
it printed before any work. The random 1.1B Llama (TinyLlama's shape, float32 shards, 4.4
GB) is written once into runs/bench-streaming/ by the suite's own writer. Rows are kept in
bench/results/streaming.json as they finish; a stopped run continues where it stopped. Run
it on an otherwise idle machine: the times change with anything sharing the two cores (the
memory does not).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "streaming.json"
WORK = ROOT / "runs" / "bench-streaming"
RANDOM_1B = WORK / "llama-1.1b"
GPTQ = ["--method", "gptq", "--bits", "4", "--group-size", "128", "--asym", "--calib-samples", "32", "--calib-corpus", "pydoc"]
RTN = ["--method", "rtn", "--bits", "4", "--group-size", "128"]
ROWS = {
    "llama-1.1b rtn | in memory": (str(RANDOM_1B), RTN),
    "llama-1.1b rtn | streamed": (str(RANDOM_1B), [*RTN, "--low-memory"]),
    "smollm2 rtn | in memory": ("smollm2", RTN),
    "smollm2 rtn | streamed": ("smollm2", [*RTN, "--low-memory"]),
    "smollm2 gptq | in memory": ("smollm2", GPTQ),
    "smollm2 gptq | streamed": ("smollm2", [*GPTQ, "--low-memory"]),
    "llama-1.1b gptq | streamed": (str(RANDOM_1B), [*GPTQ, "--low-memory"]),
}
ESTIMATE = re.compile(r"estimated peak memory (\d+) MB")


def random_model() -> None:
    """The random 1.1B model, written by the suite's writer in a process of its own: this
    process must stay small, since the kernel counts the memory a process had when it
    started a child into the child's peak RSS."""
    if (RANDOM_1B / "config.json").is_file():
        return
    code = ("import sys; sys.path.insert(0, 'tests'); from pathlib import Path; from test_streaming import _write_random_llama; "
            f"_write_random_llama(Path({str(RANDOM_1B)!r}), hidden=2048, intermediate=5632, layers=22, vocab=32000)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def run(model: str, flags: list[str], out: Path) -> dict:
    argv = [sys.executable, "-m", "lowbit.cli", "quantize", "--model", model, *flags, "--out", str(out)]
    log = out.with_suffix(".log")
    with log.open("w") as sink:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
    text = log.read_text()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"lowbit quantize {' '.join(flags)}: {(text.strip().splitlines() or ['no output'])[-1]}")
    estimate = ESTIMATE.search(text)
    return {"command": " ".join(argv[3:-2]), "wall_seconds": round(seconds, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024),
            "estimate_mb": int(estimate[1]) if estimate else None}


def markdown(rows: dict) -> str:
    lines = ["| row | peak RSS MB | estimate MB | wall s |", "|---|---:|---:|---:|"]
    for name in ROWS:
        if name in rows:
            r = rows[name]
            lines.append(f"| {name} | {r['peak_rss_mb']} | {r['estimate_mb'] or '–'} | {r['wall_seconds']:.0f} |")
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
    WORK.mkdir(parents=True, exist_ok=True)
    if any("1.1b" in n for n in todo):
        random_model()
    with tempfile.TemporaryDirectory(dir=WORK) as work:
        for index, name in enumerate(todo):
            model, flags = ROWS[name]
            stored["rows"][name] = row = run(model, flags, Path(work) / f"row{index}")
            RESULTS.write_text(json.dumps(stored, indent=1) + "\n")
            print(f"{name}: peak {row['peak_rss_mb']} MB (estimate {row['estimate_mb']}), {row['wall_seconds']} s", flush=True)


if __name__ == "__main__":
    main()
