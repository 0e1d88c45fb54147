"""Pruning against quantisation on the quality table's protocol (issue 17): magnitude, Wanda
and SparseGPT at 50% unstructured, 2:4 and 4:8, alone and with their kept weights at 4 bits,
each row a real `lowbit prune` process.

    python bench/pruning_table.py [--model smollm2] [--rows NAME ...] [--list] [--redo] [--markdown]

The protocol is bench/quality_table.py's, so the rows stand beside its quantisation rows at
matched bits per weight: 32 x 512 calibration tokens of the first half of pydoc (magnitude
takes none), `lowbit eval` on 40 x 512 held-out tokens of pydoc (in domain) and of
Shakespeare (out of domain) against the float model; wall time and peak RSS of the prune
process. Rows are kept in bench/results/pruning_<model>.json as they finish, so a stopped
run continues where it stopped. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

from quality_table import CALIBRATION, RESULTS, ROOT, SCORED, WINDOWS, commit, quantise, score

W4 = ["--quantize", "--bits", "4", "--group-size", "128", "--asym"]
ROWS = {  # in the order they run: 50% and 2:4 by each method, then with 4-bit kept weights, then 4:8
    **{f"{method} | {pattern}": ["--method", method, "--sparsity", pattern]
       for pattern in ("50%", "2:4") for method in ("sparsegpt", "wanda", "magnitude")},
    "sparsegpt | 2:4 + W4 g128": ["--method", "sparsegpt", "--sparsity", "2:4", *W4],
    "sparsegpt | 50% + W4 g128": ["--method", "sparsegpt", "--sparsity", "50%", *W4],
    "wanda | 2:4 + W4 g128": ["--method", "wanda", "--sparsity", "2:4", *W4],
    "sparsegpt | 4:8": ["--method", "sparsegpt", "--sparsity", "4:8"],
    "magnitude | 2:4 + W4 g128": ["--method", "magnitude", "--sparsity", "2:4", *W4],
}

def command(flags: list[str]) -> list[str]:
    return flags if flags[1] == "magnitude" else [*flags, *CALIBRATION]


def markdown(rows: dict) -> str:
    lines = ["| method | sparsity | bits/w | pydoc Δppl | pydoc KLD | Shakespeare Δppl | Shakespeare KLD | prune s | wall s | peak RSS |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in ROWS:
        if name not in rows:
            continue
        row = rows[name]
        method, pattern = name.split(" | ")
        cells = [method, pattern, f"{row['pydoc']['bits_per_weight']:.2f}"]
        for corpus in SCORED:
            s = row[corpus]
            cells += [f"{s['perplexity'] / s['reference_perplexity'] - 1:+.1%}", f"{s['kld']:.3f}"]
        cells += [f"{row['quantise_seconds']:.0f}", f"{row['wall_seconds']:.0f}", f"{row['peak_rss_mb'] / 1024:.1f} GB"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--rows", nargs="+", metavar="NAME", help="only these rows (names as --list prints them)")
    parser.add_argument("--list", action="store_true", help="print the row names and stop")
    parser.add_argument("--redo", action="store_true", help="run the chosen rows again even if stored")
    parser.add_argument("--markdown", action="store_true", help="print the stored rows as a Markdown table and stop")
    args = parser.parse_args()
    if args.list:
        print("\n".join(ROWS))
        return
    path = RESULTS / f"pruning_{args.model}.json"
    stored = json.loads(path.read_text()) if path.exists() else {"model": args.model, "calibration": CALIBRATION, "windows": WINDOWS, "rows": {}}
    if args.markdown:
        print(markdown(stored["rows"]))
        return
    unknown = sorted(set(args.rows or ()) - set(ROWS))
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; --list prints the names")
    todo = [name for name in (args.rows or ROWS) if args.redo or name not in stored["rows"]]
    print(f"{len(todo)} rows to run on {args.model}", flush=True)
    with tempfile.TemporaryDirectory(dir=ROOT / "runs" if (ROOT / "runs").is_dir() else None) as work:
        for index, name in enumerate(todo):
            out = Path(work) / f"row{index}"
            flags = command(ROWS[name])
            row = {"command": "lowbit prune --model " + " ".join([args.model, *flags]), "commit": commit(),
                   **quantise(args.model, flags, out, verb="prune", add_calibration=False)}
            for corpus in SCORED:
                row[corpus] = score(out, corpus)
            stored["rows"][name] = row
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(stored, indent=1) + "\n")
            tmp.replace(path)
            print(f"{name}: prune {row['quantise_seconds']:.0f} s, wall {row['wall_seconds']:.0f} s, "
                  + ", ".join(f"{c} {row[c]['perplexity'] / row[c]['reference_perplexity'] - 1:+.1%}" for c in SCORED), flush=True)
            subprocess.run(["rm", "-rf", str(out)])


if __name__ == "__main__":
    main()
