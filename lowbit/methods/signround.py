"""Learned rounding (SignRound) on the block-by-block calibration engine (the maths:
`lowbit.algorithms.signround`).

Each block is first quantised by the start method (``--init``: rtn, gptq or awq, with their
default options and this config's spec), then the engine hands the whole block back
(`refine_block`): every quantised linear becomes a `LearnedRounding` from the start's codes,
and the offsets and range factors of all of them are learned together against the float
block's outputs on the same inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from lowbit.errors import SpecError
from lowbit.methods.config import CalibratedWeightConfig
from lowbit.methods.registry import register
from lowbit.settings import label, setting

if TYPE_CHECKING:
    from lowbit.calibration.engine import StartPoint

INITS = ("rtn", "gptq", "awq")
CLIP_CHOICES = ("auto", "on", "off")
OPTIMIZERS = ("adam", "sign")
TARGETS = ("float", "quantised")
# Adam's first step size, chosen on SmolLM2's first three blocks (docs/results.md, "Learned rounding")
ADAM_LR = 5e-3


@register
@dataclass(frozen=True, kw_only=True)
class SignRoundConfig(CalibratedWeightConfig):
    """SignRound: learn each weight's rounding offset and each group's range on the block's
    output error (Adam, or SignRound's signed gradient steps), starting from RTN, GPTQ or AWQ
    codes."""

    name = "signround"
    summary = "learned rounding offsets (and group ranges) on each block's output error, from RTN, GPTQ or AWQ codes"
    reference = "Cheng et al. 2023 (SignRound, AutoRound); Eq. 3.1-3.3 with the STE of report §5.2"
    refusals = {"double_quant": "learned rounding recomputes the scales from learned ranges, which double-quantised scales cannot follow",
                "format": "learned rounding moves weights between the levels of an integer grid; a codebook has none (use --format int "
                          "or a GGML type)"}

    init: str = setting("gptq", "the method whose codes learning starts from (with its default options)", choices=INITS)
    iters: int = setting(50, "learning steps per block, each on one calibration batch (--calib-batch samples)")
    optimizer: str = setting("adam", "adam, or sign (SignRound's own step: size times the gradient's sign)", choices=OPTIMIZERS,
                             flag="--round-optimizer")
    lr: float | None = setting(None, f"the first step's size, decaying linearly to 0 (default {ADAM_LR} with adam, 1 / iters with sign)",
                               parse=float, accepts="a positive number")
    # float: 0.7-1.1 points lower in-domain perplexity loss at W4 than quantised on SmolLM2 and Gemma 3, 0.5-1.2 higher out of
    # domain at 50 steps (docs/results.md, the quality table)
    target: str = setting("float", "what each block learns to reproduce: the float block on the float model's own inputs (float: "
                                   "AutoRound's choice, which also corrects the error the blocks before left), or on the block's "
                                   "quantised inputs (quantised)", choices=TARGETS, flag="--round-target")
    learn_clip: str = setting("auto", "also learn each group's range factors: on, off, or auto (on from rtn and awq; off from gptq, "
                                      "whose codes depend on each other's rounding, so rescaling a group undoes its error feedback)",
                              choices=CLIP_CHOICES)

    def __post_init__(self):
        super().__post_init__()
        from lowbit.numerics.formats import IntFormat

        for spec in [self.spec, *(self.spec.with_changes(format=f) for _, f in self.layer_formats)]:
            if not isinstance(spec.number_format, IntFormat):
                raise SpecError(f"signround cannot take format={spec.format!r}: {self.refusals['format']}; drop it")
        if self.init not in INITS:
            raise SpecError(f"{label(SignRoundConfig, 'init')} {self.init!r} is unknown; use one of {', '.join(INITS)}")
        if self.learn_clip not in CLIP_CHOICES:
            raise SpecError(f"{label(SignRoundConfig, 'learn_clip')} {self.learn_clip!r} is unknown; use one of {', '.join(CLIP_CHOICES)}")
        if self.optimizer not in OPTIMIZERS:
            raise SpecError(f"{label(SignRoundConfig, 'optimizer')} {self.optimizer!r} is unknown; use one of {', '.join(OPTIMIZERS)}")
        if self.target not in TARGETS:
            raise SpecError(f"{label(SignRoundConfig, 'target')} {self.target!r} is unknown; use one of {', '.join(TARGETS)}")
        if not isinstance(self.iters, int) or self.iters < 0:
            raise SpecError(f"{label(SignRoundConfig, 'iters')} must be an integer of 0 or more (e.g. 100), got {self.iters!r}")
        if self.lr is not None and (not isinstance(self.lr, (int, float)) or not self.lr > 0):
            raise SpecError(f"{label(SignRoundConfig, 'lr')} must be a positive number (e.g. 0.01), got {self.lr!r}")

    @property
    def float_targets(self) -> bool:
        """Whether the engine carries the float stream (`lowbit.calibration.engine.BlockRefiner`)."""
        return self.target == "float"

    def clips(self) -> bool:
        """Whether the range factors are learned (``learn_clip`` with auto resolved)."""
        return self.learn_clip == "on" or (self.learn_clip == "auto" and self.init != "gptq")

    def start_method(self) -> CalibratedWeightConfig:
        """The config of the ``init`` method, with this config's spec, skips and formats."""
        from lowbit.methods.awq import AWQConfig
        from lowbit.methods.gptq import GPTQConfig
        from lowbit.methods.rtn import RTNConfig

        cls = {"rtn": RTNConfig, "gptq": GPTQConfig, "awq": AWQConfig}[self.init]
        return cls(spec=self.spec, skip=self.skip, layer_formats=self.layer_formats, layer_bits=self.layer_bits)

    def statistics(self, in_features: int):
        if self.init == "rtn":  # RTN needs none; the Hessian gives its output error for the report
            from lowbit.calibration.statistics import HessianAccumulator

            return HessianAccumulator(in_features)
        return self.start_method().statistics(in_features)

    def quantize_group(self, block, group, linears, selected, stats, arch, prefix: str = "") -> list:
        """The start method's step (`lowbit.calibration.engine`); `refine_block` learns after it."""
        start = self.start_method()
        if self.init != "rtn":
            return start.quantize_group(block, group, linears, selected, stats, arch, prefix)
        from lowbit.algorithms.gptq import output_error
        from lowbit.modules.quant_linear import QuantLinear
        from lowbit.numerics.quantization import weight_sqnr_db

        out = []
        for name in selected:
            weight = linears[name].weight
            qweight = start.quantize_weight(weight, f"{prefix}{name}")
            approx = qweight.dequantize()
            error = output_error(weight, approx, stats.hessian)
            info = {"weight_sqnr_db": weight_sqnr_db(weight, approx), "output_error": error, "baseline_output_error": error, "baseline": "rtn"}
            out.append((name, QuantLinear(qweight, linears[name].bias), info))
        return out

    def refine_block(self, block, run, targets, starts: dict[str, StartPoint]) -> dict[str, tuple]:
        """Learn the rounding of the block's quantised linears together.

        run: i -> the block's output on calibration batch i; targets: the float block's
        outputs on the same inputs; starts: the start method's result per linear (name in
        block). Returns name -> (QuantLinear, report entries) for each of them.
        """
        from lowbit.algorithms.signround import LearnedRounding, signround
        from lowbit.modules.quant_linear import QuantLinear
        from lowbit.modules.swap import set_module
        from lowbit.numerics.quantization import weight_sqnr_db

        learners, float_weights = {}, {}
        for name, start in starts.items():
            float_weights[name], start_weight = start.now()
            learners[name] = LearnedRounding(start.module.qweight.to_quantized(), start_weight, start.module.bias, learn_clip=self.clips())
        frozen = [p for p in block.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        for name, learner in learners.items():
            set_module(block, name, learner)
        try:
            lr = self.lr if self.lr is not None else (ADAM_LR if self.optimizer == "adam" else None)
            result = signround(run, targets, list(learners.values()), self.iters, lr, optimizer=self.optimizer)
        finally:
            for p in frozen:
                p.requires_grad_(True)
        out = {}
        for name, learner in learners.items():
            entries = {"block_error_start": result.start_error, "block_error_learned": result.learned_error, "block_error": result.error,
                       "learned_kept": result.kept}
            if not result.kept:  # the start's own module: the same codes, and no re-rounding of its scales
                set_module(block, name, starts[name].module)
                out[name] = (starts[name].module, entries)
                continue
            qweight = learner.quantized()
            module = QuantLinear(qweight, learner.bias)
            set_module(block, name, module)
            out[name] = (module, {**entries, "weight_sqnr_db": weight_sqnr_db(float_weights[name], qweight.dequantize())})
        return out
