"""Model-level plumbing: choose the linears, quantise them with a method, swap them in."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lowbit.algorithms.rtn import rtn_quantize
from lowbit.calibration.engine import LayerResult, calibrate_and_quantize
from lowbit.calibration.methods import AWQMethod, AWQOptions, GPTQMethod, GPTQOptions, LLMInt8Method, W8A8Method, W8A8Options
from lowbit.data.corpora import DEFAULT_CORPUS, calibration_samples, tokenize_split
from lowbit.errors import LowbitError
from lowbit.models.loading import LoadedModel
from lowbit.modules.quant_linear import QuantLinear
from lowbit.modules.swap import DEFAULT_SKIP, linear_layers, set_module
from lowbit.numerics.quantize import weight_sqnr_db
from lowbit.numerics.spec import QuantSpec

METHODS = ("rtn", "nf4", "fp4", "gptq", "awq", "w8a8", "smoothquant", "llm-int8")
CODEBOOK_METHODS = ("nf4", "fp4")  # round-to-nearest in a codebook format with block-wise absmax scales
CALIBRATED = ("gptq", "awq", "w8a8", "smoothquant", "llm-int8")
INT8_METHODS = ("w8a8", "smoothquant", "llm-int8")  # 8-bit weights and activations; --bits does not apply
# output-head specs by code width (`lowbit quantize --head-bits`): both run on the CPU kernels
HEAD_SPECS = {8: QuantSpec(bits=8, granularity="channel", group_size=None), 4: QuantSpec(bits=4, group_size=128)}


@dataclass(frozen=True)
class CalibrationConfig:
    """Where calibration samples come from: ``samples`` windows of ``ctx`` tokens at seeded
    random offsets in the first half of ``corpus`` (or of ``text_file``), run through the
    model ``batch_size`` at a time; ``true_sequential`` as in `calibrate_and_quantize`."""

    corpus: str | None = None
    text_file: str | None = None
    samples: int = 128
    ctx: int = 512
    seed: int = 0
    batch_size: int = 8
    true_sequential: bool = False

    def __post_init__(self):
        if self.samples < 1 or self.ctx < 2 or self.batch_size < 1:
            raise LowbitError(f"calibration needs samples >= 1, ctx >= 2 and batch_size >= 1 (got {self.samples}, {self.ctx}, {self.batch_size})")

    def tokens(self, tokenizer) -> torch.Tensor:
        """int64 (samples, ctx) token ids."""
        split = tokenize_split(tokenizer, self.corpus, self.text_file)
        return calibration_samples(split, self.samples, self.ctx, self.seed)

    def describe(self) -> dict:
        data = asdict(self)
        data["corpus"] = None if self.text_file else (self.corpus or DEFAULT_CORPUS)
        data["text_file"] = None if self.text_file is None else str(Path(self.text_file).resolve())
        return data


@dataclass
class QuantizeResult:
    method: dict
    seconds: float
    layers: list[LayerResult] = field(default_factory=list)
    estimate: dict = field(default_factory=dict)


def quantize_model(
    loaded: LoadedModel,
    spec: QuantSpec,
    method: str = "rtn",
    skip: Sequence[str] = DEFAULT_SKIP,
    calibration: CalibrationConfig | None = None,
    gptq: GPTQOptions | None = None,
    awq: AWQOptions | None = None,
    w8a8: W8A8Options | None = None,
    threshold: float = 6.0,
    head_spec: QuantSpec | None = None,
    progress: bool = True,
) -> QuantizeResult:
    """Quantise every linear of ``loaded.model`` not matched by ``skip`` (regexes), in place.

    Weight-only methods use ``spec``: rtn (each weight on its own), gptq (``gptq`` options),
    awq (``awq`` options). W8A8 methods ignore ``spec`` (weights are int8 per channel):
    w8a8, smoothquant (``w8a8`` options: activation granularity, α), llm-int8
    (``threshold``). Calibrated methods run block by block on ``calibration`` samples
    (default 128 x 512 tokens of the default corpus). Each ``nn.Linear`` is replaced by a
    quantised module and its float weight dropped. ``head_spec``: also round the output head
    (lm_head, left out by the default ``skip``) to nearest with its own spec, e.g. int8 per
    channel, as llama.cpp's Q4 files keep a higher-precision output tensor; see
    `quantize_head`. Returns per-layer storage and errors (the head's last).
    """
    if method not in METHODS:
        raise LowbitError(f"method {method!r} is unknown; use one of {', '.join(METHODS)}")
    if loaded.is_quantized:
        raise LowbitError("this model is already quantised; quantise its float source instead")
    if method in CODEBOOK_METHODS and spec.format != method:
        raise LowbitError(f"method {method} needs QuantSpec(format={method!r}, ...), got format {spec.format!r}")
    layers = linear_layers(loaded.model, skip)
    head_name = _head_name(loaded.model) if head_spec is not None else None
    if head_name is not None and any(name == head_name for name, _ in layers):
        raise LowbitError(f"a head spec was given but {head_name} is also among the linears the main spec quantises; keep it in skip")
    if not layers:
        raise LowbitError(f"no linear layer is left to quantise: the skip patterns {list(skip)} match them all")
    info = {"name": method, "spec": spec.to_dict(), "skip": list(skip)}
    start = time.perf_counter()
    if method in CALIBRATED:
        arch = loaded.arch
        n_blocks = len(loaded.model.get_submodule(arch.blocks))
        known = {f"{arch.blocks}.{i}.{n}" for i in range(n_blocks) for n in arch.block_linears}
        outside = [name for name, _ in layers if name not in known]
        if outside:
            raise LowbitError(
                f"{method} quantises the linears the architecture table lists for each decoder block; "
                f"{', '.join(outside[:4])} are not among them: add --skip for them or use rtn"
            )
        calibration = calibration or CalibrationConfig()
        calibrated, options = _calibrated_method(method, spec, gptq, awq, w8a8, threshold)
        samples = calibration.tokens(loaded.tokenizer)
        engine = calibrate_and_quantize(loaded, calibrated, samples, skip=skip, batch_size=calibration.batch_size,
                                        true_sequential=calibration.true_sequential, progress=progress)
        results, estimate = engine.layers, engine.estimate
        info.update(calibration=calibration.describe(), options=options)
        if method in INT8_METHODS:
            del info["spec"]
    else:
        results, estimate = [], {}
        for name, linear in tqdm(layers, desc=f"{method} {spec.describe()}", disable=not progress, unit="layer"):
            with torch.no_grad():
                qweight = rtn_quantize(linear.weight, spec, name)
                sqnr = weight_sqnr_db(linear.weight, qweight.dequantize())
            set_module(loaded.model, name, QuantLinear(qweight, linear.bias))
            results.append(LayerResult(name, qweight.shape, qweight.bits_per_weight, {"weight_sqnr_db": sqnr}))
    if head_spec is not None:
        results.append(quantize_head(loaded.model, head_spec))
        info["head"] = head_spec.to_dict()
    seconds = time.perf_counter() - start
    info["seconds"] = seconds
    loaded.header = {"method": info, "source": loaded.source}
    return QuantizeResult(method=info, seconds=seconds, layers=results, estimate=estimate)


def _head_name(model: torch.nn.Module) -> str:
    """Dotted name of the model's output head (transformers' get_output_embeddings)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        raise LowbitError(f"this model has no linear output head to quantise (found {type(head).__name__}); drop the head spec")
    return next(name for name, module in model.named_modules() if module is head)


def quantize_head(model: torch.nn.Module, spec: QuantSpec) -> LayerResult:
    """Round the output head to nearest with ``spec`` (Eq. 3.1 at the spec's granularity) and
    swap in a QuantLinear, in place. At decode the head is read once per token like every
    block linear, and in a 1B-parameter Llama it is 6% of the weights but, kept in float32
    beside 4-bit blocks, a third of the bytes. A head tied to the input embeddings is untied:
    the embedding keeps its float table (a lookup reads one row per token), the head gets
    the codes, and the config says so, so that a saved checkpoint reloads untied."""
    name = _head_name(model)
    head = model.get_submodule(name)
    with torch.no_grad():
        weight = head.weight.detach().float()
        qweight = rtn_quantize(weight, spec, name)
        sqnr = weight_sqnr_db(weight, qweight.dequantize())
    set_module(model, name, QuantLinear(qweight, head.bias))
    if getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False
    return LayerResult(name, qweight.shape, qweight.bits_per_weight, {"weight_sqnr_db": sqnr})


def _calibrated_method(method, spec, gptq, awq, w8a8, threshold):
    """The engine's method object for ``method`` and the options the header records."""
    if method == "gptq":
        options = gptq or GPTQOptions()
        return GPTQMethod(spec, options), asdict(options)
    if method == "awq":
        options = awq or AWQOptions()
        return AWQMethod(spec, options), asdict(options)
    if method == "llm-int8":
        return LLMInt8Method(threshold), {"threshold": threshold}
    options = w8a8 or W8A8Options()
    options = W8A8Options(options.act_granularity, method == "smoothquant", options.alpha, options.alpha_grid)
    return W8A8Method(options), asdict(options)


def summarize_layers(layers: Sequence[LayerResult]) -> str:
    """One line: bits per weight over all layers, worst weight SQNR, and for calibrated
    methods the summed layer output error against the baseline's on the same inputs."""
    weights = sum(r.shape[0] * r.shape[1] for r in layers)
    bpw = sum(r.bits_per_weight * r.shape[0] * r.shape[1] for r in layers) / weights
    text = f"{bpw:.3f} bits/weight, worst layer weight SQNR {min(r.info['weight_sqnr_db'] for r in layers):.1f} dB"
    if all("output_error" in r.info and "baseline_output_error" in r.info for r in layers):
        ours = sum(r.info["output_error"] for r in layers)
        base = sum(r.info["baseline_output_error"] for r in layers)
        name = layers[0].info.get("baseline", "baseline")
        better = sum(r.info["output_error"] < r.info["baseline_output_error"] for r in layers)
        text += f"; summed layer output error {ours:.4g} vs {name} {base:.4g} ({ours / base:.2f}x), lower in {better}/{len(layers)} layers"
    return text
