"""Knowledge distillation into a shallower student (report §9): `lowbit distill`.

The student is made from the teacher: the same embeddings, final norm and head, and K of
its decoder blocks, evenly spaced with the first and the last kept (for K = n/2 nearly
every other block, DistilBERT's initialisation). It is then trained on the training half of
a corpus with

    L = α · T² · KL(p_teacher^T ‖ p_student^T) + (1 − α) · CE(student, next token)

where p^T is the softmax of the logits divided by the temperature T (Hinton et al. 2015);
the KL is the teacher's next-token distribution against the student's, per position. Every
parameter of the student trains (float32, AdamW, the trainer's schedule).

The run is resumable: every ``save_every`` steps the student, the optimizer and the window
sampler are written atomically to ``OUT.partial/state.pt``; the same command run again
continues from there, and a changed command refuses to. The result is a Hugging Face
directory (the student and the teacher's tokenizer), which `lowbit eval`, `lowbit quantize`
and `lowbit generate` take like any model.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.data.corpora import eval_windows, tokenize_split
from lowbit.errors import LowbitError
from lowbit.evaluation.metrics import evaluate
from lowbit.models.architectures import Architecture, decoder_blocks
from lowbit.outputs import check_new_directory, new_directory
from lowbit.training.config import DistillConfig
from lowbit.training.trainer import TrainState, train

STATE_FILE = "state.pt"


def student_blocks(n_teacher: int, n_student: int) -> list[int]:
    """The teacher's blocks the student keeps: ``n_student`` evenly spaced indices, 0 and
    n_teacher - 1 among them."""
    if not 1 <= n_student < n_teacher:
        raise LowbitError(f"--student-layers {n_student}: the teacher has {n_teacher} decoder blocks; keep between 1 and {n_teacher - 1}")
    if n_student == 1:
        return [n_teacher - 1]
    return [round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)]


def make_student(teacher: nn.Module, arch: Architecture, keep: list[int]) -> nn.Module:
    """A copy of ``teacher`` with only the decoder blocks ``keep`` (in order), float32: the
    config says so (``num_hidden_layers``, per-layer ``layer_types``), every other tensor is
    the teacher's own values."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(keep)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in keep]
    student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    position = {old: new for new, old in enumerate(keep)}
    prefix = arch.blocks + "."
    state = {}
    for key, value in teacher.state_dict().items():
        if key.startswith(prefix):
            index, rest = key[len(prefix):].split(".", 1)
            if int(index) not in position:
                continue
            key = f"{prefix}{position[int(index)]}.{rest}"
        state[key] = value.detach().float().clone()
    result = student.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise LowbitError(f"the student does not match its teacher's tensors (missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})")
    student.tie_weights()
    return student.eval()


def distill_loss(teacher: nn.Module, kd_weight: float, temperature: float):
    """The loss of the module docstring, as `train`'s ``loss_fn(student, batch)``; batch:
    int64 (batch, ctx) windows, the last ctx - 1 tokens the targets."""
    def loss(student: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits = student(inputs).logits.float()
        vocab = logits.shape[-1]
        ce = F.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1))
        if kd_weight == 0:
            return ce
        with torch.no_grad():
            teacher_logp = F.log_softmax(teacher(inputs).logits.float() / temperature, dim=-1).reshape(-1, vocab)
        student_logp = F.log_softmax(logits / temperature, dim=-1).reshape(-1, vocab)
        kl = F.kl_div(student_logp, teacher_logp, log_target=True, reduction="batchmean") * temperature**2
        return kd_weight * kl + (1 - kd_weight) * ce
    return loss


@dataclass
class DistillReport:
    """Held-out scores of the teacher, of the student as made (before training) and after,
    the latter two against the teacher (KLD, top-1 agreement); the training's cost."""

    teacher_blocks: int
    student_blocks: list[int]
    teacher_parameters: int
    student_parameters: int
    scores: dict = field(default_factory=dict)  # label -> {perplexity, kld, top1_percent}
    eval_tokens: int = 0
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    resumed_from: int = 0
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _scores(models: dict, windows, teacher, progress: bool) -> dict:
    return {r.label: {"perplexity": r.perplexity, "kld": r.kld, "top1_percent": r.top1_percent}
            for r in evaluate(models, windows, reference=teacher, progress=progress)}


def partial_dir(out: str | Path) -> Path:
    """Where a run writing ``out`` keeps its resumable state."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


def distill(teacher_ref: str, out: str | Path, config: DistillConfig | None = None, corpus: str | None = None,
            text_file: str | None = None, eval_n: int = 16, progress: bool = True) -> DistillReport:
    """Make a student of ``teacher_ref`` (`make_student`), train it against the teacher
    (`distill_loss`) on the training half of the corpus, score it on ``eval_n`` held-out
    windows and write it to ``out`` (a new directory), resuming from ``OUT.partial`` when an
    earlier run of the same settings stopped there."""
    from lowbit.loader import load_model

    config = config or DistillConfig()
    out = check_new_directory(out, "--out")
    teacher = load_model(teacher_ref)
    if teacher.is_quantized:
        raise LowbitError(f"{teacher_ref} is quantised; distil from its float source")
    blocks = decoder_blocks(teacher.model, teacher.arch)
    keep = student_blocks(len(blocks), config.student_layers or -(-len(blocks) // 2))
    split = tokenize_split(teacher.tokenizer, corpus, text_file)
    windows = eval_windows(split, config.train.ctx, eval_n, ctx_label="--ctx", windows_label="--eval-windows")
    teacher.model.requires_grad_(False)
    student = make_student(teacher.model, teacher.arch, keep)
    record = {"teacher": teacher.source, "blocks": keep, "config": config.to_dict(), "corpus": split.label}
    report = DistillReport(len(blocks), keep, sum(p.numel() for p in teacher.model.parameters()),
                           sum(p.numel() for p in student.parameters()), config=record)
    report.scores = _scores({"teacher": teacher.model, "student (made)": student}, windows, teacher.model, progress)

    partial = partial_dir(out)
    resume = _read_state(partial, record, student)
    if resume is not None:
        report.resumed_from = resume.step

    def save_state(state: TrainState) -> None:
        partial.mkdir(exist_ok=True)
        tmp = partial / (STATE_FILE + ".tmp")
        torch.save({"record": record, "student": student.state_dict(), "state": asdict(state)}, tmp)
        os.replace(tmp, partial / STATE_FILE)

    result = train(student, split.calibration, config.train, bos_id=split.bos_id,
                   loss_fn=distill_loss(teacher.model, config.kd_weight, config.temperature), progress=progress, desc="distill",
                   resume=resume, save_state=save_state, save_every=config.save_every)
    report.losses, report.seconds = result.losses, result.seconds
    report.eval_tokens = windows[:, 1:].numel()
    report.scores.update(_scores({"student (trained)": student}, windows, teacher.model, progress))
    with new_directory(out, "--out") as tmp:
        student.save_pretrained(tmp)
        teacher.tokenizer.save_pretrained(tmp)
        (tmp / "distill.json").write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    shutil.rmtree(partial, ignore_errors=True)
    return report


def _read_state(partial: Path, record: dict, student: nn.Module) -> TrainState | None:
    """The state an earlier run left in ``partial``, loaded into ``student``; None if there is none."""
    file = partial / STATE_FILE
    if not file.exists():
        return None
    try:
        saved = torch.load(file, weights_only=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as err:  # a truncated or foreign file
        raise LowbitError(f"{file} cannot be read ({type(err).__name__}); remove {partial} to start over") from None
    if saved.get("record") != record:
        raise LowbitError(f"{partial} holds a run of other settings (teacher, blocks, corpus or flags differ); "
                          f"run the same command to resume it, or remove {partial} to start over")
    student.load_state_dict(saved["student"])
    return TrainState(**saved["state"])
