"""The ``lowbit`` command: quantize, eval, info.

User errors (`LowbitError`) print one line and exit 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from lowbit.errors import LowbitError

log = logging.getLogger("lowbit")


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    from lowbit.data.corpora import CORPORA, DEFAULT_CORPUS

    text = p.add_mutually_exclusive_group()
    text.add_argument("--text", metavar="FILE", help="evaluate on this UTF-8 text file (its second half)")
    text.add_argument("--corpus", choices=sorted(CORPORA), help=f"named corpus (default {DEFAULT_CORPUS})")
    p.add_argument("--windows", type=int, default=20, help="evaluation windows (default 20)")
    p.add_argument("--ctx", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")


def build_parser() -> argparse.ArgumentParser:
    from lowbit.data.corpora import CORPORA
    from lowbit.models.registry import DEFAULT_MODEL, NAMED_MODELS
    from lowbit.modules.swap import DEFAULT_SKIP
    from lowbit.numerics.formats import CODEBOOKS
    from lowbit.numerics.spec import GRANULARITIES, RANGE_METHODS
    from lowbit.pipeline import METHODS

    parser = argparse.ArgumentParser(prog="lowbit", description="Quantise LLMs and measure what it costs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)
    model_help = f"a named model ({', '.join(NAMED_MODELS)}), a .gguf file or a checkpoint directory"

    q = sub.add_parser("quantize", help="quantise a model and save it in lowbit's format")
    q.add_argument("--model", default=DEFAULT_MODEL, help=f"{model_help} (default {DEFAULT_MODEL})")
    q.add_argument("--method", default="rtn", choices=METHODS)
    q.add_argument("--bits", type=int, help="code width, 2-8 (weight-only methods; W8A8 methods are 8-bit)")
    q.add_argument("--group-size", type=int, default=128, help="columns per group (default 128); the last group of a row may be shorter")
    q.add_argument("--granularity", default="group", choices=[g for g in GRANULARITIES if g != "token"], help="who shares a scale (default group)")
    q.add_argument("--asym", action="store_true", help="asymmetric range with a zero-point (default symmetric)")
    q.add_argument("--zero-point", default="int", choices=["int", "float"], help="with --asym: integer Z (Eq. 3.3) or float offset (Q4_1/HQQ style)")
    q.add_argument("--range", default="minmax", choices=RANGE_METHODS, help="range selection (default minmax)")
    q.add_argument("--format", default="int", choices=["int", *sorted(CODEBOOKS)], help="rtn: number format (default int; codebooks are absmax-scaled)")
    q.add_argument("--double-quant", action="store_true", help="store absmax scales in 8 bits (QLoRA double quantisation)")
    q.add_argument("--percentile", type=float, default=99.9, help="with --range percentile")
    q.add_argument("--skip", action="append", metavar="REGEX", help=f"linears to leave in float (repeatable; default {' '.join(DEFAULT_SKIP)})")
    q.add_argument("--head-bits", type=int, choices=[4, 8], help="also round the output head (lm_head) to nearest: 8 = int8 per output channel, "
                   "4 = int4 groups of 128, both symmetric (default: the head stays float)")
    q.add_argument("--out", required=True, help="new directory to write")
    calib = q.add_argument_group("calibration (gptq)")
    calib_text = calib.add_mutually_exclusive_group()
    calib_text.add_argument("--calib-corpus", metavar="NAME", help="named corpus for calibration samples (default pydoc; its first half)")
    calib_text.add_argument("--calib-text", metavar="FILE", help="UTF-8 text file for calibration samples (its first half)")
    calib.add_argument("--calib-samples", type=int, default=128, help="calibration samples (default 128)")
    calib.add_argument("--calib-ctx", type=int, default=512, help="tokens per calibration sample (default 512)")
    calib.add_argument("--calib-batch", type=int, default=8, help="samples per forward pass (default 8)")
    calib.add_argument("--seed", type=int, default=0, help="seed for the calibration sample offsets")
    calib.add_argument("--true-sequential", action="store_true", help="collect each linear group's inputs after the earlier groups of its block are quantised (slower)")
    gptq = q.add_argument_group("gptq")
    gptq.add_argument("--act-order", action="store_true", help="quantise columns by descending diag(H)")
    gptq.add_argument("--static-groups", action="store_true", help="with --act-order: fix group scales in column order first (no g_idx)")
    gptq.add_argument("--damp", type=float, default=0.01, help="dampening, fraction of mean diag(H) (default 0.01)")
    gptq.add_argument("--block-size", type=int, help="gptq: columns per lazy-update block (default 128); nf4/fp4: weights per absmax block (default 64)")
    awq = q.add_argument_group("awq")
    awq.add_argument("--awq-grid", type=int, default=20, help="alpha values tried for the AWQ scales (default 20)")
    awq.add_argument("--no-clip", action="store_true", help="skip AWQ's weight-clipping search")
    act = q.add_argument_group("w8a8, smoothquant, llm-int8")
    act.add_argument("--act-granularity", default="token", choices=["token", "tensor"], help="int8 activations: per-token dynamic (default) or per-tensor static (calibrated)")
    act.add_argument("--alpha", default="0.5", help="SmoothQuant migration strength in [0, 1], or 'search' (per group, by W8A8 output error)")
    act.add_argument("--alpha-grid", type=int, default=20, help="with --alpha search: grid steps over [0, 1] (default 20)")
    act.add_argument("--threshold", type=float, default=6.0, help="LLM.int8() outlier magnitude (default 6.0)")
    q.add_argument("--eval", action="store_true", help="then evaluate against the source model and print the before/after table")
    _add_eval_args(q)

    e = sub.add_parser("eval", help="perplexity, KLD and top-1 agreement of a model")
    e.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"{model_help} (default {DEFAULT_MODEL})")
    e.add_argument("--reference", help="model to compare with (default: a quantised directory's source; none for a float model)")
    _add_eval_args(e)

    f = sub.add_parser("finetune", help="QLoRA (NF4 base + LoRA adapters) or QAT (straight-through estimator) fine-tuning")
    f.add_argument("--model", default=DEFAULT_MODEL, help=f"{model_help} (default {DEFAULT_MODEL})")
    f.add_argument("--method", required=True, choices=["qlora", "qat"])
    f_text = f.add_mutually_exclusive_group()
    f_text.add_argument("--corpus", choices=sorted(CORPORA), help="training text (its first half; held-out windows from the second)")
    f_text.add_argument("--text", metavar="FILE", help="UTF-8 training text file")
    f.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    f.add_argument("--lr", type=float, help="learning rate (default 2e-4 qlora, 2e-5 qat)")
    f.add_argument("--batch", type=int, default=4, help="windows per step (default 4)")
    f.add_argument("--ctx", type=int, default=256, help="tokens per window (default 256)")
    f.add_argument("--eval-windows", type=int, default=16, help="held-out windows for perplexity (default 16)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--out", required=True, help="qlora: directory for the adapters; qat: the quantised checkpoint")
    f.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    fl = f.add_argument_group("qlora")
    fl.add_argument("--rank", type=int, default=8)
    fl.add_argument("--lora-alpha", type=float, default=16.0)
    fl.add_argument("--lora-dropout", type=float, default=0.05)
    fl.add_argument("--targets", nargs="+", help="regexes of the linears to adapt (default: every attention and MLP projection)")
    fl.add_argument("--block-size", type=int, default=64, help="NF4 absmax block (default 64)")
    fl.add_argument("--no-double-quant", action="store_true", help="keep the NF4 block scales in float32")
    fl.add_argument("--merge-out", help="also write the merged float model (W + BA) to this directory")
    fq = f.add_argument_group("qat")
    fq.add_argument("--bits", type=int, default=4)
    fq.add_argument("--group-size", type=int, default=128)
    fq.add_argument("--lsq", action="store_true", help="learn the step sizes (LSQ)")

    g = sub.add_parser("generate", help="greedy generation with lowbit's decode loop, printing the text and tokens/s")
    g.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"{model_help} (default {DEFAULT_MODEL})")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--kv-bits", type=int, choices=[2, 4, 8], help="quantise the KV cache (keys per channel, values per token)")
    g.add_argument("--kv-group", type=int, default=32, help="KV group: tokens per key group, channels per value group (default 32)")
    g.add_argument("--kv-residual", type=int, default=128, help="newest tokens kept in full precision (default 128)")
    g.add_argument("--no-kernels", action="store_true", help="run quantised layers on the reference path")
    g.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cuda: fp16 on the GPU, quantised layers on the Triton kernels, decode steps replayed as a CUDA graph")

    r = sub.add_parser("roofline", help="predicted (and with --measure, measured) decode tokens/s and prefill time per weight format")
    r.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"{model_help}, or llama-1b for a random 1.1B Llama (default {DEFAULT_MODEL})")
    r.add_argument("--bandwidth", type=float, help="memory bandwidth, GB/s")
    r.add_argument("--flops", type=float, help="peak compute, TFLOP/s")
    r.add_argument("--measure", action="store_true", help="measure this machine, run the decode loop for each format, and compare")
    r.add_argument("--ctx", type=int, default=512, help="prompt length for prefill; decode is priced at this context (default 512)")
    r.add_argument("--new-tokens", type=int, default=32, help="with --measure: tokens generated per format (default 32)")
    r.add_argument("--rounds", type=int, default=3, help="with --measure: interleaved rounds over the formats, median reported (default 3)")
    r.add_argument("--kv-bits", type=float, default=32.0, help="KV-cache bits per element for the prediction (default 32, float32)")
    r.add_argument("--out", help="write the chart (PNG) here, and a JSON beside it")

    bd = sub.add_parser("bench-decode", help="decode speed table (float32, bf16, W8, W4, W4A8, int8-head variants) with the roofline prediction beside each")
    bd.add_argument("--models", nargs="+", default=[DEFAULT_MODEL, "llama-1b"], help="models (llama-1b: random 1.1B Llama)")
    bd.add_argument("--ctx", type=int, default=64, help="prompt tokens (default 64)")
    bd.add_argument("--new-tokens", type=int, default=32)
    bd.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the formats, median reported (default 3)")
    bd.add_argument("--out-dir", help="write a PNG chart and JSON per model here")

    o = sub.add_parser("outliers", help="activation outlier analysis of every linear's input (table, PNG plots, JSON)")
    o.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"{model_help} (default {DEFAULT_MODEL})")
    o_text = o.add_mutually_exclusive_group()
    o_text.add_argument("--calib-corpus", metavar="NAME", help="named corpus (default pydoc; its first half)")
    o_text.add_argument("--calib-text", metavar="FILE", help="UTF-8 text file (its first half)")
    o.add_argument("--samples", type=int, default=32, help="samples (default 32)")
    o.add_argument("--ctx", type=int, default=512, help="tokens per sample (default 512)")
    o.add_argument("--threshold", type=float, default=6.0, help="outlier magnitude (default 6.0, as LLM.int8())")
    o.add_argument("--out", help="directory for the PNG plots and outliers.json")

    i = sub.add_parser("info", help="what a checkpoint holds: layers, specs, sizes")
    i.add_argument("path", help="a lowbit directory, a Hugging Face directory or a .gguf file")
    return parser


def _spec_from_args(args):
    from lowbit.numerics.spec import QuantSpec
    from lowbit.pipeline import CODEBOOK_METHODS, INT8_METHODS

    if args.method in CODEBOOK_METHODS:
        if args.bits not in (None, 4):
            raise LowbitError(f"{args.method} is a 4-bit format; drop --bits or pass --bits 4")
        block = args.block_size or 64
        # float32 absmax per block, as bitsandbytes stores it, unless double-quantised
        return QuantSpec(bits=4, format=args.method, group_size=block, double_quant=args.double_quant, scale_dtype="float32")
    if args.method in INT8_METHODS:
        if args.bits not in (None, 8):
            raise LowbitError(f"{args.method} uses 8-bit weights and activations; drop --bits or pass --bits 8")
        return QuantSpec(bits=8, granularity="channel", group_size=None)
    if args.bits is None:
        raise LowbitError(f"--bits is required for --method {args.method}; e.g. --bits 4")
    if args.format != "int" and args.method != "rtn":
        raise LowbitError(f"--format {args.format} applies to --method rtn (or use --method nf4 / fp4)")
    return QuantSpec(
        format=args.format,
        double_quant=args.double_quant,
        bits=args.bits,
        symmetric=not args.asym,
        granularity=args.granularity,
        group_size=args.group_size if args.granularity == "group" else None,
        zero_point=args.zero_point,
        range=args.range,
        percentile=args.percentile,
    )


def _run_eval(model_ref: str, reference_ref: str | None, args, preloaded=None) -> int:
    from lowbit.data.corpora import eval_windows, tokenize_split
    from lowbit.evaluation import evaluate, results_table, write_json
    from lowbit.models.loading import load_model

    loaded = preloaded or load_model(model_ref)
    if reference_ref is None and loaded.is_quantized:
        reference_ref = loaded.header["source"]
    reference = load_model(reference_ref) if reference_ref else None
    split = tokenize_split(loaded.tokenizer, args.corpus, args.text)
    windows = eval_windows(split, args.ctx, args.windows)
    models = {}
    if reference is not None:
        models[f"{Path(reference_ref).name} (reference)"] = reference.model
    label = Path(model_ref).name if loaded.is_quantized else model_ref
    models[label] = loaded.model
    print(f"evaluating on {split.label}: {len(windows)} windows of {args.ctx} tokens{' (BOS first)' if split.bos_id is not None else ''}", file=sys.stderr)
    results = evaluate(models, windows, reference=None if reference is None else reference.model)
    print(results_table(results, baseline=next(iter(models)) if reference is not None else None))
    if args.json:
        main_result = results[-1].to_dict()
        payload = {
            **main_result,
            "model": model_ref,
            "reference": reference_ref,
            "corpus": split.label,
            "ctx": args.ctx,
            "windows": len(windows),
            "method": loaded.header["method"] if loaded.is_quantized else None,
            "results": [r.to_dict() for r in results],
        }
        write_json(args.json, payload)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def cmd_quantize(args) -> int:
    from lowbit.checkpoint import prepare_output_dir, save_quantized
    from lowbit.models.loading import load_model
    from lowbit.modules.swap import DEFAULT_SKIP
    from lowbit.calibration.methods import AWQOptions, GPTQOptions, W8A8Options
    from lowbit.pipeline import HEAD_SPECS, CalibrationConfig, quantize_model, summarize_layers

    spec = _spec_from_args(args)
    out = Path(args.out)
    if out.exists():  # fail before the slow part; save_quantized checks again
        prepare_output_dir(out)
    calibration = CalibrationConfig(
        corpus=args.calib_corpus, text_file=args.calib_text, samples=args.calib_samples,
        ctx=args.calib_ctx, seed=args.seed, batch_size=args.calib_batch, true_sequential=args.true_sequential,
    )
    options = GPTQOptions(block_size=args.block_size or 128, damp=args.damp, act_order=args.act_order, static_groups=args.static_groups)
    if args.alpha == "search":
        alpha = None
    else:
        try:
            alpha = float(args.alpha)
        except ValueError:
            raise LowbitError(f"--alpha {args.alpha!r} is neither a number in [0, 1] nor 'search'") from None
        if not 0.0 <= alpha <= 1.0:
            raise LowbitError(f"--alpha {alpha} is outside [0, 1]")
    w8a8 = W8A8Options(act_granularity=args.act_granularity, alpha=alpha, alpha_grid=args.alpha_grid)
    awq = AWQOptions(grid=args.awq_grid, clip=not args.no_clip)
    loaded = load_model(args.model)
    head_spec = None if args.head_bits is None else HEAD_SPECS[args.head_bits]
    result = quantize_model(loaded, spec, method=args.method, skip=args.skip or DEFAULT_SKIP, calibration=calibration,
                            gptq=options, awq=awq, w8a8=w8a8, threshold=args.threshold, head_spec=head_spec)
    save_quantized(loaded, out)
    what = spec.describe() if "spec" in result.method else ", ".join(f"{k}={v}" for k, v in result.method["options"].items())
    print(f"quantised {len(result.layers)} linears of {args.model} with {args.method} ({what}) in {result.seconds:.1f} s -> {out}")
    print(summarize_layers(result.layers))
    if args.eval:
        return _run_eval(str(out), None, args)
    return 0


def cmd_eval(args) -> int:
    return _run_eval(args.model, args.reference, args)


def cmd_finetune(args) -> int:
    from lowbit.evaluation import write_json
    from lowbit.numerics.spec import QuantSpec
    from lowbit.training.finetune import qat_finetune, qlora_finetune
    from lowbit.training.lora import LoRAConfig
    from lowbit.training.trainer import TrainConfig

    lr = args.lr or (2e-4 if args.method == "qlora" else 2e-5)
    config = TrainConfig(steps=args.steps, lr=lr, batch_size=args.batch, ctx=args.ctx, seed=args.seed)
    if args.method == "qlora":
        lora = LoRAConfig(rank=args.rank, alpha=args.lora_alpha, dropout=args.lora_dropout, **({"targets": tuple(args.targets)} if args.targets else {}))
        report = qlora_finetune(args.model, args.out, lora, config, block_size=args.block_size, double_quant=not args.no_double_quant,
                                corpus=args.corpus, text_file=args.text, eval_n=args.eval_windows, merged_out=args.merge_out)
        label = f"NF4 base ({report.extra['spec']})"
    else:
        spec = QuantSpec(bits=args.bits, group_size=args.group_size)
        report = qat_finetune(args.model, args.out, spec, config, lsq=args.lsq, corpus=args.corpus, text_file=args.text, eval_n=args.eval_windows)
        label = f"RTN PTQ ({report.extra['spec']})"
    print(f"held-out perplexity over {report.eval_tokens} tokens:")
    print(f"  float model          {report.float_perplexity:9.3f}")
    print(f"  {label:<20} {report.before_perplexity:9.3f}")
    print(f"  after {args.method:<14} {report.after_perplexity:9.3f}   ({args.steps} steps, {report.seconds:.0f} s, "
          f"loss {report.losses[0]:.3f} -> {sum(report.losses[-10:]) / len(report.losses[-10:]):.3f}, "
          f"{report.trainable_parameters} trainable parameters, optimizer state {report.optimizer_state_bytes / 1e6:.1f} MB)")
    print(f"wrote {args.out}")
    if args.json:
        write_json(args.json, report.to_dict())
    return 0


def cmd_generate(args) -> int:
    import torch

    from lowbit.inference.generate import generate
    from lowbit.inference.kv_cache import KVSpec
    from lowbit.models.loading import load_model

    if args.device == "cuda" and not torch.cuda.is_available():
        raise LowbitError("--device cuda: this machine has no CUDA GPU (or torch is a CPU build); use --device cpu")
    loaded = load_model(args.model)
    if args.device == "cuda":
        loaded.model.to(device="cuda", dtype=torch.float16)  # packed codes stay uint8; scales become fp16
        if loaded.is_quantized and not args.no_kernels:
            from lowbit.kernels.triton_gemm import use_triton_kernels

            use_triton_kernels(loaded.model)
    elif loaded.is_quantized and not args.no_kernels:
        from lowbit.kernels.cpu import use_cpu_kernels

        use_cpu_kernels(loaded.model)
    kv = None if args.kv_bits is None else KVSpec(bits=args.kv_bits, group_size=args.kv_group, residual=args.kv_residual)
    ids = loaded.tokenizer(args.prompt, return_tensors="pt").input_ids
    result = generate(loaded.model, ids, args.max_new_tokens, kv=kv, eos_token_id=loaded.tokenizer.eos_token_id)
    print(args.prompt + loaded.tokenizer.decode(result.tokens, skip_special_tokens=True))
    print(f"\n{result.prompt_tokens} prompt tokens in {result.prefill_seconds:.2f} s; {len(result.tokens)} new tokens, "
          f"decode {result.decode_tokens_per_second:.1f} tokens/s ({result.mode}); KV cache {result.cache_bytes / 1e6:.2f} MB"
          f"{'' if kv is None else f' ({args.kv_bits}-bit)'}", file=sys.stderr)
    return 0


def cmd_roofline(args) -> int:
    from lowbit.analysis.roofline import Machine, measure_machine
    from lowbit.analysis.roofline_report import predicted_rows, roofline_table, write_chart
    from lowbit.evaluation import write_json
    from lowbit.inference.speed import measure_variants, random_llama
    from lowbit.models.loading import load_model

    model = random_llama() if args.model == "llama-1b" else load_model(args.model).model
    if args.measure:
        machine = measure_machine()
    elif args.bandwidth and args.flops:
        machine = Machine(bandwidth_gbps=args.bandwidth, peak_gflops=args.flops * 1000)
    else:
        raise LowbitError("give --bandwidth GBps and --flops TFLOPs, or --measure to measure this machine")
    print(f"machine: {machine.bandwidth_gbps:.1f} GB/s, {machine.peak_gflops:.0f} GFLOP/s (ridge {machine.ridge:.1f} FLOP/byte)")
    if args.measure and args.rounds < 1:
        raise LowbitError(f"--rounds {args.rounds}: give at least 1")
    rows = measure_variants(model, machine, args.ctx, args.new_tokens, rounds=args.rounds) if args.measure else predicted_rows(model, machine, args.ctx, args.kv_bits)
    print(roofline_table(rows))
    if args.out:
        write_chart(rows, machine, model, args.ctx, args.out)
        write_json(Path(args.out).with_suffix(".json"), {"model": args.model, "machine": vars(machine), "ctx": args.ctx, "rows": [r.to_dict() for r in rows]})
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def cmd_bench_decode(args) -> int:
    for model in args.models:
        print(f"\n== {model} ==")
        out = None if not args.out_dir else str(Path(args.out_dir) / f"roofline_{model}.png")
        ns = argparse.Namespace(model=model, bandwidth=None, flops=None, measure=True, ctx=args.ctx, new_tokens=args.new_tokens, rounds=args.rounds,
                                kv_bits=32.0, out=out)
        cmd_roofline(ns)
    return 0


def cmd_outliers(args) -> int:
    from lowbit.analysis.outliers import analyse_outliers, summary_table, write_plots
    from lowbit.evaluation import write_json
    from lowbit.models.loading import load_model
    from lowbit.pipeline import CalibrationConfig

    loaded = load_model(args.model)
    if loaded.is_quantized:
        raise LowbitError("outlier analysis needs a float model; give the source model, not a quantised directory")
    samples = CalibrationConfig(corpus=args.calib_corpus, text_file=args.calib_text, samples=args.samples, ctx=args.ctx).tokens(loaded.tokenizer)
    report = analyse_outliers(loaded, samples, threshold=args.threshold)
    print(summary_table(report))
    if args.out:
        for path in write_plots(report, args.out):
            print(f"wrote {path}", file=sys.stderr)
        write_json(Path(args.out) / "outliers.json", report.to_dict())
        print(f"wrote {Path(args.out) / 'outliers.json'}", file=sys.stderr)
    return 0


def cmd_info(args) -> int:
    from lowbit.info import describe_path

    print(describe_path(args.path))
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="lowbit: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    commands = {"quantize": cmd_quantize, "eval": cmd_eval, "finetune": cmd_finetune, "outliers": cmd_outliers,
                "generate": cmd_generate, "roofline": cmd_roofline, "bench-decode": cmd_bench_decode, "info": cmd_info}
    start = time.perf_counter()
    try:
        code = commands[args.command](args)
    except LowbitError as err:
        print(f"lowbit: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lowbit: interrupted", file=sys.stderr)
        return 130
    log.info("%s took %.1f s", args.command, time.perf_counter() - start)
    return code


if __name__ == "__main__":
    sys.exit(main())
