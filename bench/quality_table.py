"""The quality table of issue 15: every weight method at every spec on one protocol, in domain
and out of domain, each row a real `lowbit quantize` process.

    python bench/quality_table.py [--model smollm2] [--rows NAME ...] [--list] [--redo] [--markdown]

Protocol: 32 x 512 calibration tokens from the first half of pydoc (``--calib-corpus pydoc``);
each checkpoint then scored by `lowbit eval` on 40 x 512 held-out tokens of the second half of
pydoc (in domain) and of Shakespeare (out of domain), against the float model. A row's wall
time and peak RSS are the quantise process's own (from wait4), evaluation excluded; "quantise s"
is the method's time as the command prints it.

Rows are run in PRIORITY order (the issue's goals first), quantised ``--batch`` at a time and
scored together (one `lowbit eval` of the batch's checkpoints per corpus, the reference's
pass shared), and kept in bench/results/quality_<model>.json as each batch finishes
(commit, command, scores), so a stopped run continues where it stopped; ``--redo`` runs the
named rows again. Run it on an otherwise idle machine: two cores shared with anything else
change the times (not the scores).
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
CALIBRATION = ["--calib-samples", "32", "--calib-corpus", "pydoc"]
SCORED = {"pydoc": "in domain", "shakespeare": "out of domain"}
WINDOWS = 40
SPECS = {
    "W4 g128": ["--bits", "4", "--group-size", "128", "--asym"],
    "W4 g64": ["--bits", "4", "--group-size", "64", "--asym"],
    "W3 g128": ["--bits", "3", "--group-size", "128", "--asym"],
    "W3 g64": ["--bits", "3", "--group-size", "64", "--asym"],
    "W2 g64": ["--bits", "2", "--group-size", "64", "--asym"],
}
METHODS = {
    "rtn": ["--method", "rtn"],
    "rtn mse": ["--method", "rtn", "--range", "mse"],
    "gptq": ["--method", "gptq"],
    "gptq mse": ["--method", "gptq", "--range", "mse"],
    "awq": ["--method", "awq"],
    "signround from gptq mse": ["--method", "signround", "--init", "gptq", "--range", "mse", "--calib-batch", "2", "--round-target", "quantised"],
    "signround float targets from gptq mse": ["--method", "signround", "--init", "gptq", "--range", "mse", "--calib-batch", "2",
                                              "--round-target", "float"],
}
EXTRA = {  # the other starts, the budget mode and learned rounding's steps, at W4 g128 (or the budget)
    **{f"signround float targets from {init} | W4 g128": ["--method", "signround", "--init", init, "--calib-batch", "2", "--round-target", "float",
                                                          *SPECS["W4 g128"]] for init in ("rtn", "awq")},
    "gptq mse | budget 4.25": ["--method", "gptq", "--range", "mse", "--asym", "--budget", "4.25"],
    "gptq mse | budget 3.5": ["--method", "gptq", "--range", "mse", "--asym", "--budget", "3.5"],
    "signround from gptq mse, 100 steps | W4 g128": [*METHODS["signround from gptq mse"], "--iters", "100", *SPECS["W4 g128"]],
    **{f"signround float targets from gptq mse, {n} steps | W4 g128": [*METHODS["signround float targets from gptq mse"], "--iters", str(n),
                                                                       *SPECS["W4 g128"]] for n in (10, 25, 100, 200)},
    # Gemma 3 missed the W4 g64 goal (+3%) at 50 steps by 0.1 points: does 100 steps meet it?
    "signround float targets from gptq mse, 100 steps | W4 g64": [*METHODS["signround float targets from gptq mse"], "--iters", "100",
                                                                   *SPECS["W4 g64"]],
}
ROWS = {f"{method} | {spec}": [*flags, *SPECS[spec]] for spec in SPECS for method, flags in METHODS.items()} | EXTRA
# the order rows are run in when none are named: the goals first (W4 g128, W4 g64, W3 g64, W2 g64), then the rest
PRIORITY = [name for spec in ("W4 g128", "W4 g64", "W3 g64", "W2 g64") for name in ROWS if name.endswith(f"| {spec}") and name not in EXTRA]
PRIORITY += [name for name in EXTRA if "budget" in name or "25 steps" in name or "100 steps" in name]
PRIORITY += [name for name in ROWS if name not in PRIORITY]
QUANTISED = re.compile(r"^(?:quantised|pruned) .* in ([\d.]+) s", re.M)
GFLOPS = re.compile(r"at (\d+) GFLOP/s")  # the machine's float32 matmul rate, as the calibration estimate measures it


def command(flags: list[str]) -> list[str]:
    """A row's flags with the calibration protocol's (RTN takes none: it refuses them)."""
    return flags if flags[:2] == ["--method", "rtn"] else [*flags, *CALIBRATION]


def quantise(model: str, flags: list[str], out: Path, verb: str = "quantize") -> dict:
    """One `lowbit quantize` (or ``verb``) process with ``flags`` (all of them, calibration
    included): its wall time, peak RSS and the method's own seconds."""
    argv = [sys.executable, "-m", "lowbit.cli", verb, "--model", model, *flags, "--out", str(out)]
    log = out.with_suffix(".log")
    with log.open("w") as sink:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
    text = log.read_text()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"lowbit {verb} {' '.join(flags)}: {(text.strip().splitlines() or ['no output'])[-1]}")
    rate = GFLOPS.search(text)  # sessions run on machines of different speed (28 to 224 GFLOP/s measured): times compare at a similar rate only
    return {"wall_seconds": round(seconds, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024), "quantise_seconds": float(QUANTISED.findall(text)[-1]),
            "matmul_gflops": int(rate[1]) if rate else None}


def score(checkpoints: list[Path], corpus: str) -> list[dict]:
    """One `lowbit eval` of the checkpoints (one source model) against their float source on
    ``corpus``: the reference's output projection, most of the work on Gemma's 262k
    vocabulary, runs once for all of them. Each checkpoint's scores, in order."""
    report = checkpoints[0].with_suffix(f".{corpus}.json")
    argv = [sys.executable, "-m", "lowbit.cli", "eval", *map(str, checkpoints), "--corpus", corpus, "--windows", str(WINDOWS), "--json", str(report)]
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        message = f"lowbit eval {' '.join(map(str, checkpoints))} --corpus {corpus}: {(done.stderr.strip().splitlines() or ['no output'])[-1]}"
        if len(checkpoints) == 1:
            raise SystemExit(message)
        # several models may not fit the memory free at that moment (lowbit eval then refuses to
        # stream them together): one at a time instead, the batch's quantisation kept
        print(f"{message}\nscoring the {len(checkpoints)} checkpoints one at a time", flush=True)
        return [score([checkpoint], corpus)[0] for checkpoint in checkpoints]
    reference, *results = json.loads(report.read_text())["results"]
    assert [r["label"] for r in results] == [c.name for c in checkpoints], "lowbit eval labels its rows by directory name"
    return [{"perplexity": result["perplexity"], "reference_perplexity": reference["perplexity"], "kld": result["kld"],
             "top1_percent": result["top1_percent"], "bits_per_weight": result["bits_per_weight"],
             "eval_wall_seconds": round(seconds, 1), "scored_with": len(checkpoints) - 1,  # the call's wall time, shared with that many others
             "reference_seconds": round(reference["seconds"], 1)}  # the latter small when its hidden states were stored
            for result in results]


def commit() -> str:
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout
    return head + ("+changes" if dirty.strip() else "")


def markdown(rows: dict, names=None, columns=("method", "spec"), seconds="quantise s") -> str:
    """The stored rows, in ``names`` order (default ROWS), as a Markdown table for docs/results.md;
    each name is "<first column> | <second column>"."""
    lines = [f"| {columns[0]} | {columns[1]} | bits/w | pydoc Δppl | pydoc KLD | Shakespeare Δppl | Shakespeare KLD | {seconds} | wall s | peak RSS |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in names or ROWS:
        if name not in rows:
            continue
        row = rows[name]
        cells = [*name.split(" | "), f"{row['pydoc']['bits_per_weight']:.2f}"]
        for corpus in SCORED:
            s = row[corpus]
            cells += [f"{s['perplexity'] / s['reference_perplexity'] - 1:+.1%}", f"{s['kld']:.3f}"]
        cells += [f"{row['quantise_seconds']:.0f}", f"{row['wall_seconds']:.0f}", f"{row['peak_rss_mb'] / 1024:.1f} GB"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table_main(description: str, table: str, rows: dict, priority: list[str], command, verb: str = "quantize", **columns) -> None:
    """The command line of a resumable table (this one, bench/pruning_table.py): ``rows`` maps
    a row's name to its flags, ``command`` gives the full flags of one, results go to
    bench/results/<table>_<model>.json as each row finishes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--rows", nargs="+", metavar="NAME", help="only these rows (names as --list prints them)")
    parser.add_argument("--list", action="store_true", help="print the row names and stop")
    parser.add_argument("--redo", action="store_true", help="run the chosen rows again even if stored")
    parser.add_argument("--markdown", action="store_true", help="print the stored rows as a Markdown table and stop")
    parser.add_argument("--batch", type=int, default=4, help="checkpoints quantised before one `lowbit eval` scores them together "
                        "(the reference's pass shared; default 4)")
    args = parser.parse_args()
    if args.batch < 1:
        parser.error("--batch takes a whole number of checkpoints, 1 or more")
    if args.list:
        print("\n".join(rows))
        return
    path = RESULTS / f"{table}_{args.model}.json"
    stored = json.loads(path.read_text()) if path.exists() else {"model": args.model, "calibration": CALIBRATION, "windows": WINDOWS, "rows": {}}
    if args.markdown:
        print(markdown(stored["rows"], list(rows), **columns))
        return
    unknown = sorted(set(args.rows or ()) - set(rows))
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; --list prints the names")
    todo = [name for name in (args.rows or priority) if args.redo or name not in stored["rows"]]
    print(f"{len(todo)} rows to run on {args.model}, scored {args.batch} at a time", flush=True)
    with tempfile.TemporaryDirectory(dir=ROOT / "runs" if (ROOT / "runs").is_dir() else None) as work:
        for first in range(0, len(todo), args.batch):
            batch = {}
            for index, name in enumerate(todo[first : first + args.batch], start=first):
                out = Path(work) / f"row{index}"
                flags = command(rows[name])
                batch[name] = (out, {"command": f"lowbit {verb} --model " + " ".join([args.model, *flags]), "commit": commit(),
                                     **quantise(args.model, flags, out, verb=verb)})
                print(f"{name}: {verb} {batch[name][1]['quantise_seconds']:.0f} s, wall {batch[name][1]['wall_seconds']:.0f} s", flush=True)
            outs = [out for out, _ in batch.values()]
            for corpus in SCORED:
                for (_, row), scores in zip(batch.values(), score(outs, corpus)):
                    row[corpus] = scores
            if path.exists():  # rows another run of this table stored meanwhile stay
                stored["rows"] = {**json.loads(path.read_text())["rows"], **stored["rows"]}
            for name, (_, row) in batch.items():
                stored["rows"][name] = row
                print(f"{name}: " + ", ".join(f"{c} {row[c]['perplexity'] / row[c]['reference_perplexity'] - 1:+.1%}" for c in SCORED), flush=True)
            tmp = path.with_suffix(f".tmp-{os.getpid()}")
            tmp.write_text(json.dumps(stored, indent=1) + "\n")
            tmp.replace(path)
            subprocess.run(["rm", "-rf", *map(str, outs)])


def main() -> None:
    table_main(__doc__.splitlines()[0], "quality", ROWS, PRIORITY, command)


if __name__ == "__main__":
    main()
