"""Training and LoRA settings (`lowbit finetune`, the QAT and QLoRA configs): plain data,
validated at construction, no torch."""

from __future__ import annotations

from dataclasses import dataclass

from lowbit.errors import SpecError
from lowbit.settings import check_patterns, label, setting, to_dict

LORA_TARGETS = (r"\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$",)


GRAD_HOOKS = ("allreduce", "bf16", "fp16", "powersgd", "lowbit")
GRAD_BITS = (32, 16, 8, 4)
GRAD_SCALE_DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class GradConfig:
    """How the ranks of a multi-process run (``--nproc``) reduce their gradients
    (`lowbit.training.grad_compress`): ``hook`` None picks from ``bits``: 32 plain all-reduce,
    16 torch's bf16 hook, 8 or 4 lowbit's quantised two-phase all-reduce."""

    bits: int | None = setting(None, "gradient precision on the wire: 32 (plain all-reduce), 16 (torch's bf16 hook), 8 or 4 "
                                     "(lowbit's quantised all-reduce); default: what --grad-hook sends, else 32",
                               flag="--grad-bits", choices=GRAD_BITS)
    hook: str | None = setting(None, "DDP communication hook: allreduce, bf16, fp16 (torch's; on gloo bf16 is lowbit's copy "
                                     "of torch's, which needs NCCL), powersgd (torch's, rank --powersgd-rank), lowbit "
                                     "(quantised to --grad-bits); default: from --grad-bits",
                               flag="--grad-hook", choices=GRAD_HOOKS)
    # groups of 32 with bfloat16 scales: the int4 setting that kept QLoRA within 1% of fp32 at 7.1x fewer bytes, where
    # float32 scales per 128 (7.5x) lost 1.5% (docs/results.md, "Gradients on the wire")
    group_size: int = setting(32, "values per scale in lowbit's quantised gradients", flag="--grad-group")
    scale_dtype: str = setting("bfloat16", "how lowbit's hook sends each group's scale: bfloat16, or float32 (twice the bytes)",
                               flag="--grad-scale-dtype", choices=GRAD_SCALE_DTYPES)
    error_feedback: bool = setting(True, "add each step's quantisation residual to the next step's gradient (lowbit's and "
                                         "PowerSGD's hooks)", flag="--grad-error-feedback", switch=True)
    stochastic: bool = setting(False, "stochastic rounding (unbiased, QSGD) in lowbit's hook instead of round-to-nearest",
                               flag="--grad-stochastic", switch=True)
    powersgd_rank: int = setting(1, "PowerSGD's approximation rank")

    def __post_init__(self):
        if self.bits is not None and self.bits not in GRAD_BITS:
            raise SpecError(f"{label(GradConfig, 'bits')} must be one of {', '.join(map(str, GRAD_BITS))}, got {self.bits!r}")
        if self.hook is not None and self.hook not in GRAD_HOOKS:
            raise SpecError(f"{label(GradConfig, 'hook')} {self.hook!r} is unknown; use one of {', '.join(GRAD_HOOKS)}")
        wants = {"allreduce": (32,), "bf16": (16,), "fp16": (16,), "powersgd": (32,), "lowbit": (8, 4)}
        if self.hook is not None and self.bits is not None and self.bits not in wants[self.hook]:
            raise SpecError(f"{label(GradConfig, 'hook')} {self.hook} does not send {self.bits}-bit gradients; drop "
                            f"{label(GradConfig, 'bits')} or use {' or '.join(map(str, wants[self.hook]))}")
        if self.scale_dtype not in GRAD_SCALE_DTYPES:
            raise SpecError(f"{label(GradConfig, 'scale_dtype')} {self.scale_dtype!r} is unknown; use one of {', '.join(GRAD_SCALE_DTYPES)}")
        for name, low in (("group_size", 2), ("powersgd_rank", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise SpecError(f"{label(GradConfig, name)} must be an integer of at least {low}, got {value!r}")
        if self.group_size % 2:
            raise SpecError(f"{label(GradConfig, 'group_size')} must be even (two 4-bit codes share a byte), got {self.group_size}")

    @property
    def chosen_hook(self) -> str:
        """``hook``, or the one ``bits`` implies."""
        return self.hook or {None: "allreduce", 32: "allreduce", 16: "bf16", 8: "lowbit", 4: "lowbit"}[self.bits]

    @property
    def chosen_bits(self) -> int:
        """``bits``, or what the hook sends (lowbit's: 8; PowerSGD's factors: 32)."""
        return self.bits or {"allreduce": 32, "bf16": 16, "fp16": 16, "powersgd": 32, "lowbit": 8}[self.chosen_hook]

    def describe(self) -> str:
        hook = self.chosen_hook
        if hook == "lowbit":
            return (f"int{self.chosen_bits} g{self.group_size}{' bf16 scales' if self.scale_dtype == 'bfloat16' else ''}"
                    f"{' stochastic' if self.stochastic else ''}"
                    f"{' + error feedback' if self.error_feedback else ''}")
        if hook == "powersgd":
            return f"PowerSGD rank {self.powersgd_rank}{' + error feedback' if self.error_feedback else ''}"
        return {"allreduce": "fp32 all-reduce", "bf16": "bf16 hook", "fp16": "fp16 hook"}[hook]


@dataclass(frozen=True)
class TrainConfig:
    """Next-token training on windows at seeded random offsets (`lowbit.training.trainer`)."""

    steps: int = setting(200, "optimizer steps")
    lr: float = setting(2e-4, "peak learning rate (linear warm-up, cosine decay to 10%)")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    batch_size: int = setting(4, "windows per step", flag="--batch")
    ctx: int = setting(256, "tokens per training window")
    warmup: float = setting(0.05, "share of the steps spent warming up")
    grad_clip: float = setting(1.0, "gradient norm clip")
    seed: int = setting(0, "seed for the window offsets and adapter init")
    processes: int = setting(1, "training processes on this machine (DistributedDataParallel through torchrun; each takes "
                                "its share of every batch)", flag="--nproc")
    eval_every: int = setting(0, "also score the held-out windows every this many steps (0: only before and after)")
    grad: GradConfig = setting(GradConfig(), "the gradient all-reduce of a multi-process run")

    def __post_init__(self):
        for name, low in (("steps", 1), ("batch_size", 1), ("ctx", 2), ("processes", 1), ("eval_every", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise SpecError(f"{label(TrainConfig, name)} must be an integer of at least {low}, got {value!r}")
        if not self.lr > 0:
            raise SpecError(f"{label(TrainConfig, 'lr')} must be positive, got {self.lr!r}")
        if not 0.0 <= self.warmup < 1.0:
            raise SpecError(f"{label(TrainConfig, 'warmup')} must lie in [0, 1), got {self.warmup!r}")
        if not self.grad_clip > 0 or self.weight_decay < 0:
            raise SpecError(f"{label(TrainConfig, 'grad_clip')} must be positive and {label(TrainConfig, 'weight_decay')} not negative")
        if self.batch_size % self.processes:
            raise SpecError(f"{label(TrainConfig, 'batch_size')} {self.batch_size} does not split over {label(TrainConfig, 'processes')} "
                            f"{self.processes}; use a batch that is a multiple of it")


@dataclass(frozen=True)
class LoRAConfig:
    """rank r, alpha α (the update is scaled by α / r), dropout on the adapter's input, and
    target regexes matched (re.search) against linear names."""

    rank: int = setting(8, "LoRA rank r")
    alpha: float = setting(16.0, "LoRA scale α (the update is scaled by α / r)", flag="--lora-alpha")
    dropout: float = setting(0.05, "dropout on the adapter's input", flag="--lora-dropout")
    targets: tuple[str, ...] = setting(LORA_TARGETS, "regex of the linears to adapt (repeatable)",
                                       flag="--target", repeat=True, metavar="REGEX")

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise SpecError(f"{label(LoRAConfig, 'rank')} must be an integer of at least 1, got {self.rank!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise SpecError(f"{label(LoRAConfig, 'dropout')} must lie in [0, 1), got {self.dropout!r}")
        if not self.alpha > 0:
            raise SpecError(f"{label(LoRAConfig, 'alpha')} must be positive, got {self.alpha!r}")
        check_patterns(LoRAConfig, "targets", self.targets)


@dataclass(frozen=True)
class DistillConfig:
    """The student's depth, the loss and the training run of `lowbit.training.distill`."""

    student_layers: int | None = setting(None, "decoder blocks the student keeps, evenly spaced, the first and last among them "
                                               "(default: half the teacher's, rounded up)")
    temperature: float = setting(1.0, "softmax temperature T of the distillation term (scaled by T²)")
    kd_weight: float = setting(0.5, "weight α of the KL term; the next-token loss gets 1 - α", flag="--kd-weight")
    save_every: int = setting(50, "steps between resumable states in OUT.partial (0: none)")
    train: TrainConfig = setting(TrainConfig(steps=300, lr=1e-4), "the training run")

    def __post_init__(self):
        if self.student_layers is not None and (not isinstance(self.student_layers, int) or self.student_layers < 1):
            raise SpecError(f"{label(DistillConfig, 'student_layers')} must be a positive integer, got {self.student_layers!r}")
        if not self.temperature > 0:
            raise SpecError(f"{label(DistillConfig, 'temperature')} must be positive, got {self.temperature!r}")
        if not 0.0 <= self.kd_weight <= 1.0:
            raise SpecError(f"{label(DistillConfig, 'kd_weight')} must lie in [0, 1], got {self.kd_weight!r}")
        if not isinstance(self.save_every, int) or self.save_every < 0:
            raise SpecError(f"{label(DistillConfig, 'save_every')} must be an integer of at least 0, got {self.save_every!r}")
        if self.train.processes != 1 or self.train.eval_every:
            raise SpecError("lowbit distill trains in one process and scores before and after only; leave train.processes at 1 "
                            "and train.eval_every at 0")

    def to_dict(self) -> dict:
        return to_dict(self)
