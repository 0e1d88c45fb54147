"""The `--range mse` search: coarse to fine (25 shrink factors, the default) against every
one of the grid's 81 (`find_params(..., exhaustive=True)`), on SmolLM2's own weights.

    python bench/range_search.py [--rounds 3] [--threads 1]

For the linears of a few decoder blocks, each read as GPTQ reads them (q/k/v stacked, gate/up
stacked, o_proj, down_proj), with an importance per input column (a positive random stand-in
for GPTQ's diag H, fixed by seed): the time of each search in interleaved rounds (the minimum
over rounds, both in this process), and the importance-weighted squared error each reaches.

Writes bench/results/range_search.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lowbit.loader import load_model
from lowbit.numerics.quantization import _group_sq_error, find_params
from lowbit.numerics.spec import QuantSpec

RESULTS = Path(__file__).resolve().parent / "results"
BLOCKS = (0, 10, 20)
SPECS = {"W4 g128 asym": QuantSpec(bits=4, group_size=128, symmetric=False, range="mse"),
         "W3 g64 asym": QuantSpec(bits=3, group_size=64, symmetric=False, range="mse")}


def weights(model) -> dict[str, torch.Tensor]:
    out = {}
    for b in BLOCKS:
        layer = model.model.layers[b]
        attn, mlp = layer.self_attn, layer.mlp
        out[f"{b}.qkv"] = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach().float()
        out[f"{b}.o"] = attn.o_proj.weight.detach().float()
        out[f"{b}.gate_up"] = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach().float()
        out[f"{b}.down"] = mlp.down_proj.weight.detach().float()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    layers = weights(load_model("smollm2").model)
    generator = torch.Generator().manual_seed(0)
    importance = {name: torch.rand(w.shape[1], generator=generator) ** 2 + 1e-3 for name, w in layers.items()}
    rows = []
    for label, spec in SPECS.items():
        seconds = {False: [], True: []}
        errors = {}
        for _ in range(args.rounds):
            for exhaustive in (True, False):
                start = time.perf_counter()
                total = 0.0
                for name, w in layers.items():
                    group = spec.group_size_for(w.shape[1])
                    scale, zero = find_params(w, spec, group, importance[name], exhaustive=exhaustive)
                    total += _group_sq_error(w, scale, zero, spec, group, importance[name]).sum().item()
                seconds[exhaustive].append(time.perf_counter() - start)
                errors[exhaustive] = total
        row = {"spec": label, "layers": len(layers), "threads": args.threads,
               "exhaustive_s": min(seconds[True]), "coarse_to_fine_s": min(seconds[False]),
               "speedup": min(seconds[True]) / min(seconds[False]),
               "exhaustive_error": errors[True], "coarse_to_fine_error": errors[False],
               "error_ratio": errors[False] / errors[True]}
        rows.append(row)
        print(f"{label}: exhaustive {row['exhaustive_s']:.2f} s, coarse to fine {row['coarse_to_fine_s']:.2f} s "
              f"({row['speedup']:.2f}x faster); weighted error {row['error_ratio']:.4f}x the exhaustive search's")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "range_search.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {RESULTS / 'range_search.json'}")


if __name__ == "__main__":
    main()
