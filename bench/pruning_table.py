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

from quality_table import CALIBRATION, table_main

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


def main() -> None:
    table_main(__doc__.splitlines()[0], "pruning", ROWS, list(ROWS), command, verb="prune", columns=("method", "sparsity"), seconds="prune s")


if __name__ == "__main__":
    main()
