"""QLoRA and QAT fine-tuning of a packaged or local model, measured on held-out text.

Training windows come from the first half of the corpus (the calibration half), held-out
perplexity from windows of the second half, so the score is on text the model was not
tuned on.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lowbit.checkpoint import prepare_output_dir, save_quantized
from lowbit.data.corpora import eval_windows, tokenize_split
from lowbit.errors import LowbitError
from lowbit.models.loading import LoadedModel, load_model
from lowbit.numerics.spec import QuantSpec
from lowbit.pipeline import quantize_model
from lowbit.training.lora import LoRAConfig, add_lora, merge_lora, save_adapters
from lowbit.training.qat import convert_qat, prepare_qat
from lowbit.training.trainer import TrainConfig, perplexity, train


@dataclass
class FinetuneReport:
    """Held-out perplexity of the float model, of the quantised model before training, and
    after; the training losses and cost."""

    method: str
    float_perplexity: float
    before_perplexity: float
    after_perplexity: float
    eval_tokens: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    trainable_parameters: int = 0
    optimizer_state_bytes: int = 0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _data(loaded: LoadedModel, corpus, text_file, config: TrainConfig, eval_n: int):
    split = tokenize_split(loaded.tokenizer, corpus, text_file)
    return split, eval_windows(split, config.ctx, eval_n)


def qlora_finetune(
    model_ref: str,
    out: str | Path,
    lora: LoRAConfig = LoRAConfig(),
    train_config: TrainConfig = TrainConfig(),
    block_size: int = 64,
    double_quant: bool = True,
    corpus: str | None = None,
    text_file: str | None = None,
    eval_n: int = 16,
    merged_out: str | Path | None = None,
    progress: bool = True,
) -> FinetuneReport:
    """NF4 (block ``block_size``, double-quantised) frozen base + LoRA adapters, trained on
    the corpus; adapters saved to ``out`` (and the merged float model to ``merged_out``)."""
    out = Path(out)
    if out.exists() or (merged_out is not None and Path(merged_out).exists()):
        raise LowbitError(f"output directory {out if out.exists() else merged_out} already exists; choose another or remove it")
    reference = load_model(model_ref)
    split, windows = _data(reference, corpus, text_file, train_config, eval_n)
    float_ppl = perplexity(reference.model, windows)
    del reference
    loaded = load_model(model_ref)
    spec = QuantSpec(bits=4, format="nf4", group_size=block_size, double_quant=double_quant, scale_dtype="float32")
    quantize_model(loaded, spec, method="nf4", progress=False)
    before = perplexity(loaded.model, windows)
    add_lora(loaded.model, lora)
    result = train(loaded.model, split.calibration, train_config, bos_id=split.bos_id, progress=progress, desc="qlora")
    after = perplexity(loaded.model, windows)
    tmp = prepare_output_dir(out)
    try:
        save_adapters(loaded.model, tmp, lora, extra={"base_model": loaded.source, "base_spec": spec.to_dict(), "train": asdict(train_config)})
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if merged_out is not None:
        merge_lora(loaded.model)
        tmp = prepare_output_dir(Path(merged_out))
        try:
            loaded.model.save_pretrained(tmp)
            loaded.tokenizer.save_pretrained(tmp)
            tmp.rename(merged_out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return FinetuneReport("qlora", float_ppl, before, after, windows[:, 1:].numel(), result.losses, result.seconds,
                          result.trainable_parameters, result.optimizer_state_bytes, {"spec": spec.describe(), "lora": asdict(lora)})


def qat_finetune(
    model_ref: str,
    out: str | Path,
    spec: QuantSpec,
    train_config: TrainConfig = TrainConfig(lr=2e-5),
    lsq: bool = False,
    corpus: str | None = None,
    text_file: str | None = None,
    eval_n: int = 16,
    progress: bool = True,
) -> FinetuneReport:
    """Fine-tune every block linear through its fake-quantised weight (STE, optionally
    LSQ steps), then pack it; ``before`` is RTN post-training quantisation at the same spec."""
    out = Path(out)
    if out.exists():
        raise LowbitError(f"output directory {out} already exists; choose another --out or remove it")
    reference = load_model(model_ref)
    split, windows = _data(reference, corpus, text_file, train_config, eval_n)
    float_ppl = perplexity(reference.model, windows)
    ptq = load_model(model_ref)
    quantize_model(ptq, spec, method="rtn", progress=False)
    before = perplexity(ptq.model, windows)
    del ptq
    prepare_qat(reference.model, spec, lsq=lsq)
    embeddings = reference.model.get_input_embeddings()
    for p in embeddings.parameters():  # embeddings (and a tied lm_head) stay as they are
        p.requires_grad_(False)
    start = time.perf_counter()
    result = train(reference.model, split.calibration, train_config, bos_id=split.bos_id, progress=progress, desc="qat")
    convert_qat(reference.model)
    after = perplexity(reference.model, windows)
    reference.header = {"method": {"name": "qat", "spec": spec.to_dict(), "lsq": lsq, "train": asdict(train_config), "seconds": time.perf_counter() - start}, "source": reference.source}
    save_quantized(reference, out)
    return FinetuneReport("qat", float_ppl, before, after, windows[:, 1:].numel(), result.losses, result.seconds,
                          result.trainable_parameters, result.optimizer_state_bytes, {"spec": spec.describe(), "lsq": lsq})
