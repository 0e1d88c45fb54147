"""How learned rounding's settings change a block's output error, on SmolLM2's first blocks.

    python bench/signround_blocks.py [--blocks 3] [--samples 16] [--ctx 256] [--batch 4]
        [--configs '[{"init": "gptq", "iters": 50, "optimizer": "adam", "lr": 0.005, "learn_clip": "off"}, ...]']

Each config quantises only the first ``--blocks`` decoder blocks (W4 g128 asym by default:
--bits, --group-size, --sym) with `SignRoundConfig`, on the same seeded calibration samples,
and prints each block's output error (mean squared error against the float block on all
calibration batches) at the start (the init method's codes) and after learning, with the
seconds learning took. Single-threaded (``--threads``) so that it can share the machine.
Writes bench/results/signround_blocks.json (rows appended per config run).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from lowbit import CalibrationConfig, QuantSpec, SignRoundConfig, load_model, quantize_model  # noqa: E402

DEFAULT_CONFIGS = [
    {"init": "gptq", "optimizer": "adam", "lr": lr, "learn_clip": "off"} for lr in (1e-3, 3e-3, 5e-3, 1e-2)
] + [
    {"init": "gptq", "optimizer": "sign", "lr": lr, "learn_clip": "off"} for lr in (None, 5e-4)
] + [
    {"init": "gptq", "optimizer": "adam", "lr": 3e-3, "learn_clip": "on"},
    {"init": "rtn", "optimizer": "sign", "learn_clip": "on"}, {"init": "rtn", "optimizer": "sign", "learn_clip": "off"},
]
# the stored rows learned against the float block on quantised inputs (the default then); --configs can give "target": "float"
DEFAULT_CONFIGS = [{"target": "quantised", **config} for config in DEFAULT_CONFIGS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--sym", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--configs", type=json.loads, default=DEFAULT_CONFIGS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = QuantSpec(bits=args.bits, symmetric=args.sym, group_size=args.group_size)
    calibration = CalibrationConfig(samples=args.samples, ctx=args.ctx, batch_size=args.batch)
    skip = ("lm_head", rf"layers\.(?!({'|'.join(str(i) for i in range(args.blocks))})\.)")
    out = Path(__file__).parent / "results" / "signround_blocks.json"
    rows = json.loads(out.read_text()) if out.exists() else []
    for config in args.configs:
        loaded = load_model(args.model)
        start = time.perf_counter()
        result = quantize_model(loaded, SignRoundConfig(spec=spec, skip=skip, iters=config.get("iters", args.iters),
                                                        **{k: v for k, v in config.items() if k != "iters"}),
                                calibration=calibration, progress=False)
        seconds = time.perf_counter() - start
        blocks = {r.name.rsplit(".", 2)[0]: r.info for r in result.layers}
        errors = [(info["block_error_start"], info["block_error_learned"]) for info in blocks.values()]
        row = {"model": args.model, "spec": spec.describe(), "samples": args.samples, "ctx": args.ctx, "batch": args.batch,
               "iters": config.get("iters", args.iters), **config, "seconds": seconds, "block_errors": errors}
        rows.append(row)
        print(config, " ".join(f"{a:.4g}->{b:.4g} ({(b / a - 1) * 100:+.0f}%)" for a, b in errors), f"{seconds:.0f} s", flush=True)
        out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
