"""The ternary experiment (BitNet b1.58): a small decoder trained from scratch with ternary
weights and 8-bit activations (STE), next to the same decoder trained in float, and next to
that float model quantised to ternary afterwards (PTQ).

    python bench/bitnet.py [--steps 800] [--hidden 192] [--layers 4] [--batch 16] [--ctx 128]

Byte-level Llama-architecture decoder (vocabulary of 256 bytes, so the parameters sit in
the blocks), Shakespeare's plays: the first half trains, held-out windows of the second
half score. Both models start from the same initial weights and see the same batches with
the same optimiser and schedule; lm_head and embeddings stay float in all three (as in
BitNet). Reports perplexity per byte and bits per byte. Writes bench/results/bitnet.json.
"""

from __future__ import annotations

import argparse
import copy
import math
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lowbit.data.texts import load_text
from lowbit.evaluation import write_json
from lowbit.training.bitnet import ternary_share, to_bitlinear
from lowbit.training.trainer import TrainConfig, perplexity, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--hidden", type=int, default=192)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--ctx", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()

    _, text = load_text("shakespeare")
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    cut = len(data) // 2
    train_bytes, held_out = data[:cut], data[cut:]
    eval_len = 256
    windows = held_out[: args.eval_windows * eval_len].reshape(args.eval_windows, eval_len)

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=args.hidden, intermediate_size=int(args.hidden * 8 / 3) // 8 * 8,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=None, eos_token_id=None)
    float_model = LlamaForCausalLM(config)
    ternary_model = copy.deepcopy(float_model)
    to_bitlinear(ternary_model)
    params = sum(p.numel() for p in float_model.parameters())
    block_params = sum(p.numel() for n, p in float_model.named_parameters() if ".layers." in n)
    schedule = TrainConfig(steps=args.steps, lr=args.lr, weight_decay=0.01, batch_size=args.batch, ctx=args.ctx, seed=0)

    runs = {}
    for label, model in (("float", float_model), ("ternary QAT (BitNet b1.58)", ternary_model)):
        result = train(model, train_bytes, schedule, desc=label)
        runs[label] = {"perplexity": perplexity(model, windows), "seconds": result.seconds, "final_loss": sum(result.losses[-20:]) / 20,
                       "losses": result.losses}
    ptq = copy.deepcopy(float_model)
    to_bitlinear(ptq)
    runs["ternary PTQ of the float model"] = {"perplexity": perplexity(ptq, windows), "seconds": 0.0}
    runs["ternary QAT (BitNet b1.58)"]["weight_share"] = ternary_share(ternary_model)
    runs["ternary PTQ of the float model"]["weight_share"] = ternary_share(ptq)
    for row in runs.values():
        row["bits_per_byte"] = math.log2(row["perplexity"])
    payload = {"parameters": params, "block_parameters": block_params, "config": config.to_dict(), "train": vars(args),
               "eval_bytes": windows[:, 1:].numel(), "runs": runs}
    write_json(Path(args.out) / "bitnet.json", payload)
    print(f"{params / 1e6:.2f} M parameters ({block_params / 1e6:.2f} M in the blocks), {args.steps} steps x {args.batch} x {args.ctx} bytes\n")
    print("| model | perplexity / byte | bits / byte | train s |\n|---|---:|---:|---:|")
    for label, row in runs.items():
        print(f"| {label} | {row['perplexity']:.3f} | {row['bits_per_byte']:.3f} | {row['seconds']:.0f} |")


if __name__ == "__main__":
    main()
