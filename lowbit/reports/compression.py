"""`lowbit report`: the report's comparison tables (§5.3, §7.6, §8.3, §9.3), measured on
real models instead of quoted.

Every row of every table is a *recipe*: one or more lowbit commands (quantise, prune,
distil, fine-tune; a later command reads the previous one's output), each a real process
whose wall time and peak RSS are kept. The result is then scored by `lowbit eval` against
the float source on held-out windows of each corpus of the protocol, and decoded with
`lowbit generate` for tokens/s. The roofline's prediction for the same stored bytes, at
this machine's measured bandwidth, stands beside it. Results are cached per recipe, model
and protocol (JSON under ``cache``), so a report that stopped continues where it stopped,
and a second report reuses every row it shares with the first.

The tables keep the report's qualitative cells and join measured numbers to them:
training cost in seconds, memory as bytes, hardware speed-up as decode-speed ratios
measured here and predicted by the roofline, and quality as perplexity, KLD and top-1
agreement. Table 8.3's "recovery" is computed the report's way, quantised score over
baseline score: here the float perplexity over the quantised one (lower is better) and the
top-1 agreement with the float model.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lowbit.errors import LowbitError

FAMILIES = ("float", "PTQ", "QAT", "unstructured pruning", "structured pruning", "distillation")


@dataclass(frozen=True)
class Protocol:
    """How every recipe is calibrated, trained, scored and timed."""

    calib_samples: int = 32
    calib_ctx: int = 512
    windows: int = 40
    ctx: int = 512
    train_steps: int = 300
    train_ctx: int = 256
    decode_tokens: int = 32
    corpora: tuple[str, ...] = ("pydoc", "shakespeare")
    calib_corpus: str = "pydoc"

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


FULL = Protocol()
QUICK = Protocol(calib_samples=4, calib_ctx=64, windows=2, ctx=64, train_steps=4, train_ctx=64, decode_tokens=4)
PROMPT = "The capital of France is"


@dataclass(frozen=True)
class Recipe:
    """One row: ``steps`` are lowbit commands without --model/--out (the model is the
    previous step's output, the first takes the source); ``family`` one of FAMILIES."""

    key: str
    family: str
    steps: tuple[tuple[str, ...], ...] = ()
    summary: str = ""


W4 = ("--bits", "4", "--group-size", "128")
RECIPES = (
    Recipe("float", "float", summary="the source model"),
    Recipe("rtn W4 g128", "PTQ", (("quantize", "--method", "rtn", *W4),), "round to nearest"),
    Recipe("gptq W4 g128", "PTQ", (("quantize", "--method", "gptq", *W4),), "GPTQ, symmetric"),
    Recipe("gptq W3 g128", "PTQ", (("quantize", "--method", "gptq", "--bits", "3", "--group-size", "128"),), "GPTQ at 3 bits"),
    Recipe("gptq W2 g64", "PTQ", (("quantize", "--method", "gptq", "--bits", "2", "--group-size", "64", "--asym"),), "GPTQ at 2 bits"),
    Recipe("awq W4 g128", "PTQ", (("quantize", "--method", "awq", *W4),), "AWQ"),
    Recipe("nf4 g64", "PTQ", (("quantize", "--method", "nf4"),), "QLoRA's NF4 format, round to nearest"),
    Recipe("w8a8", "PTQ", (("quantize", "--method", "w8a8"),), "int8 weights and activations"),
    Recipe("smoothquant", "PTQ", (("quantize", "--method", "smoothquant"),), "SmoothQuant W8A8"),
    Recipe("llm-int8", "PTQ", (("quantize", "--method", "llm-int8"),), "LLM.int8()"),
    Recipe("qat W4 g128", "QAT", (("finetune", "--method", "qat", *W4),), "quantisation-aware training"),
    Recipe("magnitude 50%", "unstructured pruning", (("prune", "--method", "magnitude", "--sparsity", "0.5"),)),
    Recipe("wanda 50%", "unstructured pruning", (("prune", "--method", "wanda", "--sparsity", "0.5"),)),
    Recipe("sparsegpt 50%", "unstructured pruning", (("prune", "--method", "sparsegpt", "--sparsity", "0.5"),)),
    Recipe("magnitude 2:4", "structured pruning", (("prune", "--method", "magnitude", "--sparsity", "2:4"),)),
    Recipe("wanda 2:4", "structured pruning", (("prune", "--method", "wanda", "--sparsity", "2:4"),)),
    Recipe("sparsegpt 2:4", "structured pruning", (("prune", "--method", "sparsegpt", "--sparsity", "2:4"),)),
    Recipe("sparsegpt 2:4 + W4", "structured pruning", (("prune", "--method", "sparsegpt", "--sparsity", "2:4", "--quantize", *W4),),
           "pruned and quantised in one sweep"),
    Recipe("distilled half", "distillation", (("distill",),), "half the blocks, trained on KL to the teacher"),
    Recipe("distilled half + gptq W4", "distillation", (("distill",), ("quantize", "--method", "gptq", *W4)), "distil, then quantise"),
)
QUICK_RECIPES = ("float", "rtn W4 g128", "gptq W4 g128", "qat W4 g128", "wanda 50%", "sparsegpt 2:4", "distilled half")


def _calibrated(step: tuple[str, ...]) -> bool:
    from lowbit.methods.registry import method_config

    return step[0] in ("quantize", "prune") and method_config(step[step.index("--method") + 1]).calibrated


def command(step: tuple[str, ...], model: str, out: Path, protocol: Protocol) -> list[str]:
    """The full argv of one step: the step's flags, the model and output, and the
    protocol's calibration, training and scoring settings where the command takes them."""
    verb, *flags = step
    argv = [verb, *flags]
    if _calibrated(step):
        argv += ["--calib-samples", str(protocol.calib_samples), "--calib-ctx", str(protocol.calib_ctx), "--calib-corpus", protocol.calib_corpus]
    if verb == "distill":
        argv += ["--teacher", model, "--corpus", protocol.calib_corpus, "--steps", str(protocol.train_steps), "--ctx", str(protocol.train_ctx),
                 "--eval-windows", "2", "--out", str(out)]
        return argv
    if verb == "finetune":
        argv += ["--corpus", protocol.calib_corpus, "--steps", str(protocol.train_steps), "--ctx", str(protocol.train_ctx), "--eval-windows", "2"]
    return [*argv, "--model", model, "--out", str(out)]


def _lowbit(argv: list[str], log: Path) -> dict:
    """Run ``lowbit ARGV`` as its own process: wall seconds, its own peak RSS (MB, VmHWM as
    it exits: `lowbit.reports.measured`), its output."""
    peak_file = log.with_suffix(".peak")
    with log.open("w") as sink:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "lowbit.reports.measured", str(peak_file), *argv], stdout=sink,
                              stderr=subprocess.STDOUT, text=True)
        seconds = time.perf_counter() - start
    text = log.read_text()
    if proc.returncode != 0:
        raise LowbitError(f"lowbit {' '.join(argv[:3])} ... failed: {(text.strip().splitlines() or ['no output'])[-1]}")
    return {"seconds": round(seconds, 1), "peak_rss_mb": round(int(peak_file.read_text()) / 2**20), "output": text}


DECODE = re.compile(r"decode ([\d.]+) tokens/s")


def make(recipe: Recipe, model: str, protocol: Protocol, work: Path, progress=print, made: dict | None = None,
         keep: Path | None = None) -> tuple[str, list[dict]]:
    """Make the recipe's model, its steps in order: (the last step's output, or ``model`` for
    a recipe of no steps; each step's record).

    ``made`` maps a chain of steps to (its output, its step record) for chains an earlier
    recipe of this run made: a recipe that starts with one (distil, then quantise) reuses
    that output instead of making it again, and its cost still counts the reused step's
    seconds (the record says ``reused``). A step whose chain is a key of ``made`` with no
    value yet (None: a later recipe needs it) writes into ``keep``, which outlives ``work``."""
    made = {} if made is None else made
    current, steps = model, []
    for i, step in enumerate(recipe.steps):
        chain = recipe.steps[: i + 1]
        if made.get(chain) is not None:
            current, record = made[chain]
            progress(f"  reusing {record['command']}")
            steps.append({**record, "reused": True})
            continue
        out = work / f"step{i}" if chain not in made else keep / f"chain{list(made).index(chain)}"
        argv = command(step, current, out, protocol)
        progress(f"  lowbit {' '.join(argv)}")
        run = _lowbit(argv, work / f"step{i}.log")
        shown = " ".join(argv).replace(str(work), "WORK")  # the temporary directory means nothing once it is gone
        if keep is not None:
            shown = shown.replace(str(keep), "WORK")
        steps.append({"command": "lowbit " + shown, "seconds": run["seconds"], "peak_rss_mb": run["peak_rss_mb"], "peak_rss_own": True})
        current = str(out)
        if chain in made:
            made[chain] = (current, steps[-1])
    return current, steps


def fit_in_memory(source: str, count: int, cap: int | None = None) -> int:
    """How many of ``count`` models made from ``source`` one in-memory `lowbit eval` can
    score beside ``source`` as its reference, within ``cap`` bytes (the memory free now):
    each made model is bounded by its source's float weights (quantising, pruning and
    distilling never grow a model). At least one: a model that does not fit alone is scored
    streamed, which `lowbit eval` does for one model at a time."""
    from lowbit.loader import open_skeleton
    from lowbit.streaming import in_memory_eval_peak
    from lowbit.system import available_memory

    cap = available_memory() if cap is None else cap
    model = open_skeleton(source).model
    fits = 1
    while fits < count and in_memory_eval_peak([model] * (fits + 2)) <= cap:
        fits += 1
    return fits


def score(models: list[str], source: str, protocol: Protocol, work: Path, against_source: bool = True) -> list[dict]:
    """One `lowbit eval` per corpus of as many of ``models`` as fit in memory together
    (`fit_in_memory`; against ``source``, the float model, unless ``against_source`` is
    False: the source scored alone): the reference's pass, most of an evaluation on Gemma's
    262k-entry vocabulary, runs once for all of them. Each model's scores by corpus, in the
    order given."""
    together = fit_in_memory(source, len(models)) if len(models) > 1 else 1
    scores = []
    for first in range(0, len(models), together):
        scores += _score_together(models[first : first + together], source, protocol, work / f"scored{first}", against_source)
    return scores


def _score_together(models: list[str], source: str, protocol: Protocol, work: Path, against_source: bool) -> list[dict]:
    """`score` of ``models`` in one `lowbit eval` per corpus."""
    work.mkdir(parents=True, exist_ok=True)
    scores = [{} for _ in models]
    for corpus in protocol.corpora:
        report = work / f"eval.{corpus}.json"
        argv = ["eval", *models, "--corpus", corpus, "--windows", str(protocol.windows), "--ctx", str(protocol.ctx), "--json", str(report)]
        if against_source:
            argv += ["--reference", source]
        _lowbit(argv, work / f"eval.{corpus}.log")
        results = json.loads(report.read_text())["results"]
        reference, rows = (results[0], results[1:]) if against_source else (None, results)
        if len(rows) != len(models):
            raise LowbitError(f"lowbit eval of {len(models)} models gave {len(rows)} rows")
        for scored, result in zip(scores, rows):
            scored[corpus] = {"perplexity": result["perplexity"], "reference_perplexity": (reference or result)["perplexity"],
                              "kld": result["kld"], "top1_percent": result["top1_percent"], "bits_per_weight": result["bits_per_weight"],
                              "model_bytes": result["model_bytes"]}
    return scores


def finish(recipe: Recipe, current: str, steps: list[dict], scores: dict, protocol: Protocol, work: Path) -> dict:
    """A recipe's row: its steps and their cost, its scores, its decode speed (`lowbit
    generate`) and the roofline's prediction for its stored bytes."""
    generated = _lowbit(["generate", current, "--prompt", PROMPT, "--max-new-tokens", str(protocol.decode_tokens)], work / "generate.log")
    found = DECODE.findall(generated["output"])
    return {"key": recipe.key, "family": recipe.family, "steps": steps, "cost_seconds": sum(s["seconds"] for s in steps),
            "peak_rss_mb": max([s["peak_rss_mb"] for s in steps], default=None),
            "peak_rss_own": all(s.get("peak_rss_own", False) for s in steps), "scores": scores,
            "decode_tokens_per_second": float(found[-1]) if found else None, "roofline": roofline(current, protocol)}


def roofline(model_ref: str, protocol: Protocol) -> dict:
    """The roofline's decode prediction for the model's stored bytes at this machine's bandwidth."""
    from lowbit.analysis.roofline import decode_cost, measure_machine
    from lowbit.loader import open_checkpoint

    loaded = open_checkpoint(model_ref)
    machine = measure_machine()
    cost = decode_cost(loaded.model, context=len(loaded.tokenizer(PROMPT).input_ids) + protocol.decode_tokens)
    return {"weight_bytes": cost.weight_bytes, "tokens_per_second": 1.0 / cost.seconds(machine), "bandwidth_gbps": machine.bandwidth_gbps}


@dataclass
class Results:
    """The measured rows of one model: recipe key -> `finish`'s dict."""

    model: str
    protocol: Protocol
    rows: dict = field(default_factory=dict)


SCORED_TOGETHER = 4  # recipes made before one `lowbit eval` per corpus scores them


def run_report(models: list[str], recipes: list[Recipe], protocol: Protocol, cache: Path, redo: bool = False, progress=print,
               batch: int = SCORED_TOGETHER) -> list[Results]:
    """Measure every recipe on every model, reusing what ``cache`` holds for this protocol.
    Recipes are made ``batch`` at a time and each batch scored together (`score`); the cache
    is written after each batch."""
    out = []
    for model in models:
        path = cache / f"{Path(model).name}-{protocol.key()}.json"
        stored = json.loads(path.read_text()) if path.exists() else {}
        results = Results(model, protocol, dict(stored.get("rows", {})))
        todo = [recipe for recipe in recipes if recipe.key not in results.rows or redo]
        # chains of steps that begin a longer recipe still to run: made once, kept for it
        made = {recipe.steps[:k]: None for recipe in todo for k in range(1, len(recipe.steps))}
        with tempfile.TemporaryDirectory(prefix="lowbit-report-kept-") as keep:
            for first in range(0, len(todo), batch):
                with tempfile.TemporaryDirectory(prefix="lowbit-report-") as work:
                    built = []
                    for index, recipe in enumerate(todo[first : first + batch]):
                        progress(f"{model}: {recipe.key}")
                        recipe_work = Path(work) / f"recipe{index}"
                        recipe_work.mkdir()
                        built.append((recipe, *make(recipe, model, protocol, recipe_work, progress, made, Path(keep)), recipe_work))
                    derived = [entry for entry in built if entry[0].steps]
                    scores = dict(zip([entry[0].key for entry in derived], score([entry[1] for entry in derived], model, protocol, Path(work)))) \
                        if derived else {}
                    for recipe, current, _, recipe_work in built:
                        if not recipe.steps:  # the source itself, scored alone
                            (scores[recipe.key],) = score([current], model, protocol, recipe_work, against_source=False)
                    for recipe, current, steps, recipe_work in built:
                        results.rows[recipe.key] = finish(recipe, current, steps, scores[recipe.key], protocol, recipe_work)
                cache.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps({"model": model, "protocol": asdict(protocol), "rows": results.rows}, indent=1) + "\n")
                os.replace(tmp, path)
        out.append(results)
    return out


@dataclass(frozen=True)
class ModelSize:
    """A model's parameters, for the estimate: all of them (a tied head once) and its decoder
    blocks' alone, which calibration runs through and a vocabulary does not grow (SmolLM2:
    134.5M and 106.2M; Gemma 3 270M: 268M and 100M, its 262k-entry embedding the rest), and
    its vocabulary, over which distillation takes two softmaxes and a KL divergence for every
    training token (SmolLM2 49,152 entries, Gemma 3 262,144)."""

    parameters: int
    block_parameters: int
    vocabulary: int

    @classmethod
    def of(cls, skeleton) -> ModelSize:
        """``skeleton``'s sizes (`lowbit.loader.open_skeleton`: built on the meta device)."""
        from lowbit.models.architectures import decoder_blocks
        from lowbit.streaming import float_weight_bytes

        blocks = decoder_blocks(skeleton.model, skeleton.arch)
        return cls(float_weight_bytes(skeleton.model) // 4, sum(p.numel() for p in blocks.parameters()),
                   skeleton.model.get_input_embeddings().num_embeddings)


# rough seconds with the full protocol on this kind of machine (2 cores), for the estimate;
# fitted to the reports of SmolLM2 and Gemma 3 (bench/results/report)
LOAD_SECONDS_PER_PARAMETER = 0.04e-6  # a step's process that reads, rounds and saves: rtn, nf4, magnitude pruning
CALIBRATED_SECONDS_PER_BLOCK_PARAMETER = 0.65e-6  # a calibrated step's forwards and solves, on top of that
# 300 steps of 4 x 256 tokens (QAT: SmolLM2 1,634 s, Gemma 3 2,584 s): the blocks train, and
# every token's forward and backward pass the head, which grows with the vocabulary
TRAIN_SECONDS_PER_BLOCK_PARAMETER = 6.0e-6
TRAIN_SECONDS_PER_PARAMETER = 7.4e-6
# 300 distillation steps (SmolLM2 1,617 s, Gemma 3 6,589 s): the teacher's forward and the
# half-depth student's forward and backward pass every parameter, and each token's two
# softmaxes and KL divergence span the vocabulary (tensors of 1,024 x 262,144 on Gemma 3)
DISTILL_SECONDS_PER_PARAMETER = 4.53e-6
DISTILL_SECONDS_PER_VOCABULARY_ENTRY = 0.0205
SCORE_SECONDS = 45  # SmolLM2's 40 windows of 512 tokens of one corpus, within a joint lowbit eval
REFERENCE_SECONDS = 10  # the float reference's share of one joint lowbit eval (its hidden states cached)
FINISH_SECONDS = 20  # lowbit generate's process and the roofline's bandwidth measurement, on SmolLM2
SMOLLM2_PARAMETERS = 134.5e6
PROCESS_SECONDS = 8  # starting one lowbit process (imports, model load)


def estimate_seconds(models: dict[str, ModelSize], recipes: list[Recipe], protocol: Protocol, cache: Path,
                     batch: int = SCORED_TOGETHER) -> tuple[float, int]:
    """(rough seconds, rows) of what is not cached yet, for ``models`` (name -> sizes): what
    the report prints before it starts. A step that only loads and saves scales with all
    parameters, a calibrated step's work with the blocks', QAT with both, distillation with
    all parameters and the vocabulary, scoring and decoding with all parameters from
    SmolLM2's measured times (Gemma 3's 262k-entry head is in every token's forward). It counts what `run_report` does: a chain of steps two recipes share
    is made once, and each ``batch`` of recipes is scored by one `lowbit eval` per corpus."""
    seconds, missing = 0.0, 0
    shrink = (protocol.windows * protocol.ctx) / (FULL.windows * FULL.ctx)
    train = protocol.train_steps / FULL.train_steps
    for model, size in models.items():
        path = cache / f"{Path(model).name}-{protocol.key()}.json"
        rows = json.loads(path.read_text()).get("rows", {}) if path.exists() else {}
        todo = [recipe for recipe in recipes if recipe.key not in rows]
        missing += len(todo)
        scale = size.parameters / SMOLLM2_PARAMETERS
        load = LOAD_SECONDS_PER_PARAMETER * size.parameters
        made = set()
        for recipe in todo:
            for k, step in enumerate(recipe.steps, start=1):
                if recipe.steps[:k] in made:
                    continue
                made.add(recipe.steps[:k])
                if step[0] == "distill":
                    seconds += (DISTILL_SECONDS_PER_PARAMETER * size.parameters + DISTILL_SECONDS_PER_VOCABULARY_ENTRY * size.vocabulary) * train
                elif step[0] == "finetune":
                    seconds += (TRAIN_SECONDS_PER_BLOCK_PARAMETER * size.block_parameters + TRAIN_SECONDS_PER_PARAMETER * size.parameters) * train
                else:
                    seconds += load + (CALIBRATED_SECONDS_PER_BLOCK_PARAMETER * size.block_parameters if _calibrated(step) else 0.0)
            seconds += scale * (SCORE_SECONDS * len(protocol.corpora) * shrink + FINISH_SECONDS)
        evals = -(-len(todo) // batch) * len(protocol.corpora)
        seconds += evals * (scale * REFERENCE_SECONDS * shrink + PROCESS_SECONDS)
    return seconds, missing
