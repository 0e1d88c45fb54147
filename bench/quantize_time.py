"""Where a whole `lowbit quantize` process spends its time, and how this tree compares with
an earlier one on the same machine.

    python bench/quantize_time.py [--methods gptq awq] [--rounds 2] [--baseline-tree DIR]

Each row is a real process, `lowbit quantize --method M --bits 4 --group-size 128 --asym
--calib-samples 32 --eval` on SmolLM2 (32 x 512 calibration tokens, 20 x 512 scored), started
from nothing: its wall time from start to exit, its peak RSS (the kernel's, from wait4), the
engine's seconds by phase (the `time:` line the command prints), and the scores it prints.
With ``--baseline-tree`` (a checkout of an earlier commit, e.g. ``git worktree add /tmp/old
REV``) the same command also runs from that tree, in interleaved rounds (baseline, this tree,
baseline, ...), so both see the same machine; the minimum over rounds is the run least
disturbed by whatever else the machine does. The checkpoint's conversion cache must be warm
(run any lowbit command on the model once first).

Writes bench/results/quantize_time.json.
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
RESULTS = ROOT / "bench" / "results"
FLAGS = ["--bits", "4", "--group-size", "128", "--asym", "--calib-samples", "32"]
PHASE = re.compile(r"(capturing inputs|statistics passes|accumulating|quantising|refining blocks|quantised blocks' outputs) ([\d.]+) s")


def run(tree: Path, method: str, model: str, work: Path) -> dict:
    """One `lowbit quantize ... --eval` process with ``tree`` first on the import path."""
    out, report = work / f"{method}-{time.monotonic_ns()}", work / f"{method}-{time.monotonic_ns()}.json"
    argv = [sys.executable, "-m", "lowbit.cli", "quantize", "--model", model, "--method", method, *FLAGS,
            "--out", str(out), "--eval", "--json", str(report)]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    log_out, log_err = work / "stdout", work / "stderr"
    with log_out.open("w") as stdout_file, log_err.open("w") as stderr_file:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, stdout=stdout_file, stderr=stderr_file, text=True, cwd=tree)
        _, status, usage = os.wait4(proc.pid, 0)  # reaped here, so its own peak RSS is read
        seconds = time.perf_counter() - start
    stdout, stderr = log_out.read_text(), log_err.read_text()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{method} from {tree}: {(stderr.strip().splitlines() or ['no output'])[-1]}")
    data = json.loads(report.read_text())
    quantised = next(line for line in stdout.splitlines() if line.startswith("quantised "))
    phases = {name: float(value) for name, value in PHASE.findall(stdout)}
    return {"wall_seconds": seconds, "quantise_seconds": float(quantised.split(" in ")[1].split(" s ")[0]),
            "peak_rss_mb": usage.ru_maxrss / 1024, "phases": phases,
            **{k: data[k] for k in ("perplexity", "kld", "top1_percent")}, "reference_perplexity": data["results"][0]["perplexity"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["gptq", "awq"])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--baseline-tree", type=Path, help="a checkout of an earlier commit, run in interleaved rounds")
    args = parser.parse_args()
    trees = {"this tree": ROOT}
    if args.baseline_tree is not None:
        trees = {"baseline": args.baseline_tree.resolve(), **trees}
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for method in args.methods:
            for round_index in range(args.rounds):
                for label, tree in trees.items():
                    row = {"method": method, "tree": label, "round": round_index, **run(tree, method, args.model, Path(work))}
                    rows.append(row)
                    print(f"{method:<6} {label:<10} round {round_index}: wall {row['wall_seconds']:6.1f} s, quantise "
                          f"{row['quantise_seconds']:6.1f} s, ppl {row['perplexity']:.3f}, "
                          + ", ".join(f"{k} {v:.1f}" for k, v in row["phases"].items()), flush=True)
    commits = {label: subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
               for label, tree in trees.items()}
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), "unknown")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "quantize_time.json"
    out.write_text(json.dumps({"model": args.model, "flags": FLAGS, "cpu": cpu, "cores": os.cpu_count(), "commits": commits, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
