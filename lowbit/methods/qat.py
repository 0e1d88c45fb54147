"""QAT: fine-tune through fake-quantised weights with the straight-through estimator, then
pack (report §5.2; `lowbit.training.qat`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from lowbit.methods.config import WEIGHT_SPEC, MethodConfig
from lowbit.methods.registry import register
from lowbit.numerics.spec import QuantSpec
from lowbit.settings import setting
from lowbit.training.config import TrainConfig

if TYPE_CHECKING:
    from lowbit.training.finetune import FinetuneReport


@register
@dataclass(frozen=True, kw_only=True)
class QATConfig(MethodConfig):
    """Train every block linear through Ŵ = S·Clamp(Round(W/S)) with the STE (optionally
    learning the steps S, LSQ), then store it packed at ``spec``; compared with RTN at the
    same spec before training."""

    name = "qat"
    kind = "training"
    summary = "quantisation-aware training (STE, optional LSQ step sizes), packed after training"
    reference = "report §5.2; Esser et al. 2020 (LSQ)"
    spec_fields = frozenset({"bits", "group_size", "granularity"})
    refusals = {f: "QAT trains symmetric integer weights" for f in ("symmetric", "zero_point", "format", "double_quant", "range", "percentile")}

    spec: QuantSpec = setting(WEIGHT_SPEC, "the weight format")
    lsq: bool = setting(False, "learn the step sizes (LSQ)", switch=True)
    train: TrainConfig = setting(TrainConfig(lr=2e-5), "the training run")

    def finetune(self, model_ref: str, out: str, **data) -> FinetuneReport:
        """Train, pack and save to ``out`` (a lowbit checkpoint); ``data`` as `qat_finetune`."""
        from lowbit.training.finetune import qat_finetune

        return qat_finetune(model_ref, out, self, **data)
