"""QLoRA: LoRA adapters trained on a frozen NF4 base (report §7.5; `lowbit.training.lora`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from lowbit.methods.config import MethodConfig
from lowbit.methods.registry import register
from lowbit.methods.rtn import NF4Config
from lowbit.numerics.spec import QuantSpec
from lowbit.settings import setting
from lowbit.training.config import LoRAConfig, TrainConfig

if TYPE_CHECKING:
    from lowbit.training.finetune import FinetuneReport


@register
@dataclass(frozen=True, kw_only=True)
class QLoRAConfig(MethodConfig):
    """Quantise the base to NF4 (absmax per block of ``spec.group_size``, double-quantised
    scales by default), freeze it, and train low-rank adapters B A on every projection."""

    name = "qlora"
    kind = "training"
    summary = "LoRA adapters trained on a frozen NF4 base (double-quantised scales)"
    reference = "report §7.5; Dettmers et al. 2023"
    spec_fields = NF4Config.spec_fields
    refusals = NF4Config.refusals

    spec: QuantSpec = setting(NF4Config.default_spec().with_changes(double_quant=True), "the base's weight format")
    lora: LoRAConfig = setting(LoRAConfig(), "the adapters")
    train: TrainConfig = setting(TrainConfig(lr=2e-4), "the training run")

    def finetune(self, model_ref: str, out: str, **data) -> FinetuneReport:
        """Train and save the adapters to ``out``; ``data`` as `qlora_finetune`."""
        from lowbit.training.finetune import qlora_finetune

        return qlora_finetune(model_ref, out, self, **data)
