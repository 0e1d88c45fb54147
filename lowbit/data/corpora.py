"""Text for calibration and evaluation: named corpora or any text file, tokenised into
deterministic windows.

Every corpus is split once, by token position: the first half feeds calibration, the second
half evaluation, so a method never sees the text it is scored on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lowbit.data.texts import load_text
from lowbit.errors import LowbitError

CALIBRATION_SHARE = 0.5


@dataclass(frozen=True)
class TokenSplit:
    """A corpus tokenised once and cut at one position.

    calibration: int64 (n_calib,) token ids of the first part.
    evaluation: int64 (n_eval,) token ids of the rest.
    bos_id: the id to put before each window, or None when the tokenizer adds none.
    """

    label: str
    calibration: torch.Tensor
    evaluation: torch.Tensor
    bos_id: int | None


def bos_id_of(tokenizer) -> int | None:
    """The BOS id the tokenizer itself prepends to a text, or None (e.g. SmolLM2 adds none, Gemma does)."""
    ids = tokenizer("a").input_ids
    bos = tokenizer.bos_token_id
    return bos if bos is not None and ids and ids[0] == bos else None


def tokenize_split(tokenizer, corpus: str | None = None, text_file: str | Path | None = None) -> TokenSplit:
    """Tokenise a corpus without special tokens and cut it at CALIBRATION_SHARE."""
    label, text = load_text(corpus, text_file)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)
    cut = int(len(ids) * CALIBRATION_SHARE)
    return TokenSplit(label=label, calibration=ids[:cut], evaluation=ids[cut:], bos_id=bos_id_of(tokenizer))


def eval_windows(split: TokenSplit, ctx: int, n_windows: int | None = None, ctx_label: str = "--ctx", windows_label: str = "--windows") -> torch.Tensor:
    """Non-overlapping windows from the evaluation part, in order: int64 (n, ctx).

    With a BOS token each window is BOS + (ctx - 1) text tokens, so the model sees a proper
    start of sequence and ``ctx`` stays the real context length. ``ctx_label`` and
    ``windows_label`` name the two settings in error messages (the caller's flags).
    """
    if ctx < 2:
        raise LowbitError(f"{ctx_label} {ctx} is too short; use at least 2 tokens (e.g. 512)")
    body = ctx - 1 if split.bos_id is not None else ctx
    available = len(split.evaluation) // body
    if available == 0:
        raise LowbitError(
            f"the evaluation part of {split.label} has {len(split.evaluation)} tokens, fewer than one window of {ctx}; "
            f"use a longer text or a smaller {ctx_label}"
        )
    n = available if n_windows is None else n_windows
    if n < 1:
        raise LowbitError(f"{windows_label} {n_windows} must be at least 1")
    if n > available:
        raise LowbitError(f"{split.label} has room for {available} evaluation windows of {ctx} tokens, not {n}; "
                          f"use {windows_label} {available} or a smaller {ctx_label}")
    windows = split.evaluation[: n * body].reshape(n, body)
    if split.bos_id is not None:
        windows = torch.cat([torch.full((n, 1), split.bos_id, dtype=torch.long), windows], dim=1)
    return windows


def calibration_samples(split: TokenSplit, n_samples: int, ctx: int, seed: int = 0, ctx_label: str = "ctx") -> torch.Tensor:
    """``n_samples`` windows of ``ctx`` tokens at seeded random offsets in the calibration part,
    int64 (n_samples, ctx), BOS-prefixed like evaluation windows. Samples may overlap when the
    part is short (as in the GPTQ reference code). ``ctx_label`` names ``ctx`` in errors."""
    body = ctx - 1 if split.bos_id is not None else ctx
    if len(split.calibration) < body:
        raise LowbitError(f"the calibration part of {split.label} has {len(split.calibration)} tokens, fewer than one sample of {ctx}; "
                          f"use a longer text or a smaller {ctx_label}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(split.calibration) - body + 1, (n_samples,), generator=generator)
    samples = torch.stack([split.calibration[s : s + body] for s in starts.tolist()])
    if split.bos_id is not None:
        samples = torch.cat([torch.full((n_samples, 1), split.bos_id, dtype=torch.long), samples], dim=1)
    return samples
