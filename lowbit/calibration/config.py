"""Where a calibrated method's samples come from (plain data, no torch: the CLI parses it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lowbit.data.texts import CORPORA
from lowbit.errors import SpecError
from lowbit.settings import label, setting, to_dict

# ``--calib-corpus mix``: the same number of samples from each named corpus, interleaved
# (so every batch holds some of each); a corpus of its own would be almost all Shakespeare,
# which is 14 times longer than pydoc.
MIX = "mix"
CALIBRATION_CORPORA = (*CORPORA, MIX)
# The default samples: the mix. Calibrated on pydoc alone, GPTQ W4 g128 lost more than RTN on
# Shakespeare (+28.6% perplexity against +22.8%); on the mix it beats RTN on both corpora
# (docs/results.md, "Calibration that generalises").
DEFAULT_CALIBRATION_CORPUS = MIX


def corpora_of(corpus: str) -> tuple[str, ...]:
    """The named corpora a calibration corpus reads: every one for the mix, else itself."""
    return tuple(CORPORA) if corpus == MIX else (corpus,)


@dataclass(frozen=True)
class CalibrationConfig:
    """``samples`` windows of ``ctx`` tokens at seeded random offsets in the first half of
    ``corpus`` (default `DEFAULT_CALIBRATION_CORPUS`, the mix) or of ``text_file``, run
    through the model ``batch_size`` at a time;
    ``true_sequential`` as in `lowbit.calibration.engine.calibrate_and_quantize`."""

    corpus: str | None = setting(None, f"named corpus for the samples (its first half); {MIX}, the default: equal shares of "
                                       f"every named corpus ({', '.join(CORPORA)})", flag="--calib-corpus", choices=CALIBRATION_CORPORA,
                                 metavar="NAME")
    text_file: str | None = setting(None, "UTF-8 text file for the samples (its first half)", flag="--calib-text", metavar="FILE")
    samples: int = setting(128, "calibration samples", flag="--calib-samples")
    ctx: int = setting(512, "tokens per calibration sample", flag="--calib-ctx")
    seed: int = setting(0, "seed for the sample offsets")
    batch_size: int = setting(8, "samples per forward pass", flag="--calib-batch")
    true_sequential: bool = setting(False, "collect each linear group's inputs after the earlier groups of its block are quantised (slower)",
                                    switch=True)

    def __post_init__(self):
        if self.corpus is not None and self.text_file is not None:
            raise SpecError(f"give {label(CalibrationConfig, 'corpus')} or {label(CalibrationConfig, 'text_file')}, not both")
        if self.corpus is not None and self.corpus not in CALIBRATION_CORPORA:
            raise SpecError(f"{label(CalibrationConfig, 'corpus')} {self.corpus!r} is unknown; use one of {', '.join(CALIBRATION_CORPORA)} "
                            "or a text file")
        for name, low in (("samples", 1), ("ctx", 2), ("batch_size", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise SpecError(f"{label(CalibrationConfig, name)} must be an integer of at least {low}, got {value!r}")

    def tokens(self, tokenizer):
        """int64 (samples, ctx) token ids; with ``mix``, sample i from corpus i mod k of the k
        named corpora (each corpus's samples at its own seeded offsets)."""
        import torch

        from lowbit.data.corpora import calibration_samples, tokenize_split

        ctx_label = label(CalibrationConfig, "ctx")
        corpus = None if self.text_file else (self.corpus or DEFAULT_CALIBRATION_CORPUS)
        if corpus != MIX:
            split = tokenize_split(tokenizer, corpus, self.text_file)
            return calibration_samples(split, self.samples, self.ctx, self.seed, ctx_label=ctx_label)
        names = corpora_of(MIX)
        shares = [len(range(i, self.samples, len(names))) for i in range(len(names))]
        parts = [calibration_samples(tokenize_split(tokenizer, name), n, self.ctx, self.seed, ctx_label=ctx_label)
                 for name, n in zip(names, shares) if n]
        out = torch.empty(self.samples, parts[0].shape[1], dtype=torch.long)
        for i, part in enumerate(parts):
            out[i :: len(names)] = part
        return out

    def to_dict(self) -> dict:
        """What a checkpoint header records: the corpus actually used and the file's absolute path."""
        data = to_dict(self)
        data["corpus"] = None if self.text_file else (self.corpus or DEFAULT_CALIBRATION_CORPUS)
        data["text_file"] = None if self.text_file is None else str(Path(self.text_file).resolve())
        return data
