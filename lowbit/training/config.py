"""Training and LoRA settings (`lowbit finetune`, the QAT and QLoRA configs): plain data,
validated at construction, no torch."""

from __future__ import annotations

from dataclasses import dataclass

from lowbit.errors import SpecError
from lowbit.settings import check_patterns, label, setting

LORA_TARGETS = (r"\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$",)


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

    def __post_init__(self):
        for name, low in (("steps", 1), ("batch_size", 1), ("ctx", 2)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise SpecError(f"{label(TrainConfig, name)} must be an integer of at least {low}, got {value!r}")
        if not self.lr > 0:
            raise SpecError(f"{label(TrainConfig, 'lr')} must be positive, got {self.lr!r}")
        if not 0.0 <= self.warmup < 1.0:
            raise SpecError(f"{label(TrainConfig, 'warmup')} must lie in [0, 1), got {self.warmup!r}")
        if not self.grad_clip > 0 or self.weight_decay < 0:
            raise SpecError(f"{label(TrainConfig, 'grad_clip')} must be positive and {label(TrainConfig, 'weight_decay')} not negative")


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
