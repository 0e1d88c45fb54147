"""The ``lowbit`` command.

Argument parsing imports nothing heavy (no torch, no transformers): the flags of every
method, calibration and training setting come from their declarations (`lowbit.settings`,
`lowbit.methods`), so ``lowbit --help`` answers at once. Each command then checks, in this
order and before any slow work: its arguments, its output locations, its input files and
the model's structure and shapes (`lowbit.loader.open_skeleton`); only then does it load
weights. User errors (`LowbitError`, bad flags) print one line and exit 2; an interrupt
prints one line and exits 130; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import signal
import sys
import threading
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError, one_line
from lowbit.settings import TAKES_VALUE, build, options, shown_default

log = logging.getLogger("lowbit")

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
DEFAULT_PROMPT = "The capital of France is"
SAMPLE_TOKENS = 24


class UsageError(Exception):
    """A flag the parser rejects (printed as one line, exit 2)."""


class Parser(argparse.ArgumentParser):
    """argparse, with every error on one line: the flag, what it accepts, where to look."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


class Switch(argparse.Action):
    """``--flag`` / ``--no-flag`` for a boolean setting: ``--flag`` stores ``const``."""

    def __init__(self, option_strings, dest, const=True, **kwargs):
        super().__init__(option_strings, dest, nargs=0, const=const, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, not self.const if option_string.startswith("--no-") else self.const)


def _value_type(option) -> Any:
    """The argparse ``type`` of a setting: its own parser or its field's type (``int | None``
    parses as int), failing with one line that says what the flag accepts."""
    parse = option.flag.parse
    if parse is None:
        kinds = (option.type,) if isinstance(option.type, type) else typing.get_args(option.type)
        parse = next((kind for kind in kinds if kind in (int, float)), str)
    accepts = option.flag.accepts or {int: "an integer", float: "a number"}.get(parse, "a value")

    def convert(text: str):
        try:
            return parse(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"{text!r} is not {accepts}") from None

    convert.__name__ = option.name
    return convert


def number(kind: type, low: float | None = None, low_open: bool = False, what: str | None = None):
    """An argparse type for a plain flag: ``kind`` at least ``low`` (or above it)."""
    if what is None:
        if low is None:
            what = "an integer" if kind is int else "a number"
        elif kind is int:
            what = "a positive integer" if (low, low_open) in ((1, False), (0, True)) else f"an integer of at least {low}"
        else:
            what = f"a number above {low}" if low_open else f"a number of at least {low}"

    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if low is not None and (value < low or (low_open and value == low)) or value != value:
            raise argparse.ArgumentTypeError(f"{text} is not {what}")
        return value

    return convert


def memory_size(text: str) -> int:
    """An argparse type: a size in bytes from ``8GB``, ``900MB``, ``1.5G`` (powers of 1000)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)B?\s*", text, re.IGNORECASE)
    if not match or float(match[1]) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a memory size; give e.g. 8GB or 900MB")
    return int(float(match[1]) * 1000 ** " KMGT".index((match[2] or " ").upper()))


# ---------------------------------------------------------------------------------------
# flags derived from settings declarations


@dataclass
class FlagUse:
    """Who uses one flag: (settings class, option) pairs, and the argparse dest."""

    dest: str
    uses: list


def _applies(cls, option) -> bool:
    return option.path[0] != "spec" or option.path[1] in cls.spec_fields


def _defaults_text(uses) -> str:
    """" (default X)", or the default of each method where they differ; nothing when the
    default is "not set" (the help text then says what happens)."""
    by_default: dict[str, list[str]] = {}
    for cls, option in uses:
        by_default.setdefault(shown_default(option), []).append(getattr(cls, "name", ""))
    if list(by_default) == [None]:
        return ""
    if len(by_default) == 1:
        return f" (default {next(iter(by_default))})"
    return " (default " + "; ".join(f"{', '.join(names)}: {value}" for value, names in by_default.items()) + ")"


def add_setting_flags(parser: argparse.ArgumentParser, classes: list, titled: bool = True, only: tuple[str, ...] | None = None,
                      defaults: dict[str, Any] | None = None, exclude: tuple[str, ...] = ()) -> dict[str, FlagUse]:
    """Add a flag for every setting of ``classes`` (config classes), once per flag name
    (``only``: just these top-level fields; ``exclude``: none whose path holds one of these
    field names, settings a command does not use); flags used by the same set of classes share a
    --help group named after them. Every flag defaults to "not given", so that what a user
    set can be told from what they did not, except those in ``defaults`` (field name ->
    value), a command's own default for a setting it shares."""
    flags: dict[str, FlagUse] = {}
    order: list[tuple[str, object]] = []
    for cls in classes:
        for option in options(cls):
            if not _applies(cls, option) or (only is not None and option.path[0] not in only) or set(option.path) & set(exclude):
                continue
            use = flags.get(option.name)
            if use is None:
                flags[option.name] = use = FlagUse(option.dest, [])
                order.append((option.name, option))
            elif use.uses[0][1].flag.help != option.flag.help:
                raise TypeError(f"flag {option.name} means two things ({use.uses[0][0].__name__}, {cls.__name__})")
            use.uses.append((cls, option))
    groups: dict[tuple, argparse._ArgumentGroup] = {}
    defaults = defaults or {}
    for name, option in order:
        use = flags[name]
        if option.path[0] in defaults:
            use.uses = [(cls, dataclasses.replace(o, default=defaults[option.path[0]])) for cls, o in use.uses]
        users = tuple(getattr(cls, "name", cls.__name__) for cls, _ in use.uses)
        if titled:
            title = "options of " + ", ".join(users) if len(users) < len(classes) else "options of every method"
            group = groups.get(users) or groups.setdefault(users, parser.add_argument_group(title))
        else:
            group = parser
        meta = option.flag
        help_text = f"{meta.help}{_defaults_text(use.uses)}".replace("%", "%%")
        if meta.switch is not TAKES_VALUE:
            negative = "--no-" + name[2:]
            group.add_argument(name, negative, dest=use.dest, action=Switch, const=meta.switch, default=defaults.get(option.path[0], argparse.SUPPRESS),
                               help=help_text)
        else:
            group.add_argument(name, dest=use.dest, type=_value_type(option), choices=meta.choices, default=defaults.get(option.path[0], argparse.SUPPRESS),
                               action="append" if meta.repeat else "store", metavar=meta.metavar, help=help_text)
    return flags


def given_flags(args: argparse.Namespace, flags: dict[str, FlagUse]) -> dict[str, Any]:
    """Flag name -> value for every flag of ``flags`` the user gave."""
    return {name: getattr(args, use.dest) for name, use in flags.items() if hasattr(args, use.dest)}


def build_from_flags(cls, given: dict[str, Any], flags: dict[str, FlagUse], for_what: str):
    """An instance of ``cls`` from the given flags that belong to it; a given flag that
    does not is an error naming ``for_what`` (e.g. "--method rtn")."""
    values = {}
    for name, value in given.items():
        match = next((option for owner, option in flags[name].uses if owner is cls), None)
        if match is None:  # a spec field the method fixes: its config says why it refuses it
            match = next((option for option in options(cls) if option.name == name), None)
        if match is None:
            owners = ", ".join(getattr(c, "name", c.__name__) for c, _ in flags[name].uses)
            raise LowbitError(f"{name} does not apply to {for_what} (it is an option of {owners}); drop it")
        if match.flag.repeat:
            value = tuple(value)
        if match.flag.convert is not None:
            value = match.flag.convert(value)
        values[match.path] = value
    return build(cls, values)


# ---------------------------------------------------------------------------------------
# the parser


# the evaluation flags and their defaults (`quantize --eval` also prints text for DEFAULT_PROMPT)
EVAL_DEFAULTS = {"text": None, "corpus": None, "windows": 20, "ctx": 512, "json": None, "prompt": None, "no_reference_cache": False}


def _add_eval_args(p: argparse.ArgumentParser, suppress: bool = False) -> None:
    """The evaluation flags; with ``suppress`` they default to "not given" (quantize's, which
    apply only with --eval)."""
    from lowbit.data.texts import CORPORA, DEFAULT_CORPUS

    default = (lambda key: argparse.SUPPRESS) if suppress else EVAL_DEFAULTS.get
    text = p.add_mutually_exclusive_group()
    text.add_argument("--text", metavar="FILE", default=default("text"), help="evaluate on this UTF-8 text file (its second half)")
    text.add_argument("--corpus", choices=sorted(CORPORA), default=default("corpus"), help=f"named corpus (default {DEFAULT_CORPUS})")
    p.add_argument("--windows", type=number(int, 1), default=default("windows"), help=f"evaluation windows (default {EVAL_DEFAULTS['windows']})")
    p.add_argument("--ctx", type=number(int, 2), default=default("ctx"), help=f"tokens per window (default {EVAL_DEFAULTS['ctx']})")
    p.add_argument("--json", metavar="FILE", default=default("json"), help="also write the results as JSON")
    p.add_argument("--no-reference-cache", action="store_true", default=default("no_reference_cache"),
                   help="run the reference model again instead of reusing its stored hidden states on the same windows "
                   "(kept in the lowbit cache's eval-reference/; the scores are the same either way)")
    p.add_argument("--prompt", default=default("prompt"), help="also print each model's greedy continuation of this prompt "
                   + (f"(default with --eval: {DEFAULT_PROMPT!r})" if suppress else "(default: none)"))


def _add_memory_args(group, low_memory_help: str) -> None:
    group.add_argument("--low-memory", action="store_true", help=low_memory_help)
    group.add_argument("--max-memory", type=memory_size, metavar="SIZE",
                       help="refuse to start when the estimated peak exceeds this, e.g. 8GB or 900MB (default: the memory free now)")


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    """The parser, and the derived flags of each command that has them."""
    from lowbit.calibration.config import CalibrationConfig
    from lowbit.data.texts import CORPORA
    from lowbit.methods.registry import pruning_methods, quantize_methods, training_methods
    from lowbit.models.refs import describe_model_ref
    from lowbit.models.registry import DEFAULT_MODEL

    parser = Parser(prog="lowbit", description="Quantise LLMs and measure what it costs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    model_help = describe_model_ref()
    derived = {}

    def method_command(command: str, methods: dict, default: str, help_text: str, verb: str):
        p = sub.add_parser(command, help=help_text,
                           description=f"{verb.capitalize()} a model and save it; --eval then scores it against its source. Methods: "
                                       + "; ".join(f"{n}: {c.summary}" for n, c in methods.items()) + ". See `lowbit methods`.")
        p.add_argument("--model", default=DEFAULT_MODEL, help=f"{model_help} (default {DEFAULT_MODEL})")
        p.add_argument("--method", default=default, choices=list(methods), help=f"the method (default {default})")
        p.add_argument("--out", required=True, help="new directory to write")
        p.add_argument("--eval", action="store_true", help="then evaluate against the source model: the before/after table and generated text from both")
        _add_memory_args(p.add_argument_group("memory (models larger than RAM)"),
                         "stream the model from disk one decoder block at a time and write the checkpoint in shards as it goes "
                         "(peak: one block plus the calibration activations; --eval streams too); chosen by itself when the model "
                         "does not fit --max-memory. A killed run continues where it stopped when the same command is given again")
        _add_eval_args(p.add_argument_group("evaluation (with --eval)"), suppress=True)
        derived[command] = add_setting_flags(p, list(methods.values()))
        calibrated = [n for n, c in methods.items() if c.calibrated]
        derived[f"{command} calibration"] = add_setting_flags(p.add_argument_group(f"calibration ({', '.join(calibrated)})"),
                                                              [CalibrationConfig], titled=False)

    method_command("quantize", quantize_methods(), "rtn", "quantise a model with one of lowbit's methods and save it in lowbit's format", "quantise")
    method_command("prune", pruning_methods(), "sparsegpt", "prune a model (unstructured or N:M), stored sparse, optionally quantising what it keeps",
                   "prune")

    e = sub.add_parser("eval", help="perplexity, KLD and top-1 agreement of a model against its source",
                       description="Score a model. A lowbit checkpoint, a GGUF file in GGML types lowbit reads and a compressed-tensors "
                                   "directory run as quantised models, code for code (nothing dequantised to float first); a "
                                   "packaged model is the float reference.")
    e.add_argument("model", nargs="*", default=[DEFAULT_MODEL], help=f"{model_help} (default {DEFAULT_MODEL}); several quantised "
                   "checkpoints of one model are scored on the same windows in one pass, the reference run once for all")
    e.add_argument("--reference", help="model to compare with (default: the float source a quantised checkpoint records; none for a float "
                   "model or another tool's file)")
    _add_eval_args(e)
    _add_memory_args(e.add_argument_group("memory (models larger than RAM)"),
                     "run every window through one decoder block at a time, read from disk and released after (peak: one block "
                     "plus the windows' hidden states; quantised linears stay packed); chosen by itself when the models do not "
                     "fit --max-memory")

    trainers = training_methods()
    f = sub.add_parser("finetune", help="QLoRA (NF4 base + LoRA adapters) or QAT (straight-through estimator) fine-tuning")
    f.add_argument("--model", default=DEFAULT_MODEL, help=f"{model_help} (default {DEFAULT_MODEL})")
    f.add_argument("--method", required=True, choices=list(trainers))
    f_text = f.add_mutually_exclusive_group()
    f_text.add_argument("--corpus", choices=sorted(CORPORA), help="training text (its first half; held-out windows from the second)")
    f_text.add_argument("--text", metavar="FILE", help="UTF-8 training text file")
    f.add_argument("--eval-windows", type=number(int, 1), default=16, help="held-out windows for perplexity (default 16)")
    f.add_argument("--out", required=True, help="qlora: new directory for the adapters; qat: the quantised checkpoint")
    f.add_argument("--merge-out", help="qlora: also write the merged float model (W + BA) to this new directory")
    f.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    derived["finetune"] = add_setting_flags(f, list(trainers.values()))

    from lowbit.training.config import DistillConfig

    d = sub.add_parser("distill", help="train a shallower student (K of the teacher's blocks) on the teacher's next-token distribution",
                       description="Make a student from the teacher (its embeddings, head and K evenly spaced decoder blocks, the first "
                                   "and last kept), train it with KL to the teacher plus the next-token loss, score both on held-out "
                                   "windows and save the student as a model directory. Resumable: the same command continues a "
                                   "stopped run from OUT.partial.")
    d.add_argument("--teacher", default=DEFAULT_MODEL, help=f"{model_help} (default {DEFAULT_MODEL})")
    d_text = d.add_mutually_exclusive_group()
    d_text.add_argument("--corpus", choices=sorted(CORPORA), help="training text (its first half; held-out windows from the second)")
    d_text.add_argument("--text", metavar="FILE", help="UTF-8 training text file")
    d.add_argument("--eval-windows", type=number(int, 1), default=16, help="held-out windows for the scores (default 16)")
    d.add_argument("--out", required=True, help="new directory for the student")
    d.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    derived["distill"] = add_setting_flags(d, [DistillConfig], titled=False, exclude=("processes", "eval_every", "grad"))

    rp = sub.add_parser("report", help="measure the report's comparison tables (5.3, 7.6, 8.3, 9.3) and write them as Markdown + HTML",
                        description="Run (or reuse from the cache) every recipe of the report's tables on each model: quantisers, QAT, "
                                    "pruning, distillation, each a real lowbit process, scored against the float model and decoded "
                                    "for tokens/s; then write report.md, report.html and the plots to --out.")
    rp.add_argument("--models", nargs="+", default=[DEFAULT_MODEL], metavar="MODEL", help=f"models to measure (default {DEFAULT_MODEL})")
    rp.add_argument("--out", default="lowbit-report", help="new directory for the report (default lowbit-report)")
    rp.add_argument("--quick", action="store_true", help="a smoke run in minutes: a few recipes, tiny calibration, 2 short windows, 4 steps")
    rp.add_argument("--recipes", nargs="+", metavar="NAME", help="only these recipes (names as --list prints them)")
    rp.add_argument("--list", action="store_true", help="print the recipes and stop")
    rp.add_argument("--cache", help="where measured rows are kept and reused (default: the lowbit cache's report/)")
    rp.add_argument("--redo", action="store_true", help="measure the chosen recipes again even if cached")

    g = sub.add_parser("generate", help="greedy generation with lowbit's decode loop, printing the text and tokens/s")
    g.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"{model_help} (default {DEFAULT_MODEL})")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=number(int, 1), default=64, help="tokens to generate (default 64)")
    g.add_argument("--kv-bits", type=int, choices=[2, 4, 8], help="quantise the KV cache (keys per channel, values per token)")
    g.add_argument("--kv-group", type=number(int, 1), default=32, help="KV group: tokens per key group, channels per value group (default 32)")
    g.add_argument("--kv-residual", type=number(int, 0), default=128, help="newest tokens kept in full precision (default 128)")
    g.add_argument("--no-kernels", action="store_true", help="run quantised layers on the reference path")
    g.add_argument("--eager", action="store_true", help="decode with transformers' forward per token (the reference) instead of lowbit's "
                   "compiled one-call step, the CPU default where the model allows it")
    g.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cuda: fp16 on the GPU, quantised layers on the Triton kernels, decode steps replayed as a CUDA graph")

    r = sub.add_parser("roofline", help="predicted (and with --measure, measured) decode tokens/s and prefill time per weight format",
                       description="Without --bandwidth/--flops the machine's memory bandwidth and matmul rate are measured (a few seconds).")
    r.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"{model_help}, or llama-1b for a random 1.1B Llama (default {DEFAULT_MODEL})")
    r.add_argument("--bandwidth", type=number(float, 0, low_open=True), help="memory bandwidth, GB/s (default: measured)")
    r.add_argument("--flops", type=number(float, 0, low_open=True), help="peak compute, TFLOP/s (default: measured)")
    r.add_argument("--measure", action="store_true", help="also build each format and time lowbit's decode loop on it")
    r.add_argument("--ctx", type=number(int, 1), default=512, help="prompt length for prefill; decode is priced at this context (default 512)")
    r.add_argument("--new-tokens", type=number(int, 1), default=32, help="with --measure: tokens generated per format (default 32)")
    r.add_argument("--rounds", type=number(int, 1), default=3, help="with --measure: interleaved rounds over the formats, median reported (default 3)")
    r.add_argument("--kv-bits", type=number(float, 0, low_open=True), default=32.0, help="KV-cache bits per element for the prediction (default 32, float32)")
    r.add_argument("--out", help="write the chart (PNG) here, and a JSON beside it")

    bd = sub.add_parser("bench-decode", help="decode speed table (float32, bf16, W8, W4, W4A8, int8-head variants) with the roofline prediction beside each")
    bd.add_argument("--models", nargs="+", default=[DEFAULT_MODEL, "llama-1b"], help="models (llama-1b: random 1.1B Llama)")
    bd.add_argument("--ctx", type=number(int, 1), default=64, help="prompt tokens (default 64)")
    bd.add_argument("--new-tokens", type=number(int, 1), default=32, help="tokens generated per variant (default 32)")
    bd.add_argument("--rounds", type=number(int, 1), default=3, help="interleaved rounds over the formats, median reported (default 3)")
    bd.add_argument("--out-dir", help="write a PNG chart and JSON per model here")
    bd.add_argument("--no-llama-cpp", action="store_true",
                    help="skip the llama.cpp rows (by default a packaged model's Q4_0 and Q8_0 files also run in llama-cpp-python, "
                         "timed in the same rounds)")

    o = sub.add_parser("outliers", help="activation outlier analysis of every linear's input (table, PNG plots, JSON)")
    o.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"{model_help} (default {DEFAULT_MODEL})")
    o.add_argument("--threshold", type=number(float, 0, low_open=True), default=6.0, help="outlier magnitude (default 6.0, as LLM.int8())")
    o.add_argument("--out", help="directory for the PNG plots and outliers.json")
    derived["outliers"] = add_setting_flags(o.add_argument_group("samples"), [CalibrationConfig], titled=False,
                                            only=("corpus", "text_file", "samples", "ctx", "seed"), defaults={"samples": 32})

    i = sub.add_parser("info", help="what a checkpoint holds: method, layers, specs, sizes")
    i.add_argument("path", help="a lowbit directory, a Hugging Face directory, a .gguf file or a packaged model's name")

    from lowbit.interchange import EXPORTS

    x = sub.add_parser("export", help="write a lowbit checkpoint in another engine's format (GGUF for llama.cpp)")
    x.add_argument("checkpoint", help="a lowbit directory (lowbit quantize --out), a compressed-tensors directory (llm-compressor's) "
                                      "or a GGUF file, opened as quantised (its codes as they are)")
    x.add_argument("--to", required=True, choices=tuple(EXPORTS), help="; ".join(f"{e.name}: {e.writes} for {e.engines}" for e in EXPORTS.values()))
    x.add_argument("--out", required=True, help="the file (gguf) or directory to write; must not exist")
    x.add_argument("--requantize", action="store_true",
                   help="round layers whose format the target cannot store code for code to its nearest type (prints the added error) "
                        "instead of refusing")
    x.add_argument("--gguf-metadata", metavar="GGUF", help="--to gguf: copy architecture metadata and tokenizer from this GGUF of the same "
                                                          "model (default: the checkpoint's source GGUF; needed for another tool's checkpoint)")

    m = sub.add_parser("methods", help="every registered method: kind, calibration, formats, options and defaults")
    m.add_argument("--markdown", action="store_true", help="as the Markdown table of docs/methods.md")
    return parser, derived


# ---------------------------------------------------------------------------------------
# checks shared by the commands


def _check_text(corpus: str | None, text_file: str | None) -> None:
    """A text file must exist, be UTF-8 and hold text, and a named corpus (each of them, for
    the calibration ``mix``) must load (read now, before any loading)."""
    from lowbit.calibration.config import corpora_of
    from lowbit.data.texts import load_text

    if text_file:
        load_text(None, text_file)
    elif corpus:
        for name in corpora_of(corpus):
            load_text(name, None)


def _check_ctx(skeleton, ctx: int, flag: str) -> None:
    limit = skeleton.max_positions
    if limit is not None and ctx > limit:
        raise LowbitError(f"{flag} {ctx} is beyond {skeleton.ref}'s {limit} positions; use {flag} {limit} or less")


def _eval_split(skeleton, corpus, text_file, ctx: int, n_windows: int, windows_flag: str = "--windows"):
    """The tokenised text and its windows, checked against the model (before any weights load)."""
    from lowbit.data.corpora import eval_windows, tokenize_split

    _check_ctx(skeleton, ctx, "--ctx")
    split = tokenize_split(skeleton.tokenizer, corpus, text_file)
    return split, eval_windows(split, ctx, n_windows, windows_label=windows_flag)


def _model_skeleton(ref: str, float_only: bool = False, what: str = "--model"):
    from lowbit.loader import open_skeleton

    skeleton = open_skeleton(ref)
    if float_only and skeleton.is_quantized:
        raise LowbitError(f"{what} {ref} is already quantised; give its float source ({skeleton.header['source']})")
    return skeleton


# ---------------------------------------------------------------------------------------
# commands


def _print_samples(models: dict, tokenizer, prompt: str) -> None:
    """Each model's greedy continuation of ``prompt``, one line each."""
    from lowbit.inference.generate import generate
    from lowbit.modules.quant_linear import dequantized_once

    ids = tokenizer(prompt, return_tensors="pt").input_ids
    print(f"\ngreedy continuation of {prompt!r} ({SAMPLE_TOKENS} tokens):")
    width = max(len(label) for label in models)
    for label, model in models.items():
        with dequantized_once(model):
            result = generate(model, ids, SAMPLE_TOKENS, eos_token_id=tokenizer.eos_token_id)
        text = " ".join(tokenizer.decode(result.tokens, skip_special_tokens=True).split())
        print(f"  {label:<{width}}  {prompt}{'' if text.startswith((' ', ',', '.')) else ' '}{text}")


def _layer_summary(header: dict) -> str:
    """"210 quantised linears: 180 4-bit g32 ..., 30 ..." from a checkpoint header."""
    from collections import Counter

    from lowbit.info import layer_label

    labels = Counter(layer_label(info) for info in header["layers"].values())
    return f"{len(header['layers'])} quantised linears ({', '.join(f'{n}x {label}' for label, n in labels.most_common())})"


def _announce(skeleton, loaded) -> None:
    """Say on stderr how a GGUF or compressed-tensors reference was opened (as quantised, or
    decompressed to float by transformers), so no form is chosen silently."""
    if skeleton.stored in ("gguf", "compressed-tensors"):
        print(f"opened {skeleton.ref} as quantised ({skeleton.stored}): {_layer_summary(loaded.header)}", file=sys.stderr)
        return
    from lowbit.interchange.compressed_tensors import compressed_tensors_config

    qconfig = compressed_tensors_config(skeleton.config) if skeleton.kind == "hf" else None
    if qconfig is not None:
        print(f"{skeleton.ref} is compressed-tensors {qconfig.get('format')}: transformers decompressed it to float weights (lowbit opens "
              "pack-quantized directories as quantised)", file=sys.stderr)


def _run_eval(model_refs: list[str], reference_ref: str | None, args, prompt: str | None, split=None, quantize_info: dict | None = None,
              streamed: bool = False) -> int:
    """Check everything, then score each of ``model_refs`` (against ``reference_ref``, or the
    source their quantised checkpoints record) on the same windows and print one table (and
    the generated text with ``prompt``). The reference runs once for all of them, so scoring
    several checkpoints of one model together costs one reference pass, not one each.
    ``split``: the evaluation text already tokenised with this model's tokenizer (tokenising
    Shakespeare takes 5 s). ``streamed``: one block at a time (`_run_eval_streamed`, one
    model), as after a streamed quantisation; also chosen by --low-memory or by size."""
    from lowbit.data.corpora import eval_windows
    from lowbit.evaluation import evaluate, results_table
    from lowbit.loader import load_model, open_checkpoint
    from lowbit.models.registry import cache_dir
    from lowbit.outputs import check_output_file

    if args.json:
        check_output_file(args.json, "--json")
    _check_text(args.corpus, args.text)
    if len(set(model_refs)) < len(model_refs):
        raise LowbitError(f"lowbit eval got the same model twice ({', '.join(model_refs)}); name each once")
    skeletons = [_model_skeleton(ref) for ref in model_refs]
    skeleton = skeletons[0]
    if reference_ref is None and any(s.stored for s in skeletons):
        sources = {s.recorded_source for s in skeletons if s.stored}
        if len(sources) > 1:
            raise LowbitError(f"the models record different float sources ({', '.join(sorted(map(str, sources)))}); score them "
                              "separately, or name one reference with --reference")
        reference_ref = skeleton.recorded_source
        if reference_ref is None:
            print(f"{model_refs[0]} names no float source (another tool's file): perplexity only; give --reference MODEL for KLD and "
                  "top-1 agreement", file=sys.stderr)
    reference_skeleton = _model_skeleton(reference_ref, what="--reference") if reference_ref else None
    if split is None:
        split, windows = _eval_split(skeleton, args.corpus, args.text, args.ctx, args.windows)
    else:
        windows = eval_windows(split, args.ctx, args.windows)
    vocab = skeleton.model.get_output_embeddings().out_features
    for ref, other in [*zip(model_refs[1:], skeletons[1:]), *([(reference_ref, reference_skeleton)] if reference_skeleton else [])]:
        _check_ctx(other, args.ctx, "--ctx")
        if other.model.get_output_embeddings().out_features != vocab:
            raise LowbitError(f"{model_refs[0]} and {ref} have different vocabularies; compare models of one family")

    if _eval_streamed(args, skeletons, reference_skeleton, streamed):
        if len(model_refs) > 1:
            raise LowbitError(f"the streamed evaluation (--low-memory, or models larger than memory) scores one model at a time; run lowbit "
                              f"eval once for each of the {len(model_refs)} models")
        return _run_eval_streamed(model_refs[0], reference_ref, args, skeleton, split, windows, quantize_info)
    reference = load_model(reference_ref) if reference_ref else None
    models = {}
    if reference is not None:
        models[f"{Path(reference_ref).name} (reference)"] = reference.model
    headers = []
    for ref, model_skeleton in zip(model_refs, skeletons):
        loaded = open_checkpoint(ref)
        label = Path(ref).name if loaded.is_quantized else ref
        models[ref if label in models else label] = loaded.model  # two checkpoints named alike keep their full paths
        headers.append(loaded.header)
        _announce(model_skeleton, loaded)
    print(f"evaluating on {split.label}: {len(windows)} windows of {args.ctx} tokens{' (BOS first)' if split.bos_id is not None else ''}", file=sys.stderr)
    cache = None if getattr(args, "no_reference_cache", False) else cache_dir() / "eval-reference"
    results = evaluate(models, windows, reference=None if reference is None else reference.model, reference_cache=cache)
    print(results_table(results, baseline=next(iter(models)) if reference is not None else None))
    if prompt:
        _print_samples(models, loaded.tokenizer, prompt)
    _write_eval_json(args, model_refs, reference_ref, split, windows, headers, results, quantize_info)
    return 0


def _eval_streamed(args, skeletons, reference_skeleton, streamed: bool) -> bool:
    """Whether `lowbit eval` streams (--low-memory, a streamed quantisation before it, or
    models whose in-memory evaluation would not fit --max-memory), said on stderr when
    chosen by size."""
    from lowbit.streaming import in_memory_eval_peak
    from lowbit.system import available_memory

    if streamed or getattr(args, "low_memory", False):
        return True
    cap = getattr(args, "max_memory", None) or available_memory()
    need = in_memory_eval_peak([s.model for s in skeletons] + ([] if reference_skeleton is None else [reference_skeleton.model]))
    if need <= cap:
        return False
    print(f"evaluating in memory needs about {need / 1e9:.1f} GB, more than {cap / 1e9:.1f} GB "
          f"({'--max-memory' if getattr(args, 'max_memory', None) else 'free now'}): streaming block by block (--low-memory)", file=sys.stderr)
    return True


def _run_eval_streamed(model_ref: str, reference_ref: str | None, args, skeleton, split, windows, quantize_info: dict | None) -> int:
    """`lowbit eval --low-memory` (`lowbit.evaluation.streamed`): the estimate printed and
    held to --max-memory, then the models scored one block at a time."""
    from lowbit.evaluation import results_table
    from lowbit.evaluation.streamed import evaluate_streamed, streamed_eval_estimate
    from lowbit.loader import open_streamed
    from lowbit.system import available_memory

    if skeleton.stored == "compressed-tensors":
        raise LowbitError(f"{model_ref} is a compressed-tensors directory, which lowbit evaluates in memory only; drop --low-memory")
    loaded = open_streamed(model_ref)
    reference = open_streamed(reference_ref) if reference_ref else None
    models = {}
    if reference is not None:
        models[f"{Path(reference_ref).name} (reference)"] = reference
    models[Path(model_ref).name if skeleton.stored else model_ref] = loaded
    est = streamed_eval_estimate(list(models.values()), len(windows), windows.shape[1])
    cap = getattr(args, "max_memory", None) or available_memory()
    print(f"streamed evaluation: estimated peak memory {est['peak_mb']:.0f} MB (hidden states {est['hidden_mb']:.0f}, plus at most: "
          f"the embeddings {est['capture_mb']:.0f}, a block {est['block_mb']:.0f}, the heads and final norms {est['head_mb']:.0f})", file=sys.stderr)
    if est["peak_mb"] * 1e6 > cap:
        raise LowbitError(f"the streamed evaluation needs about {est['peak_mb']:.0f} MB, more than the {cap / 1e6:.0f} MB "
                          f"{'--max-memory allows' if getattr(args, 'max_memory', None) else 'free now'}; free memory, raise --max-memory, "
                          "or score fewer --windows")
    print(f"evaluating on {split.label}: {len(windows)} windows of {args.ctx} tokens{' (BOS first)' if split.bos_id is not None else ''}, "
          "one block at a time", file=sys.stderr)
    results = evaluate_streamed(models, windows, reference=reference)
    print(results_table(results, baseline=next(iter(models)) if reference is not None else None))
    if args.prompt:
        print(f"(no continuation of --prompt: generating token by token re-reads every block; run lowbit generate --model {model_ref}, "
              "which keeps quantised linears packed)", file=sys.stderr)
    _write_eval_json(args, [model_ref], reference_ref, split, windows, [loaded.header], results, quantize_info)
    return 0


def _write_eval_json(args, model_refs, reference_ref, split, windows, headers, results, quantize_info) -> None:
    """The --json report: the last model's scores at the top level (with one model, the
    model's), every model's (the reference's first) under "results"."""
    from lowbit.evaluation import write_json

    if args.json:
        methods = [header["method"] if header is not None else None for header in headers]
        payload = {
            **results[-1].to_dict(),
            "model": model_refs[0] if len(model_refs) == 1 else model_refs,
            "reference": reference_ref,
            "corpus": split.label,
            "ctx": args.ctx,
            "windows": len(windows),
            "method": methods[0] if len(methods) == 1 else methods,
            "results": [r.to_dict() for r in results],
            **(quantize_info or {}),
        }
        write_json(args.json, payload)
        print(f"wrote {args.json}", file=sys.stderr)


def cmd_quantize(args, derived) -> int:
    from lowbit.calibration.config import CalibrationConfig
    from lowbit.methods.registry import method_config
    from lowbit.outputs import check_new_directory, check_output_file

    cls = method_config(args.method)
    flags, calibration_flags = derived[args.command], derived[f"{args.command} calibration"]
    config = build_from_flags(cls, given_flags(args, flags), flags, f"--method {args.method}")
    calibration_given = given_flags(args, calibration_flags)
    if calibration_given and not cls.calibrated:
        raise LowbitError(f"{', '.join(calibration_given)} {'does' if len(calibration_given) == 1 else 'do'} not apply to --method {args.method} "
                          "(it uses no calibration data); drop it")
    calibration = build_from_flags(CalibrationConfig, calibration_given, calibration_flags, "calibration") if cls.calibrated else None
    eval_given = [f"--{k.replace('_', '-')}" for k in EVAL_DEFAULTS if hasattr(args, k)]
    if eval_given and not args.eval:
        raise LowbitError(f"{', '.join(eval_given)} apply with --eval; add --eval or drop them")
    for key, value in {**EVAL_DEFAULTS, "prompt": DEFAULT_PROMPT}.items():
        if not hasattr(args, key):
            setattr(args, key, value)

    out = check_new_directory(args.out, "--out")
    if args.json:
        check_output_file(args.json, "--json")
    _check_text(args.corpus, args.text)
    if calibration is not None:
        _check_text(calibration.corpus, calibration.text_file)
    skeleton = _model_skeleton(args.model, float_only=True)
    from lowbit.pipeline import describe_phases, plan_layers, quantize_model, summarize_layers

    plan_layers(skeleton.model, skeleton.arch, config, report=False)  # quantize_model reports fallbacks
    if calibration is not None:
        _check_ctx(skeleton, calibration.ctx, "--calib-ctx")
        if calibration.text_file:  # a named corpus is long enough; a file is checked now, not after loading
            calibration.tokens(skeleton.tokenizer)
    split = _eval_split(skeleton, args.corpus, args.text, args.ctx, args.windows)[0] if args.eval else None

    from lowbit.streaming import in_memory_peak, partial_directory
    from lowbit.system import available_memory

    cap = args.max_memory or available_memory()
    streamed = args.low_memory or partial_directory(out).exists()
    need = 0 if streamed else in_memory_peak(skeleton.model)
    if need > cap:
        print(f"{args.model} needs about {need / 1e9:.1f} GB in memory, more than {cap / 1e9:.1f} GB "
              f"({'--max-memory' if args.max_memory else 'free now'}): streaming it from disk block by block (--low-memory)", file=sys.stderr)
        streamed = True
    if streamed:
        result = _quantize_streamed(args, config, calibration, out, cap)
    else:
        from lowbit.checkpoint import save_quantized
        from lowbit.loader import load_model

        loaded = load_model(args.model)
        result = quantize_model(loaded, config, calibration=calibration)
        save_quantized(loaded, out)
    print(f"{'pruned' if args.command == 'prune' else 'quantised'} {len(result.layers)} linears of {args.model} with {config.describe()} "
          f"in {result.seconds:.1f} s -> {out}")
    print(summarize_layers(result.layers))
    if getattr(result, "budget", None) is not None:
        print(f"{result.budget.describe()}\n  (measured and chosen in {result.budget.seconds:.1f} s)")
    if result.phases:
        print(describe_phases(result.phases))
    if args.eval:  # the checkpoint keeps the source's tokenizer, so the text tokenised above serves
        return _run_eval([str(out)], None, args, args.prompt, split=split,
                         quantize_info={"quantize_seconds": result.seconds, "quantize_phases": result.phases}, streamed=streamed)
    return 0


def _quantize_streamed(args, config, calibration, out: Path, cap: int):
    """`lowbit quantize --low-memory`: the estimate printed and held to ``cap`` (bytes)
    before any weight is read, then the streamed run (`lowbit.streaming`)."""
    from lowbit.loader import open_streamed
    from lowbit.streaming import quantize_streamed, streamed_estimate

    loaded = open_streamed(args.model)
    est = streamed_estimate(loaded, config, calibration)
    offload = False
    if est["peak_mb"] * 1e6 > cap and est["activations_mb"] > 0:
        lighter = streamed_estimate(loaded, config, calibration, offload_activations=True)
        if lighter["peak_mb"] * 1e6 <= cap:
            print(f"the calibration activations ({est['activations_mb']:.0f} MB) do not fit beside the rest: keeping them on disk, "
                  "one batch in memory at a time", file=sys.stderr)
            est, offload = lighter, True
    print(f"streaming {args.model} ({est['model_mb']:.0f} MB of weights) block by block: estimated peak memory {est['peak_mb']:.0f} MB "
          f"(this process {est['process_mb']:.0f} MB, plus at most: embeddings for the capture {est['capture_mb']:.0f}, "
          f"a block's work {est['block_mb']:.0f}, another tensor {est['other_mb']:.0f})", file=sys.stderr)
    if est["peak_mb"] * 1e6 > cap:
        raise LowbitError(f"the streamed run needs about {est['peak_mb']:.0f} MB, more than the {cap / 1e6:.0f} MB "
                          f"{'--max-memory allows' if args.max_memory else 'free now'}; free memory, raise --max-memory, or calibrate on fewer "
                          "--calib-samples")
    result = quantize_streamed(loaded, config, out, calibration, offload_activations=offload)
    if result.resumed_units:
        print(f"continued an unfinished run: {result.resumed_units} units were already done", file=sys.stderr)
    return result


def cmd_eval(args, derived) -> int:
    return _run_eval(args.model, args.reference, args, args.prompt)


def cmd_finetune(args, derived) -> int:
    from lowbit.evaluation import write_json
    from lowbit.methods.registry import method_config
    from lowbit.outputs import check_new_directory, check_output_file

    config = build_from_flags(method_config(args.method), given_flags(args, derived["finetune"]), derived["finetune"], f"--method {args.method}")
    if args.merge_out and args.method != "qlora":
        raise LowbitError("--merge-out applies to --method qlora (QAT's output is already the quantised model); drop it")
    check_new_directory(args.out, "--out")
    if args.merge_out:
        check_new_directory(args.merge_out, "--merge-out")
    if args.json:
        check_output_file(args.json, "--json")
    _check_text(args.corpus, args.text)
    skeleton = _model_skeleton(args.model, float_only=True)
    _check_ctx(skeleton, config.train.ctx, "--ctx")
    split, _ = _eval_split(skeleton, args.corpus, args.text, config.train.ctx, args.eval_windows, windows_flag="--eval-windows")
    body = config.train.ctx - (1 if split.bos_id is not None else 0)
    if len(split.calibration) <= body:
        raise LowbitError(f"the training half of {split.label} has {len(split.calibration)} tokens, fewer than one window of "
                          f"{config.train.ctx}; use more text or a smaller --ctx")

    from lowbit.training.distributed import launch, launched_rank

    if config.train.processes > 1 and launched_rank() is None:  # checked here once; torchrun runs this command in each rank
        return launch(args.argv, config.train.processes)
    extra = {"merged_out": args.merge_out} if args.method == "qlora" else {}
    report = config.finetune(args.model, args.out, corpus=args.corpus, text_file=args.text, eval_n=args.eval_windows, **extra)
    if config.train.processes > 1 and launched_rank()[0] != 0:
        return 0  # rank 0 reports
    label = f"NF4 base ({report.extra['spec']})" if args.method == "qlora" else f"RTN PTQ ({report.extra['spec']})"
    print(f"held-out perplexity over {report.eval_tokens} tokens:")
    print(f"  float model          {report.float_perplexity:9.3f}")
    print(f"  {label:<20} {report.before_perplexity:9.3f}")
    print(f"  after {args.method:<14} {report.after_perplexity:9.3f}   ({config.train.steps} steps, {report.seconds:.0f} s, "
          f"loss {report.losses[0]:.3f} -> {sum(report.losses[-10:]) / len(report.losses[-10:]):.3f}, "
          f"{report.trainable_parameters} trainable parameters, optimizer state {report.optimizer_state_bytes / 1e6:.1f} MB)")
    if report.processes > 1:
        sent = "" if report.grad_bytes_per_step is None else f", {report.grad_bytes_per_step / 1e6:.2f} MB sent per step by each rank"
        print(f"  {report.processes} processes, gradients: {report.gradients}{sent}, {report.step_seconds:.2f} s per step")
    print(f"wrote {args.out}")
    if args.json:
        write_json(args.json, report.to_dict())
    return 0


def cmd_distill(args, derived) -> int:
    from lowbit.evaluation import write_json
    from lowbit.outputs import check_new_directory, check_output_file
    from lowbit.training.config import DistillConfig
    from lowbit.training.distill import distill

    config = build_from_flags(DistillConfig, given_flags(args, derived["distill"]), derived["distill"], "distill")
    check_new_directory(args.out, "--out")
    if args.json:
        check_output_file(args.json, "--json")
    _check_text(args.corpus, args.text)
    skeleton = _model_skeleton(args.teacher, float_only=True, what="--teacher")
    from lowbit.models.architectures import decoder_blocks
    from lowbit.training.distill import student_blocks

    n_blocks = len(decoder_blocks(skeleton.model, skeleton.arch))
    student_blocks(n_blocks, config.student_layers or -(-n_blocks // 2))  # refuses an impossible depth before any weight loads
    _check_ctx(skeleton, config.train.ctx, "--ctx")
    _eval_split(skeleton, args.corpus, args.text, config.train.ctx, args.eval_windows, windows_flag="--eval-windows")
    report = distill(args.teacher, args.out, config, corpus=args.corpus, text_file=args.text, eval_n=args.eval_windows)
    print(f"student: blocks {report.student_blocks} of the teacher's {report.teacher_blocks}, "
          f"{report.student_parameters / 1e6:.1f}M of {report.teacher_parameters / 1e6:.1f}M parameters"
          + (f" (resumed at step {report.resumed_from})" if report.resumed_from else ""))
    print(f"held-out scores over {report.eval_tokens} tokens (KLD and top-1 against the teacher):")
    for name, score in report.scores.items():
        print(f"  {name:<18} ppl {score['perplexity']:9.3f}  KLD {score['kld']:.4f}  top-1 {score['top1_percent']:5.1f}%")
    tail = report.losses[-10:]
    print(f"{config.train.steps} steps in {report.seconds:.0f} s, loss {report.losses[0]:.3f} -> {sum(tail) / len(tail):.3f}; wrote {args.out}")
    if args.json:
        write_json(args.json, report.to_dict())
    return 0


def cmd_report(args, derived) -> int:
    from lowbit.models.registry import cache_dir
    from lowbit.outputs import check_new_directory, new_directory
    from lowbit.reports.compression import FULL, QUICK, QUICK_RECIPES, RECIPES, ModelSize, estimate_seconds, run_report
    from lowbit.reports.tables import markdown, plots, to_html

    if args.list:
        for recipe in RECIPES:
            print(f"{recipe.key:<26} {recipe.family:<22} {recipe.summary}")
        return 0
    known = {r.key: r for r in RECIPES}
    unknown = [name for name in args.recipes or () if name not in known]
    if unknown:
        raise LowbitError(f"--recipes: {', '.join(unknown)} unknown; --list prints the names")
    chosen = [known[n] for n in args.recipes] if args.recipes else [r for r in RECIPES if not args.quick or r.key in QUICK_RECIPES]
    if "float" not in [r.key for r in chosen]:
        chosen.insert(0, known["float"])  # every table compares against it
    out = check_new_directory(args.out, "--out")
    sizes = {model: ModelSize.of(_model_skeleton(model, float_only=True, what="--models")) for model in args.models}
    protocol = QUICK if args.quick else FULL
    cache = Path(args.cache) if args.cache else cache_dir() / "report"
    seconds, missing = estimate_seconds(sizes, chosen, protocol, cache)
    print(f"{len(chosen) * len(args.models)} rows, {missing} to measure (the rest cached in {cache}): about {seconds / 60:.0f} min", flush=True)
    results = run_report(args.models, chosen, protocol, cache, redo=args.redo, progress=lambda line: print(line, flush=True))
    argv = "lowbit " + " ".join(args.argv)
    with new_directory(out, "--out") as tmp:
        images = {r.model: plots(r, tmp) for r in results}
        text = markdown(results, images, argv)
        (tmp / "report.md").write_text(text + "\n")
        (tmp / "report.html").write_text(to_html(text, tmp))
    print(f"wrote {out / 'report.md'}, {out / 'report.html'} and {sum(len(i) for i in images.values())} plots")
    return 0


def cmd_generate(args, derived) -> int:
    if not args.prompt.strip():
        raise LowbitError("--prompt is empty; give the text to continue")
    skeleton = _model_skeleton(args.model)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise LowbitError("--device cuda: this machine has no CUDA GPU (or torch is a CPU build); use --device cpu")
    prompt_tokens = len(skeleton.tokenizer(args.prompt).input_ids)
    limit = skeleton.max_positions
    if limit is not None and prompt_tokens + args.max_new_tokens > limit:
        raise LowbitError(f"the prompt's {prompt_tokens} tokens plus --max-new-tokens {args.max_new_tokens} exceed {args.model}'s "
                          f"{limit} positions; use --max-new-tokens {max(limit - prompt_tokens, 1)} or less")

    from lowbit.inference.generate import generate
    from lowbit.inference.kv_cache import KVSpec
    from lowbit.loader import open_checkpoint

    kv = None if args.kv_bits is None else KVSpec(bits=args.kv_bits, group_size=args.kv_group, residual=args.kv_residual)
    loaded = open_checkpoint(args.model)
    _announce(skeleton, loaded)
    if args.device == "cuda":
        loaded.model.to(device="cuda", dtype=torch.float16)  # packed codes stay uint8; scales become fp16
        if loaded.is_quantized and not args.no_kernels:
            from lowbit.kernels.triton_gemm import use_triton_kernels

            use_triton_kernels(loaded.model)
    elif loaded.is_quantized and not args.no_kernels:
        from lowbit.kernels.cpu import use_cpu_kernels

        use_cpu_kernels(loaded.model)
    ids = loaded.tokenizer(args.prompt, return_tensors="pt").input_ids
    from contextlib import ExitStack

    from lowbit.modules import SparseLinear
    from lowbit.modules.quant_linear import dequantized_once

    with ExitStack() as stack:
        sparse = [m for m in loaded.model.modules() if isinstance(m, SparseLinear)]
        if sparse:  # rebuilding a dense weight per token would be slower still; no sparse kernel runs them faster
            print(f"{len(sparse)} pruned layers run as dense float32 weights rebuilt once (lowbit has no sparse kernel)", file=sys.stderr)
            for module in sparse:
                stack.enter_context(dequantized_once(module))
        result = generate(loaded.model, ids, args.max_new_tokens, kv=kv, eos_token_id=loaded.tokenizer.eos_token_id,
                          compiled=False if args.eager else None)
    print(args.prompt + loaded.tokenizer.decode(result.tokens, skip_special_tokens=True))
    steps = len(result.tokens) - 1
    decode = (f"decode {result.decode_tokens_per_second:.1f} tokens/s ({result.mode})" if steps > 0
              else "no decode step timed (the first new token comes from the prefill)")
    print(f"\n{result.prompt_tokens} prompt tokens in {result.prefill_seconds:.2f} s; {len(result.tokens)} new tokens, {decode}; "
          f"KV cache {result.cache_bytes / 1e6:.2f} MB{'' if kv is None else f' ({args.kv_bits}-bit)'}", file=sys.stderr)
    return 0


def _roofline_model(ref: str):
    """A model for the roofline, and the LoadedModel it came from (None for the random 1.1B
    Llama, which has no file): ``ref`` checked then loaded."""
    if ref == "llama-1b":
        from lowbit.inference.speed import random_llama

        return random_llama(), None
    from lowbit.loader import load_model

    loaded = load_model(ref)
    return loaded.model, loaded


def _llama_cpp_variants(ref: str, model, loaded, wanted: bool, work: Path):
    """The llama.cpp rows bench-decode adds for ``ref`` and the LoadedModel they export from
    (the random 1.1B model is first written as a float GGUF file into ``work`` and read back:
    the caller then measures that copy, the same weights, so that one float copy is held),
    or none, saying why on stderr."""
    from lowbit.engines import llama_cpp
    from lowbit.inference.speed import GGUF_VARIANTS, write_llama_gguf
    from lowbit.loader import load_model
    from lowbit.models.refs import ref_kind

    if not wanted:
        return (), loaded
    if not llama_cpp.available():
        print(f"no llama.cpp rows for {ref}: llama-cpp-python is not installed (scripts/install-llama-cpp.sh)", file=sys.stderr)
        return (), loaded
    if loaded is not None and ref_kind(ref) not in ("gguf", "named"):
        print(f"no llama.cpp rows for {ref}: not a GGUF model (the export copies its source file's metadata)", file=sys.stderr)
        return (), loaded
    if loaded is None:  # the random model: a GGUF file of its weights, loaded back as the packaged models are
        print(f"writing {ref} as a float32 GGUF file for llama.cpp (a placeholder vocabulary; {work})", file=sys.stderr)
        loaded = load_model(str(write_llama_gguf(model, work / f"{ref}.gguf")))
    return GGUF_VARIANTS, loaded


def cmd_roofline(args, derived) -> int:
    from lowbit.outputs import check_output_file

    if (args.bandwidth is None) != (args.flops is None):
        raise LowbitError("give both --bandwidth and --flops, or neither (then this machine is measured)")
    if args.out:
        check_output_file(args.out, "--out")
    if args.model != "llama-1b":
        _model_skeleton(args.model)
    from lowbit.analysis.roofline import Machine, measure_machine
    from lowbit.analysis.roofline_report import predicted_rows, roofline_table, write_chart
    from lowbit.evaluation import write_json

    model, loaded = _roofline_model(args.model)
    if args.bandwidth is not None:
        machine = Machine(bandwidth_gbps=args.bandwidth, peak_gflops=args.flops * 1000)
        where = "as given"
    else:
        machine = measure_machine()
        where = "measured on this machine"
    print(f"machine ({where}): {machine.bandwidth_gbps:.1f} GB/s, {machine.peak_gflops:.0f} GFLOP/s (ridge {machine.ridge:.1f} FLOP/byte)")
    if args.measure:
        import tempfile

        from lowbit.inference.speed import VARIANTS, measure_variants
        from lowbit.models.loading import remove_gguf_directory

        work = Path(tempfile.mkdtemp(prefix="lowbit-bench-decode-"))
        try:
            extra, loaded = _llama_cpp_variants(args.model, model, loaded, not getattr(args, "no_llama_cpp", True), work)
            if loaded is not None:  # the 1.1B model's two float copies (4.4 GB each) and its variants' builds did not fit 24 GB
                model = loaded.model
            rows = measure_variants(model, machine, args.ctx, args.new_tokens, variants=VARIANTS + extra, rounds=args.rounds, loaded=loaded)
        finally:  # the random model's GGUF file and its cached conversion
            remove_gguf_directory(work)
    else:
        rows = predicted_rows(model, machine, args.ctx, args.kv_bits)
    print(roofline_table(rows))
    if args.out:
        write_chart(rows, machine, model, args.ctx, args.out)
        write_json(Path(args.out).with_suffix(".json"), {"model": args.model, "machine": vars(machine), "ctx": args.ctx, "rows": [r.to_dict() for r in rows]})
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def cmd_bench_decode(args, derived) -> int:
    from lowbit.models.refs import ref_kind
    from lowbit.outputs import check_output_file

    for model in args.models:
        if model != "llama-1b":
            ref_kind(model)
    if args.out_dir:
        for model in args.models:
            check_output_file(Path(args.out_dir) / f"roofline_{model}.png", "--out-dir")
    for model in args.models:
        print(f"\n== {model} ==")
        out = None if not args.out_dir else str(Path(args.out_dir) / f"roofline_{model}.png")
        ns = argparse.Namespace(model=model, bandwidth=None, flops=None, measure=True, ctx=args.ctx, new_tokens=args.new_tokens, rounds=args.rounds,
                                kv_bits=32.0, out=out, no_llama_cpp=args.no_llama_cpp)
        cmd_roofline(ns, derived)
    return 0


def cmd_outliers(args, derived) -> int:
    from lowbit.calibration.config import CalibrationConfig
    from lowbit.outputs import check_output_file

    samples_config = build_from_flags(CalibrationConfig, given_flags(args, derived["outliers"]), derived["outliers"], "outliers")
    if args.out:
        check_output_file(Path(args.out) / "outliers.json", "--out")
    _check_text(samples_config.corpus, samples_config.text_file)
    skeleton = _model_skeleton(args.model, float_only=True)
    _check_ctx(skeleton, samples_config.ctx, "--calib-ctx")
    samples = samples_config.tokens(skeleton.tokenizer)

    from lowbit.analysis.outliers import analyse_outliers, summary_table, write_plots
    from lowbit.evaluation import write_json
    from lowbit.loader import load_model

    loaded = load_model(args.model)
    report = analyse_outliers(loaded, samples, threshold=args.threshold)
    print(summary_table(report))
    if args.out:
        for path in write_plots(report, args.out):
            print(f"wrote {path}", file=sys.stderr)
        write_json(Path(args.out) / "outliers.json", report.to_dict())
        print(f"wrote {Path(args.out) / 'outliers.json'}", file=sys.stderr)
    return 0


def cmd_export(args, derived) -> int:
    import importlib

    from lowbit.checkpoint import read_header
    from lowbit.interchange import EXPORTS
    from lowbit.loader import load_model
    from lowbit.models.refs import ref_kind
    from lowbit.outputs import check_new_directory, check_output_file

    out = check_output_file(args.out, "--out") if args.to == "gguf" else check_new_directory(args.out, "--out")
    kind = ref_kind(args.checkpoint)
    module = importlib.import_module(EXPORTS[args.to].module)
    if kind == "lowbit":
        if args.to == "gguf":  # the metadata source must be there before anything loads
            module.source_gguf(read_header(args.checkpoint), args.gguf_metadata)
        loaded = load_model(args.checkpoint)
    elif kind == "gguf":
        from lowbit.interchange.gguf import open_quantized

        loaded = open_quantized(args.checkpoint)
    elif kind == "hf":
        from lowbit.interchange.compressed_tensors import open_compressed_tensors

        loaded = open_compressed_tensors(args.checkpoint)
    else:
        raise LowbitError(f"{args.checkpoint} is a packaged model's name; export takes a quantised checkpoint (lowbit quantize --out DIR first)")
    path, plan = module.export(loaded, out, requantize=args.requantize, metadata_from=args.gguf_metadata)
    size = sum(p.stat().st_size for p in ([path] if path.is_file() else path.iterdir()))
    print(f"wrote {path}: {len(plan.tensors)} tensors ({', '.join(f'{n} {k}' for k, n in sorted(plan.counts().items()))}), {size / 2**20:.1f} MiB")
    for t in plan.tensors if isinstance(plan.tensors, list) else ():
        if t.origin == "requantized":
            print(f"  requantized {t.name} to {t.type.name}: {t.note}")
    return 0


def cmd_info(args, derived) -> int:
    from lowbit.info import describe_path

    print(describe_path(args.path))
    return 0


def cmd_methods(args, derived) -> int:
    from lowbit.methods.registry import methods_table

    print(methods_table(markdown=args.markdown))
    return 0


def _import_heavy_libraries() -> None:
    """Import torch and transformers with Ctrl-C held back until they are in. An interrupt
    that lands inside their initialisation was seen to abort the process from C++
    ("terminate called after throwing ... KeyboardInterrupt") or to vanish; held back, it
    is raised here, after the imports, and ends as "lowbit: interrupted"."""
    interrupted = []
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(signum)) if main_thread else None
    try:
        import torch  # noqa: F401
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)
    if interrupted:
        raise KeyboardInterrupt


COMMANDS = {"quantize": cmd_quantize, "prune": cmd_quantize, "distill": cmd_distill, "report": cmd_report, "eval": cmd_eval, "finetune": cmd_finetune, "outliers": cmd_outliers, "generate": cmd_generate,
            "roofline": cmd_roofline, "bench-decode": cmd_bench_decode, "info": cmd_info, "methods": cmd_methods,
            "export": cmd_export}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        parser, derived = build_parser()
        try:
            args = parser.parse_args(argv)
            args.argv = list(sys.argv[1:] if argv is None else argv)
        except UsageError as err:
            print(f"lowbit: error: {one_line(err)}", file=sys.stderr)
            return EXIT_USER_ERROR
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="lowbit: %(message)s")
        if getattr(args, "low_memory", False):  # before torch allocates anything (lowbit.system says why)
            from lowbit.system import return_freed_memory

            return_freed_memory()
        if args.command != "methods":
            _import_heavy_libraries()
        start = time.perf_counter()
        code = COMMANDS[args.command](args, derived)
        log.info("%s took %.1f s", args.command, time.perf_counter() - start)
        return code
    except LowbitError as err:
        print(f"lowbit: error: {one_line(err)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("lowbit: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def run() -> None:
    """The console script: `main`, then exit with its status. After an interrupt the process
    leaves at once (``os._exit``): every temporary output was removed while the interrupt
    unwound, and shutting the interpreter down after a SIGINT that landed inside torch's or
    transformers' imports sometimes ended the process by the signal instead of status 130."""
    code = main()
    if code == EXIT_INTERRUPTED:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
