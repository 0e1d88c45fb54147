"""QLoRA and QAT fine-tuning of a packaged or local model, measured on held-out text.

Training windows come from the first half of the corpus (the calibration half), held-out
perplexity from windows of the second half, so the score is on text the model was not
tuned on.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lowbit.checkpoint import save_quantized
from lowbit.data.corpora import eval_windows, tokenize_split
from lowbit.loader import load_model
from lowbit.methods.qat import QATConfig
from lowbit.methods.qlora import QLoRAConfig
from lowbit.methods.rtn import NF4Config, RTNConfig
from lowbit.models.loading import LoadedModel
from lowbit.outputs import check_new_directory, new_directory
from lowbit.pipeline import quantize_model
from lowbit.training.distributed import Parallel
from lowbit.training.lora import add_lora, merge_lora, save_adapters
from lowbit.training.qat import convert_qat, prepare_qat
from lowbit.training.trainer import perplexity, train


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
    curve: list[tuple[int, float]] = field(default_factory=list)
    processes: int = 1
    gradients: str = "local"
    step_seconds: float = 0.0
    grad_bytes_per_step: float | None = None
    counted_grad_bytes_per_step: float | None = None

    @classmethod
    def of(cls, method: str, float_ppl: float, before: float, after: float, windows, result, config, extra: dict) -> FinetuneReport:
        """The report of a finished run: the scores, `TrainResult` ``result``'s costs, and the
        curve closed by the before and after points."""
        train = config.train
        curve = [(0, before), *result.curve, (train.steps, after)]
        return cls(method, float_ppl, before, after, windows[:, 1:].numel(), result.losses, result.seconds, result.trainable_parameters,
                   result.optimizer_state_bytes, extra, curve, train.processes,
                   train.grad.describe() if train.processes > 1 else "local", result.step_seconds,
                   result.grad_bytes_per_step, result.counted_grad_bytes_per_step)

    def to_dict(self) -> dict:
        return asdict(self)


def _data(loaded: LoadedModel, corpus, text_file, ctx: int, eval_n: int):
    split = tokenize_split(loaded.tokenizer, corpus, text_file)
    return split, eval_windows(split, ctx, eval_n, ctx_label="--ctx", windows_label="--eval-windows")


def qlora_finetune(
    model_ref: str,
    out: str | Path,
    config: QLoRAConfig | None = None,
    corpus: str | None = None,
    text_file: str | None = None,
    eval_n: int = 16,
    merged_out: str | Path | None = None,
    progress: bool = True,
) -> FinetuneReport:
    """Quantise the base to ``config.spec`` (NF4, double-quantised scales by default), freeze
    it and train LoRA adapters (``config.lora``) on the corpus for ``config.train``; the
    adapters are saved to ``out`` (and the merged float model to ``merged_out``)."""
    config = config or QLoRAConfig()
    parallel = Parallel.from_environment(config.train.grad, config.train.processes)
    main = parallel is None or parallel.is_main
    check_new_directory(out, "--out")
    if merged_out is not None:
        check_new_directory(merged_out, "--merge-out")
    reference = load_model(model_ref)
    split, windows = _data(reference, corpus, text_file, config.train.ctx, eval_n)
    float_ppl = perplexity(reference.model, windows) if main else math.nan
    del reference
    loaded = load_model(model_ref)
    quantize_model(loaded, NF4Config(spec=config.spec), progress=False)
    before = perplexity(loaded.model, windows) if main else math.nan
    add_lora(loaded.model, config.lora)
    result = train(loaded.model, split.calibration, config.train, bos_id=split.bos_id, progress=progress, desc="qlora",
                   parallel=parallel, evaluate=lambda model: perplexity(model, windows))
    extra = {"spec": config.spec.describe(), "lora": asdict(config.lora)}
    if not main:  # rank 0 scores and writes; the others only trained their shares
        return FinetuneReport.of("qlora", float_ppl, before, math.nan, windows, result, config, extra)
    after = perplexity(loaded.model, windows)
    with new_directory(out, "--out") as tmp:
        save_adapters(loaded.model, tmp, config.lora, extra={"base_model": loaded.source, "method": config.to_dict()})
    if merged_out is not None:
        merge_lora(loaded.model)
        with new_directory(merged_out, "--merge-out") as tmp:
            loaded.model.save_pretrained(tmp)
            loaded.tokenizer.save_pretrained(tmp)
    return FinetuneReport.of("qlora", float_ppl, before, after, windows, result, config, extra)


def qat_finetune(
    model_ref: str,
    out: str | Path,
    config: QATConfig | None = None,
    corpus: str | None = None,
    text_file: str | None = None,
    eval_n: int = 16,
    progress: bool = True,
) -> FinetuneReport:
    """Fine-tune every block linear through its fake-quantised weight (STE, optionally
    LSQ steps), then pack it and save it to ``out``; ``before`` is RTN post-training
    quantisation at the same spec."""
    config = config or QATConfig()
    parallel = Parallel.from_environment(config.train.grad, config.train.processes)
    main = parallel is None or parallel.is_main
    check_new_directory(out, "--out")
    reference = load_model(model_ref)
    split, windows = _data(reference, corpus, text_file, config.train.ctx, eval_n)
    float_ppl, before = math.nan, math.nan
    if main:
        float_ppl = perplexity(reference.model, windows)
        ptq = load_model(model_ref)
        quantize_model(ptq, RTNConfig(spec=config.spec), progress=False)
        before = perplexity(ptq.model, windows)
        del ptq
    prepare_qat(reference.model, config.spec, lsq=config.lsq)
    embeddings = reference.model.get_input_embeddings()
    for p in embeddings.parameters():  # embeddings (and a tied lm_head) stay as they are
        p.requires_grad_(False)
    result = train(reference.model, split.calibration, config.train, bos_id=split.bos_id, progress=progress, desc="qat",
                   parallel=parallel, evaluate=lambda model: perplexity(model, windows))
    extra = {"spec": config.spec.describe(), "lsq": config.lsq}
    if not main:  # rank 0 scores and writes; the others only trained their shares
        return FinetuneReport.of("qat", float_ppl, before, math.nan, windows, result, config, extra)
    convert_qat(reference.model)
    after = perplexity(reference.model, windows)
    reference.header = {"method": config.to_dict(), "calibration": None, "source": reference.source}
    save_quantized(reference, out)
    return FinetuneReport.of("qat", float_ppl, before, after, windows, result, config, extra)
