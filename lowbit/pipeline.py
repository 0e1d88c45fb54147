"""Model-level plumbing: choose the linears a method quantises, run it, swap the results in."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.calibration.budget import BudgetPlan, plan_budget
from lowbit.calibration.config import CalibrationConfig
from lowbit.calibration.engine import LayerResult, calibrate_and_quantize
from lowbit.errors import LowbitError
from lowbit.methods.config import MethodConfig, QuantizeConfig
from lowbit.methods.registry import quantize_methods
from lowbit.models.architectures import Architecture, decoder_blocks
from lowbit.models.loading import LoadedModel
from lowbit.modules.quant_linear import QuantLinear
from lowbit.modules.swap import linear_layers, set_module
from lowbit.numerics.quantization import weight_sqnr_db
from lowbit.numerics.spec import QuantSpec
from lowbit.packed.qweight import bits_per_weight
from lowbit.system import trim_heap


@dataclass
class QuantizeResult:
    """What `quantize_model` did: the config, wall seconds (not stored in the checkpoint, so
    that the same command gives the same bytes), one `LayerResult` per quantised linear
    (the head's last), for calibrated methods the engine's up-front estimate and its
    seconds by phase (`CalibrationResult.phases`), and with ``--budget`` the plan it chose."""

    config: QuantizeConfig
    seconds: float
    layers: list[LayerResult] = field(default_factory=list)
    estimate: dict = field(default_factory=dict)
    phases: dict = field(default_factory=dict)
    budget: BudgetPlan | None = None


log = logging.getLogger(__name__)

def head_name(model: nn.Module) -> str:
    """Dotted name of the model's output head (transformers' get_output_embeddings)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        raise LowbitError(f"this model has no linear output head to quantise (found {type(head).__name__}); drop --head-bits")
    return next(name for name, module in model.named_modules() if module is head)


def plan_layers(model: nn.Module, arch: Architecture, config: QuantizeConfig, report: bool = True) -> list[tuple[str, nn.Linear]]:
    """The linears ``config`` quantises in ``model``, after every check that needs only the
    model's structure and shapes: something is left to quantise, the head spec does not
    collide with the main one, a calibrated method stays inside the architecture table's
    block linears, and every group size fits its layer. The CLI runs this on a model built
    on the meta device, so a bad setting fails before any weight is loaded. With ``report``,
    layers that take a GGML type's fallback (rows not a multiple of its block) are logged."""
    layers = linear_layers(model, config.skip)
    if not layers:
        raise LowbitError(f"no linear layer is left to quantise: the skip patterns {list(config.skip)} match them all")
    if config.head is not None:
        head = head_name(model)
        if any(name == head for name, _ in layers):
            raise LowbitError(f"--head-bits was given but {head} is also among the linears the method quantises; keep it in --skip")
        config.head.group_size_for(model.get_submodule(head).in_features, head)
    if config.calibrated:
        n_blocks = len(decoder_blocks(model, arch))
        known = {f"{arch.blocks}.{i}.{n}" for i in range(n_blocks) for n in arch.block_linears}
        outside = [name for name, _ in layers if name not in known]
        if outside:
            raise LowbitError(f"{config.name} quantises the linears the architecture table lists for each decoder block; "
                              f"{', '.join(outside[:4])} are not among them: add --skip for them or use rtn")
    check_layer = getattr(config, "check_layer", None)  # a pruning method: its pattern (and, quantising, its groups) must fit
    if check_layer is not None:
        for name, linear in layers:
            check_layer(name, linear.in_features)
    spec = getattr(config, "spec", None)
    if spec is not None and check_layer is None:
        fallbacks = {}
        for name, linear in layers:
            layer_spec = config.spec_for(name, linear.in_features)
            layer_spec.group_size_for(linear.in_features, name)
            asked = config.requested_spec(name)
            if layer_spec.format != asked.format:
                fallbacks.setdefault((linear.in_features, asked.ggml, layer_spec.format), []).append(name)
        for (cols, asked, fmt), names in fallbacks.items() if report else ():
            log.warning("%d of %d linears (e.g. %s) have rows of %d weights, not a multiple of %s's block of %d: they take %s "
                        "(llama.cpp's fallback)", len(names), len(layers), names[0], cols, asked.name, asked.block, fmt)
    return layers


def check_arguments(loaded, config, calibration, streamed: bool = False) -> None:
    """What `quantize_model` (and, ``streamed``, `lowbit.streaming.quantize_streamed`) refuse
    before any work."""
    if not isinstance(loaded, LoadedModel):
        raise LowbitError(f"quantize_model takes the LoadedModel that lowbit.load_model returns, not a {type(loaded).__name__}")
    if not isinstance(config, QuantizeConfig):
        names = ", ".join(cls.__name__ for cls in quantize_methods().values())
        if isinstance(config, MethodConfig):
            raise LowbitError(f"{config.name} is a training method; run it with lowbit finetune (or its config's finetune), not quantize_model")
        raise LowbitError(f"quantize_model takes a method config, e.g. RTNConfig(spec=QuantSpec(bits=4)) (one of {names}), "
                          f"not a {type(config).__name__}")
    if loaded.is_quantized:
        raise LowbitError("this model is already quantised; quantise its float source instead")
    if loaded.is_streamed and not streamed:
        raise LowbitError("this model was opened streamed (its weights on disk); quantise it with lowbit.streaming.quantize_streamed, "
                          "which writes the checkpoint block by block")
    if streamed and getattr(config, "budget", None) is not None and not config.layer_bits:
        raise LowbitError("--budget measures every linear's sensitivity through the whole model at once, which does not stream; "
                          "drop --budget, or --low-memory where the model fits in memory")
    if calibration is not None:
        if not isinstance(calibration, CalibrationConfig):
            raise LowbitError(f"calibration must be a CalibrationConfig, not a {type(calibration).__name__}")
        if not config.calibrated:
            raise LowbitError(f"{config.name} uses no calibration samples; drop the calibration settings")


def quantize_model(loaded: LoadedModel, config: QuantizeConfig, calibration: CalibrationConfig | None = None,
                   progress: bool = True) -> QuantizeResult:
    """Quantise ``loaded.model`` in place with the method ``config`` describes.

    Every linear not matched by ``config.skip`` is replaced by a quantised module and its
    float weight dropped. A method that quantises each weight on its own (rtn, nf4, fp4)
    calls ``config.quantize_weight``; a calibrated one runs block by block on
    ``calibration``'s samples (default: `CalibrationConfig()`, 128 x 512 tokens of the
    default corpus; `lowbit.calibration.engine`). ``config.head`` also rounds the output
    head to nearest with its own spec (`quantize_head`). Sets ``loaded.header``, which
    `lowbit.save_quantized` writes. With ``config.budget`` (calibrated weight-only methods),
    each linear's bits and group size are chosen first, on the same samples
    (`lowbit.calibration.budget`), and the plan goes into the header's method record
    (``layer_bits``). Returns per-layer storage and errors (the head's last).
    """
    check_arguments(loaded, config, calibration)
    layers = plan_layers(loaded.model, loaded.arch, config)
    start = time.perf_counter()
    estimate, phases = {}, {}
    plan = None
    if config.calibrated:
        calibration = calibration or CalibrationConfig()
        samples = calibration.tokens(loaded.tokenizer)
        if getattr(config, "budget", None) is not None and not config.layer_bits:
            plan = plan_budget(loaded.model, loaded.arch, layers, config.spec, config.budget, samples, calibration.batch_size,
                               progress, extra_bytes=config.extra_bytes, sensitivity=config.budget_by)
            log.info("%s", plan.describe())
            config = dataclasses.replace(config, layer_bits=plan.layers)
        engine = calibrate_and_quantize(loaded, config, samples, skip=config.skip, batch_size=calibration.batch_size,
                                        true_sequential=calibration.true_sequential, progress=progress)
        results, estimate, phases = engine.layers, engine.estimate, engine.phases
    else:
        results = [quantize_linear(loaded.model, name, config)
                   for name, _ in tqdm(layers, desc=config.describe(), disable=not progress, unit="layer")]
        trim_heap()  # the dropped float weights back to the system, not kept by the allocator
    if config.head is not None:
        results.append(quantize_head(loaded.model, config.head))
    loaded.header = {"method": config.to_dict(), "calibration": calibration.to_dict() if config.calibrated else None, "source": loaded.source}
    return QuantizeResult(config=config, seconds=time.perf_counter() - start, layers=results, estimate=estimate, phases=phases,
                          budget=plan)


def quantize_linear(model: nn.Module, name: str, config: QuantizeConfig) -> LayerResult:
    """Quantise the linear ``name`` of ``model`` on its own with ``config.quantize_weight``
    (a method without calibration) and swap the result in, in place."""
    linear = model.get_submodule(name)
    with torch.no_grad():
        qweight = config.quantize_weight(linear.weight, name)
        sqnr = weight_sqnr_db(linear.weight, qweight.dequantize())
    set_module(model, name, config.module(qweight, linear.bias))
    return LayerResult(name, qweight.shape, qweight.nbytes, {"weight_sqnr_db": sqnr})


def quantize_head(model: nn.Module, spec: QuantSpec) -> LayerResult:
    """Round the output head to nearest with ``spec`` (Eq. 3.1 at the spec's granularity) and
    swap in a QuantLinear, in place. At decode the head is read once per token like every
    block linear, and in a 1B-parameter Llama it is 6% of the weights but, kept in float32
    beside 4-bit blocks, a third of the bytes. A head tied to the input embeddings is untied:
    the embedding keeps its float table (a lookup reads one row per token), the head gets
    the codes, and the config says so, so that a saved checkpoint reloads untied."""
    from lowbit.algorithms.rtn import rtn_quantize

    name = head_name(model)
    head = model.get_submodule(name)
    with torch.no_grad():
        weight = head.weight.detach().float()
        qweight = rtn_quantize(weight, spec, name)
        sqnr = weight_sqnr_db(weight, qweight.dequantize())
    set_module(model, name, QuantLinear(qweight, head.bias))
    if getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False
    return LayerResult(name, qweight.shape, qweight.nbytes, {"weight_sqnr_db": sqnr})


def describe_phases(phases: dict) -> str:
    """One line: where a calibration run's time went (`CalibrationResult.phases`)."""
    text = (f"time: capturing inputs {phases['capture']:.1f} s, statistics passes {phases['statistics']:.1f} s "
            f"(accumulating {phases['accumulate']:.1f} s of it), quantising {phases['quantize']:.1f} s")
    if phases.get("refine"):
        text += f", refining blocks {phases['refine']:.1f} s"
    text += f", quantised blocks' outputs {phases['outputs']:.1f} s"
    if "read" in phases:  # a streamed run (`lowbit.streaming`)
        text += f"; reading weights {phases['read']:.1f} s, writing shards {phases['write']:.1f} s"
    return text


def summarize_layers(layers: Sequence[LayerResult]) -> str:
    """One line: bits per weight over all layers, worst weight SQNR, and for calibrated
    methods the summed layer output error against the baseline's on the same inputs."""
    weights = sum(r.shape[0] * r.shape[1] for r in layers)
    bpw = bits_per_weight(sum(r.nbytes for r in layers), weights)
    text = f"{bpw:.3f} bits/weight, worst layer weight SQNR {min(r.info['weight_sqnr_db'] for r in layers):.1f} dB"
    if all("output_error" in r.info and "baseline_output_error" in r.info for r in layers):
        ours = sum(r.info["output_error"] for r in layers)
        base = sum(r.info["baseline_output_error"] for r in layers)
        name = layers[0].info.get("baseline", "baseline")
        better = sum(r.info["output_error"] < r.info["baseline_output_error"] for r in layers)
        text += f"; summed layer output error {ours:.4g} vs {name} {base:.4g} ({ours / base:.2f}x), lower in {better}/{len(layers)} layers"
    return text
