"""Layer-sequential calibration: run the calibration samples through the model one decoder
block at a time, quantise that block, and feed its quantised outputs to the next.

The engine never runs the whole model on the calibration set. It first captures what the
model feeds block 0 (hidden states) and every block (keyword arguments: attention masks,
rotary embeddings, positions) by standing cheap recorders in for the blocks, so only the
embeddings compute. Then, for each block in turn, it runs the samples through the block
once, streaming the input of every group of linears that read the same input (from the
architecture table) into the method's statistics (e.g. GPTQ's Hessian), and quantises the
groups in execution order, swapping the quantised modules in. With ``true_sequential``
each group instead gets its own pass, stopped at its input, after the groups before it are
quantised, so it sees their quantisation error (the GPTQ repository's --true-sequential;
up to len(groups) + 1 passes instead of 2). Finally the quantised block's outputs become
the next block's inputs.

Peak memory is the model's non-block weights, one block, the calibration hidden states
(two copies at most) and one group's statistics; nothing here needs the other blocks'
weights while a block is processed, so they could be streamed from disk one at a time.
Algorithms know nothing about models: they see a weight and its statistics.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.models.architectures import Architecture, LinearGroup, decoder_blocks
from lowbit.models.loading import LoadedModel
from lowbit.modules import QUANTIZED_MODULES, storage_bytes
from lowbit.modules.quant_linear import dequantized_once
from lowbit.modules.swap import set_module
from lowbit.packed.qweight import bits_per_weight
from lowbit.system import resident_bytes, trim_heap

log = logging.getLogger(__name__)


class Statistics(Protocol):
    def add(self, x: torch.Tensor) -> None: ...


class CalibratedMethod(Protocol):
    """What the engine asks of a calibrated method: its registered config (`lowbit.methods`,
    e.g. `GPTQConfig`) implements these two. ``quantize_group`` gets all of a group's float
    linears by name (``linears``) and the ones to quantise (``selected``: a method that
    rescales the group's input must rescale every linear that reads it); each report
    carries ``weight_sqnr_db`` and, on the calibration inputs, ``output_error`` (mean squared
    output error per token) beside ``baseline_output_error`` of the simplest method of the
    same format (named by ``baseline``). A report may also carry ``start_weight``, float32
    (out, in): the float weight whose rounding to nearest gives the method's codes (GPTQ's
    error-compensated weights); the engine takes it out of the report and hands it to a
    `BlockRefiner` (default: the linear's float weight)."""

    name: str

    def statistics(self, in_features: int) -> Statistics:
        """A fresh accumulator for the input of one group of linears."""

    def quantize_group(self, block: nn.Module, group: LinearGroup, linears: dict[str, nn.Linear], selected: list[str],
                       stats: Statistics, arch: Architecture, prefix: str = "") -> list[tuple[str, nn.Module, dict]]:
        """(name in block, replacement module, report) for each selected linear. ``prefix``
        is the block's dotted path with a trailing dot (``model.layers.3.``): prefix + name is
        the linear's name in the model, which per-layer specs (`QuantizeConfig.spec_for`) match."""


class BlockRefiner(CalibratedMethod, Protocol):
    """A calibrated method that, after its groups, refines the whole block at once against
    the float block's outputs (learned rounding): the engine computes the float block's
    outputs before quantising it, keeps a `StartPoint` per linear, and calls
    ``refine_block`` once the block's groups are done.

    float_targets: the float block's outputs on the float model's own inputs to the block
    (the engine then carries that second stream of hidden states through every block, as
    AutoRound does), so that learning also corrects the error the blocks before left in its
    inputs; False: on the block's quantised inputs, the same inputs its run sees."""

    float_targets: bool

    def refine_block(self, block: nn.Module, run, targets: list[torch.Tensor], starts: dict[str, StartPoint]) -> dict[str, tuple[nn.Module, dict]]:
        """run: i -> the block's output on calibration batch i (through its current modules);
        targets: the float block's outputs, float (batch, seq, hidden) per batch. Returns name
        in block -> (module now in the block, report entries to merge) for each linear."""


class CapturedBatch:
    """One mini-batch of calibration samples at the input of the current block.

    hidden: float (batch, seq, hidden_size); in memory, or, after `offload`, in a file of
        its own: read back on every access and written on every assignment, so that only
        the batch in use is in memory (calibration activations larger than memory).
    reference: None, or the float model's hidden states at the same block's input (the
        float stream of `BlockRefiner.float_targets`), the same shape, kept like ``hidden``
        (offloaded: in a second file beside it).
    block_kwargs: for every block, the keyword arguments the model passes it.
    """

    def __init__(self, hidden: torch.Tensor, block_kwargs: list[dict]):
        self._tensors: dict[str, torch.Tensor | None] = {"hidden": hidden, "reference": None}
        self.block_kwargs = block_kwargs
        self.file: Path | None = None

    def _file(self, key: str) -> Path:
        return self.file if key == "hidden" else self.file.with_name(self.file.name.replace(".safetensors", f".{key}.safetensors"))

    def _get(self, key: str) -> torch.Tensor | None:
        if self.file is None or (key != "hidden" and not self._file(key).is_file()):
            return self._tensors[key]
        return load_file(self._file(key))["hidden"]

    def _set(self, key: str, value: torch.Tensor | None) -> None:
        if self.file is None:
            self._tensors[key] = value
            return
        file = self._file(key)
        if value is None:
            file.unlink(missing_ok=True)
            return
        tmp = file.with_name(file.name + ".tmp")
        save_file({"hidden": value.contiguous()}, tmp)
        os.replace(tmp, file)

    hidden = property(lambda self: self._get("hidden"), lambda self, value: self._set("hidden", value))
    reference = property(lambda self: self._get("reference"), lambda self, value: self._set("reference", value))

    def offload(self, file: Path) -> None:
        """Keep the hidden states (and the reference stream) in ``file`` (and a second file
        beside it) from now on (written now)."""
        values = {key: self._get(key) for key in self._tensors}
        self._tensors = dict.fromkeys(self._tensors)
        self.file = Path(file)
        for key, value in values.items():
            self._set(key, value)


@dataclass
class StartPoint:
    """One linear as a calibrated method first quantised it, for a method that then refines
    the whole block (`BlockRefiner`, e.g. learned rounding).

    module: the quantised module in the block (later groups may still rescale its rows,
        AWQ folding into it as their source).
    float_weight: float32 (out, in), the float weight it was quantised from, in the
        coordinates the method quantised it in (AWQ: input scales folded in).
    start_weight: float32 (out, in), the weight whose rounding to nearest gives its codes:
        the method's ``start_weight`` (GPTQ's error-compensated weights) or ``float_weight``.
    row_norms: float32 (out,), the norm of each row of ``module``'s weight when it was swapped in.
    """

    module: nn.Module
    float_weight: torch.Tensor
    start_weight: torch.Tensor
    row_norms: torch.Tensor

    @staticmethod
    def of(module: nn.Module, float_weight: torch.Tensor, start_weight: torch.Tensor | None = None) -> "StartPoint":
        float_weight = float_weight.detach().float().clone()
        start = float_weight if start_weight is None else start_weight.detach().float()
        return StartPoint(module, float_weight, start, module.qweight.dequantize().norm(dim=1))

    def now(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(float_weight, start_weight) in the module's coordinates now: rows rescaled,
        exactly, as the module's have been since it was swapped in."""
        current = self.module.qweight.dequantize().norm(dim=1)
        before = torch.where(self.row_norms > 0, self.row_norms, 1.0)
        ratio = torch.where(self.row_norms > 0, current / before, 1.0)[:, None]
        return self.float_weight * ratio, self.start_weight * ratio


class _StopForward(Exception):
    """Raised inside a forward pass once everything needed has been recorded."""


class _Recorder(nn.Module):
    """Stands in for decoder block ``index`` while inputs are captured."""

    # attributes a model's forward loop may read from its blocks
    COPIED = ("attention_type", "layer_type", "layer_idx", "is_sliding")

    def __init__(self, index: int, original: nn.Module, record: dict, last: bool):
        super().__init__()
        self.index, self.record, self.last = index, record, last
        for attr in self.COPIED:
            if hasattr(original, attr):
                setattr(self, attr, getattr(original, attr))

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise LowbitError("a decoder block was called with positional arguments; lowbit's engine needs keyword arguments (transformers >= 5)")
        if self.index == 0:
            self.record["hidden"] = hidden_states
        self.record["kwargs"][self.index] = kwargs
        if self.last:
            raise _StopForward
        return hidden_states


def _block_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def capture_block_inputs(model: nn.Module, arch: Architecture, samples: torch.Tensor, batch_size: int,
                         offload: Path | None = None) -> list[CapturedBatch]:
    """Block 0's input hidden states and every block's keyword arguments, per mini-batch.

    samples: int64 (n_samples, ctx) token ids. Only the embedding layers compute.
    offload: a directory (created) to keep each batch's hidden states in, as it is
    captured (`CapturedBatch.offload`), instead of memory.
    """
    blocks = decoder_blocks(model, arch)
    originals = list(blocks)
    captured = []
    try:
        for batch in samples.split(batch_size):
            record = {"hidden": None, "kwargs": [None] * len(originals)}
            for i, block in enumerate(originals):
                blocks[i] = _Recorder(i, block, record, last=i == len(originals) - 1)
            try:
                model(input_ids=batch, use_cache=False)
            except _StopForward:
                pass
            if record["hidden"] is None or any(k is None for k in record["kwargs"]):
                raise LowbitError(f"the model did not call all {len(originals)} blocks of {arch.blocks}; the architecture table does not fit this model")
            captured.append(CapturedBatch(hidden=record["hidden"], block_kwargs=record["kwargs"]))
            if offload is not None:
                offload.mkdir(parents=True, exist_ok=True)
                captured[-1].offload(offload / f"batch-{len(captured) - 1:05d}.safetensors")
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
    return captured


@dataclass
class LayerResult:
    """One quantised linear: its name, weight shape (out, in), the bytes it stores for its
    weight (codes, scales, zero-points; no bias) and what the method reports (weight_sqnr_db
    always; output errors for calibrated methods)."""

    name: str
    shape: tuple[int, int]
    nbytes: int
    info: dict

    @property
    def bits_per_weight(self) -> float:
        return bits_per_weight(self.nbytes, self.shape[0] * self.shape[1])


@dataclass
class CalibrationResult:
    """layers: one report per quantised linear; seconds: the run's wall time; estimate: the
    up-front estimate (`estimate`); phases: wall seconds by phase (capture of block 0's
    inputs, statistics passes and, within them, the statistics' own accumulation, the
    method's quantisation, a refining method's block step, the quantised blocks' outputs)."""

    layers: list[LayerResult] = field(default_factory=list)
    seconds: float = 0.0
    estimate: dict = field(default_factory=dict)
    phases: dict = field(default_factory=dict)


def _matmul_gflops() -> float:
    """This machine's float32 matmul rate, measured in about 0.1 s (for the time estimate)."""
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    a @ b
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < 0.1:
        a @ b
        n += 1
    return 2 * 512**3 * n / (time.perf_counter() - start) / 1e9


def estimate(model: nn.Module, arch: Architecture, samples: torch.Tensor, true_sequential: bool = False, copies: int = 2) -> dict:
    """Rough peak memory (MB) and time (s) of a calibration run, printed before it starts:
    this process now (the loaded model included), plus ``copies`` copies of the calibration
    hidden states (inputs and outputs; a `BlockRefiner` adds its targets and, with float
    targets, the float stream) and one block's workspace (its float weights' size again for
    the quantised copies, and the widest group's Hessian, inverse factor and working copy)."""
    blocks = decoder_blocks(model, arch)
    block0 = blocks[0]
    hidden = model.config.hidden_size
    n_tokens = samples.numel()
    block_params = sum(p.numel() for p in block0.parameters())
    block_bytes = sum(p.numel() * p.element_size() for p in block0.parameters())
    other_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not n.startswith(arch.blocks + "."))
    in_dims = [block0.get_submodule(group.linears[0]).in_features for group in arch.groups]
    activations = copies * n_tokens * hidden * 4
    stats = max(in_dims) ** 2 * 4 * 3  # a Hessian, its inverse factor and a working copy
    model_bytes = other_bytes + len(blocks) * block_bytes
    passes = len(arch.groups) + 1 if true_sequential else 2  # statistics pass(es), then the outputs
    flops = 2 * n_tokens * block_params * passes * len(blocks)
    linears = [block0.get_submodule(n) for n in arch.block_linears]
    columns = sum(m.in_features for m in linears) * len(blocks)
    gptq_flops = sum(m.in_features**2 * m.out_features * 4 for m in linears) * len(blocks)
    rate = _matmul_gflops() * 1e9
    seconds = (flops + gptq_flops) / rate + columns * 80e-6  # ~80 µs of Python per weight column
    process = resident_bytes()
    return {
        "model_mb": model_bytes / 1e6,
        "process_mb": process / 1e6,
        "activations_mb": activations / 1e6,
        "block_workspace_mb": (block_bytes + stats) / 1e6,
        "peak_mb": (process + activations + block_bytes + stats) / 1e6,
        "seconds": seconds,
        "gflops": rate / 1e9,
    }


def kept_linears(prefix: str, names, patterns: Sequence[re.Pattern]) -> list[str]:
    """The ``names`` of block ``prefix`` (e.g. "model.layers.3") whose full name no skip
    pattern matches: the linears the engine calibrates."""
    return [n for n in names if not any(p.search(f"{prefix}.{n}") for p in patterns)]


def warn_if_hessian_is_rank_deficient(method, blocks: nn.ModuleList, arch: Architecture, samples: torch.Tensor,
                                      patterns: Sequence[re.Pattern] = ()) -> None:
    """H = 2XXᵀ (report §7.2) has rank at most the number of calibration tokens: with fewer
    tokens than a linear has inputs, the directions the calibration never reached are held
    only by the dampening, and the error compensation pushes weight error into them. Such a
    model matches its calibration text and loses more elsewhere; measured on SmolLM2 (GPTQ
    q4_k, 4 x 128 tokens against down_proj's 1536 inputs), llama.cpp's 8-bit activations
    alone moved its perplexity by 3.5%, against 0.1% with 16 x 128 tokens."""
    if not getattr(method, "inverts_hessian", False):
        return
    tokens = samples.shape[0] * samples.shape[1]
    width, name = max(((block.get_submodule(n).in_features, n)
                  for index, block in enumerate(blocks) for n in kept_linears(f"{arch.blocks}.{index}", arch.block_linears, patterns)),
                 default=(0, ""))
    if width > tokens:
        log.warning("%s: %d calibration tokens are fewer than %s's %d inputs, so its Hessian is rank-deficient and the error "
                    "compensation fits the calibration text; use at least %d tokens (--calib-samples %d at --calib-ctx %d)",
                    method.name, tokens, name, width, width, -(-width // samples.shape[1]), samples.shape[1])


@torch.no_grad()
def calibrate_and_quantize(
    loaded: LoadedModel,
    method: CalibratedMethod,
    samples: torch.Tensor,
    skip: Sequence[str] = (),
    batch_size: int = 8,
    true_sequential: bool = False,
    progress: bool = True,
) -> CalibrationResult:
    """Quantise every block linear of ``loaded.model`` not matched by ``skip`` with ``method``,
    block by block on ``samples`` (int64 (n, ctx)), in place.

    true_sequential: collect each group's statistics in its own pass, after the groups
    before it are quantised (the GPTQ repository's --true-sequential); default: one pass of
    the float block collects every group's, which costs 2 block passes instead of up to
    len(groups) + 1.
    """
    model, arch = loaded.model, loaded.arch
    patterns = [re.compile(p) for p in skip]
    blocks = decoder_blocks(model, arch)
    result = CalibrationResult(estimate=estimate(model, arch, samples, true_sequential, activation_copies(method)))
    est = result.estimate
    log.warning(
        "%s on %d blocks with %d samples x %d tokens: estimated peak memory %.0f MB (this process %.0f with the model's %.0f, "
        "calibration activations %.0f, block workspace %.0f), time ~%.0f s at %.0f GFLOP/s",
        method.name, len(blocks), samples.shape[0], samples.shape[1], est["peak_mb"], est["process_mb"], est["model_mb"],
        est["activations_mb"], est["block_workspace_mb"], est["seconds"], est["gflops"],
    )
    warn_if_hessian_is_rank_deficient(method, blocks, arch, samples, patterns)
    start = time.perf_counter()
    phases = dict.fromkeys(("capture", "statistics", "accumulate", "quantize", "refine", "outputs"), 0.0)
    batches = capture_block_inputs(model, arch, samples, batch_size)
    start_float_stream(method, batches)
    phases["capture"] = time.perf_counter() - start
    bar = tqdm(total=len(blocks), desc=method.name, unit="block", disable=not progress)
    for index, block in enumerate(blocks):
        result.layers += quantize_block(block, index, batches, method, arch, patterns, phases, true_sequential, progress)
        trim_heap()  # the block's freed float weights back to the system (SmolLM2 GPTQ: 1,729 MB at the end without, 1,063 with)
        bar.update(1)
    bar.close()
    result.seconds = time.perf_counter() - start
    result.phases = phases
    return result


def carries_float_stream(method: CalibratedMethod) -> bool:
    """Whether ``method`` is a `BlockRefiner` learning against float targets."""
    return hasattr(method, "refine_block") and getattr(method, "float_targets", False)


def activation_copies(method: CalibratedMethod) -> int:
    """How many copies of the calibration hidden states a run of ``method`` holds at once:
    inputs and outputs, a `BlockRefiner`'s targets, and the float stream."""
    return 2 + hasattr(method, "refine_block") + carries_float_stream(method)


def start_float_stream(method: CalibratedMethod, batches: list[CapturedBatch]) -> None:
    """Give every batch its float stream (a copy of block 0's inputs) if ``method`` learns
    against float targets (`BlockRefiner.float_targets`)."""
    if carries_float_stream(method):
        for batch in batches:
            batch.reference = batch.hidden.clone()


def quantize_block(block: nn.Module, index: int, batches: list[CapturedBatch], method: CalibratedMethod, arch: Architecture,
                   patterns: list[re.Pattern], phases: dict, true_sequential: bool = False, progress: bool = True) -> list[LayerResult]:
    """Quantise decoder block ``index`` (``block``) in place on the captured ``batches``,
    whose hidden states are its inputs, and advance them to its quantised outputs (the next
    block's inputs). Linears whose full name a ``patterns`` regex matches stay float; the
    seconds of each phase are added to ``phases``; ``true_sequential`` as in
    `calibrate_and_quantize`. Returns one report per quantised linear."""
    prefix = f"{arch.blocks}.{index}"
    layers: list[LayerResult] = []
    groups = []  # (group, names to quantise)
    for group in arch.groups:
        names = kept_linears(prefix, group.linears, patterns)
        for n in names:
            linear = block.get_submodule(n)
            if not isinstance(linear, nn.Linear) or isinstance(linear, tuple(QUANTIZED_MODULES.values())):
                raise LowbitError(f"{prefix}.{n} is not a float nn.Linear (already quantised?); quantise the float model")
        if names:
            groups.append((group, names))
    summary = []
    refines = hasattr(method, "refine_block")
    targets = []
    float_targets = carries_float_stream(method)
    if refines:
        tick = time.perf_counter()
        if float_targets and batches and batches[0].reference is None:  # (offloaded, each check reads a file)
            raise LowbitError(f"{method.name} learns against float targets but the batches carry no float stream; call start_float_stream first")
        targets = [_block_output(block(b.reference if float_targets else b.hidden, **b.block_kwargs[index])) for b in batches]
        phases["refine"] += time.perf_counter() - tick
    starts: dict[str, StartPoint] = {}
    # true sequential: one pass per group, stopped at its input, after the earlier groups
    # are quantised; otherwise one pass of the float block feeds every group's statistics
    rounds = [[g] for g in groups] if true_sequential else [groups]
    for round_groups in rounds:
        stats = {g.role: method.statistics(block.get_submodule(names[0]).in_features) for g, names in round_groups}
        tick = time.perf_counter()
        phases["accumulate"] += _collect(block, index, batches, [(block.get_submodule(g.linears[0]), stats[g.role]) for g, _ in round_groups])
        phases["statistics"] += time.perf_counter() - tick
        tick = time.perf_counter()
        for group, names in round_groups:
            everyone = {n: block.get_submodule(n) for n in group.linears}
            for n, module, info in method.quantize_group(block, group, everyone, names, stats[group.role], arch, f"{prefix}."):
                full = f"{prefix}.{n}"
                set_module(block, n, module)
                start_weight = info.pop("start_weight", None)
                if refines:
                    starts[n] = StartPoint.of(module, everyone[n].weight, start_weight)
                layers.append(LayerResult(full, (module.out_features, module.in_features), storage_bytes(module), info))
                summary.append(f"{n.rsplit('.', 1)[-1]} {_short(info)}")
        phases["quantize"] += time.perf_counter() - tick
    if starts:
        tick = time.perf_counter()
        def run(i):
            return _block_output(block(batches[i].hidden, **batches[i].block_kwargs[index]))

        refined = method.refine_block(block, run, targets, starts)
        if float_targets:  # the float block's outputs on the float stream are the next block's float inputs
            for batch, target in zip(batches, targets):
                batch.reference = target
        by_name = {r.name: r for r in layers[-len(starts):]}
        for n, (module, entries) in refined.items():
            layer = by_name[f"{prefix}.{n}"]
            layer.nbytes = storage_bytes(module)
            # the start's layer output errors no longer describe the layer: keep its own as start_output_error
            info = dict(layer.info)
            info.pop("baseline_output_error", None)
            if "output_error" in info:
                info["start_output_error"] = info.pop("output_error")
            layer.info = {**info, **entries}
        entries = next(iter(refined.values()))[1]
        summary = [f"block output error {entries['block_error_start']:.4g} -> {entries['block_error']:.4g}"
                   + ("" if entries["learned_kept"] else " (start kept)")]
        del targets
        phases["refine"] += time.perf_counter() - tick
    tick = time.perf_counter()
    with dequantized_once(block):  # the block's quantised weights in float32 once, not once per batch
        for batch in batches:
            batch.hidden = _block_output(block(batch.hidden, **batch.block_kwargs[index]))
    phases["outputs"] += time.perf_counter() - tick
    if progress and summary:
        tqdm.write(f"block {index}: " + ", ".join(summary))
    return layers


def _collect(block: nn.Module, index: int, batches: list[CapturedBatch], taps: list[tuple[nn.Module, Statistics]]) -> float:
    """Run the batches through ``block``, feeding each tapped linear's input to its statistics;
    the forward stops once the last tap has fired (nothing after it is needed). Returns the
    seconds spent in the statistics' ``add``."""
    fired: set[int] = set()
    spent = [0.0]

    def tap(stats, position):
        def hook(module, args):
            tick = time.perf_counter()
            stats.add(args[0])
            spent[0] += time.perf_counter() - tick
            fired.add(position)
            if len(fired) == len(taps):
                raise _StopForward
        return hook

    hooks = [linear.register_forward_pre_hook(tap(stats, i)) for i, (linear, stats) in enumerate(taps)]
    try:
        for batch in batches:
            fired.clear()
            try:
                block(batch.hidden, **batch.block_kwargs[index])
            except _StopForward:
                pass
    finally:
        for hook in hooks:
            hook.remove()
    return spent[0]


def _short(info: dict) -> str:
    """Per-layer output error for the progress line, beside RTN's when the method reports it."""
    err, ref = info.get("output_error"), info.get("baseline_output_error")
    if err is None:
        return ""
    return f"{err:.3g}" + ("" if ref is None else f" ({info.get('baseline', 'baseline')} {ref:.3g})")
