"""Quantise a model larger than memory: block by block from disk to disk, resumable.

`quantize_streamed` runs on a model opened with `lowbit.models.streamed.open_streamed`
(parameters on the meta device). Calibrated methods first capture block 0's inputs with
only the embeddings in memory (`capture_block_inputs`); then each decoder block in turn is
read from disk, quantised by the same `quantize_block` the in-memory engine runs (or, for
a method without calibration, each of its linears on its own), written as one shard of a
sharded checkpoint and sent back to the meta device. The tensors outside the blocks
(embeddings, final norm, head) follow, one shard each. Peak memory is one block, its
method's workspace and the calibration activations, whatever the model's size
(`streamed_estimate`).

Everything goes into a partial directory beside the output (``.<name>.lowbit-partial``):

    run.json                     what the run is (method, calibration, source files): a
                                 different command refuses to continue it
    report-000II.json            unit II's layers' reports, header entries and tensor names,
                                 written first
    hidden-000II/                the calibration hidden states after block II (the next
                                 block's inputs), one file per batch; only the newest is kept
    activations/                 with offload_activations, each batch's current hidden
                                 states (calibration activations larger than memory)
    checkpoint/                  the output being built:
      lowbit-000II-of-000NN.safetensors   each finished unit (block or other tensor),
                                 written to a temporary name and renamed

A run killed at any point and started again with the same command continues from the
first unfinished block: every step is deterministic and the saved hidden states are the
exact float32 values, so the checkpoint is byte-identical to an uninterrupted run's. At
the end the config, tokenizer and index go into checkpoint/, which is renamed to the
output (so the output appears whole or not at all), and the partial directory is removed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from lowbit import __version__
from lowbit.calibration.config import CalibrationConfig
from lowbit.calibration.engine import (LayerResult, activation_copies, capture_block_inputs, quantize_block, start_float_stream,
                                      warn_if_hessian_is_rank_deficient)
from lowbit.checkpoint import checkpoint_header, layer_record, quantized_layers, shard_name, write_index
from lowbit.errors import LowbitError
from lowbit.methods.config import QuantizeConfig
from lowbit.models.architectures import decoder_blocks
from lowbit.models.loading import LoadedModel
from lowbit.models.streamed import embeddings_loaded, load_part, outside_modules, release_part, stored_names
from lowbit.outputs import check_new_directory, publish_directory
from lowbit.pipeline import check_arguments, head_name, plan_layers, quantize_head, quantize_linear
from lowbit.system import resident_bytes, return_freed_memory

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".lowbit-partial"
RUN_RECORD = "run.json"


def partial_directory(out: Path) -> Path:
    """Where a streamed run into ``out`` keeps its finished blocks until it completes."""
    return out.parent / f".{out.name}{PARTIAL_SUFFIX}"


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@dataclass
class Unit:
    """One shard's worth of work: decoder block ``block`` or the non-block module ``module``."""

    index: int
    module: str
    block: int | None = None


def plan_units(loaded: LoadedModel, config: QuantizeConfig) -> list[Unit]:
    """The shards of a streamed run: every decoder block, then every other module that holds
    stored tensors (in state-dict order: embeddings, final norm, head), the output head also
    where it is tied to the embeddings but ``config`` quantises it."""
    arch = loaded.arch
    n_blocks = len(decoder_blocks(loaded.model, arch))
    units = [Unit(i, f"{arch.blocks}.{i}", i) for i in range(n_blocks)]
    others = outside_modules(loaded.model, arch.blocks)
    if config.head is not None and head_name(loaded.model) not in others:
        others.append(head_name(loaded.model))
    units += [Unit(n_blocks + i, module) for i, module in enumerate(others)]
    return units


@dataclass
class Journal:
    """The partial directory of one streamed run (module docstring)."""

    directory: Path
    count: int

    @staticmethod
    def open(out: Path, record: dict, count: int) -> "Journal":
        """Create the partial directory, or reopen one that the same run left; a partial
        directory of a different run is refused with what to do."""
        directory = partial_directory(out)
        run = directory / RUN_RECORD
        if directory.exists():
            try:
                old = json.loads(run.read_text())
            except (OSError, ValueError):
                old = None
            if old != record:
                changed = sorted(k for k in set(record) | set(old or {}) if (old or {}).get(k) != record.get(k))
                raise LowbitError(f"{directory} holds an unfinished run of a different command (it differs in {', '.join(changed) or 'its record'}); "
                                  f"repeat that command to finish it, or remove {directory} to start again")
            journal = Journal(directory, count)
            journal.clean()
            return journal
        check_new_directory(out, "--out")
        (directory / "checkpoint").mkdir(parents=True)
        _write_atomic(run, lambda tmp: tmp.write_text(json.dumps(record, indent=1, sort_keys=True)))
        return Journal(directory, count)

    @property
    def checkpoint(self) -> Path:
        """The checkpoint being built (shards, then config, tokenizer and index), renamed
        to the output when complete."""
        return self.directory / "checkpoint"

    def clean(self) -> None:
        """Remove what a killed run left half-written: temporary files, and the config,
        tokenizer and index files of a finish that did not complete."""
        self.checkpoint.mkdir(exist_ok=True)
        for folder, keep in ((self.directory, r"run\.json|report-\d{5}\.json|hidden-\d{5}|checkpoint"),
                             (self.checkpoint, r"lowbit-\d{5}-of-\d{5}\.safetensors")):
            for path in folder.iterdir():
                if not re.fullmatch(keep, path.name):
                    shutil.rmtree(path) if path.is_dir() else path.unlink()

    def shard(self, index: int) -> Path:
        return self.checkpoint / shard_name(index, self.count)

    def report(self, index: int) -> Path:
        return self.directory / f"report-{index + 1:05d}.json"

    def hidden(self, index: int) -> Path:
        return self.directory / f"hidden-{index + 1:05d}"

    def finished(self, unit: Unit, last_block: int, calibrated: bool) -> bool:
        """Whether ``unit`` is committed: its shard is in place and, for a calibrated
        block before the last, the next block's inputs too (or the next block is done)."""
        if not self.shard(unit.index).is_file() or not self.report(unit.index).is_file():
            return False
        if unit.block is None or not calibrated or unit.block == last_block:
            return True
        return self.hidden(unit.index).is_dir() or self.shard(unit.index + 1).is_file()

    def commit(self, unit: Unit, tensors: dict[str, torch.Tensor], report: dict) -> None:
        _write_atomic(self.report(unit.index), lambda tmp: tmp.write_text(json.dumps(report)))
        _write_atomic(self.shard(unit.index), lambda tmp: save_file(tensors, tmp))

    def save_hidden(self, index: int, batches: list) -> None:
        """The calibration batches' hidden states after unit ``index``: one file per batch
        (one batch in memory at a time), in a directory renamed into place when complete."""
        final = self.hidden(index)
        tmp = self.directory / f".{final.name}.tmp-{os.getpid()}"
        try:
            tmp.mkdir()
            for i, batch in enumerate(batches):
                reference = batch.reference  # the float stream of learned rounding's float targets, if carried
                stream = {} if reference is None else {"reference": reference.contiguous()}
                save_file({"hidden": batch.hidden.contiguous(), **stream}, tmp / f"batch-{i:05d}.safetensors")
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        for stale in self.directory.glob("hidden-*"):
            if stale != final:
                shutil.rmtree(stale)

    def restore_hidden(self, index: int, batches: list) -> None:
        """Set the batches' hidden states to those saved after unit ``index``, one at a time."""
        files = sorted(self.hidden(index).glob("batch-*.safetensors"))
        if len(files) != len(batches):
            raise LowbitError(f"{self.hidden(index)} holds {len(files)} batches, the run has {len(batches)}; remove {self.directory} to start again")
        for batch, file in zip(batches, files):
            saved = load_file(file)
            batch.hidden = saved["hidden"]
            if "reference" in saved:
                batch.reference = saved["reference"]


def source_record(loaded: LoadedModel) -> dict:
    """The source files a streamed run reads (path, size, modification time): a changed
    source must not be mixed into an unfinished run."""
    files = sorted({str(f) for f in loaded.weights.files.values()})
    return {f: [os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files}


@dataclass
class StreamedResult:
    """What `quantize_streamed` did: per-layer reports (all blocks, resumed ones included),
    this process's wall seconds, the blocks it found finished, the estimate, phases."""

    layers: list[LayerResult] = field(default_factory=list)
    seconds: float = 0.0
    resumed_units: int = 0
    estimate: dict = field(default_factory=dict)
    phases: dict = field(default_factory=dict)


def float_weight_bytes(model) -> int:
    """Bytes of ``model``'s weights in float32, each tensor once: a head tied to the
    embeddings (``tie_word_embeddings``) counts once even where the model was built on the
    meta device, which leaves the two untied (Gemma 3 270M: 268M parameters, not 436M)."""
    weights = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if getattr(model.config, "tie_word_embeddings", False) and head is not None and head.weight is not embeddings.weight:
        weights -= head.weight.numel()
    return weights * 4


def in_memory_peak(model) -> int:
    """A quick bound on the peak of quantising ``model`` (built on the meta device) in
    memory: this process, the float32 weights and a quarter more for quantised copies and
    a method's workspace."""
    return in_memory_eval_peak([model])


def in_memory_eval_peak(models: list) -> int:
    """The same bound for one in-memory `lowbit eval` of ``models`` (a reference among
    them), all in one process: the process once, each model's float32 weights and a quarter
    more."""
    return resident_bytes() + sum(float_weight_bytes(model) * 5 // 4 for model in models)


def streamed_estimate(loaded: LoadedModel, config: QuantizeConfig, calibration: CalibrationConfig | None,
                      offload_activations: bool = False) -> dict:
    """Peak memory (MB) of a streamed run, by phase, before any weight is read: this process
    now (interpreter, libraries, tokenizer) plus the largest of
    - capture: the non-block tensors the embedding forward needs (all but the head);
    - a block: its float weights as read, the float copy the block's outputs are computed
      with (calibrated methods), the widest linear's rounding workspace (four float copies),
      the quantised shard and its serialised copy, and for calibrated methods the statistics
      of its widest group (a Hessian, its inverse factor and a working copy), the calibration
      hidden states (inputs, outputs and, for learned rounding, the float targets) and one
      batch's intermediate activations (with ``offload_activations``, the hidden states
      are one batch in and one out, the learned-rounding targets staying in memory);
    - another unit: its float tensors as read and a quarter more (its quantised form when it
      is the quantised head).
    Tensors are read into their own memory, not through a memory map (`read_safetensors`):
    with safetensors' map, a run grew by about a block as it went and a unit cost up to
    twice its size more; measured since: a 1.1B Llama's RTN run 740 MB, estimated 776; a
    7B Qwen2's 2,736 MB, estimated 3,132 (docs/results.md)."""
    model, arch = loaded.model, loaded.arch
    blocks = decoder_blocks(model, arch)
    block0 = blocks[0]
    dtype_bytes = torch.empty(0, dtype=loaded.dtype).element_size()
    nbytes = {n: t.numel() * dtype_bytes if t.is_floating_point() else t.numel() * t.element_size()
              for n, t in model.state_dict(keep_vars=True).items()}
    block_bytes = sum(nbytes[n] for n in stored_names(model, f"{arch.blocks}.0"))
    head = model.get_output_embeddings()
    others = {u.module: sum(nbytes[n] for n in stored_names(model, u.module)) for u in plan_units(loaded, config) if u.block is None}
    capture = sum(v for k, v in others.items() if model.get_submodule(k) is not head) if config.calibrated else 0
    hidden = model.config.get_text_config(decoder=True).hidden_size
    linears = [block0.get_submodule(n) for n in arch.block_linears]
    widest = max(m.in_features * m.out_features for m in linears) * 4
    quantised = block_bytes // 4  # codes and scales at up to 8 bits, both copies
    block = block_bytes + 4 * widest + quantised
    activations = 0
    if config.calibrated:
        tokens = calibration.samples * calibration.ctx
        copies = activation_copies(config)
        batch_tokens = min(calibration.batch_size, calibration.samples) * calibration.ctx
        activations = copies * tokens * hidden * 4
        if offload_activations:
            activations = (copies - 2) * tokens * hidden * 4 + 2 * batch_tokens * hidden * 4
        block += block_bytes + 3 * max(m.in_features for m in linears) ** 2 * 4 + activations
        block += 4 * batch_tokens * max(m.out_features for m in linears) * 4
    other = max(others.values(), default=0) * 5 // 4
    base = resident_bytes()
    peak = base + max(capture, block, other)
    return {"peak_mb": peak / 1e6, "process_mb": base / 1e6, "capture_mb": capture / 1e6, "block_mb": block / 1e6,
            "activations_mb": activations / 1e6,
            "other_mb": other / 1e6, "model_mb": sum(nbytes[n] for n in stored_names(model, "")) / 1e6}


def quantize_streamed(loaded: LoadedModel, config: QuantizeConfig, out: str | Path, calibration: CalibrationConfig | None = None,
                      progress: bool = True, offload_activations: bool = False) -> StreamedResult:
    """Quantise the streamed ``loaded`` (`open_streamed`) with ``config`` and write the
    sharded checkpoint ``out`` as it goes (module docstring); an unfinished run of the same
    command into ``out`` is continued. ``offload_activations``: keep each calibration
    batch's hidden states in a file in the partial directory (`CapturedBatch.offload`),
    for calibration sets whose activations do not fit in memory; the checkpoint is the same
    bytes. Returns the layers' reports; the model is left on the meta device."""
    if not loaded.is_streamed:
        raise LowbitError("quantize_streamed takes a model opened with lowbit.models.streamed.open_streamed; use quantize_model for one in memory")
    check_arguments(loaded, config, calibration, streamed=True)
    out = Path(out)
    model, arch = loaded.model, loaded.arch
    layers = [name for name, _ in plan_layers(model, arch, config)]  # names only: a module kept here would keep its weights
    calibration = (calibration or CalibrationConfig()) if config.calibrated else None
    units = plan_units(loaded, config)
    tied = _tied_record(loaded, config)  # before the head is swapped for its quantised module
    last_block = max(u.block for u in units if u.block is not None)
    record = {"method": config.to_dict(), "calibration": calibration.to_dict() if calibration else None, "source": loaded.source,
              "source_files": source_record(loaded), "units": len(units), "dtype": str(loaded.dtype), "lowbit_version": __version__}
    journal = Journal.open(out, record, len(units))
    return_freed_memory()  # the CLI also sets it before anything is allocated, where it works best
    result = StreamedResult(estimate=streamed_estimate(loaded, config, calibration, offload_activations))
    phases = dict.fromkeys(("read", "capture", "statistics", "accumulate", "quantize", "refine", "outputs", "write"), 0.0)
    start = time.perf_counter()
    first = next((u.index for u in units if not journal.finished(u, last_block, calibration is not None)), len(units))
    result.resumed_units = first
    if first:
        log.warning("continuing the unfinished run in %s: %d of %d units are done", journal.directory, first, len(units))
    batches = None
    patterns = [re.compile(p) for p in config.skip]
    first_block = min(first, last_block + 1)
    if calibration is not None and first_block <= last_block:
        tick = time.perf_counter()
        samples = calibration.tokens(loaded.tokenizer)
        warn_if_hessian_is_rank_deficient(config, decoder_blocks(model, arch), arch, samples, patterns)
        with embeddings_loaded(loaded):
            phases["read"] += time.perf_counter() - tick
            tick = time.perf_counter()
            offload = journal.directory / "activations" if offload_activations else None
            batches = capture_block_inputs(model, arch, samples, calibration.batch_size, offload)
            start_float_stream(config, batches)
            phases["capture"] += time.perf_counter() - tick
        if first_block > 0:
            journal.restore_hidden(first_block - 1, batches)
    blocks = decoder_blocks(model, arch)
    bar = tqdm(total=len(units), initial=first, desc=f"{config.name} (streamed)", unit="unit", disable=not progress)
    for unit in units[first:]:
        tick = time.perf_counter()
        load_part(loaded, unit.module)
        phases["read"] += time.perf_counter() - tick
        if unit.block is not None and calibration is not None:
            reports = quantize_block(blocks[unit.block], unit.block, batches, config, arch, patterns, phases,
                                     calibration.true_sequential, progress)
        else:
            tick = time.perf_counter()
            reports = [quantize_linear(model, name, config) for name in layers if name == unit.module or name.startswith(unit.module + ".")]
            if config.head is not None and model.get_submodule(unit.module) is model.get_output_embeddings():
                reports.append(quantize_head(model, config.head))
            phases["quantize"] += time.perf_counter() - tick
        tick = time.perf_counter()
        state = model.state_dict()
        tensors = {n: state[n].contiguous() for n in stored_names(model, unit.module)}
        entries = {n: layer_record(m) for n, m in quantized_layers(model.get_submodule(unit.module)).items()}
        report = {"layers": [[r.name, list(r.shape), r.nbytes, r.info] for r in reports], "tensors": sorted(tensors),
                  "records": {f"{unit.module}.{n}".rstrip("."): entry for n, entry in entries.items()}}  # n is "" for the unit itself
        journal.commit(unit, tensors, report)
        if unit.block is not None and calibration is not None and unit.block < last_block:
            journal.save_hidden(unit.index, batches)
        phases["write"] += time.perf_counter() - tick
        release_part(model, unit.module)
        bar.update(1)
    bar.close()
    header_layers, weight_map = {}, {}
    for unit in units:
        report = json.loads(journal.report(unit.index).read_text())
        result.layers += [LayerResult(name, tuple(shape), nbytes, info) for name, shape, nbytes, info in report["layers"]]
        header_layers.update(report["records"])
        weight_map.update(dict.fromkeys(report["tensors"], journal.shard(unit.index).name))
    header = checkpoint_header(loaded.source, model.config.model_type, config.to_dict(), calibration.to_dict() if calibration else None,
                               dict(sorted(header_layers.items(), key=lambda kv: _order(kv[0], units))), tied)
    if config.head is not None and getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False
    write_index(journal.checkpoint, header, weight_map)
    model.config.to_json_file(journal.checkpoint / "config.json")
    loaded.tokenizer.save_pretrained(journal.checkpoint)
    publish_directory(journal.checkpoint, check_new_directory(out, "--out"))
    shutil.rmtree(journal.directory)
    result.seconds = time.perf_counter() - start
    result.phases = phases
    return result


def _order(name: str, units: list[Unit]) -> int:
    return next((u.index for u in units if name.startswith(u.module + ".")), len(units))


def _tied_record(loaded: LoadedModel, config: QuantizeConfig) -> dict[str, str]:
    """The header's "tied" map, as `save_quantized` writes it for the same model in memory:
    a tied head that stays float is stored once, under the embeddings' name."""
    ties = loaded.weights.ties
    if config.head is not None:
        head = head_name(loaded.model)
        ties = {k: v for k, v in ties.items() if not k.startswith(head + ".")}
    return dict(ties)


__all__ = ["StreamedResult", "partial_directory", "quantize_streamed", "streamed_estimate"]
